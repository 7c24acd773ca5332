"""Run an artifact in its runtime on stored parity inputs and judge it against stored reference outputs.

Shared by the pipeline's verify stage, the release gate on a registered bundle, and (later) the
serving and edge checks: framework-free itself; each format module imports its runtime on load.
"""
from __future__ import annotations

import time

import numpy as np

from parity.compare import ParityRecord, Tolerance, compare
from parity.feeds import is_multi, n_rows
from parity.signature import Signature, TensorSpec, describe_mapping, map_tensors

from .base import Artifact, RuntimeUnavailable


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
                   *, task: str, max_batch: int, model: str | None = None, model_signature: Signature | None = None
                   ) -> tuple[ParityRecord, np.ndarray | None, str | None]:
    """One artifact in one runtime. Returns (record, outputs or None, environment problem or None).
    With the model's signature, the record says how the artifact's inputs and outputs map to it."""
    model = model or artifact.model
    x, y_ref, labels, kinds = reference["x"], reference["y"], reference.get("labels"), reference["kind"]
    t0 = time.perf_counter()
    try:
        runner = module.load(artifact, runtime)
    except Exception as e:
        return (ParityRecord.failed_to_load(model, artifact.format, artifact.variant, runtime, artifact.path, e),
                None, environment_problem(e))
    rows = n_rows(x)
    cuts = feed_cuts(rows, max_batch)
    try:
        if is_multi(x):  # named inputs go to the artifact's tensors matched by meaning, not position
            pairs, _ = map_tensors(model_signature.inputs if model_signature is not None else
                                   tuple(TensorSpec.of(k, v) for k, v in x.items()), runner.signature.inputs)
            parts = [np.asarray(next(iter(runner.infer({pairs[k]: v[a:b] for k, v in x.items()}).values())))
                     for a, b in cuts]
        else:
            parts = [np.asarray(runner(x[a:b])) for a, b in cuts]
        got = np.concatenate(parts)
        if len(got) == rows and got.size == y_ref.size:
            got = got.reshape(y_ref.shape)
    except Exception as e:
        return (ParityRecord.failed_to_load(model, artifact.format, artifact.variant, runtime, artifact.path,
                                            f"running failed: {type(e).__name__}: {e}"), None, environment_problem(e))
    finally:
        close = getattr(runner, "close", None)
        if close:
            close()
    seen = getattr(runner, "signature", None)
    comparison = compare(y_ref, got, tolerance=tolerance, task=task, labels=labels, kinds=kinds)
    rec = ParityRecord.checked(model, artifact.format, artifact.variant, runtime, artifact.path, comparison,
                               elapsed_s=time.perf_counter() - t0,
                               details={"route": artifact.route, "batch_sizes": artifact.batch_sizes,
                                        "feeds": [b - a for a, b in cuts],
                                        "input_layout": artifact.input_layout, "size_bytes": artifact.size_bytes,
                                        **({"note": artifact.details["note"]} if artifact.details.get("note") else {})})
    if seen is not None:
        rec.details["signature"] = seen.describe()
        if model_signature is not None:
            rec.details["mapping"] = describe_mapping(model_signature, seen)
    return rec, got, None
