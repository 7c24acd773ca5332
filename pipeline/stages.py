"""The stages of a spec and what each one does. Stage functions receive a runner Context, write
their outputs into ctx.out and return facts (JSON) that later stages, the run record and MLflow read.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np

from parity.feeds import flat_rows, is_multi, n_rows, pack, row_shapes, structure, take, unpack

from . import data as data_mod
from .code_deps import closure, package_versions
from .runner import Context, Stage
from .spec import ModelSpec, Spec
from .training import (ModelMismatch, bind_to_model, check_acceptance, n_outputs, probe_model, task_metrics,
                       write_history)

# A stage's code: this file, plus the files that do its step and every toolkit file those import
# (pipeline/code_deps.py reads the imports). tracking.py (the MLflow model folder) is not among them
# on purpose: changing how runs are recorded must not retrain.
STAGES_CODE = ("pipeline/stages.py",)
DATA_CODE = STAGES_CODE + closure("pipeline/data.py")
TRAIN_CODE = STAGES_CODE + closure("pipeline/training.py", "frameworks/__init__.py", "frameworks/base.py")


def train_code(m: ModelSpec) -> tuple[str, ...]:
    """What a model's training is built from: the shared code and its framework's own module (and the
    modules that one builds on, named by its BUILDS_ON)."""
    import frameworks
    mod = frameworks.module(m.framework)
    return STAGES_CODE + closure(*TRAIN_CODE[1:], *(f"frameworks/{n}.py"
                                                   for n in (*getattr(mod, "BUILDS_ON", ()), m.framework)))


def framework_versions(m: ModelSpec) -> dict[str, str]:
    import frameworks
    return package_versions(frameworks.module(m.framework).PACKAGES)


def build_stages(spec: Spec) -> list[Stage]:
    """Every stage of a spec, upstream first. A stage names its function and the spec's path; the
    process that runs it loads the spec itself (validated, cheap), so stages travel as plain data."""
    ref = {"spec": str(spec.path)}
    stages = [
        Stage("data", "data", {"source": spec.data.source, "task": spec.data.task, "seed": spec.seed,
                               "options": spec.data.options, "file": _data_file_digest(spec)},
              DATA_CODE, f"{__name__}:run_data", ref),
        Stage("parity_set", "parity_set", {"parity": _parity_settings(spec), "seed": spec.seed},
              DATA_CODE, f"{__name__}:run_parity_set", ref, inputs=("data",)),
    ]
    for m in spec.models:
        mref = {**ref, "model": m.name}
        stages.append(Stage(
            f"train:{m.name}", "train",
            {"framework": m.framework, "factory": m.factory, "factory_source": m.factory_source_hash(),
             "source": m.source_digest(),
             "params": m.params, "train": m.train.__dict__ if m.train else None,
             "accept": [b.__dict__ for b in m.accept],
             "seed": spec.seed, "task": spec.data.task, "framework_versions": framework_versions(m)},
            train_code(m), f"{__name__}:run_train", mref, inputs=("data",), lane=side(m.framework)))
        stages.append(Stage(
            f"reference:{m.name}", "reference", {"perturbation": PERTURBATION},
            train_code(m), f"{__name__}:run_reference", mref,
            inputs=("data", "parity_set", f"train:{m.name}"), lane=side(m.framework)))
        stages += export_stages(spec, m)
        stages += verify_stages(spec, m)
        stages.append(bundle_stage(spec, m))
    if "serving" in spec.deploy:
        stages.append(serving_stage(spec))
    if "edge" in spec.deploy:
        stages.append(edge_stage(spec))
    stages.append(report_stage(spec))
    return stages


@functools.lru_cache(maxsize=8)
def load_spec(path: str) -> Spec:
    from .spec import load
    return load(path)


def side(framework: str) -> str:
    """The worker lane whose process has this framework imported."""
    import frameworks
    return frameworks.lane(framework)


def family(framework: str) -> str:
    """What the exporters dispatch on: the kind of model the framework makes."""
    import frameworks
    return frameworks.family(framework)


def where(m: ModelSpec) -> str:
    return f"model {m.name} ({m.framework})"


def maker(spec: Spec, m: ModelSpec, input_shape, n_outputs):
    """A call that builds the model from the spec's factory (None without one). Loading the factory
    puts the spec's folder on sys.path, where a pickled module's class lives too."""
    from .training import build_model, load_factory
    if not m.factory:
        return None
    load_factory(spec, m)
    return lambda: build_model(spec, m, input_shape, n_outputs)


def _data_file_digest(spec: Spec) -> str | None:
    from .cache import file_digest, folder_digests
    path = spec.data.options.get("path")
    if path and Path(path).is_dir():  # a folder of .npy files: every one of them
        return json.dumps(folder_digests(Path(path)), sort_keys=True)
    return file_digest(Path(path)) if path and Path(path).is_file() else None


def _parity_settings(spec: Spec) -> dict:
    p = spec.parity
    return {"held_out_rows": p.held_out_rows, "random_rows": p.random_rows, "input_range": p.input_range,
            "max_batch": p.max_batch, **({"inputs": p.inputs} if p.inputs else {})}


# --------------------------------------------------------------------------- data

def run_data(ctx: Context, spec: str) -> dict:
    spec = load_spec(spec)
    arrays = data_mod.load_arrays(spec)
    np.savez(ctx.out / "arrays.npz", **{k: v for name, a in arrays.items() for k, v in pack(name, a).items()})
    x, y = arrays["x_train"], arrays.get("y_train")
    shapes = row_shapes(x)
    return {"n_train": n_rows(x), "n_test": n_rows(arrays["x_test"]), "input_shape": shapes,
            "n_outputs": None if y is None else n_outputs(spec.data.task, y),
            "x_dtype": {k: str(v.dtype) for k, v in x.items()} if is_multi(x) else str(x.dtype),
            "y_dtype": None if y is None else str(y.dtype), "targets": y is not None,
            "summary": f"{n_rows(x)} train rows, {n_rows(arrays['x_test'])} test rows, input "
                       f"{shapes if is_multi(x) else tuple(shapes)}"}


def load_arrays(ctx: Context) -> dict:
    with np.load(ctx.input_dir("data") / "arrays.npz") as f:
        entries = {k: f[k] for k in f.files}
    return {name: unpack(entries, name) for name in ("x_train", "x_test", "y_train", "y_test")
            if name in entries or any(k.startswith(name + ":") for k in entries)}


def run_parity_set(ctx: Context, spec: str) -> dict:
    spec = load_spec(spec)
    ps = data_mod.parity_inputs(spec, load_arrays(ctx))
    np.savez(ctx.out / "parity_inputs.npz", **pack("x", ps["x"]), kind=ps["kind"])
    return {"rows": n_rows(ps["x"]), "held_out": int((ps["kind"] == 0).sum()),
            "random": int((ps["kind"] == 1).sum()), "extremes": int((ps["kind"] == 2).sum()),
            "summary": f"{n_rows(ps['x'])} parity rows"}


# --------------------------------------------------------------------------- train

def trained_model(ctx: Context, spec: Spec, m: ModelSpec):
    """The model trained earlier in this lane, or loaded from the train stage's outputs."""
    from frameworks import adapter
    key = ("model", m.name)
    if key not in ctx.memo:
        facts = ctx.input_facts(f"train:{m.name}")
        ctx.memo[key] = adapter(m.framework).load(
            ctx.input_dir(f"train:{m.name}"), make=maker(spec, m, facts["input_shape"], facts["n_outputs"]),
            pretrained=m.pretrained, input_shape=facts["input_shape"], where=where(m))
    return ctx.memo[key]


def run_train(ctx: Context, spec: str, model: str) -> dict:
    from frameworks import adapter
    spec = load_spec(spec)
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
    history = fw.train(model, m.train, x_fit, y_fit, spec.seed, on_epoch=on_epoch, val=val, logdir=logdir)
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
            "callbacks": history.describe() or None, "input_binding": binding or None,
            "summary": f"{m.framework}: {len(losses)} epochs, {shown} loss={losses[-1]:.5f}"
                       + (f" ({history.describe()})" if history.describe() else "")
                       + (f"; inputs {binding}" if binding else "")}


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
    from .tracking import model_saving
    try:
        with model_saving():
            fw.save_mlflow_model(model, ctx.out / "mlflow_model", example, y_example)
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
    from . import registry_ref
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
    from . import registry_ref
    from .tracking import tracking_uri
    home = Path(os.environ.get("PIPELINE_HOME", ".")).resolve()
    try:
        ref = registry_ref.resolve(m.source, home / "mlruns" / "mlflow.db")
    except LookupError as e:
        raise PretrainedLoadError(f"{where(m)}: source {e}") from None
    if ref.framework and ref.framework != m.framework:
        raise PretrainedLoadError(f"model {m.name}: {m.source} is version {ref.version} of {ref.name}, a "
                                  f"{ref.framework} model; expected framework = \"{ref.framework}\" in the spec, "
                                  f"found {m.framework!r}")
    try:
        return registry_ref.download_model_file(ref, tracking_uri(home), dest,
                                                frameworks.module(m.framework).PRETRAINED_SUFFIXES)
    except LookupError as e:
        raise PretrainedLoadError(f"{where(m)}: {e}") from None


def probe_stages(spec: Spec, input_shape: list[int], n_outputs: int) -> list[Stage]:
    """For `validate`: build each model from its factory and call it on rows shaped like the data."""
    return [Stage(f"probe:{m.name}", "probe", {"model": m.name}, train_code(m), f"{__name__}:run_probe",
                  {"spec": str(spec.path), "model": m.name, "input_shape": input_shape, "n_outputs": n_outputs},
                  lane=side(m.framework)) for m in spec.models]


def run_probe(ctx: Context, spec: str, model: str, input_shape: list[int], n_outputs: int) -> dict:
    from frameworks import adapter
    spec = load_spec(spec)
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


# --------------------------------------------------------------------------- reference

PERTURBATION = 1e-3  # relative weight noise of the "slightly perturbed model" the parity set must catch


def run_reference(ctx: Context, spec: str, model: str) -> dict:
    """The trained model's outputs on the parity set, computed once; every artifact is compared with
    these arrays. Also the outputs of a slightly perturbed copy, to show the parity set can tell them apart."""
    from frameworks import adapter
    spec = load_spec(spec)
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
    labels = _labels_for(ctx, spec, kind)
    # several outputs are stored as one row-wise concatenation; the signature says how to split it
    np.savez(ctx.out / "reference.npz", **pack("x", x), y=y, kind=kind, y_perturbed=y_perturbed,
             **({"labels": labels} if labels is not None else {}))
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


# --------------------------------------------------------------------------- export



def export_stages(spec: Spec, m: ModelSpec) -> list[Stage]:
    """One stage per format; a format converted from another (TF.js from SavedModel) takes it as input."""
    import exporters
    from exporters import FORMATS
    stages = []
    for fmt in _upstream_first([f for f in FORMATS if f in spec.formats], m.framework):
        requires = _requires(fmt, m.framework)
        for req in requires:
            if req not in spec.formats:
                raise_spec(spec, f"export.formats: {fmt} for {m.framework} models is converted from {req}, "
                                 f"which must be listed too")
        # a route that converts another artifact needs no model, so it may run on the other side;
        # an exporter whose later routes convert the model itself (nobuco) takes it too, loaded only then
        needs_model = not requires or family(m.framework) in getattr(exporters.module(fmt), "LATER_ROUTES_TAKE_MODEL", ())
        model_input = (f"train:{m.name}",) if needs_model else ()
        stages.append(Stage(
            f"export:{m.name}:{fmt}", "export",
            {"format": fmt, "framework": m.framework, "options": _export_options(spec, m, fmt),
             "converters": package_versions(getattr(exporters.module(fmt), "CONVERTER_PACKAGES", {})
                                            .get(family(m.framework), ()))},
            STAGES_CODE + closure(f"exporters/{fmt}.py") + _converter_files(fmt), f"{__name__}:run_export",
            {"spec": str(spec.path), "model": m.name, "fmt": fmt},
            inputs=("data", f"reference:{m.name}") + model_input + tuple(f"export:{m.name}:{r}" for r in requires),
            lane=exporters.module(fmt).LANE[family(m.framework)]))
    return stages


def _upstream_first(formats: list[str], framework: str) -> list[str]:
    ordered: list[str] = []

    def visit(fmt: str) -> None:
        if fmt not in ordered:
            for req in _requires(fmt, framework):
                if req in formats:
                    visit(req)
            ordered.append(fmt)
    for fmt in formats:
        visit(fmt)
    return ordered


def _requires(fmt: str, framework: str) -> tuple[str, ...]:
    import exporters
    return tuple(exporters.module(fmt).REQUIRES.get(family(framework), ()))


def raise_spec(spec: Spec, message: str) -> None:
    from .spec import SpecError
    raise SpecError(f"{spec.path}: {message}")


def _export_options(spec: Spec, m: ModelSpec, fmt: str) -> dict:
    return {"batch_sizes": list(m.litert_batch_sizes)} if fmt == "litert" else {}


def run_export(ctx: Context, spec: str, model: str, fmt: str) -> dict:
    """Write one format's artifacts. A converter failure is recorded (and becomes a failed parity
    record with the converter's message), not raised: the other formats still get made and checked.
    A failure because the machine lacks the converter is not kept for later runs."""
    import exporters
    from exporters.base import read_manifest, size_of, write_manifest
    from exporters.verify import environment_problem
    spec = load_spec(spec)
    m = spec.model(model)
    requires = _requires(fmt, m.framework)
    model_obj = None if requires else trained_model(ctx, spec, m)
    arrays = load_arrays(ctx)
    with np.load(ctx.input_dir(f"reference:{m.name}") / "reference.npz") as f:
        example, expected = take(unpack(f, "x"), slice(0, spec.parity.max_batch)), f["y"][: spec.parity.max_batch]
    def callable_form(model):  # the form each converter calls (a torch forward's keyword inputs: by keyword)
        from frameworks import adapter
        fw = adapter(m.framework)
        return fw.for_inputs(model, example) if hasattr(fw, "for_inputs") else model
    model_obj = None if model_obj is None else callable_form(model_obj)
    upstream, missing = {}, []
    for req in requires:
        src = ctx.input_dir(f"export:{m.name}:{req}")
        arts = read_manifest(src)
        if not arts:
            missing.append(f"{req}: {ctx.input_facts(f'export:{m.name}:{req}').get('error', 'no artifact')}")
        upstream[req] = arts
    out_dir = ctx.out / fmt
    out_dir.mkdir()
    options = _export_options(spec, m, fmt)
    if fmt == "litert":  # rows for int8 calibration, from the training data
        options["calibration"] = take(arrays["x_train"], slice(0, 256))
    if requires and f"train:{m.name}" in ctx.stage.inputs:  # for a later route, loaded only if one runs
        options["load_model"] = lambda: callable_form(trained_model(ctx, spec, m))
        options["trained_dir"] = str(ctx.input_dir(f"train:{m.name}"))
    t0 = time.perf_counter()
    try:
        if missing and "load_model" not in options:  # else a later route converts the model itself
            raise RuntimeError(f"converted from an artifact that could not be made ({'; '.join(missing)})")
        artifacts = exporters.module(fmt).export(model_obj, framework=m.framework, family=family(m.framework), name=m.name, example=example,
                                                 out_dir=out_dir, upstream=upstream, options=options,
                                                 expected=expected)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        cause = environment_problem(e) or environment_problem(e.__cause__ or e)
        if cause:
            ctx.volatile(f"the converter is missing here: {cause[:200]}")
        ctx.log(f"export failed: {error[:300]}")
        write_manifest(out_dir, [])
        (ctx.out / "artifacts.json").write_text("[]")
        return {"format": fmt, "error": error, "artifacts": [], "summary": f"FAILED: {error[:120]}"}
    elapsed = time.perf_counter() - t0
    for a in artifacts:
        a.size_bytes = a.size_bytes or size_of(a.path)
        a.export_s = a.export_s or elapsed / len(artifacts)
    write_manifest(ctx.out, artifacts)
    return {"format": fmt, "artifacts": [a.to_json(ctx.out) for a in artifacts],
            "summary": ", ".join(f"{a.variant} {a.size_bytes / 1024:.0f} KiB" for a in artifacts)
            + f" in {elapsed:.2f} s"}


# --------------------------------------------------------------------------- verify

VERIFY_ROOTS = ("parity/compare.py", "exporters/verify.py")
VARIANTS_BY_FORMAT = {"litert": ("fp32", "fp16", "int8")}


def verify_stages(spec: Spec, m: ModelSpec) -> list[Stage]:
    """One stage per format, in the lane whose process has that format's runtime."""
    import exporters
    stages = []
    for fmt in exporters.FORMATS:
        if fmt not in spec.formats:
            continue
        lane = exporters.module(fmt).RUNTIME_LANE
        stages.append(Stage(
            f"verify:{m.name}:{fmt}", "verify",
            {"tolerances": spec.parity.tolerances, "task": spec.data.task, "max_batch": spec.parity.max_batch,
             # the verdict of an UNSUPPORTED cell turns on it: editing it must not reuse the old verdict
             "allow_unsupported": [v for v in VARIANTS_BY_FORMAT.get(fmt, ("fp32",))
                                   if spec.parity.allows_unsupported(m.name, fmt, v)],
             "runtimes": package_versions(getattr(exporters.module(fmt), "RUNTIME_PACKAGES", ()))},
            STAGES_CODE + closure(*VERIFY_ROOTS, f"exporters/{fmt}.py") + _runtime_files(fmt),
            f"{__name__}:run_verify",
            {"spec": str(spec.path), "model": m.name, "fmt": fmt},
            inputs=(f"reference:{m.name}", f"export:{m.name}:{fmt}"),
            lane=side(m.framework) if lane == "any" else lane))
    return stages


def _runtime_files(fmt: str) -> tuple[str, ...]:
    """Files besides the Python modules that its runtime runs (part of the verify stage's key)."""
    import exporters
    return tuple(getattr(exporters.module(fmt), "RUNTIME_FILES", ()))


def _converter_files(fmt: str) -> tuple[str, ...]:
    """Files besides the Python modules that its converters run (part of the export stage's key)."""
    import exporters
    return tuple(getattr(exporters.module(fmt), "CONVERTER_FILES", ()))


def run_verify(ctx: Context, spec: str, model: str, fmt: str) -> dict:
    """Load each artifact of one format in each of its runtimes, run the stored parity inputs, compare
    with the stored reference outputs. Writes records.json and the outputs (for plots)."""
    import exporters
    from exporters.base import read_manifest
    from exporters.verify import check_artifact
    from parity.compare import ParityRecord, tolerance_for
    from parity.signature import Signature
    spec = load_spec(spec)
    m = spec.model(model)
    with np.load(ctx.input_dir(f"reference:{m.name}") / "reference.npz") as f:
        ref = {k: f[k] for k in f.files if not k.startswith("x:")} | {"x": unpack(f, "x")}
    model_sig = Signature.from_json(ctx.input_facts(f"reference:{m.name}")["signature"])
    variants = VARIANTS_BY_FORMAT.get(fmt, ("fp32",))
    name = f"export:{m.name}:{fmt}"
    facts = ctx.input_facts(name)
    records, outputs = [], {}
    if facts.get("error"):
        records += [unsupported_record(spec, m, fmt, v, facts["error"]) for v in variants]
    else:
        module = exporters.module(fmt)
        artifacts = read_manifest(ctx.input_dir(name))
        made = {a.variant for a in artifacts}
        records += [ParityRecord.skipped(m.name, fmt, v, f"{fmt} exporter made no {v} variant for "
                                         f"{m.framework} models", skip="not-produced")
                    for v in variants if v not in made]
        for artifact in artifacts:
            tol = tolerance_for(artifact.variant, fmt, spec.parity.tolerances)
            for runtime in module.RUNTIMES:
                rec, got, env = check_artifact(module, artifact, runtime, ref, tol, task=spec.data.task,
                                               max_batch=spec.parity.max_batch, model=m.name,
                                               model_signature=model_sig)
                if env:
                    rec.details["cause"] = "environment"
                    ctx.volatile(f"{artifact.label} on {runtime}: {env[:200]}")
                if rec.details.get("outcome") == "unsupported":  # the runtime has no kernel for an op
                    rec = unsupported_record(spec, m, fmt, artifact.variant, rec.details["runtime_error"],
                                             runtime=runtime)
                records.append(rec)
                if got is not None:
                    outputs[f"{artifact.label}@{runtime}"] = got
    (ctx.out / "records.json").write_text(json.dumps([r.to_json() for r in records], indent=2))
    np.savez(ctx.out / "outputs.npz", **outputs)
    failed = [r for r in records if r.status == "failed"]
    checked = [r for r in records if r.status != "skipped"]
    return {"checked": len(checked), "failed": len(failed), "skipped": len(records) - len(checked),
            "failures": [r.message for r in failed],
            "summary": f"{len(checked) - len(failed)}/{len(checked)} checks passed"}


def unsupported_record(spec: Spec, m: ModelSpec, fmt: str, variant: str, error: str, runtime: str | None = None):
    """A cell whose converter failed (or, with `runtime`, whose runtime has no kernel for one of its ops):
    UNSUPPORTED, with the tool's own words and what the user can do. It fails the run unless the spec
    allows it under [parity] allow_unsupported."""
    from parity.compare import ParityRecord
    cell = f"{m.name}/{fmt}" + ("" if variant == "fp32" else f"-{variant}")
    details = {"outcome": "unsupported", **({"runtime_error": error} if runtime else {})}
    if spec.parity.allows_unsupported(m.name, fmt, variant):
        return ParityRecord.skipped(m.name, fmt, variant, f"unsupported here, allowed by the spec: {error[:400]}",
                                    skip="not-produced", details=details, **({"runtime": runtime} if runtime else {}))
    what = (f"the {runtime} runtime cannot run this {fmt} artifact" if runtime else
            f"the {fmt} converter failed for this {m.framework} model")
    change = "change the layer it names (another activation, say), " if runtime else ""
    return ParityRecord.failed_to_load(
        m.name, fmt, variant, runtime, None,
        f"UNSUPPORTED: {what}: {error.rstrip('.')}. What you can do: {change}"
        f"drop {fmt} from export.formats, or list \"{cell}\" under [parity] allow_unsupported to accept the "
        f"gap", details=details)


# --------------------------------------------------------------------------- bundle

BUNDLE_CODE = STAGES_CODE + closure("exporters/bundle.py")


def bundle_stage(spec: Spec, m: ModelSpec) -> Stage:
    """The model's bundle: its artifacts, the stored parity inputs and reference outputs, the verdicts
    and the digest of every file (what the registry keeps, and what the gate and deploys read)."""
    import exporters
    formats = [f for f in exporters.FORMATS if f in spec.formats]
    return Stage(f"bundle:{m.name}", "bundle",
                 {"tolerances": spec.parity.tolerances, "task": spec.data.task, "max_batch": spec.parity.max_batch},
                 BUNDLE_CODE, f"{__name__}:run_bundle", {"spec": str(spec.path), "model": m.name},
                 inputs=(f"reference:{m.name}",) + tuple(f"export:{m.name}:{f}" for f in formats)
                 + tuple(f"verify:{m.name}:{f}" for f in formats))


def run_bundle(ctx: Context, spec: str, model: str) -> dict:
    import exporters
    from exporters.base import read_manifest
    from exporters.bundle import write_bundle
    spec = load_spec(spec)
    m = spec.model(model)
    artifacts, verdicts = {}, {}
    for fmt in exporters.FORMATS:
        if fmt not in spec.formats:
            continue
        arts = read_manifest(ctx.input_dir(f"export:{m.name}:{fmt}"))
        if arts:
            artifacts[fmt] = arts
        for r in json.loads((ctx.input_dir(f"verify:{m.name}:{fmt}") / "records.json").read_text()):
            verdicts[f"{r['label']}@{r.get('runtime') or '-'}"] = r["status"]
    signature = ctx.input_facts(f"reference:{m.name}")["signature"]
    manifest = write_bundle(ctx.out / "bundle", model=m.name, framework=m.framework, task=spec.data.task,
                            signature=signature,
                            reference=ctx.input_dir(f"reference:{m.name}") / "reference.npz",
                            artifacts=artifacts, verdicts=verdicts, tolerances=spec.parity.tolerances,
                            max_batch=spec.parity.max_batch, source={"spec": spec.name, "spec_path": str(spec.path)})
    n = sum(len(v) for v in artifacts.values())
    return {"formats": sorted(artifacts), "files": len(manifest["files"]),
            "summary": f"{n} artifacts, {len(manifest['files'])} files"}


# --------------------------------------------------------------------------- deploy

SERVING_CODE = STAGES_CODE + closure("exporters/bundle.py", "serving/deploy.py")


def serving_stage(spec: Spec) -> Stage:
    """Every model to TF Serving: the deployment folder, a server, and the blessing of each model."""
    return Stage("deploy:serving", "deploy", {"serving": spec.deploy["serving"]}, SERVING_CODE,
                 f"{__name__}:run_serving", {"spec": str(spec.path)},
                 inputs=tuple(f"bundle:{m.name}" for m in spec.models), lane="tensorflow")


def run_serving(ctx: Context, spec: str) -> dict:
    """Deploy the bundles, serve them, replay the parity inputs over gRPC and REST and compare the
    answers with the reference outputs: records.json (one record per model and transport) for the report."""
    from exporters.bundle import read_bundle
    from serving.deploy import deploy_and_bless, dump, settings
    spec = load_spec(spec)
    bundles = [read_bundle(ctx.input_dir(f"bundle:{m.name}") / "bundle") for m in spec.models]
    result = deploy_and_bless(bundles, ctx.out / "deployment", settings(spec.deploy["serving"]), log=ctx.log)
    dump(result, ctx.out / "blessing.json")
    records = [r for b in result["blessings"].values() for r in b["records"]]
    (ctx.out / "records.json").write_text(json.dumps(records, indent=2))
    return {"blessed": {m: b["blessed"] for m, b in result["blessings"].items()},
            "docker_build": result["written"]["docker_build"], "docker_run": result["written"]["docker_run"],
            "ready_s": result["server"]["ready_s"], "summary": result["summary"]}


# the browser page the web bundle runs is no Python module: named here
EDGE_CODE = STAGES_CODE + closure("exporters/bundle.py", "edge/deploy.py", "pipeline/keys.py") + \
    ("edge/web/index.html", "edge/web/page.js")


def edge_stage(spec: Spec) -> Stage:
    """Every model to the spec's edge devices (signed packages, on-device parity) and into the browser."""
    from edge.deploy import settings
    s = settings(spec.deploy["edge"], spec.path.parent)
    devices = {"file": s.devices, "content": _file_text_digest(s.devices)} if s.devices else None
    # cached like any stage: a rerun pushes again only when a bundle, the settings or the devices file changed
    return Stage("deploy:edge", "deploy", {"edge": spec.deploy["edge"], "devices": devices},
                 EDGE_CODE, f"{__name__}:run_edge", {"spec": str(spec.path)},
                 inputs=tuple(f"bundle:{m.name}" for m in spec.models))


def _file_text_digest(path: str) -> str:
    from .cache import file_digest
    return file_digest(Path(path))


def run_edge(ctx: Context, spec: str) -> dict:
    from edge.deploy import deploy, settings
    from exporters.bundle import read_bundle
    from .keys import private_key_path
    spec = load_spec(spec)
    s = settings(spec.deploy["edge"], spec.path.parent)
    bundles = [read_bundle(ctx.input_dir(f"bundle:{m.name}") / "bundle") for m in spec.models]
    result = deploy(bundles, s, ctx.out / "edge", private_key_path() if s.devices else None, log=ctx.log)
    (ctx.out / "records.json").write_text(json.dumps(result.pop("records"), indent=2, default=str))
    (ctx.out / "edge.json").write_text(json.dumps(result, indent=2, default=str))
    passed = {d: all(r.get("passed") for r in models.values()) for d, models in result["devices"].items()}
    seen = {m: all(r.get("passed") for r in rs) for m, rs in result["browser"].items()}
    return {"devices": passed, "browser": seen,
            "summary": ", ".join([f"edge:{d} {'passed' if ok else 'FAILED'}" for d, ok in passed.items()] +
                                 [f"browser {m} {'passed' if ok else 'FAILED'}" for m, ok in seen.items()])}


# --------------------------------------------------------------------------- report

REPORT_CODE = STAGES_CODE + closure("parity/compare.py", "parity/report.py", "pipeline/plots.py")


def report_stage(spec: Spec) -> Stage:
    import exporters
    verifies = tuple(f"verify:{m.name}:{fmt}" for m in spec.models for fmt in exporters.FORMATS
                     if fmt in spec.formats)
    inputs = verifies + tuple(f"{k}:{m.name}" for m in spec.models for k in ("train", "reference"))
    inputs += tuple(f"deploy:{t}" for t in ("serving", "edge") if t in spec.deploy)
    return Stage("report", "report", {"spec": spec.name, "formats": list(spec.formats),
                                      "tolerances": spec.parity.tolerances},
                 REPORT_CODE, f"{__name__}:run_report", {"spec": str(spec.path)}, inputs=inputs)


def _named_outputs(ctx: Context, m: ModelSpec, y_ref: np.ndarray) -> dict[str, np.ndarray]:
    """The stored reference outputs split into the model's named outputs (one: itself)."""
    from parity.feeds import split_rows
    from parity.signature import Signature
    outputs = Signature.from_json(ctx.input_facts(f"reference:{m.name}")["signature"]).outputs
    if any(d is None for o in outputs for d in o.shape[1:]):  # a dynamic length: not split here
        return {}
    if len(outputs) == 1:
        return {outputs[0].name: y_ref}
    return split_rows(y_ref.reshape(len(y_ref), -1), {o.name: tuple(o.shape[1:]) for o in outputs})


def run_report(ctx: Context, spec: str) -> dict:
    """parity.json, parity.md and junit.xml for the whole run, the discrimination of each model's
    parity set, and the plots a reviewer looks at."""
    import exporters
    spec = load_spec(spec)
    from parity.compare import ParityRecord, discrimination, task_hint, tolerance_for
    from .plots import plot_model_parity, plot_training_curve
    from parity.report import ParityReport
    report = ParityReport(spec=spec.name, metadata={"spec_path": str(spec.path)})
    plots = []
    for m in spec.models:
        outs = {}
        for fmt in exporters.FORMATS:
            variants = VARIANTS_BY_FORMAT.get(fmt, ("fp32",))
            if fmt not in spec.formats:
                for v in variants:
                    report.add(ParityRecord.skipped(m.name, fmt, v, "format not listed in the spec's export.formats"))
                continue
            vdir = ctx.input_dir(f"verify:{m.name}:{fmt}")
            for r in json.loads((vdir / "records.json").read_text()):
                report.add(ParityRecord.from_json(r))
            with np.load(vdir / "outputs.npz") as f:
                outs.update({k: f[k] for k in f.files})
        for target in ("serving", "edge"):  # the served answers (blessing), the devices' and the browser's
            if target in spec.deploy:
                for r in json.loads((ctx.input_dir(f"deploy:{target}") / "records.json").read_text()):
                    if r["model"] == m.name:
                        report.add(ParityRecord.from_json(r))
        with np.load(ctx.input_dir(f"reference:{m.name}") / "reference.npz") as f:
            y_ref, y_perturbed = f["y"], f["y_perturbed"]
        report.discrimination[m.name] = discrimination(
            y_ref, y_perturbed, tolerance_for("fp32", "onnx", spec.parity.tolerances), task=spec.data.task,
            perturbation=f"{PERTURBATION:g} relative weight noise")
        hint = task_hint(spec.data.task, _named_outputs(ctx, m, y_ref))
        if hint:
            report.discrimination[m.name]["task_hint"] = hint
        plots.append(plot_model_parity(m.name, y_ref, outs, ctx.out / f"parity_{m.name}.png"))
        history = json.loads((ctx.input_dir(f"train:{m.name}") / "history.json").read_text())
        curves = {k: v for k, v in history.items() if isinstance(v, list) and (v or k == "loss")}
        plots.append(plot_training_curve(curves, ctx.out / f"training_{m.name}.png",
                                         title=f"{spec.name} / {m.name} ({m.framework}): training loss"))
    if "edge" in spec.deploy:
        import shutil
        for shot in sorted((ctx.input_dir("deploy:edge") / "edge" / "screenshots").glob("*.png")):
            shutil.copy2(shot, ctx.out / f"browser_{shot.name}")
            plots.append(str(ctx.out / f"browser_{shot.name}"))
    report.write_json(ctx.out / "parity.json")
    report.write_markdown(ctx.out / "parity.md")
    report.write_junit(ctx.out / "junit.xml")
    return {"passed": report.passed, "verdict": report.verdict, "inconclusive": report.inconclusive,
            "counts": report.counts, "failures": [r.message for r in report.failed_records],
            "warnings": report.warnings, "plots": [p.name for p in map(Path, plots)],
            "summary": report.summary_line()}
