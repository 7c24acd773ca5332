"""Prometheus metrics: the local server's `--monitoring_config_file` (TF Serving's MonitoringConfig, names as
TF Serving's exporter writes them) and the edge agent's GET /metrics, each scraped over real HTTP after real
requests (gRPC and REST on 127.0.0.1; the agent as a subprocess).

One SavedModel (tests/test_serving_server.py's `fixed`: y = x @ W + 1) and one server with metrics and
batching on for the module; a second, with metrics disabled, only to see the path answer 404. The agent
serves a one-op LiteRT model (y = 3x + 2) converted here."""
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest

from .conftest import ROOT
from .test_serving_server import expected_y, make_linear

X = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
DEFAULT_PATH = "/monitoring/prometheus/metrics"


def http(port, method, path, body=None, raw=None, headers=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers.get("Content-Type"), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read().decode()


class Scrape:
    """One page, parsed by prometheus_client's own parser (which must accept it whole)."""

    def __init__(self, text: str):
        from prometheus_client.parser import text_string_to_metric_families
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels) -> float:
        """The sum over the samples of `name` whose labels include `labels` (the parser names counter
        samples NAME_total; both spellings are taken)."""
        want = {name, name + "_total"}
        return sum(s.value for s in self.samples
                   if s.name in want and all(s.labels.get(k) == str(v) for k, v in labels.items()))


def delta(after: Scrape, before: Scrape, name: str, **labels) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


# ------------------------------------------------------------------------------------------- config

def test_monitoring_config_parses_as_tf_serving(tmp_path):
    from serving.models import ConfigError
    from serving.monitoring import parse_monitoring_config

    def parse(text):
        p = tmp_path / f"{uuid.uuid4().hex[:6]}.config"
        p.write_text(text)
        return parse_monitoring_config(p)

    assert parse('prometheus_config { enable: true, path: "/m/p" }') == "/m/p"
    assert parse("prometheus_config { enable: true }") == DEFAULT_PATH  # kPrometheusPath when path is empty
    assert parse('prometheus_config { enable: false, path: "/m/p" }') is None
    assert parse("") is None
    bad = tmp_path / "bad.config"
    bad.write_text("prometheus_config { enabled: true }")
    with pytest.raises(ConfigError, match=r"bad\.config is not a MonitoringConfig text proto: .*enabled"):
        parse_monitoring_config(bad)
    with pytest.raises(ConfigError, match="must start with '/'"):
        parse('prometheus_config { enable: true, path: "metrics" }')
    with pytest.raises(ConfigError, match="cannot read --monitoring_config_file"):
        parse_monitoring_config(tmp_path / "absent.config")


def test_cli_refuses_a_malformed_monitoring_config_with_exit_2(tmp_path):
    bad = tmp_path / "monitoring.config"
    bad.write_text("prometheus_config { enable: yes please }")
    r = subprocess.run([sys.executable, "-m", "serving", "--port=0", "--rest_api_port=0", "--model_name=m",
                        f"--model_base_path={tmp_path / 'models'}", f"--monitoring_config_file={bad}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"--monitoring_config_file {bad} is not a MonitoringConfig text proto" in r.stderr
    assert "Running gRPC ModelServer" not in r.stdout


# ------------------------------------------------------------------------------------------- server

@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    root = tmp_path_factory.mktemp("metrics") / "models"
    make_linear(root / "fixed", 1, 1.0)
    return root


@pytest.fixture(scope="module")
def server(model_root):
    from serving.server import LocalServer
    mon = model_root.parent / "monitoring.config"
    mon.write_text("prometheus_config { enable: true }\n")  # empty path: TF Serving's default
    batching = model_root.parent / "batching.config"
    batching.write_text("max_batch_size { value: 8 }\nbatch_timeout_micros { value: 500 }\n"
                        "num_batch_threads { value: 1 }\n")
    srv = LocalServer("fixed", str(model_root / "fixed"), port=0, rest_api_port=0, file_system_poll_wait_seconds=0,
                      enable_batching=True, batching_parameters_file=str(batching), monitoring_config_file=str(mon),
                      log=lambda s: None)
    with srv:
        srv.wait_until_available("fixed", timeout_s=60)
        yield srv


@pytest.fixture(scope="module")
def client(server):
    from serving.client import ServingClient
    with ServingClient("127.0.0.1", server.grpc_port, server.rest_port, timeout_s=30) as c:
        yield c


def scrape(server) -> Scrape:
    status, ctype, text = http(server.rest_port, "GET", DEFAULT_PATH)
    assert status == 200, text
    assert ctype.startswith("text/plain"), ctype
    return Scrape(text)


def test_every_request_is_counted_once_with_its_code(server, client):
    from serving.client import ServingError
    before = scrape(server)
    # 3 gRPC predicts, 2 REST predicts, 1 gRPC metadata, 1 REST status: all OK
    for _ in range(3):
        out = client.predict("fixed", {"x": X}, transport="grpc")
        np.testing.assert_allclose(out["y"], expected_y(X, 1), rtol=1e-6)
    for _ in range(2):
        status, _, text = http(server.rest_port, "POST", "/v1/models/fixed:predict", {"instances": X.tolist()})
        assert status == 200 and np.allclose(json.loads(text)["predictions"], expected_y(X, 1))
    client.metadata("fixed", transport="grpc")
    status, _, _ = http(server.rest_port, "GET", "/v1/models/fixed")
    assert status == 200
    # 3 errors: a wrong input over REST, an unknown version over gRPC, a body that is not JSON
    status, _, text = http(server.rest_port, "POST", "/v1/models/fixed:predict", {"instances": [[1.0, 2.0]]})
    assert status == 400, text
    with pytest.raises(ServingError) as e:
        client.predict("fixed", {"x": X}, version=7, transport="grpc")
    assert e.value.code == "NOT_FOUND"
    status, _, _ = http(server.rest_port, "POST", "/v1/models/fixed:predict", raw=b"{not json")
    assert status == 400
    # the Open Inference Protocol's infer, counted under an entrypoint of its own (TF Serving has none)
    v2_body = {"inputs": [{"name": "x", "shape": list(X.shape), "datatype": "FP32", "data": X.ravel().tolist()}]}
    status, _, text = http(server.rest_port, "POST", "/v2/models/fixed/infer", v2_body)
    assert status == 200, text
    status, _, _ = http(server.rest_port, "POST", "/v2/models/fixed/versions/7/infer", v2_body)
    assert status == 404
    after = scrape(server)
    n_ok, n_err = 7, 3
    tf_ok = n_ok - 1  # TF Serving records no gRPC GetModelMetadata (prediction_service_impl.cc)

    # TF Serving's own metric, in its own form: no _total suffix, no _created sample
    tf_count = ":tensorflow:serving:request_count"
    assert f"# TYPE {tf_count} counter" in after.text
    assert f'{tf_count}{{model_name="fixed",status="OK"}} {int(after.value(tf_count, status="OK"))}\n' in after.text
    assert "_total" not in after.text and "_created" not in after.text
    assert delta(after, before, tf_count, model_name="fixed") == tf_ok + n_err
    assert delta(after, before, tf_count, model_name="fixed", status="OK") == tf_ok
    assert delta(after, before, tf_count, model_name="fixed", status="INVALID_ARGUMENT") == 2
    assert delta(after, before, tf_count, model_name="fixed", status="NOT_FOUND") == 1

    # ours: per version, signature, API and entrypoint
    own = "local_serving_request_count"
    assert delta(after, before, own, API="Predict", entrypoint="GRPC", version=1, signature="serving_default",
                 status="OK") == 3
    assert delta(after, before, own, API="predict", entrypoint="REST", version=1, signature="serving_default",
                 status="OK") == 2
    assert delta(after, before, own, API="GetModelMetadata", entrypoint="GRPC", version=1, status="OK") == 1
    assert delta(after, before, own, API="status", entrypoint="REST", status="OK") == 1
    assert delta(after, before, own, API="Predict", entrypoint="GRPC", version=7, status="NOT_FOUND") == 1
    assert delta(after, before, own, API="predict", entrypoint="REST", status="INVALID_ARGUMENT") == 2
    assert delta(after, before, own, API="infer", entrypoint="V2_REST", version=1, signature="serving_default",
                 status="OK") == 1
    assert delta(after, before, own, API="infer", entrypoint="V2_REST", status="NOT_FOUND") == 1

    # latency: ours counts every request; TF Serving's only those that succeeded, in microseconds
    lat = "local_serving_request_latency_seconds"
    assert delta(after, before, lat + "_count", model_name="fixed") == n_ok + n_err + 2  # and the two v2 infers
    assert delta(after, before, lat + "_count", API="Predict", entrypoint="GRPC", version=1) == 3
    assert after.families[lat].type == "histogram"
    tf_lat = ":tensorflow:serving:request_latency"
    assert delta(after, before, tf_lat + "_count", model_name="fixed") == tf_ok
    assert delta(after, before, tf_lat + "_count", model_name="fixed", API="Predict", entrypoint="GRPC") == 3
    assert delta(after, before, tf_lat + "_count", model_name="fixed", API="predict", entrypoint="REST") == 2
    assert delta(after, before, tf_lat + "_sum", API="Predict", entrypoint="GRPC") > 100  # > 100 us for 3 calls
    assert f'{tf_lat}_bucket{{model_name="fixed",API="Predict",entrypoint="GRPC",le="32.4"}}' in after.text

    # batching: every row that reached the batcher was run in exactly one batch
    inp, done = (":tensorflow:serving:batching_session:input_batch_size",
                 ":tensorflow:serving:batching_session:processed_batch_size")
    assert delta(after, before, inp + "_count") == 6  # the five good predicts and the v2 infer
    assert delta(after, before, inp + "_sum") == 6 * len(X)
    assert delta(after, before, done + "_sum") == 6 * len(X)
    assert 1 <= delta(after, before, done + "_count") <= 6


def test_models_loaded_and_their_load_latency(server):
    page = scrape(server)
    assert page.value("local_serving_model_version_state", model_name="fixed", version=1, state="AVAILABLE") == 1
    assert page.value("local_serving_model_version_state", model_name="fixed", state="LOADING") == 0
    assert 0 < page.value("local_serving_model_load_latency_seconds", model_name="fixed", version=1) < 120


def test_a_disabled_or_absent_monitoring_config_serves_no_metrics(model_root, server):
    from serving.server import LocalServer
    off = model_root.parent / "off.config"
    off.write_text(f'prometheus_config {{ enable: false, path: "{DEFAULT_PATH}" }}\n')
    for kwargs in ({"monitoring_config_file": str(off)}, {}):
        with LocalServer("fixed", str(model_root / "fixed"), port=0, rest_api_port=0, file_system_poll_wait_seconds=0,
                         log=lambda s: None, **kwargs) as srv:
            assert srv.metrics is None
            status, _, text = http(srv.rest_port, "GET", DEFAULT_PATH)
            assert status == 404 and "Malformed request" in text, (status, text)
    # the enabled server answers only at its path
    assert http(server.rest_port, "GET", "/monitoring/prometheus")[0] == 404


# ------------------------------------------------------------------------------------------- the agent

def _tflite(path):
    """A one-op LiteRT model, y = 3x + 2, input "input" [N, 1] -> output "output"."""
    import tensorflow as tf

    class Lin(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="input")])
        def serve(self, input):  # noqa: A002 - the tensor's name
            return {"output": 3.0 * input + 2.0}

    mod = Lin()
    conv = tf.lite.TFLiteConverter.from_concrete_functions([mod.serve.get_concrete_function()], mod)
    path.write_bytes(conv.convert())
    return path


@pytest.fixture(scope="module")
def edge_setup(tmp_path_factory):
    from edge.keys import init_keys
    from edge.package import build_package
    from exporters.base import Artifact
    from exporters.bundle import read_bundle, write_bundle

    tmp = tmp_path_factory.mktemp("edge_metrics")
    model = _tflite(tmp / "model.tflite")
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(8, 1)
    sig = {"inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1], "layout": None}],
           "outputs": [{"name": "output", "dtype": "float32", "shape": [None, 1], "layout": None}]}
    keys = init_keys(tmp / "keys")

    def bundle(tag, y):
        src = tmp / f"src-{tag}"
        src.mkdir()
        np.savez(src / "reference.npz", x=x, y=y, kind=np.zeros(8, np.int8))
        art = Artifact(model="m", format="litert", variant="fp32", path=str(shutil.copy(model, src)),
                       framework="torch", route="test", batch_sizes=None, size_bytes=model.stat().st_size)
        write_bundle(tmp / f"bundle-{tag}", model="m", framework="torch", task="regression", signature=sig,
                     reference=src / "reference.npz", artifacts={"litert": [art]},
                     verdicts={"m/litert@litert-interpreter": "passed"}, tolerances={}, max_batch=4,
                     source={"spec": "test"})
        return read_bundle(tmp / f"bundle-{tag}")

    good, wrong = bundle("good", 3 * x + 2), bundle("wrong", 3 * x + 3)  # wrong: the reference is off by 1
    pkgs = {v: build_package(good, tmp / f"good-v{v}.tar.gz", keys[0], version=v, variants=("fp32",)) for v in (1, 2)}
    pkgs["wrong"] = build_package(wrong, tmp / "wrong-v3.tar.gz", keys[0], version=3, variants=("fp32",))
    return {"tmp": tmp, "keys": keys, "packages": pkgs, "x": x}


@pytest.fixture(scope="module")
def agent(edge_setup):
    from .test_edge import AgentProcess
    proc = AgentProcess(edge_setup["tmp"] / "device", edge_setup["keys"][1], edge_setup["tmp"])
    yield proc
    proc.stop()


def agent_scrape(agent) -> Scrape:
    from .test_edge import TOKEN
    status, ctype, text = http(agent.port, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, text
    assert ctype.startswith("text/plain"), ctype
    return Scrape(text)


def test_agent_metrics_after_pushes_predicts_and_a_rollback(agent, edge_setup):
    from edge.client import EdgeError
    pkgs, x = edge_setup["packages"], edge_setup["x"]
    # read-only, as /status: the bearer token is required
    status, _, text = http(agent.port, "GET", "/metrics")
    assert status == 401 and "token" in text
    before = agent_scrape(agent)
    assert before.value("edge_agent_predict_requests") == 0 and before.value("edge_agent_activations") == 0

    assert agent.client.push(pkgs[1])["passed"] is True
    with pytest.raises(EdgeError) as e:
        agent.client.push(pkgs["wrong"])
    assert e.value.status == 422
    assert agent.client.push(pkgs[2])["version"] == 2
    for _ in range(4):
        np.testing.assert_allclose(agent.client.predict({"input": x[:3]})["output"], 3 * x[:3] + 2, atol=1e-5)
    with pytest.raises(EdgeError) as e:
        agent.client.predict({"input": [[1.0, 2.0]]})  # wrong shape
    assert e.value.status == 400
    with pytest.raises(EdgeError) as e:
        agent.client.predict({"input": [[1.0]]}, variant="bf16")
    assert e.value.status == 404
    assert agent.client.rollback()["version"] == 1

    after = agent_scrape(agent)
    assert after.value("edge_agent_predict_requests", variant="fp32", code=200) == 4
    assert after.value("edge_agent_predict_requests", variant="fp32", code=400) == 1
    assert after.value("edge_agent_predict_requests", variant="unknown", code=404) == 1
    assert after.value("edge_agent_predict_latency_seconds_count") == 6
    assert after.value("edge_agent_predict_latency_seconds_count", variant="fp32") == 5
    assert after.value("edge_agent_predict_latency_seconds_sum", variant="fp32") > 0
    assert after.value("edge_agent_parity_checks", variant="fp32", outcome="passed") == 2
    assert after.value("edge_agent_parity_checks", variant="fp32", outcome="failed") == 1
    assert after.value("edge_agent_pushes", outcome="activated") == 2
    assert after.value("edge_agent_pushes", outcome="rejected") == 1
    assert after.value("edge_agent_activations") == 2
    assert after.value("edge_agent_rollbacks") == 1
    assert after.value("edge_agent_active_version", model="m") == 1
    assert after.families["edge_agent_predict_latency_seconds"].type == "histogram"


def test_a_cors_preflight_is_counted_without_a_model(server):
    """OPTIONS on a /v1/ URL (a CORS preflight) is counted as TF Serving counts it: request_count with no
    model name, OK or FAILED_PRECONDITION (http_server.cc:170-177 and :201, RecordModelRequestCount with the
    empty model_name the handler never filled)."""
    before = scrape(server)
    assert http(server.rest_port, "OPTIONS", "/v1/models/fixed:predict", headers={"Origin": "http://a.b"})[0] == 200
    assert http(server.rest_port, "OPTIONS", "/v1/models/fixed:predict")[0] == 400
    after = scrape(server)
    name = ":tensorflow:serving:request_count"
    assert delta(after, before, name, model_name="", status="OK") == 1
    assert delta(after, before, name, model_name="", status="FAILED_PRECONDITION") == 1
    assert delta(after, before, name, model_name="fixed") == 0
