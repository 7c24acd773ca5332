"""ONNX exporter: real exports of both test models from both frameworks, run in onnxruntime."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from exporters import onnx as onnx_format
from exporters.base import Artifact, ArtifactLoadError, ExportError, RunnerClosed
from parity.signature import InputMismatch

from .models import SHAPES, fails_parity, inputs, keras_model, reference, torch_model

ATOL = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(framework, kind) -> (model, artifact), exported once for the module."""
    import torch

    torch.set_num_threads(1)
    out = {}
    for framework, build in (("keras", keras_model), ("torch", torch_model)):
        for kind in SHAPES:
            model = build(kind)
            d = tmp_path_factory.mktemp(f"onnx-{framework}-{kind}")
            arts = onnx_format.export(model, framework=framework, name=f"{kind}-{framework}",
                                      example=inputs(kind, 4, 0), out_dir=d, upstream={}, options={})
            assert len(arts) == 1
            out[framework, kind] = model, arts[0]
    return out


CASES = [(f, k) for f in ("keras", "torch") for k in SHAPES]


@pytest.mark.parametrize("framework,kind", CASES)
def test_parity_at_batch_1_and_16(exported, framework, kind):
    model, art = exported[framework, kind]
    runner = onnx_format.load(art)
    try:
        assert runner.runtime == "onnxruntime-cpu"
        for n, seed in ((1, 11), (16, 12)):
            x = inputs(kind, n, seed)
            want, got = reference(framework, model, x), runner(x)
            assert got.shape == want.shape
            err = float(np.max(np.abs(got - want)))
            assert err <= ATOL, f"{art.label} batch {n}: max abs {err:.3g} > {ATOL}"
        # the check is only meaningful if the outputs move with the inputs
        assert float(np.ptp(reference(framework, model, inputs(kind, 16, 12)), axis=0).max()) > 1e-2
    finally:
        runner.close()


@pytest.mark.parametrize("framework,kind", CASES)
def test_artifact_declares_dynamic_batch_and_names(exported, framework, kind):
    _, art = exported[framework, kind]
    assert art.format == "onnx" and art.variant == "fp32" and art.framework == framework
    assert art.batch_sizes is None
    assert isinstance(art.details["batch_dim"], str) and art.details["batch_dim"]
    assert art.details["input_shape"][1:] == list(SHAPES[kind])
    assert art.details["input_name"] and art.details["output_names"]
    assert art.size_bytes > 0 and art.path.endswith("model.onnx")
    versions = art.details["versions"]
    assert versions["onnx"] and (versions.get("tf2onnx") if framework == "keras" else versions.get("torch"))
    runner = onnx_format.load(art)
    assert runner.signature.input_names == [art.details["input_name"]]
    assert runner.signature.output_names == art.details["output_names"]
    with pytest.raises(InputMismatch, match=f"input '{art.details['input_name']}': expected"):
        runner(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(InputMismatch, match="missing .* and unknown 'nope'"):
        runner.infer({"nope": np.zeros((2, *SHAPES[kind]), np.float32)})
    runner.close()
    with pytest.raises(RunnerClosed):
        runner(np.zeros((2, *SHAPES[kind]), np.float32))


@pytest.mark.parametrize("framework,kind", CASES)
def test_tampered_weight_changes_outputs(exported, framework, kind, tmp_path):
    import onnx
    from onnx import numpy_helper

    model, art = exported[framework, kind]
    proto = onnx.load(art.path)
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    target = max(floats, key=lambda t: int(np.prod(t.dims)))  # a weight matrix, not a shape constant
    w = numpy_helper.to_array(target).copy()
    w.flat[0] += 1.0                                         # one weight
    target.CopyFrom(numpy_helper.from_array(w, target.name))
    bad = tmp_path / "model.onnx"
    onnx.save(proto, str(bad))
    runner = onnx_format.load(dataclasses.replace(art, path=str(bad), size_bytes=bad.stat().st_size))
    x = inputs(kind, 16, 12)
    task = "regression" if kind == "toy" else "classification"
    assert "max abs error" in fails_parity(reference(framework, model, x), runner(x), "fp32", "onnx", task)


@pytest.mark.parametrize("framework,kind", [("keras", "toy"), ("torch", "digits")])
def test_truncated_file_raises_artifact_load_error(exported, framework, kind, tmp_path):
    _, art = exported[framework, kind]
    data = open(art.path, "rb").read()
    cut = tmp_path / "model.onnx"
    cut.write_bytes(data[: len(data) // 2])
    # the recorded size catches it first ...
    with pytest.raises(ArtifactLoadError, match="truncated"):
        onnx_format.load(dataclasses.replace(art, path=str(cut)))
    # ... and without a recorded size onnxruntime's rejection is reported the same way
    with pytest.raises(ArtifactLoadError, match="corrupt or truncated"):
        onnx_format.load(dataclasses.replace(art, path=str(cut), size_bytes=0))
    with pytest.raises(ArtifactLoadError, match="found nothing"):
        onnx_format.load(dataclasses.replace(art, path=str(tmp_path / "missing.onnx")))


def test_unknown_framework_is_refused(tmp_path):
    with pytest.raises(ExportError, match="no route for models of the 'mxnet' family"):
        onnx_format.export(object(), framework="mxnet", name="m", example=np.zeros((1, 1), np.float32),
                           out_dir=tmp_path, upstream={}, options={})


def test_manifest_round_trip(exported, tmp_path):
    _, art = exported["torch", "toy"]
    again = Artifact.from_json(art.to_json())
    assert again == art


def test_fixed_batch_graph_is_run_in_padded_chunks(tmp_path):
    """An ONNX file with a fixed batch (as some converters write) still serves any batch size."""
    import torch

    model = torch_model("digits")
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (torch.from_numpy(inputs("digits", 3, 0)),), str(path), dynamo=True,
                      external_data=False, verbose=False)
    art = Artifact(model="digits-torch", format="onnx", variant="fp32", path=str(path), framework="torch",
                   route="torch.onnx.export(dynamo=True, static)", batch_sizes=[3], size_bytes=path.stat().st_size)
    runner = onnx_format.load(art)
    assert runner.input_shape[0] == 3
    # remainders of 1 and 2 rows: with one row, the padding equals it, so only 2+ shows a wrong slice
    for n in (1, 3, 5, 7, 8):
        x = inputs("digits", n, 20 + n)
        assert float(np.max(np.abs(runner(x) - reference("torch", model, x)))) <= ATOL
