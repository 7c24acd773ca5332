"""The data stage: build train/test arrays and the parity inputs, refuse non-finite values.

numpy only (scikit-learn for its bundled digits), so it never imports a framework.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from parity.feeds import is_multi, n_rows, take

from .spec import Spec, SpecError


class DataError(SpecError):
    """Training data that cannot be used; says which file, which array, what was found and what was
    expected. A user's input problem: the command line exits 2 with the message alone."""
    user_error = True


def load_arrays(spec: Spec, need_targets: bool | None = None) -> dict[str, np.ndarray]:
    """x_train, y_train, x_test, y_test (test arrays may be empty). Targets are optional when no model
    trains (`need_targets`; by default, unless every model of the spec is pretrained)."""
    if need_targets is None:
        need_targets = not all(m.pretrained for m in spec.models)
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
        # targets are optional when every model is pretrained: parity needs inputs only
        x, y = read_npz(Path(opts["path"]), need_y=need_targets,
                        inputs=opts.get("inputs"))
    else:  # validated by the spec already
        raise DataError(f"unknown data source {spec.data.source!r}")
    where = opts.get("path") or f"data source {spec.data.source!r}"
    x, y = checked_arrays(x, y, spec.data.task, where)
    return split(x, y, float(opts.get("test_fraction", 0.0)), rng)


def _arrays_at(path: Path):
    """An open .npz, or {stem: array} of a folder's .npy files (as a context manager either way)."""
    import contextlib
    if path.is_dir():
        return contextlib.nullcontext({p.stem: np.load(p, allow_pickle=False) for p in sorted(path.glob("*.npy"))})
    return np.load(path, allow_pickle=False)


def read_npz(path: Path, need_y: bool = True, inputs: list[str] | None = None):
    """(x, y): x one array, or {name: array} for the spec's named inputs; y None where there is none.
    `path` is an .npz file, or a folder of .npy files named after the arrays (x.npy or input_ids.npy, y.npy)."""
    names = inputs or ["x"]
    try:
        with _arrays_at(path) as f:
            files = set(f.keys()) if isinstance(f, dict) else set(f.files)
            missing = [k for k in names + (["y"] if need_y else []) if k not in files]
            if missing:
                raise DataError(f"{path}: expected arrays {', '.join(map(repr, names + (['y'] if need_y else [])))}"
                                f", found {sorted(files)} (missing {', '.join(map(repr, missing))})")
            x = {n: f[n] for n in names} if inputs else f["x"]
            return x, (f["y"] if "y" in files else None)
    except FileNotFoundError:
        raise DataError(f"{path}: expected an .npz file with arrays 'x' and 'y', found no such file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: expected an .npz file with arrays 'x' and 'y', found an unreadable file "
                        f"({e})") from None


def checked_arrays(x, y, task: str, where: str):
    """Inputs as rows (one float32 array, or named inputs each keeping an integer or bool dtype: token ids
    stay ids); targets in the one shape every framework trains on: regression (N, outputs) float32,
    classification (N,) int64 class ids 0..K-1. Refuses what cannot be brought there."""
    if isinstance(x, dict):
        x = {name: _checked_input(a, name, where) for name, a in x.items()}
        counts = {name: len(a) for name, a in x.items()}
        if len(set(counts.values())) != 1:
            raise DataError(f"{where}: expected every input to have the same number of rows, found "
                            + ", ".join(f"'{n}' {c}" for n, c in counts.items()))
        check_finite(x, where)
    else:
        x = _float_input(x, where)
    return x, _checked_targets(y, n_rows(x), task, where)


def _checked_input(a, name: str, where: str) -> np.ndarray:
    a = np.asarray(a)
    if not _numeric(a):
        raise DataError(f"{where}: array '{name}': expected numbers, found dtype {a.dtype}")
    if a.ndim == 0 or len(a) == 0:
        raise DataError(f"{where}: array '{name}': expected one row per sample, found shape {a.shape}")
    a = a.reshape(-1, 1) if a.ndim == 1 else a
    return a.astype(np.float32) if a.dtype.kind == "f" else a


def _float_input(x, where: str) -> np.ndarray:
    x = np.asarray(x)
    if not _numeric(x):
        raise DataError(f"{where}: array 'x': expected numbers, found dtype {x.dtype}")
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"{where}: array 'x': expected one row per sample, found shape {x.shape}")
    x = (x.reshape(-1, 1) if x.ndim == 1 else x).astype(np.float32)
    check_finite({"x": x}, where)
    return x


def _checked_targets(y, rows: int, task: str, where: str):
    if y is None:  # inputs only (pretrained models): nothing to train or score against
        return None
    y = np.asarray(y)
    if y.ndim == 0 or len(y) != rows:
        raise DataError(f"{where}: array 'y': expected {rows} rows (one per row of the inputs), found shape {y.shape}")
    if not _numeric(y):
        what = "class ids 0..K-1 (map labels such as strings to integers first)" if task == "classification" \
            else "numbers"
        raise DataError(f"{where}: array 'y': expected {what}, found dtype {y.dtype}")
    check_finite({"y": y}, where)
    if task == "classification":
        if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
            raise DataError(f"{where}: array 'y': expected one class id per row, shape ({len(y)},) or "
                            f"({len(y)}, 1), found shape {y.shape} (one-hot targets: take argmax first)")
        y = y.reshape(-1)
        if np.issubdtype(y.dtype, np.floating) and not np.array_equal(y, np.round(y)):
            bad = int(np.argmax(y != np.round(y)))
            raise DataError(f"{where}: array 'y': expected integer class ids for classification, found "
                            f"fractional values (row {bad}: {y[bad]!r}); for real-valued targets use "
                            f"task = \"regression\"")
        if (y < 0).any():
            bad = int(np.argmax(y < 0))
            raise DataError(f"{where}: array 'y': expected class ids 0..K-1, found {y[bad]!r} in row {bad}")
        return y.astype(np.int64)
    y = y.reshape(-1, 1) if y.ndim == 1 else y.reshape(len(y), -1)
    return y.astype(np.float32)


def _numeric(a: np.ndarray) -> bool:
    return a.dtype.kind in "biuf"


def check_finite(arrays: dict[str, np.ndarray], where: str) -> None:
    for name, a in arrays.items():
        if np.issubdtype(a.dtype, np.floating):
            bad = ~np.isfinite(a)
            if bad.any():
                rows = np.unique(np.argwhere(bad)[:, 0])
                raise DataError(
                    f"{where}: array '{name}' holds {int(bad.sum())} non-finite value(s) "
                    f"(NaN or inf) in row(s) {rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}; "
                    f"expected finite numbers: clean or drop those rows before training")


def split(x, y, test_fraction, rng):
    rows = n_rows(x)
    n_test = int(round(rows * test_fraction))
    order = rng.permutation(rows) if n_test else np.arange(rows)
    test, train = order[:n_test], order[n_test:]
    out = {"x_train": take(x, train), "x_test": take(x, test)}
    if y is not None:
        out.update(y_train=y[train], y_test=y[test])
    return out


def parity_inputs(spec: Spec, arrays: dict) -> dict:
    """The stored parity set: held-out rows, random draws from the inputs' ranges, and the extremes.

    Returns `x` (all rows; {name: array} for several inputs) and `kind` (0 held-out, 1 random,
    2 extreme) so reports can say which is which. Batch-size edge cases (1 and the largest declared
    batch) are slices of `x` taken at verify time.
    """
    p = spec.parity
    rng = np.random.default_rng(spec.seed + 1)
    x_train = arrays["x_train"]
    held = arrays["x_test"] if n_rows(arrays["x_test"]) else x_train
    held = take(held, slice(0, p.held_out_rows))
    if is_multi(x_train):
        x = {}
        for name, a in x_train.items():
            stated = p.inputs.get(name, {})
            dtype = np.dtype(stated.get("dtype") or a.dtype)
            drawn = _drawn_rows(a.astype(dtype), p.random_rows, rng, stated.get("range"))
            x[name] = np.concatenate([held[name].astype(dtype), *drawn]).astype(dtype)
    else:
        stated = p.inputs.get("x", {})
        low, high = stated.get("range") or p.input_range or (float(x_train.min()), float(x_train.max()))
        shape = x_train.shape[1:]
        rand = rng.uniform(low, high, size=(p.random_rows, *shape)).astype(np.float32)
        extremes = np.stack([np.full(shape, low), np.full(shape, high)]).astype(np.float32)
        x = np.concatenate([held, rand, extremes]).astype(np.dtype(stated.get("dtype") or np.float32))
    n_held = n_rows(held)
    kind = np.concatenate([np.zeros(n_held), np.ones(p.random_rows), np.full(2, 2)]).astype(np.int8)
    return {"x": x, "kind": kind}


def _drawn_rows(a: np.ndarray, n: int, rng, stated_range=None) -> tuple[np.ndarray, np.ndarray]:
    """Random rows and two extreme rows for one input, in its own kind of values: floats from its range,
    ids from its range of ids, 0/1 masks as real padding patterns (ones, then zeros). A stated range
    ([parity.inputs.<name>] range) replaces the one the data shows (for ids: the vocabulary, say)."""
    shape = a.shape[1:]
    if a.dtype.kind == "f":
        lo, hi = stated_range or (float(a.min()), float(a.max()))
        return rng.uniform(lo, hi, size=(n, *shape)).astype(a.dtype), \
            np.stack([np.full(shape, lo), np.full(shape, hi)]).astype(a.dtype)
    if _is_padding_mask(a) and stated_range is None:
        width = shape[-1]
        keep = rng.integers(1, width + 1, size=(n, *shape[:-1], 1))
        rows = (np.arange(width) < keep).astype(a.dtype)
        first_only = np.zeros(shape, a.dtype)
        first_only[..., 0] = 1
        return rows, np.stack([np.ones(shape, a.dtype), first_only])
    lo, hi = (int(v) for v in stated_range) if stated_range else (int(a.min()), int(a.max()))
    return rng.integers(lo, hi + 1, size=(n, *shape)).astype(a.dtype), \
        np.stack([np.full(shape, lo), np.full(shape, hi)]).astype(a.dtype)


def _is_padding_mask(a: np.ndarray) -> bool:
    """0/1 values where every row is ones then zeros along its last axis (an attention mask)."""
    if a.ndim < 2 or a.size == 0 or not np.isin(a, (0, 1)).all():
        return False
    return bool((np.diff(a.astype(np.int8), axis=-1) <= 0).all() and (a[..., 0] == 1).all())
