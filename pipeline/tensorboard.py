"""TensorBoard on a pipeline run's training event files: `python -m pipeline tensorboard [RUN]`.

Each train stage writes its model's event files under `<stage folder>/tensorboard/`, in Keras' layout whatever
the style (`train/` and `validation/`, tag `epoch_loss`: frameworks/base.py, `epoch_series`); `event_dirs` finds
them in a run record and `start` serves them, one TensorBoard run group per model, on a local port until `stop()`.

TensorBoard imports TensorFlow whenever it is installed: 11-16 s to answer instead of 1.5-2 s here, and 870 MB
resident instead of 90 MB, for nothing (the scalars, histograms, images and graphs it shows are read by its own
loader). So the server is started with TensorBoard's own switch for TensorFlow-free installs
(`tensorboard.compat.notf`), as frameworks/base.py does for torch's writer, and `--load_fast=false` (the Rust
data server does not take --logdir_spec; TensorBoard would fall back to this loader anyway, with a note).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# `python -m tensorboard.main`, with TensorFlow left out
LAUNCH = ("import sys, types; sys.modules['tensorboard.compat.notf'] = types.ModuleType('tensorboard.compat.notf'); "
          "sys.argv[0] = 'tensorboard'; from tensorboard.main import run_main; run_main()")


class NoEventFiles(ValueError):
    """The run has no training event files to show."""
    user_error = True  # the command line exits 2 with the message alone


class TensorBoardFailed(RuntimeError):
    """TensorBoard exited, or did not answer, before it served."""


def event_dirs(record: dict) -> dict[str, Path]:
    """{model name: its `tensorboard/` folder} for each train stage of the run that wrote one."""
    dirs = {}
    for s in record["stages"]:
        if s.get("kind") == "train" and s.get("path"):
            folder = Path(s["path"]) / "tensorboard"
            if folder.is_dir() and any(folder.rglob("*tfevents*")):
                dirs[s["name"].split(":", 1)[1]] = folder
    if not dirs:
        trained = [s["name"] for s in record["stages"] if s.get("kind") == "train"]
        raise NoEventFiles(
            f"run {record['run_id']} ({record.get('spec', '?')}) has no TensorBoard event files: "
            + (f"its models ({', '.join(n.split(':', 1)[1] for n in trained)}) were not trained here (pretrained), "
               f"their cache entries were removed, the spec sets tensorboard = false, or the run predates event "
               f"files; run the spec again" if trained else "it has no train stages (it failed before training?)"))
    return dirs


class TensorBoard:
    """A running TensorBoard: `.url`, `.proc`, `.log` (its stdout and stderr), `stop()`; a context manager."""

    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def stop(self, timeout: float = 10) -> int | None:
        """End its process group (SIGTERM, then SIGKILL) and reap it; its exit code."""
        code = self.proc.poll()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            try:
                code = self.proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError, PermissionError):  # anything left in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.unlink(missing_ok=True)
        return code

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> "TensorBoard":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port(host: str, port: int = 0) -> int:
    """`port`, once it is known to be free on `host` (0: one the kernel picks); TensorBoardFailed if it is not."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TensorBoard's server binds: only a listener fails
        try:
            s.bind((host, port))
        except OSError as e:
            hint = " (another TensorBoard on it?); choose another port, or 0 for any free one" \
                if e.errno == errno.EADDRINUSE else ""
            raise TensorBoardFailed(f"cannot serve on {host}:{port}: {e.strerror}{hint}") from None
        return s.getsockname()[1]


def logdir_spec(dirs: dict[str, Path]) -> str:
    for name, path in dirs.items():
        if not name or name.startswith("/") or any(c in name for c in ",:") or "," in str(path):
            raise TensorBoardFailed(f"TensorBoard's --logdir_spec cannot hold the model name {name!r} with {path}")
    return ",".join(f"{name}:{Path(path).resolve()}" for name, path in dirs.items())


def command(dirs: dict[str, Path], host: str, port: int) -> list[str]:
    return [sys.executable, "-c", LAUNCH, "--logdir_spec", logdir_spec(dirs), "--host", host, "--port", str(port),
            "--load_fast=false"]


def start(dirs: dict[str, Path], host: str = "127.0.0.1", port: int = 0, timeout: float = 60) -> TensorBoard:
    """Start TensorBoard on `dirs` ({run group: folder}) at host:port (0: a free one) in its own process
    group; return once its HTTP API answers with these folders. Raises TensorBoardFailed with the tail of
    its log when it exits first or does not answer within `timeout` seconds (the server is stopped)."""
    spec = logdir_spec(dirs)
    port = free_port(host, port)  # else another server on it would answer the checks below for this one
    fd, log = tempfile.mkstemp(prefix="tensorboard-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        proc = subprocess.Popen(command(dirs, host, port), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    shown = f"[{host}]" if ":" in host else host
    tb = TensorBoard(proc, f"http://{shown}:{port}/", Path(log))
    try:
        _wait_until_serving(tb, spec, timeout)
    except BaseException:  # a failure, or Ctrl-C / SIGTERM meanwhile: no server left behind
        tb.stop()
        raise
    return tb


def _wait_until_serving(tb: TensorBoard, spec: str, timeout: float) -> None:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
    deadline = time.monotonic() + timeout
    while True:
        if tb.proc.poll() is not None:
            raise TensorBoardFailed(f"TensorBoard exited with code {tb.proc.returncode} before it served "
                                    f"{tb.url}:\n{tb.log_tail()}")
        try:  # the answer must be ours: another server already on the port would answer too
            with direct.open(tb.url + "data/logdir", timeout=2) as r:
                if json.loads(r.read()).get("logdir") == spec and tb.proc.poll() is None:
                    return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TensorBoardFailed(f"TensorBoard did not answer at {tb.url} within {timeout:.0f} s:\n{tb.log_tail()}")
        time.sleep(0.25)
