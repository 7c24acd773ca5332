"""ExecuTorch exporter: torch models to .pte programs (portable and XNNPACK-delegated), run in ExecuTorch's
own runtime, each with a bundled program (.bpte) whose self-check uses ExecuTorch's API."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from exporters import executorch as et
from exporters.base import ArtifactLoadError, ExportError

from .models import SHAPES, fails_parity, inputs, reference, torch_model

ATOL = 1e-5
CASES = [(k, v) for k in SHAPES for v in et.VARIANTS]


def _tampered(model):
    """A copy of `model` with one weight of its largest weight matrix changed."""
    import copy

    import torch
    bad = copy.deepcopy(model)
    target = max((p for p in bad.parameters() if p.ndim == 2), key=lambda p: p.numel())
    with torch.no_grad():
        target.view(-1)[0] += 1.0
    return bad


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """kind -> (model, {variant: artifact}, {variant: artifact of the model with one weight changed})."""
    import torch

    torch.set_num_threads(1)
    out = {}
    for kind in SHAPES:
        model, example = torch_model(kind), inputs(kind, 4, 0)
        arts = et.export(model, framework="torch", name=f"{kind}-torch", example=example,
                         out_dir=tmp_path_factory.mktemp(f"et-{kind}"), upstream={}, options={},
                         expected=reference("torch", model, example))
        bad = et.export(_tampered(model), framework="torch", name=f"{kind}-torch-tampered", example=example,
                        out_dir=tmp_path_factory.mktemp(f"et-{kind}-bad"), upstream={}, options={})
        out[kind] = model, {a.variant: a for a in arts}, {a.variant: a for a in bad}
    return out


@pytest.mark.parametrize("kind,variant", CASES)
def test_executorch_parity_at_batch_1_16_and_past_max_batch(exported, kind, variant):
    model, arts, _ = exported[kind]
    runner = et.load(arts[variant])
    try:
        assert runner.runtime == "executorch"
        for n, seed in ((1, 11), (16, 12), (et.MAX_BATCH + 3, 13)):
            x = inputs(kind, n, seed)
            want, got = reference("torch", model, x), runner(x)
            assert isinstance(got, np.ndarray) and got.shape == want.shape
            err = float(np.max(np.abs(got - want)))
            assert err <= ATOL, f"{arts[variant].label} batch {n}: max abs {err:.3g} > {ATOL}"
        assert "chunks" in runner.last_strategy  # past max_batch: fed in chunks the program takes
        assert float(np.ptp(reference("torch", model, inputs(kind, 16, 12)), axis=0).max()) > 1e-2
    finally:
        runner.close()


@pytest.mark.parametrize("kind,variant", CASES)
def test_executorch_model_with_one_weight_changed_does_not_match(exported, kind, variant):
    model, _, bad = exported[kind]
    runner = et.load(bad[variant])
    try:
        x = inputs(kind, 16, 12)
        task = "regression" if kind == "toy" else "classification"
        assert "max abs error" in fails_parity(reference("torch", model, x), runner(x), "fp32", "executorch", task)
    finally:
        runner.close()


@pytest.mark.parametrize("kind,variant", CASES)
def test_executorch_artifact_record(exported, kind, variant):
    _, arts, _ = exported[kind]
    art = arts[variant]
    assert art.format == "executorch" and art.variant == variant and art.path.endswith(f"model.{variant}.pte")
    assert art.batch_sizes is None and art.details["max_batch"] == et.MAX_BATCH, art.details
    assert art.size_bytes > 0 and art.details["versions"]["executorch"]
    assert art.details["export_check_max_abs_vs_torch"] <= ATOL
    if variant == "xnnpack":
        assert art.details["delegates"] == ["XnnpackBackend"]
    else:
        assert art.details["delegates"] == [] and "aten::addmm" in art.details["operators"]
    assert et.bundle_path(art).is_file() and art.details["bundle"]["rows"] == 4


@pytest.mark.parametrize("kind,variant", CASES)
def test_executorch_bundled_program_self_check_passes(exported, kind, variant):
    _, arts, _ = exported[kind]
    check = et.check_bundle(et.bundle_path(arts[variant]))
    assert check.passed, check.message
    assert check.max_abs <= ATOL and len(check.cases) == 1 and "pass" in check.message


def _shift_expected_outputs(src, dst, delta: float) -> None:
    """Copy a .bpte with its first test case's expected outputs moved by `delta`, byte for byte in place."""
    from executorch.devtools.bundled_program.serialize import deserialize_from_flatbuffer_to_bundled_program
    data = bytearray(src.read_bytes())
    case = deserialize_from_flatbuffer_to_bundled_program(bytes(data)).method_test_suites[0].test_cases[0]
    old = et._tensor_array(case.expected_outputs[0])
    needle = old.tobytes()
    assert data.count(needle) == 1, "expected the outputs' bytes once in the bundle"
    at = data.find(needle)
    data[at:at + len(needle)] = (old + np.float32(delta)).astype(old.dtype).tobytes()
    dst.write_bytes(bytes(data))


@pytest.mark.parametrize("kind,variant", [("toy", "portable"), ("digits", "xnnpack"), ("digits", "portable")])
def test_executorch_bundled_program_self_check_fails_with_changed_expected_outputs(exported, kind, variant, tmp_path):
    _, arts, _ = exported[kind]
    bad = tmp_path / "shifted.bpte"
    _shift_expected_outputs(et.bundle_path(arts[variant]), bad, 1e-2)
    check = et.check_bundle(bad)
    assert not check.passed and "FAIL" in check.message
    assert check.cases[0]["error"] and abs(check.max_abs - 1e-2) < 1e-4, check
    # a shift inside ExecuTorch's tolerance still passes: the check is the tolerance, not byte equality
    _shift_expected_outputs(et.bundle_path(arts[variant]), bad, 1e-7)
    assert et.check_bundle(bad).passed


def test_executorch_truncated_program_raises_artifact_load_error(exported, tmp_path):
    _, arts, _ = exported["digits"]
    art = arts["xnnpack"]
    data = open(art.path, "rb").read()
    cut = tmp_path / "model.pte"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactLoadError, match="truncated"):
        et.load(dataclasses.replace(art, path=str(cut)))
    with pytest.raises(ArtifactLoadError, match="corrupt or truncated"):
        et.load(dataclasses.replace(art, path=str(cut), size_bytes=0))
    with pytest.raises(ValueError, match="not supported"):
        et.load(art, "onnxruntime-cpu")


def test_executorch_refuses_other_families_with_the_reason(tmp_path):
    with pytest.raises(ExportError, match="'tensorflow' family: ExecuTorch lowers only a torch.export program"):
        et.export(None, framework="keras", name="toy-keras", example=inputs("toy", 4, 0), out_dir=tmp_path)


KERAS_TORCH_PROBE = """
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from exporters import executorch as et
from tests.models import inputs, keras_model
model = keras_model("digits")
x = inputs("digits", 4, 0)
arts = et.export(model, framework="keras", family="keras-torch", name="digits-keras", example=x, out_dir=sys.argv[1])
errs, bundles = {}, {}
for art in arts:
    runner = et.load(art)
    xx = inputs("digits", 16, 12)
    errs[art.variant] = float(np.max(np.abs(runner(xx) - np.asarray(model(xx).detach()))))
    runner.close()
    bundles[art.variant] = et.check_bundle(et.bundle_path(art)).passed
print("RESULT", json.dumps({"errs": errs, "bundles": bundles, "batch": [a.batch_sizes for a in arts]}))
"""


def test_executorch_keras_on_torch_backend(tmp_path):
    """The keras.Model on Keras' torch backend is an nn.Module: torch.export takes it (its forward(*args)
    takes the dynamic batch as one tuple), in a process of its own (the backend is fixed per process)."""
    import json
    import os
    import subprocess
    import sys

    from .conftest import ROOT
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    r = subprocess.run([sys.executable, "-c", KERAS_TORCH_PROBE, str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    line = next((s for s in r.stdout.splitlines() if s.startswith("RESULT ")), None)
    assert line, r.stdout[-2000:] + r.stderr[-4000:]
    got = json.loads(line[len("RESULT "):])
    assert got["batch"] == [None, None], got
    assert all(e <= ATOL for e in got["errs"].values()) and all(got["bundles"].values()), got


def test_executorch_through_the_pipeline_verified_bundled_and_refused_for_keras_with_why(tmp_path):
    """`[export] formats` naming executorch (it is opt-in): the torch model's two programs verified in
    ExecuTorch's runtime by the verify stage, shipped in the bundle with their bundled programs (whose
    self-check passes there), and the Keras model's cell refused with the reason, allowed by the spec."""
    import json
    import re

    from pipeline.spec import builtin_specs

    from .conftest import run_cli
    text = builtin_specs()["toy"].read_text()
    text = text[:text.index("[deploy.serving]")]  # serving needs a SavedModel, which this spec does not make
    text = re.sub(r"\[export\]\nformats = \[[^\]]*\]", '[export]\nformats = ["onnx", "executorch"]', text)
    text = text.replace("[parity]\n", '[parity]\nallow_unsupported = ["keras/executorch"]\n', 1)
    assert '"executorch"' in text and "allow_unsupported" in text
    (tmp_path / "toy.toml").write_text(text)
    r = run_cli("run", str(tmp_path / "toy.toml"), "--no-track", home=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    rec = json.loads(sorted((tmp_path / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    cells = json.loads((tmp_path / ".pipeline" / "runs" / rec["run_id"] / "parity.json").read_text())["records"]
    cells = {(x["model"], x["variant"]): x for x in cells if x["format"] == "executorch"}
    assert {v: cells["torch", v]["status"] for v in et.VARIANTS} == {"portable": "passed", "xnnpack": "passed"}
    assert cells["torch", "xnnpack"]["runtime"] == "executorch"
    keras = [x for (m, _), x in cells.items() if m == "keras"]
    assert keras and all(x["status"] == "skipped" and "torch.export" in x["reason"] for x in keras), keras
    bundle = next(s for s in rec["stages"] if s["name"] == "bundle:torch")
    from exporters.bundle import read_bundle
    b = read_bundle(tmp_path.__class__(bundle["path"]) / "bundle")
    for art in b.artifacts("executorch"):
        check = et.check_bundle(et.bundle_path(art))
        assert check.passed, (art.variant, check.message)
