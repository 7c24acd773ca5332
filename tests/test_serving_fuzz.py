"""Generated bad requests against one LocalServer: every one is answered with a client error, none breaks it.

A few hundred requests from numpy's default_rng(0) (deterministic): bad and truncated JSON, wrong dtypes and
nesting depths, huge declared shapes and bodies over max_request_bytes, unknown models / versions / labels,
bad {"b64": ...} values, garbage and truncated protobuf bytes, wrong signature names; over TF Serving's REST
API, its gRPC Predict / Classify / Regress / GetModelMetadata / GetModelStatus and v2 REST infer.

REST and v2 must answer 4xx with a JSON {"error": ...}; gRPC one of INVALID_ARGUMENT, NOT_FOUND,
FAILED_PRECONDITION, RESOURCE_EXHAUSTED; never a 5xx, INTERNAL or UNKNOWN, never a dropped connection; and a
correct request is answered correctly after all of them. The server is tests/test_serving_server.py's
("fixed": x float32 [-1, 3] -> y; "multi": a, b -> sum, prod; "cls": tf.Example classify / regress;
"lab": labels stable / canary; max_request_bytes 64 KiB).
"""
import base64
import http.client
import json

import numpy as np

from .test_serving_server import MAX_BODY, X, client, expected_y, repo, server, still_fine  # noqa: F401 - fixtures

GRPC_OK_CODES = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}
SERVED = {"fixed", "m", "lab", "multi", "cls"}
JUNK = ["abc", None, {}, {"b64": "!!"}, [1.0, 2.0], [], "1.0", {"x": 1}, [[1.0]]]  # never a float


def rand_name(rng):
    letters = "abcdefghijklmnopqrstuvwxyz0123456789_-."
    while True:
        name = "".join(letters[i] for i in rng.integers(0, len(letters), int(rng.integers(1, 12))))
        if name not in SERVED and name not in (".", ".."):
            return name


def pick(rng, seq):
    return seq[int(rng.integers(0, len(seq)))]


def rows(rng, width=3):
    return rng.normal(size=(int(rng.integers(1, 4)), width)).round(3).tolist()


# ------------------------------------------------------------------------------------------ generators

def bad_json_bodies(rng):
    """Bytes that are not a JSON object: random bytes, truncated requests, other JSON values, deep nesting."""
    good = json.dumps({"instances": X.tolist()}).encode()
    out = [bytes(rng.integers(0, 256, int(rng.integers(1, 120)), dtype=np.uint8)) for _ in range(12)]
    out += [good[:int(k)] for k in rng.integers(0, len(good), 12)]
    out += [b"", b"[]", b"1", b"null", b'"x"', b"true", b"{", b'{"instances": [1, 2,]}', b"\xff\xfe{}"]
    out += [b"[" * 20000 + b"]" * 20000, b'{"instances": ' + b"[" * 900 + b"1.0" + b"]" * 900 + b"}"]
    return out


def wrong_instances(rng):
    """A float32 [-1, 3] input given something else: a junk element, a wrong row length, wrong depth."""
    inst = rows(rng)
    mode = int(rng.integers(0, 6))
    if mode == 0:
        inst[int(rng.integers(0, len(inst)))][int(rng.integers(0, 3))] = pick(rng, JUNK)
    elif mode == 1:
        i = int(rng.integers(0, len(inst)))
        inst[i] = inst[i][:int(rng.integers(0, 3))] if rng.random() < 0.5 else inst[i] + [1.0] * int(rng.integers(1, 3))
    elif mode == 2:
        inst = [inst]
    elif mode == 3:
        inst = [v for r in inst for v in r]
    elif mode == 4:
        inst = [[[v] for v in r] for r in inst]
    else:
        inst = pick(rng, ["abc", 3.0, None, {"x": inst}, {"b64": "AAAA"}])
    return inst


def v1_cases(rng):
    """(method, path, body bytes, extra headers) that TF Serving's REST API must refuse with a 4xx."""
    cases = []
    predict = "/v1/models/fixed:predict"
    for raw in bad_json_bodies(rng):
        cases.append(("POST", pick(rng, [predict, "/v1/models/cls:classify", "/v1/models/cls/versions/1:regress"]),
                      raw))
    for _ in range(40):  # wrong dtypes and nesting, row and columnar forms
        bad = wrong_instances(rng)
        form = int(rng.integers(0, 3))
        body = {"instances": bad} if form == 0 else {"inputs": bad} if form == 1 else {"inputs": {"x": bad}}
        cases.append(("POST", predict, body))
    multi = "/v1/models/multi:predict"
    cases += [("POST", multi, b) for b in (
        {"instances": [{"a": [1, 2], "b": [3, 4]}, {"a": [1, 2]}]},
        {"instances": [{"a": [1, 2], "c": [3, 4]}]},
        {"instances": [[1, 2], [3, 4]]},
        {"inputs": {"a": [[1, 2]], "b": [[1, 2, 3]]}},
        {"inputs": [[1, 2]]},
        {"inputs": {"a": [["x", "y"]], "b": [[1, 2]]}},
        {"instances": [{"a": [1, 2], "b": {"b64": "AAAA"}}]},
    )]
    # unknown models, versions and labels, on every verb and GET
    for _ in range(12):
        name = rand_name(rng)
        cases.append(("POST", f"/v1/models/{name}:{pick(rng, ['predict', 'classify', 'regress'])}",
                      {"instances": X.tolist()}))
        cases.append(("GET", f"/v1/models/{name}{pick(rng, ['', '/metadata', '/versions/1'])}", None))
        v = int(rng.integers(2, 10 ** 9))
        cases.append(("POST", f"/v1/models/fixed/versions/{v}:predict", {"instances": X.tolist()}))
        cases.append(("GET", f"/v1/models/fixed/versions/{v}{pick(rng, ['', '/metadata'])}", None))
        label = rand_name(rng)
        cases.append(("POST", f"/v1/models/lab/labels/{label}:predict", {"instances": X.tolist()}))
        cases.append(("GET", f"/v1/models/lab/labels/{label}/metadata", None))
    cases += [("POST", "/v1/models/fixed/versions/99999999999999999999999:predict", {"instances": X.tolist()}),
              ("POST", "/v1/models/%ff%fe:predict", {"instances": X.tolist()}),
              ("POST", "/v1/models/a%2Fb:predict", {"instances": X.tolist()}),
              ("GET", "/v1/models/%00", None)]
    # malformed URLs
    cases += [(m, p, {}) for m, p in (("GET", "/v1/models"), ("GET", "/v1/models/"), ("POST", "/v1/models/fixed"),
                                      ("POST", "/v1/models/fixed:explode"), ("DELETE", "/v1/models/fixed"),
                                      ("GET", "/v1/models/fixed/versions/-1"), ("POST", "/v1/x:predict"))]
    # wrong signature names, of every kind
    for sig in [rand_name(rng) for _ in range(6)] + [100, [1], {"a": 1}, True, None, 1.5]:
        cases.append(("POST", predict, {"instances": X.tolist(), "signature_name": sig}))
        cases.append(("POST", "/v1/models/cls:classify", {"examples": [{"x": [1.0, 2.0, 3.0]}], "signature_name": sig}))
    cases += [("POST", "/v1/models/fixed:classify", {"examples": [{"x": [1.0, 2.0, 3.0]}]}),
              ("POST", "/v1/models/fixed:regress", {"examples": [{"x": [1.0, 2.0, 3.0]}]}),
              ("POST", "/v1/models/cls:regress", {"examples": [{"x": [1.0, 2.0, 3.0]}]})]
    # classify / regress bodies
    for _ in range(30):
        ex = {"x": rng.normal(size=3).round(3).tolist()}
        mode = int(rng.integers(0, 9))
        if mode == 0:
            examples = pick(rng, [None, "x", 3, {"x": [1.0]}])
        elif mode == 1:
            examples = [ex, pick(rng, ["x", 3, None, [1.0, 2.0]])]
        elif mode == 2:
            examples = [{"x": [[1.0, 2.0, 3.0]]}]
        elif mode == 3:
            examples = [{"x": [pick(rng, JUNK), 1.0, 2.0]}]
        elif mode == 4:
            examples = [{"x": [10 ** 30, 1, 2]}]
        elif mode == 5:
            examples = [{"y": [1.0, 2.0, 3.0]}]
        elif mode == 6:
            examples = [{"x": rng.normal(size=int(rng.choice([1, 2, 4, 5]))).round(3).tolist()}]
        elif mode == 7:
            examples = [{"x": ["a", "b", "c"]}]
        else:
            examples = []
        body = {"examples": examples}
        if rng.random() < 0.2:
            body["context"] = pick(rng, [[1], "c", 3, {"x": [[1]]}])
        verb = pick(rng, ["classify", "regress"])
        if verb == "regress":  # cls's regression signature
            body["signature_name"] = "regress"
        cases.append(("POST", f"/v1/models/cls:{verb}", body))
    # bad base64, on a string input (cls's serving_default takes serialized tf.Examples) and a float one
    for _ in range(12):
        garbage = base64.b64encode(bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8))).decode()
        value = pick(rng, [{"b64": "!!not base64"}, {"b64": garbage}, {"b64": 5}, {"b64": None}, {"b64": garbage[:-1]},
                           {"b64": garbage, "x": 1}, [{"b64": garbage}], 3.5])
        cases.append(("POST", "/v1/models/cls:predict", pick(rng, [{"instances": [value]}, {"inputs": [value]},
                                                                   {"inputs": {"inputs": [value]}}])))
        cases.append(("POST", predict, {"instances": [{"b64": garbage}]}))
    # bodies over max_request_bytes: declared, and chunked with no length
    big = json.dumps({"instances": [[1.0, 2.0, 3.0]] * (MAX_BODY // 10)}).encode()
    cases += [("POST", predict, big), ("POST", predict, ("chunked", big)),
              ("POST", "/v1/models/cls:classify", ("declared", 10 ** 9))]
    return cases


def v2_cases(rng):
    infer = "/v2/models/fixed/infer"

    def inp(**kw):
        base = {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": X.ravel().tolist()}
        base.update(kw)
        return {k: v for k, v in base.items() if v is not ...}

    cases = [("POST", infer, raw) for raw in bad_json_bodies(rng)]
    variants = [
        {"inputs": None}, {"inputs": []}, {"inputs": {"x": 1}}, {"inputs": ["x"]}, {},
        {"inputs": [inp(name=...)]}, {"inputs": [inp(name=5)]}, {"inputs": [inp(name="z")]},
        {"inputs": [inp(shape=...)]}, {"inputs": [inp(shape="2,3")]}, {"inputs": [inp(shape=[2, -3])]},
        {"inputs": [inp(shape=[2.0, 3])]}, {"inputs": [inp(shape=[True, 3])]},
        {"inputs": [inp(shape=[2 ** 40, 2 ** 40])]}, {"inputs": [inp(shape=[10 ** 30])]},
        {"inputs": [inp(shape=[0, 2], data=[])]}, {"inputs": [inp(shape=[1, 1, 2, 3])]},
        {"inputs": [inp(datatype=...)]}, {"inputs": [inp(datatype="FP64")]}, {"inputs": [inp(datatype=["FP32"])]},
        {"inputs": [inp(datatype="BYTES", data=["a"] * 6)]}, {"inputs": [inp(data=...)]},
        {"inputs": [inp(data=["a"] * 6)]}, {"inputs": [inp(data=[None] * 6)]}, {"inputs": [inp(data=[[1, 2], [3]])]},
        {"inputs": [inp(data=X.ravel().tolist()[:5])]}, {"inputs": [inp(data={"b64": "AAAA"})]},
        {"inputs": [inp(parameters=[1])]}, {"inputs": [inp(parameters={"binary_data_size": 24})]},
        {"inputs": [inp(), inp()]}, {"inputs": [inp()], "outputs": "y"}, {"inputs": [inp()], "outputs": [{"name": 1}]},
        {"inputs": [inp()], "outputs": [{"name": "nope"}]}, {"inputs": [inp()], "id": 7},
        {"inputs": [inp()], "parameters": [1]},
    ]
    cases += [("POST", infer, b) for b in variants]
    for _ in range(30):  # a random junk element or a wrong count in otherwise good data
        data = X.ravel().tolist()
        if rng.random() < 0.5:
            data[int(rng.integers(0, 6))] = pick(rng, JUNK)
        else:
            data = data[:int(rng.integers(0, 6))] if rng.random() < 0.5 else data + [1.0] * int(rng.integers(1, 4))
        cases.append(("POST", infer, {"inputs": [inp(data=data)]}))
    for _ in range(8):
        cases.append(("POST", f"/v2/models/{rand_name(rng)}/infer", {"inputs": [inp()]}))
        cases.append(("POST", f"/v2/models/fixed/versions/{int(rng.integers(2, 10 ** 9))}/infer", {"inputs": [inp()]}))
        cases.append(("POST", f"/v2/models/fixed/versions/{rand_name(rng)}x/infer", {"inputs": [inp()]}))
    cases += [("POST", "/v2/models/cls/infer", {"inputs": [{"name": "inputs", "shape": [1], "datatype": "BYTES",
                                                            "data": ["not a tf.Example"]}]}),
              ("POST", "/v2/models/fixed/versions/99999999999999999999999/infer", {"inputs": [inp()]}),
              ("GET", infer, None), ("POST", "/v2/models/fixed", {"inputs": [inp()]})]
    big = json.dumps({"inputs": [inp(shape=[MAX_BODY // 4, 3], data=[1.0] * (MAX_BODY // 4 * 3))]}).encode()
    cases += [("POST", infer, big), ("POST", infer, ("chunked", big))]
    return cases


def grpc_cases(rng):
    """(method, request bytes, codes allowed besides GRPC_OK_CODES) for gRPC."""
    import tensorflow as tf
    from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                         predict_pb2, regression_pb2)
    P, M = "/tensorflow.serving.PredictionService/", "/tensorflow.serving.ModelService/"

    def predict(name="fixed", version=None, label=None, sig="", inputs=None, output_filter=()):
        req = predict_pb2.PredictRequest(output_filter=list(output_filter))
        req.model_spec.name = name
        if version is not None:
            req.model_spec.version.value = version
        if label is not None:
            req.model_spec.version_label = label
        req.model_spec.signature_name = sig
        for k, v in ({"x": tf.make_tensor_proto(X)} if inputs is None else inputs).items():
            req.inputs[k].CopyFrom(v)
        return req

    def examples(name="cls", sig="", feats=None, cls=classification_pb2.ClassificationRequest):
        req = cls()
        req.model_spec.name, req.model_spec.signature_name = name, sig
        for f in feats if feats is not None else [{"x": [1.0, 2.0, 3.0]}]:
            ex = req.input.example_list.examples.add()
            for k, v in f.items():
                if isinstance(v[0], bytes):
                    ex.features.feature[k].bytes_list.value.extend(v)
                else:
                    ex.features.feature[k].float_list.value.extend(v)
        return req

    def metadata(name="fixed", fields=("signature_def",), label=None):
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=list(fields))
        req.model_spec.name = name
        if label is not None:
            req.model_spec.version_label = label
        return req

    def status(name="fixed", version=None):
        req = get_model_status_pb2.GetModelStatusRequest()
        req.model_spec.name = name
        if version is not None:
            req.model_spec.version.value = version
        return req

    def tensor(dtype=1, dims=(), **values):
        t = tf.make_tensor_proto(np.zeros(0, np.float32))
        t.Clear()
        t.dtype = dtype
        for d in dims:
            t.tensor_shape.dim.add(size=d)
        for k, v in values.items():
            if k == "tensor_content":
                t.tensor_content = v
            else:
                getattr(t, k).extend(v)
        return t

    valid = {"Predict": predict(), "Classify": examples(), "GetModelMetadata": metadata(), "GetModelStatus": status(),
             "Regress": examples(sig="regress", cls=regression_pb2.RegressionRequest)}
    path = {k: (M if k == "GetModelStatus" else P) + k for k in valid}
    cases = []
    for method in valid:  # garbage bytes and truncated requests
        for _ in range(12):
            cases.append((path[method], bytes(rng.integers(0, 256, int(rng.integers(1, 80)), dtype=np.uint8)), ()))
        ser = valid[method].SerializeToString()
        for k in rng.integers(0, len(ser), 8):
            cases.append((path[method], ser[:int(k)], ()))
        for _ in range(8):  # flipped bytes: may still be a good request
            b = bytearray(ser)
            for i in rng.integers(0, len(b), int(rng.integers(1, 4))):
                b[int(i)] = int(rng.integers(0, 256))
            cases.append((path[method], bytes(b), ("OK",)))
    f32 = tf.make_tensor_proto(X)
    bad_predicts = [
        predict(name=rand_name(rng)), predict(version=int(rng.integers(2, 10 ** 9))), predict(label=rand_name(rng)),
        predict(name=""), predict(sig=rand_name(rng)), predict(inputs={"z": f32}), predict(inputs={}),
        predict(inputs={"x": f32, "z": f32}), predict(inputs={"x": tf.make_tensor_proto(X.astype(np.int64))}),
        predict(inputs={"x": tf.make_tensor_proto(np.array([[b"a", b"b", b"c"]]))}),
        predict(inputs={"x": tf.make_tensor_proto(np.ones((2, 4), np.float32))}),
        predict(inputs={"x": tensor(dtype=999, dims=(1, 3), float_val=[1, 2, 3])}),
        predict(inputs={"x": tensor(dtype=0, dims=(1, 3), float_val=[1, 2, 3])}),
        predict(inputs={"x": tensor(dims=(2, 3), tensor_content=b"\0" * 7)}),
        predict(inputs={"x": tensor(dims=(-5, 3), float_val=[1.0])}),
        predict(inputs={"x": tensor(dims=(2 ** 40, 3), float_val=[1.0])}),
        predict(inputs={"x": tensor(dims=(2 ** 62, 2 ** 62), float_val=[1.0])}),
        predict(inputs={"x": tensor(dims=(2 ** 40, 3), tensor_content=b"\0" * 12)}),
        predict(inputs={"x": tensor(dims=(1, 3), float_val=[1.0] * 7)}),
        predict(inputs={"x": tensor(dtype=7, dims=(1, 3), string_val=[b"a"])}),
        predict(output_filter=["nope"]),
        predict(name="cls", inputs={"inputs": tf.make_tensor_proto(np.array([b"not an example"]))}),
        predict(name="multi", inputs={"a": tf.make_tensor_proto(np.ones((1, 2), np.float32))}),
    ]
    cases += [(path["Predict"], r.SerializeToString(), ()) for r in bad_predicts]
    bad_examples = [
        ("Classify", examples(name="fixed")), ("Classify", examples(feats=[])), ("Classify", examples(sig="nope")),
        ("Classify", examples(name=rand_name(rng))), ("Classify", examples(feats=[{"y": [1.0, 2.0, 3.0]}])),
        ("Classify", examples(feats=[{"x": [1.0]}])), ("Classify", examples(feats=[{"x": [b"a", b"b", b"c"]}])),
        ("Classify", examples(sig="regress")),
        ("Regress", examples(cls=regression_pb2.RegressionRequest)),
        ("Regress", examples(sig="regress", feats=[{"x": [1.0, 2.0]}], cls=regression_pb2.RegressionRequest)),
        ("Regress", examples(name="fixed", cls=regression_pb2.RegressionRequest)),
    ]
    cases += [(path[m], r.SerializeToString(), ()) for m, r in bad_examples]
    cases += [(path["GetModelMetadata"], r.SerializeToString(), ()) for r in (
        metadata(fields=()), metadata(fields=("nope",)), metadata(name=rand_name(rng)), metadata(label="nope"),
        metadata(fields=("signature_def", "x")))]
    cases += [(path["GetModelStatus"], r.SerializeToString(), ()) for r in (
        status(name=rand_name(rng)), status(version=int(rng.integers(2, 10 ** 9))), status(name=""),
        status(version=-1))]
    # the Open Inference Protocol's gRPC service on the same port: garbage and truncated bytes too
    v2 = "/inference.GRPCInferenceService/"
    for method in ("ModelInfer", "ModelMetadata", "ModelReady"):
        cases += [(v2 + method, bytes(rng.integers(0, 256, int(n), dtype=np.uint8)), ())
                  for n in rng.integers(1, 64, 8)]
    return cases


# ---------------------------------------------------------------------------------------------- sending

def send_rest(server, method, path, body):
    """-> (status, body bytes), or raises what the connection did (a dropped connection fails the test)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if isinstance(body, tuple) and body[0] == "chunked":
            chunks = [body[1][i:i + 8192] for i in range(0, len(body[1]), 8192)]
            conn.request(method, path, body=iter(chunks), headers=headers, encode_chunked=True)
        elif isinstance(body, tuple) and body[0] == "declared":  # a Content-Length far over the limit
            conn.putrequest(method, path)
            conn.putheader("Content-Length", str(body[1]))
            conn.endheaders(b"{}")
        else:
            data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_fuzzed_requests_never_break_the_server(server, client):
    import grpc
    rng = np.random.default_rng(0)
    failures, counts = [], {}

    for api, cases in (("v1", v1_cases(rng)), ("v2", v2_cases(rng))):
        counts[api] = len(cases)
        for method, path, body in cases:
            what = (api, method, path, body if not isinstance(body, bytes) else body[:60])
            try:
                status, raw = send_rest(server, method, path, body)
            except (OSError, http.client.HTTPException) as e:
                failures.append((*what, f"connection: {type(e).__name__}: {e}"))
                continue
            try:
                ok_body = isinstance(json.loads(raw)["error"], str)
            except (ValueError, KeyError, TypeError):
                ok_body = False
            if not (400 <= status < 500 and ok_body):
                failures.append((*what, status, raw[:200]))

    cases = grpc_cases(rng)
    counts["grpc"] = len(cases)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        for method, payload, also in cases:
            call = ch.unary_unary(method)  # no serializers: the bytes go as they are
            try:
                call(payload, timeout=30)
                code = "OK"
            except grpc.RpcError as e:
                code, details = e.code().name, e.details()
            if code not in GRPC_OK_CODES and code not in also:
                failures.append(("grpc", method, payload[:60], code, details if code != "OK" else ""))

    assert sum(counts.values()) >= 300, counts
    assert not failures, f"{len(failures)} of {sum(counts.values())} requests {counts}:\n" + "\n".join(
        map(repr, failures[:25]))
    # and it still answers correctly: gRPC, REST, v2
    still_fine(client, server)
    status, raw = send_rest(server, "POST", "/v2/models/fixed/infer", {"inputs": [
        {"name": "x", "shape": [2, 3], "datatype": "FP32", "data": X.ravel().tolist()}]})
    assert status == 200
    out = json.loads(raw)["outputs"][0]
    np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), expected_y(X, 1), rtol=1e-6)
