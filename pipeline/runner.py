"""The stage runner: computes every stage's cache key up front, skips what is cached, runs the rest.

Each stage that needs a framework names its lane: "tensorflow" or "torch". One worker process per
lane runs that lane's stages as soon as their inputs are ready, so the TensorFlow side and the PyTorch
side of a run proceed at once, each process imports one framework (a Keras model's TorchScript
conversion runs on the torch side, a PyTorch model's SavedModel conversion on the TensorFlow side),
and the parent process never imports a framework. Stages without a lane (data, reports) run in the
parent.
"""
from __future__ import annotations

import contextlib
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

from .cache import Cache, Entry, code_version, stage_key

STAGE_ORDER = ("data", "parity_set", "train", "reference", "export", "verify", "report")


@dataclass
class Stage:
    name: str                      # unique in a run, e.g. "train:keras"
    kind: str                      # one of STAGE_ORDER
    settings: dict                 # everything besides inputs and code that decides the output
    code: tuple[str, ...]          # source files (relative to the package root) the output depends on
    run: Callable[["Context"], dict]  # writes into ctx.out, returns facts (JSON-able)
    inputs: tuple[str, ...] = ()   # names of upstream stages
    lane: str | None = None        # "tensorflow" or "torch": the worker process that runs it
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
    frameworks: list[str] = field(default_factory=list)  # loaded in the process that ran it


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


def run_stage(stage: Stage, cache: Cache, memo: dict, force: bool) -> StageResult:
    def log(msg: str) -> None:
        print(f"  {stage.name:<24} {msg}", flush=True)

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
        # plain JSON values only: a framework's own types (torch's version string is one) would
        # make the parent import that framework just to unpickle the result
        facts = json.loads(json.dumps(stage.run(Context(stage, tmp, inputs, memo, log)) or {}, default=str))
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
    loaded = [m for m in ("tensorflow", "torch") if m in sys.modules]
    summary = facts.get("summary", "")
    log(f"done     {elapsed:6.2f} s  {summary}".rstrip())
    return StageResult(stage.name, stage.kind, stage.key, stage.lane, False, elapsed, facts,
                       path=str(entry.path), frameworks=loaded)


WARM_IMPORTS = {"tensorflow": ("tensorflow", "keras"), "torch": ("torch",)}


def _worker_main(spec_ref: str, lane: str, cache_root: str, tasks, results) -> None:
    """A lane's process: import its framework while the parent prepares, then run stages on request."""
    import importlib
    import warnings
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=FutureWarning)  # converters' deprecation chatter
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from .spec import load
    from .stages import build_stages
    with _quiet_native_stderr():  # TensorFlow's C++ start-up banner, printed whatever the log level
        for module in WARM_IMPORTS.get(lane, ()):
            importlib.import_module(module)
    for noisy in ("torch.onnx", "torch.utils._pytree"):  # "torchvision is not installed" x4, deprecations
        logging.getLogger(noisy).setLevel(logging.ERROR)
    stages = {s.name: s for s in build_stages(load(spec_ref))}
    assign_keys(list(stages.values()))
    cache, memo = Cache(Path(cache_root)), {}
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
        name, force = task
        try:
            results.put(run_stage(stages[name], cache, memo, force))
        except StageFailed as e:
            traceback.print_exception(e.__cause__ or e, file=sys.stderr, limit=-4)
            results.put(e.result)
        except BaseException as e:  # the runner itself broke: still answer, never hang the parent
            s = stages[name]
            results.put(StageResult(s.name, s.kind, s.key, s.lane, False, 0.0, error=f"{type(e).__name__}: {e}"))
    results.close()
    results.join_thread()  # every result is on the pipe before the process goes
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: seconds with TensorFlow, torch and jax loaded


@contextlib.contextmanager
def _quiet_native_stderr():
    """Send file descriptor 2 to a temporary file for the block; show it only if the block fails."""
    import tempfile
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class _Workers:
    """One spawned process per lane, fed through a task queue; results come back on one queue."""

    def __init__(self, lanes: set[str], spec_ref: str, cache_root: str):
        # Workers skip interpreter teardown, so a library's semaphore is left to multiprocessing's
        # resource tracker, which frees it and then warns; it takes its warning filters from ours.
        quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
        if quiet not in sys.warnoptions:
            sys.warnoptions.append(quiet)
        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = {lane: ctx.Queue() for lane in lanes}
        self.procs = {lane: ctx.Process(target=_worker_main, name=f"lane-{lane}", daemon=True,
                                        args=(spec_ref, lane, cache_root, self.tasks[lane], self.results))
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

    def submit(self, lane: str, name: str, force: bool) -> None:
        self.tasks[lane].put((name, force))

    def next_result(self, in_flight: dict[str, Stage]) -> StageResult:
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                for lane, p in self.procs.items():
                    if not p.is_alive():
                        stuck = next((s for s in in_flight.values() if s.lane == lane), None)
                        if stuck is not None:
                            return StageResult(stuck.name, stuck.kind, stuck.key, lane, False, 0.0,
                                               error=f"the {lane} worker process died (exit code {p.exitcode})")

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


def execute(stages: list[Stage], cache: Cache, rerun_kinds: set[str], spec_ref: str,
            parallel: bool = True, on_plan: Callable[[dict[str, bool]], None] | None = None) -> list[StageResult]:
    """Run a spec's stages; raises StageFailed (with every result so far on .results) on failure.

    A stage starts once all its inputs are done; after a failure, independent stages still run (the
    other model, the other formats), stages downstream of it do not.
    """
    assign_keys(stages)
    will_run = plan(stages, cache, rerun_kinds)
    forced = {s.name: (s.kind in rerun_kinds) or (will_run[s.name] and any(will_run[n] for n in s.inputs))
              for s in stages}
    lanes = {s.lane for s in stages if s.lane and will_run[s.name]} if parallel else set()
    workers = _Workers(lanes, spec_ref, str(cache.root)) if lanes else None
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
                        workers.submit(s.lane, s.name, forced[s.name])
                        in_flight[s.name] = s
                    else:
                        try:
                            done[s.name] = run_stage(s, cache, memo, forced[s.name])
                        except StageFailed as e:
                            traceback.print_exception(e.__cause__ or e, file=sys.stderr, limit=-4)
                            done[s.name] = e.result
            if not in_flight:
                break
            result = workers.next_result(in_flight)
            in_flight.pop(result.name, None)
            done[result.name] = result
    finally:
        if workers:
            workers.close()
    results = [done[s.name] for s in stages if s.name in done]
    failed = [r for r in results if r.error]
    if failed:
        error = StageFailed(failed[0], f"stage {failed[0].name} failed: {failed[0].error}")
        error.results = results  # type: ignore[attr-defined]
        raise error
    return results
