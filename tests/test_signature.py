"""Signatures check a feed before a runtime sees it; the runner base class batches for every format."""
import numpy as np
import pytest

from exporters.base import Artifact, BaseRunner, RunnerClosed
from parity.signature import InputMismatch, Signature, TensorSpec, batch_plan, pad_rows

SIG = Signature((TensorSpec("input_ids", "int32", (None, 8)), TensorSpec("mask", "bool", (None, 8))),
                (TensorSpec("logits", "float32", (None, 2)),))


def feed(n=3, **over):
    f = {"input_ids": np.arange(n * 8, dtype=np.int64).reshape(n, 8), "mask": np.ones((n, 8), bool)}
    f.update(over)
    return f


def test_a_good_feed_is_cast_to_the_signature_dtypes():
    out = SIG.prepare_feed(feed(), "m")
    assert out["input_ids"].dtype == np.int32 and out["mask"].dtype == np.bool_


@pytest.mark.parametrize("bad, words", [
    (lambda f: f.pop("mask"), ["missing 'mask'"]),
    (lambda f: f.update(extra=np.zeros((3, 8))), ["unknown 'extra'"]),
    (lambda f: f.update(mask=np.ones((3, 8, 1), bool)), ["'mask'", "expected rank 2", "[3, 8, 1]"]),
    (lambda f: f.update(mask=np.ones((3, 9), bool)), ["'mask'", "dimension 1 to be 8"]),
    (lambda f: f.update(mask=np.ones((4, 8), bool)), ["'mask' has 4 rows", "3"]),
    (lambda f: f.update(input_ids=np.zeros((3, 8), np.float32)), ["'input_ids'", "expected dtype int32", "float32"]),
    (lambda f: f.update(input_ids=np.full((3, 8), 2**40)), ["'input_ids'", "do not fit int32"]),
    (lambda f: f.update(mask=np.zeros((0, 8), bool), input_ids=np.zeros((0, 8), np.int32)), ["at least one row"]),
])
def test_a_bad_feed_names_the_input_and_the_expectation(bad, words):
    f = feed()
    bad(f)
    with pytest.raises(InputMismatch) as e:
        SIG.prepare_feed(f, "model m")
    assert str(e.value).startswith("model m: ")
    for w in words:
        assert w in str(e.value)


def test_signature_json_round_trip_and_description():
    assert Signature.from_json(SIG.to_json()) == SIG
    assert SIG.describe() == "input_ids: int32[N, 8], mask: bool[N, 8] -> logits: float32[N, 2]"
    with pytest.raises(ValueError, match="dtype 'complex64'"):
        TensorSpec("x", "complex64", (None,))


def test_batch_plans():
    assert batch_plan(37, None) == [(0, 37, 37)]
    assert batch_plan(16, (1, 16)) == [(0, 16, 16)]
    assert batch_plan(37, (1, 16)) == [(0, 16, 16), (16, 16, 16), (32, 5, 16)]
    assert batch_plan(7, (4,)) == [(0, 4, 4), (4, 3, 4)]
    assert batch_plan(6, (2, 8)) == [(0, 6, 8)]


def test_padding_repeats_the_last_real_row():
    a = np.arange(6).reshape(3, 2)
    assert pad_rows(a, 5).tolist() == [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]]
    assert pad_rows(a, 3) is a


class Fixed4(BaseRunner):
    """A fake runtime that only runs batches of 4 and records what it was fed."""
    runtime = "fake"

    def __init__(self):
        sig = Signature((TensorSpec("x", "float32", (4, 2)),), (TensorSpec("y", "float32", (4, 1)),))
        super().__init__(Artifact("m", "onnx", "fp32", "/x", "torch", "test"), sig, static_batches=(4,))
        self.calls = []

    def infer_impl(self, feed):
        x = feed["x"]
        self.calls.append(len(x))
        assert len(x) == 4
        return {"y": x.sum(axis=1, keepdims=True)}


@pytest.mark.parametrize("n", [1, 2, 4, 6, 7, 9])
def test_a_static_batch_artifact_gets_padded_chunks_and_the_right_rows_back(n):
    r = Fixed4()
    x = np.random.default_rng(n).normal(size=(n, 2)).astype(np.float32)
    y = r(x)
    np.testing.assert_allclose(y, x.sum(axis=1, keepdims=True), rtol=1e-6)  # a remainder of 2+ rows too
    assert r.calls == [4] * (-(-n // 4))


def test_a_closed_runner_and_a_bare_array_for_several_inputs_are_refused():
    r = Fixed4()
    with r:
        pass
    with pytest.raises(RunnerClosed, match="closed"):
        r(np.zeros((4, 2), np.float32))

    class Two(Fixed4):
        def __init__(self):
            super().__init__()
            self.signature = SIG
    with pytest.raises(InputMismatch, match="expected a feed of named arrays"):
        Two()(np.zeros((4, 2)))


def test_tensors_are_matched_by_name_then_by_shape_and_dtype_then_in_order():
    from parity.signature import describe_mapping, map_tensors
    model = (TensorSpec("input_ids", "int64", (None, 8)), TensorSpec("pixels", "float32", (None, 3, 4)))
    artifact = (TensorSpec("args_1", "float32", (None, 3, 4)), TensorSpec("args_0", "int32", (None, 8)))
    pairs, how = map_tensors(model, artifact)
    assert pairs == {"input_ids": "args_0", "pixels": "args_1"}  # not by position: that would swap them
    assert all("renamed" in h for h in how)
    same = (TensorSpec("a", "float32", (None, 2)), TensorSpec("b", "float32", (None, 2)))
    pairs, how = map_tensors(same, (TensorSpec("b", "float32", (None, 2)), TensorSpec("z", "float32", (None, 2))))
    assert pairs == {"b": "b", "a": "z"} and how == ["a -> z (renamed; the one float tensor of per-row shape [2])"]
    line = describe_mapping(Signature(model, (TensorSpec("logits", "float32", (None, 2)),)),
                            Signature(artifact, (TensorSpec("output_0", "float32", (None, 2)),)))
    assert line == ("input_ids -> args_0 (renamed), int64 as int32; pixels -> args_1 (renamed); "
                    "logits <- output_0 (renamed)")
