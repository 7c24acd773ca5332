"""serving/v2.py: the Open Inference Protocol (KServe v2) REST API of the local server, next to TF Serving's.

A real LocalServer on 127.0.0.1, spoken to with plain urllib/json written here (not serving.client), so a
bug shared by our client and server cannot hide. Models:
  fixed  y = x @ W + b (x float32 [-1, 3]), the same SavedModel as tests/test_serving_server.py
  multi  a, b float32 [-1, 2] -> sum, prod (output subsets)
  lab    versions 1 and 2 (specific policy); version 3 on disk but never served
  text   s string [-1], n int32 [-1] -> upper (string), total (int32): BYTES and INT32
  late   configured with no version on disk at start: the server is not ready until one arrives
"""
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest

from .test_serving_server import _save_atomic, expected_y, make_linear, make_multi

CONFIG = """
model_config_list {
  config { name: "fixed" base_path: "%(root)s/fixed" model_platform: "tensorflow" }
  config { name: "multi" base_path: "%(root)s/multi" }
  config { name: "lab" base_path: "%(root)s/lab"
           model_version_policy { specific { versions: 1 versions: 2 } } }
  config { name: "text" base_path: "%(root)s/text" }
  config { name: "late" base_path: "%(root)s/late" }
}
"""
X = np.array([[1, 2, 3], [4, 5, 6], [-1.5, 0.25, 7]], np.float32)


def make_text(base, version):
    import tensorflow as tf

    class Text(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="s"),
                                      tf.TensorSpec([None], tf.int32, name="n")])
        def serve(self, s, n):
            return {"upper": tf.strings.upper(s), "total": tf.strings.length(s) + n}

    mod = Text()
    return _save_atomic(base, version, lambda p: tf.saved_model.save(mod, str(p), signatures={"serving_default": mod.serve}))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from serving.server import LocalServer
    root = tmp_path_factory.mktemp("serving_v2") / "models"
    make_linear(root / "fixed", 1, 1.0)
    (root / "fixed" / "4").mkdir()  # a corrupt drop: END with its error, version 1 keeps serving
    (root / "fixed" / "4" / "saved_model.pb").write_bytes(b"not a SavedModel")
    make_multi(root / "multi", 1)
    for v in (1, 2, 3):
        make_linear(root / "lab", v, float(v))
    make_text(root / "text", 1)
    (root / "late").mkdir(parents=True)
    cfg = root.parent / "models.config"
    cfg.write_text(CONFIG % {"root": root})
    srv = LocalServer(model_config_file=str(cfg), port=0, rest_api_port=0, file_system_poll_wait_seconds=0.1,
                      max_request_bytes=64 * 1024, log=lambda s: None)
    srv.root = root
    with srv:
        for name in ("fixed", "multi", "lab", "text"):
            srv.wait_until_available(name, timeout_s=30)
        yield srv


def http(server, method, path, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def infer(server, model, inputs, path_version=None, **extra):
    path = f"/v2/models/{model}" + (f"/versions/{path_version}" if path_version is not None else "") + "/infer"
    return http(server, "POST", path, {"inputs": inputs, **extra})


def fp32(name, arr, nested=False):
    arr = np.asarray(arr, np.float32)
    return {"name": name, "shape": list(arr.shape), "datatype": "FP32",
            "data": arr.tolist() if nested else arr.ravel().tolist()}


def outputs_of(obj) -> dict:
    """A v2 response's outputs -> {name: array in the stated shape}, checking each one's form."""
    out = {}
    for o in obj["outputs"]:
        assert set(o) >= {"name", "shape", "datatype", "data"}, o
        assert all(not isinstance(v, list) for v in o["data"]), "data must come flat (row-major)"
        out[o["name"]] = np.asarray(o["data"]).reshape(o["shape"])
    return out


def still_fine(server):
    """After a bad request: the v2 and the TF Serving REST APIs still answer with the right numbers."""
    status, obj = infer(server, "fixed", [fp32("x", X)])
    assert status == 200, obj
    np.testing.assert_allclose(outputs_of(obj)["y"], expected_y(X, 1), rtol=1e-6)
    status, obj = http(server, "POST", "/v1/models/fixed:predict", {"instances": X.tolist()})
    assert status == 200 and np.allclose(obj["predictions"], expected_y(X, 1))


# ------------------------------------------------------------------------------------------ health

def test_live_and_ready_follow_the_models(server):
    status, obj = http(server, "GET", "/v2/health/live")
    assert (status, obj) == (200, {"live": True})
    # "late" has no version yet: the server is not ready, and says which model holds it back
    status, obj = http(server, "GET", "/v2/health/ready")
    assert status == 400 and obj["ready"] is False and "late" in obj["error"], (status, obj)
    assert http(server, "GET", "/v2/models/late/ready")[0] == 400
    make_linear(server.root / "late", 1, 5.0)
    server.wait_until_available("late", timeout_s=30)
    status, obj = http(server, "GET", "/v2/health/ready")
    assert (status, obj) == (200, {"ready": True})
    status, obj = http(server, "GET", "/v2/models/late/ready")
    assert (status, obj) == (200, {"name": "late", "ready": True})


@pytest.mark.parametrize("path, want_status, ready", [
    ("/v2/models/lab/ready", 200, True),
    ("/v2/models/lab/versions/1/ready", 200, True),
    ("/v2/models/lab/versions/2/ready", 200, True),
    ("/v2/models/fixed/versions/4/ready", 400, False),  # known, failed to load
    ("/v2/models/fixed/versions/1/ready", 200, True),
    ("/v2/models/lab/versions/7/ready", 404, None),  # never seen
    ("/v2/models/lab/versions/x/ready", 404, None),
    ("/v2/models/nope/ready", 404, None),
])
def test_model_ready(server, path, want_status, ready):
    status, obj = http(server, "GET", path)
    assert status == want_status, (status, obj)
    if ready is None:
        assert set(obj) == {"error"} and obj["error"]
    else:
        assert obj == {"name": path.split("/")[3], "ready": ready}


# ---------------------------------------------------------------------------------------- metadata

def test_server_metadata(server):
    status, obj = http(server, "GET", "/v2")
    assert status == 200 and set(obj) == {"name", "version", "extensions"}, obj
    assert isinstance(obj["name"], str) and obj["name"] and obj["extensions"] == []


def test_model_metadata_names_datatypes_and_variable_dims(server):
    status, obj = http(server, "GET", "/v2/models/fixed")
    assert status == 200, obj
    assert obj["name"] == "fixed" and obj["versions"] == ["1"] and obj["platform"] == "tensorflow_savedmodel"
    assert obj["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
    assert obj["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}]
    status, obj = http(server, "GET", "/v2/models/text")
    assert obj["inputs"] == [{"name": "n", "datatype": "INT32", "shape": [-1]},
                             {"name": "s", "datatype": "BYTES", "shape": [-1]}]
    assert obj["outputs"] == [{"name": "total", "datatype": "INT32", "shape": [-1]},
                              {"name": "upper", "datatype": "BYTES", "shape": [-1]}]
    status, obj = http(server, "GET", "/v2/models/lab/versions/1")
    assert status == 200 and obj["versions"] == ["1", "2"], obj


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/lab/versions/3", "/v2/models/fixed/versions/v1"])
def test_metadata_of_an_unknown_model_or_version_is_404(server, path):
    status, obj = http(server, "GET", path)
    assert status == 404 and set(obj) == {"error"} and obj["error"], (status, obj)


# ------------------------------------------------------------------------------------------- infer

def test_infer_matches_tf_serving_rest_and_the_numpy_model(server):
    status, v1 = http(server, "POST", "/v1/models/fixed:predict", {"instances": X.tolist()})
    assert status == 200
    status, obj = infer(server, "fixed", [fp32("x", X)], id="req-42")
    assert status == 200, obj
    assert obj["model_name"] == "fixed" and obj["model_version"] == "1" and obj["id"] == "req-42"
    (out,) = obj["outputs"]
    assert out["name"] == "y" and out["datatype"] == "FP32" and out["shape"] == [3, 2]
    y = outputs_of(obj)["y"]
    np.testing.assert_array_equal(y, np.asarray(v1["predictions"]))
    np.testing.assert_allclose(y, expected_y(X, 1), rtol=1e-6)


def test_nested_data_equals_flat_data_and_no_id_is_echoed_when_none_given(server):
    flat = infer(server, "fixed", [fp32("x", X)])
    nested = infer(server, "fixed", [fp32("x", X, nested=True)])
    assert flat[0] == nested[0] == 200
    assert "id" not in flat[1]
    np.testing.assert_array_equal(outputs_of(flat[1])["y"], outputs_of(nested[1])["y"])
    np.testing.assert_allclose(outputs_of(nested[1])["y"], expected_y(X, 1), rtol=1e-6)


def test_requested_outputs_only(server):
    a, b = np.array([[1, 2], [3, 4]], np.float32), np.array([[10, 20], [30, 40]], np.float32)
    status, obj = infer(server, "multi", [fp32("a", a), fp32("b", b)], outputs=[{"name": "prod"}])
    assert status == 200, obj
    assert [o["name"] for o in obj["outputs"]] == ["prod"]
    np.testing.assert_array_equal(outputs_of(obj)["prod"], a * b)
    status, obj = infer(server, "multi", [fp32("a", a), fp32("b", b)], outputs=[{"name": "sum"}, {"name": "prod"}])
    assert [o["name"] for o in obj["outputs"]] == ["sum", "prod"], "in the order asked for"
    status, obj = infer(server, "multi", [fp32("b", b), fp32("a", a)])
    got = outputs_of(obj)
    assert sorted(got) == ["prod", "sum"]
    np.testing.assert_array_equal(got["sum"], a + b)


def test_versions_in_the_url(server):
    for v, k in ((1, 1.0), (2, 2.0), (None, 2.0)):
        status, obj = infer(server, "lab", [fp32("x", X)], path_version=v)
        assert status == 200, obj
        assert obj["model_version"] == str(v or 2)
        np.testing.assert_allclose(outputs_of(obj)["y"], expected_y(X, k), rtol=1e-6)


def test_bytes_and_int32(server):
    inputs = [{"name": "s", "shape": [2], "datatype": "BYTES", "data": ["héllo", "ab"]},
              {"name": "n", "shape": [2], "datatype": "INT32", "data": [1, 10]}]
    status, obj = infer(server, "text", inputs)
    assert status == 200, obj
    outs = {o["name"]: o for o in obj["outputs"]}
    assert outs["upper"]["datatype"] == "BYTES" and outs["upper"]["data"] == ["HéLLO", "AB"]
    # tf.strings.length counts UTF-8 bytes: "héllo" is 6
    assert outs["total"]["datatype"] == "INT32" and outs["total"]["data"] == [7, 12]


# ------------------------------------------------------------------------------------------ errors

BAD = [
    # (case, model, inputs, status, words the message must hold)
    ("wrong shape", "fixed", [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [0.0] * 8}], 400,
     ["'x'", "[2, 4]", "[-1, 3]"]),
    ("shape vs data", "fixed", [{"name": "x", "shape": [2, 3], "datatype": "FP32", "data": [0.0] * 5}], 400,
     ["'x'", "6", "5"]),
    ("wrong datatype", "fixed", [{"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]}], 400,
     ["'x'", "FP64", "FP32"]),
    ("strings for FP32", "fixed", [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": ["a", "b", "c"]}],
     400, ["'x'", "strings"]),
    ("fraction for INT32", "text", [{"name": "s", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                                    {"name": "n", "shape": [1], "datatype": "INT32", "data": [1.5]}], 400,
     ["'n'", "INT32"]),
    ("INT32 out of range", "text", [{"name": "s", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                                    {"name": "n", "shape": [1], "datatype": "INT32", "data": [2 ** 40]}], 400,
     ["'n'", "out of range"]),
    ("unknown input", "fixed", [{"name": "z", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}], 400,
     ["'z'", "x: float32 [-1, 3]"]),
    ("missing input", "multi", [{"name": "a", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], 400,
     ["Missing", "b"]),
    ("no inputs", "fixed", [], 400, ["inputs"]),
    ("unknown model", "nope", [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}], 404,
     ["nope"]),
]


@pytest.mark.parametrize("case, model, inputs, want_status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_the_v2_error_shape(server, case, model, inputs, want_status, words):
    status, obj = infer(server, model, inputs)
    assert status == want_status, (status, obj)
    assert set(obj) == {"error"}, obj
    for w in words:
        assert w in obj["error"], (w, obj["error"])
    still_fine(server)


def test_unknown_version_unknown_output_and_bad_json(server):
    status, obj = infer(server, "lab", [fp32("x", X)], path_version=3)  # on disk, outside the policy
    assert status == 404 and set(obj) == {"error"} and "3" in obj["error"], obj
    status, obj = infer(server, "multi", [fp32("a", [[1, 2]]), fp32("b", [[3, 4]])], outputs=[{"name": "nope"}])
    assert status == 400 and set(obj) == {"error"} and "nope" in obj["error"] and "sum" in obj["error"], obj
    status, obj = http(server, "POST", "/v2/models/fixed/infer", raw=b'{"inputs": [')
    assert status == 400 and set(obj) == {"error"} and "JSON" in obj["error"], obj
    status, obj = http(server, "POST", "/v2/models/fixed/infer", raw=b'[1, 2]')
    assert status == 400 and set(obj) == {"error"}, obj
    status, obj = http(server, "POST", "/v2/models/fixed/infer", {"inputs": [fp32("x", X)], "id": 7})
    assert status == 400 and "'id'" in obj["error"], obj
    status, obj = http(server, "POST", "/v2/models/fixed/infer", raw=b" " * (65 * 1024))
    assert status == 413 and set(obj) == {"error"}, obj
    status, obj = http(server, "POST", "/v2/models/fixed/bogus", {"inputs": []})
    assert status == 404 and set(obj) == {"error"}, obj
    still_fine(server)


# ---------------------------------------------------------------------------------------- blessing

def test_blessing_over_v2_rest_judges_the_served_values(tmp_path, monkeypatch):
    """bless() with the v2-rest transport: a record per transport, runtime tf-serving-v2-rest; a bundle
    whose reference outputs were shifted is not blessed over v2 either."""
    from serving.bless import ALL_TRANSPORTS, bless
    from serving.client import ServingClient
    from serving.repository import write_repository
    from serving.server import LocalServer
    from .test_serving_repository import SIG_ONE, B, W as W1, X as X1, _bundle, _one_input_saved_model
    calls = []  # the v2 transport must really go over /v2 (not quietly over TF Serving's REST)
    real = ServingClient._rest
    monkeypatch.setattr(ServingClient, "_rest", lambda self, m, path, body=None: (calls.append(path),
                                                                                 real(self, m, path, body))[1])
    saved = _one_input_saved_model(tmp_path / "saved_model")
    honest = _bundle(tmp_path / "honest", x=X1, y=X1 @ W1 + B, signature=SIG_ONE, saved_model=saved)
    shifted = _bundle(tmp_path / "shifted", x=X1, y=X1 @ W1 + B + 0.01, signature=SIG_ONE, saved_model=saved)
    write_repository(honest, tmp_path / "models", version=1)
    with LocalServer("m", str(tmp_path / "models" / "m"), port=0, rest_api_port=0, file_system_poll_wait_seconds=0,
                     log=lambda s: None) as srv:
        srv.wait_until_available("m", timeout_s=30)
        with ServingClient("127.0.0.1", grpc_port=srv.grpc_port, rest_port=srv.rest_port) as client:
            np.testing.assert_allclose(client.predict("m", {"input_1": X1}, transport="v2-rest")["output_0"],
                                       X1 @ W1 + B, rtol=1e-6)
            good = bless(honest, client, version=1, transports=ALL_TRANSPORTS)
            bad = bless(shifted, client, version=1, transports=("v2-rest",))
    assert [r.runtime for r in good] == ["tf-serving-grpc", "tf-serving-rest", "tf-serving-v2-rest"]
    assert all(r.passed for r in good), [r.message for r in good]
    assert [r.passed for r in bad] == [False] and "tf-serving-v2-rest" in bad[0].message, bad[0].message
    assert "/v2/models/m/versions/1/infer" in calls and "/v2/models/m/versions/1" in calls, calls
