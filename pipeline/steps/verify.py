"""The verify step: every artifact of one format in each of its runtimes, against the reference
outputs; a cell whose converter or runtime cannot take the model is UNSUPPORTED, with what to do."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from parity.feeds import unpack

from ..spec_slice import from_slice
from ..stage_run import Context
from ..spec import ModelSpec, Spec
from .common import trained_model


def run_verify(ctx: Context, spec: dict, model: str, fmt: str) -> dict:
    """Load each artifact of one format in each of its runtimes, run the stored parity inputs, compare
    with the stored reference outputs. Writes records.json and the outputs (for plots)."""
    import exporters
    from exporters.base import read_manifest
    from parity.compare import ParityRecord
    from parity.signature import Signature
    spec = from_slice(spec)
    m = spec.model(model)
    with np.load(ctx.input_dir(f"reference:{m.name}") / "reference.npz") as f:
        ref = {k: f[k] for k in f.files if not k.startswith("x:")} | {"x": unpack(f, "x")}
    model_sig = Signature.from_json(ctx.input_facts(f"reference:{m.name}")["signature"])
    variants = exporters.variants(fmt)
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
        for artifact, runtime, rec, got, env in in_each_runtime(
                module, artifacts, ref, spec.parity.tolerances, task=spec.data.task,
                max_batch=spec.parity.max_batch, model=m.name, signature=model_sig):
            if env:
                ctx.volatile(f"{artifact.label} on {runtime}: {env[:200]}")
            if rec.details.get("outcome") == "unsupported":  # the runtime has no kernel for an op
                rec = unsupported_record(spec, m, fmt, artifact.variant, rec.details["runtime_error"],
                                         runtime=runtime)
            records.append(rec)
            if got is not None:
                outputs[f"{artifact.label}@{runtime}"] = got
        from ..localization import localize_failures
        localize_failures(records, artifacts, ref, spec.parity.tolerances, framework=m.framework,
                          load_model=lambda: trained_model(ctx, spec, m), log=ctx.log)
    np.savez(ctx.out / "outputs.npz", **outputs)
    return write_records(records, ctx.out)


def in_each_runtime(module, artifacts, ref: dict, tolerances: dict, *, task: str, max_batch: int, model: str,
                    signature):
    """Each artifact of one format in each of its runtimes, against the reference outputs, under the
    tolerance of its variant: (artifact, runtime, record, outputs, environment problem) one by one.
    The one comparison the pipeline's verify and the release gate's share."""
    import exporters
    from exporters.verify import check_artifact
    from parity.compare import tolerance_for
    for artifact in artifacts:
        tol = tolerance_for(exporters.precision(module.FORMAT, artifact.variant), module.FORMAT, tolerances)
        for runtime in module.RUNTIMES:
            rec, got, env = check_artifact(module, artifact, runtime, ref, tol, task=task, max_batch=max_batch,
                                           model=model, model_signature=signature)
            if env:  # the machine, not the artifact: a missing runtime, say
                rec.details["cause"] = "environment"
            yield artifact, runtime, rec, got, env


def write_records(records: list, out: Path) -> dict:
    """records.json, and the facts the report and the run record read."""
    (out / "records.json").write_text(json.dumps([r.to_json() for r in records], indent=2))
    failed = [r for r in records if r.status == "failed"]
    checked = [r for r in records if r.status != "skipped"]
    return {"checked": len(checked), "failed": len(failed), "skipped": len(records) - len(checked),
            "failures": [r.message for r in failed],
            "summary": f"{len(checked) - len(failed)}/{len(checked)} checks passed"}


def run_bundle_verify(ctx: Context, bundle: str, fmt: str) -> dict:
    """The release gate's verify: each artifact of one format in a registered bundle, against the
    bundle's reference outputs; an artifact whose bytes differ from the manifest fails whatever its numbers."""
    import exporters
    from exporters.bundle import REFERENCE, read_bundle
    from parity.compare import ParityRecord
    from parity.signature import Signature
    b = read_bundle(Path(bundle))
    m = b.manifest
    reference_problems = b.file_problems(REFERENCE)
    records = []
    for artifact, _, rec, _, _ in in_each_runtime(
            exporters.module(fmt), b.artifacts(fmt), b.reference(), m.get("tolerances") or {}, task=m["task"],
            max_batch=int(m.get("max_batch", 16)), model=m["model"], signature=Signature.from_json(m["signature"])):
        problems = {**reference_problems, **b.file_problems(b.relative(artifact))}
        if problems:
            shown = "; ".join(f"{f}: {why}" for f, why in sorted(problems.items())[:3])
            c = rec.comparison
            numbers = (f"; its outputs: {c.failures[0]}" if c is not None and c.failures else
                       "; its outputs still match" if c is not None else f"; {rec.error}")
            rec = ParityRecord(rec.model, rec.format, rec.variant, rec.runtime, rec.artifact,
                               comparison=c, elapsed_s=rec.elapsed_s,
                               error=f"the registered bundle was changed: {shown}{numbers}",
                               details={**rec.details, "integrity": problems})
        records.append(rec)
    return write_records(records, ctx.out)


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
