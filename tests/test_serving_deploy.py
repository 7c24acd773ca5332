"""`run toy` deploys both toy models to TF Serving and blesses them: the served answers, over gRPC and
REST, equal the reference outputs. An independent client (only tensorflow-serving-api and
tf.make_tensor_proto) gets them too; a served model whose answers differ is not blessed."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT
from .test_trust import version_tags

pytestmark = pytest.mark.e2e


def latest(home: Path) -> dict:
    return json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())


def deployment(home: Path) -> Path:
    stage = next(s for s in latest(home)["stages"] if s["name"] == "deploy:serving")
    return Path(stage["path"]) / "deployment"


def test_run_toy_deploys_and_blesses_both_models_over_grpc_and_rest(toy_run):
    home, _ = toy_run
    rec = latest(home)
    parity = json.loads((Path(rec["report_dir"]) / "parity.json").read_text())
    served = {(r["model"], r["runtime"]): r for r in parity["records"] if r["format"] == "tf_serving"}
    assert set(served) == {(m, f"tf-serving-{t}") for m in ("keras", "torch") for t in ("grpc", "rest")}
    assert all(r["status"] == "passed" for r in served.values()), [r["message"] for r in served.values()]
    assert all(r["details"]["feeds"][0] == 1 for r in served.values())  # batch 1, then the largest, then the rest
    for model in ("keras", "torch"):
        assert version_tags(home, f"toy-{model}")["serving.blessed"] == "true"
    folder = deployment(home)
    for model in ("keras", "torch"):
        assert (folder / "models" / model / "1" / "saved_model.pb").is_file()
        assert (folder / "models" / model / "1" / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert "FROM tensorflow/serving:" in (folder / "Dockerfile").read_text()
    assert "docker build -t" in (folder / "docker-commands.txt").read_text()


def test_the_deployment_files_parse_as_tf_servings_own_protos(toy_run):
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorflow_serving.apis import prediction_log_pb2
    from tensorflow_serving.config import model_server_config_pb2
    folder = deployment(toy_run[0])
    config = text_format.Parse((folder / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    assert {c.name: c.base_path for c in config.model_config_list.config} == {"keras": "/models/keras",
                                                                             "torch": "/models/torch"}
    assert all(dict(c.version_labels) == {"stable": 1} for c in config.model_config_list.config)
    warmup = folder / "models" / "torch" / "1" / "assets.extra" / "tf_serving_warmup_requests"
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(warmup))]
    assert logs and all(log.predict_log.request.model_spec.name == "torch" for log in logs)


def test_an_independent_client_gets_the_reference_outputs(toy_run, tmp_path):
    """Only tensorflow-serving-api, grpc and tf.make_tensor_proto against `python -m serving` started with
    TF Serving's flags on the deployment (the container's paths mapped to this machine's)."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    from serving.deploy import local_config
    home = toy_run[0]
    folder = deployment(home)
    config = local_config(folder, tmp_path / "models.config")
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--port=0", "--rest_api_port=0",
                             f"--model_config_file={config}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        port = None
        deadline = time.time() + 60
        while port is None and time.time() < deadline:
            line = proc.stdout.readline()
            if "gRPC ModelServer at" in line:
                port = int(line.split(":")[-1].split()[0])
        assert port, "the server did not print its gRPC address"
        bundle = next(Path(s["path"]) for s in latest(home)["stages"] if s["name"] == "bundle:torch") / "bundle"
        with np.load(bundle / "reference.npz") as f:
            x, y = f["x"], f["y"]
        stub = prediction_service_pb2_grpc.PredictionServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        req = predict_pb2.PredictRequest()
        req.model_spec.name = "torch"
        req.model_spec.version_label = "stable"
        req.inputs["input"].CopyFrom(tf.make_tensor_proto(x.astype(np.float32)))
        got = tf.make_ndarray(next(iter(stub.Predict(req, timeout=30).outputs.values())))
        assert np.max(np.abs(got - y)) < 1e-5
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_served_answers_that_differ_from_the_reference_are_not_blessed(toy_run, tmp_path):
    """The keras model's bundle, its reference outputs shifted: the served values no longer match."""
    import shutil
    from exporters.bundle import read_bundle
    from serving.bless import bless
    from serving.client import ServingClient
    from serving.deploy import local_config
    from serving.server import LocalServer
    home = toy_run[0]
    src = next(Path(s["path"]) for s in latest(home)["stages"] if s["name"] == "bundle:keras") / "bundle"
    tampered = tmp_path / "bundle"
    shutil.copytree(src, tampered)
    with np.load(tampered / "reference.npz") as f:
        ref = {k: f[k] for k in f.files}
    ref["y"] = ref["y"] + 0.01
    np.savez(tampered / "reference.npz", **ref)
    config = local_config(deployment(home), tmp_path / "models.config")
    with LocalServer(model_config_file=str(config), port=0, rest_api_port=0, file_system_poll_wait_seconds=0,
                     log=lambda s: None) as server:
        server.wait_until_available("keras", timeout_s=60)
        with ServingClient("127.0.0.1", grpc_port=server.grpc_port, rest_port=server.rest_port) as client:
            honest = bless(read_bundle(src), client, version=1)
            records = bless(read_bundle(tampered), client, version=1)
    assert all(r.passed for r in honest)
    assert [r.passed for r in records] == [False, False]
    assert all("max abs error 1.0e-02" in r.message and "keras/tf_serving on tf-serving-" in r.message for r in records)


def test_a_bad_deploy_table_is_refused_when_the_spec_loads(tmp_path):
    from pipeline.spec import SpecError, load
    toy = (ROOT / "pipeline" / "specs" / "toy.toml").read_text()
    for table, words in [("version = 0", "deploy.serving.version: expected a positive integer"),
                         ("policy = 'newest'", "deploy.serving.policy: expected one of latest, all, specific"),
                         ("transports = ['http']", "deploy.serving.transports: expected a non-empty list"),
                         ("docker = true\ntransports = ['grpc', 'v2-rest']",
                          "deploy.serving.transports: expected \"grpc\" and \"rest\" with docker = true"),
                         ("port = 1", "deploy.serving.port: expected one of the keys")]:
        spec = tmp_path / "s.toml"
        spec.write_text(toy.split("[deploy.serving]")[0] + "[deploy.serving]\n" + table + "\n")
        with pytest.raises(SpecError, match=words.replace("[", r"\[").replace("(", r"\(")):
            load(str(spec))


def test_docker_asked_without_an_engine_blesses_on_the_local_server_and_says_so(toy_run, tmp_path):
    from exporters.bundle import read_bundle
    from serving.deploy import deploy_and_bless, settings
    home = toy_run[0]
    bundle = read_bundle(next(Path(s["path"]) for s in latest(home)["stages"] if s["name"] == "bundle:torch") / "bundle")
    said = []
    result = deploy_and_bless([bundle], tmp_path / "deployment", settings({"docker": True, "transports": ["rest"]}),
                              log=said.append)
    assert result["server"]["kind"] == "local" and result["blessings"]["torch"]["blessed"]
    assert any("no container engine answers `docker info`" in line for line in said)
    assert [r["runtime"] for r in result["blessings"]["torch"]["records"]] == ["tf-serving-rest"]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_tf_servings_rest_api_until_interrupted(toy_run, tmp_path):
    """`serve models:/toy-keras@candidate`: the registered bundle, checked and deployed afresh (a run id or
    a spec takes the run's own deployment folder, the same one the blessing used)."""
    import urllib.request
    from .conftest import copy_home
    home = copy_home(toy_run[0], tmp_path / "home")
    ref = "models:/toy-keras@candidate"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", ref, "--port", "0", "--rest_api_port", str(port)],
                            cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(ROOT)})
    try:
        lines, deadline = [], time.time() + 90
        while time.time() < deadline and not any("HTTP/REST API at" in l for l in lines):
            lines.append(proc.stdout.readline())
        assert any("try: curl" in l and "/v1/models/keras:predict" in l for l in lines), lines
        body = json.dumps({"instances": [[0.5]]}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/keras:predict", data=body)
        got = json.loads(urllib.request.urlopen(req, timeout=30).read())["predictions"][0][0]
        assert abs(got - (0.5 * 2.9931 + 1.9912)) < 1e-3  # the toy Keras model's slope and intercept
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
