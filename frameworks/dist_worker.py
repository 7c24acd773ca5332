"""One rank of a model trained on several worker processes: `python -m frameworks.dist_worker JOB`,
started by the framework's launcher (frameworks/distributed.py says which). It builds the model from
the spec's factory, parameters and seed, as the train stage does, trains its share through the
adapter's `train_rank` (the framework's own distributed wrapper), and rank 0 saves the model with the
adapter's `save` and writes its History. Each step is written to status/rank<r>.json, so that a rank
that died without a word can be told from one that raised or was stopped."""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from parity.feeds import unpack

from .distributed import KINDS


def launched_rank(kind: str) -> int:
    """This process's rank as its launcher told it: TF_CONFIG's task index, torchrun's RANK, or the
    LOCAL_RANK Lightning gives the ranks it starts (none: the process it was started from, rank 0)."""
    if kind == "multi-worker-mirrored":
        return int(json.loads(os.environ["TF_CONFIG"])["task"]["index"])
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


class Status:
    def __init__(self, folder: Path, rank: int):
        self.path = folder / "status" / f"rank{rank}.json"
        self.rank = rank

    def write(self, state: str, **more) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rank": self.rank, "state": state, "pid": os.getpid(), **more}))
        os.replace(tmp, self.path)


class Progress:
    """Rank 0's epochs, one JSON line each, for the parent to relay."""

    def __init__(self, folder: Path):
        self.path = folder / "progress.jsonl"

    def __call__(self, epoch: int, loss: float) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": int(epoch), "loss": float(loss)}) + "\n")


def factory_call(job: dict):
    """The spec's factory with its parameters, as the train stage calls it (its module beside the spec)."""
    module_name, _, func = job["factory"].partition(":")
    if job["factory_dir"] not in sys.path:
        sys.path.insert(0, job["factory_dir"])
    factory = getattr(importlib.import_module(module_name), func)
    shape = job["input_shape"]
    shape = {k: tuple(v) for k, v in shape.items()} if isinstance(shape, dict) else tuple(shape)
    n_outputs = None if job["n_outputs"] is None else int(job["n_outputs"])
    return lambda: factory(shape, n_outputs, **job["params"])


def main(folder: Path) -> int:
    job = json.loads((folder / "job.json").read_text())
    rank = launched_rank(job["kind"])
    if job["kind"] == "lightning-ddp" and rank > 0:  # Lightning starts it sharing rank 0's output: a log of its own
        _redirect(folder / "logs" / f"rank{rank}.log")
    status = Status(folder, rank)
    status.write("started")
    _end_with(job["parent_pid"])

    def stopped(*_):  # the launcher ends the other ranks once one has failed
        status.write("terminated")
        os._exit(128 + signal.SIGTERM)
    signal.signal(signal.SIGTERM, stopped)
    import frameworks
    fw = frameworks.adapter(job["framework"])
    try:
        with np.load(folder / "arrays.npz") as f:
            arrays = {k: f[k] for k in f.files}
        x, y = unpack(arrays, "x"), arrays["y"]
        val = (unpack(arrays, "val_x"), arrays["val_y"]) if "val_y" in arrays else None
        run = fw.train_rank(factory_call(job), SimpleNamespace(**job["train"]), x, y, job["seed"],
                            workers=job["workers"], on_epoch=Progress(folder), val=val,
                            logdir=Path(job["logdir"]) if job["logdir"] else None)
        if run.rank == 0:
            fw.save(run.model, folder / "model")
            (folder / "result.json").write_text(json.dumps({"history": run.history.to_json(),
                                                            "output_kind": fw.output_kind}))
        elif KINDS[job["kind"]].every_rank_saves:  # a copy nobody keeps: saving may take every worker's part
            with tempfile.TemporaryDirectory(prefix=f"rank{run.rank}-") as scratch:
                fw.save(run.model, Path(scratch))
        status.write("done", world_size=int(run.world_size), rows=len(run.rows),
                     first_rows=[int(r) for r in run.rows[:8]])
    except BaseException as e:
        status.write("error", error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
        launched = getattr(fw, "launched_exit_codes", None)  # the ranks this one started, as they ended
        if launched:
            (folder / "failures.json").write_text(json.dumps({"exit_codes": launched}))
        raise
    return 0


def _end_with(pid: int, every_s: float = 2.0) -> None:
    """End this rank once the train stage's process has gone (killed, say): nobody would read its result,
    and it would hold the machine's cores."""
    import threading
    import time

    def watch() -> None:
        while _alive(pid):
            time.sleep(every_s)
        os._exit(1)
    threading.Thread(target=watch, name="end-with-the-train-stage", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a process that has ended but not been reaped is still listed, as a zombie
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _redirect(log: Path) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
