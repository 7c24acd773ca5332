"""The stages of a spec and what each one does. Stage functions receive a runner Context, write
their outputs into ctx.out and return facts (JSON) that later stages, the run record and MLflow read.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import data as data_mod
from .runner import Context, Stage
from .spec import ModelSpec, Spec
from .training import check_acceptance, n_outputs, task_metrics, write_history

STAGES_CODE = ("pipeline/stages.py",)
DATA_CODE = STAGES_CODE + ("pipeline/data.py",)
# tracking.py (the MLflow model folder) is left out on purpose: changing how runs are recorded must not retrain.
TRAIN_CODE = STAGES_CODE + ("pipeline/frameworks.py", "pipeline/training.py")


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
            TRAIN_CODE, lambda ctx, m=m: run_train(ctx, spec, m), inputs=("data",), lane=side(m.framework)))
        stages.append(Stage(
            f"reference:{m.name}", "reference", {"perturbation": PERTURBATION},
            TRAIN_CODE, lambda ctx, m=m: run_reference(ctx, spec, m),
            inputs=("data", "parity_set", f"train:{m.name}"), lane=side(m.framework)))
        stages += export_stages(spec, m)
        stages += verify_stages(spec, m)
    stages.append(report_stage(spec))
    return stages


def side(framework: str) -> str:
    """The worker lane whose process has this framework imported."""
    return {"keras": "tensorflow", "torch": "torch"}[framework]


def _data_file_digest(spec: Spec) -> str | None:
    from .cache import file_digest
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


# --------------------------------------------------------------------------- export

EXPORT_CODE_COMMON = STAGES_CODE + ("exporters/__init__.py", "exporters/base.py")


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
        # a route that converts another artifact needs no model, so it may run on the other side
        model_input = () if requires else (f"train:{m.name}",)
        stages.append(Stage(
            f"export:{m.name}:{fmt}", "export",
            {"format": fmt, "framework": m.framework, "options": _export_options(spec, m, fmt)},
            EXPORT_CODE_COMMON + (f"exporters/{fmt}.py",),
            lambda ctx, m=m, fmt=fmt: run_export(ctx, spec, m, fmt),
            inputs=("data", f"reference:{m.name}") + model_input + tuple(f"export:{m.name}:{r}" for r in requires),
            lane=exporters.module(fmt).LANE[m.framework]))
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
    return tuple(exporters.module(fmt).REQUIRES.get(framework, ()))


def raise_spec(spec: Spec, message: str) -> None:
    from .spec import SpecError
    raise SpecError(f"{spec.path}: {message}")


def _export_options(spec: Spec, m: ModelSpec, fmt: str) -> dict:
    return {"batch_sizes": list(m.litert_batch_sizes)} if fmt == "litert" else {}


def run_export(ctx: Context, spec: Spec, m: ModelSpec, fmt: str) -> dict:
    """Write one format's artifacts. A converter failure is recorded (and becomes a failed parity
    record with the converter's message), not raised: the other formats still get made and checked."""
    import exporters
    from exporters.base import read_manifest, size_of, write_manifest
    requires = _requires(fmt, m.framework)
    model = None if requires else trained_model(ctx, spec, m)
    arrays = load_arrays(ctx)
    with np.load(ctx.input_dir(f"reference:{m.name}") / "reference.npz") as f:
        example, expected = f["x"][: spec.parity.max_batch], f["y"][: spec.parity.max_batch]
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
        options["calibration"] = arrays["x_train"][:256]
    t0 = time.perf_counter()
    try:
        if missing:
            raise RuntimeError(f"converted from an artifact that could not be made ({'; '.join(missing)})")
        artifacts = exporters.module(fmt).export(model, framework=m.framework, name=m.name, example=example,
                                                 out_dir=out_dir, upstream=upstream, options=options,
                                                 expected=expected)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
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

VERIFY_CODE = STAGES_CODE + ("parity/compare.py", "exporters/__init__.py", "exporters/base.py")
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
            {"tolerances": spec.parity.tolerances, "task": spec.data.task, "max_batch": spec.parity.max_batch},
            VERIFY_CODE + (f"exporters/{fmt}.py",), lambda ctx, fmt=fmt: run_verify(ctx, spec, m, fmt),
            inputs=(f"reference:{m.name}", f"export:{m.name}:{fmt}"),
            lane=side(m.framework) if lane == "any" else lane))
    return stages


def run_verify(ctx: Context, spec: Spec, m: ModelSpec, fmt: str) -> dict:
    """Load each artifact of one format in each of its runtimes, run the stored parity inputs, compare
    with the stored reference outputs. Writes records.json and the outputs (for plots)."""
    import exporters
    from exporters.base import read_manifest
    from parity.compare import ParityRecord, tolerance_for
    with np.load(ctx.input_dir(f"reference:{m.name}") / "reference.npz") as f:
        ref = {k: f[k] for k in f.files}
    variants = VARIANTS_BY_FORMAT.get(fmt, ("fp32",))
    name = f"export:{m.name}:{fmt}"
    facts = ctx.input_facts(name)
    records, outputs = [], {}
    if facts.get("error"):
        records += [ParityRecord.failed_to_load(m.name, fmt, v, None, None, f"export failed: {facts['error']}")
                    for v in variants]
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
                rec, got = _check(module, artifact, runtime, ref, tol, spec, m)
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


def _check(module, artifact, runtime, ref: dict, tol, spec: Spec, m: ModelSpec):
    """One artifact in one runtime: batch 1, the largest declared batch, then the rest of the rows."""
    from parity.compare import ParityRecord, compare
    x, y_ref, labels, kinds = ref["x"], ref["y"], ref.get("labels"), ref["kind"]
    t0 = time.perf_counter()
    try:
        runner = module.load(artifact, runtime)
    except Exception as e:
        return ParityRecord.failed_to_load(m.name, artifact.format, artifact.variant, runtime, artifact.path,
                                           e), None
    try:
        cuts = [0, 1, min(1 + spec.parity.max_batch, len(x)), len(x)]
        parts = [np.asarray(runner(x[a:b])) for a, b in zip(cuts, cuts[1:]) if b > a]
        got = np.concatenate(parts).reshape(y_ref.shape) if sum(map(len, parts)) == len(x) else \
            np.concatenate(parts)
    except Exception as e:
        return ParityRecord.failed_to_load(m.name, artifact.format, artifact.variant, runtime, artifact.path,
                                           f"running failed: {type(e).__name__}: {e}"), None
    finally:
        close = getattr(runner, "close", None)
        if close:
            close()
    comparison = compare(y_ref, got, tolerance=tol, task=spec.data.task, labels=labels, kinds=kinds)
    rec = ParityRecord.checked(m.name, artifact.format, artifact.variant, runtime, artifact.path, comparison,
                               elapsed_s=time.perf_counter() - t0,
                               details={"route": artifact.route, "batch_sizes": artifact.batch_sizes,
                                        "input_layout": artifact.input_layout, "size_bytes": artifact.size_bytes,
                                        **({"note": artifact.details["note"]} if artifact.details.get("note") else {})})
    return rec, got


# --------------------------------------------------------------------------- report

REPORT_CODE = STAGES_CODE + ("parity/compare.py", "parity/report.py", "parity/plots.py")


def report_stage(spec: Spec) -> Stage:
    import exporters
    verifies = tuple(f"verify:{m.name}:{fmt}" for m in spec.models for fmt in exporters.FORMATS
                     if fmt in spec.formats)
    inputs = verifies + tuple(f"{k}:{m.name}" for m in spec.models for k in ("train", "reference"))
    return Stage("report", "report", {"spec": spec.name, "formats": list(spec.formats),
                                      "tolerances": spec.parity.tolerances},
                 REPORT_CODE, lambda ctx: run_report(ctx, spec), inputs=inputs)


def run_report(ctx: Context, spec: Spec) -> dict:
    """parity.json, parity.md and junit.xml for the whole run, the discrimination of each model's
    parity set, and the plots a reviewer looks at."""
    import exporters
    from parity.compare import ParityRecord, discrimination, tolerance_for
    from parity.plots import plot_model_parity, plot_training_curve
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
        with np.load(ctx.input_dir(f"reference:{m.name}") / "reference.npz") as f:
            y_ref, y_perturbed = f["y"], f["y_perturbed"]
        report.discrimination[m.name] = discrimination(
            y_ref, y_perturbed, tolerance_for("fp32", "onnx", spec.parity.tolerances), task=spec.data.task,
            perturbation=f"{PERTURBATION:g} relative weight noise")
        plots.append(plot_model_parity(m.name, y_ref, outs, ctx.out / f"parity_{m.name}.png"))
        history = json.loads((ctx.input_dir(f"train:{m.name}") / "history.json").read_text())
        plots.append(plot_training_curve(history, ctx.out / f"training_{m.name}.png",
                                         title=f"{spec.name} / {m.name} ({m.framework}): training loss"))
    report.write_json(ctx.out / "parity.json")
    report.write_markdown(ctx.out / "parity.md")
    report.write_junit(ctx.out / "junit.xml")
    return {"passed": report.passed, "counts": report.counts, "failures": [r.message for r in report.failed_records],
            "warnings": report.warnings, "plots": [p.name for p in map(Path, plots)],
            "summary": report.summary_line()}
