"""serving/server.py answers as TF Serving does where it used to differ: each test follows TF Serving's source
(github.com/tensorflow/serving at commit 9d981c5c2708d23c5407c7c1e30309e6f9798874), cited by file and lines.

One server over tests/test_serving_server.py's repository ("fixed": one version; "lab": versions 1 and 2 with
labels stable -> 1, canary -> 2).
"""
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from .test_serving_server import X, client, expected_y, http, repo, rpc_error, server  # noqa: F401 - fixtures

TF_SERVING_COMMIT = "9d981c5c2708d23c5407c7c1e30309e6f9798874"


def grpc_stubs(server):
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
    ch = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    return ch, prediction_service_pb2_grpc.PredictionServiceStub(ch), model_service_pb2_grpc.ModelServiceStub(ch)


def raw_http(server, method, path, body: bytes | None = None):
    req = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_unknown_version_label_is_invalid_argument_and_400(server, client):
    """(a) An unknown version label: INVALID_ARGUMENT "Unrecognized servable version label: <label>", which REST
    answers 400 (not NOT_FOUND / 404).

    server_core.cc:853-863 (ServableRequestFromModelSpec resolves a label first) and server_core.cc:873-891
    (GetModelVersionForLabel: a label not in the model's map, or a model with no map, is
    errors::InvalidArgument("Unrecognized servable version label: ", label)); http_server.cc:56-57
    (ToHTTPStatusCode: kInvalidArgument -> BAD_REQUEST); http_rest_api_handler_test.cc:310-319 pins it."""
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2
    message = "Unrecognized servable version label: nope"
    for model in ("lab", "no_such_model"):  # no label map for an unknown model: the same answer
        e = rpc_error(lambda: client.predict(model, {"x": X}, label="nope"))
        assert (e.grpc_code, e.message) == (grpc.StatusCode.INVALID_ARGUMENT, message), e
        status, obj = http(server, "POST", f"/v1/models/{model}/labels/nope:predict", {"instances": X.tolist()})
        assert (status, obj) == (400, {"error": message})
        status, obj = http(server, "GET", f"/v1/models/{model}/labels/nope/metadata")
        assert (status, obj) == (400, {"error": message})
    ch, pred, _ = grpc_stubs(server)
    with ch:
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name, req.model_spec.version_label = "lab", "nope"
        with pytest.raises(grpc.RpcError) as ei:
            pred.GetModelMetadata(req, timeout=10)
        assert (ei.value.code(), ei.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    # a known label still serves its version
    np.testing.assert_allclose(client.predict("lab", {"x": X}, label="canary")["y"], expected_y(X, 2), rtol=1e-6)


def test_malformed_v1_urls_are_400(server):
    """(b) Every /v1/ URL is TF Serving's own: one that does not parse is INVALID_ARGUMENT -> 400
    {"error": "Malformed request: <METHOD> <path>"}, and GET /v1/models (which parses, with no model name) is
    400 "Missing model name in request."; outside /v1/ it is a 404.

    http_rest_api_handler.cc:74-75 (the status starts as InvalidArgument "Malformed request: ", method, " ",
    path, and stays so unless the URL parsed), :97-104 (GET dispatch), :185-189 ("Missing model name in
    request."); http_rest_api_util.cc:31-34 (the POST and GET patterns, case-insensitive, full match) and
    :115-121 ("Failed to convert version: ... to numeric."); http_rest_api_util.h:33 ("(?i)/v1/.*": the
    handler's URLs); http_server.cc:56-57 (kInvalidArgument -> BAD_REQUEST); http_rest_api_handler_test.cc:179-258."""
    cases = [
        ("GET", "/v1/models", "Missing model name in request."),
        ("GET", "/v1/models/", "Malformed request: GET /v1/models/"),
        ("GET", "/v1/models/fixed/", "Malformed request: GET /v1/models/fixed/"),
        ("POST", "/v1/models", "Malformed request: POST /v1/models"),
        ("GET", "/v1/foo", "Malformed request: GET /v1/foo"),
        ("GET", "/v1/models/fixed:predict", "Malformed request: GET /v1/models/fixed:predict"),
        ("POST", "/v1/models/fixed/metadata", "Malformed request: POST /v1/models/fixed/metadata"),
        ("POST", "/v1/models/fixed/versions/HELLO:regress",
         "Malformed request: POST /v1/models/fixed/versions/HELLO:regress"),
        ("POST", "/v1/models/fixed/versions/1/labels/stable:predict",
         "Malformed request: POST /v1/models/fixed/versions/1/labels/stable:predict"),
        ("POST", "/v1/models/fixed:PREDICT", "Malformed request: POST /v1/models/fixed:PREDICT"),  # dispatch is exact
        ("PUT", "/v1/models/fixed", "Malformed request: PUT /v1/models/fixed"),
        ("POST", "/v1/models/fixed/versions/18446744073709551615:predict",
         "Failed to convert version: 18446744073709551615 to numeric."),
    ]
    for method, path, message in cases:
        status, body = raw_http(server, method, path, b"{}" if method in ("POST", "PUT") else None)
        assert (status, json.loads(body)) == (400, {"error": message}), (method, path, body)
    # the path patterns are case-insensitive
    status, body = raw_http(server, "GET", "/V1/MODELS/fixed/VERSIONS/1")
    assert status == 200 and json.loads(body)["model_version_status"][0]["version"] == "1"
    status, _ = raw_http(server, "GET", "/v2x/models")
    assert status == 404


def test_model_status_by_label_lists_every_version(server, client):
    """(c) GetModelStatus ignores model_spec.version_label: asked by any label (known or not) it answers the
    status of every version of the model, newest first; only a version narrows it.

    get_model_status_impl.cc:82-107 (has_version() picks one version, anything else lists
    monitor.GetVersionStates(model_name)); servable_state_monitor.h:68-69 (VersionMap is ordered by
    std::greater: newest first); http_rest_api_handler.cc:180-201 (REST status is the same call)."""
    from tensorflow_serving.apis import get_model_status_pb2
    ch, _, models = grpc_stubs(server)
    with ch:
        for label in ("stable", "canary", "nope"):
            req = get_model_status_pb2.GetModelStatusRequest()
            req.model_spec.name, req.model_spec.version_label = "lab", label
            resp = models.GetModelStatus(req, timeout=10)
            assert [(s.version, s.state) for s in resp.model_version_status] == [(2, 30), (1, 30)], label
            status, obj = http(server, "GET", f"/v1/models/lab/labels/{label}")
            assert status == 200 and [s["version"] for s in obj["model_version_status"]] == ["2", "1"], label
    assert [s.version for s in client.status("lab", label="stable")] == [2, 1]
    assert [s.version for s in client.status("lab", version=1)] == [1]


def test_model_metadata_json_prints_fields_with_their_defaults(server, client):
    """(d) GET .../metadata prints model_spec and the SignatureDefMap with proto3 defaults
    (always_print_fields_with_no_presence) and proto field names: "signature_name": "" in model_spec, each
    dim's "name": "", "unknown_rank": false, "defaults": {}; and every SignatureDef of the MetaGraphDef,
    "__saved_model_init_op" included (DT_INVALID, unknown rank), on gRPC too.

    http_rest_api_util.cc:147-201 (ToJsonString(GetModelMetadataResponse): opts at :149-151 and :158, the two
    parts printed at :161-162 and :185-186 and joined at :193-198); get_model_metadata_impl.cc:55-62 (all the
    signature defs copied; model_spec gets name and version only);
    servables/tensorflow/testdata/saved_model_half_plus_two_tf2_2_versions_metadata.json (the printed form)."""
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2
    sd = server.manager.resolve("fixed").signature_defs
    status, obj = http(server, "GET", "/v1/models/fixed/metadata")
    assert status == 200

    def dims(*sizes):
        return {"dim": [{"size": str(s), "name": ""} for s in sizes], "unknown_rank": False}

    assert obj == {
        "model_spec": {"name": "fixed", "version": "1", "signature_name": ""},
        "metadata": {"signature_def": {"signature_def": {
            "serving_default": {
                "inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": dims(-1, 3),
                                 "name": sd["serving_default"].inputs["x"].name}},
                "outputs": {"y": {"dtype": "DT_FLOAT", "tensor_shape": dims(-1, 2),
                                  "name": sd["serving_default"].outputs["y"].name}},
                "method_name": "tensorflow/serving/predict",
                "defaults": {}},
            "__saved_model_init_op": {
                "inputs": {},
                "outputs": {"__saved_model_init_op": {"dtype": "DT_INVALID",
                                                      "tensor_shape": {"dim": [], "unknown_rank": True},
                                                      "name": "NoOp"}},
                "method_name": "",
                "defaults": {}}}}}}
    ch, pred, _ = grpc_stubs(server)
    with ch:
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = "fixed"
        resp = pred.GetModelMetadata(req, timeout=10)
    sdm = get_model_metadata_pb2.SignatureDefMap()
    resp.metadata["signature_def"].Unpack(sdm)
    assert json_format.MessageToDict(sdm, always_print_fields_with_no_presence=True,
                                     preserving_proto_field_name=True) == obj["metadata"]["signature_def"]
    assert not resp.model_spec.signature_name and resp.model_spec.version.value == 1
    # the client reads it as before
    assert client.metadata("fixed")["serving_default"]["inputs"]["x"]["shape"] == [-1, 3]


def _grpc_calls(pred, models):
    """Each RPC that takes a ModelSpec, with a request made by `fill(request)`; -> [(rpc name, call)]."""
    from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                         predict_pb2, regression_pb2)

    def predict(fill):
        req = predict_pb2.PredictRequest()
        req.inputs["x"].CopyFrom(_tensor(X))
        fill(req)
        return pred.Predict(req, timeout=10)

    def classify(fill):
        req = classification_pb2.ClassificationRequest()
        req.input.example_list.examples.add()
        fill(req)
        return pred.Classify(req, timeout=10)

    def regress(fill):
        req = regression_pb2.RegressionRequest()
        req.input.example_list.examples.add()
        fill(req)
        return pred.Regress(req, timeout=10)

    def metadata(fill):
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        fill(req)
        return pred.GetModelMetadata(req, timeout=10)

    def status(fill):
        req = get_model_status_pb2.GetModelStatusRequest()
        fill(req)
        return models.GetModelStatus(req, timeout=10)
    return [("Predict", predict), ("Classify", classify), ("Regress", regress), ("GetModelMetadata", metadata),
            ("GetModelStatus", status)]


def _tensor(x):
    import tensorflow as tf
    return tf.make_tensor_proto(x)


def _grpc_answer(call):
    import grpc
    try:
        call()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_an_empty_model_name_is_invalid_argument(server):
    """(e) A ModelSpec whose name is empty: INVALID_ARGUMENT "ModelSpec has no name specified." for every RPC
    that resolves a servable (Predict, Classify, Regress, GetModelMetadata, MultiInference), checked before
    the version or label; GetModelStatus looks the name up in the state monitor instead and answers
    NOT_FOUND "Could not find any versions of model " (or "Could not find version <v> of model ").

    server_core.cc:841-845 (ServableRequestFromModelSpec, which GetServableHandle calls first);
    predict_impl.cc:49-50, get_model_metadata_impl.cc:51-52, multi_inference_helper.cc:27-33 and :50-52 (the
    first task's ModelSpec, or the default instance, to GetServableHandle); get_model_status_impl.cc:82-100."""
    import grpc
    from tensorflow_serving.apis import inference_pb2
    ch, pred, models = grpc_stubs(server)
    with ch:
        for rpc, call in _grpc_calls(pred, models):
            for version in (None, 1):
                def fill(req, version=version):
                    req.model_spec.SetInParent()
                    if version is not None:
                        req.model_spec.version.value = version
                got = _grpc_answer(lambda: call(fill))
                if rpc == "GetModelStatus":
                    what = "any versions" if version is None else f"version {version}"
                    assert got == (grpc.StatusCode.NOT_FOUND, f"Could not find {what} of model "), got
                else:
                    assert got == (grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified."), (rpc, got)
            got = _grpc_answer(lambda: call(lambda req: setattr(req.model_spec, "version_label", "stable")))
            if rpc != "GetModelStatus":  # the name is checked before the label is looked up
                assert got == (grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified."), (rpc, got)
        for tasks in ([], [("", "tensorflow/serving/classify")]):
            req = inference_pb2.MultiInferenceRequest()
            req.input.example_list.examples.add()
            for name, method in tasks:
                t = req.tasks.add(method_name=method)
                t.model_spec.name = name
            got = _grpc_answer(lambda: pred.MultiInference(req, timeout=10))
            assert got == (grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified."), (tasks, got)
        # an unknown (non-empty) name is still NOT_FOUND, and the known model still answers
        got = _grpc_answer(lambda: pred.Predict(_predict_request("nope"), timeout=10))
        assert got[0] == grpc.StatusCode.NOT_FOUND
        assert pred.Predict(_predict_request("fixed"), timeout=10).model_spec.name == "fixed"


def _predict_request(name):
    from tensorflow_serving.apis import predict_pb2
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    req.inputs["x"].CopyFrom(_tensor(X))
    return req


def test_a_request_without_a_model_spec_is_missing_modelspec(server):
    """(f) A request with no ModelSpec at all: INVALID_ARGUMENT "Missing ModelSpec" from Predict, Classify,
    Regress, GetModelMetadata (before its metadata_field is looked at: a request with neither says "Missing
    ModelSpec") and GetModelStatus; an unsupported metadata field, with a ModelSpec, is "Metadata field <f> is
    not supported".

    predict_impl.cc:37-41, classification_service.cc:35-39, regression_service.cc:33-37,
    get_model_metadata_impl.cc:76-80 then :89 (ValidateGetModelMetadataRequest, :34-45),
    get_model_status_impl.cc:69-71."""
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2
    ch, pred, models = grpc_stubs(server)
    with ch:
        for rpc, call in _grpc_calls(pred, models):
            got = _grpc_answer(lambda: call(lambda req: None))
            assert got == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"), (rpc, got)
        got = _grpc_answer(lambda: pred.GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(), timeout=10))
        assert got == (grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def", "nope"])
        req.model_spec.name = "fixed"
        got = _grpc_answer(lambda: pred.GetModelMetadata(req, timeout=10))
        assert got == (grpc.StatusCode.INVALID_ARGUMENT, "Metadata field nope is not supported")


def test_json_booleans_in_a_numeric_tensor_are_a_type_error(server):
    """(g) A JSON true / false inside a float (or integer) tensor is refused with TF Serving's TypeError for
    the first one in document order, "JSON Value: true Type: True is not of expected type: float", HTTP 400
    (numpy alone would read it as 1.0); row and columnar formats alike. A body without booleans, or with
    "true" only inside a string, is served as before.

    json_tensor.cc:262-267 (TypeError: JsonValueToDebugString, JsonTypeString, DataTypeString), :95-111
    (JsonTypeString: "True" / "False"), :293-295 (DT_FLOAT takes IsNumber() only), :307 / :317 (the integer
    types IsInt() / IsInt64()), :397-408 (FillTensorProto adds leaf values in order); http_server.cc:56-57."""
    want = "JSON Value: {} Type: {} is not of expected type: float"
    cases = [({"instances": [[True, 1.0, 2.0]]}, ("true", "True")),
             ({"instances": [[1.0, 2.0, 3.0], [4.0, False, True]]}, ("false", "False")),
             ({"inputs": {"x": [[1.0, 2.0, True]]}}, ("true", "True")),
             ({"inputs": [[False, 2.0, 3.0]]}, ("false", "False")),
             ({"instances": [{"x": [1.0, True, 3.0]}]}, ("true", "True"))]
    for body, (value, kind) in cases:
        status, obj = http(server, "POST", "/v1/models/fixed:predict", body)
        assert (status, obj) == (400, {"error": want.format(value, kind)}), body
    status, obj = http(server, "POST", "/v1/models/fixed:predict",
                       {"instances": X.tolist(), "signature_name": "serving_default", "note": "true false"})
    assert status == 200 and np.allclose(obj["predictions"], expected_y(X, 1))


def test_cors_preflight_and_headers(server, repo):
    """(h) OPTIONS on a /v1/ URL is a CORS preflight, answered without looking at the URL: 200 when the
    Origin header names an http(s) origin, else FAILED_PRECONDITION -> 400; the body is empty either way.
    With --rest_api_enable_cors_support every /v1/ answer (preflight, predict, status, errors) carries
    Access-Control-Allow-Origin: *, -Methods: POST, GET and -Headers: Content-Type; without it none does.
    URLs outside /v1/ are not TF Serving's handler's and get neither.

    http_server.cc:170-177 (the preflight: RE2::PartialMatch(origin, "https?://"), else FailedPrecondition
    "Origin header is missing in CORS preflight"), :183-185 (AddCORSHeaders when enable_cors_support),
    :188-193 (headers and the output, empty for a preflight, written for every status), :68-69
    (kFailedPrecondition -> BAD_REQUEST), :141-148 (only the /v1/ pattern reaches the dispatcher);
    http_rest_api_util.cc:40-44 (the three headers); main.cc:104-106 (--rest_api_enable_cors_support,
    default false: server.h:54)."""
    import http.client

    from serving.server import LocalServer

    def call(srv, method, path, headers=None, body=None):
        c = http.client.HTTPConnection("127.0.0.1", srv.rest_port, timeout=20)
        try:
            chunked = "Transfer-Encoding" in (headers or {})  # aiohttp's protocol reads that one
            c.request(method, path, body=iter([body]) if chunked else body, headers=headers or {},
                      encode_chunked=chunked)
            r = c.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            c.close()

    cors = {"access-control-allow-origin": "*", "access-control-allow-methods": "POST, GET",
            "access-control-allow-headers": "Content-Type"}
    for origin, want in (("http://example.com", 200), ("https://a.b:8080", 200), (None, 400), ("null", 400),
                         ("example.com", 400)):
        for path in ("/v1/models/fixed:predict", "/v1/models/fixed", "/v1/anything/at/all"):
            status, headers, body = call(server, "OPTIONS", path, {"Origin": origin} if origin else {})
            assert (status, body) == (want, b""), (origin, path, status, body)
            assert not set(cors) & set(headers), headers
    body = json.dumps({"instances": X.tolist()}).encode()
    status, headers, _ = call(server, "POST", "/v1/models/fixed:predict", {"Content-Type": "application/json"}, body)
    assert status == 200 and not set(cors) & set(headers)
    _, cfg = repo
    with LocalServer(model_config_file=str(cfg), port=0, rest_api_port=0, file_system_poll_wait_seconds=0,
                     rest_api_enable_cors_support=True, log=lambda s: None) as srv:
        srv.wait_until_available("fixed", timeout_s=30)
        for method, path, req_headers, req_body, want in [
                ("OPTIONS", "/v1/models/fixed:predict", {"Origin": "http://example.com"}, None, 200),
                ("OPTIONS", "/v1/models/fixed:predict", {}, None, 400),
                ("POST", "/v1/models/fixed:predict", {"Content-Type": "application/json"}, body, 200),
                ("POST", "/v1/models/nope:predict", {"Content-Type": "application/json"}, body, 404),
                ("POST", "/v1/models/fixed:predict", {"Transfer-Encoding": "chunked"}, body, 200),
                ("GET", "/v1/models/fixed", {}, None, 200),
                ("GET", "/v1/models", {}, None, 400)]:
            status, headers, got = call(srv, method, path, req_headers, req_body)
            assert status == want, (method, path, status, got)
            assert {k: headers.get(k) for k in cors} == cors, (method, path, headers)
        status, headers, _ = call(srv, "GET", "/v2/health/live")
        assert status == 200 and not set(cors) & set(headers)
        status, headers, _ = call(srv, "GET", "/nope")
        assert status == 404 and not set(cors) & set(headers)
