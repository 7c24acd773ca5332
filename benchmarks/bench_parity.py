#!/usr/bin/env python
"""Parity verification throughput: the digits model's artifacts on a 10,000-row parity set.

    .venv/bin/python benchmarks/bench_parity.py [--rows 10000] [--repeats 5]

For each artifact and runtime, compares the verify path the pipeline uses (exporters.verify.check_artifact: load the
artifact, run batch 1, the largest batch, then the rest, compare with the reference) with the bare
inference the runtime needs anyway (load the artifact, run all rows in one call). Prints medians.
Runs `pipeline run digits --no-track` first in a scratch home unless --home names one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--home", help="a PIPELINE_HOME where `run digits` already ran")
    args = ap.parse_args()
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="bench-parity-"))
    env = {**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    if not args.home:
        subprocess.run([sys.executable, "-m", "pipeline", "run", "digits", "--no-track"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    os.environ.update(env)

    import exporters
    from exporters.base import read_manifest
    from parity.compare import tolerance_for
    from pipeline.cache import Cache
    from frameworks import adapter
    from pipeline.runner import assign_keys
    from pipeline.spec import load
    from exporters.verify import check_artifact
    from pipeline.stages import build_stages
    from pipeline.steps.common import maker

    spec = load("digits")
    stages = build_stages(spec)
    assign_keys(stages)
    cache = Cache(home / ".pipeline" / "cache")
    x = np.random.default_rng(0).uniform(0, 1, size=(args.rows, 8, 8)).astype(np.float32)

    print(f"digits model, {args.rows} parity rows, median of {args.repeats}; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores\n")
    print("| model | artifact | runtime | bare load+infer ms | verify ms | ratio |")
    print("|---|---|---|---|---|---|")
    for m in spec.models:
        train = cache.lookup("train", next(s.key for s in stages if s.name == f"train:{m.name}"))
        info = train.meta()["facts"]
        fw = adapter(m.framework)
        model = fw.load(train.path, make=maker(spec, m, info["input_shape"], info["n_outputs"]),
                        pretrained=m.pretrained, input_shape=info["input_shape"], where=m.name)
        ref = {"x": x, "y": fw.predict(model, x), "kind": np.ones(len(x), np.int8)}
        for fmt in exporters.FORMATS:
            stage = next(s for s in stages if s.name == f"export:{m.name}:{fmt}")
            module = exporters.module(fmt)
            for artifact in read_manifest(cache.lookup("export", stage.key).path):
                tol = tolerance_for(artifact.variant, fmt, spec.parity.tolerances)
                for runtime in module.RUNTIMES:
                    def bare():
                        runner = module.load(artifact, runtime)
                        runner(x)
                        runner.close()

                    def verify():
                        rec, _, _ = check_artifact(module, artifact, runtime, ref, tol, task=spec.data.task,
                                                   max_batch=spec.parity.max_batch, model=m.name)
                        assert rec.status == "passed", rec.message

                    bare(), verify()  # warm both (Node start, first-call set-up)
                    tb, tv = median_time(bare, args.repeats), median_time(verify, args.repeats)
                    print(f"| {m.name} | {artifact.format}-{artifact.variant} | {runtime} | {tb * 1e3:.1f} | "
                          f"{tv * 1e3:.1f} | {tv / tb:.2f} |", flush=True)
    os._exit(0)  # skip tearing down TensorFlow, torch and Node


if __name__ == "__main__":
    main()
