"""`run styles`: the toy trained in nine styles (raw TensorFlow, Keras on TensorFlow, JAX and PyTorch, PyTorch,
Lightning, fastai, JAX, Flax),
each exported to all five formats and verified; then the callbacks, each through its style's own
mechanism; each process holds only its frameworks."""
import json
import textwrap

import pytest

from .conftest import ROOT, run_cli

STYLES = ("tensorflow", "keras", "keras-jax", "keras-torch", "torch", "lightning", "fastai", "jax", "flax")
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def styles_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("styles")
    dump = home / "modules"
    dump.mkdir()
    r = run_cli("run", "styles", "--no-track", home=home, timeout=1500, env={"PIPELINE_MODULES_DUMP": str(dump)})
    return home, r


def latest(home):
    return json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())


def test_every_style_converges_and_every_cell_it_claims_is_verified(styles_run):
    home, r = styles_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rec = latest(home)
    for style in STYLES:
        metrics = rec["models"][style]["metrics"]
        assert abs(metrics["slope"] - 3.0) < 0.05 and abs(metrics["intercept"] - 2.0) < 0.05, (style, metrics)
    parity = json.loads((home / ".pipeline" / "runs" / rec["run_id"] / "parity.json").read_text())
    by_model = {}
    for x in parity["records"]:
        by_model.setdefault(x["model"], {}).setdefault(x["format"], []).append(x)
    for style in STYLES:
        assert set(by_model[style]) == {"saved_model", "torchscript", "onnx", "litert", "tfjs"}, style
        for fmt, cells in by_model[style].items():
            for cell in cells:
                if cell["status"] == "unsupported":  # a refusal names its reason
                    assert cell.get("error") or cell.get("message"), cell
                else:
                    assert cell["status"] == "passed", cell
    # the ones a person would ask about: Lightning and fastai are torch modules to every exporter
    for style in ("tensorflow", "lightning", "fastai", "keras-jax", "keras-torch"):
        assert all(c["status"] == "passed" for cells in by_model[style].values() for c in cells), style
    # Keras on its other backends: the same seed gives the same line, and each format came by its own route
    fits = [rec["models"][s]["metrics"] for s in ("keras-jax", "keras-torch")]
    assert abs(fits[0]["slope"] - fits[1]["slope"]) < 1e-3, fits
    routes = {(x["model"], x["format"]): (x.get("details") or {}).get("route", "") for x in parity["records"]}
    assert "jax2onnx" in routes["keras-jax", "onnx"] and "torch.onnx" in routes["keras-torch", "onnx"], routes
    assert "torch.jit.trace" in routes["keras-torch", "torchscript"], routes


def test_each_style_writes_tensorboard_event_files_in_keras_layout(styles_run):
    home, _ = styles_run
    rec = latest(home)
    for s in rec["stages"]:
        if s["kind"] == "train":
            board = ROOT.__class__(s["path"]) / "tensorboard"
            events = list(board.rglob("events.out.tfevents.*"))
            # no validation split here: train/ alone (tests/test_tensorboard_layout.py reads the tags)
            assert events and {e.parent.relative_to(board).as_posix() for e in events} == {"train"}, s["name"]


def test_each_process_imports_only_its_frameworks(styles_run):
    home, _ = styles_run
    loaded = {}
    for dump in (home / "modules").glob("*.json"):
        loaded.setdefault(dump.name.rsplit("-", 1)[0], set()).update(json.loads(dump.read_text()))
    assert set(loaded) == {"main", "tensorflow", "torch", "keras-jax", "keras-torch"}
    assert not loaded["main"] & {"tensorflow", "keras", "torch", "jax", "lightning", "fastai", "optax", "flax"}
    assert {"tensorflow", "keras", "jax", "optax", "flax"} <= loaded["tensorflow"]
    assert not loaded["tensorflow"] & {"torch", "lightning", "fastai"}
    assert {"torch", "lightning", "fastai"} <= loaded["torch"]
    assert not loaded["torch"] & {"tensorflow", "keras", "tf_keras", "optax", "flax", "torchvision"}
    # Keras on JAX never loads torch; Keras on torch loads JAX only through litert-torch's converter (and
    # TensorFlow for TensorBoard's writer), so its backend shows in its routes (the styles test)
    assert {"keras", "jax"} <= loaded["keras-jax"] and "torch" not in loaded["keras-jax"]
    assert {"keras", "torch"} <= loaded["keras-torch"]


CALLBACKS = """
[pipeline]
name = "callbacks"
seed = 0

[data]
source = "linear"
task = "regression"
n_samples = 200

[train]
lr = 0.1
epochs = 200
batch_size = "full"
loss = "mse"
optimizer = "sgd"
validation_split = 0.2
early_stopping = { patience = 5 }
checkpoint = true
reduce_lr = { patience = 3, factor = 0.5 }

{models}

[export]
formats = ["onnx"]
"""


def test_callbacks_act_through_each_styles_own_mechanism(tmp_path):
    def model(style: str, factory: str) -> str:
        framework, _, backend = style.partition("-")
        return (f'[[model]]\nname = "{style}"\nframework = "{framework}"\nfactory = "pipeline.zoo:linear_{factory}"\n'
                + (f'backend = "{backend}"\n' if backend else "")
                + ('train = { lr = 0.5, epochs = 60 }\n' if style == "fastai" else ""))
    models = "\n".join(model(s, f) for s, f in [("tensorflow", "tf_module"), ("keras", "keras"), ("keras-jax", "keras"),
                                                ("keras-torch", "keras"), ("torch", "torch"), ("lightning", "lightning"),
                                                ("fastai", "fastai")])
    (tmp_path / "spec.toml").write_text(textwrap.dedent(CALLBACKS).replace("{models}", models))
    r = run_cli("run", str(tmp_path / "spec.toml"), "--no-track", home=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rec = latest(tmp_path)
    for s in rec["stages"]:
        if s["kind"] != "train":
            continue
        history = json.loads((ROOT.__class__(s["path"]) / "history.json").read_text())
        name = s["name"]
        assert history["val_loss"] and len(history["val_loss"]) == len(history["loss"]), name
        epochs = len(history["loss"])
        assert history["stopped_epoch"] == epochs < 200, (name, epochs)   # early stopping ended it
        assert 1 <= history["best_epoch"] <= epochs, name                 # the best epoch was kept
        best = min(history["val_loss"])
        assert abs(history["val_loss"][history["best_epoch"] - 1] - best) < 1e-6 or name == "train:fastai", name
        if name != "train:fastai":  # fastai's plateau callback runs with `fit`; its rate is read per batch
            assert history["lr"][-1] < history["lr"][0], (name, history["lr"][:1], history["lr"][-1:])
        assert "stopped early" in s["facts"]["summary"], s["facts"]["summary"]
