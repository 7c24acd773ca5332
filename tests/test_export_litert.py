"""LiteRT exporter: fp32 / fp16 / int8 .tflite from Keras (via the SavedModel) and PyTorch (litert-torch),
run in the ai_edge_litert interpreter with one thread."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from exporters import litert
from exporters.base import Artifact, ArtifactLoadError, ExportError

from .models import SHAPES, fails_parity, first_weight, inputs, keras_model, reference, tamper_tflite, torch_model

ATOL = {"fp32": 1e-5, "fp16": 1e-2, "int8": 5e-2}
BATCH_SIZES = [1, 16]
CASES = [(f, k, v) for f in ("keras", "torch") for k in SHAPES for v in litert.VARIANTS]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(framework, kind) -> (model, {variant: artifact}), exported once for the module."""
    import torch

    from exporters import saved_model

    torch.set_num_threads(1)
    out = {}
    for framework, build in (("keras", keras_model), ("torch", torch_model)):
        for kind in SHAPES:
            model = build(kind)
            name = f"{kind}-{framework}"
            example = inputs(kind, 8, 0)
            upstream = {}
            if framework == "keras":
                upstream["saved_model"] = saved_model.export(
                    model, framework=framework, name=name, example=example,
                    out_dir=tmp_path_factory.mktemp(f"sm-{name}"), upstream={}, options={})
            arts = litert.export(model, framework=framework, name=name, example=example,
                                 out_dir=tmp_path_factory.mktemp(f"litert-{name}"), upstream=upstream,
                                 options={"batch_sizes": BATCH_SIZES})
            assert [a.variant for a in arts] == ["fp32", "fp16", "int8"]
            out[framework, kind] = model, {a.variant: a for a in arts}
    return out


def copy_file_artifact(art: Artifact, dst) -> Artifact:
    shutil.copyfile(art.path, dst)
    return dataclasses.replace(art, path=str(dst), details=dict(art.details))


@pytest.mark.parametrize("framework,kind,variant", CASES)
def test_parity_any_batch(exported, framework, kind, variant):
    model, arts = exported[framework, kind]
    art = arts[variant]
    assert (art.format, art.variant, art.framework) == ("litert", variant, framework)
    assert art.path.endswith(litert.FILES[variant])
    assert art.details["versions"] and art.details["quantization"]
    runner = litert.load(art)
    try:
        assert runner.runtime == "litert-interpreter"
        for i, n in enumerate((1, 16, 5, 37)):
            x = inputs(kind, n, seed=20 + i)
            ref = reference(framework, model, x)
            got = runner(x)
            assert got.shape == ref.shape
            err = float(np.max(np.abs(got - ref)))
            assert err <= ATOL[variant], f"{art.label} batch {n}: max abs error {err:.3g} > {ATOL[variant]}"
    finally:
        runner.close()


def test_keras_keeps_a_dynamic_batch(exported):
    for kind in SHAPES:
        for art in exported["keras", kind][1].values():
            assert art.batch_sizes is None
            (sig,) = art.details["signatures"].values()
            assert sig["batch"] is None
            assert "dynamic batch" in art.details["batch_strategy"]


def test_torch_carries_one_signature_per_batch_size(exported):
    for kind in SHAPES:
        for art in exported["torch", kind][1].values():
            assert art.batch_sizes == BATCH_SIZES
            assert {k: s["batch"] for k, s in art.details["signatures"].items()} == {"batch_1": 1, "batch_16": 16}
            assert isinstance(art.details["resize_ok"], bool)


def test_torch_odd_batches_strategy_recorded(exported):
    """digits: its flatten is a static reshape, resizing fails, so odd batches go in padded chunks;
    toy: resizing a static signature to N is proven to give the same rows, so the runner resizes."""
    digits = exported["torch", "digits"][1]["fp32"]
    toy = exported["torch", "toy"][1]["fp32"]
    assert digits.details["resize_ok"] is False and "chunks of 16" in digits.details["batch_strategy"]
    assert toy.details["resize_ok"] is True and "resize_tensor_input" in toy.details["batch_strategy"]
    # without the record, the runner measures it itself and reaches the same answer
    for art in (digits, toy):
        bare = dataclasses.replace(art, details={k: v for k, v in art.details.items()
                                                 if k not in ("resize_ok", "resize_probe")})
        runner = litert.load(bare)
        assert runner.resize_ok is art.details["resize_ok"]
        assert runner.details["resize_probe"].startswith("measured at load")
        runner(inputs(art.model.split("-")[0], 37, 1))
        assert runner.last_strategy == ("signature 'batch_16' resized to 37" if art is toy
                                        else "chunks of [16, 16, 16] rows (last padded 11), trimmed to 37")
        runner(inputs(art.model.split("-")[0], 16, 1))
        assert runner.last_strategy == "signature 'batch_16'"
        runner.close()


def test_quantized_variants_hold_quantized_weights(exported):
    for framework in ("keras", "torch"):
        arts = exported[framework, "digits"][1]
        assert arts["fp16"].details["tensor_dtypes"].get("float16", 0) > 0
        assert arts["int8"].details["tensor_dtypes"].get("int8", 0) > 0
        assert "float16" not in arts["fp32"].details["tensor_dtypes"]
        assert arts["int8"].size_bytes < arts["fp16"].size_bytes < arts["fp32"].size_bytes
        assert "note" not in arts["int8"].details
    # TFLiteConverter leaves the toy's single weight in float32; the artifact says so
    toy_int8 = exported["keras", "toy"][1]["int8"]
    assert "int8" not in toy_int8.details["tensor_dtypes"] and "computes as fp32" in toy_int8.details["note"]


def test_keras_requires_saved_model_upstream(tmp_path):
    with pytest.raises(ExportError, match="upstream\\['saved_model'\\]"):
        litert.export(keras_model("toy"), framework="keras", name="toy-keras", example=inputs("toy", 2, 0),
                      out_dir=tmp_path, upstream={}, options={})


@pytest.mark.parametrize("framework", ["keras", "torch"])
def test_tampered_weight_changes_output(exported, tmp_path, framework):
    """Overwrite one float32 weight inside the flatbuffer: the runner's outputs must move."""
    model, arts = exported[framework, "digits"]
    art = arts["fp32"]
    bad = copy_file_artifact(art, tmp_path / "model.tflite")
    data = bytearray((tmp_path / "model.tflite").read_bytes())
    w = first_weight(framework, model)
    found = [(wm, data.find(wm.tobytes())) for wm in (np.ascontiguousarray(w), np.ascontiguousarray(w.T))]
    wm, at = next(((wm, at) for wm, at in found if at >= 0), (None, -1))
    assert at >= 0, "the first layer's float32 weights should be stored as they are in the .tflite"
    data[at:at + 4] = np.float32(wm.flat[0] + 10.0).tobytes()
    (tmp_path / "model.tflite").write_bytes(bytes(data))
    x = inputs("digits", 16, 7)
    a, b = litert.load(art), litert.load(bad)
    assert "max abs error" in fails_parity(a(x), b(x), "fp32", "litert")


@pytest.mark.parametrize("framework", ["keras", "torch"])
@pytest.mark.parametrize("variant", litert.VARIANTS)
def test_tampered_weights_fail_parity_in_every_variant(exported, tmp_path, framework, variant):
    """The verdict the pipeline gives: each variant, judged by its own tolerance, fails once tampered."""
    model, arts = exported[framework, "digits"]
    art = arts[variant]
    bad = copy_file_artifact(art, tmp_path / "model.tflite")
    tamper_tflite(tmp_path / "model.tflite", variant)
    x = inputs("digits", 64, 8)
    expected = reference(framework, model, x)
    with litert.load(art) as good:
        from parity.compare import compare, tolerance_for
        assert compare(expected, good(x), tolerance=tolerance_for(variant, "litert"), task="classification").passed
    with litert.load(bad) as tampered:
        fails_parity(expected, tampered(x), variant, "litert")


@pytest.mark.parametrize("recorded_size", [True, False])
def test_truncated_file_refused(exported, tmp_path, recorded_size):
    art = exported["torch", "digits"][1]["int8"]
    bad = copy_file_artifact(art, tmp_path / "model_int8.tflite")
    f = tmp_path / "model_int8.tflite"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    if not recorded_size:  # the interpreter itself must refuse it too
        bad = dataclasses.replace(bad, size_bytes=0)
    with pytest.raises(ArtifactLoadError, match="litert artifact digits-torch/litert-int8"):
        litert.load(bad)


def test_missing_or_garbage_file_refused(exported, tmp_path):
    art = exported["keras", "toy"][1]["fp32"]
    with pytest.raises(ArtifactLoadError, match="found nothing"):
        litert.load(dataclasses.replace(art, path=str(tmp_path / "none.tflite")))
    (tmp_path / "garbage.tflite").write_bytes(b"not a flatbuffer" * 16)
    with pytest.raises(ArtifactLoadError, match="could not load"):
        litert.load(dataclasses.replace(art, path=str(tmp_path / "garbage.tflite"), size_bytes=0))
