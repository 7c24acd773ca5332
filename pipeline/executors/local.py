"""The local executor: one spawned process per lane (pipeline/lanes.py), each importing its
framework once while the parent prepares, each running its lane's stages in turn as their inputs
complete, so the two sides of a run proceed at once. A worker's own stdout and stderr (library
chatter, native banners) go to a log file, shown only where a stage fails."""
from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import sys
import time
import traceback
from pathlib import Path

from .. import lanes
from ..cache import Cache
from ..stage_run import Stage, StageFailed, StageResult, dump_modules, run_stage
from .base import Event, EventRelay, Executor, Note, Result

KEEP_LOGS = 40  # worker log files kept in .pipeline/logs (two per run that started workers)


def _worker_main(lane: str, cache_root: str, log_path: str, tasks, results) -> None:
    """A lane's process: import its framework while the parent prepares, then run stages on request."""
    import warnings
    _redirect_output(log_path)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=FutureWarning)  # converters' deprecation chatter
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    lanes.enter(lane)
    for noisy in ("torch.onnx", "torch.utils._pytree"):  # "torchvision is not installed" x4, deprecations
        logging.getLogger(noisy).setLevel(logging.ERROR)
    cache, memo, relay = Cache(Path(cache_root)), {}, EventRelay(results.put)
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
            results.put(Result(run_stage(stage, cache, memo, force, relay)))
        except StageFailed as e:
            results.put(Result(e.result))
        except BaseException as e:  # the runner itself broke: still answer, never hang the parent
            results.put(Result(StageResult(stage.name, stage.kind, stage.key, stage.lane, False, 0.0,
                                           error=f"{type(e).__name__}: {e}",
                                           traceback="".join(traceback.format_exception(e)))))
        for line in cache.changed:
            results.put(Note(line))
        cache.changed.clear()
        dump_modules(lane)
    results.close()
    results.join_thread()  # every result is on the pipe before the process goes
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter teardown: seconds with TensorFlow, torch and jax loaded


def _redirect_output(log_path: str) -> None:
    """Send this process's file descriptors 1 and 2 (Python's and native code's) to its log file."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class LocalLanes(Executor):
    """One spawned process per lane, fed through a task queue each; events come back on one queue."""

    name = "local"

    def __init__(self, lanes, cache_root, log_dir, on_event=None):
        super().__init__(lanes, cache_root, log_dir, on_event)
        # Workers skip interpreter teardown, so a library's semaphore is left to multiprocessing's
        # resource tracker, which frees it and then warns; it takes its warning filters from ours.
        quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
        if quiet not in sys.warnoptions:
            sys.warnoptions.append(quiet)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for old in sorted(self.log_dir.glob("*.log"))[:-KEEP_LOGS]:
            old.unlink(missing_ok=True)
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.logs = {lane: self.log_dir / f"{stamp}-{lane}.log" for lane in self.lanes}
        ctx = multiprocessing.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = {lane: ctx.Queue() for lane in self.lanes}
        self.procs = {lane: ctx.Process(target=_worker_main, name=f"lane-{lane}", daemon=True,
                                        args=(lane, str(self.cache_root), str(self.logs[lane]), self.tasks[lane],
                                              self.results))
                      for lane in self.lanes}
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

    def next_event(self, in_flight: dict[str, Stage]) -> Event:
        while True:
            try:
                return self.results.get(timeout=1.0)
            except queue.Empty:
                for lane, p in self.procs.items():
                    if not p.is_alive():
                        stuck = next((s for s in in_flight.values() if s.lane == lane), None)
                        if stuck is not None:
                            return Result(StageResult(
                                stuck.name, stuck.kind, stuck.key, lane, False, 0.0,
                                error=f"the {lane} worker process died (exit code {p.exitcode}); "
                                      f"its output: {self.logs[lane]}", ran_in=f"lane {lane} pid {p.pid}"))

    def log_of(self, lane: str | None) -> Path | None:
        return self.logs.get(lane or "")

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


EXECUTOR = LocalLanes
