"""The train, probe and reference steps: a model trained (or taken pretrained), scored and saved;
its reference outputs on the parity inputs, with a slightly perturbed copy's, and its signature."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from parity.feeds import flat_rows, is_multi, n_rows, pack, structure, take, unpack

from ..spec_slice import from_slice
from ..stage_run import Context
from ..spec import ModelSpec, Spec
from ..training import (ModelMismatch, bind_to_model, check_acceptance, probe_model, task_metrics,
                        write_history)
from .common import PERTURBATION, load_arrays, maker, trained_model, where


def run_train(ctx: Context, spec: dict, model: str) -> dict:
    from frameworks import adapter
    spec = from_slice(spec)
    m = spec.model(model)
    arrays = load_arrays(ctx)
    info = ctx.input_facts("data")
    fw = adapter(m.framework)
    if m.pretrained:
        return take_pretrained(ctx, spec, m, fw, arrays, info)
    t0 = time.perf_counter()
    model = fw.build(maker(spec, m, info["input_shape"], info["n_outputs"]), seed=spec.seed, threads=m.train.threads)
    fw.check(model, f"{where(m)}: factory '{m.factory}'")
    binding = bind_to_model(m, fw, model, take(arrays["x_train"], slice(0, 2)))
    probe_model(m, lambda x: fw.predict(model, x), take(arrays["x_train"], slice(0, 2)), info["n_outputs"])
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    epochs = m.train.epochs

    def on_epoch(done: int, loss: float) -> None:
        ctx.progress(done, epochs, f"epoch {done}/{epochs} loss {loss:.4g}")
    x_fit, y_fit, val = split_validation(arrays["x_train"], arrays["y_train"], m.train.validation_split)
    logdir = ctx.out / "tensorboard" if m.train.tensorboard else None
    if m.train.workers > 1:
        model, history, distribution = train_on_workers(ctx, spec, m, fw, info, x_fit, y_fit, val, logdir, on_epoch)
    else:
        history = fw.train(model, m.train, x_fit, y_fit, spec.seed, on_epoch=on_epoch, val=val, logdir=logdir)
        distribution = {"workers": 1, "kind": "none"}
    losses = history.loss
    fit_s = time.perf_counter() - t0
    metrics = {"final_loss": losses[-1], **({"final_val_loss": history.val_loss[-1]} if history.val_loss else {}),
               **task_metrics(spec.data.task, lambda x: fw.predict(model, x), arrays)}
    check_acceptance(m, metrics)  # raises TrainingRejected with the numbers
    fw.save(model, ctx.out)
    write_history(ctx.out, history.to_json())
    example = take(arrays["x_train"], slice(0, 5))
    t0 = time.perf_counter()
    mlflow_note = save_mlflow_copy(ctx, fw, model, example, fw.predict(model, example))
    ctx.memo[("model", m.name)] = model
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "final_loss")
    return {"metrics": metrics, "epochs": len(losses), "input_shape": info["input_shape"],
            "n_outputs": info["n_outputs"], "framework": m.framework, "outputs": fw.output_kind,
            "timings": {"build_s": build_s, "fit_s": fit_s, "save_mlflow_model_s": time.perf_counter() - t0},
            "mlflow_model": mlflow_note,
            "callbacks": history.describe() or None, "input_binding": binding or None, "distribution": distribution,
            "precision": {"trained_in": m.train.precision, "computed_in": history.compute_dtype,
                          "weights": "float32"} if m.train.precision != "fp32" else None,
            "summary": f"{m.framework}: {len(losses)} epochs"
                       + (f" on {m.train.workers} workers ({distribution['kind']})" if m.train.workers > 1 else "")
                       + (f" in {m.train.precision} ({history.compute_dtype})" if m.train.precision != "fp32" else "")
                       + f", {shown} loss={losses[-1]:.5f}"
                       + (f" ({history.describe()})" if history.describe() else "")
                       + (f"; inputs {binding}" if binding else "")}


def train_on_workers(ctx: Context, spec: Spec, m: ModelSpec, fw, info: dict, x, y, val, logdir, on_epoch):
    """`workers` > 1: the framework's own launcher trains the model on that many processes
    (frameworks/distributed.py), in a folder of this stage's output that keeps the launch's logs; the
    model rank 0 saved is loaded back here, as a later stage loads a trained model. A failed rank raises
    before anything is saved."""
    import dataclasses
    import frameworks
    from frameworks.base import History
    from frameworks.distributed import tidy
    from frameworks.distributed import train_on_workers as launch
    folder = ctx.out / "workers"
    outcome = launch(where=where(m), framework=m.framework, kind=frameworks.module(m.framework).DISTRIBUTION,
                     workers=m.train.workers, factory=m.factory, factory_dir=str(spec.path.parent), params=m.params,
                     input_shape=info["input_shape"], n_outputs=info["n_outputs"], seed=spec.seed,
                     train=dataclasses.asdict(m.train), x=x, y=y, val=val, folder=folder, logdir=logdir,
                     on_epoch=on_epoch)
    model = fw.load(outcome.model_dir, make=maker(spec, m, info["input_shape"], info["n_outputs"]), pretrained=False,
                    input_shape=info["input_shape"], where=where(m))
    fw.output_kind = outcome.output_kind
    tidy(folder)
    return model, History(**outcome.history), outcome.facts


def split_validation(x, y, fraction: float):
    """The last `fraction` of the training rows held out for validation, as Keras' validation_split takes
    them (None when there is none)."""
    if not fraction:
        return x, y, None
    n = n_rows(x)
    cut = n - max(1, int(round(n * fraction)))
    return take(x, slice(0, cut)), y[:cut], (take(x, slice(cut, n)), y[cut:])


def save_mlflow_copy(ctx: Context, fw, model, example, y_example) -> str | None:
    """The native model in MLflow's format, for the record. A model MLflow cannot serialise still
    exports and verifies: the run says so (returned) instead of failing."""
    from ..tracking import model_saving, save_native_model
    try:
        with model_saving():
            save_native_model(fw.mlflow_form(model, example), ctx.out / "mlflow_model", y_example)
        return None
    except Exception as e:  # noqa: BLE001
        import shutil
        shutil.rmtree(ctx.out / "mlflow_model", ignore_errors=True)
        note = f"not saved as an MLflow model: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ctx.log(note)
        return note


def take_pretrained(ctx: Context, spec: Spec, m: ModelSpec, fw, arrays: dict, info: dict) -> dict:
    """A model the user already trained: load its file, check it takes the data's inputs, keep a copy
    (what later stages load), and score it on the data's targets where there are some."""
    import shutil
    import tempfile
    from .. import registry_ref
    t0 = time.perf_counter()
    fetched = Path(tempfile.mkdtemp(prefix="registry-")) if registry_ref.is_ref(m.source) else None
    try:
        path = from_registry(spec, m, fetched) if fetched else Path(m.source)
        model = fw.load_pretrained(path, where=where(m), make=maker(spec, m, info["input_shape"], info["n_outputs"]),
                                   input_shape=info["input_shape"])
        binding = bind_to_model(m, fw, model, take(arrays["x_train"], slice(0, 2)))
        probe_model(m, lambda x: fw.predict(model, x), take(arrays["x_train"], slice(0, 2)), info["n_outputs"])
        kept_note = fw.save_pretrained(model, ctx.out, path)
    finally:
        if fetched:
            shutil.rmtree(fetched, ignore_errors=True)
    timings = {"load_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    write_history(ctx.out, {"loss": []})
    example = take(arrays["x_train"], slice(0, 5))
    y_example = fw.predict(model, example)
    scored = "y_train" in arrays and not is_multi(y_example)  # a target scores one output
    metrics = task_metrics(spec.data.task, lambda x: fw.predict(model, x), arrays) if scored else {}
    check_acceptance(m, metrics)
    timings["score_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mlflow_note = save_mlflow_copy(ctx, fw, model, example, y_example)
    timings["save_mlflow_model_s"] = time.perf_counter() - t0
    ctx.memo[("model", m.name)] = model
    shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    spent = f"load {timings['load_s']:.1f} s, MLflow model copy {timings['save_mlflow_model_s']:.1f} s"
    return {"metrics": metrics, "epochs": 0, "pretrained": m.source, "input_shape": info["input_shape"],
            "n_outputs": int(flat_rows(y_example).shape[1]) if info["n_outputs"] is None else info["n_outputs"],
            "framework": m.framework, "timings": timings, "mlflow_model": mlflow_note,
            "input_binding": binding or None,
            "summary": f"{m.framework}: pretrained {m.source if registry_ref.is_ref(m.source) else Path(m.source).name}, "
                       f"not trained ({spent})" + (f"; {shown}" if shown else "")
                       + (f"; inputs {binding}" if binding else "") + (f"; {kept_note}" if kept_note else "")}


def from_registry(spec: Spec, m: ModelSpec, dest: Path) -> Path:
    """A registered version's model file, downloaded into `dest`; checks the version's framework tag
    agrees with the spec's."""
    import os
    import frameworks
    from frameworks.base import PretrainedLoadError
    from ..tracking import download_model_file, resolve_ref
    home = Path(os.environ.get("PIPELINE_HOME", ".")).resolve()
    try:
        ref = resolve_ref(home, m.source)
    except LookupError as e:
        raise PretrainedLoadError(f"{where(m)}: source {e}") from None
    if ref.framework and ref.framework != m.framework:
        raise PretrainedLoadError(f"model {m.name}: {m.source} is version {ref.version} of {ref.name}, a "
                                  f"{ref.framework} model; expected framework = \"{ref.framework}\" in the spec, "
                                  f"found {m.framework!r}")
    try:
        return download_model_file(home, ref, dest, frameworks.module(m.framework).PRETRAINED_SUFFIXES)
    except LookupError as e:
        raise PretrainedLoadError(f"{where(m)}: {e}") from None


def run_probe(ctx: Context, spec: dict, model: str, input_shape: list[int], n_outputs: int) -> dict:
    from frameworks import adapter
    spec = from_slice(spec)
    m = spec.model(model)
    fw = adapter(m.framework)
    make = maker(spec, m, input_shape, n_outputs)
    if m.pretrained:
        built = fw.load_pretrained(Path(m.source), where=where(m), make=make, input_shape=input_shape)
    else:
        built = fw.build(make, seed=spec.seed, threads=m.train.threads if m.train else None)
        fw.check(built, f"{where(m)}: factory '{m.factory}'")
    rows = {k: np.zeros((2, *v), np.float32) for k, v in input_shape.items()} if isinstance(input_shape, dict) \
        else np.zeros((2, *input_shape), np.float32)
    bind_to_model(m, fw, built, rows)
    probe_model(m, lambda x: fw.predict(built, x), rows, n_outputs)
    return {"summary": f"{m.framework} model takes inputs shaped like the data ({input_shape})"}


def run_reference(ctx: Context, spec: dict, model: str) -> dict:
    """The trained model's outputs on the parity set, computed once; every artifact is compared with
    these arrays. Also the outputs of a slightly perturbed copy, to show the parity set can tell them apart."""
    from frameworks import adapter
    spec = from_slice(spec)
    m = spec.model(model)
    fw = adapter(m.framework)
    model = trained_model(ctx, spec, m)
    with np.load(ctx.input_dir("parity_set") / "parity_inputs.npz") as f:
        x, kind = unpack(f, "x"), f["kind"]
    y = fw.predict(model, x)
    again = fw.predict(model, take(x, slice(0, 2)))
    if structure(again) != structure(y):  # an exporter traces one call: a shifting structure cannot be exported
        raise ModelMismatch(f"model {m.name} ({m.framework}): its outputs change structure between calls: "
                            f"{_shown(structure(y))} on the {n_rows(x)} parity rows, then {_shown(structure(again))} "
                            f"on 2 of them; expected the same named outputs, per-row shapes and dtypes on every call")
    signature = fw.signature(model, x, y)
    if m.signature:
        check_stated_signature(m, signature)
    y, y_perturbed = flat_rows(y), flat_rows(fw.predict(fw.perturbed(model, PERTURBATION, spec.seed), x))
    labels, targets = _labels_for(ctx, spec, kind), _targets_for(ctx, spec, kind, y)
    # several outputs are stored as one row-wise concatenation; the signature says how to split it
    np.savez(ctx.out / "reference.npz", **pack("x", x), y=y, kind=kind, y_perturbed=y_perturbed,
             **({"labels": labels} if labels is not None else {}),
             **({"targets": targets} if targets is not None else {}))
    (ctx.out / "reference.json").write_text(json.dumps({"shape": list(y.shape), "dtype": str(y.dtype),
                                                        "signature": signature.to_json()}))
    return {"rows": n_rows(x), "output_shape": list(y.shape[1:]),
            "output_std": float(y.std(axis=0).mean()),
            "perturbed_max_abs": float(np.abs(y_perturbed - y).max()),
            "signature": signature.to_json(),
            "summary": f"{n_rows(x)} rows, output std {float(y.std(axis=0).mean()):.3g}; {signature.describe()}"}


def check_stated_signature(m: ModelSpec, signature) -> None:
    """The spec's [model.signature] against the model's own: every stated input there with the stated
    dtype, and the stated output names the model's (several outputs are named by key or position)."""
    found_in = {t.name: t.dtype for t in signature.inputs}
    wrong = [f"input {name!r} {dtype} (the model takes " +
             (f"{found_in[name]})" if name in found_in else f"no such input; it takes {_listed(found_in)})")
             for name, dtype in m.signature["inputs"].items() if found_in.get(name) != dtype]
    stated_out = m.signature["outputs"]
    if stated_out and stated_out != signature.output_names:
        wrong.append(f"outputs {stated_out} (the model returns {signature.output_names})")
    if wrong:
        raise ModelMismatch(f"model {m.name} ({m.framework}): the spec's [model.signature] contradicts the "
                            f"model: it states {'; '.join(wrong)}; expected the spec to state what the model "
                            f"takes and returns, or no signature at all")


def _listed(specs: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in specs.items())


def _shown(outputs: dict) -> str:
    return "{" + ", ".join(f"{k}: {dtype} {list(shape)}" for k, (shape, dtype) in outputs.items()) + "}"


def _targets_for(ctx: Context, spec: Spec, kind: np.ndarray, y: np.ndarray):
    """Held-out regression targets for the parity rows that are held-out data, NaN elsewhere: what a
    candidate and the version in production are both scored on (pipeline/against.py)."""
    arrays = load_arrays(ctx)
    if spec.data.task != "regression" or "y_train" not in arrays or is_multi(arrays["y_train"]):
        return None
    source = arrays["y_test"] if n_rows(arrays["x_test"]) else arrays["y_train"]
    n_held = int((kind == 0).sum())
    held = np.asarray(source[:n_held], dtype=np.float32).reshape(n_held, -1)
    if held.shape[1] != y.reshape(len(y), -1).shape[1]:
        return None
    targets = np.full((len(kind), held.shape[1]), np.nan, dtype=np.float32)
    targets[:n_held] = held
    return targets


def _labels_for(ctx: Context, spec: Spec, kind: np.ndarray):
    """Held-out labels for the parity rows that are held-out data (classification only)."""
    arrays = load_arrays(ctx)
    if spec.data.task != "classification" or "y_train" not in arrays:
        return None
    source = arrays["y_test"] if n_rows(arrays["x_test"]) else arrays["y_train"]
    labels = np.full(len(kind), -1, dtype=np.int64)
    n_held = int((kind == 0).sum())
    labels[:n_held] = source[:n_held]
    return labels
