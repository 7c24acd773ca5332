"""The data and parity_set steps: the spec's arrays, and the inputs every artifact is checked on."""
from __future__ import annotations

import numpy as np

from parity.feeds import is_multi, n_rows, pack, row_shapes

from .. import data as data_mod
from ..spec_slice import from_slice
from ..stage_run import Context
from ..training import n_outputs
from .common import load_arrays


def run_data(ctx: Context, spec: dict, need_targets: bool) -> dict:
    spec = from_slice(spec)
    arrays = data_mod.load_arrays(spec, need_targets=need_targets)
    np.savez(ctx.out / "arrays.npz", **{k: v for name, a in arrays.items() for k, v in pack(name, a).items()})
    x, y = arrays["x_train"], arrays.get("y_train")
    shapes = row_shapes(x)
    return {"n_train": n_rows(x), "n_test": n_rows(arrays["x_test"]), "input_shape": shapes,
            "n_outputs": None if y is None else n_outputs(spec.data.task, y),
            "x_dtype": {k: str(v.dtype) for k, v in x.items()} if is_multi(x) else str(x.dtype),
            "y_dtype": None if y is None else str(y.dtype), "targets": y is not None,
            "summary": f"{n_rows(x)} train rows, {n_rows(arrays['x_test'])} test rows, input "
                       f"{shapes if is_multi(x) else tuple(shapes)}"}


def run_parity_set(ctx: Context, spec: dict) -> dict:
    spec = from_slice(spec)
    ps = data_mod.parity_inputs(spec, load_arrays(ctx))
    np.savez(ctx.out / "parity_inputs.npz", **pack("x", ps["x"]), kind=ps["kind"])
    return {"rows": n_rows(ps["x"]), "held_out": int((ps["kind"] == 0).sum()),
            "random": int((ps["kind"] == 1).sum()), "extremes": int((ps["kind"] == 2).sum()),
            "summary": f"{n_rows(ps['x'])} parity rows"}
