"""Signatures: a model's (or an artifact's) inputs and outputs as named tensors.

A TensorSpec has a name, a dtype, a shape whose first dimension is the batch (None where a dimension
is dynamic) and an optional layout tag ("NCHW", "NHWC"). A Signature checks a feed before any runtime
sees it, so a wrong name, dtype or rank is named in one sentence rather than surfacing as a runtime's
traceback. numpy and the standard library only: the pipeline, the exporters, the servers and the
edge agent all use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

DTYPES = ("float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool")
# dtype changes a feed may take without losing meaning: the artifact's dtype given the caller's
SAFE_CASTS = {
    "float32": {"float16", "float64", "int8", "uint8", "int32", "int64", "bool"},
    "float16": {"float32", "float64"},
    "float64": {"float16", "float32"},
    "int32": {"int8", "uint8", "int64", "bool"},
    "int64": {"int8", "uint8", "int32", "bool"},
    "int8": {"bool"},
    "uint8": {"bool"},
    "bool": set(),
}


class InputMismatch(ValueError):
    """A feed that does not fit a signature: names the input and says what was expected and found."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | None, ...]  # shape[0] is the batch dimension
    layout: str | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r}, expected one of {', '.join(DTYPES)}")
        if len(self.shape) < 1:
            raise ValueError(f"tensor {self.name!r}: expected a shape with a batch dimension, found ()")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def describe(self) -> str:
        dims = ", ".join("N" if i == 0 and d is None else ("?" if d is None else str(d))
                         for i, d in enumerate(self.shape))
        return f"{self.name}: {self.dtype}[{dims}]" + (f" {self.layout}" if self.layout else "")

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "layout": self.layout}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(None if v is None else int(v) for v in d["shape"]), d.get("layout"))

    @classmethod
    def of(cls, name: str, array: np.ndarray, *, dynamic_batch: bool = True, layout: str | None = None) -> "TensorSpec":
        """The spec of an example batch: its dtype and per-row shape, the batch left dynamic."""
        a = np.asarray(array)
        return cls(name, dtype_name(a.dtype), (None if dynamic_batch else a.shape[0], *a.shape[1:]), layout)


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = field(default=())

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def describe(self) -> str:
        return (", ".join(t.describe() for t in self.inputs) + " -> "
                + (", ".join(t.describe() for t in self.outputs) or "?"))

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Signature":
        return cls(tuple(TensorSpec.from_json(t) for t in d.get("inputs", [])),
                   tuple(TensorSpec.from_json(t) for t in d.get("outputs", [])))

    def prepare_feed(self, feed: Mapping[str, Any], where: str) -> dict[str, np.ndarray]:
        """Check a feed (names, dtypes, ranks, fixed dimensions, one row count) and cast each array to
        the dtype this signature takes. Raises InputMismatch naming the first problem."""
        if not isinstance(feed, Mapping):
            raise InputMismatch(f"{where}: expected a feed of named arrays ({', '.join(self.input_names)}), "
                                f"found {type(feed).__name__}")
        missing = [n for n in self.input_names if n not in feed]
        extra = [n for n in feed if n not in self.input_names]
        if missing or extra:
            parts = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + \
                    ([f"unknown {', '.join(map(repr, extra))}"] if extra else [])
            raise InputMismatch(f"{where}: expected inputs {', '.join(map(repr, self.input_names))}; "
                                f"{' and '.join(parts)}")
        out, rows = {}, None
        for spec in self.inputs:
            a = np.asarray(feed[spec.name])
            found = dtype_name(a.dtype) if a.dtype.kind in "biuf" else str(a.dtype)
            if a.ndim != spec.rank:
                raise InputMismatch(f"{where}: input {spec.name!r}: expected rank {spec.rank} "
                                    f"({spec.describe()}), found shape {list(a.shape)}")
            for i, (want, got) in enumerate(zip(spec.shape, a.shape)):
                if want is not None and want != got and i > 0:
                    raise InputMismatch(f"{where}: input {spec.name!r}: expected dimension {i} to be {want} "
                                        f"({spec.describe()}), found shape {list(a.shape)}")
            if a.shape[0] < 1:
                raise InputMismatch(f"{where}: input {spec.name!r}: expected at least one row, found shape "
                                    f"{list(a.shape)}")
            if rows is not None and a.shape[0] != rows:
                raise InputMismatch(f"{where}: input {spec.name!r} has {a.shape[0]} rows, the other inputs "
                                    f"{rows}: expected one row count for every input")
            rows = a.shape[0]
            if found != spec.dtype:
                if found not in SAFE_CASTS[spec.dtype] and not _fits(a, spec.dtype):
                    raise InputMismatch(f"{where}: input {spec.name!r}: expected dtype {spec.dtype}, found "
                                        f"{found}")
                a = cast_checked(a, spec.dtype, f"{where}: input {spec.name!r}")
            out[spec.name] = np.ascontiguousarray(a)
        return out


def dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise InputMismatch(f"dtype {name} is not one of {', '.join(DTYPES)}")
    return name


def _fits(a: np.ndarray, dtype: str) -> bool:
    return a.dtype.kind in "biu" and dtype in ("int8", "int32", "int64", "uint8")


def cast_checked(a: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """Cast, refusing integer values the target cannot hold (int64 ids past int32's range, say)."""
    target = np.dtype(dtype)
    if a.dtype.kind in "biu" and target.kind in "iu" and a.size:
        info = np.iinfo(target)
        lo, hi = a.min(), a.max()
        if lo < info.min or hi > info.max:
            raise InputMismatch(f"{where}: values {lo}..{hi} do not fit {dtype} ({info.min}..{info.max})")
    return a.astype(target, copy=False)


def batch_plan(n_rows: int, static_batches: tuple[int, ...] | None) -> list[tuple[int, int, int]]:
    """How to feed n_rows to an artifact that only takes these batch sizes: (start, rows, size) per
    call, `size - rows` padding rows in the last call. None: any batch, in one call. Chunks of the
    largest size, the remainder in the smallest size that holds it."""
    if not static_batches or n_rows in static_batches:
        return [(0, n_rows, n_rows)]
    sizes = sorted(static_batches)
    plan, start = [], 0
    while start < n_rows:
        rest = n_rows - start
        size = sizes[-1] if rest >= sizes[-1] else next(s for s in sizes if s >= rest)
        rows = min(size, rest)
        plan.append((start, rows, size))
        start += rows
    return plan


def pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    """Fill a chunk up to `size` rows by repeating its last row: rows are independent at inference,
    and a real row keeps every value in range (zeros may not be, for ids or a log)."""
    if len(a) >= size:
        return a
    return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)])


def map_tensors(model: tuple[TensorSpec, ...], artifact: tuple[TensorSpec, ...]) -> tuple[dict[str, str], list[str]]:
    """Match an artifact's tensors to the model's by meaning, not luck: the same name first, then the
    one tensor of the same per-row shape and dtype family, then what is left in order. Returns
    {model name: artifact name} and how each pair was matched."""
    def family(t: TensorSpec) -> str:
        return "float" if t.dtype.startswith("float") else ("bool" if t.dtype == "bool" else "int")

    def rows(t: TensorSpec) -> tuple:
        return t.shape[1:]

    pairs: dict[str, str] = {}
    how: list[str] = []
    left = [a for a in artifact]
    for m in model:
        same = next((a for a in left if a.name == m.name), None)
        if same is not None:
            pairs[m.name] = same.name
            left.remove(same)
    for m in model:
        if m.name in pairs:
            continue
        alike = [a for a in left if rows(a) == rows(m) and family(a) == family(m)]
        if len(alike) == 1 and sum(1 for o in model if o.name not in pairs and rows(o) == rows(m)
                                   and family(o) == family(m)) == 1:
            pairs[m.name] = alike[0].name
            left.remove(alike[0])
            how.append(f"{m.name} -> {alike[0].name} (renamed; the one {family(m)} tensor of per-row shape "
                       f"{list(rows(m))})")
    for m in model:
        if m.name not in pairs and left:
            a = left.pop(0)
            pairs[m.name] = a.name
            how.append(f"{m.name} -> {a.name} (by position)")
    return pairs, how


def describe_mapping(model: Signature, artifact: Signature) -> str:
    """One line for a report: how the artifact's inputs and outputs relate to the model's (names kept or
    renamed, dtype casts, shapes that differ)."""
    parts = []
    for side, (m_specs, a_specs) in (("in", (model.inputs, artifact.inputs)), ("out", (model.outputs, artifact.outputs))):
        pairs, _ = map_tensors(m_specs, a_specs)
        by_name = {a.name: a for a in a_specs}
        for m in m_specs:
            a = by_name.get(pairs.get(m.name, ""))
            if a is None:
                parts.append(f"{m.name}: no matching {side}put")
                continue
            bits = [f"{m.name} {'->' if side == 'in' else '<-'} {a.name}" + ("" if a.name == m.name else " (renamed)")]
            if a.dtype != m.dtype:
                bits.append(f"{m.dtype} as {a.dtype}")
            unknown = a.shape == (None,) and len(m.shape) > 1  # a runtime that does not say (TF.js outputs)
            if not unknown and (len(a.shape) != len(m.shape) or any(
                    x is not None and y is not None and x != y for x, y in zip(a.shape[1:], m.shape[1:]))):
                bits.append(f"shape {list(m.shape[1:])} as {list(a.shape[1:])}")
            parts.append(", ".join(bits))
    return "; ".join(parts)
