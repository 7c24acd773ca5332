#!/usr/bin/env python
"""Cold `python -m pipeline run toy` against the hand-written baseline, alternately, in fresh folders.

    .venv/bin/python benchmarks/bench_toy.py [--pairs 3] [--baseline ../shared/baselines/handwritten_toy.py]
                                             [--other CHECKOUT]   # e.g. a `git worktree` of an earlier commit

Prints wall time and peak RSS (of the largest process) of each, the ratio per pair and its median,
the machine's load, and the stage timings of our last run. With --other, the same cold `run toy` from
another checkout of this project (same venv) is timed in each pair too, and the table gives ours / its. Also times a fully cached rerun (in the same
home, right after the cold run) as a fraction of the cold run, and --help.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
           "w = time.perf_counter() - t; "
           "print(rc, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def measure(cmd: list[str], cwd: Path, env: dict) -> tuple[int, float, float]:
    """(exit code, wall seconds, peak RSS in MB of the largest process the command ran)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=cwd, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return int(out[0]), float(out[1]), int(out[2]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--baseline", default=str(ROOT.parent / "shared" / "baselines" / "handwritten_toy.py"))
    ap.add_argument("--other", type=Path, help="another checkout of this project whose cold run toy is timed too")
    args = ap.parse_args()
    env = {**os.environ, "TFJS_NODE_MODULES": str(ROOT / "exporters" / "js" / "node_modules"),
           "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PIPELINE_HOME", None)
    # tensorflowjs imports tensorflow_decision_forests, which cannot be installed next to TF 2.21;
    # the toolkit gives it a placeholder only around that import, the baseline gets one on its path.
    shim = Path(tempfile.mkdtemp()) / "tensorflow_decision_forests"
    shim.mkdir()
    (shim / "__init__.py").write_text("")
    baseline_env = {**env, "PYTHONPATH": f"{shim.parent}:{env['PYTHONPATH']}"}
    rows, last_home, others = [], None, []
    print(f"machine: {os.cpu_count()} cores, load average before: {os.getloadavg()}")
    for i in range(args.pairs):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            rc_b, wall_b, rss_b = measure([sys.executable, args.baseline, str(tmp / "baseline")], tmp, baseline_env)
            home = tmp / "ours"
            home.mkdir()
            rc_o, wall_o, rss_o = measure([sys.executable, "-m", "pipeline", "run", "toy"], home,
                                          {**env, "PIPELINE_HOME": str(home)})
            rec = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
            rc_c, wall_c, _ = measure([sys.executable, "-m", "pipeline", "run", "toy"], home,
                                      {**env, "PIPELINE_HOME": str(home)})
            rows.append((i + 1, rc_b, wall_b, rss_b, rc_o, wall_o, rss_o, wall_o / wall_b, wall_c))
            last_home = rec
            if args.other:
                other_home = tmp / "other"
                other_home.mkdir()
                rc_x, wall_x, _ = measure([sys.executable, "-m", "pipeline", "run", "toy"], other_home,
                                          {**env, "PIPELINE_HOME": str(other_home),
                                           "PYTHONPATH": str(args.other.resolve())})
                others.append((i + 1, rc_x, wall_x, wall_o / wall_x))
            print(f"pair {i + 1}: baseline {wall_b:.1f} s (rc {rc_b}), ours {wall_o:.1f} s (rc {rc_o}), "
                  f"cached rerun {wall_c:.2f} s" + (f", other checkout {others[-1][2]:.1f} s (rc {others[-1][1]})"
                                                    if args.other else ""), flush=True)
    print("\n| pair | baseline wall s | baseline peak RSS MB | run toy wall s | run toy peak RSS MB | "
          "ratio | cached rerun s | cached / cold |")
    print("|---|---|---|---|---|---|---|---|")
    for i, _, wb, rb, _, wo, ro, ratio, wc in rows:
        print(f"| {i} | {wb:.1f} | {rb:.0f} | {wo:.1f} | {ro:.0f} | {ratio:.2f} | {wc:.2f} | {wc / wo:.3f} |")
    print(f"\nmedian ratio (ours / baseline): {statistics.median(r[7] for r in rows):.2f}; "
          f"median cached rerun / cold run: {statistics.median(r[8] / r[5] for r in rows):.3f} (target <= 0.05); "
          f"load average after: {os.getloadavg()}")
    if others:
        print(f"\n| pair | run toy wall s | {args.other} run toy wall s | its exit code | ours / other |")
        print("|---|---|---|---|---|")
        for (i, rc_x, wx, ratio), row in zip(others, rows):  # a failed run's time says little
            print(f"| {i} | {row[5]:.1f} | {wx:.1f} | {rc_x} | {ratio:.2f} |")
        print(f"median ours / other: {statistics.median(o[3] for o in others):.2f}")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "--help"], env=env, capture_output=True, check=True)
    print(f"python -m pipeline --help: {time.perf_counter() - t:.2f} s")
    if last_home:
        print("\nstage timings of the last cold run (s; lanes run side by side):")
        for s in last_home["stages"]:
            print(f"  {s['name']:<26} {s['elapsed_s']:7.2f}{'  (cached)' if s['cached'] else ''}")
        print(f"  {'mlflow record':<26} {last_home.get('mlflow_s', 0):7.2f}")


if __name__ == "__main__":
    main()
