"""The REST / gRPC predict path: a version run as TF Serving runs it (serving/models.py Signature: its
MetaGraph in a Session, the SignatureDef's tensors fed and fetched by name) answers exactly what the saved
function answers when TensorFlow 2 loads it; what a servable
holds is never served stale after a new version appears (polling) or a reload changes the model; JSON
output of float32 / float64 / int / string tensors, NaN and infinities included, is exactly the reference
encoding and reads back to the same numbers."""
import base64
import json
import math
import os
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from .test_serving_server import _save_atomic, expected_y, make_linear

X = np.array([[1.0, 2.0, 3.0], [-0.1, 0.2, 1e-8]], dtype=np.float32)


@pytest.fixture(scope="module", autouse=True)
def _quiet_tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def post(server, model, body: dict) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{server.rest_port}/v1/models/{model}:predict",
                                 data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
        return r.read()


def rest_y(server, model) -> np.ndarray:
    return np.array(json.loads(post(server, model, {"inputs": {"x": X.tolist()}}))["outputs"], dtype=np.float32)


def wait_for(pred, what, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------- the session call is exact

def make_three_inputs(base, version):
    """Inputs named out of alphabetical order, three dtypes, a captured variable: a wrong feed order or
    a variable not restored changes the answer."""
    import tensorflow as tf
    mod = tf.Module()
    mod.v = tf.Variable([1.5, -2.0, 3.25])

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="zeta"),
                                  tf.TensorSpec([None, 3], tf.float64, name="alpha"),
                                  tf.TensorSpec([None], tf.int32, name="mid")])
    def serve(zeta, alpha, mid):
        return {"b_out": zeta * mod.v - tf.cast(alpha, tf.float32),
                "a_out": tf.cast(mid, tf.float64)[:, None] * 2.0 + alpha,
                "z": tf.reduce_sum(zeta, axis=1)}
    mod.serve = serve
    return _save_atomic(base, version, lambda p: tf.saved_model.save(mod, str(p), signatures={"serving_default": serve}))


def saved_function_answer(path, arrays: dict) -> dict:
    """What the SavedModel's signature answers when TensorFlow 2 loads it and calls it eagerly."""
    import tensorflow as tf
    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    return {k: v.numpy() for k, v in fn(**{k: tf.constant(v) for k, v in arrays.items()}).items()}


def test_the_session_call_answers_what_the_saved_function_answers(tmp_path):
    """A version is run as TF Serving runs it (its MetaGraph in a Session, the SignatureDef's tensors fed and
    fetched by name): byte for byte the answer of the same signature loaded by tf.saved_model.load, on the
    calling thread (small calls) and on the inter-op pool (over SMALL_CALL_ELEMENTS)."""
    from serving.models import SMALL_CALL_ELEMENTS, Servable
    path = make_three_inputs(tmp_path / "three", 1)
    sig = Servable("three", 1, path, None).signature("serving_default")
    assert sig._feed_order == ["alpha", "mid", "zeta"] and sig.outputs == ["a_out", "b_out", "z"]
    rng = np.random.default_rng(7)
    for rows in (1, 4, 0, 6000):  # 6000 rows: over SMALL_CALL_ELEMENTS, the pool's call
        arrays = {"zeta": rng.normal(size=(rows, 3)).astype(np.float32), "alpha": rng.normal(size=(rows, 3)),
                  "mid": rng.integers(-50, 50, rows).astype(np.int32)}
        assert (sum(a.size for a in arrays.values()) > SMALL_CALL_ELEMENTS) == (rows == 6000)
        got, want = sig.run(arrays), saved_function_answer(path, arrays)
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
            assert got[k].tobytes() == want[k].tobytes(), k


def test_small_calls_run_on_the_calling_thread_and_big_ones_on_the_pool(tmp_path):
    """The two callables are chosen by the inputs' size; the small one really runs the graph on the caller's
    thread (a py_function inside the model sees which thread it is on)."""
    import threading

    import tensorflow as tf

    from serving.models import SMALL_CALL_ELEMENTS, Servable
    seen = []

    def write(p):
        mod = tf.Module()

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(x):
            return {"y": x * 2.0}
        mod.serve = serve
        tf.saved_model.save(mod, str(p), signatures={"serving_default": serve})
    sig = Servable("t", 1, _save_atomic(tmp_path / "t", 1, write), None).signature("serving_default")
    small, large = sig._small, sig._large
    calls = []
    sig._small = lambda *a: calls.append("small") or small(*a)
    sig._large = lambda *a: calls.append("large") or large(*a)
    big = np.ones((SMALL_CALL_ELEMENTS // 3 + 1, 3), np.float32)
    for x in (X, big, X):
        np.testing.assert_array_equal(sig.run({"x": x})["y"], x * 2.0)
    assert calls == ["small", "large", "small"]

    # the caller's thread: a graph with a py_function records the thread it ran on
    from serving.models import _session_callables
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None], name="x")
        y = tf.identity(tf.py_function(lambda t: seen.append(threading.get_ident()) or t, [x], tf.float32), name="y")
    from serving.models import _session_config
    sess = tf.compat.v1.Session(graph=graph, config=_session_config())
    run_small, _ = _session_callables(sess, [x.name], [y.name])
    np.testing.assert_array_equal(run_small(np.ones(2, np.float32))[0], np.ones(2, np.float32))
    assert seen == [threading.get_ident()]


def test_control_flow_is_answered_as_the_saved_function_answers(tmp_path):
    """A while loop and a cond (Switch / Merge in the graph) answer what the saved function answers, small and
    big calls alike."""
    import tensorflow as tf

    from serving.models import SMALL_CALL_ELEMENTS, Servable

    def write(p):
        mod = tf.Module()
        mod.v = tf.Variable(2.0)

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
        def serve(x):
            _, y = tf.while_loop(lambda i, acc: i < 5, lambda i, acc: (i + 1, acc * mod.v + 1.0),
                                 (tf.constant(0), x))
            return {"y": tf.cond(tf.reduce_sum(x) > 0, lambda: y * 2.0, lambda: y - 1.0)}
        mod.serve = serve
        tf.saved_model.save(mod, str(p), signatures={"serving_default": serve})
    path = _save_atomic(tmp_path / "w", 1, write)
    sig = Servable("w", 1, path, None).signature("serving_default")
    for x in (X, -X, np.ones((SMALL_CALL_ELEMENTS, 3), np.float32)):
        assert sig.run({"x": x})["y"].tobytes() == saved_function_answer(path, {"x": x})["y"].tobytes()


def test_a_signature_with_a_sparse_input_is_refused_in_words(tmp_path):
    """TF Serving feeds a SignatureDef's tensors by name; a TF1 sparse input (coo_sparse encoding) has none:
    a request to it is refused naming it, and the version's other signatures keep answering."""
    import tensorflow as tf

    from serving.models import RequestError, Servable

    def write(p):
        v1 = tf.compat.v1
        graph = tf.Graph()
        with graph.as_default(), v1.Session(graph=graph) as sess:
            x = v1.placeholder(tf.float32, [None, 3], name="x")
            sp = v1.sparse_placeholder(tf.float32, [None, 3], name="sp")
            info = v1.saved_model.utils.build_tensor_info
            builder = v1.saved_model.Builder(str(p))
            builder.add_meta_graph_and_variables(sess, ["serve"], signature_def_map={
                "serving_default": v1.saved_model.predict_signature_def({"x": x}, {"y": tf.reduce_sum(x, 1)}),
                "sparse": v1.saved_model.build_signature_def(
                    {"sp": info(sp)}, {"y": info(tf.sparse.reduce_sum(sp, 1))}, v1.saved_model.PREDICT_METHOD_NAME)})
            builder.save()
    servable = Servable("s", 1, _save_atomic(tmp_path / "s", 1, write), None)
    sig = servable.signature("sparse")
    with pytest.raises(RequestError) as e:
        sig.run({"sp": np.zeros((1, 3), np.float32)}, validate=False)
    assert e.value.code == "INVALID_ARGUMENT" and "not dense (sp)" in e.value.message, e.value.message
    np.testing.assert_array_equal(servable.signature("serving_default").run({"x": X})["y"], X.sum(axis=1))


def test_typed_tensor_values_read_as_tensorflow_reads_them():
    """A gRPC TensorProto with its values in float_val / double_val / int_val / int64_val / bool_val is read
    straight from that field: the same array as tf.make_ndarray, shapes and scalars included; fewer values than
    the shape holds still follow TensorProto's fill rule."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    from serving.server import _init_enums, _tensor_to_array
    _init_enums()

    class AnySignature:  # no signature dtype to check against
        inputs: dict = {}
    rng = np.random.default_rng(3)
    cases = [(tf.float32, "float_val", rng.normal(size=(2, 3)).astype(np.float32)),
             (tf.float64, "double_val", rng.normal(size=(4,))),
             (tf.int32, "int_val", rng.integers(-2**31, 2**31 - 1, (3, 1)).astype(np.int32)),
             (tf.int64, "int64_val", rng.integers(-2**62, 2**62, (2, 2))),
             (tf.bool, "bool_val", rng.random((1, 5)) > 0.5),
             (tf.float32, "float_val", np.array(1.5, np.float32))]  # a scalar
    for dtype, field, arr in cases:
        proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum, tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in arr.shape]))
        getattr(proto, field).extend(arr.ravel().tolist())
        got = _tensor_to_array("x", proto, AnySignature())
        want = tf.make_ndarray(proto)
        assert got.dtype == want.dtype == arr.dtype and got.shape == want.shape == arr.shape, field
        assert got.tobytes() == want.tobytes() == arr.tobytes(), field
    short = tensor_pb2.TensorProto(dtype=tf.float32.as_datatype_enum, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2), tensor_shape_pb2.TensorShapeProto.Dim(size=2)]))
    short.float_val.extend([1.0, 2.0])  # the last value repeats
    np.testing.assert_array_equal(_tensor_to_array("x", short, AnySignature()), [[1.0, 2.0], [2.0, 2.0]])


# ------------------------------------------------------------------------------------ nothing stale

def test_a_new_version_found_by_polling_answers_at_once(tmp_path):
    from serving.server import LocalServer
    base = tmp_path / "m"
    make_linear(base, 1, 1.0)
    with LocalServer(model_name="m", model_base_path=str(base), port=0, rest_api_port=0,
                     file_system_poll_wait_seconds=0.05, log=lambda s: None) as srv:
        for _ in range(3):  # the same version answered several times first
            np.testing.assert_array_equal(rest_y(srv, "m"), expected_y(X, 1.0))
        make_linear(base, 2, 3.0)
        wait_for(lambda: np.array_equal(rest_y(srv, "m"), expected_y(X, 3.0)), "version 2's answer")
        np.testing.assert_array_equal(rest_y(srv, "m"), expected_y(X, 3.0))
        body = json.loads(post(srv, "m", {"inputs": {"x": X.tolist()}}))
        assert "outputs" in body


def test_a_reload_that_changes_the_model_answers_from_the_new_one(tmp_path):
    from tests.test_serving_reload import config_text, entry, reload

    from serving.server import LocalServer
    root = tmp_path / "models"
    make_linear(root / "a", 1, 1.0)
    make_linear(root / "a", 2, 5.0)
    make_linear(root / "other", 1, 7.0)
    pin1 = "model_version_policy { specific { versions: 1 } }"
    cfg = tmp_path / "models.config"
    cfg.write_text(config_text(entry(root, "a", pin1)))
    with LocalServer(model_config_file=str(cfg), port=0, rest_api_port=0, file_system_poll_wait_seconds=0,
                     log=lambda s: None) as srv:
        for _ in range(3):
            np.testing.assert_array_equal(rest_y(srv, "a"), expected_y(X, 1.0))
        # the version policy changed in place: version 2 becomes the one served, version 1 goes
        resp = reload(srv, config_text(entry(root, "a", "model_version_policy { specific { versions: 2 } }")))
        assert not hasattr(resp, "code"), resp
        np.testing.assert_array_equal(rest_y(srv, "a"), expected_y(X, 5.0))
        # the model list replaced (the manager swaps its dict): a new model answers, the old one is gone
        resp = reload(srv, config_text(entry(root, "other")))
        assert not hasattr(resp, "code"), resp
        np.testing.assert_array_equal(rest_y(srv, "other"), expected_y(X, 7.0))
        with pytest.raises(urllib.error.HTTPError) as e:
            rest_y(srv, "a")
        assert e.value.code == 404


# ------------------------------------------------------------------------------------- JSON output

def make_outputs(base, version):
    """x float32 [None, 3] -> float32 / float64 with inf, -inf and NaN, int32, int64 and string outputs."""
    import tensorflow as tf
    mod = tf.Module()
    div = tf.constant([0.0, 3.0, 7.0])

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def serve(x):
        n = tf.shape(x)[0]
        return {"f32": x / div,  # column 0: x / 0 -> inf, -inf or NaN
                "f64": tf.cast(x, tf.float64) / tf.cast(div, tf.float64),
                "i32": tf.cast(x * 7.0, tf.int32),
                "i64": tf.cast(x, tf.int64) * (2 ** 40) + 1,
                "txt": tf.strings.as_string(x, precision=3),
                "raw_bytes": tf.fill([n], tf.constant(b"ab\x00c")),
                "odd": tf.fill([n], tf.constant(b"\xff\xfeok"))}
    mod.serve = serve
    return _save_atomic(base, version, lambda p: tf.saved_model.save(mod, str(p), signatures={"serving_default": serve}))


def _reference(arr: np.ndarray, name: str):
    """The JSON value of one output, element by element (no tolist): floats as Python floats of the same
    value, strings as text unless named *_bytes or not UTF-8 ({"b64": ...})."""
    if isinstance(arr, np.ndarray):
        return [_reference(a, name) for a in arr]
    if isinstance(arr, np.floating):
        return float(arr)
    if isinstance(arr, np.integer):
        return int(arr)
    v = arr
    if isinstance(v, bytes):
        try:
            if name.endswith("_bytes"):
                raise UnicodeDecodeError("utf-8", v, 0, 1, "named _bytes")
            return v.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(v).decode("ascii")}
    raise TypeError(f"unexpected element {v!r}")


def test_json_output_is_exact_for_every_dtype_with_nan_and_inf(tmp_path):
    from serving.models import Servable
    from serving.server import LocalServer
    base = tmp_path / "out"
    path = make_outputs(base, 1)
    x = np.array([[1.0, 0.1, 1.0 / 3.0], [-2.5, 1e-30, 3.4e38], [0.0, -0.0, 16777217.0]], dtype=np.float32)
    # the served version's own numbers (its Session may round x / constant differently from an eager call of
    # the saved function: grappler folds the constant into a multiplication, as in TF Serving)
    want = Servable("out", 1, path, None).signature("serving_default").run({"x": x})
    assert np.isinf(want["f32"][:, 0]).sum() == 2 and np.isnan(want["f32"][2, 0])
    with LocalServer(model_name="out", model_base_path=str(base), port=0, rest_api_port=0,
                     file_system_poll_wait_seconds=0, log=lambda s: None) as srv:
        columnar = post(srv, "out", {"inputs": {"x": x.tolist()}})
        row = post(srv, "out", {"instances": x.tolist()})
    ref = {k: _reference(v, k) for k, v in want.items()}
    # byte for byte: the encoder writes what json.dumps writes for the reference values (NaN, Infinity)
    assert columnar == json.dumps({"outputs": ref}).encode()
    assert row == json.dumps({"predictions": [{k: v[i] for k, v in ref.items()} for i in range(len(x))]}).encode()
    assert b"NaN" in columnar and b"-Infinity" in columnar and b'"b64"' in columnar
    back = json.loads(columnar)["outputs"]
    for k in ("f32", "f64", "i32", "i64"):  # the numbers read back to the very same values (NaN's sign aside)
        got = np.array(back[k], dtype=want[k].dtype)
        nan = np.isnan(want[k]) if want[k].dtype.kind == "f" else np.zeros(want[k].shape, bool)
        assert np.array_equal(np.isnan(got) if got.dtype.kind == "f" else nan, nan), k
        assert got[~nan].tobytes() == want[k][~nan].tobytes(), k
    assert [base64.b64decode(v["b64"]) for v in back["raw_bytes"]] == [b"ab\x00c"] * 3
    assert [base64.b64decode(v["b64"]) for v in back["odd"]] == [b"\xff\xfeok"] * 3
    assert back["txt"] == [[s.decode() for s in r] for r in want["txt"]]
    assert not any(isinstance(v, float) and math.isnan(v) for v in back["i32"][0])


# ----------------------------------------------------------------------- the REST port's own protocol

def _responses(sock, n: int, timeout: float = 20.0) -> list[tuple[int, dict, bytes]]:
    """Read `n` HTTP/1.1 responses (Content-Length bodies) from a raw socket."""
    sock.settimeout(timeout)
    data, out = b"", []
    while len(out) < n:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            lines = data[:end].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            size = int(headers["content-length"])
            if len(data) >= end + 4 + size:
                out.append((int(lines[0].split(" ")[1]), headers, data[end + 4:end + 4 + size]))
                data = data[end + 4 + size:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {len(out)} of {n} responses")
        data += chunk
    return out


def _post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path.encode(), extra, len(body), body))


def test_the_rest_port_answers_pipelined_requests_in_order_across_the_hand_off(rest_server):
    """POSTs to /v1/ are read and answered by the server's own protocol; the first request it does not take
    (a GET here) hands the connection to aiohttp with the bytes not yet answered. Pipelined in one send, or
    trickled a few bytes at a time, every request is answered once, in order, with the same status, body
    and headers (Date aside) whichever of the two answered it."""
    import socket
    srv = rest_server
    body = json.dumps({"instances": X.tolist()}).encode()
    want = json.loads(post(srv, "m", {"instances": X.tolist()}))
    good, bad = _post("/v1/models/m:predict", body), _post("/v1/models/nope:predict", body)
    junk = _post("/v1/models/m:predict", b"{not json")
    get = b"GET /v1/models/m HTTP/1.1\r\nHost: t\r\n\r\n"
    stream = good + bad + junk + good + get + good + bad + junk
    for trickle in (False, True):
        with socket.create_connection(("127.0.0.1", srv.rest_port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if trickle:
                for i in range(0, len(stream), 7):
                    sock.sendall(stream[i:i + 7])
                    time.sleep(0.001)
            else:
                sock.sendall(stream)
            got = _responses(sock, 8)
        assert [s for s, _, _ in got] == [200, 404, 400, 200, 200, 200, 404, 400], trickle
        assert json.loads(got[0][2]) == want and got[3][2] == got[0][2] == got[5][2]
        assert "model_version_status" in json.loads(got[4][2])
        for fast, slow in ((0, 5), (1, 6), (2, 7)):  # before the GET: this protocol; after it: aiohttp's
            assert got[fast][2] == got[slow][2]
            assert {k: v for k, v in got[fast][1].items() if k != "date"} == \
                   {k: v for k, v in got[slow][1].items() if k != "date"}, (got[fast][1], got[slow][1])
        assert got[0][1]["content-type"] == "application/json; charset=utf-8"


def test_the_rest_port_hands_over_what_it_does_not_take(rest_server):
    """Chunked bodies, Expect: 100-continue, HTTP/1.0, a query string and Connection: close are each answered
    correctly (by aiohttp, or here with the connection closed after the answer)."""
    import http.client
    import socket
    srv = rest_server
    body = json.dumps({"inputs": {"x": X.tolist()}}).encode()
    want = json.loads(post(srv, "m", {"inputs": {"x": X.tolist()}}))
    c = http.client.HTTPConnection("127.0.0.1", srv.rest_port, timeout=20)
    try:
        c.request("POST", "/v1/models/m:predict", body=iter([body[:10], body[10:]]), encode_chunked=True,
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read()) == want
        c.request("POST", "/v1/models/m:predict?x=1", body=body, headers={"Expect": "100-continue"})
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read()) == want
    finally:
        c.close()
    with socket.create_connection(("127.0.0.1", srv.rest_port)) as sock:
        sock.sendall(_post("/v1/models/m:predict", body).replace(b"HTTP/1.1", b"HTTP/1.0", 1))
        (status, _, got), = _responses(sock, 1)
        assert status == 200 and json.loads(got) == want
    with socket.create_connection(("127.0.0.1", srv.rest_port)) as sock:
        sock.sendall(_post("/v1/models/m:predict", body, b"Connection: close\r\n")
                     + _post("/v1/models/m:predict", body))
        (status, headers, got), = _responses(sock, 1)
        assert status == 200 and json.loads(got) == want and headers.get("connection") == "close"
        sock.settimeout(20)
        assert sock.recv(100) == b""  # closed after the first answer; the second request is not read


def test_the_rest_port_closes_a_connection_left_idle(rest_server, monkeypatch):
    """As aiohttp's keep-alive timeout does: a connection silent for _FAST_KEEPALIVE_S is closed, one that
    keeps sending is not."""
    import socket

    from serving import server
    monkeypatch.setattr(server, "_FAST_KEEPALIVE_S", 0.5)
    body = json.dumps({"instances": X.tolist()}).encode()
    with socket.create_connection(("127.0.0.1", rest_server.rest_port)) as sock:
        for _ in range(3):  # answered while it keeps talking, with pauses under the timeout
            sock.sendall(_post("/v1/models/m:predict", body))
            assert _responses(sock, 1)[0][0] == 200
            time.sleep(0.2)
        sock.settimeout(30)  # far over the timeout: a recv that times out means it was never closed
        assert sock.recv(100) == b""  # then, silent, it is closed


def test_a_request_head_is_parsed_once_and_judged_against_each_ports_limit():
    """Heads are parsed once per distinct head (clients repeat theirs), the parse shared by every connection
    in the process; each port still applies its own body limit; the remembered heads stay bounded."""
    from serving import server
    server._HEADS.clear()
    head = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: t\r\nContent-Length: 100"
    small, big = (server._FastV1Protocol(None, None, limit, b"", set()) for limit in (50, 1000))
    assert big._fast_head(head) == ("/v1/models/m:predict", 100, False)
    assert small._fast_head(head) is None and head in server._HEADS  # over this port's limit, parse cached
    chunked = b"POST /v1/models/m:predict HTTP/1.1\r\nTransfer-Encoding: chunked"
    assert big._fast_head(chunked) is None and big._fast_head(chunked) is None and server._HEADS[chunked] is None
    for i in range(server._HEADS_MAX + 5):
        assert big._fast_head(head + b"\r\nX-N: %d" % i) == ("/v1/models/m:predict", 100, False)
    assert len(server._HEADS) <= server._HEADS_MAX


@pytest.fixture(scope="module")
def rest_server(tmp_path_factory):
    from serving.server import LocalServer
    base = tmp_path_factory.mktemp("proto") / "m"
    make_linear(base, 1, 2.0)
    with LocalServer(model_name="m", model_base_path=str(base), port=0, rest_api_port=0,
                     file_system_poll_wait_seconds=0, log=lambda s: None) as srv:
        yield srv
