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
