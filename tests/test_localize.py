"""The first diverging layer: a fault planted in one chosen middle layer of an artifact (its weights
scaled inside the file) is named as that layer, in each format whose tensors are read, for a Keras
CNN and a torch CNN with BatchNorm; the same artifact unchanged names no layer."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from parity.localize import Tap, localize, one_line

FP32 = {"atol": 1e-5, "rtol": 1e-4}
PLANTED = "conv2"  # the middle layer every test plants its fault in


# ------------------------------------------------------------------------------------- the models

def keras_cnn():
    import keras
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inp)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(name="relu1")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inp, keras.layers.Dense(3, name="fc")(h))


class TorchCNN(torch.nn.Module):  # at module level: a pickled module of it loads in another process
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(torch.relu(self.conv2(x))).flatten(1))


def torch_cnn():
    torch.manual_seed(0)
    net = TorchCNN()
    with torch.no_grad():  # statistics that are not the identity, so BatchNorm folds into something real
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Each model with its artifacts: {(framework, format): (model, artifact path, rows)}."""
    from exporters import litert, onnx as onnx_format, saved_model, tfjs, torchscript
    out = tmp_path_factory.mktemp("localize")
    rng = np.random.default_rng(0)
    x_nhwc = rng.random((6, 8, 8, 1), dtype=np.float32)
    x_nchw = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    k, t = keras_cnn(), torch_cnn()
    found = {}
    k_onnx = onnx_format.export(k, framework="keras", name="k", example=x_nhwc, out_dir=out / "k-onnx")
    found["keras", "onnx"] = (k, k_onnx[0].path, x_nhwc)
    found["keras", "torchscript"] = (k, torchscript.export(k, framework="keras", name="k", example=x_nhwc,
                                                           out_dir=out / "k-ts", upstream={"onnx": k_onnx})[0].path, x_nhwc)
    sm = saved_model.export(k, framework="keras", name="k", example=x_nhwc, out_dir=out / "k-sm", upstream={})
    arts = litert.export(None, framework="keras", name="k", example=x_nhwc, out_dir=out / "k-litert",
                         upstream={"saved_model": sm}, options={"calibration": x_nhwc})
    found["keras", "litert"] = (k, next(a.path for a in arts if a.variant == "fp32"), x_nhwc)
    found["keras", "saved_model"] = (k, sm[0].path, x_nhwc)
    found["keras", "tfjs"] = (k, tfjs.export(None, framework="keras", name="k", example=x_nhwc, out_dir=out / "k-tfjs",
                                             upstream={"saved_model": sm})[0].path, x_nhwc)
    onnx_artifact = onnx_format.export(t, framework="torch", name="t", example=x_nchw, out_dir=out / "t-onnx")[0]
    found["torch", "onnx"] = (t, onnx_artifact.path, x_nchw)
    arts = litert.export(t, framework="torch", name="t", example=x_nchw, out_dir=out / "t-litert",
                         options={"calibration": x_nchw, "batch_sizes": [1]})
    found["torch", "litert"] = (t, next(a.path for a in arts if a.variant == "fp32"), x_nchw)
    t_sm = saved_model.export(t, framework="torch", name="t", example=x_nchw, out_dir=out / "t-sm",
                              upstream={"onnx": [onnx_artifact]})
    found["torch", "saved_model"] = (t, t_sm[0].path, x_nchw)
    found["torch", "tfjs"] = (t, tfjs.export(None, framework="torch", name="t", example=x_nchw, out_dir=out / "t-tfjs",
                                             upstream={"saved_model": t_sm})[0].path, x_nchw)
    found["torch", "torchscript"] = (t, torchscript.export(t, framework="torch", name="t", example=x_nchw,
                                                           out_dir=out / "t-ts", upstream={})[0].path, x_nchw)
    return found


# ------------------------------------------------------------------------------------- planting

def planted_weight(framework: str, model) -> np.ndarray:
    """The kernel of the planted layer as the framework holds it (HWIO for Keras, OIHW for torch)."""
    if framework == "keras":
        return np.asarray(model.get_layer(PLANTED).kernel)
    return getattr(model, PLANTED).weight.detach().numpy()


# the layouts converters store a kernel in, from the framework's: as it is, OIHW <-> HWIO, OHWI; a
# dense kernel as it is or transposed
KERNEL_LAYOUTS = {4: ((0, 1, 2, 3), (2, 3, 1, 0), (3, 2, 0, 1), (0, 2, 3, 1), (3, 0, 1, 2)), 2: ((0, 1), (1, 0))}


def plant(artifact: str, weight: np.ndarray, out: Path, factor: float = 1.5) -> Path:
    if (Path(artifact) / "variables" / "variables.index").is_file() and _holds_variable(artifact, weight):
        return plant_variable(artifact, weight, out)
    return plant_bytes(artifact, weight, out, factor)


def _holds_variable(folder: str, weight: np.ndarray) -> bool:
    import tensorflow as tf
    return any(v.shape == weight.shape for v in tf.saved_model.load(folder).variables)


def plant_variable(folder: str, weight: np.ndarray, out: Path) -> Path:
    """A SavedModel whose variable holding `weight` is scaled by 1.5, saved again by TensorFlow (its
    variables file is checksummed, so its bytes cannot be edited in place)."""
    import tensorflow as tf
    loaded = tf.saved_model.load(folder)
    var = next(v for v in loaded.variables if v.shape == weight.shape and np.allclose(v.numpy(), weight))
    var.assign(var * 1.5)
    tf.saved_model.save(loaded, str(out / "saved_model"), signatures={"serving_default": loaded.signatures["serving_default"]})
    return out / "saved_model"


def plant_bytes(artifact: str, weight: np.ndarray, out: Path, factor: float = 1.5) -> Path:
    """A copy of the artifact (a file or a folder) whose copy of `weight` is scaled by `factor` where it sits
    in the file's bytes, in whichever layout the converter stored it: the fault is planted inside the
    artifact, not in the model it came from."""
    src = Path(artifact)
    out.mkdir(parents=True, exist_ok=True)
    root = out / src.name
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, root)
    files = [f for f in ([root] if root.is_file() else sorted(root.rglob("*"))) if f.is_file()]
    for axes in KERNEL_LAYOUTS[weight.ndim]:
        stored = np.ascontiguousarray(weight.transpose(axes)).astype(np.float32)
        for f in files:
            data = f.read_bytes()
            if stored.tobytes() in data:  # every copy (a Keras SavedModel keeps two)
                f.write_bytes(data.replace(stored.tobytes(), (stored * np.float32(factor)).tobytes()))
                return root
    raise AssertionError(f"the planted layer's weights were not found in {artifact}")


# ------------------------------------------------------------------------------------- tests

# onnx2tf (torch -> SavedModel -> TF.js) and onnx2fx (Keras -> ONNX -> TorchScript) rename every op:
# those artifacts pair by sizes and values, the others by the layers' names
BY = {("torch", "saved_model"): "value", ("torch", "tfjs"): "order", ("keras", "torchscript"): "value"}
CELLS = [(fw, fmt) for fw in ("keras", "torch") for fmt in ("saved_model", "torchscript", "onnx", "litert", "tfjs")]


@pytest.mark.parametrize("framework, fmt", CELLS)
def test_a_fault_planted_in_one_layer_is_named_as_the_first_divergence(made, tmp_path, framework, fmt):
    from exporters.taps import artifact_taps
    from frameworks import adapter
    model, path, x = made[framework, fmt]
    layers = adapter(framework).layer_outputs(model, x)
    clean = localize(layers, artifact_taps(fmt, path, x), **FP32).to_json()
    assert "layer" not in clean and "no paired layer exceeds" in clean["note"]  # the unchanged artifact
    bad = plant(path, planted_weight(framework, model), tmp_path)
    loc = localize(layers, artifact_taps(fmt, bad, x), **FP32).to_json()
    assert loc["layer"] == PLANTED and loc["matched_by"] == BY.get((framework, fmt), "name"), loc
    names = [p["layer"] for p in loc["layers"]]
    before = names[:names.index(PLANTED)]
    assert all(p["max_abs"] <= p["allowed"] for p in loc["layers"] if p["layer"] in before and "max_abs" in p)
    assert one_line(loc, fmt).startswith(f"first diverges at {PLANTED} ({fmt} node ")


def test_a_layer_fused_away_is_listed_unmatched_never_guessed():
    ref = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    taps = [Tap("model/bn1/add", ref + 0.0, ("model/bn1/add",)), Tap("out", ref * 2, ("out",), is_output=True)]
    loc = localize([("conv1", ref), ("bn1", ref), ("head", ref * 2)], taps, **FP32).to_json()
    assert loc["unmatched"] == ["conv1"]
    assert [(p["layer"], p.get("node"), p["matched_by"]) for p in loc["layers"]] == [
        ("conv1", None, "unmatched"), ("bn1", "model/bn1/add", "name"), ("head", "out", "output")]


def test_an_nchw_tensor_is_compared_with_an_nhwc_layer_after_its_transpose():
    nhwc = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    taps = [Tap("m/conv/Conv", nhwc.transpose(0, 3, 1, 2).copy(), ("m/conv/Conv",))]
    pair = localize([("conv", nhwc)], taps, **FP32).pairs[0]
    assert pair.layout == "NCHW->NHWC" and pair.max_abs == 0.0


def test_without_names_a_layer_pairs_by_order_then_by_direction_and_else_stays_unmatched():
    a, b = np.ones((1, 4), np.float32), np.arange(6, dtype=np.float32).reshape(1, 6)
    c = np.array([[1, -1, 1, -1, 1]], np.float32)
    unnamed = [Tap("t0", a), Tap("t1", -b), Tap("t2", b * 3), Tap("t3", -c), Tap("t4", np.ones((1, 5), np.float32))]
    loc = localize([("dense", a), ("other", b), ("lost", c)], unnamed, **FP32).to_json()
    # t0 is the only tensor of 4; t2 points b's way (scaled wrong, still b's); neither t3 nor t4 points c's
    assert [(p["matched_by"], p.get("node")) for p in loc["layers"]] == [
        ("order", "t0"), ("value", "t2"), ("unmatched", None)]


def test_an_artifact_that_kept_names_never_pairs_a_fused_layer_by_its_values():
    x = np.ones((1, 4), np.float32)
    taps = [Tap("m/bn/add", x, ("m/bn/add",)), Tap("t", x)]
    loc = localize([("conv", x), ("bn", x)], taps, **FP32).to_json()
    assert loc["unmatched"] == ["conv"]


def test_the_first_layer_over_its_tolerance_is_named_not_the_largest_error():
    x = np.ones((1, 8), np.float32)
    taps = [Tap(f"m/l{i}/op", x + err, (f"m/l{i}/op",)) for i, err in enumerate((0.0, 0.01, 0.5))]
    loc = localize([(f"l{i}", x) for i in range(3)], taps, **FP32).to_json()
    assert loc["layer"] == "l1" and loc["max_abs"] == pytest.approx(0.01, rel=1e-3)


SPEC = """
[pipeline]
name = "strict"
seed = 0

[data]
source = "digits"
task = "classification"
test_fraction = 0.25

[train]
optimizer = "adam"
lr = 0.01
epochs = 3
batch_size = 64
loss = "sparse_categorical_crossentropy"

[[model]]
name = "keras"
framework = "keras"
factory = "pipeline.zoo:mlp_keras"
params = { hidden = 32 }

[[model]]
name = "torch"
framework = "torch"
factory = "pipeline.zoo:mlp_torch"
params = { hidden = 32 }

[export]
formats = ["saved_model", "onnx", "litert"]
litert_batch_sizes = [1, 16]

[parity]
held_out_rows = 32
random_rows = 16
input_range = [0.0, 1.0]
max_batch = 16

[parity.tolerances]   # float16 weights cannot meet this: the fp16 cells fail where the weights first act
litert-fp16 = { atol = 1e-7, rtol = 1e-7 }
"""


def test_a_failed_cell_of_a_run_names_its_first_diverging_layer_in_the_record_the_report_and_junit(tmp_path):
    import json
    import xml.etree.ElementTree as ET
    from tests.conftest import run_cli
    (tmp_path / "strict.toml").write_text(SPEC)
    r = run_cli("run", str(tmp_path / "strict.toml"), "--no-track", home=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    report_dir = next((tmp_path / ".pipeline" / "runs").glob("*/parity.json")).parent
    records = json.loads((report_dir / "parity.json").read_text())["records"]
    failed = {rec["label"]: rec for rec in records if rec["status"] == "failed"}
    assert set(failed) == {"keras/litert-fp16", "torch/litert-fp16"}, sorted(failed)
    # the first Dense (Keras names it dense) and the first Linear (module 1 of the Sequential) hold
    # the first float16 weights; Flatten before them computes exactly
    first = {"keras": "dense", "torch": "1"}
    for label, rec in failed.items():
        loc = rec["details"]["localization"]
        assert loc["layer"] == first[rec["model"]] and loc["matched_by"] == "name", loc
        assert f"first diverges at {loc['layer']} (litert node" in rec["message"]
    markdown = (report_dir / "parity.md").read_text()
    assert markdown.count("first diverges at") == 2 and "per layer, max abs / allowed" in markdown
    junit = ET.parse(report_dir / "junit.xml").getroot()
    assert sum("first diverges at" in f.get("message", "") for f in junit.iter("failure")) == 2
    assert (report_dir / "layers_keras.png").stat().st_size > 10_000
    assert "first diverges at dense" in r.stdout + r.stderr
    told = run_cli("explain", "--artifact", "keras/litert-fp16", home=tmp_path)  # the latest run, on demand
    assert told.returncode == 1 and told.stdout.startswith(
        "keras/litert-fp16 on litert-interpreter: first diverges at dense (litert node"), told.stdout + told.stderr
    assert "<- first diverges" in told.stdout and "torch/" not in told.stdout


@pytest.mark.parametrize("framework, fmt", [("keras", "onnx"), ("torch", "litert"), ("keras", "saved_model"),
                                            ("torch", "torchscript")])
def test_explain_names_a_planted_layer_of_any_artifact_and_its_repro_fails_until_the_weights_are_restored(
        made, tmp_path, framework, fmt):
    import subprocess
    import sys
    from tests.conftest import run_cli
    model, path, x = made[framework, fmt]
    original = tmp_path / ("cnn.keras" if framework == "keras" else "cnn.pt")
    model.save(original) if framework == "keras" else torch.save(model, original)
    np.savez(tmp_path / "rows.npz", x=x)
    weight = planted_weight(framework, model)
    bad = plant(path, weight, tmp_path / "planted")
    r = run_cli("explain", "--file", str(bad), "--model", str(original), "--example", str(tmp_path / "rows.npz"),
                "--out", str(tmp_path / "why"), home=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.startswith(f"first diverges at {PLANTED} ({fmt} node "), r.stdout
    assert "<- first diverges" in r.stdout and (tmp_path / "why" / "layers.png").is_file()
    repro = tmp_path / "why" / "repro"
    shown = subprocess.run([sys.executable, "repro.py"], cwd=repro, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 1 and "max abs" in shown.stdout, shown.stdout + shown.stderr
    if fmt == "onnx":  # the repro is the graph up to the diverging tensor, no further
        import onnx
        assert len(onnx.load(str(repro / "repro.onnx")).graph.node) < len(onnx.load(str(bad)).graph.node)
    if fmt != "saved_model":  # the planted weights put back inside the repro's own file: it passes
        piece = next(f for f in repro.iterdir() if f.suffix in (".onnx", ".tflite", ".pt"))
        fixed = plant_bytes(str(piece), weight * np.float32(1.5), tmp_path / "fixed", factor=1 / 1.5)
        shutil.copy2(fixed, piece)
        healed = subprocess.run([sys.executable, "repro.py"], cwd=repro, capture_output=True, text=True, timeout=300)
        assert healed.returncode == 0, healed.stdout + healed.stderr


def test_a_model_of_two_heads_names_each_output_s_own_first_divergence(tmp_path):
    import keras
    from exporters import onnx as onnx_format
    from frameworks import adapter
    from parity.compare import tolerance_for
    from pipeline.localization import localize_artifact
    keras.utils.set_random_seed(0)
    inp = keras.Input((6,), name="x")
    trunk = keras.layers.Dense(8, activation="relu", name="trunk")(inp)
    head_a = keras.layers.Dense(3, name="head_a")(trunk)
    head_b = keras.layers.Dense(2, name="head_b")(keras.layers.Dense(4, activation="relu", name="b_hidden")(trunk))
    model = keras.Model(inp, {"a": head_a, "b": head_b})
    x = np.random.default_rng(0).normal(size=(6, 6)).astype(np.float32)
    path = onnx_format.export(model, framework="keras", name="two", example=x, out_dir=tmp_path / "onnx")[0].path
    bad = plant(path, np.asarray(model.get_layer("b_hidden").kernel), tmp_path / "planted")
    loc = localize_artifact(adapter("keras"), lambda: model, "onnx", str(bad), x, tolerance_for("fp32", "onnx"))
    assert loc["layer"] == "b_hidden", loc
    assert loc["outputs"]["head_b"]["layer"] == "b_hidden"
    assert "layer" not in loc["outputs"]["head_a"] and "exceeds" in loc["outputs"]["head_a"]["note"]


def test_explain_refuses_a_model_file_that_holds_no_model_and_names_it(tmp_path):
    from tests.conftest import run_cli
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    (tmp_path / "model.onnx").write_bytes(b"")
    np.savez(tmp_path / "rows.npz", x=np.zeros((2, 3), np.float32))
    r = run_cli("explain", "--file", "model.onnx", "--model", "broken.keras", "--example", "rows.npz", home=tmp_path)
    assert r.returncode == 2 and "--model broken.keras" in r.stderr and "keras.models.load_model failed" in r.stderr, \
        r.stdout + r.stderr
