"""The data stage: build train/test arrays and the parity inputs, refuse non-finite values.

numpy only (scikit-learn for its bundled digits), so it never imports a framework.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .spec import Spec


class DataError(ValueError):
    """Training data that cannot be used; says which array and what is wrong with it."""


def load_arrays(spec: Spec) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test (test arrays may be empty)."""
    opts, rng = spec.data.options, np.random.default_rng(spec.seed)
    if spec.data.source == "linear":
        n = int(opts.get("n_samples", 200))
        x = rng.normal(0.0, 1.0, size=(n, 1)).astype(np.float32)
        noise = rng.normal(0.0, float(opts.get("noise", 0.1)), size=(n, 1))
        y = (float(opts.get("slope", 3.0)) * x + float(opts.get("intercept", 2.0)) + noise).astype(np.float32)
    elif spec.data.source == "digits":
        from sklearn.datasets import load_digits
        digits = load_digits()
        x = (digits.images / float(opts.get("scale", 16.0))).astype(np.float32)
        y = digits.target.astype(np.int64)
    elif spec.data.source == "npz":
        path = Path(opts["path"])
        try:
            with np.load(path) as f:
                x, y = f["x"], f["y"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path}: expected an .npz file with arrays 'x' and 'y' ({e})") from None
        x = x.astype(np.float32)
    else:  # validated by the spec already
        raise DataError(f"unknown data source {spec.data.source!r}")
    check_finite({"x": x, "y": y}, spec.data.source)
    if len(x) != len(y):
        raise DataError(f"data source {spec.data.source!r}: x has {len(x)} rows but y has {len(y)}")
    return split(x, y, float(opts.get("test_fraction", 0.0)), rng)


def check_finite(arrays: dict[str, np.ndarray], source: str) -> None:
    for name, a in arrays.items():
        if np.issubdtype(a.dtype, np.floating):
            bad = ~np.isfinite(a)
            if bad.any():
                rows = np.unique(np.argwhere(bad)[:, 0])
                raise DataError(
                    f"data source {source!r}: {name} holds {int(bad.sum())} non-finite value(s) "
                    f"(NaN or inf) in row(s) {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}; "
                    f"expected finite numbers: clean or drop those rows before training")


def split(x, y, test_fraction, rng):
    n_test = int(round(len(x) * test_fraction))
    order = rng.permutation(len(x)) if n_test else np.arange(len(x))
    test, train = order[:n_test], order[n_test:]
    return {"x_train": x[train], "y_train": y[train], "x_test": x[test], "y_test": y[test]}


def parity_inputs(spec: Spec, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stored parity set: held-out rows, random draws from the input range, and the range's extremes.

    Returns `x` (all rows) and `kind` (0 held-out, 1 random, 2 extreme) so reports can say which is which.
    Batch-size edge cases (1 and the largest declared batch) are slices of `x` taken at verify time.
    """
    p = spec.parity
    rng = np.random.default_rng(spec.seed + 1)
    x_train = arrays["x_train"]
    held = arrays["x_test"] if len(arrays["x_test"]) else x_train
    held = held[: p.held_out_rows]
    low, high = p.input_range or (float(x_train.min()), float(x_train.max()))
    shape = x_train.shape[1:]
    rand = rng.uniform(low, high, size=(p.random_rows, *shape)).astype(np.float32)
    extremes = np.stack([np.full(shape, low), np.full(shape, high)]).astype(np.float32)
    x = np.concatenate([held, rand, extremes]).astype(np.float32)
    kind = np.concatenate([np.zeros(len(held)), np.ones(len(rand)), np.full(2, 2)]).astype(np.int8)
    return {"x": x, "kind": kind}
