"""The stage runner: computes every stage's cache key up front, skips what is cached, runs the rest.

A stage is plain data: its settings, its inputs, its lane and the import name of the function that
runs it (`fn`, called as fn(ctx, **args)). Any process can run it from that description, so the
executor needs nothing but the stage list: no worker rebuilds the stage graph from a spec.

Each stage that needs a framework names its lane: "tensorflow" or "torch". One worker process per
lane runs that lane's stages as soon as their inputs are ready, so the TensorFlow side and the PyTorch
side of a run proceed at once, each process imports one framework, and the parent process never
imports a framework. Stages without a lane (data, reports) run in the parent. Workers send their log
lines and progress through the result queue, and their own stdout and stderr (library chatter,
native banners) go to a log file, shown only where a stage fails.
"""
from __future__ import annotations

import importlib
import json
import logging
import multiprocessing
import os
import queue
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .cache import Cache, CacheError, Entry, code_version, stage_key
from .progress import Display

STAGE_ORDER = ("data", "parity_set", "train", "reference", "export", "verify", "bundle", "report")


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


class StageFailed(RuntimeError):
    def __init__(self, result: StageResult, message: str):
        super().__init__(message)
        self.result = result


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
        will_run[s.name] = entry is None or not _inputs_unchanged(entry, s, cache)
    return will_run


def _inputs_unchanged(entry: Entry, stage: Stage, cache: Cache) -> bool:
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


def run_stage(stage: Stage, cache: Cache, memo: dict, force: bool, display: "Display | _Relay") -> StageResult:
    def log(msg: str) -> None:
        display.line(stage.name, msg)

    existing = None if force else cache.lookup(stage.kind, stage.key)
    if existing is not None and _inputs_unchanged(existing, stage, cache):
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


WARM_IMPORTS = {"tensorflow": ("tensorflow", "keras"), "torch": ("torch",)}
KEEP_LOGS = 40  # worker log files kept in .pipeline/logs (two per run that started workers)


class _Relay:
    """A worker's stand-in for the parent's Display: everything goes back on the result queue."""

    def __init__(self, results):
        self.results = results
        self._last: dict[str, float] = {}

    def line(self, name: str, msg: str) -> None:
        self.results.put(("line", name, msg))

    def start(self, name: str) -> None:
        self.results.put(("start", name))

    def progress(self, name: str, done: float, total: float, note: str) -> None:
        now = time.monotonic()
        if done < total and now - self._last.get(name, 0.0) < 0.1:
            return  # at most ten updates a second per stage
        self._last[name] = now
        self.results.put(("progress", name, done, total, note))

    def finish(self, name: str) -> None:
        self.results.put(("finish", name))


def _worker_main(lane: str, cache_root: str, log_path: str, tasks, results) -> None:
    """A lane's process: import its framework while the parent prepares, then run stages on request."""
    import warnings
    _redirect_output(log_path)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=FutureWarning)  # converters' deprecation chatter
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for module in WARM_IMPORTS.get(lane, ()):
        importlib.import_module(module)
    for noisy in ("torch.onnx", "torch.utils._pytree"):  # "torchvision is not installed" x4, deprecations
        logging.getLogger(noisy).setLevel(logging.ERROR)
    cache, memo, relay = Cache(Path(cache_root)), {}, _Relay(results)
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent was killed: nobody will ask for more
                break
            continue
        if task is None:
            break
        stage, force = task
        try:
            results.put(("result", run_stage(stage, cache, memo, force, relay)))
        except StageFailed as e:
            results.put(("result", e.result))
        except BaseException as e:  # the runner itself broke: still answer, never hang the parent
            results.put(("result", StageResult(stage.name, stage.kind, stage.key, stage.lane, False, 0.0,
                                               error=f"{type(e).__name__}: {e}",
                                               traceback="".join(traceback.format_exception(e)))))
        for line in cache.changed:
            results.put(("note", line))
        cache.changed.clear()
        dump_modules(lane)
    results.close()
    results.join_thread()  # every result is on the pipe before the process goes
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: seconds with TensorFlow, torch and jax loaded


def dump_modules(process: str) -> None:
    """With PIPELINE_MODULES_DUMP set (a folder), write the top-level modules this process has loaded,
    so a test can see for itself which frameworks each process imported."""
    folder = os.environ.get("PIPELINE_MODULES_DUMP")
    if folder:
        names = sorted({m.split(".")[0] for m in list(sys.modules)})
        Path(folder, f"{process}-{os.getpid()}.json").write_text(json.dumps(names))


def _redirect_output(log_path: str) -> None:
    """Send this process's file descriptors 1 and 2 (Python's and native code's) to its log file."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class _Workers:
    """One spawned process per lane, fed through a task queue; messages come back on one queue."""

    def __init__(self, lanes: set[str], cache_root: str, log_dir: Path):
        # Workers skip interpreter teardown, so a library's semaphore is left to multiprocessing's
        # resource tracker, which frees it and then warns; it takes its warning filters from ours.
        quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
        if quiet not in sys.warnoptions:
            sys.warnoptions.append(quiet)
        log_dir.mkdir(parents=True, exist_ok=True)
        for old in sorted(log_dir.glob("*.log"))[:-KEEP_LOGS]:
            old.unlink(missing_ok=True)
        self.logs = {lane: log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{lane}.log" for lane in lanes}
        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = {lane: ctx.Queue() for lane in lanes}
        self.procs = {lane: ctx.Process(target=_worker_main, name=f"lane-{lane}", daemon=True,
                                        args=(lane, cache_root, str(self.logs[lane]), self.tasks[lane],
                                              self.results))
                      for lane in lanes}
        # spawn re-imports the parent's main script in each child; a main that is no file (python -,
        # an embedding host) would fail there, and the workers need nothing from it
        main = sys.modules.get("__main__")
        path = getattr(main, "__file__", None)
        hide = path is not None and not os.path.isfile(path)
        if hide:
            del main.__file__
        try:
            for p in self.procs.values():
                p.start()
        finally:
            if hide:
                main.__file__ = path

    def submit(self, stage: Stage, force: bool) -> None:
        self.tasks[stage.lane].put((stage, force))

    def next_message(self, in_flight: dict[str, Stage]) -> tuple:
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                for lane, p in self.procs.items():
                    if not p.is_alive():
                        stuck = next((s for s in in_flight.values() if s.lane == lane), None)
                        if stuck is not None:
                            return ("result", StageResult(
                                stuck.name, stuck.kind, stuck.key, lane, False, 0.0,
                                error=f"the {lane} worker process died (exit code {p.exitcode}); "
                                      f"its output: {self.logs[lane]}"))

    def close(self) -> None:
        for q in self.tasks.values():
            q.put(None)
        for p in self.procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        for q in (*self.tasks.values(), self.results):
            q.close()
            q.join_thread()


def execute(stages: list[Stage], cache: Cache, rerun_kinds: set[str], *, parallel: bool = True,
            on_plan: Callable[[dict[str, bool]], None] | None = None,
            log_dir: Path | None = None) -> list[StageResult]:
    """Run stages (upstream first); raises StageFailed (with every result so far on .results) on failure.

    A stage starts once all its inputs are done; after a failure, independent stages still run (the
    other model, the other formats), stages downstream of it do not.
    """
    assign_keys(stages)
    will_run = plan(stages, cache, rerun_kinds)
    display = Display()
    for line in cache.changed:
        display.note(line)
    cache.changed.clear()
    lanes = {s.lane for s in stages if s.lane and will_run[s.name]} if parallel else set()
    workers = _Workers(lanes, str(cache.root), log_dir or cache.root.parent / "logs") if lanes else None
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
            message = workers.next_message(in_flight)
            if message[0] == "result":
                result = message[1]
                in_flight.pop(result.name, None)
                done[result.name] = result
                if result.error:
                    _show_failure(display, result, workers.logs.get(result.lane or ""))
            else:
                display.handle(message)
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
