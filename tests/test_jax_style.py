"""The jax training style: a JaxModel(apply, params) trained by optax in the TensorFlow worker, and every
format's route for the "jax" family (SavedModel by jax2tf, LiteRT from it, ONNX by jax2onnx, TorchScript
by onnx2fx from the ONNX file, TF.js by onnx2tf from the ONNX file: the TF.js converter refuses jax2tf's
XlaCallModule graph)."""
import json
import subprocess
import sys
import textwrap

import pytest

from .conftest import ROOT, run_cli

SPEC = """
[pipeline]
name = "jaxstyle"
seed = 0

[data]
source = "linear"
task = "regression"
n_samples = 200
slope = 3.0
intercept = 2.0
noise = 0.1

[train]
lr = 0.1
epochs = 200
batch_size = "full"
loss = "mse"

[accept]
slope = { target = 3.0, tolerance = 0.05 }
intercept = { target = 2.0, tolerance = 0.05 }

[[model]]
name = "plain"
framework = "jax"
factory = "pipeline.zoo:linear_jax"
train = { optimizer = "sgd" }

[[model]]
name = "callbacks"
framework = "jax"
factory = "pipeline.zoo:linear_jax"
train = { optimizer = "adam", validation_split = 0.2, early_stopping = { patience = 5 }, checkpoint = true, reduce_lr = { patience = 3 } }

[export]
formats = ["saved_model", "torchscript", "onnx", "litert", "tfjs"]
litert_batch_sizes = [1, 16]

[parity]
random_rows = 64
input_range = [-2.0, 2.0]
max_batch = 16
"""

CELLS = {"saved_model": 1, "torchscript": 1, "onnx": 1, "litert": 3, "tfjs": 2}  # records per model
ROUTES = {"saved_model": "jax2tf.convert", "onnx": "jax2onnx.to_onnx", "litert": "TFLiteConverter.from_saved_model",
          "torchscript": "onnx2fx", "tfjs": "onnx2tf"}


@pytest.fixture(scope="module")
def jax_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("jaxstyle")
    (home / "spec.toml").write_text(SPEC)
    r = run_cli("run", str(home / "spec.toml"), "--no-track", home=home, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    record = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    return home, r, record


@pytest.mark.e2e
def test_both_models_converge_and_every_format_passes_parity(jax_run):
    home, r, record = jax_run
    for name in ("plain", "callbacks"):
        m = record["models"][name]["metrics"]
        assert abs(m["slope"] - 3.0) <= 0.05 and abs(m["intercept"] - 2.0) <= 0.05, m
        assert record["models"][name]["framework"] == "jax"
    assert len(record["models"]["plain"]["loss_history"]) == 200
    parity = json.loads((home / ".pipeline" / "runs" / record["run_id"] / "parity.json").read_text())
    for name in ("plain", "callbacks"):
        rows = [x for x in parity["records"] if x["model"] == name]
        assert {f: sum(x["format"] == f for x in rows) for f in CELLS} == CELLS, [x["label"] for x in rows]
        for x in rows:
            assert x["status"] == "passed", (x["label"], x["runtime"], x["message"], x["error"])
            assert ROUTES[x["format"]] in x["details"]["route"], (x["label"], x["details"]["route"])
            if x["variant"] != "fp16":  # float16 weights: about 1e-3 here
                assert x["comparison"]["metrics"]["max_abs"] < 1e-5, (x["label"], x["comparison"]["metrics"])


@pytest.mark.e2e
def test_training_writes_event_files_and_the_callbacks_act(jax_run):
    home, r, record = jax_run
    from pathlib import Path
    for name, runs in (("plain", {"train"}), ("callbacks", {"train", "validation"})):
        board = Path(record["models"][name]["tensorboard_dir"])
        assert board.name == "tensorboard" and {p.name for p in board.iterdir()} == runs
        assert all(list((board / run).glob("events.out.tfevents.*")) for run in runs), name
    history = json.loads((board.parent / "history.json").read_text())  # the callbacks model's train stage
    assert history["stopped_epoch"] and history["stopped_epoch"] < 200
    assert history["best_epoch"] and history["best_epoch"] <= history["stopped_epoch"]
    assert len(history["loss"]) == len(history["val_loss"]) == history["stopped_epoch"]
    assert history["lr"][0] == pytest.approx(0.1) and history["lr"][-1] < history["lr"][0]  # reduce-on-plateau
    line = next(l for l in r.stdout.splitlines() if "train:callbacks" in l and "done" in l)
    assert f"stopped early after epoch {history['stopped_epoch']}, kept epoch {history['best_epoch']}" in line


def test_a_factory_of_the_wrong_kind_is_refused_naming_what_was_expected_and_what_came():
    from frameworks.base import WrongModelKind
    from frameworks.jax import Adapter, JaxModel
    with pytest.raises(WrongModelKind) as e:
        Adapter().check({"W": [1.0]}, "model m (jax): factory 'f:g'")
    assert "framework 'jax' expected a frameworks.jax.JaxModel(apply, params)" in str(e.value)
    assert "the factory returned a builtins.dict" in str(e.value)
    with pytest.raises(TypeError, match="expected JaxModel.apply to be a function"):
        Adapter().check(JaxModel(None, {}), "model m (jax)")


def test_the_declarations_and_the_model_class_import_no_framework():
    code = textwrap.dedent("""
        import sys
        import frameworks, frameworks.jax
        from frameworks.jax import JaxModel
        assert frameworks.family("jax") == "jax" and frameworks.lane("jax") == "tensorflow"
        print(sorted(m for m in ("jax", "optax", "tensorflow", "torch") if m in sys.modules))
        """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
