"""One stage, run where it stands: the stage as plain data, what its function is handed, and what it
gives back. Every executor runs a stage through `run_stage`, in whichever process it chose.
"""
from __future__ import annotations

import importlib
import json
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from .cache import Cache, CacheError, Entry


class EventSink(Protocol):
    """Where a running stage's lines and progress go: the parent's Display, or a relay to it."""

    def line(self, name: str, msg: str) -> None: ...
    def start(self, name: str) -> None: ...
    def progress(self, name: str, done: float, total: float, note: str) -> None: ...
    def finish(self, name: str) -> None: ...


@dataclass
class Stage:
    name: str                      # unique in a run, e.g. "train:keras"
    kind: str                      # one of STAGE_ORDER (or a kind of the release gate's)
    settings: dict                 # everything besides inputs and code that decides the output
    code: tuple[str, ...]          # source files (relative to the package root) the output depends on
    fn: str                        # "module:function" run as fn(ctx, **args); writes ctx.out, returns facts
    args: dict = field(default_factory=dict)  # JSON-able arguments of fn (a spec's path, a model's name)
    inputs: tuple[str, ...] = ()   # names of upstream stages
    lane: str | None = None        # "tensorflow" or "torch": the worker process that runs it
    key: str = ""                  # set by assign_keys
    input_keys: dict[str, str] = field(default_factory=dict)
    input_kinds: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    stage: Stage
    out: Path
    inputs: dict[str, Entry]
    memo: dict                     # objects handed between stages of one lane (a trained model)
    log: Callable[[str], None]
    report_progress: Callable[[float, float, str], None] = lambda done, total, note: None
    volatile_reason: str | None = None

    def input_dir(self, name: str) -> Path:
        return self.inputs[name].path

    def input_facts(self, name: str) -> dict:
        return self.inputs[name].meta()["facts"]

    def progress(self, done: float, total: float, note: str = "") -> None:
        self.report_progress(done, total, note)

    def volatile(self, reason: str) -> None:
        """This outcome says something about the machine, not the inputs: never reuse it in a later run."""
        self.volatile_reason = self.volatile_reason or reason


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
    error_kind: str | None = None  # "usage": bad input from the user (exit 2); "failed": anything else
    volatile: str | None = None    # why this result is not reused by later runs
    traceback: str = ""
    ran_in: str = field(default_factory=lambda: f"{socket.gethostname()} pid {os.getpid()}")  # the process that made it


class StageFailed(RuntimeError):
    def __init__(self, result: StageResult, message: str):
        super().__init__(message)
        self.result = result


def inputs_unchanged(entry: Entry, stage: Stage, cache: Cache) -> bool:
    built_from = entry.meta().get("input_content", {})
    for n in stage.inputs:
        up = cache.lookup(stage.input_kinds[n], stage.input_keys[n])
        if up is None or built_from.get(n) != up.content:
            return False
    return True


def _call(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _error_kind(e: BaseException) -> str:
    return "usage" if getattr(e, "user_error", False) or isinstance(e, CacheError) else "failed"


def run_stage(stage: Stage, cache: Cache, memo: dict, force: bool, display: EventSink) -> StageResult:
    def log(msg: str) -> None:
        display.line(stage.name, msg)

    existing = None if force else cache.lookup(stage.kind, stage.key)
    if existing is not None and inputs_unchanged(existing, stage, cache):
        meta = existing.meta()
        log(f"cached   (key {stage.key[:10]}, built in {meta.get('elapsed_s', 0):.2f} s)")
        return StageResult(stage.name, stage.kind, stage.key, stage.lane, True, 0.0, meta.get("facts", {}),
                           path=str(existing.path))
    inputs = {}
    for n in stage.inputs:
        entry = cache.lookup(stage.input_kinds[n], stage.input_keys[n], volatile_ok=True)
        if entry is None:
            raise RuntimeError(f"stage {stage.name}: input {n} is missing from the cache")
        inputs[n] = entry
    t0 = time.perf_counter()
    try:
        tmp = cache.begin(stage.kind, stage.key)
        log("running ...")
        display.start(stage.name)
        ctx = Context(stage, tmp, inputs, memo, log,
                      report_progress=lambda done, total, note: display.progress(stage.name, done, total, note))
        # plain JSON values only: a framework's own types (torch's version string is one) would
        # make the parent import that framework just to unpickle the result
        facts = json.loads(json.dumps(_call(stage.fn)(ctx, **stage.args) or {}, default=str))
    except BaseException as e:
        if "tmp" in locals():
            cache.abandon(tmp)
        elapsed = time.perf_counter() - t0
        kind = _error_kind(e)
        result = StageResult(stage.name, stage.kind, stage.key, stage.lane, False, elapsed,
                             error=f"{type(e).__name__}: {e}" if kind == "failed" else str(e), error_kind=kind,
                             traceback="" if kind == "usage" else
                             "".join(traceback.format_exception(e, limit=-6)))
        log(f"FAILED   after {elapsed:.2f} s")
        display.finish(stage.name)
        raise StageFailed(result, f"stage {stage.name} failed: {e}") from e
    elapsed = time.perf_counter() - t0
    volatile = ctx.volatile_reason or next((i.volatile for i in inputs.values() if i.volatile), None)
    entry = cache.commit(stage.kind, stage.key, tmp, {
        "name": stage.name, "settings": stage.settings, "inputs": list(stage.inputs), "facts": facts,
        "elapsed_s": elapsed, "input_content": {n: e.content for n, e in inputs.items()}}, volatile=volatile)
    summary = facts.get("summary", "")
    display.finish(stage.name)
    log(f"done     {elapsed:6.2f} s  {summary}".rstrip() + (f"  (not cached: {volatile})" if volatile else ""))
    return StageResult(stage.name, stage.kind, stage.key, stage.lane, False, elapsed, facts,
                       path=str(entry.path), volatile=volatile)


def dump_modules(process: str) -> None:
    """With PIPELINE_MODULES_DUMP set (a folder), write the top-level modules this process has loaded,
    so a test can see for itself which frameworks each process imported."""
    folder = os.environ.get("PIPELINE_MODULES_DUMP")
    if folder:
        names = sorted({m.split(".")[0] for m in list(sys.modules)})
        Path(folder, f"{process}-{os.getpid()}.json").write_text(json.dumps(names))
