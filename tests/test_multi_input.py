"""Models of several named inputs: integer token ids and an attention mask, read from one npz, drawn
in their own kinds of values for the parity set, and fed to each artifact by name."""
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import parity_inputs
from pipeline.spec import load

from .conftest import run_cli

MODELS = '''
import torch
import torch.nn as nn


class Bag(nn.Module):
    """Token ids and an attention mask in, a score out: embedding, masked mean, linear."""
    def __init__(self, vocab, n_outputs):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.out = nn.Linear(8, n_outputs)

    def forward(self, input_ids, attention_mask):
        m = attention_mask.unsqueeze(-1).to(torch.float32)
        return self.out((self.emb(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0))


def bag(input_shape, n_outputs, vocab=50, **_):
    assert set(input_shape) == {"input_ids", "attention_mask"}, input_shape
    return Bag(vocab, n_outputs)
'''

KERAS_MODELS = '''
import keras
from keras import layers, ops


def bag(input_shape, n_outputs, vocab=50, **_):
    """The same model as a Keras functional model of two named integer inputs."""
    ids = keras.Input(input_shape["input_ids"], dtype="int64", name="input_ids")
    mask = keras.Input(input_shape["attention_mask"], dtype="int64", name="attention_mask")
    m = ops.expand_dims(ops.cast(mask, "float32"), -1)
    pooled = ops.sum(layers.Embedding(vocab, 8)(ids) * m, axis=1) / ops.maximum(ops.sum(m, axis=1), 1.0)
    return keras.Model({"input_ids": ids, "attention_mask": mask}, layers.Dense(n_outputs)(pooled))
'''

SPEC = '''
[pipeline]
name = "tokens"
[data]
source = "npz"
path = "tokens.npz"
inputs = ["input_ids", "attention_mask"]
task = "regression"
test_fraction = 0.2
[train]
optimizer = "adam"
lr = 0.01
epochs = 30
batch_size = 32
loss = "mse"
[[model]]
name = "bag"
framework = "torch"
factory = "token_models:bag"
[[model]]
name = "kbag"
framework = "keras"
factory = "keras_token_models:bag"
[export]
formats = ["onnx", "torchscript", "saved_model", "litert", "tfjs"]
'''


def token_data(folder: Path, n=200, width=12) -> None:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(n, width)).astype(np.int64)
    mask = (np.arange(width) < rng.integers(3, width + 1, size=(n, 1))).astype(np.int64)
    y = ((ids * mask).sum(1) / mask.sum(1) / 50.0).astype(np.float32)
    np.savez(folder / "tokens.npz", input_ids=ids, attention_mask=mask, y=y)
    (folder / "token_models.py").write_text(MODELS)
    (folder / "keras_token_models.py").write_text(KERAS_MODELS)
    (folder / "tokens.toml").write_text(SPEC)


def test_each_input_is_drawn_in_its_own_kind_of_values(tmp_path):
    token_data(tmp_path)
    spec = load(str(tmp_path / "tokens.toml"))
    from pipeline.data import load_arrays
    arrays = load_arrays(spec)
    ps = parity_inputs(spec, arrays)
    ids, mask, kind = ps["x"]["input_ids"], ps["x"]["attention_mask"], ps["kind"]
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and len(ids) == len(mask) == len(kind)
    assert ids.min() >= 0 and ids.max() <= 49 and len(np.unique(ids[kind == 1])) > 20  # ids from the ids' range
    drawn = mask[kind == 1]
    assert set(np.unique(drawn)) == {0, 1} and (np.diff(drawn, axis=1) <= 0).all()   # real padding: ones, then zeros
    assert len({int(r.sum()) for r in drawn}) > 3                                      # of many lengths
    assert mask[kind == 2].tolist()[0] == [1] * 12 and mask[kind == 2].tolist()[1] == [1] + [0] * 11


def test_a_rows_mismatch_between_inputs_is_refused(tmp_path):
    from pipeline.data import DataError, checked_arrays
    with pytest.raises(DataError, match="same number of rows, found 'a' 3, 'b' 4"):
        checked_arrays({"a": np.zeros((3, 2), np.int64), "b": np.zeros((4, 2))}, np.zeros(3), "regression", "t.npz")


@pytest.mark.e2e
def test_two_input_models_are_trained_exported_and_verified_by_name(tmp_path):
    """One run, two frameworks, each model through every format (PyTorch's SavedModel by onnx2tf, its
    LiteRT by litert-torch, which names the inputs args_0, args_1 by the forward's order)."""
    token_data(tmp_path)
    r = run_cli("run", str(tmp_path / "tokens.toml"), "--no-track", home=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(sorted((tmp_path / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    assert rec["models"]["bag"]["metrics"]["mse"] < 0.02 and rec["models"]["kbag"]["metrics"]["mse"] < 0.02
    parity = json.loads((Path(rec["report_dir"]) / "parity.json").read_text())
    by_label = {x["label"]: x for x in parity["records"]}
    cells = [f"{m}/{f}" for m in ("bag", "kbag") for f in ("onnx", "torchscript", "saved_model", "litert", "tfjs")]
    for label in cells:
        assert by_label[label]["status"] == "passed", by_label[label]["message"]
        assert "input_ids -> " in by_label[label]["details"]["mapping"]
        assert "attention_mask -> " in by_label[label]["details"]["mapping"]
    assert "input_ids -> args_0" in by_label["bag/litert"]["details"]["mapping"]
    assert "input_ids -> input_ids" in by_label["kbag/onnx"]["details"]["mapping"]
    assert parity["discrimination"]["bag"]["discriminative"] and parity["discrimination"]["kbag"]["discriminative"]


def test_a_stated_range_and_dtype_replace_what_the_data_shows(tmp_path):
    """[parity.inputs.<name>]: ids drawn from the whole vocabulary, not just the ids the data happens to hold."""
    token_data(tmp_path)
    spec_file = tmp_path / "tokens.toml"
    spec_file.write_text(SPEC + '[parity.inputs.input_ids]\nrange = [0, 999]\ndtype = "int32"\n')
    spec = load(str(spec_file))
    from pipeline.data import load_arrays
    ps = parity_inputs(spec, load_arrays(spec))
    ids, kind = ps["x"]["input_ids"], ps["kind"]
    assert ids.dtype == np.int32 and ids[kind == 1].max() > 100 and ids.max() <= 999
    assert ps["x"]["attention_mask"].dtype == np.int64  # the other input as the data has it


@pytest.mark.parametrize("table, words", [
    ("[parity.inputs.tokens]\nrange = [0, 9]\n", "parity.inputs.tokens: expected one of the data's inputs"),
    ("[parity.inputs.input_ids]\nrange = [9, 0]\n", "parity.inputs.input_ids.range: expected [low, high]"),
    ("[parity.inputs.input_ids]\ndtype = \"complex\"\n", "parity.inputs.input_ids.dtype: expected a dtype among"),
])
def test_a_bad_parity_input_table_names_the_key(tmp_path, table, words):
    from pipeline.spec import SpecError
    token_data(tmp_path)
    (tmp_path / "tokens.toml").write_text(SPEC + table)
    with pytest.raises(SpecError, match=words.replace("[", r"\[")):
        load(str(tmp_path / "tokens.toml"))


def test_a_folder_of_npy_files_is_data_too(tmp_path):
    from pipeline.data import load_arrays
    token_data(tmp_path)
    folder = tmp_path / "tokens"
    folder.mkdir()
    with np.load(tmp_path / "tokens.npz") as f:
        for k in f.files:
            np.save(folder / f"{k}.npy", f[k])
    (tmp_path / "tokens.toml").write_text(SPEC.replace('path = "tokens.npz"', 'path = "tokens"'))
    arrays = load_arrays(load(str(tmp_path / "tokens.toml")))
    assert arrays["x_train"]["input_ids"].dtype == np.int64 and len(arrays["y_train"]) == 160
