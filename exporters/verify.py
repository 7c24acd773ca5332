"""Run an artifact in its runtime on stored parity inputs and judge it against stored reference outputs.

Shared by the pipeline's verify stage, the release gate on a registered bundle, and (later) the
serving and edge checks: framework-free itself; each format module imports its runtime on load.
"""
from __future__ import annotations

import time

import numpy as np

from parity.compare import ParityRecord, Tolerance, compare
from parity.feeds import flat_rows, is_multi, n_rows, split_rows
from parity.signature import Signature, TensorSpec, describe_mapping, map_tensors

from .base import Artifact, OpNotImplemented, RuntimeUnavailable


def feed_cuts(n_rows: int, max_batch: int) -> list[tuple[int, int]]:
    """How the parity rows are fed: batch 1, then the largest declared batch, then the rest."""
    cuts = [0, 1, min(1 + max_batch, n_rows), n_rows]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def environment_problem(error: BaseException) -> str | None:
    """A sentence when `error` says the machine lacks something (a runtime, a package), not that the
    artifact is wrong; such an outcome is never reused as the artifact's verdict."""
    if isinstance(error, RuntimeUnavailable):
        return str(error)
    if isinstance(error, ImportError):
        return f"{type(error).__name__}: {error}"
    return None


def check_artifact(module, artifact: Artifact, runtime: str, reference: dict[str, np.ndarray], tolerance: Tolerance,
                   *, task: str, max_batch: int, model: str | None = None, model_signature: Signature | None = None,
                   profiled: bool = True) -> tuple[ParityRecord, np.ndarray | None, str | None]:
    """One artifact in one runtime. Returns (record, outputs or None, environment problem or None).
    With the model's signature, the record says how the artifact's inputs and outputs map to it; a
    passing one carries its profile (exporters/profile.py) unless `profiled` is false."""
    model = model or artifact.model
    t0 = time.perf_counter()
    try:
        runner = module.load(artifact, runtime)
    except Exception as e:
        return (ParityRecord.failed_to_load(model, artifact.format, artifact.variant, runtime, artifact.path, e),
                None, environment_problem(e))
    load_s = time.perf_counter() - t0
    try:
        rec, got, env = _checked(runner, artifact, runtime, reference, tolerance, task=task, max_batch=max_batch,
                                 model=model, model_signature=model_signature, t0=t0)
        if rec.passed and profiled:  # how fast and how big, on the runner that just passed
            from .profile import profile
            try:
                rec.details["profile"] = profile(runner, reference["x"], max_batch=max_batch, load_s=load_s,
                                                 size_bytes=artifact.size_bytes)
            except Exception as e:  # noqa: BLE001 - the verdict stands; the profile says why it is missing
                rec.details["profile"] = {"error": f"not measured: {type(e).__name__}: {str(e)[:200]}"}
        return rec, got, env
    finally:
        close = getattr(runner, "close", None)
        if close:
            close()


def _checked(runner, artifact: Artifact, runtime: str, reference: dict[str, np.ndarray], tolerance: Tolerance, *,
             task: str, max_batch: int, model: str, model_signature: Signature | None, t0: float
             ) -> tuple[ParityRecord, np.ndarray | None, str | None]:
    """The parity record of a loaded artifact on the reference's rows."""
    x, y_ref, labels, kinds = reference["x"], reference["y"], reference.get("labels"), reference["kind"]
    rows = n_rows(x)
    cuts = feed_cuts(rows, max_batch)
    model_outputs = model_signature.outputs if model_signature is not None else ()
    several = len(model_outputs) > 1
    try:
        if is_multi(x):  # named inputs go to the artifact's tensors matched by meaning, not position
            pairs, _ = map_tensors(model_signature.inputs if model_signature is not None else
                                   tuple(TensorSpec.of(k, v) for k, v in x.items()), runner.signature.inputs)
            feeds = [{pairs[k]: v[a:b] for k, v in x.items()} for a, b in cuts]
        else:
            feeds = [x[a:b] for a, b in cuts]
        if several:  # each of the model's outputs from the artifact's tensor matched to it, in the model's order
            if not is_multi(x):
                feeds = [{runner.signature.input_names[0]: f} for f in feeds]
            out_pairs, _ = map_tensors(model_outputs, runner.signature.outputs)
            parts = [flat_rows({k: result[out_pairs[k]] for k in out_pairs}) for result in map(runner.infer, feeds)]
        else:
            parts = [np.asarray(runner(f)) for f in feeds]  # one output: the artifact's first
        got = np.concatenate(parts)
        if len(got) == rows and got.size == y_ref.size:
            got = got.reshape(y_ref.shape)
    except Exception as e:
        rec = ParityRecord.failed_to_load(model, artifact.format, artifact.variant, runtime, artifact.path,
                                          f"running failed: {type(e).__name__}: {e}")
        if isinstance(e, OpNotImplemented):  # the runtime lacks a kernel: the caller may report it UNSUPPORTED
            rec.details.update(outcome="unsupported", runtime_error=str(e))
        return rec, None, environment_problem(e)
    seen = getattr(runner, "signature", None)
    # several outputs are compared as one concatenation (top-1 means nothing across them); each is told apart below
    comparison = compare(y_ref, got, tolerance=tolerance, task="regression" if several else task,
                         labels=None if several else labels, kinds=kinds)
    rec = ParityRecord.checked(model, artifact.format, artifact.variant, runtime, artifact.path, comparison,
                               elapsed_s=time.perf_counter() - t0,
                               details={"route": artifact.route, "batch_sizes": artifact.batch_sizes,
                                        "feeds": [b - a for a, b in cuts],
                                        "input_layout": artifact.input_layout, "size_bytes": artifact.size_bytes,
                                        **{k: artifact.details[k] for k in ("note", "route_taken", "routes_left", "int8_fallback")
                                           if artifact.details.get(k)}})
    if several and got.shape == y_ref.shape:
        per_row = {t.name: t.shape[1:] for t in model_outputs}
        rec.details["outputs_max_abs"] = {
            k: float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0
            for (k, a), b in zip(split_rows(got, per_row).items(), split_rows(y_ref, per_row).values())}
    facts = getattr(runner, "backend_facts", None)
    if facts:  # what the backend that ran it said of itself (TF.js), beside the runtime that was asked for
        rec.details["backend"] = facts
    if seen is not None:
        rec.details["signature"] = seen.describe()
        if model_signature is not None:
            rec.details["mapping"] = describe_mapping(model_signature, seen)
    return rec, got, None
