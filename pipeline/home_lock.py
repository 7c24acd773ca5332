"""One run at a time per home: the cache, the run records and the MLflow store are shared by every
run in a home, so a second run waits until the first has finished (and says whom it waits for).

The lock is an advisory `flock` on `.pipeline/run.lock`: the kernel releases it when its holder
exits, however it exits (`kill -9` included), so a crashed run never leaves the home locked.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path


class HomeBusy(RuntimeError):
    """Another run holds the home and the caller chose not to wait."""
    user_error = True


@contextlib.contextmanager
def home_lock(work_dir: Path, what: str, *, wait: bool = True, on_wait=None):
    """Hold the home's run lock for the block. `on_wait(holder)` is told once if we have to wait."""
    path = work_dir / "run.lock"
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        from .cache import CacheError
        raise CacheError(f"{work_dir}: expected a folder this user can write for the run's lock, cache and "
                         f"records ({e.strerror or e}); fix its permissions or set PIPELINE_HOME to another "
                         f"folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                raise HomeBusy(f"{work_dir.parent}: another run is using this home ({holder}); "
                               f"expected no other run: wait for it or use another PIPELINE_HOME") from None
            (on_wait or _say_waiting)(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "what": what, "since": time.time()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "a run that is starting"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')}: {info.get('what')}, since {since}"


def _say_waiting(holder: str) -> None:
    print(f"waiting: another run is using this home ({holder}) ...", file=sys.stderr, flush=True)
