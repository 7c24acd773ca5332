"""serving/server.py + serving/client.py: the local TF Serving stand-in, over its real gRPC and REST APIs.

One server (module-scoped: TensorFlow is imported once) over a ModelServerConfig file with five models:
  fixed  y = x @ W + b (x float32 [None, 3]), one version: the numbers and every error case
  m      the same model, latest policy: polling, a corrupt drop, the atomic switch under load
  lab    versions 1 and 2 (specific policy) with labels stable -> 1, canary -> 2
  multi  inputs a, b -> outputs sum, prod: the row / columnar JSON forms with several tensors
  cls    a TF1 SavedModel with classify (serving_default) and regress signatures
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT

W = np.arange(6, dtype=np.float32).reshape(3, 2)
MAX_BODY = 64 * 1024


def expected_y(x, k):
    return x @ (W * np.float32(k)) + np.float32(k)


def _save_atomic(base: Path, version: int, write) -> Path:
    """Write a version into a staging folder, then rename it in (what a deployment should do)."""
    staging = base.parent.parent / "staging" / uuid.uuid4().hex
    staging.parent.mkdir(parents=True, exist_ok=True)
    write(staging)
    base.mkdir(parents=True, exist_ok=True)
    os.rename(staging, base / str(version))
    return base / str(version)


def make_linear(base: Path, version: int, k: float) -> Path:
    import tensorflow as tf

    class Linear(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(W * np.float32(k))
            self.b = tf.Variable(np.float32(k))

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.matmul(x, self.w) + self.b}

    mod = Linear()
    return _save_atomic(base, version, lambda p: tf.saved_model.save(mod, str(p), signatures={"serving_default": mod.serve}))


def make_multi(base: Path, version: int) -> Path:
    import tensorflow as tf

    class Multi(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.float32, name="a"),
                                      tf.TensorSpec([None, 2], tf.float32, name="b")])
        def serve(self, a, b):
            return {"sum": a + b, "prod": a * b}

    mod = Multi()
    return _save_atomic(base, version, lambda p: tf.saved_model.save(mod, str(p), signatures={"serving_default": mod.serve}))


def make_classify(base: Path, version: int) -> Path:
    """A TF1-style SavedModel whose signatures take serialized tf.Examples (method classify / regress)."""
    import tensorflow as tf
    tf1 = tf.compat.v1

    def write(path):
        g = tf.Graph()
        with g.as_default():
            ser = tf1.placeholder(tf.string, [None], name="tf_example")
            x = tf1.io.parse_example(ser, {"x": tf1.io.FixedLenFeature([3], tf.float32)})["x"]
            s = tf.reduce_sum(x, 1)
            scores = tf.nn.softmax(tf.stack([s, -s], axis=1))
            classes = tf.tile(tf.constant([["pos", "neg"]]), [tf.shape(x)[0], 1])
            sigs = {"serving_default": tf1.saved_model.classification_signature_def(ser, classes, scores),
                    "regress": tf1.saved_model.regression_signature_def(ser, tf.expand_dims(s, 1))}
            with tf1.Session(graph=g) as sess:
                b = tf1.saved_model.Builder(str(path))
                b.add_meta_graph_and_variables(sess, ["serve"], signature_def_map=sigs)
                b.save()

    return _save_atomic(base, version, write)


CONFIG = """
model_config_list {
  config { name: "fixed" base_path: "%(root)s/fixed" model_platform: "tensorflow" }
  config { name: "m" base_path: "%(root)s/m" model_platform: "tensorflow"
           model_version_policy { latest { num_versions: 1 } } }
  config { name: "lab" base_path: "%(root)s/lab" model_platform: "tensorflow"
           model_version_policy { specific { versions: 1 versions: 2 } }
           version_labels { key: "stable" value: 1 }
           version_labels { key: "canary" value: 2 } }
  config { name: "multi" base_path: "%(root)s/multi" }
  config { name: "cls" base_path: "%(root)s/cls" }
}
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = tmp_path_factory.mktemp("serving") / "models"
    make_linear(root / "fixed", 1, 1.0)
    make_linear(root / "m", 1, 1.0)
    make_linear(root / "lab", 1, 1.0)
    make_linear(root / "lab", 2, 2.0)
    make_linear(root / "lab", 3, 3.0)  # on disk, outside the specific policy: never served
    make_multi(root / "multi", 1)
    make_classify(root / "cls", 1)
    cfg = root.parent / "models.config"
    cfg.write_text(CONFIG % {"root": root})
    return root, cfg


@pytest.fixture(scope="module")
def server(repo):
    from serving.server import LocalServer
    _, cfg = repo
    logs = []
    srv = LocalServer(model_config_file=str(cfg), port=0, rest_api_port=0, file_system_poll_wait_seconds=0.1,
                      max_request_bytes=MAX_BODY, log=logs.append)
    srv.logs = logs
    with srv:
        for name in ("fixed", "m", "lab", "multi", "cls"):
            srv.wait_until_available(name, timeout_s=30)
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from serving.client import ServingClient
    with ServingClient("127.0.0.1", server.grpc_port, server.rest_port, timeout_s=20) as c:
        yield c


def http(server, method, path, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


X = np.array([[1, 2, 3], [4, 5, 6]], np.float32)


def still_fine(client, server):
    """After every bad request: the server still answers correctly on both transports."""
    np.testing.assert_allclose(client.predict("fixed", {"x": X})["y"], expected_y(X, 1), rtol=1e-6)
    status, obj = http(server, "POST", "/v1/models/fixed:predict", {"instances": X.tolist()})
    assert status == 200 and np.allclose(obj["predictions"], expected_y(X, 1))


def rpc_error(fn):
    from serving.client import ServingError
    with pytest.raises(ServingError) as ei:
        fn()
    return ei.value


# ------------------------------------------------------------------------------------------- answers

def test_grpc_predict_returns_the_right_numbers(client):
    out = client.predict("fixed", {"x": X})
    assert set(out) == {"y"} and out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], expected_y(X, 1), rtol=1e-6)
    np.testing.assert_allclose(client.predict("fixed", {"x": X}, version=1)["y"], expected_y(X, 1), rtol=1e-6)


def test_grpc_predict_through_the_raw_stub_fills_the_model_spec(server):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "fixed"
        req.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
        resp = prediction_service_pb2_grpc.PredictionServiceStub(ch).Predict(req, timeout=10)
    assert resp.model_spec.name == "fixed" and resp.model_spec.version.value == 1
    assert resp.model_spec.signature_name == "serving_default"
    np.testing.assert_allclose(tf.make_ndarray(resp.outputs["y"]), expected_y(X, 1), rtol=1e-6)


def test_rest_predict_row_and_columnar(server, client):
    status, obj = http(server, "POST", "/v1/models/fixed:predict", {"instances": X.tolist()})
    assert status == 200 and list(obj) == ["predictions"]
    np.testing.assert_allclose(obj["predictions"], expected_y(X, 1), rtol=1e-6)
    status, obj = http(server, "POST", "/v1/models/fixed/versions/1:predict",
                       {"signature_name": "serving_default", "inputs": {"x": X.tolist()}})
    assert status == 200 and list(obj) == ["outputs"]
    np.testing.assert_allclose(obj["outputs"], expected_y(X, 1), rtol=1e-6)
    status, obj = http(server, "POST", "/v1/models/fixed:predict", {"inputs": X.tolist()})  # bare single input
    assert status == 200 and np.allclose(obj["outputs"], expected_y(X, 1))
    out = client.predict("fixed", {"x": X}, transport="rest")
    assert out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], expected_y(X, 1), rtol=1e-6)


def test_rest_several_inputs_and_outputs(server):
    a, b = [[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]
    status, obj = http(server, "POST", "/v1/models/multi:predict",
                       {"instances": [{"a": a[0], "b": b[0]}, {"a": a[1], "b": b[1]}]})
    assert status == 200
    assert obj["predictions"] == [{"prod": [10.0, 40.0], "sum": [11.0, 22.0]},
                                  {"prod": [90.0, 160.0], "sum": [33.0, 44.0]}]
    status, obj = http(server, "POST", "/v1/models/multi:predict", {"inputs": {"a": a, "b": b}})
    assert status == 200 and obj["outputs"] == {"sum": [[11.0, 22.0], [33.0, 44.0]],
                                                "prod": [[10.0, 40.0], [90.0, 160.0]]}
    status, obj = http(server, "POST", "/v1/models/multi:predict", {"instances": a})
    assert status == 400 and "a: float32 [-1, 2]" in obj["error"]


def test_status_grpc_and_rest(server, client):
    from serving.client import VersionStatus
    assert client.status("fixed") == [VersionStatus(1, "AVAILABLE", "OK", "")]
    assert client.status("fixed", version=1, transport="rest") == [VersionStatus(1, "AVAILABLE", "OK", "")]
    assert http(server, "GET", "/v1/models/fixed") == (200, {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]})
    assert http(server, "GET", "/v1/models/fixed/versions/1")[0] == 200


def test_metadata_grpc_and_rest(server, client):
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc
    want = {"method_name": "tensorflow/serving/predict",
            "inputs": {"x": {"dtype": "float32", "shape": [-1, 3]}}, "outputs": {"y": {"dtype": "float32", "shape": [-1, 2]}}}
    for transport in ("grpc", "rest"):
        sig = client.metadata("fixed", transport=transport)["serving_default"]
        got = {"method_name": sig["method_name"],
               **{side: {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in sig[side].items()}
                  for side in ("inputs", "outputs")}}
        assert got == want, transport
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        req.model_spec.name = "fixed"
        resp = prediction_service_pb2_grpc.PredictionServiceStub(ch).GetModelMetadata(req, timeout=10)
    anyv = resp.metadata["signature_def"]
    assert anyv.type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    sdm = get_model_metadata_pb2.SignatureDefMap()
    anyv.Unpack(sdm)
    assert "serving_default" in sdm.signature_def and resp.model_spec.version.value == 1
    status, obj = http(server, "GET", "/v1/models/fixed/metadata")
    assert status == 200 and obj["model_spec"] == {"name": "fixed", "signature_name": "", "version": "1"}
    assert obj["metadata"]["signature_def"]["signature_def"]["serving_default"]["inputs"]["x"]["dtype"] == "DT_FLOAT"


def test_classify_and_regress(server, client):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc, regression_pb2
    ex = [tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=row))})) for row in ([1, 2, 3], [-1, -1, -1])]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        req = classification_pb2.ClassificationRequest()
        req.model_spec.name = "cls"
        req.input.example_list.examples.extend(ex)
        resp = stub.Classify(req, timeout=10)
        classes = [[(c.label, c.score) for c in r.classes] for r in resp.result.classifications]
        assert [[lab for lab, _ in r] for r in classes] == [["pos", "neg"], ["pos", "neg"]]
        assert classes[0][0][1] > 0.99 and classes[1][0][1] < 0.05
        rreq = regression_pb2.RegressionRequest()
        rreq.model_spec.name, rreq.model_spec.signature_name = "cls", "regress"
        rreq.input.example_list.examples.extend(ex)
        assert [r.value for r in stub.Regress(rreq, timeout=10).result.regressions] == pytest.approx([6.0, -3.0])
        # a predict signature is no classifier: INVALID_ARGUMENT saying so, as TF Serving
        req.model_spec.name = "fixed"
        with pytest.raises(grpc.RpcError) as ei:
            stub.Classify(req, timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tensorflow/serving/classify" in ei.value.details()
    status, obj = http(server, "POST", "/v1/models/cls:classify", {"examples": [{"x": [1.0, 2.0, 3.0]}]})
    assert status == 200 and [lab for lab, _ in obj["results"][0]] == ["pos", "neg"]
    status, obj = http(server, "POST", "/v1/models/cls:regress",
                       {"signature_name": "regress", "examples": [{"x": [1.0, 2.0, 3.0]}]})
    assert status == 200 and obj["results"] == pytest.approx([6.0])
    status, obj = http(server, "POST", "/v1/models/fixed:regress", {"examples": [{"x": [1.0, 2.0, 3.0]}]})
    assert status == 400 and "tensorflow/serving/regress" in obj["error"]
    still_fine(client, server)


# -------------------------------------------------------------------------------------------- errors

# an unknown label is INVALID_ARGUMENT, as TF Serving: tests/test_serving_exactness.py
@pytest.mark.parametrize("model,version,label", [("nope", None, None), ("fixed", 7, None), ("lab", 3, None)])
def test_unknown_model_version_label_is_not_found(server, client, model, version, label):
    import grpc
    e = rpc_error(lambda: client.predict(model, {"x": X}, version=version, label=label))
    assert e.code == "NOT_FOUND" and e.grpc_code == grpc.StatusCode.NOT_FOUND
    e = rpc_error(lambda: client.predict(model, {"x": X}, version=version, label=label, transport="rest"))
    assert e.http_status == 404 and e.message
    path = client._path(model, version, label)
    assert http(server, "GET", path)[0] == 404
    assert http(server, "GET", path + "/metadata")[0] == 404
    assert rpc_error(lambda: client.status(model, version=version, label=label)).code == "NOT_FOUND"
    still_fine(client, server)


# JSON has no dtypes: over REST integers feed a float input, as in TF Serving (strings do not: below)
@pytest.mark.parametrize("inputs,words,transports", [
    ({"z": X}, ["Missing but required: {x}", "Sent extra: {z}", "x: float32 [-1, 3]"], ("grpc", "rest")),
    ({"x": X.astype(np.int64)}, ["int64", "float32 [-1, 3]"], ("grpc",)),
    ({"x": np.ones((2, 4), np.float32)}, ["[2, 4]", "float32 [-1, 3]"], ("grpc", "rest")),
    ({"x": np.ones(3, np.float32)}, ["[3]", "float32 [-1, 3]"], ("grpc", "rest")),
])
def test_wrong_input_is_invalid_argument_naming_what_was_expected(server, client, inputs, words, transports):
    for transport in transports:
        e = rpc_error(lambda: client.predict("fixed", inputs, transport=transport))
        assert e.code == "INVALID_ARGUMENT", (transport, e)
        if transport == "rest":
            assert e.http_status == 400
        for w in words:
            assert w in e.message, (transport, w, e.message)
    still_fine(client, server)


@pytest.mark.parametrize("body,words", [
    ({"instances": [["a", "b", "c"]]}, ["strings", "float32 [-1, 3]"]),
    ({"instances": [[1, 2, 3], [1, 2]]}, ["float32 [-1, 3]"]),
    ({"inputs": {"x": X.tolist()}, "instances": X.tolist()}, ["exactly one of"]),
    ({"something": 1}, ["'instances'", "'inputs'"]),
    ({"instances": X.tolist(), "signature_name": "nope"}, ["nope", "not found"]),
])
def test_rest_bad_bodies_are_400(server, client, body, words):
    status, obj = http(server, "POST", "/v1/models/fixed:predict", body)
    assert status == 400, obj
    for w in words:
        assert w in obj["error"], (w, obj)
    still_fine(client, server)


def test_unknown_signature_and_bad_metadata_field_over_grpc(server, client):
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc
    e = rpc_error(lambda: client.predict("fixed", {"x": X}, signature_name="nope"))
    assert e.code == "FAILED_PRECONDITION" and "nope" in e.message
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["nope"])
        req.model_spec.name = "fixed"
        with pytest.raises(grpc.RpcError) as ei:
            prediction_service_pb2_grpc.PredictionServiceStub(ch).GetModelMetadata(req, timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    still_fine(client, server)


def test_malformed_json_is_400(server, client):
    for raw in (b"{not json", b"[1, 2, 3]", b"\xff\xfe"):
        status, obj = http(server, "POST", "/v1/models/fixed:predict", raw=raw)
        assert status == 400 and "JSON" in obj["error"], (raw, obj)
    still_fine(client, server)


def test_oversized_body_is_413(server, client):
    big = json.dumps({"instances": [[1.0, 2.0, 3.0]] * (MAX_BODY // 10)}).encode()
    assert len(big) > MAX_BODY
    status, obj = http(server, "POST", "/v1/models/fixed:predict", raw=big)
    assert status == 413 and str(MAX_BODY) in obj["error"]
    still_fine(client, server)


def test_unknown_urls_are_404_and_malformed_v1_urls_400(server, client):
    # TF Serving answers every /v1/ URL itself: one that does not parse is a 400 "Malformed request"
    for method, path, code in [("GET", "/v1/models", 400), ("GET", "/v2/x", 404),
                               ("POST", "/v1/models/fixed:explode", 400), ("GET", "/v1/models/fixed/versions/abc", 400)]:
        status, obj = http(server, method, path, {} if method == "POST" else None)
        assert status == code and "error" in obj, (path, obj)
    still_fine(client, server)


# ------------------------------------------------------------------------------------------- labels

def test_labels_from_the_config_file(server, client):
    for label, k in (("stable", 1), ("canary", 2)):
        np.testing.assert_allclose(client.predict("lab", {"x": X}, label=label)["y"], expected_y(X, k), rtol=1e-6)
        status, obj = http(server, "POST", f"/v1/models/lab/labels/{label}:predict", {"instances": X.tolist()})
        assert status == 200 and np.allclose(obj["predictions"], expected_y(X, k))
        status, obj = http(server, "GET", f"/v1/models/lab/labels/{label}")  # as TF Serving: every version
        assert status == 200 and [s["version"] for s in obj["model_version_status"]] == ["2", "1"]
    # specific {1, 2}: version 3 on disk is never served; the default is the newest served (2)
    assert [s.version for s in client.status("lab")] == [2, 1]
    np.testing.assert_allclose(client.predict("lab", {"x": X})["y"], expected_y(X, 2), rtol=1e-6)


def test_bad_config_files_are_clear_errors(tmp_path):
    from serving.models import ConfigError, parse_batching_parameters, parse_model_config_file
    bad = tmp_path / "bad.config"
    bad.write_text("model_config_list { config { name: 'm' base_pat: '/x' } }")
    with pytest.raises(ConfigError, match="bad.config"):
        parse_model_config_file(bad)
    bb = tmp_path / "batch.config"
    bb.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 500 }\nnum_batch_threads { value: 2 }\n"
                  "max_enqueued_batches { value: 100 }\npad_variable_length_inputs: true\n")
    p = parse_batching_parameters(bb)
    assert (p.max_batch_size, p.batch_timeout_micros, p.num_batch_threads) == (8, 500, 2)
    bb.write_text("max_batch_sise { value: 8 }")
    with pytest.raises(ConfigError, match="batch.config"):
        parse_batching_parameters(bb)


# ------------------------------------------------------------------------------------------ versions

def _served_version(client, model="m"):
    avail = [s.version for s in client.status(model) if s.state == "AVAILABLE"]
    return max(avail) if avail else None


def _wait(pred, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _k_of(y):
    """Which k (y = x @ (W k) + k) produced y for X."""
    return float(np.round((y[0, 0] / expected_y(X, 1)[0, 0]), 3))


def test_a_new_version_folder_is_picked_up_by_polling(repo, client):
    root, _ = repo
    old = _served_version(client)
    new = max(int(p.name) for p in (root / "m").iterdir()) + 1
    make_linear(root / "m", new, float(new) * 10)
    _wait(lambda: _served_version(client) == new, f"version {new} to be served")
    np.testing.assert_allclose(client.predict("m", {"x": X})["y"], expected_y(X, new * 10), rtol=1e-6)
    states = {s.version: s.state for s in client.status("m")}
    assert states[new] == "AVAILABLE" and states[old] == "END"  # latest{1}: the old version is unloaded


def test_a_corrupt_version_leaves_the_previous_one_serving(repo, client, server):
    root, _ = repo
    prev = _served_version(client)
    y_prev = client.predict("m", {"x": X})["y"]
    bad = max(int(p.name) for p in (root / "m").iterdir()) + 1

    def corrupt(p):
        p.mkdir(parents=True)
        (p / "saved_model.pb").write_bytes(b"\x08\x01this is not a SavedModel" * 10)
        (p / "variables").mkdir()

    _save_atomic(root / "m", bad, corrupt)
    def failed():
        from serving.client import ServingError
        try:  # NOT_FOUND until the poller has seen the folder
            return [s for s in client.status("m", version=bad) if s.state == "END"]
        except ServingError:
            return []

    st = _wait(failed, f"version {bad} to fail")[0]
    assert st.error_code != "OK" and str(bad) in st.error_message, st
    status, obj = http(server, "GET", f"/v1/models/m/versions/{bad}")
    assert status == 200 and obj["model_version_status"][0]["status"]["error_code"] == st.error_code
    time.sleep(0.3)  # a few more polls: it is not retried, the previous version keeps serving
    assert _served_version(client) == prev
    np.testing.assert_allclose(client.predict("m", {"x": X})["y"], y_prev)
    assert client.status("m", version=bad)[0].state == "END"


def test_eight_clients_during_a_version_switch_see_no_errors_and_no_mixed_answers(repo, server):
    from serving.client import ServingClient
    root, _ = repo
    with ServingClient("127.0.0.1", server.grpc_port) as c:
        old = _served_version(c)
        k_old = _k_of(c.predict("m", {"x": X})["y"])
    new = max(int(p.name) for p in (root / "m").iterdir()) + 1
    k_new = float(new) * 10
    answers = {k_old: expected_y(X, k_old), k_new: expected_y(X, k_new)}
    seen, errors, stop = [], [], threading.Event()

    def hammer(transport):
        with ServingClient("127.0.0.1", server.grpc_port, server.rest_port, timeout_s=20) as c:
            while not stop.is_set():
                try:
                    y = c.predict("m", {"x": X}, transport=transport)["y"]
                except Exception as e:  # noqa: BLE001
                    errors.append(repr(e))
                    continue
                k = next((k for k, want in answers.items() if np.allclose(y, want, rtol=1e-6)), None)
                seen.append(k if k is not None else ("mixed", y.tolist()))

    threads = [threading.Thread(target=hammer, args=("grpc" if i % 2 else "rest",)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        make_linear(root / "m", new, k_new)
        _wait(lambda: seen.count(k_new) >= 50, "answers from the new version", timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:5]
    assert set(seen) <= {k_old, k_new}, [s for s in seen if s not in (k_old, k_new)][:3]
    assert seen.count(k_old) > 0 and seen.count(k_new) >= 50
    assert old != new and _served_version(ServingClient("127.0.0.1", server.grpc_port)) == new


# ------------------------------------------------------------------------------------------ batching

def test_batching_concatenates_concurrent_requests(repo, tmp_path):
    from serving.client import ServingClient
    from serving.server import LocalServer
    root, _ = repo
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 20000 }\n"
                      "num_batch_threads { value: 1 }\n")
    with LocalServer("fixed", str(root / "fixed"), port=0, rest_api_port=0, enable_batching=True,
                     batching_parameters_file=str(params), file_system_poll_wait_seconds=0, log=lambda s: None) as srv:
        sig = srv.manager.resolve("fixed").signature(None)
        sizes = []
        inner = sig.batcher._run
        sig.batcher._run = lambda arrays: (sizes.append(len(arrays["x"])), inner(arrays))[1]
        results, errors = {}, []

        def one(i, transport):
            x = np.full((1 + i % 3, 3), float(i), np.float32)
            try:
                with ServingClient("127.0.0.1", srv.grpc_port, srv.rest_port) as c:
                    for j in range(5):
                        results[(i, j)] = (x, c.predict("fixed", {"x": x}, transport=transport)["y"])
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=one, args=(i, "grpc" if i % 2 else "rest")) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert len(results) == 40
    for x, y in results.values():  # each request gets back its own rows
        np.testing.assert_allclose(y, expected_y(x, 1), rtol=1e-6)
    assert max(sizes) > 3, sizes  # requests were joined (the largest single request has 3 rows)
    assert sum(sizes) == sum(len(x) for x, _ in results.values())


# --------------------------------------------------------------------------------------- lifecycle

def test_wait_until_available_times_out_naming_the_model(server):
    with pytest.raises(TimeoutError, match=r"'nope'.*NOT_FOUND"):
        server.wait_until_available("nope", timeout_s=0.3)


def test_importing_the_client_stays_light():
    code = ("import sys, serving.client; heavy = [m for m in ('tensorflow', 'grpc', 'aiohttp') if m in sys.modules];"
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "serving", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    for flag in ("--port", "--rest_api_port", "--model_name", "--model_base_path", "--model_config_file",
                 "--enable_batching", "--batching_parameters_file", "--file_system_poll_wait_seconds", "--host"):
        assert flag in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_with_tf_serving_flags_and_stops_on_sigterm(repo):
    from serving.client import ServingClient
    root, _ = repo
    rest = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--port=0", f"--rest_api_port={rest}",
                             "--model_name=fixed", f"--model_base_path={root / 'fixed'}",
                             "--file_system_poll_wait_seconds=0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, ports = [], {}

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Running gRPC ModelServer at "):
                ports["grpc"] = int(line.split()[-2].rsplit(":", 1)[1])
            if line.startswith("Exporting HTTP/REST API at:"):
                ports["rest"] = int(line.split()[-2].rsplit(":", 1)[1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        _wait(lambda: len(ports) == 2 or proc.poll() is not None, "the bound addresses", timeout=90)
        assert len(ports) == 2, "".join(lines)
        assert ports["rest"] == rest
        with ServingClient("127.0.0.1", ports["grpc"], ports["rest"]) as c:
            np.testing.assert_allclose(c.predict("fixed", {"x": X})["y"], expected_y(X, 1), rtol=1e-6)
            np.testing.assert_allclose(c.predict("fixed", {"x": X}, transport="rest")["y"], expected_y(X, 1),
                                       rtol=1e-6)
            assert c.status("fixed")[0].state == "AVAILABLE"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=10)
