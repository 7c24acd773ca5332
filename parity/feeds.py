"""Model inputs as stored and handed around: one array for a one-input model, or a dict of named
arrays (token ids, a mask, an image) with one row count. These helpers let every stage treat both
alike, and keep several inputs in one .npz as "<prefix>:<name>" entries. numpy only.
"""
from __future__ import annotations

from typing import Mapping, Union

import numpy as np

Inputs = Union[np.ndarray, dict]


def is_multi(x: Inputs) -> bool:
    return isinstance(x, Mapping)


def n_rows(x: Inputs) -> int:
    return len(next(iter(x.values()))) if is_multi(x) else len(x)


def take(x: Inputs, rows) -> Inputs:
    """Rows of every input: a slice, an index array or a boolean mask."""
    return {k: v[rows] for k, v in x.items()} if is_multi(x) else x[rows]


def concat(parts: list[Inputs]) -> Inputs:
    if is_multi(parts[0]):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


def row_shapes(x: Inputs) -> Union[list, dict]:
    """Each input's per-row shape: a list for one input, {name: list} for several."""
    return {k: list(v.shape[1:]) for k, v in x.items()} if is_multi(x) else list(x.shape[1:])


def pack(prefix: str, x: Inputs) -> dict[str, np.ndarray]:
    """Entries for np.savez: {prefix: x}, or {"prefix:name": array} per input."""
    return {f"{prefix}:{k}": v for k, v in x.items()} if is_multi(x) else {prefix: x}


def unpack(entries: Mapping[str, np.ndarray], prefix: str) -> Inputs:
    """The inverse of pack, from an opened .npz (or any mapping of its entries)."""
    if prefix in entries:
        return entries[prefix]
    named = {k.split(":", 1)[1]: entries[k] for k in entries if k.startswith(prefix + ":")}
    if not named:
        raise KeyError(f"no '{prefix}' inputs among {sorted(entries)}")
    return named
