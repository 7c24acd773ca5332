"""serving/: models added, removed and changed at runtime (gRPC HandleReloadConfigRequest and
--model_config_file_poll_wait_seconds) and MultiInference, against a real LocalServer on 127.0.0.1.

Each reload runs while a thread sends a steady loop of Predict requests: none may fail, except those for a
removed model once it is removed, and those fail as TF Serving's do (NOT_FOUND, "Servable not found for
request: Latest(<model>)").
"""
import os
import threading
import time

import numpy as np
import pytest

from .test_serving_server import X, expected_y, make_classify, make_linear


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = tmp_path_factory.mktemp("reload") / "models"
    make_linear(root / "a", 1, 1.0)
    make_linear(root / "b", 1, 1.0)
    make_linear(root / "b", 2, 2.0)
    make_classify(root / "cls", 1)
    (root / "empty").mkdir()  # a base path with no version folder
    return root


def entry(root, name, extra=""):
    return f'config {{ name: "{name}" base_path: "{root / name}" model_platform: "tensorflow" {extra} }}'


def config_text(*entries):
    return "model_config_list {\n  " + "\n  ".join(entries) + "\n}\n"


@pytest.fixture
def make_server(repo, tmp_path):
    from serving.server import LocalServer
    started = []

    def make(*entries, **kw):
        cfg = tmp_path / "models.config"
        cfg.write_text(config_text(*entries))
        logs = []
        srv = LocalServer(model_config_file=str(cfg), port=0, rest_api_port=0, file_system_poll_wait_seconds=0,
                          log=logs.append, **kw)
        srv.logs, srv.cfg = logs, cfg
        started.append(srv.start())
        return srv

    yield make
    for srv in started:
        srv.stop()


class Hammer:
    """A thread sending Predict to `models` in turn until stopped; every answer is recorded with its time."""

    def __init__(self, server, models):
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.requests = {}
        for m in models:
            req = predict_pb2.PredictRequest()
            req.model_spec.name = m
            req.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
            self.requests[m] = req
        self.log = []  # (model, t_start, t_end, code name or "OK", details, y)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import grpc
        import tensorflow as tf
        while not self._stop.is_set():
            for m, req in self.requests.items():
                t0 = time.monotonic()
                try:
                    y = tf.make_ndarray(self.stub.Predict(req, timeout=20).outputs["y"])
                    self.log.append((m, t0, time.monotonic(), "OK", "", y))
                except grpc.RpcError as e:
                    self.log.append((m, t0, time.monotonic(), e.code().name, e.details(), None))

    def __enter__(self):
        self._thread.start()
        _wait(lambda: len(self.log) >= 2 * len(self.requests), "the first requests")
        return self

    def __exit__(self, *exc):
        n = len(self.log)
        _wait(lambda: len(self.log) >= n + 2 * len(self.requests), "requests after the reload")
        self._stop.set()
        self._thread.join(timeout=30)
        self.channel.close()

    def failures(self, model=None):
        return [r for r in self.log if r[3] != "OK" and (model is None or r[0] == model)]


def _wait(pred, what, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def reload(server, text, metric_names=()):
    """HandleReloadConfigRequest over gRPC; returns the response or the grpc.RpcError."""
    import grpc
    from google.protobuf import text_format
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
    req = model_management_pb2.ReloadConfigRequest(metric_names=list(metric_names))
    if text:
        text_format.Parse(text, req.config)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        try:
            return model_service_pb2_grpc.ModelServiceStub(ch).HandleReloadConfigRequest(req, timeout=60)
        except grpc.RpcError as e:
            return e


def states(server, model):
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc
    req = get_model_status_pb2.GetModelStatusRequest()
    req.model_spec.name = model
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        resp = model_service_pb2_grpc.ModelServiceStub(ch).GetModelStatus(req, timeout=10)
    return {s.version: get_model_status_pb2.ModelVersionStatus.State.Name(s.state) for s in resp.model_version_status}


def servables(server):
    """model -> {version: Servable object}: identity shows a model was kept, not reloaded."""
    return {n: dict(m.snapshot.servables) for n, m in server.manager.models.items()}


def assert_right_numbers(hammer):
    for m, *_, code, _, y in hammer.log:
        if code == "OK":
            np.testing.assert_allclose(y, expected_y(X, 1), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ reload

def test_adding_a_model_under_load(repo, make_server):
    srv = make_server(entry(repo, "a"))
    before = servables(srv)
    with Hammer(srv, ["a"]) as h:
        t0 = time.monotonic()
        resp = reload(srv, config_text(entry(repo, "a"), entry(repo, "b")), metric_names=["m1"])
        t1 = time.monotonic()
    assert not isinstance(resp, Exception), resp
    assert resp.status.error_code == 0 and resp.status.error_message == ""
    assert [(m.name, m.int64_value_increase) for m in resp.metric] == [("m1", 0)]
    assert h.failures() == []
    assert any(t0 <= r[1] <= t1 for r in h.log), "no request ran while the reload loaded the new model"
    assert_right_numbers(h)
    # the new model is AVAILABLE when the reload answers; the unchanged one kept its Servable
    assert states(srv, "b") == {2: "AVAILABLE"}
    assert servables(srv)["a"][1] is before["a"][1]
    from serving.client import ServingClient
    with ServingClient("127.0.0.1", srv.grpc_port, timeout_s=20) as c:
        np.testing.assert_allclose(c.predict("b", {"x": X})["y"], expected_y(X, 2), rtol=1e-6)


def test_removing_a_model_under_load(repo, make_server):
    srv = make_server(entry(repo, "a"), entry(repo, "b", "model_version_policy { specific { versions: 1 } }"))
    kept = servables(srv)["a"][1]
    with Hammer(srv, ["a", "b"]) as h:
        t0 = time.monotonic()
        resp = reload(srv, config_text(entry(repo, "a")))
        t1 = time.monotonic()
    assert not isinstance(resp, Exception), resp
    assert h.failures("a") == []
    b = [r for r in h.log if r[0] == "b"]
    assert any(r[3] == "OK" for r in b) and all(r[3] == "OK" for r in b if r[2] < t0)
    gone = h.failures("b")
    # a request sent just before the reload can reach the server after it (a loaded machine delays it):
    # what must not be is a failure that came back before the removal began
    assert gone and all(r[2] >= t0 for r in gone), "a request for b failed before its removal began"
    assert all(r[3] != "OK" for r in b if r[1] > t1), "b still answered after the reload returned"
    assert {(r[3], r[4]) for r in gone} == {("NOT_FOUND", "Servable not found for request: Latest(b)")}
    assert_right_numbers(h)
    assert servables(srv) == {"a": {1: kept}}
    assert states(srv, "b") == {1: "END"}  # TF Serving's status monitor remembers it
    assert any("Unloaded servable version {name: b version: 1}" in line for line in srv.logs)


def test_changing_a_version_policy_and_labels_in_place(repo, make_server):
    srv = make_server(entry(repo, "a"), entry(repo, "b"))
    assert states(srv, "b") == {2: "AVAILABLE"}
    v2 = servables(srv)["b"][2]
    with Hammer(srv, ["a"]) as h:
        resp = reload(srv, config_text(entry(repo, "a"), entry(
            repo, "b", 'model_version_policy { all {} } version_labels { key: "canary" value: 2 }')))
    assert not isinstance(resp, Exception), resp
    assert h.failures() == []
    assert states(srv, "b") == {2: "AVAILABLE", 1: "AVAILABLE"}
    assert servables(srv)["b"][2] is v2  # updated in place: version 2 was not reloaded
    assert srv.manager.resolve("b", label="canary") is v2
    # a label on a version that is not AVAILABLE: refused as TF Serving, and nothing changes
    resp = reload(srv, config_text(entry(repo, "a"), entry(repo, "b", 'version_labels { key: "x" value: 7 }')))
    assert resp.code().name == "FAILED_PRECONDITION"
    assert resp.details() == ("Request to assign label to version 7 of model b, which is not currently available "
                              "for inference")
    assert states(srv, "b") == {2: "AVAILABLE", 1: "AVAILABLE"}


@pytest.mark.parametrize("text,code,message", [
    ("a a", "INVALID_ARGUMENT", "Illegal to list model a multiple times in config list"),
    ("", "INVALID_ARGUMENT", "ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
     "ModelConfigList is currently supported"),
    ("relative", "INVALID_ARGUMENT", "Expected model r to have an absolute path or URI; got base_path()=models/r"),
    ("missing", "INVALID_ARGUMENT", "Could not find base path {root}/nope for servable nope with error NOT_FOUND: "
     "{root}/nope not found"),
    ("platform", "INVALID_ARGUMENT", "Model a requests unsupported platform onnx"),
    ("empty", "UNKNOWN", "1 model(s) did not become available: {{{name: empty} due to error: No versions of "
     "servable empty found under base path {root}/empty. Did you forget to name your leaf directory as a "
     "number (eg. '/1/')?}, }"),
])
def test_a_bad_config_is_refused_and_the_old_list_keeps_serving(repo, make_server, text, code, message):
    srv = make_server(entry(repo, "a"))
    before = servables(srv)
    texts = {"a a": config_text(entry(repo, "a"), entry(repo, "a")), "": "",
             "relative": config_text('config { name: "r" base_path: "models/r" }'),
             "missing": config_text(entry(repo, "a"), entry(repo, "nope")),
             "platform": config_text(f'config {{ name: "a" base_path: "{repo / "a"}" model_platform: "onnx" }}'),
             "empty": config_text(entry(repo, "a"), entry(repo, "empty"))}
    with Hammer(srv, ["a"]) as h:
        e = reload(srv, texts[text])
    assert isinstance(e, Exception), f"config {text!r} was accepted"
    assert (e.code().name, e.details()) == (code, message.replace("{root}", str(repo)))
    assert h.failures() == []
    assert servables(srv) == before


def test_the_config_file_is_polled(repo, make_server):
    srv = make_server(entry(repo, "a"), model_config_file_poll_wait_seconds=0.2)
    with Hammer(srv, ["a"]) as h:
        srv.cfg.write_text(config_text(entry(repo, "a"), entry(repo, "b")))
        _wait(lambda: "b" in srv.manager.models, "the poller to add b")
        srv.cfg.write_text("model_config_list { config { name: 'a' base_pat")  # malformed: logged, kept
        _wait(lambda: any("Failed to read ModelServerConfig file" in line for line in srv.logs), "the log")
        assert sorted(servables(srv)) == ["a", "b"]
        srv.cfg.write_text(config_text(entry(repo, "b")))
        _wait(lambda: "a" not in srv.manager.models, "the poller to remove a")
    assert servables(srv)["b"] and states(srv, "b") == {2: "AVAILABLE"} and states(srv, "a") == {1: "END"}
    assert h.failures() and {(r[3], r[4]) for r in h.failures()} == {
        ("NOT_FOUND", "Servable not found for request: Latest(a)")}
    assert [r for r in h.log if r[3] != "OK" and r[2] < h.failures()[0][1]] == []


def test_the_cli_takes_the_poll_flag():
    from serving.__main__ import build_parser
    args = build_parser().parse_args(["--model_config_file=m.config", "--model_config_file_poll_wait_seconds=30"])
    assert args.model_config_file_poll_wait_seconds == 30


# ------------------------------------------------------------------------------------------ MultiInference

def test_multi_inference_matches_classify_and_regress(repo, make_server):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import (classification_pb2, inference_pb2, prediction_service_pb2_grpc,
                                         regression_pb2)
    from .test_serving_server import http
    srv = make_server(entry(repo, "a"), entry(repo, "cls"))
    ex = [tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=row))})) for row in ([1, 2, 3], [0.5, -1, 0])]
    creq = classification_pb2.ClassificationRequest()
    creq.model_spec.name = "cls"
    creq.input.example_list.examples.extend(ex)
    rreq = regression_pb2.RegressionRequest()
    rreq.model_spec.name, rreq.model_spec.signature_name = "cls", "regress"
    rreq.input.example_list.examples.extend(ex)
    mreq = inference_pb2.MultiInferenceRequest()
    t = mreq.tasks.add(method_name="tensorflow/serving/classify")
    t.model_spec.name = "cls"
    t = mreq.tasks.add(method_name="tensorflow/serving/regress")
    t.model_spec.name, t.model_spec.signature_name = "cls", "regress"
    mreq.input.example_list.examples.extend(ex)
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as ch:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(ch)
        c, r, m = stub.Classify(creq, timeout=20), stub.Regress(rreq, timeout=20), stub.MultiInference(mreq, timeout=20)
        assert [x.WhichOneof("result") for x in m.results] == ["classification_result", "regression_result"]
        assert m.results[0].classification_result == c.result
        assert m.results[1].regression_result == r.result
        assert [x.value for x in r.result.regressions] == pytest.approx([6.0, -0.5])
        assert [(x.model_spec.name, x.model_spec.version.value, x.model_spec.signature_name) for x in m.results] == [
            ("cls", 1, "serving_default"), ("cls", 1, "regress")]

        def refused(req):
            with pytest.raises(grpc.RpcError) as ei:
                stub.MultiInference(req, timeout=20)
            return ei.value.code().name, ei.value.details()

        two = inference_pb2.MultiInferenceRequest()
        two.CopyFrom(mreq)
        two.tasks[1].model_spec.name = "a"
        assert refused(two) == ("INVALID_ARGUMENT", "All ModelSpecs in a MultiInferenceRequest must access the "
                                "same model name.")
        dup = inference_pb2.MultiInferenceRequest()
        dup.CopyFrom(mreq)
        dup.tasks[1].model_spec.signature_name = ""
        assert refused(dup) == ("INVALID_ARGUMENT", "Duplicate evaluation of signature: serving_default")
        wrong = inference_pb2.MultiInferenceRequest()
        wrong.CopyFrom(mreq)
        wrong.tasks[1].model_spec.signature_name = "serving_default"
        wrong.tasks[0].model_spec.signature_name = "regress"
        assert refused(wrong) == ("INVALID_ARGUMENT", "Expected classification signature method_name to be "
                                  "tensorflow/serving/classify. Was: tensorflow/serving/regress")
        other = inference_pb2.MultiInferenceRequest()
        other.CopyFrom(mreq)
        other.tasks[1].method_name = "tensorflow/serving/predict"
        assert refused(other) == ("UNIMPLEMENTED", "Unsupported signature method_name: tensorflow/serving/predict")
    # TF Serving's REST API has no MultiInference
    # (a /v1/ URL that does not parse: 400 "Malformed request", as TF Serving)
    status, obj = http(srv, "POST", "/v1/models/cls:multiInference", {"examples": [{"x": [1.0, 2.0, 3.0]}]})
    assert status == 400 and obj["error"].startswith("Malformed request"), obj
