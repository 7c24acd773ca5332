"""serving/v2_grpc.py: the Open Inference Protocol (KServe v2) gRPC service on the local server's gRPC port.

A real LocalServer on 127.0.0.1, spoken to by a client whose stubs this test generates itself with
grpc_tools.protoc from its own copy of KServe's proto (tests/protos/grpc_predict_v2.proto), not through
serving/v2_proto.py, so a bug shared by the server's stubs and the client's cannot hide. Its answers are
held against the v2 REST routes (same JSON, same error messages), TF Serving's Predict and numpy.
Models (the SavedModels of tests/test_serving_server.py and tests/test_serving_v2.py, plus two here):
  fixed  y = x @ W + b (x float32 [-1, 3]); version 4 on disk is corrupt (known, never ready)
  multi  a, b float32 [-1, 2] -> sum, prod (output subsets)
  lab    versions 1 and 2 (specific policy); version 3 on disk but never served
  text   s string [-1], n int32 [-1] -> upper (string), total (int32): BYTES and INT32
  kinds  int8, uint8, int64, float64, bool [-1] -> one output each: the other typed contents fields
  half   h float16 [-1, 2] -> h * 2: FP16 has no typed field, so it travels raw both ways
  half_out  x float32 [-1, 2] -> y16 (float16), y32: an FP16 output sends every output raw
  late   configured with no version on disk at start: the server is not ready until one arrives
Metrics are on: each ModelInfer is counted under entrypoint V2_GRPC.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT
from .test_serving_server import _save_atomic, expected_y, make_linear, make_multi
from .test_serving_v2 import http as rest, make_text

PROTO = ROOT / "tests" / "protos" / "grpc_predict_v2.proto"
METRICS_PATH = "/monitoring/prometheus/metrics"
CONFIG = """
model_config_list {
  config { name: "fixed" base_path: "%(root)s/fixed" model_platform: "tensorflow" }
  config { name: "multi" base_path: "%(root)s/multi" }
  config { name: "lab" base_path: "%(root)s/lab"
           model_version_policy { specific { versions: 1 versions: 2 } } }
  config { name: "text" base_path: "%(root)s/text" }
  config { name: "kinds" base_path: "%(root)s/kinds" }
  config { name: "half" base_path: "%(root)s/half" }
  config { name: "half_out" base_path: "%(root)s/half_out" }
  config { name: "late" base_path: "%(root)s/late" }
}
"""
X = np.array([[1, 2, 3], [4, 5, 6], [-1.5, 0.25, 7]], np.float32)
# the typed field of each datatype, as the proto's comments on InferTensorContents say
FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
         "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
         "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
NP = {"BOOL": "?", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "UINT8": "<u1", "UINT16": "<u2",
      "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


def make_kinds(base, version):
    import tensorflow as tf

    class Kinds(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.int8, name="i8"),
                                      tf.TensorSpec([None], tf.uint8, name="u8"),
                                      tf.TensorSpec([None], tf.int64, name="i64"),
                                      tf.TensorSpec([None], tf.float64, name="f64"),
                                      tf.TensorSpec([None], tf.bool, name="b")])
        def serve(self, i8, u8, i64, f64, b):
            return {"i8_out": i8 - 1, "u8_out": u8 + 1, "i64_out": i64 * 3, "f64_out": f64 * 3,
                    "b_out": tf.logical_not(b)}

    mod = Kinds()
    return _save_atomic(base, version, lambda p: tf.saved_model.save(mod, str(p), signatures={"serving_default": mod.serve}))


def make_half(base, version):
    import tensorflow as tf

    class Half(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float16, name="h")])
        def serve(self, h):
            return {"y": h * tf.constant(2, tf.float16)}

    mod = Half()
    return _save_atomic(base, version, lambda p: tf.saved_model.save(mod, str(p), signatures={"serving_default": mod.serve}))


def make_half_out(base, version):
    import tensorflow as tf

    class HalfOut(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="x")])
        def serve(self, x):
            return {"y16": tf.cast(x, tf.float16), "y32": x * 2}

    mod = HalfOut()
    return _save_atomic(base, version, lambda p: tf.saved_model.save(mod, str(p), signatures={"serving_default": mod.serve}))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from serving.server import LocalServer
    root = tmp_path_factory.mktemp("serving_v2_grpc") / "models"
    make_linear(root / "fixed", 1, 1.0)
    (root / "fixed" / "4").mkdir()
    (root / "fixed" / "4" / "saved_model.pb").write_bytes(b"not a SavedModel")
    make_multi(root / "multi", 1)
    for v in (1, 2, 3):
        make_linear(root / "lab", v, float(v))
    make_text(root / "text", 1)
    make_kinds(root / "kinds", 1)
    make_half(root / "half", 1)
    make_half_out(root / "half_out", 1)
    (root / "late").mkdir(parents=True)
    cfg = root.parent / "models.config"
    cfg.write_text(CONFIG % {"root": root})
    mon = root.parent / "monitoring.config"
    mon.write_text(f'prometheus_config {{ enable: true, path: "{METRICS_PATH}" }}\n')
    logs = []
    srv = LocalServer(model_config_file=str(cfg), port=0, rest_api_port=0, file_system_poll_wait_seconds=0.1,
                      monitoring_config_file=str(mon), log=logs.append)
    srv.root, srv.logs = root, logs
    with srv:
        for name in ("fixed", "multi", "lab", "text", "kinds", "half", "half_out"):
            srv.wait_until_available(name, timeout_s=30)
        yield srv


@pytest.fixture(scope="module")
def pb2(tmp_path_factory):
    """The test's own stubs: tests/protos/grpc_predict_v2.proto through grpc_tools.protoc into a temp folder,
    imported under names of their own (the server's copy keeps its modules)."""
    out = tmp_path_factory.mktemp("v2_client_stubs")
    shutil.copy(PROTO, out / PROTO.name)
    # in a child process: protoc inside a process that has loaded TensorFlow crashes (two protobuf libraries)
    r = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{out}", f"--python_out={out}",
                        f"--grpc_python_out={out}", PROTO.name], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    mods = {}
    for mod in ("grpc_predict_v2_pb2", "grpc_predict_v2_pb2_grpc"):
        spec = importlib.util.spec_from_file_location(f"v2_test_client.{mod}", out / f"{mod}.py")
        m = importlib.util.module_from_spec(spec)
        saved = sys.modules.get("grpc_predict_v2_pb2")
        if mods:  # the _pb2_grpc module does `import grpc_predict_v2_pb2`
            sys.modules["grpc_predict_v2_pb2"] = mods["grpc_predict_v2_pb2"]
        try:
            spec.loader.exec_module(m)
        finally:
            if saved is None:
                sys.modules.pop("grpc_predict_v2_pb2", None)
            else:
                sys.modules["grpc_predict_v2_pb2"] = saved
        mods[mod] = m
    pb2 = mods["grpc_predict_v2_pb2"]
    pb2.Stub = mods["grpc_predict_v2_pb2_grpc"].GRPCInferenceServiceStub
    return pb2


@pytest.fixture(scope="module")
def stub(server, pb2):
    import grpc
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        yield pb2.Stub(ch)


def rpc_error(fn):
    import grpc
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code().name, ei.value.details()


def add_input(req, name, datatype, arr, field=None, shape=None):
    """A typed-contents input (`field` overrides the datatype's field, `shape` the array's)."""
    arr = np.asarray(arr)
    t = req.inputs.add(name=name, datatype=datatype, shape=list(arr.shape) if shape is None else shape)
    getattr(t.contents, field or FIELD[datatype]).extend(arr.ravel().tolist())
    return t


def add_raw(req, name, datatype, arr, shape=None):
    """A raw input: little-endian values, or for BYTES each element's uint32 length and then its bytes."""
    arr = np.asarray(arr, dtype=object if datatype == "BYTES" else NP[datatype])
    req.inputs.add(name=name, datatype=datatype, shape=list(arr.shape) if shape is None else shape)
    if datatype == "BYTES":
        data = b"".join(len(v).to_bytes(4, "little") + v for v in arr.ravel())
    else:
        data = arr.tobytes()
    req.raw_input_contents.append(data)


def infer_request(pb2, model, version="", **kw):
    return pb2.ModelInferRequest(model_name=model, model_version=version, **kw)


def outputs_of(resp) -> dict:
    """A ModelInferResponse's outputs -> {name: array in the stated shape}, from whichever form they came in,
    checking that the two forms are not mixed."""
    raw = list(resp.raw_output_contents)
    assert not raw or len(raw) == len(resp.outputs), "raw_output_contents: one entry per output"
    out = {}
    for i, o in enumerate(resp.outputs):
        shape = list(o.shape)
        if raw:
            assert not o.HasField("contents"), f"{o.name}: contents next to raw_output_contents"
            if o.datatype == "BYTES":
                vals, b, j = [], raw[i], 0
                while j < len(b):
                    k = int.from_bytes(b[j:j + 4], "little")
                    vals.append(b[j + 4:j + 4 + k])
                    j += 4 + k
                out[o.name] = np.array(vals, dtype=object).reshape(shape)
            else:
                out[o.name] = np.frombuffer(raw[i], dtype=NP[o.datatype]).reshape(shape)
        else:
            filled = [f.name for f, _ in o.contents.ListFields()]
            assert filled in ([], [FIELD[o.datatype]]), (o.name, o.datatype, filled)
            vals = list(getattr(o.contents, FIELD[o.datatype]))
            out[o.name] = (np.array(vals, dtype=object) if o.datatype == "BYTES"
                           else np.array(vals, dtype=NP[o.datatype])).reshape(shape)
    return out


def fixed_request(pb2, raw=False):
    req = infer_request(pb2, "fixed", id="req-42")
    (add_raw if raw else add_input)(req, "x", "FP32", X)
    return req


def tf_serving_predict(server, model, inputs: dict) -> dict:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    req = predict_pb2.PredictRequest()
    req.model_spec.name = model
    for k, v in inputs.items():
        req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        resp = prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(req, timeout=20)
    return {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}


def still_fine(server, stub, pb2):
    """After a bad request: the v2 gRPC service and TF Serving's Predict still give the right numbers."""
    y = outputs_of(stub.ModelInfer(fixed_request(pb2), timeout=20))["y"]
    np.testing.assert_allclose(y, expected_y(X, 1), rtol=1e-6)
    np.testing.assert_array_equal(tf_serving_predict(server, "fixed", {"x": X})["y"], y)


def test_the_client_proto_is_the_servers(server):
    """Both are KServe's file: the server must serve the protocol this client speaks (and identical
    descriptors are what lets both sets of stubs load into one process)."""
    assert PROTO.read_bytes() == (ROOT / "serving" / "proto" / "grpc_predict_v2.proto").read_bytes()
    assert not any("not served" in line for line in server.logs), server.logs


# ------------------------------------------------------------------------------------------ health

def test_live_and_ready_follow_the_models(server, stub, pb2):
    assert stub.ServerLive(pb2.ServerLiveRequest(), timeout=10).live is True
    # "late" has no version yet: the server is not ready, as the REST route says
    assert stub.ServerReady(pb2.ServerReadyRequest(), timeout=10).ready is False
    assert rest(server, "GET", "/v2/health/ready")[0] == 400
    assert stub.ModelReady(pb2.ModelReadyRequest(name="late"), timeout=10).ready is False
    make_linear(server.root / "late", 1, 5.0)
    server.wait_until_available("late", timeout_s=30)
    assert stub.ServerReady(pb2.ServerReadyRequest(), timeout=10).ready is True
    assert stub.ModelReady(pb2.ModelReadyRequest(name="late"), timeout=10).ready is True


@pytest.mark.parametrize("name, version, want", [
    ("lab", "", True), ("lab", "1", True), ("lab", "2", True),
    ("fixed", "4", False),  # known, failed to load
    ("fixed", "1", True),
    ("lab", "7", "NOT_FOUND"),  # never seen
    ("lab", "x", "NOT_FOUND"),
    ("nope", "", "NOT_FOUND"),
])
def test_model_ready(server, stub, pb2, name, version, want):
    path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "") + "/ready"
    status, obj = rest(server, "GET", path)
    req = pb2.ModelReadyRequest(name=name, version=version)
    if want == "NOT_FOUND":
        code, details = rpc_error(lambda: stub.ModelReady(req, timeout=10))
        assert (code, details) == ("NOT_FOUND", obj["error"]) and status == 404, (code, details, obj)
    else:
        assert stub.ModelReady(req, timeout=10).ready is want
        assert obj["ready"] is want


# ---------------------------------------------------------------------------------------- metadata

def test_server_metadata_is_the_rest_one(server, stub, pb2):
    resp = stub.ServerMetadata(pb2.ServerMetadataRequest(), timeout=10)
    status, obj = rest(server, "GET", "/v2")
    assert status == 200 and resp.name and resp.name == obj["name"], (resp, obj)
    assert resp.version == obj["version"] and list(resp.extensions) == obj["extensions"] == []


def _tensors(ts):
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]


def test_model_metadata_names_datatypes_and_variable_dims(server, stub, pb2):
    m = stub.ModelMetadata(pb2.ModelMetadataRequest(name="fixed"), timeout=10)
    assert (m.name, list(m.versions), m.platform) == ("fixed", ["1"], "tensorflow_savedmodel")
    assert _tensors(m.inputs) == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert _tensors(m.outputs) == [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]
    m = stub.ModelMetadata(pb2.ModelMetadataRequest(name="kinds"), timeout=10)
    assert _tensors(m.inputs) == [{"name": k, "datatype": d, "shape": [-1]} for k, d in
                                  (("b", "BOOL"), ("f64", "FP64"), ("i64", "INT64"), ("i8", "INT8"), ("u8", "UINT8"))]
    for name, version in (("text", ""), ("half", ""), ("lab", "1"), ("multi", "")):
        m = stub.ModelMetadata(pb2.ModelMetadataRequest(name=name, version=version), timeout=10)
        status, obj = rest(server, "GET", f"/v2/models/{name}" + (f"/versions/{version}" if version else ""))
        assert status == 200, obj
        got = {"name": m.name, "versions": list(m.versions), "platform": m.platform,
               "inputs": _tensors(m.inputs), "outputs": _tensors(m.outputs)}
        assert got == obj, (name, got, obj)
    assert _tensors(stub.ModelMetadata(pb2.ModelMetadataRequest(name="text"), timeout=10).inputs) == [
        {"name": "n", "datatype": "INT32", "shape": [-1]}, {"name": "s", "datatype": "BYTES", "shape": [-1]}]


@pytest.mark.parametrize("name, version", [("nope", ""), ("lab", "3"), ("fixed", "v1")])
def test_metadata_of_an_unknown_model_or_version_is_not_found(server, stub, pb2, name, version):
    code, details = rpc_error(lambda: stub.ModelMetadata(pb2.ModelMetadataRequest(name=name, version=version),
                                                         timeout=10))
    status, obj = rest(server, "GET", f"/v2/models/{name}" + (f"/versions/{version}" if version else ""))
    assert (code, details) == ("NOT_FOUND", obj["error"]) and status == 404, (code, details, obj)


# ------------------------------------------------------------------------------------------- infer

@pytest.mark.parametrize("raw", [False, True], ids=["contents", "raw"])
def test_infer_gives_the_numbers_of_rest_v2_and_tf_serving(server, stub, pb2, raw):
    resp = stub.ModelInfer(fixed_request(pb2, raw=raw), timeout=20)
    assert (resp.model_name, resp.model_version, resp.id) == ("fixed", "1", "req-42")
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [("y", "FP32", [3, 2])]
    # outputs come the way the inputs came: raw for raw, typed contents otherwise
    assert len(resp.raw_output_contents) == (1 if raw else 0)
    assert resp.outputs[0].HasField("contents") is (not raw)
    y = outputs_of(resp)["y"]
    status, obj = rest(server, "POST", "/v2/models/fixed/infer",
                       {"inputs": [{"name": "x", "shape": [3, 3], "datatype": "FP32", "data": X.ravel().tolist()}]})
    assert status == 200, obj
    np.testing.assert_array_equal(y, np.asarray(obj["outputs"][0]["data"], np.float32).reshape(3, 2))
    np.testing.assert_array_equal(y, tf_serving_predict(server, "fixed", {"x": X})["y"])
    np.testing.assert_allclose(y, expected_y(X, 1), rtol=1e-6)


def test_versions_and_no_id(server, stub, pb2):
    for v, k in (("1", 1.0), ("2", 2.0), ("", 2.0)):
        req = infer_request(pb2, "lab", v)
        add_input(req, "x", "FP32", X)
        resp = stub.ModelInfer(req, timeout=20)
        assert resp.model_version == (v or "2") and resp.id == ""
        np.testing.assert_allclose(outputs_of(resp)["y"], expected_y(X, k), rtol=1e-6)


def test_requested_outputs_only(server, stub, pb2):
    a, b = np.array([[1, 2], [3, 4]], np.float32), np.array([[10, 20], [30, 40]], np.float32)

    def ask(*names, raw=False):
        req = infer_request(pb2, "multi", outputs=[{"name": n} for n in names])
        (add_raw if raw else add_input)(req, "a", "FP32", a)
        (add_raw if raw else add_input)(req, "b", "FP32", b)
        return stub.ModelInfer(req, timeout=20)

    resp = ask("prod")
    assert [o.name for o in resp.outputs] == ["prod"]
    np.testing.assert_array_equal(outputs_of(resp)["prod"], a * b)
    resp = ask("sum", "prod", raw=True)
    assert [o.name for o in resp.outputs] == ["sum", "prod"], "in the order asked for"
    got = outputs_of(resp)
    np.testing.assert_array_equal(got["sum"], a + b)
    np.testing.assert_array_equal(got["prod"], a * b)
    assert [o.name for o in ask().outputs] == ["prod", "sum"], "all, sorted, when none are asked for"


@pytest.mark.parametrize("raw", [False, True], ids=["contents", "raw"])
def test_bytes_are_bytes_and_int32(server, stub, pb2, raw):
    s = np.array(["héllo".encode(), b"ab", b"\xff\x00z", b""], dtype=object)  # not all UTF-8: gRPC carries bytes
    n = np.array([1, 10, 100, -4], np.int32)
    req = infer_request(pb2, "text")
    (add_raw if raw else add_input)(req, "s", "BYTES", s)
    (add_raw if raw else add_input)(req, "n", "INT32", n)
    resp = stub.ModelInfer(req, timeout=20)
    assert {o.name: o.datatype for o in resp.outputs} == {"total": "INT32", "upper": "BYTES"}
    got = outputs_of(resp)
    assert got["upper"].tolist() == ["HéLLO".encode(), b"AB", b"\xff\x00Z", b""]  # upper() is ASCII-only
    assert got["total"].tolist() == [7, 12, 103, -4]  # tf.strings.length counts bytes: "héllo" is 6


@pytest.mark.parametrize("raw", [False, True], ids=["contents", "raw"])
def test_the_other_typed_fields(server, stub, pb2, raw):
    vals = {"i8": ("INT8", np.array([-128, 0, 127], np.int8)), "u8": ("UINT8", np.array([0, 7, 254], np.uint8)),
            "i64": ("INT64", np.array([2 ** 40, -3, 0], np.int64)), "f64": ("FP64", np.array([1 / 3, 1e-300, -2.5])),
            "b": ("BOOL", np.array([True, False, True]))}
    req = infer_request(pb2, "kinds")
    for k, (dt, arr) in vals.items():
        (add_raw if raw else add_input)(req, k, dt, arr)
    resp = stub.ModelInfer(req, timeout=20)
    assert {o.name: o.datatype for o in resp.outputs} == {"i8_out": "INT8", "u8_out": "UINT8", "i64_out": "INT64",
                                                          "f64_out": "FP64", "b_out": "BOOL"}
    got = outputs_of(resp)
    np.testing.assert_array_equal(got["i8_out"], vals["i8"][1] - np.int8(1))  # wraps at -128, as TF
    np.testing.assert_array_equal(got["u8_out"], vals["u8"][1] + np.uint8(1))
    np.testing.assert_array_equal(got["i64_out"], vals["i64"][1] * 3)
    np.testing.assert_array_equal(got["f64_out"], vals["f64"][1] * 3)  # 1/3 and 1e-300 need FP64 end to end
    np.testing.assert_array_equal(got["b_out"], ~vals["b"][1])


def test_fp16_travels_raw_both_ways(server, stub, pb2):
    h = np.array([[0.5, -1.25], [3.0, 65504 / 4]], np.float16)
    req = infer_request(pb2, "half")
    add_raw(req, "h", "FP16", h)
    resp = stub.ModelInfer(req, timeout=20)
    assert resp.outputs[0].datatype == "FP16" and not resp.outputs[0].HasField("contents")
    np.testing.assert_array_equal(outputs_of(resp)["y"], h * np.float16(2))
    # typed contents cannot carry FP16 (no field for it), not even when asking for its output
    req = infer_request(pb2, "half")
    add_input(req, "h", "FP16", h, field="fp32_contents")
    code, details = rpc_error(lambda: stub.ModelInfer(req, timeout=20))
    assert code == "INVALID_ARGUMENT" and "'h'" in details and "raw_input_contents" in details, details
    # an FP16 output of a typed request: raw too, and then all outputs raw (the protocol forbids mixing)
    x = np.array([[0.1, 2.5], [-3, 1000.3]], np.float32)
    req = infer_request(pb2, "half_out")
    add_input(req, "x", "FP32", x)
    resp = stub.ModelInfer(req, timeout=20)
    assert [(o.name, o.datatype) for o in resp.outputs] == [("y16", "FP16"), ("y32", "FP32")]
    assert len(resp.raw_output_contents) == 2
    got = outputs_of(resp)
    np.testing.assert_array_equal(got["y16"], x.astype(np.float16))
    np.testing.assert_array_equal(got["y32"], x * 2)


# ------------------------------------------------------------------------------------------ errors

def _x(req, **kw):
    add_input(req, "x", "FP32", np.zeros((1, 3), np.float32), **kw)


BAD = [
    # (case, model, version, fill(req), code, words the message must hold, the same request over REST or None)
    ("wrong shape", "fixed", "", lambda r: add_input(r, "x", "FP32", np.zeros((2, 4), np.float32)),
     "INVALID_ARGUMENT", ["'x'", "[2, 4]", "[-1, 3]"],
     [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.0] * 8}]),
    ("shape vs values", "fixed", "", lambda r: add_input(r, "x", "FP32", np.zeros(5, np.float32), shape=[2, 3]),
     "INVALID_ARGUMENT", ["'x'", "6", "5"], [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [0.0] * 5}]),
    ("wrong datatype", "fixed", "", lambda r: add_input(r, "x", "FP64", np.zeros((1, 3))),
     "INVALID_ARGUMENT", ["'x'", "FP64", "FP32"], [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [0] * 3}]),
    ("unknown input", "fixed", "", lambda r: add_input(r, "z", "FP32", np.zeros((1, 3), np.float32)),
     "INVALID_ARGUMENT", ["'z'", "x: float32 [-1, 3]"],
     [{"name": "z", "shape": [1, 3], "datatype": "FP32", "data": [0.0] * 3}]),
    ("missing input", "multi", "", lambda r: add_input(r, "a", "FP32", np.zeros((1, 2), np.float32)),
     "INVALID_ARGUMENT", ["Missing", "b"], [{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [0.0] * 2}]),
    ("INT8 out of range", "kinds", "", lambda r: add_input(r, "i8", "INT8", np.array([300])),
     "INVALID_ARGUMENT", ["'i8'", "out of range"], [{"name": "i8", "shape": [1], "datatype": "INT8", "data": [300]}]),
    ("unknown model", "nope", "", _x, "NOT_FOUND", ["nope"],
     [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.0] * 3}]),
    ("unknown version", "lab", "3", _x, "NOT_FOUND", ["3"],
     [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.0] * 3}]),
    ("version not an integer", "lab", "v1", _x, "NOT_FOUND", ["'v1'"],
     [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.0] * 3}]),
    ("input twice", "fixed", "", lambda r: (_x(r), _x(r)), "INVALID_ARGUMENT", ["'x'", "more than once"],
     [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.0] * 3}] * 2),
    # gRPC only: the two ways of carrying values
    ("no inputs", "fixed", "", lambda r: None, "INVALID_ARGUMENT", ["inputs"], None),
    ("wrong contents field", "fixed", "", lambda r: _x(r, field="fp64_contents"), "INVALID_ARGUMENT",
     ["'x'", "fp32_contents", "fp64_contents"], None),
    ("raw of a wrong length", "fixed", "",
     lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1, 3]), r.raw_input_contents.append(b"\0" * 10)),
     "INVALID_ARGUMENT", ["'x'", "10 bytes"], None),
    ("raw for fewer inputs", "multi", "",
     lambda r: (add_raw(r, "a", "FP32", np.zeros((1, 2))), r.inputs.add(name="b", datatype="FP32", shape=[1, 2])),
     "INVALID_ARGUMENT", ["raw_input_contents", "1", "2 inputs"], None),
    ("raw and contents", "multi", "",
     lambda r: (add_raw(r, "a", "FP32", np.zeros((1, 2))), add_input(r, "b", "FP32", np.zeros((1, 2), np.float32)),
                r.raw_input_contents.append(b"\0" * 8)),
     "INVALID_ARGUMENT", ["'b'", "contents", "raw_input_contents"], None),
    ("raw BYTES cut short", "text", "",
     lambda r: (r.inputs.add(name="s", datatype="BYTES", shape=[1]), r.raw_input_contents.append(b"\x09\0\0\0abc")),
     "INVALID_ARGUMENT", ["'s'", "9 bytes", "3 are left"], None),
]


@pytest.mark.parametrize("case, model, version, fill, code, words, rest_inputs", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_the_status_and_message_of_rest(server, stub, pb2, case, model, version, fill, code,
                                                         words, rest_inputs):
    req = infer_request(pb2, model, version)
    fill(req)
    got_code, details = rpc_error(lambda: stub.ModelInfer(req, timeout=20))
    assert got_code == code, (got_code, details)
    for w in words:
        assert w in details, (w, details)
    if rest_inputs is not None:  # the v2 REST route says the same about the same request
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        status, obj = rest(server, "POST", path, {"inputs": rest_inputs})
        assert (status, obj) == ({"INVALID_ARGUMENT": 400, "NOT_FOUND": 404}[code], {"error": details})
    still_fine(server, stub, pb2)


def test_unknown_output(server, stub, pb2):
    req = infer_request(pb2, "multi", outputs=[{"name": "nope"}])
    add_input(req, "a", "FP32", np.ones((1, 2), np.float32))
    add_input(req, "b", "FP32", np.ones((1, 2), np.float32))
    code, details = rpc_error(lambda: stub.ModelInfer(req, timeout=20))
    assert code == "INVALID_ARGUMENT" and "nope" in details and "sum" in details, details
    status, obj = rest(server, "POST", "/v2/models/multi/infer", {
        "inputs": [{"name": k, "shape": [1, 2], "datatype": "FP32", "data": [1.0, 1.0]} for k in "ab"],
        "outputs": [{"name": "nope"}]})
    assert (status, obj) == (400, {"error": details})
    still_fine(server, stub, pb2)


# ----------------------------------------------------------------------------------------- metrics

def test_each_infer_is_counted_under_v2_grpc(server, stub, pb2):
    from .test_serving_metrics import Scrape, delta, http as scrape_http

    def scrape():
        status, _, text = scrape_http(server.rest_port, "GET", METRICS_PATH)
        assert status == 200, text
        return Scrape(text)

    before = scrape()
    for _ in range(2):
        stub.ModelInfer(fixed_request(pb2), timeout=20)
    bad = infer_request(pb2, "fixed", "7")
    _x(bad)
    assert rpc_error(lambda: stub.ModelInfer(bad, timeout=20))[0] == "NOT_FOUND"
    stub.ModelMetadata(pb2.ModelMetadataRequest(name="fixed"), timeout=10)  # not an infer: not counted
    after = scrape()
    own = "local_serving_request_count"
    assert delta(after, before, own, API="ModelInfer", entrypoint="V2_GRPC", model_name="fixed", version=1,
                 signature="serving_default", status="OK") == 2
    assert delta(after, before, own, API="ModelInfer", entrypoint="V2_GRPC", model_name="fixed", version=7,
                 status="NOT_FOUND") == 1
    assert delta(after, before, own, entrypoint="V2_GRPC") == 3


# ------------------------------------------------------------------------------------ stub generation

def test_stubs_are_keyed_by_the_proto_and_made_safely_by_two_processes_at_once(tmp_path):
    from serving import v2_proto
    proto = tmp_path / "grpc_predict_v2.proto"
    shutil.copy(PROTO, proto)
    cache = tmp_path / "cache"
    # two processes generating into an empty cache at the same moment: both succeed, one folder stays
    code = ("import sys; from pathlib import Path; from serving.v2_proto import generate; "
            "print(generate(Path(sys.argv[1]), Path(sys.argv[2])))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(proto), str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    first = Path(outs[0][0].strip())
    assert Path(outs[1][0].strip()) == first and first.parent == cache
    assert sorted(p.name for p in cache.iterdir()) == [first.name], "no temp folder left behind"
    assert {p.name for p in first.iterdir()} == {"grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py"}
    assert v2_proto.generate(proto, cache) == first  # the second time: what is there
    # a changed proto is a new key, generated afresh
    proto.write_text(proto.read_text() + "\n// changed\n")
    second = v2_proto.generate(proto, cache)
    assert second != first and (second / "grpc_predict_v2_pb2_grpc.py").is_file()


def test_without_grpcio_tools_the_error_names_the_package(tmp_path, monkeypatch):
    import importlib.metadata
    from serving import v2_proto

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)
    with pytest.raises(v2_proto.StubError, match=r"grpcio-tools.*pip install grpcio-tools==1\.85\.1"):
        v2_proto.generate(PROTO, tmp_path / "cache")
    # and a server without it still serves TF Serving's API, saying in its log what it does not serve
    from concurrent import futures

    import grpc
    from serving.v2_grpc import add_to_server
    monkeypatch.setattr(v2_proto, "_loaded", {})  # as in a process that has not loaded the stubs yet
    logs = []
    srv = grpc.server(futures.ThreadPoolExecutor(1))
    assert add_to_server(srv, None, logs.append) is False
    assert len(logs) == 1 and "GRPCInferenceService" in logs[0] and "grpcio-tools" in logs[0], logs
