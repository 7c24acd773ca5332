"""When a format's first converter fails, the next route is tried and recorded with why the first was
left; with no route left, the error names each one. Exporters called in-process on small models."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from exporters import onnx as onnx_format
from exporters import saved_model, torchscript
from exporters.base import ExportError


def _normalized_dense(folder: Path, keep_as: str | None = None):
    """tests/zoo.py's keras_normalized model: tf2onnx makes its Normalization's constants graph inputs."""
    import keras

    from .zoo import keras_normalized
    path = keras_normalized(folder)[0]
    if keep_as:
        path = path.rename(folder / keep_as)
    return keras.saving.load_model(str(path))


ROWS = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)


def test_keras_onnx_with_captured_constants_is_made_again_from_the_frozen_graph(tmp_path):
    import onnxruntime as ort
    model = _normalized_dense(tmp_path)
    model(ROWS)  # Keras exports only a model that has been called
    # the first route's file is what the check refuses: its graph wants the captured tensors fed
    model.export(str(tmp_path / "plain.onnx"), format="onnx", verbose=False)
    why = onnx_format._extra_graph_inputs(tmp_path / "plain.onnx", 1)
    assert why and "takes 3 inputs where the model takes 1" in why and "normalization" in why

    art, = onnx_format.export(model, framework="keras", name="norm", example={"features": ROWS},
                              out_dir=tmp_path / "out", upstream={}, options={})
    assert art.details["route_taken"] == "tf2onnx on the frozen graph" and "(the first route failed)" in art.route
    assert art.details["routes_left"][0]["why"] == why
    session = ort.InferenceSession(art.path)
    assert [i.name for i in session.get_inputs()] == ["features"]
    got = session.run(None, {"features": ROWS})[0]
    assert np.max(np.abs(got - np.asarray(model(ROWS)))) < 1e-5
    assert onnx_format._extra_graph_inputs(art.path, 1) is None


def test_a_kept_keras_file_reaches_torchscript_through_keras_on_torch_when_onnx_is_missing(tmp_path):
    trained = tmp_path / "train"
    trained.mkdir()
    model = _normalized_dense(trained, keep_as="pretrained.keras")
    want = np.asarray(model(ROWS))
    art, = torchscript.export(None, framework="keras", name="norm", example=ROWS, out_dir=tmp_path / "ts",
                              upstream={}, options={"trained_dir": str(trained)}, expected=want)
    assert art.details["route_taken"] == "keras on torch" and art.batch_sizes is None
    assert "onnx" in art.details["routes_left"][0]["why"].lower()
    runner = torchscript.load(art)
    got = runner.infer({runner.signature.input_names[0]: ROWS})
    assert np.max(np.abs(next(iter(got.values())) - want)) < 1e-5
    # a model kept as weights for its factory has no file for that route: the first route's words stand
    with pytest.raises(ExportError, match="onnx"):
        torchscript.export(None, framework="keras", name="norm", example=ROWS, out_dir=tmp_path / "ts2",
                           upstream={}, options={"trained_dir": str(tmp_path)}, expected=want)


def test_a_torch_module_without_its_onnx_file_reaches_saved_model_through_nobuco(tmp_path):
    import keras
    import torch
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.LayerNorm(8)).eval()
    with torch.no_grad():
        want = module(torch.from_numpy(ROWS)).numpy()
    art, = saved_model.export(None, framework="torch", name="mlp", example=ROWS, out_dir=tmp_path / "sm",
                              upstream={"onnx": []}, options={"load_model": lambda: module}, expected=want)
    assert art.details["route_taken"] == "nobuco" and art.batch_sizes is None
    assert "could not be made" in art.details["routes_left"][0]["why"]
    assert keras.__version__.startswith("3.")  # nobuco's Keras 2 alias is gone after its import
    runner = saved_model.load(art)
    got = runner.infer({runner.signature.input_names[0]: ROWS[:5]})
    assert np.max(np.abs(next(iter(got.values())) - want[:5])) < 1e-5
    # no module to convert and no ONNX file: nothing to try, said so
    with pytest.raises(ExportError, match="expected upstream\\['onnx'\\]"):
        saved_model.export(None, framework="torch", name="mlp", example=ROWS, out_dir=tmp_path / "sm2",
                           upstream={"onnx": []}, options={}, expected=want)


def test_a_transformers_folder_missing_weights_is_kept_whole_so_every_load_is_the_same(tmp_path):
    """A ViT saved without its pooler: transformers makes up the pooler on every load (here: whatever the
    memory held, NaN included), so the train stage keeps the model it loaded, weights and all."""
    import torch
    from transformers import ViTConfig, ViTModel

    from frameworks.torch import NEWLY_INITIALIZED, Adapter, hugging_face
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=16)
    ViTModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    x = torch.from_numpy(np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32))
    first = hugging_face(tmp_path / "vit", "test")
    assert getattr(first, NEWLY_INITIALIZED) == ["pooler.dense.bias", "pooler.dense.weight"]
    (tmp_path / "kept").mkdir()
    note = Adapter().save_pretrained(first, tmp_path / "kept", tmp_path / "vit")
    assert note and "pooler.dense" in note
    reloaded = hugging_face(tmp_path / "kept" / "pretrained", "test")
    assert getattr(reloaded, NEWLY_INITIALIZED) == []
    with torch.no_grad():
        assert np.array_equal(reloaded(x).pooler_output.numpy(), first(x).pooler_output.numpy(), equal_nan=True)
    # a complete folder is copied as it is, with nothing to say
    (tmp_path / "again").mkdir()
    assert Adapter().save_pretrained(reloaded, tmp_path / "again", tmp_path / "kept" / "pretrained") is None
