#!/usr/bin/env python
"""What training on several workers and a team's tracking server cost, against their one-machine peers.

    .venv/bin/python benchmarks/bench_workers.py [--frameworks torch,lightning,keras] [--workers 1,2]
                                                 [--rounds 2] [--skip-tracking]

Prints Markdown tables (with the machine's cores and load above each):

1. `digits` trained by each framework with 1 and with N workers (`[train] workers`), each in a home of
   its own, through `python -m pipeline stage SPEC train:MODEL` (the data stage first, untimed): the
   stage's wall time, its fit time (the train facts' `timings.fit_s`), the held-out accuracy, and the
   ratio of fit time against 1 worker of the same framework;
2. what recording one run costs (the run record's `mlflow_s`: the parent run, the child runs, params,
   metrics, the parity report and plots, the registry) for `run toy --from report` on the home's SQLite
   store and on a tracking server this script starts (`python -m pipeline tracking-server`: PostgreSQL
   and artifacts in a folder), each `--rounds` times, with the ratio against SQLite in the same round.

On two cores, a model as small as digits' trains slower on two workers (starting the ranks and every
all-reduce cost more than the step): the table says by how much. Everything started here is stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
FACTORIES = {"torch": "pipeline.zoo:mlp_torch", "lightning": "pipeline.zoo:mlp_lightning",
             "keras": "pipeline.zoo:mlp_keras"}


def machine() -> str:
    return f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"


def pipeline(*args, home: Path, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    full = {**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(ROOT), **(env or {})}
    r = subprocess.run([PY, "-m", "pipeline", *args], cwd=home, env=full, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"python -m pipeline {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}"
                         f"\n{r.stderr[-2000:]}")
    return r


def digits_spec(folder: Path, framework: str, workers: int) -> Path:
    text = (ROOT / "pipeline/specs/digits.toml").read_text()
    head = text[:text.index("[[model]]")].replace("shuffle = true", f"shuffle = true\nworkers = {workers}")
    spec = folder / "digits.toml"
    spec.write_text(head + f'[[model]]\nname = "m"\nframework = "{framework}"\nfactory = "{FACTORIES[framework]}"\n'
                           f'params = {{ hidden = 128 }}\n\n[export]\nformats = ["onnx"]\n')
    return spec


def train_once(root: Path, framework: str, workers: int) -> dict:
    home = root / f"{framework}-{workers}"
    home.mkdir()
    spec = digits_spec(home, framework, workers)
    pipeline("stage", str(spec), "data", home=home)
    t0 = time.perf_counter()
    pipeline("stage", str(spec), "train:m", home=home)
    wall = time.perf_counter() - t0
    [stage] = list((home / ".pipeline" / "cache" / "train").glob("*/stage.json"))
    facts = json.loads(stage.read_text())["facts"]
    return {"wall_s": wall, "fit_s": facts["timings"]["fit_s"], "accuracy": facts["metrics"].get("accuracy"),
            "kind": (facts.get("distribution") or {}).get("kind", "none")}


def training_table(root: Path, frameworks: list[str], workers: list[int]) -> None:
    print(f"\n### digits: training on workers ({machine()})\n")
    print("| framework | workers | distribution | stage wall s | fit s | fit vs 1 worker | accuracy |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for fw in frameworks:
        base = None
        for n in workers:
            r = train_once(root, fw, n)
            base = base or r["fit_s"]
            print(f"| {fw} | {n} | {r['kind']} | {r['wall_s']:.1f} | {r['fit_s']:.1f} | {r['fit_s'] / base:.2f}x | "
                  f"{r['accuracy']:.4f} |", flush=True)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    from pipeline.tracking_server import healthy
    store = root / "server"
    root.chmod(0o755)  # the unprivileged user PostgreSQL runs as (under root) must reach the store
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "pipeline", "tracking-server", "--store", str(store), "--port", str(port),
                             "--workers", "1"], cwd=root, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while not healthy(url, timeout=1):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the tracking server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    return proc, url


def record_cost(home: Path, uri: str | None) -> float:
    args = ("run", "toy", "--from", "report") + (("--tracking-uri", uri) if uri else ())
    env = {"MLFLOW_TRACKING_URI": ""} if uri is None else {}
    pipeline(*args, home=home, env=env)
    record = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    return record["mlflow_s"]


def tracking_table(root: Path, rounds: int) -> None:
    home = root / "toy"
    home.mkdir()
    pipeline("run", "toy", "--no-track", home=home)  # every stage cached from here on
    proc, url = start_server(root)
    try:
        print(f"\n### recording one run of toy ({machine()})\n")
        print("| round | SQLite (mlruns/) s | tracking server s | server vs SQLite |")
        print("|---:|---:|---:|---:|")
        for i in range(1, rounds + 1):
            local, server = record_cost(home, None), record_cost(home, url)
            print(f"| {i} | {local:.2f} | {server:.2f} | {server / local:.2f}x |", flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frameworks", default="torch,lightning,keras")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-tracking", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    try:
        training_table(root, args.frameworks.split(","), [int(n) for n in args.workers.split(",")])
        if not args.skip_tracking:
            tracking_table(root, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
