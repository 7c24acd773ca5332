"""SavedModel exporter: Keras writes it itself, PyTorch goes ONNX -> onnx2tf; run through TensorFlow."""
from __future__ import annotations

import dataclasses
import hashlib
import shutil

import numpy as np
import pytest

from exporters import saved_model
from exporters.base import Artifact, ArtifactLoadError, ExportError

from .models import SHAPES, fails_parity, first_weight, inputs, keras_model, reference, torch_model

ATOL = 1e-5
CASES = [(f, k) for f in ("keras", "torch") for k in SHAPES]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(framework, kind) -> (model, artifact, onnx artifact or None), exported once for the module.

    ONNX_SHA[(framework, kind)] holds the upstream ONNX file's hash taken before the SavedModel export."""
    import torch

    from exporters import onnx as onnx_format

    torch.set_num_threads(1)
    out = {}
    for framework, build in (("keras", keras_model), ("torch", torch_model)):
        for kind in SHAPES:
            model = build(kind)
            name = f"{kind}-{framework}"
            example = inputs(kind, 8, 0)
            upstream = {}
            if framework == "keras":
                model(example)  # Keras ONNX export refuses a model that has never been called
            else:
                upstream["onnx"] = onnx_format.export(model, framework=framework, name=name, example=example,
                                                      out_dir=tmp_path_factory.mktemp(f"onnx-{name}"),
                                                      upstream={}, options={})
                ONNX_SHA[framework, kind] = sha256(upstream["onnx"][0].path)
            arts = saved_model.export(model, framework=framework, name=name, example=example,
                                      out_dir=tmp_path_factory.mktemp(f"sm-{name}"), upstream=upstream, options={})
            assert len(arts) == 1
            out[framework, kind] = model, arts[0], (upstream.get("onnx") or [None])[0]
    return out


ONNX_SHA: dict = {}


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def copy_artifact(art: Artifact, dst) -> Artifact:
    shutil.copytree(art.path, dst)
    return dataclasses.replace(art, path=str(dst), details=dict(art.details))


@pytest.mark.parametrize("framework,kind", CASES)
def test_parity_any_batch(exported, framework, kind):
    model, art, _ = exported[framework, kind]
    assert (art.format, art.variant, art.framework) == ("saved_model", "fp32", framework)
    assert art.batch_sizes is None, "the serving signature should keep a dynamic batch"
    assert art.details["signature"] == "serving_default"
    assert art.details["input_name"] and art.details["output_name"]
    assert art.details["versions"]["tensorflow"]
    assert art.size_bytes > 0
    runner = saved_model.load(art)
    try:
        assert runner.runtime == "tensorflow"
        for i, n in enumerate((1, 16, 5)):
            x = inputs(kind, n, seed=10 + i)
            ref = reference(framework, model, x)
            got = runner(x)
            assert got.shape == ref.shape
            err = float(np.max(np.abs(got - ref)))
            assert err <= ATOL, f"{art.label} batch {n}: max abs error {err:.3g} > {ATOL}"
        ref = reference(framework, model, inputs(kind, 16, 99))
        assert float(ref.std(axis=0).max()) > 1e-2, "outputs should vary with inputs"
    finally:
        runner.close()


def test_torch_digits_layout_measured(exported):
    """onnx2tf may make a channels-first input channels-last; the exporter measures which one it wants."""
    model, art, _ = exported["torch", "digits"]
    checks = art.details["layout_check_max_abs"]
    assert set(checks) == {"as-trained", "channels-last"}
    if art.details["input_transpose"] is None:
        assert art.input_layout == "as-trained"
        assert checks["as-trained"] <= ATOL < checks["channels-last"]
    else:
        assert art.details["input_transpose"] == [0, 2, 1] and "NWC" in art.input_layout
    # the runner takes the layout the model was trained with, whatever onnx2tf did inside
    x = inputs("digits", 5, 3)
    runner = saved_model.load(art)
    assert np.max(np.abs(runner(x) - reference("torch", model, x))) <= ATOL
    runner.close()


def test_torch_route_leaves_onnx_untouched_and_drops_tflite(exported):
    _, art, onnx_art = exported["torch", "digits"]
    from pathlib import Path

    assert sha256(onnx_art.path) == ONNX_SHA["torch", "digits"], "onnx2tf must work on a copy of the ONNX file"
    assert not list(Path(art.path).glob("*.tflite"))
    assert art.details["versions"]["onnx2tf"]


def test_torch_requires_onnx_upstream(tmp_path):
    with pytest.raises(ExportError, match="upstream\\['onnx'\\]"):
        saved_model.export(torch_model("toy"), framework="torch", name="toy-torch", example=inputs("toy", 2, 0),
                           out_dir=tmp_path, upstream={}, options={})


def test_tampered_keras_variable_changes_output(exported, tmp_path):
    """Re-save the Keras SavedModel with one kernel weight changed: its outputs must move."""
    import tensorflow as tf

    _, art, _ = exported["keras", "digits"]
    loaded = tf.saved_model.load(art.path)
    kernel = next(v for v in loaded.variables if len(v.shape) == 2)
    w = kernel.numpy()
    w[0, 0] += 10.0
    kernel.assign(w)
    tf.saved_model.save(loaded, str(tmp_path / "tampered"), signatures=loaded.signatures)
    tampered = dataclasses.replace(art, path=str(tmp_path / "tampered"))
    x = inputs("digits", 16, 5)
    a, b = saved_model.load(art), saved_model.load(tampered)
    assert "max abs error" in fails_parity(a(x), b(x), "fp32", "saved_model")


def test_tampered_torch_constant_changes_output(exported, tmp_path):
    """onnx2tf stores the weights as constants in saved_model.pb: overwrite one float there."""
    model, art, _ = exported["torch", "digits"]
    bad = copy_artifact(art, tmp_path / "sm")
    pb = tmp_path / "sm" / "saved_model.pb"
    data = bytearray(pb.read_bytes())
    w = first_weight("torch", model)
    hits = [(wm, data.find(wm.tobytes())) for wm in (np.ascontiguousarray(w), np.ascontiguousarray(w.T))]
    wm, at = next((wm, at) for wm, at in hits if at >= 0)
    data[at:at + 4] = np.float32(wm.flat[0] + 10.0).tobytes()
    pb.write_bytes(bytes(data))
    x = inputs("digits", 16, 6)
    a, b = saved_model.load(art), saved_model.load(bad)
    assert "max abs error" in fails_parity(a(x), b(x), "fp32", "saved_model")


def test_corrupt_variables_refused(exported, tmp_path):
    """TensorFlow checksums the variables: changed bytes are refused at load, as ArtifactLoadError."""
    _, art, _ = exported["keras", "digits"]
    bad = copy_artifact(art, tmp_path / "sm")
    data_file = next((tmp_path / "sm" / "variables").glob("variables.data-*"))
    data = bytearray(data_file.read_bytes())
    data[64:68] = np.float32(123.0).tobytes()
    data_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactLoadError, match="saved_model artifact digits-keras"):
        saved_model.load(bad)


@pytest.mark.parametrize("damage", ["truncated pb", "truncated variables", "no variables", "missing"])
def test_damaged_artifact_refused(exported, tmp_path, damage):
    _, art, _ = exported["keras", "digits"]
    bad = copy_artifact(art, tmp_path / "sm")
    root = tmp_path / "sm"
    if damage == "truncated pb":
        pb = root / "saved_model.pb"
        pb.write_bytes(pb.read_bytes()[: pb.stat().st_size // 2])
    elif damage == "truncated variables":
        f = next((root / "variables").glob("variables.data-*"))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "no variables":
        shutil.rmtree(root / "variables")
    else:
        shutil.rmtree(root)
    with pytest.raises(ArtifactLoadError, match="digits-keras"):
        saved_model.load(bad)


def test_truncated_torch_pb_refused(exported, tmp_path):
    _, art, _ = exported["torch", "digits"]
    bad = copy_artifact(art, tmp_path / "sm")
    pb = tmp_path / "sm" / "saved_model.pb"
    pb.write_bytes(pb.read_bytes()[:1000])
    with pytest.raises(ArtifactLoadError, match="digits-torch"):
        saved_model.load(bad)


def test_static_batch_signature_is_run_in_padded_chunks(tmp_path):
    """A SavedModel whose serving signature fixes the batch (as converters may write) still serves any
    batch: zero-padded chunks, trimmed. Remainders of 2+ rows catch a chunk sliced from the wrong end."""
    import tensorflow as tf
    w = tf.constant(np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32))

    class Fixed(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([4, 3], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.matmul(x, w) + tf.reduce_sum(x, axis=1, keepdims=True)}

    module = Fixed()
    path = tmp_path / "fixed"
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve})
    art = Artifact(model="fixed", format="saved_model", variant="fp32", path=str(path), framework="keras",
                   route="tf.saved_model.save (static batch 4)", batch_sizes=[4])
    runner = saved_model.load(art)
    try:
        assert "chunks of the static batch 4" in runner.details["batch_strategy"]
        for n in (1, 4, 6, 7, 9):
            x = np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)
            expected = x @ w.numpy() + x.sum(axis=1, keepdims=True)
            got = runner(x)
            assert got.shape == (n, 2)
            assert float(np.max(np.abs(got - expected))) <= 1e-5, n
    finally:
        runner.close()
