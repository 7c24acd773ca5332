"""parity.compare: metrics, verdicts and their messages, tolerance merging, records, discrimination,
and the rule that the comparison never imports a framework."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity.compare import (DEFAULT_TOLERANCES, ParityRecord, Tolerance, compare, describe_discrimination,
                            discrimination, tolerance_for)

REPO = Path(__file__).resolve().parents[1]
FP32 = DEFAULT_TOLERANCES["fp32"]


def toy_outputs(n=64, seed=0):
    """Outputs of y = 3x + 2 on x in [-2, 2], the shape the toy model gives: (n, 1) float32."""
    x = np.random.default_rng(seed).uniform(-2, 2, (n, 1)).astype(np.float32)
    return (3 * x + 2).astype(np.float32)


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------- compare

def test_identical_outputs_pass():
    y = toy_outputs()
    c = compare(y, y.copy(), tolerance=FP32)
    assert c.passed and c.failures == []
    assert c.metrics["max_abs"] == 0.0 and c.metrics["max_rel"] == 0.0
    assert c.metrics["cosine"] == pytest.approx(1.0)
    assert c.metrics["n_rows"] == 64


def test_perturbed_output_fails_naming_input_and_values():
    y = toy_outputs()
    got = y.copy()
    got[7, 0] += 0.031
    c = compare(y, got, tolerance=FP32)
    assert not c.passed
    msg = c.failures[0]
    assert msg.startswith("max abs error 3.1e-02 > atol 1e-05")
    assert "on input 7" in msg
    assert f"expected {float(y[7, 0]):.6g}, got {float(got[7, 0]):.6g}" in msg
    assert c.metrics["worst_index"] == 7
    assert c.metrics["worst_expected"] == pytest.approx(float(y[7, 0]))
    assert c.metrics["worst_got"] == pytest.approx(float(got[7, 0]))
    assert c.metrics["n_out_of_tolerance"] == 1


def test_float32_rounding_passes_fp32_tolerance():
    # y computed in float64 vs float32: the error a faithful fp32 runtime makes
    x = np.random.default_rng(1).uniform(-2, 2, (200, 1))
    ref = 3.0123 * x + 1.987
    got = (np.float32(3.0123) * x.astype(np.float32) + np.float32(1.987)).astype(np.float32)
    assert compare(ref, got, tolerance=FP32).passed


def test_element_check_is_atol_or_rtol():
    # a large output 1e-4 off is fine relative to its size (1e-7), a small one 1e-4 off is not
    ref = np.array([[1000.0], [0.01]])
    assert compare(ref, ref + [[1e-4], [0.0]], tolerance=FP32).passed
    c = compare(ref, ref + [[0.0], [1e-4]], tolerance=FP32)
    assert not c.passed and "on input 1" in c.failures[0]
    # with only atol set, the large one fails too
    c = compare(ref, ref + [[1e-4], [0.0]], tolerance=Tolerance(atol=1e-5))
    assert not c.passed and "on input 0" in c.failures[0]
    # with only rtol set: relative error with the floor
    c = compare(ref, ref + [[0.0], [1e-4]], tolerance=Tolerance(rtol=1e-3, rel_floor=1e-3))
    assert not c.passed and c.failures[0].startswith("max relative error 1.0e-02 > rtol 0.001 on input 1")


def test_shape_mismatch_is_a_failure_not_an_exception():
    c = compare(np.zeros((194, 10)), np.zeros((194, 1)))
    assert not c.passed
    assert c.failures == ["shape mismatch: expected (194, 10), got (194, 1)"]
    c = compare(np.zeros((4, 1)), np.zeros(4))
    assert not c.passed and "(4, 1)" in c.failures[0] and "(4,)" in c.failures[0]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_output_fails(bad):
    y = toy_outputs()
    got = y.copy()
    got[3, 0] = bad
    c = compare(y, got, tolerance=Tolerance())  # even with every check off
    assert not c.passed
    assert "non-finite" in c.failures[0] and "input 3" in c.failures[0]
    assert c.metrics["n_nonfinite"] == 1
    json.dumps(c.to_json(), allow_nan=False)  # the record stays valid JSON


def test_non_finite_reference_fails():
    y = toy_outputs()
    ref = y.copy()
    ref[0, 0] = np.nan
    c = compare(ref, y)
    assert not c.passed and "reference" in c.failures[0]


def test_empty_and_non_numeric_outputs_fail():
    assert not compare(np.zeros((0, 3)), np.zeros((0, 3))).passed
    assert not compare(np.zeros((2, 1)), np.array([["a"], ["b"]])).passed


def test_cosine_handles_all_zero_outputs():
    z = np.zeros((5, 3))
    assert compare(z, z).metrics["cosine"] == 1.0
    c = compare(z, z + 1.0)
    assert c.metrics["cosine"] == 0.0 and not c.passed


def test_cosine_check_fails_a_scaled_output():
    y = softmax(np.random.default_rng(2).normal(0, 2, (50, 10)))
    got = y.copy()
    got[:, 0] = 0.5  # one column replaced: direction changes
    c = compare(y, got, tolerance=Tolerance(min_cosine=0.999))
    assert not c.passed and c.failures[0].startswith("cosine similarity")


def test_classification_metrics_on_a_hand_made_example():
    ref = np.array([[0.9, 0.05, 0.05],   # class 0
                    [0.1, 0.8, 0.1],     # class 1
                    [0.2, 0.2, 0.6],     # class 2
                    [0.6, 0.3, 0.1],     # class 0
                    [0.3, 0.4, 0.3]])    # class 1
    got = ref.copy()
    got[3] = [0.3, 0.6, 0.1]             # row 3 flips to class 1
    labels = np.array([0, 1, 2, 0, -1])  # row 4 has no label
    tol = Tolerance(min_top1_agreement=0.9, max_accuracy_drop=0.1)
    c = compare(ref, got, tolerance=tol, task="classification", labels=labels)
    m = c.metrics
    assert m["top1_agreement"] == pytest.approx(4 / 5)
    assert m["n_labeled"] == 4
    assert m["accuracy_ref"] == pytest.approx(1.0)
    assert m["accuracy_got"] == pytest.approx(3 / 4)
    assert m["accuracy_delta"] == pytest.approx(-0.25)
    assert not c.passed
    top1 = next(f for f in c.failures if f.startswith("top-1 agreement"))
    assert "0.8000 < min 0.9" in top1 and "input 3" in top1 and "expected class 0, got 1" in top1
    acc = next(f for f in c.failures if f.startswith("accuracy"))
    assert "drop 0.2500 > max 0.1" in acc
    # the accuracy budget alone decides when top-1 is not checked and the drop is allowed
    ok = compare(ref, got, tolerance=Tolerance(max_accuracy_drop=0.25), task="classification", labels=labels)
    assert ok.passed


def test_labels_shorter_than_rows_cover_the_first_rows():
    ref = np.eye(4)
    c = compare(ref, ref, task="classification", labels=[0, 1])
    assert c.metrics["n_labeled"] == 2 and c.metrics["accuracy_ref"] == 1.0


def test_single_score_classifier_uses_a_threshold():
    ref = np.array([[0.1], [0.7], [0.4], [0.9]])
    got = np.array([[0.1], [0.45], [0.4], [0.9]])
    c = compare(ref, got, tolerance=Tolerance(), task="classification", labels=[0, 1, 0, 1])
    assert c.metrics["top1_agreement"] == pytest.approx(0.75)
    assert c.metrics["accuracy_got"] == pytest.approx(0.75)


def test_kinds_name_the_row_kind_and_give_per_kind_metrics():
    y = toy_outputs(10)
    got = y.copy()
    got[9, 0] += 1.0
    kinds = np.array([0] * 4 + [1] * 4 + [2] * 2, dtype=np.int8)
    c = compare(y, got, kinds=kinds)
    assert "on input 9 (extreme)" in c.failures[0]
    assert c.metrics["max_abs_held_out"] == 0.0 and c.metrics["max_abs_extreme"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="kinds"):
        compare(y, got, kinds=kinds[:3])


def test_output_position_is_named_for_multi_output_rows():
    y = softmax(np.random.default_rng(3).normal(0, 2, (20, 10)))
    got = y.copy()
    got[12, 4] += 0.2
    c = compare(y, got, task="classification")
    assert "on input 12, output 4" in c.failures[0]


def test_comparison_json_round_trip():
    y = toy_outputs()
    got = y.copy()
    got[1] = np.nan
    c = compare(y, got)
    d = json.loads(json.dumps(c.to_json(), allow_nan=False))
    back = type(c).from_json(d)
    assert back.passed == c.passed and back.failures == c.failures and back.tolerance == c.tolerance


# --------------------------------------------------------------------------- tolerances

FP32_NUMBERS = (1e-5, 1e-4, 0.99999, 1.0)  # atol, rtol, min cosine, min top-1: the documented defaults


def fp32_numbers(t):
    return (t.atol, t.rtol, t.min_cosine, t.min_top1_agreement)


def test_default_tolerances_by_variant():
    assert fp32_numbers(tolerance_for("fp32", "onnx")) == FP32_NUMBERS
    assert tolerance_for("fp16", "litert").atol == 2e-2
    int8 = tolerance_for("int8", "litert")
    assert (int8.atol, int8.min_cosine, int8.min_top1_agreement, int8.max_accuracy_drop) == (0.1, 0.99, 0.98, 0.01)


def test_tolerance_merge_precedence():
    overrides = {
        "int8": {"atol": 0.3, "min_cosine": 0.95, "max_accuracy_drop": 0.05},
        "litert": {"atol": 0.2, "min_cosine": 0.97},
        "litert-int8": {"atol": 0.15},
    }
    t = tolerance_for("int8", "litert", overrides)
    assert t.atol == 0.15                 # "<format>-<variant>" wins
    assert t.min_cosine == 0.97           # then "<format>"
    assert t.max_accuracy_drop == 0.05    # then "<variant>"
    assert t.min_top1_agreement == 0.98   # then the default
    # another format with the same variant gets only the variant layer
    assert tolerance_for("int8", "onnx", overrides).atol == 0.3
    # the format layer applies to every variant of that format
    assert tolerance_for("fp32", "litert", overrides).atol == 0.2
    assert fp32_numbers(tolerance_for("fp32", "onnx", overrides)) == FP32_NUMBERS


def test_tolerance_override_can_switch_a_check_off():
    t = tolerance_for("fp32", "tfjs", {"tfjs": {"rtol": None, "min_top1_agreement": False}})
    assert t.rtol is None and t.min_top1_agreement is None and t.atol == 1e-5


def test_unknown_override_key_raises_naming_it():
    with pytest.raises(ValueError, match="'litrt'"):  # told from a format when the caller says which there are
        tolerance_for("fp32", "litert", {"litrt": {"atol": 1.0}}, formats=("onnx", "litert"))
    # without that list, another format's key is passed over: it does not apply to this one
    assert tolerance_for("fp32", "litert", {"onnx": {"atol": 1.0}}) == tolerance_for("fp32", "litert")
    with pytest.raises(ValueError, match="'litert-int4'"):
        tolerance_for("fp32", "litert", {"litert-int4": {"atol": 1.0}})
    with pytest.raises(ValueError, match="'atoll'"):
        tolerance_for("fp32", "litert", {"litert": {"atoll": 1.0}})
    with pytest.raises(ValueError, match="unknown variant 'fp8'"):
        tolerance_for("fp8", "litert")
    with pytest.raises(ValueError, match="atol"):
        tolerance_for("fp32", "litert", {"fp32": {"atol": -1.0}})
    # a format the toolkit learns later is known once it is the one asked about
    assert tolerance_for("fp32", "coreml", {"coreml": {"atol": 1e-4}}).atol == 1e-4


# --------------------------------------------------------------------------- records

def test_failed_record_message_names_everything():
    y = toy_outputs()
    got = y.copy()
    got[7, 0] += 0.5
    tol = tolerance_for("fp16", "litert")
    rec = ParityRecord.checked("keras", "litert", "fp16", "litert-interpreter", "/x/model_fp16.tflite",
                               compare(y, got, tolerance=tol))
    assert rec.status == "failed" and not rec.passed
    msg = rec.message
    assert "\n" not in msg
    for part in ("FAIL", "keras/litert-fp16", "litert-interpreter", "on input 7",
                 f"expected {float(y[7, 0]):.6g}", f"got {float(got[7, 0]):.6g}", "atol 0.02"):
        assert part in msg, (part, msg)


def test_failed_record_without_element_failure_still_names_worst_input():
    ref = softmax(np.random.default_rng(4).normal(0, 2, (30, 10)))
    got = np.roll(ref, 1, axis=1)
    rec = ParityRecord.checked("torch", "onnx", "fp32", "onnxruntime-cpu", "m.onnx",
                               compare(ref, got, tolerance=Tolerance(min_cosine=0.999), task="classification"))
    assert rec.failed and "cosine" in rec.message and "input" in rec.message


def test_load_error_is_a_failed_record():
    rec = ParityRecord.failed_to_load("torch", "torchscript", "fp32", "torchscript-cpu", "/x/m.pt",
                                      RuntimeError("file is truncated"))
    assert rec.status == "failed" and rec.comparison is None
    assert "RuntimeError: file is truncated" in rec.message and "torch/torchscript" in rec.message


def test_skipped_record_needs_a_reason_and_a_known_skip_kind():
    rec = ParityRecord.skipped("torch", "tfjs", "int8", "tfjs int8 is not offered", skip="not-produced")
    assert rec.status == "skipped" and rec.message == "SKIPPED torch/tfjs-int8: tfjs int8 is not offered"
    with pytest.raises(ValueError, match="reason"):
        ParityRecord("torch", "tfjs", "int8", status="skipped")
    with pytest.raises(ValueError, match="skip"):
        ParityRecord.skipped("torch", "tfjs", "int8", "why", skip="lazy")
    with pytest.raises(ValueError):
        ParityRecord("torch", "onnx", "fp32")  # neither comparison, error nor reason


def test_record_json_round_trip():
    y = toy_outputs()
    rec = ParityRecord.checked("keras", "onnx", "fp32", "onnxruntime-cpu", "m.onnx", compare(y, y),
                               elapsed_s=0.25, details={"batch_sizes": [1, 16]})
    back = ParityRecord.from_json(json.loads(json.dumps(rec.to_json())))
    assert back.to_json() == rec.to_json()


# --------------------------------------------------------------------------- discrimination

def test_constant_outputs_are_not_discriminative():
    d = discrimination(np.full((100, 10), 0.1, np.float32) + 1e-8 * np.random.default_rng(5).random((100, 10)),
                       task="classification")
    assert d["discriminative"] is False
    assert "reference outputs barely vary: std" in d["reason"] and "< atol 1e-05" in d["reason"]
    assert d["rows_differing_fraction"] == 0.0
    assert "NOT discriminative" in describe_discrimination("keras", d)


def test_single_class_classifier_is_not_discriminative():
    ref = softmax(np.random.default_rng(6).normal(0, 0.5, (40, 10)) + np.eye(10)[3] * 10)
    d = discrimination(ref, task="classification")
    assert d["distinct_top1"] == 1 and not d["discriminative"] and "same top-1 class (3)" in d["reason"]


def test_varying_outputs_and_caught_perturbation_are_discriminative():
    rng = np.random.default_rng(7)
    x = rng.uniform(-2, 2, (64, 1))
    ref = 3.0 * x + 2.0
    perturbed = 3.0 * (1 + 1e-3) * x + 2.0 * (1 - 1e-3)  # weights nudged by 0.1 %
    d = discrimination(ref, perturbed, FP32, perturbation="weights x (1 + 1e-3)")
    assert d["discriminative"] is True and d["reason"] is None
    assert d["perturbation_caught"] is True and d["perturbation_max_abs"] > 1e-3
    assert d["rows_differing_fraction"] > 0.9
    json.dumps(d, allow_nan=False)
    assert "perturbed model (weights x (1 + 1e-3)) caught" in describe_discrimination("toy", d)


def test_perturbation_the_tolerance_misses_makes_the_set_not_discriminative():
    x = np.random.default_rng(8).uniform(-2, 2, (64, 1))
    ref = 3.0 * x + 2.0
    d = discrimination(ref, ref + 1e-7, FP32)
    assert d["perturbation_caught"] is False and not d["discriminative"]
    assert "a perturbed model passes the tolerance" in d["reason"]
    with pytest.raises(ValueError, match="perturbed outputs have shape"):
        discrimination(ref, ref[:5], FP32)


# --------------------------------------------------------------------------- a real runtime

def test_tampered_weight_fails_parity_in_onnxruntime(tmp_path):
    """A real ONNX model (y = xW + b) in onnxruntime passes against its numpy reference; the same
    model with one weight changed by 1e-3 fails, and the message points at a real row."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)
    w = rng.normal(0, 1, (64, 10)).astype(np.float32)
    b = rng.normal(0, 1, (10,)).astype(np.float32)
    x = rng.uniform(0, 1, (50, 64)).astype(np.float32)
    ref = x.astype(np.float64) @ w + b

    def run(weights):
        graph = helper.make_graph(
            [helper.make_node("Gemm", ["x", "w", "b"], ["y"])], "lin",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])],
            [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        path = tmp_path / "m.onnx"
        onnx.save(model, str(path))
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})[0]

    assert compare(ref, run(w), tolerance=FP32).passed
    tampered = w.copy()
    tampered[5, 2] += 1e-3
    c = compare(ref, run(tampered), tolerance=FP32)
    assert not c.passed
    assert "output 2" in c.failures[0]
    worst = c.metrics["worst_index"]
    assert worst == int(np.argmax(x[:, 5]))  # the row with the largest input on the tampered weight


# --------------------------------------------------------------------------- import isolation

BANNED = ("tensorflow", "torch", "keras", "jax", "mlflow", "onnxruntime", "onnx", "matplotlib", "pipeline",
          "exporters", "tf_keras", "litert_torch", "ai_edge_litert", "sklearn", "tensorflowjs")

PROBE = """
import json, sys
import numpy as np
import parity, parity.compare, parity.report
from parity import compare, ParityRecord, ParityReport, discrimination
y = np.arange(6, dtype=np.float32).reshape(3, 2)
rep = ParityReport([ParityRecord.checked("m", "litert", "fp32", "litert-interpreter", "m.tflite", compare(y, y))],
                   {"m": discrimination(y)})
rep.to_markdown(); rep.to_junit(); rep.to_json()
banned = set(sys.argv[1].split(","))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in banned)))
"""


@pytest.mark.parametrize("where", ["repo", "copied"])
def test_compare_and_report_import_no_framework(tmp_path, where):
    """In a fresh interpreter, importing and using parity.compare and parity.report loads none of the
    frameworks, MLflow, matplotlib, the pipeline or the exporters; also when the package is copied alone
    next to nothing else (as the edge agent carries it)."""
    if where == "repo":
        root = REPO
    else:
        root = tmp_path
        shutil.copytree(REPO / "parity", tmp_path / "parity", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-c", PROBE, ",".join(BANNED)], cwd=root, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_non_finite_values_fail_and_leave_the_other_metrics_honest():
    exp = np.linspace(-1, 1, 40).reshape(10, 4)
    got = exp.copy()
    got[2, 1] = np.nan
    got[7, 3] += 0.5
    c = compare(exp, got)
    assert not c.passed and c.metrics["n_nonfinite"] == 1
    assert c.metrics["max_abs"] == pytest.approx(0.5)             # the finite error, not the NaN's
    assert c.metrics["mean_abs"] == pytest.approx(0.5 / 39)       # over the 39 finite values
    assert (c.metrics["worst_index"], c.metrics["worst_output"]) == (7, 3)
    assert c.metrics["cosine"] < 1.0
    assert any("non-finite" in f for f in c.failures) and any("max abs error" in f for f in c.failures)


def test_a_value_exactly_at_a_bound_passes():
    exp = np.arange(-4, 4, dtype=np.float64).reshape(8, 1) / 2   # exact in binary
    tol = tolerance_for("fp32", "onnx", {"fp32": {"atol": 0.25, "rtol": None, "min_cosine": None}})
    assert compare(exp, exp + 0.25, tolerance=tol).passed
    assert not compare(exp, exp + 0.375, tolerance=tol).passed


def test_empty_outputs_and_task_are_reported():
    c = compare(np.zeros((3, 0)), np.zeros((3, 0)))
    assert not c.passed and "no values to compare" in c.failures[0]
    assert compare(np.ones((3, 2)), np.ones((3, 2)), task="classification").task == "classification"


def test_discrimination_judges_the_perturbation_by_the_tolerance_it_is_given():
    ref = np.linspace(-2, 2, 60).reshape(30, 2)
    pert = ref * (1 + 1e-3)
    assert discrimination(ref, pert)["perturbation_caught"] is True            # fp32 default: atol 1e-5
    loose = tolerance_for("fp32", "onnx", {"fp32": {"atol": 1.0, "rtol": None, "min_cosine": None}})
    d = discrimination(ref, pert, loose)
    assert d["perturbation_caught"] is False and not d["discriminative"] and "perturbed model" in d["reason"]
    assert d["atol"] == 1.0


def test_one_row_or_one_class_cannot_discriminate():
    d = discrimination(np.ones((1, 3)))
    assert not d["discriminative"] and "only 1 row" in d["reason"]
    probs = np.tile([[0.1, 0.7, 0.2]], (20, 1)) + np.linspace(0, 0.05, 20)[:, None] * [1, -1, 0]
    d = discrimination(probs, task="classification")
    assert d["distinct_top1"] == 1 and not d["discriminative"] and "same top-1 class" in d["reason"]


def test_a_checked_record_counts_its_rows_from_the_comparison():
    c = compare(np.ones((7, 2)), np.ones((7, 2)))
    rec = ParityRecord.checked("m", "onnx", "fp32", "onnxruntime-cpu", "/a", c)
    assert rec.n_rows == 7 and rec.passed
    skipped = ParityRecord.skipped("m", "tfjs", "fp16", "no such variant")
    assert skipped.skip == "excluded" and skipped.n_rows == 0


def test_probability_rows_judged_as_regression_get_a_hint_and_nothing_else_does():
    from parity.compare import probability_outputs, task_hint
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 4))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    outputs = {"probs": probs, "logits": logits, "score": probs[:, :1], "pair": np.stack([probs, probs], 1)}
    assert probability_outputs(outputs) == ["probs", "pair"]  # one column is not a distribution
    hint = task_hint("regression", {"probs": probs})
    assert hint.startswith("output probs looks like class probabilities") and "--task classification" in hint
    assert task_hint("classification", {"probs": probs}) is None
    assert task_hint("regression", {"logits": logits, "shifted": probs + 0.01}) is None
