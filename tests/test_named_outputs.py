"""Models of several outputs (a dict, a tuple, a Hugging Face ModelOutput): each output is named, stored,
matched to the artifact's tensor of its meaning and compared; a model whose outputs change structure
between calls, or that would train several outputs on one target, is refused; a runtime that lacks a
kernel makes its cell UNSUPPORTED, not a numeric failure."""
import json
from pathlib import Path

import numpy as np
import pytest

from exporters.base import Artifact, OpNotImplemented, graph_order
from exporters.verify import check_artifact
from parity.compare import tolerance_for
from parity.feeds import flat_rows, flatten_outputs, split_rows, structure
from parity.signature import Signature, TensorSpec
from pipeline.spec import load

from .conftest import run_cli
from .test_pretrained import parity_of
from .zoo import DICT_FACTORY, hf_encoder, torch_dict_model


def test_outputs_are_named_by_key_then_position_and_nested_keys_are_dotted():
    value = {"logits": np.ones((2, 3)), "extra": (np.zeros((2, 1)), None, {"h": np.ones((2, 2))})}
    named = flatten_outputs(value, np.asarray)
    assert list(named) == ["logits", "extra.output_0", "extra.output_2.h"]
    assert list(flatten_outputs((np.ones(2), np.ones(2)), np.asarray, names=["a", "b"])) == ["a", "b"]
    assert list(flatten_outputs(np.ones(2), np.asarray)) == ["output"]


def test_several_outputs_are_stored_as_one_concatenation_and_split_back():
    y = {"logits": np.arange(6.0).reshape(2, 3), "h": np.arange(8.0).reshape(2, 2, 2)}
    flat = flat_rows(y)
    assert flat.shape == (2, 7)
    back = split_rows(flat, {"logits": (3,), "h": (2, 2)})
    assert all(np.array_equal(back[k], y[k]) for k in y)
    assert structure(y) != structure({"logits": y["logits"]})


def test_converter_output_names_sort_in_the_graphs_order():
    assert graph_order(["output_10", "output_2", "output_0"]) == ["output_0", "output_2", "output_10"]


class TwoOutputRunner:
    """An artifact of two outputs whose tensors are named and ordered unlike the model's."""
    signature = Signature((TensorSpec("x", "float32", (None, 3)),),
                          (TensorSpec("output_0", "float32", (None, 2)), TensorSpec("output_1", "float32", (None, 1))))

    def __init__(self, broken=False):
        self.broken = broken

    def infer(self, feed):
        x = feed["x"]
        total = x.sum(1, keepdims=True)
        return {"output_0": x[:, :2] * (1.5 if self.broken else 1.0), "output_1": total}

    def close(self):
        pass


class Module:
    def __init__(self, runner):
        self.runner = runner

    def load(self, artifact, runtime):
        if isinstance(self.runner, Exception):
            raise self.runner
        return self.runner


def two_output_reference():
    x = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    model_sig = Signature((TensorSpec("x", "float32", (None, 3)),),
                          (TensorSpec("total", "float32", (None, 1)), TensorSpec("head", "float32", (None, 2))))
    y = flat_rows({"total": x.sum(1, keepdims=True), "head": x[:, :2]})
    return {"x": x, "y": y, "kind": np.zeros(30, np.int8)}, model_sig


def test_each_output_is_compared_with_the_artifacts_tensor_of_its_meaning():
    ref, sig = two_output_reference()
    art = Artifact("m", "onnx", "fp32", "/nowhere", "torch", "test")
    rec, got, _ = check_artifact(Module(TwoOutputRunner()), art, "spy", ref, tolerance_for("fp32", "onnx"),
                                 task="classification", max_batch=16, model_signature=sig)
    assert rec.passed, rec.message
    assert "total <- output_1 (renamed" in rec.details["mapping"] and "head <- output_0 (renamed" in rec.details["mapping"]
    assert set(rec.details["outputs_max_abs"]) == {"total", "head"}
    bad, _, _ = check_artifact(Module(TwoOutputRunner(broken=True)), art, "spy", ref, tolerance_for("fp32", "onnx"),
                               task="classification", max_batch=16, model_signature=sig)
    assert not bad.passed
    assert bad.details["outputs_max_abs"]["total"] == 0.0 and bad.details["outputs_max_abs"]["head"] > 0.1


def test_a_runtime_without_a_kernel_marks_the_cell_unsupported():
    class Fails(TwoOutputRunner):
        def infer(self, feed):
            raise OpNotImplemented("Activation tanh has not been implemented for the CPU backend.")
    ref, sig = two_output_reference()
    art = Artifact("m", "tfjs", "fp32", "/nowhere", "torch", "test")
    rec, got, env = check_artifact(Module(Fails()), art, "tfjs-node-cpu", ref, tolerance_for("fp32", "tfjs"),
                                   task="regression", max_batch=16, model_signature=sig)
    assert not rec.passed and got is None and env is None
    assert rec.details["outcome"] == "unsupported" and "tanh" in rec.details["runtime_error"]


def test_an_unsupported_runtime_cell_says_what_to_do():
    from pipeline.steps.verify import unsupported_record
    spec = load("toy")
    m = spec.models[0]
    rec = unsupported_record(spec, m, "tfjs", "fp32", "Activation tanh has not been implemented.",
                             runtime="tfjs-node-cpu")
    assert rec.status == "failed" and rec.runtime == "tfjs-node-cpu"
    assert "the tfjs-node-cpu runtime cannot run this tfjs artifact" in rec.message
    assert "another activation" in rec.message and f'"{m.name}/tfjs" under [parity] allow_unsupported' in rec.message


def test_training_a_model_of_several_outputs_is_refused_with_what_to_do():
    from pipeline.training import ModelMismatch, probe_model
    from pipeline.spec import ModelSpec
    m = ModelSpec("heads", "torch", "m:f", {}, None, (), (1,))
    with pytest.raises(ModelMismatch, match=r"several outputs \(a, b\); training fits one output.*source = FILE"):
        probe_model(m, lambda x: {"a": x, "b": x}, np.zeros((2, 3), np.float32), 3)


SHIFTING = '''
import torch
import torch.nn as nn


class Shifting(nn.Module):
    """Returns a second output only on batches of more than two rows: no one trace can hold it."""
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        out = {"a": self.a(x)}
        if x.shape[0] > 2:
            out["b"] = x.sum(1)
        return out


def shifting(input_shape=None, n_outputs=None, **_):
    return Shifting()
'''


@pytest.mark.cli
def test_a_model_whose_outputs_change_structure_between_calls_is_refused(tmp_path):
    import torch
    (tmp_path / "shifting_models.py").write_text(SHIFTING)
    torch.save({"a.weight": torch.zeros(2, 3), "a.bias": torch.zeros(2)}, tmp_path / "shifting.pt")
    np.savez(tmp_path / "rows.npz", x=np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32))
    r = run_cli("export", "shifting.pt", "--example", "rows.npz", "--factory", "shifting_models:shifting",
                "--no-track", home=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "model shifting (torch): its outputs change structure between calls" in r.stderr
    assert "b: float32 []" in r.stderr and "expected the same named outputs" in r.stderr


@pytest.mark.e2e
def test_a_torch_model_returning_a_dict_goes_to_every_format_each_output_matched(tmp_path):
    model, example = torch_dict_model(tmp_path)
    r = run_cli("export", str(model), "--example", str(example), "--factory", DICT_FACTORY, "--no-track",
                home=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    parity = parity_of(tmp_path)
    assert parity["verdict"] == "passed" and len(parity["records"]) == 8
    for rec in parity["records"]:
        assert set(rec["details"]["outputs_max_abs"]) == {"logits", "embedding", "probs"}, rec["label"]
        assert "logits <- " in rec["details"]["mapping"] and "embedding <- " in rec["details"]["mapping"]
    by_label = {(x["label"], x["runtime"]): x for x in parity["records"]}
    assert "logits <- logits; embedding <- embedding" in by_label[("two_heads/onnx", "onnxruntime-cpu")]["details"]["mapping"]
    # each output's error in the console table and parity.md, under its artifact's row
    assert sum(line.split()[:2] == ["output", "embedding"] for line in r.stdout.splitlines()) == 8, r.stdout
    markdown = next((tmp_path / ".pipeline" / "runs").glob("*/parity.md")).read_text()
    assert markdown.count("| output probs |") == 8
    # exported with the default task: the softmax head is named as the one judged without a top-1 check
    hint, = [w for w in parity["warnings"] if "look" in w]
    assert hint.startswith("two_heads: output probs looks like class probabilities") and "--task classification" in hint
    assert "task_hint" in parity["discrimination"]["two_heads"]
    manifest, = [json.loads(p.read_text()) for p in (tmp_path / ".pipeline" / "cache").glob("bundle/*/bundle/manifest.json")]
    ts, = manifest["formats"]["torchscript"]
    assert "strict=False" in ts["details"]["trace_retry"]  # the strict trace refused the dict; the retry is recorded


HF_SPEC = """
[pipeline]
name = "encoder"
[data]
source = "npz"
path = "tokens.npz"
inputs = ["input_ids", "attention_mask"]
task = "regression"
[[model]]
name = "distilbert"
framework = "torch"
source = "tiny_distilbert"
[export]
formats = ["onnx", "torchscript", "saved_model", "litert", "tfjs"]
"""


@pytest.mark.e2e
def test_a_hugging_face_encoder_from_its_folder_every_cell_verified_through_its_routes(tmp_path):
    hf_encoder(tmp_path)
    (tmp_path / "encoder.toml").write_text(HF_SPEC)
    # oneDNN's graph rewrites are on by default only on some x86 CPUs (those with AVX-512); forced on here
    # so the TF.js converter meets its fused layer norm on whichever CPU runs the test
    r = run_cli("run", "encoder.toml", "--no-track", home=tmp_path, env={"TF_ENABLE_ONEDNN_OPTS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    parity = parity_of(tmp_path)
    outcome = {(x["label"], x["runtime"]): x["status"] for x in parity["records"]}
    assert set(outcome.values()) == {"passed"} and len(outcome) == 8, outcome
    by_label = {x["label"]: x for x in parity["records"]}
    # onnx2tf refuses the dynamic-batch graph; nobuco converts the module itself, keeping a dynamic batch
    sm = by_label["distilbert/saved_model"]["details"]
    assert sm["route_taken"] == "nobuco" and sm["batch_sizes"] is None
    assert [x["route"].split(" ")[0] for x in sm["routes_left"]] == ["ONNX"]
    assert "onnx2tf" in sm["routes_left"][0]["route"] and sm["routes_left"][0]["why"]
    # its graph meets oneDNN's fused layer norm in the TF.js converter: converted again without oneDNN
    tfjs = by_label["distilbert/tfjs"]["details"]
    assert tfjs["route_taken"] == "tensorflowjs without oneDNN" and "_MklLayerNorm" in tfjs["routes_left"][0]["why"]
    run, = [json.loads(p.read_text()) for p in (tmp_path / ".pipeline" / "runs").glob("*.json")]
    markdown = (Path(run["report_dir"]) / "parity.md").read_text()
    assert "`distilbert/saved_model`: nobuco" in markdown and "Route left: ONNX" in markdown
    litert = next(x for x in parity["records"] if x["label"] == "distilbert/litert")
    assert "input_ids -> args_0" in litert["details"]["mapping"]  # litert-torch renames by position
    assert parity["discrimination"]["distilbert"]["discriminative"]


STATED = """
[pipeline]
name = "stated"
[data]
source = "npz"
path = "rows.npz"
task = "regression"
[[model]]
name = "two_heads"
framework = "torch"
source = "two_heads.pt"
factory = "dict_models:two_heads"
[model.signature]
inputs = {{ x = "{dtype}" }}
outputs = {outputs}
[export]
formats = ["onnx"]
"""


@pytest.mark.cli
def test_a_stated_signature_that_contradicts_the_model_is_refused_and_one_that_agrees_runs(tmp_path):
    torch_dict_model(tmp_path)
    (tmp_path / "bad.toml").write_text(STATED.format(dtype="int64", outputs='["logits"]'))
    r = run_cli("run", "bad.toml", "--no-track", home=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "model two_heads (torch): the spec's [model.signature] contradicts the model" in r.stderr
    assert "input 'x' int64 (the model takes float32)" in r.stderr
    assert "outputs ['logits'] (the model returns ['logits', 'embedding', 'probs'])" in r.stderr
    (tmp_path / "good.toml").write_text(STATED.format(dtype="float32", outputs='["logits", "embedding", "probs"]'))
    ok = run_cli("run", "good.toml", "--no-track", home=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_a_stated_signature_is_validated_with_the_spec(tmp_path):
    from pipeline.spec import SpecError
    np.savez(tmp_path / "rows.npz", x=np.zeros((4, 6), np.float32))
    (tmp_path / "two_heads.pt").write_bytes(b"")
    (tmp_path / "dict_models.py").write_text("def two_heads(**_):\n    pass\n")
    (tmp_path / "s.toml").write_text(STATED.format(dtype="complex64", outputs="[]"))
    with pytest.raises(SpecError, match=r"model\[0\]\.signature\.inputs\.x: expected a dtype among float16"):
        load(str(tmp_path / "s.toml"))
