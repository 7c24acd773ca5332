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


# ------------------------------------------------------------------------------------------- outputs
# A model's outputs are one array, or several named ones (a dict, a tuple, a Hugging Face ModelOutput).
# Stored reference outputs are one (rows, ...) array for one output, and for several the row-wise
# concatenation of each flattened in the model's order; the signature says how to split it again.

def flatten_outputs(value, to_array, *, names: list[str] | None = None, prefix: str = "") -> dict[str, np.ndarray]:
    """{name: array} of a model's output, in its own order: dict keys (nested ones as `a.b`), tuple
    positions as `output_N` (or the framework's `names`), one tensor as `output`. None entries are skipped."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        out: dict[str, np.ndarray] = {}
        for k, v in value.items():
            out.update(flatten_outputs(v, to_array, prefix=f"{prefix}{k}."))
        return out
    if isinstance(value, (tuple, list)):
        keys = names if names is not None and len(names) == len(value) else [f"output_{i}" for i in range(len(value))]
        out = {}
        for k, v in zip(keys, value):
            out.update(flatten_outputs(v, to_array, prefix=f"{prefix}{k}."))
        return out
    return {(prefix[:-1] if prefix else "output"): to_array(value)}


def one_or_named(outputs: dict[str, np.ndarray]):
    """The single array of a one-output model, the dict otherwise."""
    return next(iter(outputs.values())) if len(outputs) == 1 else outputs


def flat_rows(y: Inputs) -> np.ndarray:
    """One array of a model's outputs: itself for one output, the row-wise concatenation for several."""
    if not is_multi(y):
        return np.asarray(y)
    return np.concatenate([np.asarray(v).reshape(len(v), -1) for v in y.values()], axis=1)


def split_rows(flat: np.ndarray, per_row_shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The inverse of flat_rows, given each output's per-row shape."""
    out, at = {}, 0
    for name, shape in per_row_shapes.items():
        size = int(np.prod(shape)) if shape else 1
        out[name] = flat[:, at:at + size].reshape(len(flat), *shape)
        at += size
    return out


def structure(y: Inputs) -> dict[str, tuple]:
    """Names, per-row shapes and dtypes of a model's outputs, to compare two calls."""
    named = y if is_multi(y) else {"output": y}
    return {k: (tuple(np.shape(v)[1:]), str(np.asarray(v).dtype)) for k, v in named.items()}


# -------------------------------------------------------------------------------- binding to a model
# The data names its inputs after the npz's arrays; a model names them its own way (Keras input layers,
# a forward's parameters). The arrays are bound to the model's inputs by name, then, for a model of one
# input, by position (`model(x)`), as a user would call it.

class InputBindingError(ValueError):
    """Data whose arrays cannot be bound to the model's inputs: says both lists."""
    user_error = True


def bind_inputs(x: Inputs, model_inputs: list[str] | None, optional=()) -> tuple[Inputs, dict[str, str]]:
    """`x` in the form the model takes and the mapping used ({data name: model input}). `model_inputs`:
    the model's input names in its order, `optional` those it may go without (a forward's defaults);
    None: the model does not say (a subclassed model), and `x` goes as it is."""
    if model_inputs is None:
        if is_multi(x) and len(x) == 1:  # one array for a model that names nothing: model(x), as a user calls it
            (name, array), = x.items()
            return array, {name: "its one input (by position)"}
        return x, {}
    required = [k for k in model_inputs if k not in set(optional)]
    if not is_multi(x):
        if len(required) <= 1:
            return x, {}
        raise InputBindingError(f"the data has one input array; the model takes {len(required)} "
                                f"({', '.join(required)}): give one array per input, named after them")
    if set(required) <= set(x) and set(x) <= set(model_inputs):
        return {k: x[k] for k in model_inputs if k in x}, {k: k for k in model_inputs if k in x}
    if len(x) == 1 and len(required) <= 1 and model_inputs:
        (name, array), = x.items()
        return array, {name: f"{model_inputs[0]} (by position)"}
    missing, unknown = [k for k in required if k not in x], [k for k in x if k not in model_inputs]
    raise InputBindingError(f"the data's inputs ({', '.join(x)}) do not name the model's inputs "
                            f"({', '.join(model_inputs)}): "
                            + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                        + ([f"the model takes no {', '.join(unknown)}"] if unknown else []))
                            + "; expected one array per model input, named as the model names it")


def describe_binding(mapping: dict[str, str]) -> str:
    """"input_ids -> input_ids, x -> input_layer (by position)", or "" when every name is its own."""
    if all(k == v for k, v in mapping.items()):
        return ""
    return ", ".join(f"{k} -> {v}" for k, v in mapping.items())
