"""TorchScript exporter: torch models traced directly; Keras models via their ONNX artifact and onnx2fx."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from exporters import onnx as onnx_format
from exporters import torchscript
from exporters.base import ArtifactLoadError, ExportError

from .models import SHAPES, fails_parity, inputs, keras_model, reference, torch_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(framework, kind) -> (model, artifact), exported once for the module (Keras through ONNX first)."""
    import torch

    torch.set_num_threads(1)
    out = {}
    for framework, build in (("keras", keras_model), ("torch", torch_model)):
        for kind in SHAPES:
            model, name, example = build(kind), f"{kind}-{framework}", inputs(kind, 4, 0)
            upstream = {}
            if framework == "keras":
                upstream["onnx"] = onnx_format.export(model, framework=framework, name=name, example=example,
                                                      out_dir=tmp_path_factory.mktemp("onnx"), upstream={},
                                                      options={})
            arts = torchscript.export(model, framework=framework, name=name, example=example,
                                      out_dir=tmp_path_factory.mktemp(f"ts-{framework}-{kind}"),
                                      upstream=upstream, options={})
            assert len(arts) == 1
            out[framework, kind] = model, arts[0]
    return out


CASES = [(f, k) for f in ("keras", "torch") for k in SHAPES]


@pytest.mark.parametrize("framework,kind", CASES)
def test_parity_at_batch_1_and_16(exported, framework, kind):
    model, art = exported[framework, kind]
    runner = torchscript.load(art)
    try:
        assert runner.runtime == "torch-jit"
        for n, seed in ((1, 11), (16, 12)):
            x = inputs(kind, n, seed)
            want, got = reference(framework, model, x), runner(x)
            assert isinstance(got, np.ndarray) and got.shape == want.shape
            err = float(np.max(np.abs(got - want)))
            assert err <= ATOL, f"{art.label} batch {n}: max abs {err:.3g} > {ATOL}"
        # the check is only meaningful if the outputs move with the inputs
        assert float(np.ptp(reference(framework, model, inputs(kind, 16, 12)), axis=0).max()) > 1e-2
    finally:
        runner.close()


@pytest.mark.parametrize("framework,kind", CASES)
def test_artifact_record(exported, framework, kind):
    _, art = exported[framework, kind]
    assert art.format == "torchscript" and art.variant == "fp32" and art.path.endswith("model.pt")
    assert art.batch_sizes is None, art.details  # the traced graph was probed at other batch sizes
    assert art.size_bytes > 0 and art.details["graph_inputs"]
    if framework == "keras":
        assert "onnx2fx" in art.route and art.details["versions"]["onnx2fx"]
        assert art.details["onnx_input_name"] and art.details["onnx_output_names"]
        assert art.details["export_check_max_abs_vs_keras"] <= ATOL
    else:
        assert art.route == "torch.jit.trace"


@pytest.mark.parametrize("framework,kind", CASES)
def test_tampered_weight_changes_outputs(exported, framework, kind, tmp_path):
    import torch

    model, art = exported[framework, kind]
    module = torch.jit.load(art.path, map_location="cpu")
    floats = [t for t in module.state_dict().values() if t.is_floating_point()]
    target = max(floats, key=lambda t: t.numel())     # a weight matrix, not a shape constant
    with torch.no_grad():
        target.view(-1)[0] += 1.0                     # one weight, changed in place inside the module
    bad = tmp_path / "model.pt"
    torch.jit.save(module, str(bad))
    runner = torchscript.load(dataclasses.replace(art, path=str(bad), size_bytes=bad.stat().st_size))
    x = inputs(kind, 16, 12)
    task = "regression" if kind == "toy" else "classification"
    assert "max abs error" in fails_parity(reference(framework, model, x), runner(x), "fp32", "torchscript", task)


@pytest.mark.parametrize("framework,kind", [("keras", "digits"), ("torch", "toy")])
def test_truncated_file_raises_artifact_load_error(exported, framework, kind, tmp_path):
    _, art = exported[framework, kind]
    data = open(art.path, "rb").read()
    cut = tmp_path / "model.pt"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(ArtifactLoadError, match="truncated"):
        torchscript.load(dataclasses.replace(art, path=str(cut)))
    with pytest.raises(ArtifactLoadError, match="corrupt or truncated"):
        torchscript.load(dataclasses.replace(art, path=str(cut), size_bytes=0))
    with pytest.raises(ArtifactLoadError, match="found nothing"):
        torchscript.load(dataclasses.replace(art, path=str(tmp_path / "missing.pt")))


def test_keras_route_needs_the_onnx_artifact(tmp_path):
    with pytest.raises(ExportError, match="upstream\\['onnx'\\]"):
        torchscript.export(keras_model("toy"), framework="keras", name="toy-keras",
                           example=inputs("toy", 2, 0), out_dir=tmp_path, upstream={}, options={})


def test_example_inputs_are_not_stored_in_the_archive(exported):
    import zipfile

    _, art = exported["torch", "digits"]
    assert not any("traced_inputs" in n for n in zipfile.ZipFile(art.path).namelist())


def test_batch_bound_trace_falls_back_to_script(tmp_path):
    import torch

    class BatchBound(torch.nn.Module):   # int(x.shape[0]) becomes a constant in a trace
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(x.reshape(int(x.shape[0]), 64))

    torch.manual_seed(0)
    model = BatchBound().eval()
    art = torchscript.export(model, framework="torch", name="bound", example=inputs("digits", 4, 0),
                             out_dir=tmp_path, upstream={}, options={})[0]
    assert art.route == "torch.jit.script" and art.batch_sizes is None
    assert "traced at 4" in art.details["trace_batch_problem"]
    runner = torchscript.load(art)
    for n in (1, 9):
        x = inputs("digits", n, n)
        assert float(np.max(np.abs(runner(x) - reference("torch", model, x)))) <= ATOL


def test_keras_cnn_with_batch_bound_graph_is_run_in_padded_chunks(tmp_path):
    """tf2onnx computes the Flatten shape from the input; onnx2fx + trace bakes it to the example batch.
    The artifact says so (batch_sizes=[4]) and the runner still serves any batch size exactly."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    example = inputs("digits", 4, 0)[..., None]
    onnx_arts = onnx_format.export(model, framework="keras", name="cnn", example=example,
                                   out_dir=tmp_path / "onnx", upstream={}, options={})
    art = torchscript.export(model, framework="keras", name="cnn", example=example, out_dir=tmp_path / "ts",
                             upstream={"onnx": onnx_arts}, options={})[0]
    assert art.batch_sizes == [4] and "padded chunks" in art.details["batch_note"]
    runner = torchscript.load(art)
    for n in (1, 4, 6, 7, 9):  # remainders of 2 and 3 rows catch a padded chunk sliced from the wrong end
        x = inputs("digits", n, n)[..., None]
        assert float(np.max(np.abs(runner(x) - np.asarray(model(x))))) <= ATOL
