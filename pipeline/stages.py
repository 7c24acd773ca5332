"""The stages of a spec and what each one does. Stage functions receive a runner Context, write
their outputs into ctx.out and return facts (JSON) that later stages, the run record and MLflow read.
"""
from __future__ import annotations

import json
import time

import numpy as np

from . import data as data_mod
from .runner import Context, Stage
from .spec import ModelSpec, Spec
from .training import check_acceptance, n_outputs, task_metrics, write_history

DATA_CODE = ("pipeline/data.py",)
TRAIN_CODE = ("pipeline/frameworks.py", "pipeline/training.py", "pipeline/tracking.py")


def build_stages(spec: Spec) -> list[Stage]:
    """Every stage of a spec, upstream first."""
    stages = [
        Stage("data", "data", {"source": spec.data.source, "task": spec.data.task, "seed": spec.seed,
                               "options": spec.data.options, "file": _data_file_digest(spec)},
              DATA_CODE, lambda ctx: run_data(ctx, spec)),
        Stage("parity_set", "parity_set", {"parity": _parity_settings(spec), "seed": spec.seed},
              DATA_CODE, lambda ctx: run_parity_set(ctx, spec), inputs=("data",)),
    ]
    for m in spec.models:
        stages.append(Stage(
            f"train:{m.name}", "train",
            {"framework": m.framework, "factory": m.factory, "factory_source": m.factory_source_hash(),
             "params": m.params, "train": m.train.__dict__, "accept": [b.__dict__ for b in m.accept],
             "seed": spec.seed, "task": spec.data.task},
            TRAIN_CODE, lambda ctx, m=m: run_train(ctx, spec, m), inputs=("data",), lane=m.name))
        stages.append(Stage(
            f"reference:{m.name}", "reference", {"perturbation": PERTURBATION},
            TRAIN_CODE, lambda ctx, m=m: run_reference(ctx, spec, m),
            inputs=("data", "parity_set", f"train:{m.name}"), lane=m.name))
    return stages


def _data_file_digest(spec: Spec) -> str | None:
    from .cache import file_digest
    from pathlib import Path
    path = spec.data.options.get("path")
    return file_digest(Path(path)) if path and Path(path).is_file() else None


def _parity_settings(spec: Spec) -> dict:
    p = spec.parity
    return {"held_out_rows": p.held_out_rows, "random_rows": p.random_rows, "input_range": p.input_range,
            "max_batch": p.max_batch}


# --------------------------------------------------------------------------- data

def run_data(ctx: Context, spec: Spec) -> dict:
    arrays = data_mod.load_arrays(spec)
    np.savez(ctx.out / "arrays.npz", **arrays)
    x, y = arrays["x_train"], arrays["y_train"]
    return {"n_train": len(x), "n_test": len(arrays["x_test"]), "input_shape": list(x.shape[1:]),
            "n_outputs": n_outputs(spec.data.task, y), "x_dtype": str(x.dtype), "y_dtype": str(y.dtype),
            "summary": f"{len(x)} train rows, {len(arrays['x_test'])} test rows, input {tuple(x.shape[1:])}"}


def load_arrays(ctx: Context) -> dict[str, np.ndarray]:
    with np.load(ctx.input_dir("data") / "arrays.npz") as f:
        return {k: f[k] for k in f.files}


def run_parity_set(ctx: Context, spec: Spec) -> dict:
    ps = data_mod.parity_inputs(spec, load_arrays(ctx))
    np.savez(ctx.out / "parity_inputs.npz", **ps)
    return {"rows": int(len(ps["x"])), "held_out": int((ps["kind"] == 0).sum()),
            "random": int((ps["kind"] == 1).sum()), "extremes": int((ps["kind"] == 2).sum()),
            "summary": f"{len(ps['x'])} parity rows"}


# --------------------------------------------------------------------------- train

def trained_model(ctx: Context, spec: Spec, m: ModelSpec):
    """The model trained earlier in this lane, or loaded from the train stage's outputs."""
    from .frameworks import adapter
    key = ("model", m.name)
    if key not in ctx.memo:
        facts = ctx.input_facts(f"train:{m.name}")
        ctx.memo[key] = adapter(m.framework).load(spec, m, ctx.input_dir(f"train:{m.name}"),
                                                  facts["input_shape"], facts["n_outputs"])
    return ctx.memo[key]


def run_train(ctx: Context, spec: Spec, m: ModelSpec) -> dict:
    from .frameworks import adapter
    arrays = load_arrays(ctx)
    info = ctx.input_facts("data")
    fw = adapter(m.framework)
    t0 = time.perf_counter()
    model = fw.build(spec, m, tuple(info["input_shape"]), info["n_outputs"])
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = fw.train(model, m, arrays["x_train"], arrays["y_train"], spec.seed)
    fit_s = time.perf_counter() - t0
    metrics = {"final_loss": losses[-1], **task_metrics(spec.data.task, lambda x: fw.predict(model, x), arrays)}
    check_acceptance(m, metrics)  # raises TrainingRejected with the numbers
    fw.save(model, ctx.out)
    write_history(ctx.out, losses)
    example = arrays["x_train"][:5]
    t0 = time.perf_counter()
    fw.save_mlflow_model(model, ctx.out / "mlflow_model", example, fw.predict(model, example))
    ctx.memo[("model", m.name)] = model
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "final_loss")
    return {"metrics": metrics, "epochs": len(losses), "input_shape": info["input_shape"],
            "n_outputs": info["n_outputs"], "framework": m.framework,
            "timings": {"build_s": build_s, "fit_s": fit_s, "save_mlflow_model_s": time.perf_counter() - t0},
            "summary": f"{m.framework}: {shown} loss={losses[-1]:.5f}"}


# --------------------------------------------------------------------------- reference

PERTURBATION = 1e-3  # relative weight noise of the "slightly perturbed model" the parity set must catch


def run_reference(ctx: Context, spec: Spec, m: ModelSpec) -> dict:
    """The trained model's outputs on the parity set, computed once; every artifact is compared with
    these arrays. Also the outputs of a slightly perturbed copy, to show the parity set can tell them apart."""
    from .frameworks import adapter
    fw = adapter(m.framework)
    model = trained_model(ctx, spec, m)
    with np.load(ctx.input_dir("parity_set") / "parity_inputs.npz") as f:
        x, kind = f["x"], f["kind"]
    y = fw.predict(model, x)
    y_perturbed = fw.predict(fw.perturbed(model, PERTURBATION, spec.seed), x)
    labels = _labels_for(ctx, spec, kind)
    np.savez(ctx.out / "reference.npz", x=x, y=y, kind=kind, y_perturbed=y_perturbed,
             **({"labels": labels} if labels is not None else {}))
    (ctx.out / "reference.json").write_text(json.dumps({"shape": list(y.shape), "dtype": str(y.dtype)}))
    return {"rows": int(len(x)), "output_shape": list(y.shape[1:]),
            "output_std": float(y.std(axis=0).mean()),
            "perturbed_max_abs": float(np.abs(y_perturbed - y).max()),
            "summary": f"{len(x)} rows, output std {float(y.std(axis=0).mean()):.3g}"}


def _labels_for(ctx: Context, spec: Spec, kind: np.ndarray):
    """Held-out labels for the parity rows that are held-out data (classification only)."""
    if spec.data.task != "classification":
        return None
    arrays = load_arrays(ctx)
    source = arrays["y_test"] if len(arrays["x_test"]) else arrays["y_train"]
    labels = np.full(len(kind), -1, dtype=np.int64)
    n_held = int((kind == 0).sum())
    labels[:n_held] = source[:n_held]
    return labels
