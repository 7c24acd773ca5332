"""How fast and how big an artifact is in its own runtime, measured right after its parity check on
the runner that made it: load time, latency p50 and p99 at batch 1 and at the largest declared batch
(warm, a fixed number of repetitions), throughput, the runtime process's peak memory, and the
threads the runtime was given. Timings on a shared machine are noisy: the repetitions and the spread
(p99 / p50) are part of the record.
"""
from __future__ import annotations

import os
import resource
import time

import numpy as np

from parity.feeds import take

WARMUP = 2
REPEATS = {"batch_1": 20, "max_batch": 10}


def profile(runner, x, *, max_batch: int, load_s: float, size_bytes: int | None) -> dict:
    """The profile of one loaded runner on the parity rows `x` (an array or {name: array})."""
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    out: dict = {"size_bytes": size_bytes, "load_ms": round(load_s * 1e3, 3), "repetitions": dict(REPEATS),
                 "warmup": WARMUP}
    for key, rows in (("batch_1", 1), ("max_batch", min(max_batch, n))):
        feed = take(x, slice(0, rows))
        times = []
        call = runner.infer if isinstance(feed, dict) else runner  # several inputs go by name
        for i in range(WARMUP + REPEATS[key]):
            t0 = time.perf_counter()
            call(feed)
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
        p50, p99 = (float(np.percentile(times, q)) for q in (50, 99))
        out[key] = {"rows": rows, "p50_ms": round(p50 * 1e3, 4), "p99_ms": round(p99 * 1e3, 4),
                    "spread": round(p99 / p50, 3) if p50 else None,
                    "rows_per_s": round(rows / p50, 1) if p50 else None}
    out.update(_memory(runner))
    out["threads"] = _threads(runner)
    return out


def _memory(runner) -> dict:
    """The peak resident memory of the process that runs the artifact: the Node runner's for TF.js,
    this process's otherwise (its peak so far: every artifact it ran before counts too)."""
    if getattr(runner, "runtime", "").startswith("tf-serving"):
        return {"peak_rss_mb": None, "peak_rss_of": "not measured: the model server is a process of its own"}
    pid = getattr(getattr(runner, "_node", None), "pid", None)
    if pid:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmHWM:"):
                    return {"peak_rss_mb": round(int(line.split()[1]) / 1024, 1), "peak_rss_of": "the Node runner"}
        except OSError:
            pass
    return {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_of": f"the verifying process (pid {os.getpid()}), its peak so far"}


def _threads(runner) -> str:
    """What the runtime was given, in its own terms."""
    runtime = getattr(runner, "runtime", "")
    if runtime.startswith("onnxruntime") or runtime.startswith("litert"):
        return "1 (intra-op, set by the runner)"
    if runtime.startswith("torch"):
        import torch
        return f"{torch.get_num_threads()} (torch intra-op)"
    if runtime.startswith("tfjs"):
        facts = getattr(runner, "backend_facts", None) or {}
        return f"{facts.get('threads')} (wasm XNNPACK)" if facts.get("threads") else "1 (JavaScript cpu backend)"
    if runtime == "tensorflow":
        import tensorflow as tf
        intra = tf.config.threading.get_intra_op_parallelism_threads()
        return f"{intra or os.cpu_count()} (TensorFlow intra-op{'' if intra else ', its default: every core'})"
    return "the runtime's default"
