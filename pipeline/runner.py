"""The stage runner: computes every stage's cache key up front, skips what is cached, runs the rest.

Stages that belong to a model (its "lane": train, reference, export, verify) run in one worker
process per model, the lanes side by side, so the TensorFlow side and the PyTorch side of a run
proceed at once and the parent process never imports a framework. Stages without a lane (data,
reports) run in the parent.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .cache import Cache, Entry, code_version, stage_key

STAGE_ORDER = ("data", "parity_set", "train", "reference", "export", "verify", "report", "deploy")


@dataclass
class Stage:
    name: str                      # unique in a run, e.g. "train:keras"
    kind: str                      # one of STAGE_ORDER
    settings: dict                 # everything besides inputs and code that decides the output
    code: tuple[str, ...]          # source files (relative to the package root) the output depends on
    run: Callable[["Context"], dict]  # writes into ctx.out, returns facts (JSON-able)
    inputs: tuple[str, ...] = ()   # names of upstream stages
    lane: str | None = None        # model name for per-model stages
    key: str = ""                  # set by assign_keys
    input_keys: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    stage: Stage
    out: Path
    inputs: dict[str, Entry]
    memo: dict                     # objects handed between stages of one lane (a trained model)
    log: Callable[[str], None]

    def input_dir(self, name: str) -> Path:
        return self.inputs[name].path

    def input_facts(self, name: str) -> dict:
        return self.inputs[name].meta()["facts"]


@dataclass
class StageResult:
    name: str
    kind: str
    key: str
    lane: str | None
    cached: bool
    elapsed_s: float
    facts: dict = field(default_factory=dict)
    error: str | None = None
    path: str = ""


class StageFailed(RuntimeError):
    def __init__(self, result: StageResult, message: str):
        super().__init__(message)
        self.result = result


def assign_keys(stages: list[Stage]) -> None:
    by_name = {s.name: s for s in stages}
    for s in stages:  # stages are listed upstream-first
        s.input_keys = {n: by_name[n].key for n in s.inputs}
        s.key = stage_key(s.kind, s.settings, s.input_keys, code_version(s.code))


def plan(stages: list[Stage], cache: Cache, rerun_kinds: set[str]) -> dict[str, bool]:
    """Which stages will run: not cached, forced, or downstream of one that runs."""
    will_run: dict[str, bool] = {}
    for s in stages:
        upstream = any(will_run[n] for n in s.inputs)
        will_run[s.name] = (s.kind in rerun_kinds or upstream or cache.lookup(s.kind, s.key) is None)
    return will_run


def run_stage(stage: Stage, cache: Cache, memo: dict, force: bool, prefix: str = "") -> StageResult:
    def log(msg: str) -> None:
        print(f"{prefix}  {stage.name:<24} {msg}", flush=True)

    existing = None if force else cache.lookup(stage.kind, stage.key)
    if existing is not None:
        meta = existing.meta()
        log(f"cached   (key {stage.key[:10]}, built in {meta.get('elapsed_s', 0):.2f} s)")
        return StageResult(stage.name, stage.kind, stage.key, stage.lane, True, 0.0, meta.get("facts", {}),
                           path=str(existing.path))
    inputs = {}
    for n in stage.inputs:
        kind = n.split(":", 1)[0]
        entry = cache.lookup(kind, stage.input_keys[n])
        if entry is None:
            raise RuntimeError(f"stage {stage.name}: input {n} is missing from the cache")
        inputs[n] = entry
    tmp = cache.begin(stage.kind, stage.key)
    log("running ...")
    t0 = time.perf_counter()
    try:
        facts = stage.run(Context(stage, tmp, inputs, memo, log)) or {}
    except BaseException as e:
        cache.abandon(tmp)
        elapsed = time.perf_counter() - t0
        result = StageResult(stage.name, stage.kind, stage.key, stage.lane, False, elapsed,
                             error=f"{type(e).__name__}: {e}")
        log(f"FAILED   after {elapsed:.2f} s")
        raise StageFailed(result, f"stage {stage.name} failed: {e}") from e
    elapsed = time.perf_counter() - t0
    entry = cache.commit(stage.kind, stage.key, tmp, {"name": stage.name, "settings": stage.settings,
                                                       "inputs": list(stage.inputs), "facts": facts,
                                                       "elapsed_s": elapsed})
    summary = facts.get("summary", "")
    log(f"done     {elapsed:6.2f} s  {summary}".rstrip())
    return StageResult(stage.name, stage.kind, stage.key, stage.lane, False, elapsed, facts,
                       path=str(entry.path))


def run_lane(stages: list[Stage], cache_root: str, forced: dict[str, bool], prefix: str) -> list:
    """Run one lane's stages in order in this process; returns results (or the failure) picklable."""
    cache, memo, results = Cache(Path(cache_root)), {}, []
    for s in stages:
        try:
            results.append(run_stage(s, cache, memo, forced[s.name], prefix))
        except StageFailed as e:
            results.append(e.result)
            traceback.print_exception(e.__cause__ or e, file=sys.stderr, limit=-3)
            break
    return results


def _lane_worker(spec_ref: str, lane: str, names: list[str], cache_root: str, forced: dict, prefix: str):
    """Entry point of a lane process: rebuild the stage list from the spec (functions do not pickle)."""
    from .stages import build_stages
    from .spec import load
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    stages = build_stages(load(spec_ref))
    assign_keys(stages)
    wanted = [s for s in stages if s.name in names]
    return run_lane(wanted, cache_root, forced, prefix)


def execute(stages: list[Stage], cache: Cache, rerun_kinds: set[str], spec_ref: str,
            parallel: bool = True, on_lanes_started: Callable[[], Any] | None = None) -> list[StageResult]:
    """Run a spec's stages; raises StageFailed (with every result so far on .results) on failure."""
    assign_keys(stages)
    will_run = plan(stages, cache, rerun_kinds)
    forced = {s.name: (s.kind in rerun_kinds) or (will_run[s.name] and any(will_run[n] for n in s.inputs))
              for s in stages}
    lanes: dict[str, list[Stage]] = {}
    for s in stages:
        if s.lane:
            lanes.setdefault(s.lane, []).append(s)
    lane_names = {s.name for ls in lanes.values() for s in ls}
    pre = [s for s in stages if s.name not in lane_names and not _depends_on(s, lane_names, stages)]
    post = [s for s in stages if s.name not in lane_names and s not in pre]

    results: list[StageResult] = []
    memo: dict = {}

    def run_in_parent(group: list[Stage]) -> None:
        for s in group:
            try:
                results.append(run_stage(s, cache, memo, forced[s.name]))
            except StageFailed as e:
                results.append(e.result)
                _raise_with(results, e)

    run_in_parent(pre)
    busy = {lane: ls for lane, ls in lanes.items() if any(will_run[s.name] for s in ls)}
    idle = {lane: ls for lane, ls in lanes.items() if lane not in busy}
    for ls in idle.values():  # all cached: no process, no framework import
        results.extend(run_lane(ls, str(cache.root), forced, ""))
    if busy:
        lane_results = _run_lanes(busy, cache, forced, spec_ref, parallel, on_lanes_started)
    else:
        if on_lanes_started:
            on_lanes_started()
        lane_results = []
    for lr in lane_results:
        results.extend(lr)
    failed = [r for r in results if r.error]
    if failed:
        _raise_with(results, StageFailed(failed[0], f"stage {failed[0].name} failed: {failed[0].error}"))
    run_in_parent(post)
    return results


def _run_lanes(busy, cache, forced, spec_ref, parallel, on_started) -> list[list[StageResult]]:
    if not parallel or len(busy) == 1:
        if on_started:
            on_started()
        out = []
        for lane, ls in busy.items():
            out.append(_lane_worker(spec_ref, lane, [s.name for s in ls], str(cache.root), forced, ""))
            if any(r.error for r in out[-1]):
                break
        return out
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(busy), mp_context=ctx) as pool:
        futures = [pool.submit(_lane_worker, spec_ref, lane, [s.name for s in ls], str(cache.root), forced,
                               "") for lane, ls in busy.items()]
        if on_started:
            on_started()  # the parent's own work (MLflow set-up) overlaps the lanes
        return [f.result() for f in futures]


def _depends_on(stage: Stage, names: set[str], stages: list[Stage]) -> bool:
    by_name = {s.name: s for s in stages}
    todo = list(stage.inputs)
    while todo:
        n = todo.pop()
        if n in names:
            return True
        todo.extend(by_name[n].inputs)
    return False


def _raise_with(results: list[StageResult], error: StageFailed) -> None:
    error.results = list(results)  # type: ignore[attr-defined]
    raise error


def results_to_json(results: list[StageResult]) -> list[dict]:
    return [r.__dict__ for r in results]


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())
