"""Targets and inputs are checked and brought to one shape at the data stage; `validate` catches what a
run would trip over (labels, a missing factory function, a missing file, a model that does not take
the data) with one clear line and exit code 2."""
import numpy as np
import pytest

from pipeline.data import DataError, checked_arrays

from .conftest import run_cli


def test_regression_targets_become_rows_of_outputs():
    x, y = checked_arrays(np.arange(6.0), np.arange(6), "regression", "d.npz")
    assert x.shape == (6, 1) and x.dtype == np.float32
    assert y.shape == (6, 1) and y.dtype == np.float32
    _, y2 = checked_arrays(np.zeros((4, 3)), np.zeros((4, 2, 2)), "regression", "d.npz")
    assert y2.shape == (4, 4)


@pytest.mark.parametrize("y", [np.array([0, 1, 2, 1]), np.array([[0], [1], [2], [1]]),
                               np.array([0.0, 1.0, 2.0, 1.0]), np.array([True, False, True, True])])
def test_classification_labels_become_int64_class_ids(y):
    _, out = checked_arrays(np.zeros((4, 2)), y, "classification", "d.npz")
    assert out.shape == (4,) and out.dtype == np.int64


@pytest.mark.parametrize("y, task, words", [
    (np.array(["cat", "dog", "cat", "dog"]), "classification", ["'y'", "class ids", "<U3"]),
    (np.array([0.5, 1.0, 2.0, 1.0]), "classification", ["fractional", "row 0", "regression"]),
    (np.array([0, -1, 2, 1]), "classification", ["0..K-1", "row 1"]),
    (np.eye(4), "classification", ["one class id per row", "(4, 4)", "argmax"]),
    (np.array(["1.0", "2.0", "3", "4"]), "regression", ["expected numbers", "<U3"]),
    (np.zeros(3), "regression", ["expected 4 rows", "(3,)"]),
])
def test_bad_targets_are_refused_with_the_array_what_was_found_and_what_was_expected(y, task, words):
    with pytest.raises(DataError) as e:
        checked_arrays(np.zeros((4, 2)), y, task, "/data/d.npz")
    assert str(e.value).startswith("/data/d.npz: array 'y':")
    for w in words:
        assert w in str(e.value)


SPEC = """
[pipeline]
name = "labels"
[data]
source = "npz"
path = "{path}"
task = "{task}"
[train]
optimizer = "sgd"
lr = 0.1
epochs = 200
loss = "{loss}"
[[model]]
name = "net"
framework = "torch"
factory = "{factory}"
[export]
formats = ["onnx"]
"""

MODELS = """
import torch.nn as nn

def linear(input_shape, n_outputs, **_):
    return nn.Linear(input_shape[-1], n_outputs)

def wide(input_shape, n_outputs, **_):
    return nn.Linear(7, n_outputs)  # ignores the data's input shape
"""


def write_spec(tmp_path, x, y, task="regression", factory="my_models:linear", path="data.npz"):
    (tmp_path / "my_models.py").write_text(MODELS)
    if x is not None:
        np.savez(tmp_path / "data.npz", x=x, y=y)
    loss = "mse" if task == "regression" else "sparse_categorical_crossentropy"
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(path=path, task=task, loss=loss, factory=factory))
    return spec


def assert_usage_error(r, *words):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


@pytest.mark.cli
@pytest.mark.parametrize("command", [["validate", "--quick"], ["run", "--no-track"]])
def test_string_labels_exit_2_from_validate_and_run(tmp_path, command):
    spec = write_spec(tmp_path, np.zeros((20, 2)), np.array(["a", "b"] * 10), task="classification")
    r = run_cli(command[0], str(spec), *command[1:], home=tmp_path)
    assert_usage_error(r, "data.npz: array 'y'", "class ids")


@pytest.mark.cli
def test_validate_names_a_missing_factory_function(tmp_path):
    spec = write_spec(tmp_path, np.zeros((20, 1)), np.zeros(20), factory="my_models:nowhere")
    assert_usage_error(run_cli("validate", "--quick", str(spec), home=tmp_path),
                       "model[0].factory", "a function 'nowhere'")


@pytest.mark.cli
def test_validate_names_a_missing_npz_file(tmp_path):
    spec = write_spec(tmp_path, None, None, path="missing.npz")
    assert_usage_error(run_cli("validate", "--quick", str(spec), home=tmp_path), "data.path", "missing.npz")


@pytest.mark.cli
def test_validate_builds_each_model_and_names_an_input_shape_mismatch(tmp_path):
    spec = write_spec(tmp_path, np.zeros((20, 3)), np.zeros(20), factory="my_models:wide")
    r = run_cli("validate", str(spec), home=tmp_path)
    assert_usage_error(r, "model net (torch)", "(batch, 3)")
    good = write_spec(tmp_path, np.zeros((20, 3)), np.zeros(20))
    ok = run_cli("validate", str(good), home=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "input (3,)" in ok.stdout


@pytest.mark.e2e
def test_one_dimensional_regression_targets_train_like_two_dimensional_ones(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 1)).astype(np.float32)
    y = (3 * x[:, 0] + 2 + rng.normal(0, 0.1, 200)).astype(np.float32)  # shape (200,)
    spec = write_spec(tmp_path, x, y)
    r = run_cli("run", str(spec), "--no-track", home=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    import json
    rec = json.loads(sorted((tmp_path / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    assert rec["models"]["net"]["metrics"]["mse"] < 0.05  # broadcasting [N] against [N, 1] gave about 5


def test_torch_classifier_with_logits_is_trained_as_logits():
    import torch.nn as nn
    from frameworks.torch import Adapter as TorchAdapter
    from pipeline.spec import TrainSettings
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0).astype(np.int64)
    settings = TrainSettings("adam", 0.05, 60, None, "sparse_categorical_crossentropy", False, 1)
    fw = TorchAdapter()
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))  # no softmax: logits
    losses = fw.train(model, settings, x, y, seed=0).loss
    assert fw.output_kind == "logits"
    assert 0 < losses[-1] < 0.5 < losses[0]  # a real cross-entropy, falling (clamped log gave nonsense)
    assert (fw.predict(model, x).argmax(1) == y).mean() > 0.9


def test_one_row_is_data_and_a_scalar_is_not():
    x, y = checked_arrays(np.zeros((1, 2)), np.zeros(1), "regression", "d.npz")
    assert x.shape == (1, 2) and y.shape == (1, 1)
    with pytest.raises(DataError, match="array 'x': expected one row per sample, found shape \\(\\)"):
        checked_arrays(np.float32(1.0), np.zeros(1), "regression", "d.npz")
