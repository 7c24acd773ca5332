"""The report step: every verify record in one parity report (JSON, Markdown, JUnit) with its plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..spec_slice import from_slice
from ..stage_run import Context
from ..spec import ModelSpec
from .common import PERTURBATION


def run_report(ctx: Context, spec: dict) -> dict:
    """parity.json, parity.md and junit.xml for the whole run, the discrimination of each model's
    parity set, and the plots a reviewer looks at."""
    import exporters
    spec = from_slice(spec)
    from parity.compare import ParityRecord, discrimination, task_hint, tolerance_for
    from ..plots import plot_layer_errors, plot_model_parity, plot_profiles, plot_training_curve
    from parity.report import ParityReport
    report = ParityReport(spec=spec.name, metadata={"spec_path": str(spec.path)})
    plots = []
    for m in spec.models:
        outs = {}
        for fmt in exporters.FORMATS:
            variants = exporters.variants(fmt)
            if fmt not in spec.formats:
                if fmt in exporters.OPT_IN:  # made only when named: nothing to say where it is not
                    continue
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
        localized = {f"{r.label}@{r.runtime}": r.details["localization"] for r in report.records
                     if r.model == m.name and (r.details or {}).get("localization", {}).get("layers")}
        if localized:
            plots.append(plot_layer_errors(localized, ctx.out / f"layers_{m.name}.png",
                                           title=f"{spec.name} / {m.name}: error per layer of the failed artifacts"))
        history = json.loads((ctx.input_dir(f"train:{m.name}") / "history.json").read_text())
        curves = {k: v for k, v in history.items() if isinstance(v, list) and (v or k == "loss")}
        plots.append(plot_training_curve(curves, ctx.out / f"training_{m.name}.png",
                                         title=f"{spec.name} / {m.name} ({m.framework}): training loss"))
    report.metadata["not_reproducible"] = not_reproducible(report.records)
    profiles = {f"{r.label}@{r.runtime}": r.details["profile"] for r in report.records
                if "batch_1" in (r.details or {}).get("profile", {})}
    if profiles:  # also in MLflow, with the other plots
        plots.append(plot_profiles(profiles, ctx.out / "profiles.png",
                                   title=f"{spec.name}: latency and size of every passing artifact"))
    if "edge" in spec.deploy:
        import shutil
        for shot in sorted((ctx.input_dir("deploy:edge") / "edge" / "screenshots").glob("*.png")):
            shutil.copy2(shot, ctx.out / f"browser_{shot.name}")
            plots.append(str(ctx.out / f"browser_{shot.name}"))
    return {**write_report(report, ctx.out), "warnings": report.warnings,
            "plots": [p.name for p in map(Path, plots)]}


def not_reproducible(records) -> dict[str, list[str]]:
    """Why -> the files ("label: path in the artifact") a converter writes anew on every run
    (exporters.bundle.NOT_REPRODUCIBLE), found in the artifacts these records verified."""
    from exporters.bundle import NOT_REPRODUCIBLE
    found, seen = {}, set()
    for r in records:
        root = Path(r.artifact) if r.artifact else None
        if root is None or r.label in seen or not root.exists():
            continue
        seen.add(r.label)
        for p in [root] if root.is_file() else sorted(root.rglob("*")):
            if p.name in NOT_REPRODUCIBLE:
                found.setdefault(NOT_REPRODUCIBLE[p.name], []).append(f"{r.label}: {p.relative_to(root.parent).as_posix()}")
    return found


def write_report(report, out: Path) -> dict:
    """parity.json, parity.md, junit.xml and report.html (with the plots beside them inlined), and the
    facts the verdict is read from (pipeline/verdict.py):
    the one report writer the pipeline's report and the release gate's share."""
    report.write_json(out / "parity.json")
    report.write_markdown(out / "parity.md")
    report.write_junit(out / "junit.xml")
    report.write_html(out / "report.html", sorted(out.glob("*.png")))
    return {"passed": report.passed, "verdict": report.verdict, "inconclusive": report.inconclusive,
            "counts": report.counts, "failures": [r.message for r in report.failed_records],
            "summary": report.summary_line()}


def run_gate_report(ctx: Context, bundle: str) -> dict:
    """The release gate's report: every verify record of one registered bundle, and its parity set's
    discrimination."""
    from exporters.bundle import read_bundle
    from parity.compare import ParityRecord, discrimination, tolerance_for
    from parity.report import ParityReport
    b = read_bundle(Path(bundle))
    report = ParityReport(spec=b.manifest.get("source", {}).get("spec"), metadata={"bundle": str(b.root)})
    for name in ctx.inputs:
        for r in json.loads((ctx.input_dir(name) / "records.json").read_text()):
            report.add(ParityRecord.from_json(r))
    ref = b.reference()
    report.discrimination[b.model] = discrimination(
        ref["y"], ref.get("y_perturbed"), tolerance_for("fp32", "onnx", b.manifest.get("tolerances") or {}),
        task=b.manifest["task"])
    return write_report(report, ctx.out)


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
