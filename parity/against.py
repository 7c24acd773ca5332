"""A candidate against the version it would replace: the task metric of each artifact on the same
labelled held-out rows, its latency and its size, judged under thresholds. Plain numbers in, parity
records out (one per artifact, runtime and threshold, so JUnit has one test case for each)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .compare import Comparison, ParityRecord, Tolerance

THRESHOLDS = {
    "max_metric_drop": 0.01,    # accuracy may fall by this much, mse rise by this much (absolute)
    "max_latency_ratio": 1.5,   # p50 at the largest batch, candidate / baseline; timings here are noisy
    "max_size_ratio": 1.25,     # file size, candidate / baseline
}


def task_metric(task: str, got: np.ndarray, reference: Mapping[str, np.ndarray]) -> tuple[str, float] | None:
    """(name, value) on the labelled held-out rows: accuracy for a classifier (its `labels`), mse for a
    regression (its `targets`); None when the reference holds no labels for this task."""
    got = np.asarray(got)
    if task == "classification" and "labels" in reference:
        labels = np.asarray(reference["labels"])
        held = labels >= 0
        if held.any():
            return "accuracy", float(np.mean(got.reshape(len(got), -1)[held].argmax(axis=1) == labels[held]))
    if task == "regression" and "targets" in reference:
        targets = np.asarray(reference["targets"], dtype=np.float64)
        held = ~np.isnan(targets).any(axis=1)
        if held.any():
            diff = got.reshape(len(got), -1)[held].astype(np.float64) - targets[held]
            return "mse", float(np.mean(diff ** 2))
    return None


def judge(model: str, fmt: str, variant: str, runtime: str, candidate: Mapping[str, Any],
          baseline: Mapping[str, Any], thresholds: Mapping[str, float], against: str) -> list[ParityRecord]:
    """One record per threshold for an artifact measured twice: `candidate` and `baseline` each hold
    `metric` ((name, value) or None), `p50_ms` (at the largest batch) and `size_bytes`."""
    limits = {**THRESHOLDS, **thresholds}
    checks = []
    if candidate.get("metric") and baseline.get("metric"):
        name, new = candidate["metric"]
        _, old = baseline["metric"]
        drop = old - new if name == "accuracy" else new - old  # how much worse
        checks.append(("metric", drop <= limits["max_metric_drop"],
                       f"{name} {new:.4g} against {old:.4g} in {against}: {'drop' if name == 'accuracy' else 'rise'} "
                       f"{drop:.4g} {'<=' if drop <= limits['max_metric_drop'] else '>'} max_metric_drop "
                       f"{limits['max_metric_drop']:g}", {name: new, f"{name}_{against}": old, "worse_by": drop}))
    for check, key, limit in (("latency", "p50_ms", "max_latency_ratio"), ("size", "size_bytes", "max_size_ratio")):
        new, old = candidate.get(key), baseline.get(key)
        if not new or not old:
            continue
        ratio = new / old
        what = "latency p50" if check == "latency" else "size"
        unit = " ms" if check == "latency" else " bytes"
        checks.append((check, ratio <= limits[limit],
                       f"{what} {new:.4g}{unit} against {old:.4g}{unit} in {against}: ratio {ratio:.3g} "
                       f"{'<=' if ratio <= limits[limit] else '>'} {limit} {limits[limit]:g}",
                       {key: new, f"{key}_{against}": old, "ratio": ratio}))
    records = []
    for check, ok, sentence, metrics in checks:
        where = f"{model}/{fmt}{'' if variant == 'fp32' else '-' + variant} on {runtime}"
        comparison = Comparison(metrics=metrics, passed=ok, failures=[] if ok else [sentence], tolerance=Tolerance())
        records.append(ParityRecord(model, fmt, variant, f"{runtime} vs {against}: {check}", comparison=comparison,
                                    message=f"{'PASS' if ok else 'FAIL'} {where} against {against}: {sentence}",
                                    details={"against": {"check": check, "baseline": against, **metrics,
                                                         "limit": limits[{'metric': 'max_metric_drop',
                                                                          'latency': 'max_latency_ratio',
                                                                          'size': 'max_size_ratio'}[check]]}}))
    return records
