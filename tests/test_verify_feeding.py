"""How an artifact is fed and what the parity set holds: batch 1, the largest declared batch, then the
rest; held-out rows, random draws from the input range and the range's two extremes."""
import numpy as np

from exporters.base import Artifact
from exporters.verify import check_artifact, feed_cuts
from parity.compare import tolerance_for
from pipeline.data import parity_inputs
from pipeline.spec import load


class SpyRunner:
    def __init__(self, log):
        self.log = log

    def __call__(self, x):
        self.log.append(len(x))
        return x.reshape(len(x), -1).sum(axis=1, keepdims=True)

    def close(self):
        self.log.append("closed")


class SpyModule:
    def __init__(self):
        self.log = []

    def load(self, artifact, runtime):
        return SpyRunner(self.log)


def reference(n):
    x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    return {"x": x, "y": x.sum(axis=1, keepdims=True), "kind": np.zeros(n, np.int8)}


def test_an_artifact_is_fed_batch_1_then_the_largest_batch_then_the_rest():
    module, art = SpyModule(), Artifact("m", "onnx", "fp32", "/nowhere", "torch", "test")
    rec, got, env = check_artifact(module, art, "spy", reference(40), tolerance_for("fp32", "onnx"),
                                   task="regression", max_batch=16)
    # the parity feeds first; then, the artifact having passed, its profile times batch 1 and the
    # largest batch (2 warm-ups each and 20 and 10 timed calls) before the runner is closed
    assert module.log == [1, 16, 23] + [1] * 22 + [16] * 12 + ["closed"]
    assert rec.passed and env is None and got.shape == (40, 1)
    assert rec.details["feeds"] == [1, 16, 23] and rec.details["profile"]["max_batch"]["rows"] == 16
    module = SpyModule()
    check_artifact(module, art, "spy", reference(40), tolerance_for("fp32", "onnx"), task="regression",
                   max_batch=16, profiled=False)
    assert module.log == [1, 16, 23, "closed"]


def test_feeding_small_parity_sets():
    assert feed_cuts(1, 16) == [(0, 1)]
    assert feed_cuts(10, 16) == [(0, 1), (1, 10)]
    assert feed_cuts(17, 16) == [(0, 1), (1, 17)]
    assert feed_cuts(18, 16) == [(0, 1), (1, 17), (17, 18)]


def test_a_runner_that_mixes_up_rows_fails():
    class Shuffled(SpyModule):
        def load(self, artifact, runtime):
            inner = SpyRunner(self.log)
            return lambda x: inner(x)[::-1]
    art = Artifact("m", "onnx", "fp32", "/nowhere", "torch", "test")
    rec, _, _ = check_artifact(Shuffled(), art, "spy", reference(40), tolerance_for("fp32", "onnx"),
                               task="regression", max_batch=16)
    assert rec.failed and "max abs error" in rec.message


def test_the_parity_set_holds_held_out_rows_random_draws_and_both_extremes():
    spec = load("toy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 1)).astype(np.float32)
    arrays = {"x_train": x[:80], "y_train": x[:80], "x_test": x[80:], "y_test": x[80:]}
    ps = parity_inputs(spec, arrays)
    kinds, rows = ps["kind"], ps["x"]
    held = min(spec.parity.held_out_rows, 20)
    assert (kinds == 0).sum() == held and np.array_equal(rows[kinds == 0], x[80:80 + held])
    assert (kinds == 1).sum() == spec.parity.random_rows
    low, high = spec.parity.input_range
    random_rows = rows[kinds == 1]
    assert random_rows.min() >= low and random_rows.max() <= high and random_rows.std() > 0.5
    assert (kinds == 2).sum() == 2 and rows[kinds == 2].tolist() == [[low], [high]]


def test_the_check_passes_task_labels_kinds_and_tolerance_through_and_names_the_cell():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (40, 5)).astype(np.float32)
    labels = logits.argmax(1).astype(np.int64)
    labels[20:] = -1
    ref = {"x": logits, "y": logits, "kind": np.r_[np.zeros(20), np.ones(20)].astype(np.int8), "labels": labels}

    class Identity(SpyModule):
        def load(self, artifact, runtime):
            return lambda x: x[:, ::-1] if runtime == "flipped" else x
    art = Artifact("net", "litert", "int8", "/a/model.tflite", "torch", "litert-torch", batch_sizes=[1, 16])
    loose = tolerance_for("int8", "litert")
    rec, _, _ = check_artifact(Identity(), art, "identity", ref, loose, task="classification", max_batch=16)
    assert rec.passed and rec.comparison.task == "classification" and "top1_agreement" in rec.comparison.metrics
    assert (rec.model, rec.format, rec.variant, rec.runtime, rec.artifact) == \
        ("net", "litert", "int8", "identity", "/a/model.tflite")
    assert rec.comparison.tolerance == loose and rec.details["batch_sizes"] == [1, 16]
    bad, _, _ = check_artifact(Identity(), art, "flipped", ref, loose, task="classification", max_batch=16)
    assert bad.failed and any("top-1 agreement" in f for f in bad.comparison.failures)
    assert any("accuracy" in f for f in bad.comparison.failures)  # the held-out labels were used
    assert "(held-out)" in bad.message or "(random)" in bad.message  # the row kinds were used


def test_a_runner_that_cannot_load_or_run_is_a_failed_record_not_a_crash():
    from exporters.base import ArtifactLoadError, RuntimeUnavailable

    class Broken(SpyModule):
        def __init__(self, error):
            super().__init__()
            self.error = error

        def load(self, artifact, runtime):
            raise self.error
    art = Artifact("m", "tfjs", "fp32", "/nowhere", "torch", "test")
    for error, env in ((ArtifactLoadError("truncated"), None), (RuntimeUnavailable("node is missing"), "node is missing"),
                       (ImportError("no onnxruntime"), "ImportError: no onnxruntime")):
        rec, got, why = check_artifact(Broken(error), art, "spy", reference(5), tolerance_for("fp32", "tfjs"),
                                       task="regression", max_batch=16)
        assert rec.failed and got is None and why == env and type(error).__name__ in rec.error
