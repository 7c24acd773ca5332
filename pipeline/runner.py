"""The stage runner: computes every stage's cache key up front, skips what is cached, and hands the
rest to an executor as their inputs complete.

A stage is plain data (pipeline/stage_run.py): its settings, its inputs, its lane and the import name
of the function that runs it. Any process can run it from that description, so an executor needs
nothing but the stage: no worker rebuilds the stage graph from a spec. Which process runs a stage is
the executor's choice (pipeline/executors/): by default one local process per lane, so the
TensorFlow side and the PyTorch side of a run proceed at once and the parent never imports a
framework. Stages without a lane (data, reports) and stages found cached run in the parent.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import executors
from .cache import Cache, code_version, stage_key
from .executors.base import Executor, Finished, LogLine, Note, Progress, Result, Started
from .progress import Display
from .stage_run import (Context, Stage, StageFailed, StageResult, dump_modules,  # noqa: F401  (their home for callers)
                        inputs_unchanged, run_stage)

STAGE_ORDER = ("data", "parity_set", "train", "reference", "export", "verify", "bundle", "report")


def assign_keys(stages: list[Stage]) -> None:
    by_name = {s.name: s for s in stages}
    for s in stages:  # stages are listed upstream-first
        s.input_keys = {n: by_name[n].key for n in s.inputs}
        s.input_kinds = {n: by_name[n].kind for n in s.inputs}
        s.key = stage_key(s.kind, s.settings, s.input_keys, code_version(s.code))


def plan(stages: list[Stage], cache: Cache, rerun_kinds: set[str]) -> dict[str, bool]:
    """Which stages will run: not cached, forced, downstream of one that runs, or built from inputs
    whose files are not the ones it was built from."""
    will_run: dict[str, bool] = {}
    for s in stages:
        upstream = any(will_run[n] for n in s.inputs)
        entry = None if (s.kind in rerun_kinds or upstream) else cache.lookup(s.kind, s.key)
        will_run[s.name] = entry is None or not inputs_unchanged(entry, s, cache)
    return will_run



def execute(stages: list[Stage], cache: Cache, rerun_kinds: set[str], *, parallel: bool = True,
            executor: str | type[Executor] | None = None,
            on_plan: Callable[[dict[str, bool]], None] | None = None,
            log_dir: Path | None = None) -> list[StageResult]:
    """Run stages (upstream first); raises StageFailed (with every result so far on .results) on failure.

    A stage starts once all its inputs are done; after a failure, independent stages still run (the
    other model, the other formats), stages downstream of it do not. `executor` is a name from
    pipeline/executors/ or an Executor subclass; by default "local", or "inprocess" when not parallel.
    """
    assign_keys(stages)
    will_run = plan(stages, cache, rerun_kinds)
    display = Display()
    for line in cache.changed:
        display.note(line)
    cache.changed.clear()
    if executor is None:
        executor = executors.DEFAULT if parallel else "inprocess"
    executor_cls = executors.executor_class(executor) if isinstance(executor, str) else executor
    lanes = {s.lane for s in stages if s.lane and will_run[s.name]}
    workers = executor_cls(lanes, cache.root, log_dir or cache.root.parent / "logs",
                           on_event=lambda event: _show(display, event)) if lanes else None
    if on_plan:
        on_plan(will_run)
    done: dict[str, StageResult] = {}
    blocked: set[str] = set()
    in_flight: dict[str, Stage] = {}
    memo: dict = {}
    try:
        while True:
            for s in stages:
                if s.name in done or s.name in blocked or s.name in in_flight:
                    continue
                if any(n in blocked or (n in done and done[n].error) for n in s.inputs):
                    blocked.add(s.name)
                elif all(n in done for n in s.inputs):
                    if workers and s.lane and will_run[s.name]:
                        workers.submit(s, will_run[s.name])
                        in_flight[s.name] = s
                    else:
                        try:
                            done[s.name] = run_stage(s, cache, memo, will_run[s.name], display)
                        except StageFailed as e:
                            done[s.name] = e.result
                            _show_failure(display, e.result, None)
            if not in_flight:
                break
            event = workers.next_event(in_flight)
            if isinstance(event, Result):
                result = event.result
                in_flight.pop(result.name, None)
                done[result.name] = result
                if result.error:
                    _show_failure(display, result, workers.log_of(result.lane))
                elif not result.cached:  # a worker sharing this cache folder committed it: push it from
                    cache.publish(result.kind, result.key)  # here (a node with a copy of its own pushed it)
            else:
                _show(display, event)
    finally:
        if workers:
            workers.close()
        display.close()
    results = [done[s.name] for s in stages if s.name in done]
    failed = [r for r in results if r.error]
    if failed:
        error = StageFailed(failed[0], f"stage {failed[0].name} failed: {failed[0].error}")
        error.results = results  # type: ignore[attr-defined]
        raise error
    return results


def _show_failure(display: Display, result: StageResult, log: Path | None) -> None:
    if result.traceback:
        display.error(result.traceback.rstrip() + (f"\n(the {result.lane} worker's full output: {log})" if log else ""))


def _show(display: Display, event) -> None:
    if isinstance(event, LogLine):
        display.line(event.stage, event.text)
    elif isinstance(event, Progress):
        display.progress(event.stage, event.done, event.total, event.note)
    elif isinstance(event, Started):
        display.start(event.stage)
    elif isinstance(event, Finished):
        display.finish(event.stage)
    elif isinstance(event, Note):
        display.note(event.text)
    else:
        raise TypeError(f"an executor sent {event!r}: expected one of the events in pipeline/executors/base.py")
