"""Training one model on several worker processes, each framework through its own launcher:

    "ddp-gloo"               torch's DistributedDataParallel on gloo, its ranks started by torchrun
                             (torch.distributed.run) on 127.0.0.1
    "lightning-ddp"          lightning.Trainer(strategy="ddp", accelerator="cpu", devices=N): one process
                             is started here, and Lightning's own ddp launcher starts the other ranks
    "multi-worker-mirrored"  tf.distribute.MultiWorkerMirroredStrategy, one process per worker, each
                             told its place by TF_CONFIG (TensorFlow's documented way: it has no launcher)

A framework module names its kind (DISTRIBUTION). The parent writes the training arrays and what a
rank needs to build the model (the factory, its parameters, the seed, the train settings) into a job
folder, starts the launcher, relays rank 0's progress and waits; rank 0 saves the model with the
adapter's `save` (frameworks/dist_worker.py is the rank's side). A rank that dies fails the training
with its rank and the end of its log, before anything is saved where a finished result would be.

Standard library and numpy only: the framework is imported by the workers, not by this module.
"""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parity.feeds import n_rows, pack

ROOT = Path(__file__).resolve().parent.parent  # the toolkit's packages, for the workers' imports
POLL_S = 0.1
STOP_GRACE_S = 5.0  # after a rank fails, how long the others get to end before they are killed
TAIL_LINES = 20


class WorkerFailed(RuntimeError):
    """A rank that died or raised: names it, says how it ended and quotes the end of its log."""


@dataclass(frozen=True)
class Kind:
    launcher: str     # what starts the ranks, for messages and facts
    mechanism: str    # what keeps them in step
    every_rank_saves: bool = False  # TensorFlow's documented MWMS saving: every worker saves, the chief's copy is kept


KINDS = {
    "ddp-gloo": Kind("torchrun (torch.distributed.run)", "DistributedDataParallel on the gloo backend"),
    "lightning-ddp": Kind("Lightning's ddp launcher", "lightning.Trainer(strategy=\"ddp\", accelerator=\"cpu\")"),
    "multi-worker-mirrored": Kind("one process per worker with TF_CONFIG", "tf.distribute.MultiWorkerMirroredStrategy",
                                  every_rank_saves=True),
}


@dataclass
class Outcome:
    history: dict        # rank 0's History.to_json()
    output_kind: str     # what the adapter learnt while training (a classifier's head)
    model_dir: Path      # rank 0's model, saved by the adapter's `save`
    facts: dict          # {"workers", "kind", "launcher", "per_worker_batch", "ranks": [...]}


def per_worker_batch(batch_size: int | None, n: int, workers: int) -> int:
    """The global batch split across the workers: ceil(batch / workers) rows each, at most a whole
    shard; full batch (None) is each worker's whole shard."""
    shard = math.ceil(n / workers)
    return shard if batch_size is None else max(1, min(math.ceil(batch_size / workers), shard))


def shard_rows(n: int, workers: int, rank: int) -> np.ndarray:
    """The rows a rank trains on: every `workers`-th row from `rank`, after padding the rows round to a
    multiple of `workers` (as torch's DistributedSampler deals them), so that every rank takes the same
    number of steps."""
    padded = np.resize(np.arange(n), math.ceil(n / workers) * workers)
    return padded[rank::workers]


def train_on_workers(*, where: str, framework: str, kind: str, workers: int, factory: str, factory_dir: str,
                     params: dict, input_shape, n_outputs, seed: int, train: dict, x, y, val, folder: Path,
                     logdir: Path | None, on_epoch=None) -> Outcome:
    """Train on `workers` processes started by the framework's launcher; returns rank 0's outcome, or
    raises WorkerFailed. `folder` (inside the train stage's output) holds the job, the logs and the model;
    `where` names the model in messages."""
    if kind not in KINDS:
        raise ValueError(f"unknown distribution {kind!r}: expected one of {', '.join(KINDS)}")
    folder.mkdir(parents=True)
    for sub in ("logs", "status", "model"):
        (folder / sub).mkdir()
    arrays = {**pack("x", x), "y": y}
    if val is not None:
        arrays.update({**pack("val_x", val[0]), "val_y": val[1]})
    np.savez(folder / "arrays.npz", **arrays)
    job = {"framework": framework, "kind": kind, "workers": workers, "factory": factory, "factory_dir": factory_dir,
           "params": params, "input_shape": input_shape, "n_outputs": n_outputs, "seed": seed, "train": train,
           "logdir": str(logdir) if logdir else None, "parent_pid": os.getpid()}
    (folder / "job.json").write_text(json.dumps(job, indent=1, default=str))
    procs = _launch(kind, workers, folder, threads=train.get("threads") or 1)
    try:
        _wait(procs, folder, on_epoch)
    except BaseException:
        _stop(procs)
        raise
    if any(p.returncode != 0 for _, p in procs) or not (folder / "result.json").is_file():
        _stop(procs)  # ranks its launcher started may outlive it
        raise WorkerFailed(_failure(where, kind, workers, folder, procs))
    result = json.loads((folder / "result.json").read_text())
    n = n_rows(x)
    ranks = [json.loads((folder / "status" / f"rank{r}.json").read_text()) for r in range(workers)]
    facts = {"workers": workers, "kind": kind, "launcher": KINDS[kind].launcher,
             "per_worker_batch": per_worker_batch(train.get("batch_size"), n, workers),
             "ranks": [{k: s.get(k) for k in ("rank", "world_size", "rows", "first_rows")} for s in ranks]}
    return Outcome(result["history"], result["output_kind"], folder / "model", facts)


def tidy(folder: Path) -> None:
    """Drop the job's copies of the arrays and of the model once the model is loaded; the logs stay."""
    import shutil
    (folder / "arrays.npz").unlink(missing_ok=True)
    shutil.rmtree(folder / "model", ignore_errors=True)


# --------------------------------------------------------------------------- launching

def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "TF_CONFIG", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"  # a rank's log is complete up to the moment it died
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's pairs on loopback, not the host name's interface
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        # a session of its own: the launcher's children (the ranks) are ended with it; the job folder as
        # the working folder, so that nothing a library writes by default lands elsewhere
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=log.parent.parent)


def _launch(kind: str, workers: int, folder: Path, threads: int) -> list[tuple[str, subprocess.Popen]]:
    from . import dist_worker  # imported here: it imports this module
    env, logs = _env(threads), folder / "logs"
    worker = [sys.executable, "-m", dist_worker.__name__, str(folder)]
    if kind == "ddp-gloo":  # torchrun starts and watches the ranks, each with its own log under logs/
        cmd = [sys.executable, "-m", __name__, "--standalone", "--nnodes=1", f"--nproc-per-node={workers}",
               "--local-addr=127.0.0.1", "--max-restarts=0", f"--log-dir={logs}", "--redirects=3", *worker[1:]]
        return [("torchrun", _start(cmd, env, logs / "launcher.log"))]
    if kind == "lightning-ddp":  # rank 0 here; Lightning's launcher starts ranks 1.. as copies of this command
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        return [("rank 0", _start(worker, env, logs / "rank0.log"))]
    ports = [_free_port() for _ in range(workers)]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return [(f"rank {r}", _start(worker, {**env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {
        "type": "worker", "index": r}})}, logs / f"rank{r}.log")) for r in range(workers)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(procs, folder: Path, on_epoch) -> None:
    """Until every process has ended (no time limit: training takes what it takes), relaying rank 0's
    progress; once one fails, the others get STOP_GRACE_S to end before they are killed."""
    progress, seen, failed_at = folder / "progress.jsonl", 0, None
    while True:
        codes = [p.poll() for _, p in procs]
        if progress.is_file():
            text = progress.read_text()
            done = text[:text.rfind("\n") + 1].splitlines()  # whole lines only: rank 0 may be mid-write
            for line in done[seen:]:
                if on_epoch:
                    step = json.loads(line)
                    on_epoch(step["epoch"], step["loss"])
            seen = len(done)
        if all(c is not None for c in codes):
            return
        if any(c not in (None, 0) for c in codes):
            failed_at = failed_at or time.monotonic()
            if time.monotonic() - failed_at > STOP_GRACE_S:
                _stop(procs)
                return
        time.sleep(POLL_S)


def _stop(procs) -> None:
    """End each launched process's session, the ranks its launcher started included (they may outlive
    it): SIGTERM, then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
        for _, p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while any(p.poll() is None for _, p in procs) and time.monotonic() < deadline:
            time.sleep(POLL_S)


# --------------------------------------------------------------------------- when a rank fails

def _failure(where: str, kind: str, workers: int, folder: Path, procs) -> str:
    """Which rank failed first and how, with the end of its log; how every other rank ended after it.
    Every rank's whole log is copied to this process's stderr (the job folder goes with the failed stage)."""
    ranks = {r: _status(folder, r) for r in range(workers)}
    for r, code in _exit_codes(folder, procs).items():
        ranks.setdefault(r, {"rank": r, "state": "not started"})["exit_code"] = code
    first = _first_failure(folder, ranks)
    said = {r: _how(s) for r, s in ranks.items()}
    others = "; ".join(f"rank {r} {said[r]}" for r in sorted(ranks) if r != first)
    error = ranks[first].get("error")
    for r in sorted(ranks):
        for log in rank_logs(folder, r):
            print(f"---- rank {r}: {log.relative_to(folder)} ----\n{log.read_text(errors='replace')}", file=sys.stderr)
    logs = rank_logs(folder, first)
    named = " and ".join(str(log.relative_to(folder / "logs")) for log in logs) or "none written"
    return (f"{where}: training on {workers} workers ({KINDS[kind].mechanism}, started by "
            f"{KINDS[kind].launcher}) failed: rank {first} {said[first]}"
            + (f" ({error})" if error else "") + (f"; then {others}" if others else "")
            + f". The end of rank {first}'s log ({named}; every rank's log follows the training process's "
              f"own output):\n" + _tail(logs))


def _status(folder: Path, rank: int) -> dict:
    path = folder / "status" / f"rank{rank}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"rank": rank, "state": "not started"}


def _exit_codes(folder: Path, procs) -> dict[int, int]:
    """Each rank's exit code where one is known: the processes started here (TensorFlow's workers,
    Lightning's rank 0), torchrun's report of its ranks, Lightning's rank 0's report of the ranks it started."""
    codes = {}
    report = folder / "failures.json"
    if report.is_file():
        codes.update({int(r): c for r, c in json.loads(report.read_text())["exit_codes"].items() if c is not None})
    for label, p in procs:
        if label.startswith("rank ") and p.returncode is not None:
            codes[int(label.split()[1])] = p.returncode
    return codes


def _stopped(code: int | None) -> bool:
    return code in (-signal.SIGTERM, -signal.SIGKILL, 128 + signal.SIGTERM, 128 + signal.SIGKILL)


def _first_failure(folder: Path, ranks: dict[int, dict]) -> int:
    """torchrun names the first rank it saw fail. Otherwise: a rank that ended without a word (exited or
    was killed mid-training) before one that raised (its peers raise once it is gone), and a rank ended
    by its launcher's signal last."""
    report = folder / "failures.json"
    first = json.loads(report.read_text()).get("first") if report.is_file() else None
    if first is not None:
        return int(first)
    order = {"started": 0, "error": 1, "not started": 2, "terminated": 3}
    return min((r for r, s in ranks.items() if s["state"] != "done"),
               key=lambda r: (_stopped(ranks[r].get("exit_code")), order.get(ranks[r]["state"], 4), r), default=0)


def _how(s: dict) -> str:
    code = s.get("exit_code")
    code_text = ("exit code unknown" if code is None else f"killed by signal {-code}" if code < 0 else
                 f"exit code {code}, its launcher's SIGTERM" if code == 128 + signal.SIGTERM else f"exit code {code}")
    return {"started": f"died without reporting an error ({code_text})",
            "error": f"raised an error ({code_text})",
            "not started": f"never started training ({code_text})",
            "terminated": f"was stopped by its launcher ({code_text})",
            "done": "finished"}.get(s["state"], s["state"])


def rank_logs(folder: Path, rank: int) -> list[Path]:
    """A rank's log: rank<r>.log, or torchrun's stdout.log and stderr.log under logs/<run>/attempt_0/<r>/."""
    own = folder / "logs" / f"rank{rank}.log"
    if own.is_file():
        return [own]
    found = sorted((folder / "logs").glob(f"*/attempt_*/{rank}"))
    return [log for log in (found[-1] / "stdout.log", found[-1] / "stderr.log") if log.is_file()] if found else []


def _tail(logs: list[Path]) -> str:
    lines = [ln for log in logs for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return "\n".join("  " + ln for ln in lines[-TAIL_LINES:]) or "  (empty)"


# --------------------------------------------------------------------------- torchrun, recording its failures

def _torchrun(argv: list[str]) -> int:
    """`python -m frameworks.distributed TORCHRUN-ARGS`: torch.distributed.run itself, and on a failure
    its own account of each rank's exit code (ChildFailedError) written where the parent reads it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run
    args = get_args_parser().parse_args(argv)
    try:
        run(args)
    except ChildFailedError as e:
        first, _ = e.get_first_failure()
        report = {"first": first, "exit_codes": {r: f.exitcode for r, f in e.failures.items()}}
        Path(args.training_script_args[-1], "failures.json").write_text(json.dumps(report))
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_torchrun(sys.argv[1:]))
