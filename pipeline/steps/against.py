"""The release gate's comparison with production: each artifact of one format of the candidate's
bundle and of the baseline's, in each runtime, on the candidate's labelled held-out rows: the task
metric, the latency and the size of both, judged under the gate's thresholds (parity/against.py)."""
from __future__ import annotations

from pathlib import Path

from ..stage_run import Context


def run_against(ctx: Context, candidate: str, baseline: str, fmt: str, against: str, thresholds: dict) -> dict:
    import exporters
    from exporters.bundle import read_bundle
    from parity.against import judge
    from parity.compare import ParityRecord
    from .verify import write_records
    new, old = read_bundle(Path(candidate)), read_bundle(Path(baseline))
    reference, task = new.reference(), new.manifest["task"]
    module = exporters.module(fmt)
    max_batch = int(new.manifest.get("max_batch", 16))
    records = []
    old_by_variant = {a.variant: a for a in old.artifacts(fmt)} if fmt in old.manifest["formats"] else {}
    for artifact in new.artifacts(fmt):
        base = old_by_variant.get(artifact.variant)
        if base is None:
            records.append(ParityRecord.skipped(new.model, fmt, artifact.variant,
                                                f"{against} has no {artifact.label} to compare with",
                                                skip="not-produced"))
            continue
        for runtime in module.RUNTIMES:
            measured = [_measure(module, a, runtime, reference, task, max_batch) for a in (artifact, base)]
            records += judge(new.model, fmt, artifact.variant, runtime, *measured, thresholds, against)
            if measured[0].get("metric") is None:
                ctx.log(f"{artifact.label} on {runtime}: the candidate's bundle holds no labelled held-out rows "
                        f"for a {task} metric; judged on latency and size")
    return write_records(records, ctx.out)


def _measure(module, artifact, runtime: str, reference: dict, task: str, max_batch: int) -> dict:
    """The artifact's task metric on the reference's labelled rows, its latency p50 at the largest
    batch and its size, in its runtime."""
    import time

    from exporters.profile import profile
    from parity.against import task_metric
    t0 = time.perf_counter()
    runner = module.load(artifact, runtime)
    try:
        load_s = time.perf_counter() - t0
        got = runner(reference["x"])
        found = profile(runner, reference["x"], max_batch=max_batch, load_s=load_s, size_bytes=artifact.size_bytes)
    finally:
        getattr(runner, "close", lambda: None)()
    return {"metric": task_metric(task, got, reference), "p50_ms": found["max_batch"]["p50_ms"],
            "size_bytes": artifact.size_bytes}
