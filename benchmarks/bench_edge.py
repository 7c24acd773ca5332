#!/usr/bin/env python
"""The edge device agent's predict path (`python -m edge.agent`) against the bare LiteRT interpreter plus an
empty aiohttp round trip, on the digits models, and each LiteRT variant's accuracy against the original model.

    .venv/bin/python benchmarks/bench_edge.py [--home DIR] [--no-run] [--spec digits] [--calls 300]
                                              [--warmup 20] [--acc-batch 64] [--start-timeout 60]

Runs `python -m pipeline run <spec> --no-track` in a scratch home (or in --home; --no-run takes the bundles
already there) and finds each model's bundle through the newest run record ($HOME/.pipeline/runs/*.json:
the `bundle:<model>` stages' "path", the bundle being <path>/bundle). Makes an Ed25519 key pair, starts the
agent on 127.0.0.1 (a free port, its own process group) and, beside it, a tiny aiohttp server (its own
process group) whose one route reads the body and answers a constant small JSON. Each model's signed package
(fp32, fp16 and int8) is pushed in turn (the agent serves one model at a time); the size of each variant
comes from the push's on-device report.

Per model and variant, at batch 1, one parity row per request (the same JSON body everywhere), --calls timed
calls after --warmup untimed ones, interleaved call by call (in a new random order each round) so that a change
of the machine's load, or the tail of the call before, hits all alike:
  agent   POST /predict?variant=<v> through the agent (keep-alive http.client connection, TCP_NODELAY)
  bare    the LiteRT runner in this process (exporters.litert.load(artifact), called with the one row)
  empty   the same kind of POST (same body, same headers) to the empty aiohttp route
and accuracy: the variant's outputs through the agent's predict on every held-out parity row with a label
(>= 0), in batches of --acc-batch, minus the accuracy of the stored reference outputs "y" on the same rows
(argmax against the labels), in percentage points.

Prints one table (size, p50 / p99 of each, agent_p50 / (bare_p50 + empty_p50), the accuracy delta), says per
row whether that ratio is within the 1.5x target, then, to show where the time over bare + empty goes, an
in-process breakdown of the agent's handler steps (JSON parse, inputs as arrays, the variant's direct interpreter
call, output to lists, JSON encode; edge.agent's and edge.serving_path's own functions) and two more interleaved
timings on the empty server: /inline
(`await request.json()` and np.asarray of the inputs on the event loop) and /hop (the same with the asarray
handed by run_in_executor to a one-thread pool, as the agent hands its predict to its predict_pool), shown as
p50 differences: what the JSON parse and the thread hop cost. Then, per model (fp32, in this process), what a
request of 1 to 256 rows costs to parse and to run, and whether the agent runs it on its event loop or on its
predict thread (edge.agent.INLINE_MAX_BYTES, INLINE_BUDGET_MS). Then the machine's load at start and end.
Nothing here asserts on timings.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HOST = "127.0.0.1"
TARGET = 1.5

EMPTY_SERVER = r"""
import asyncio, sys
import numpy as np
from concurrent.futures import ThreadPoolExecutor
from aiohttp import web

BODY = {"outputs": {"y": [[0.0]]}}
POOL = ThreadPoolExecutor(max_workers=1)

async def predict(request):
    await request.read()
    return web.json_response(BODY)

def work(body):  # a sliver of the agent's work on the request: its inputs as an array
    np.asarray(body["inputs"], dtype=np.float32)
    return BODY

async def inline(request):  # request.json() and that work on the event loop
    return web.json_response(work(await request.json()))

async def hop(request):  # the same, the work handed to a one-thread pool as the agent hands its predict
    body = await request.json()
    return web.json_response(await asyncio.get_running_loop().run_in_executor(POOL, work, body))

app = web.Application(client_max_size=64 << 20)
app.router.add_post("/predict", predict)
app.router.add_post("/inline", inline)
app.router.add_post("/hop", hop)
app.router.add_get("/health", lambda request: web.json_response({"status": "ok"}))
web.run_app(app, host=sys.argv[1], port=int(sys.argv[2]), access_log=None, print=None)
"""


# ------------------------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 1) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[:300]


def load_text(load) -> str:
    return f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


@dataclass
class Proc:
    """A subprocess in its own process group, with its output in a log file."""
    name: str
    cmd: list[str]
    log: Path
    env: dict
    cwd: Path
    popen: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "wb") as f:
            self.popen = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.env, cwd=self.cwd, start_new_session=True)

    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def wait(self) -> int:
        return self.popen.wait()

    def stop(self) -> None:
        """SIGTERM to the whole group, wait, then SIGKILL whatever is left of it."""
        p = self.popen
        if p is None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def wait_health(proc: Proc, port: int, timeout_s: float) -> str:
    """'' once GET /health answers 200; otherwise what went wrong."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rc = proc.exited()
        if rc is not None:
            return f"{proc.name} exited with {rc}: {tail(proc.log, 2)}"
        try:
            c = http.client.HTTPConnection(HOST, port, timeout=2)
            c.request("GET", "/health")
            ok = c.getresponse().status == 200
            c.close()
            if ok:
                return ""
        except OSError:
            pass
        time.sleep(0.2)
    return f"{proc.name} not up within {timeout_s:g} s (last log line: {tail(proc.log)})"


class RestCaller:
    """POST one body over one keep-alive connection (TCP_NODELAY); raises on anything but a 200."""

    def __init__(self, port: int, path: str, body: bytes, token: str, timeout_s: float = 30.0):
        self.port, self.path, self.body, self.timeout_s = port, path, body, timeout_s
        self.headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
                        "Authorization": f"Bearer {token}"}
        self.conn = None

    def __call__(self) -> bytes:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout_s)
            self.conn.connect()
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.conn.request("POST", self.path, self.body, self.headers)
            r = self.conn.getresponse()
            data = r.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        if r.status != 200:
            raise RuntimeError(f"POST {self.path}: HTTP {r.status}: {data[:300].decode(errors='replace')}")
        return data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def plain(x):
    return {k: np.asarray(v).tolist() for k, v in x.items()} if isinstance(x, dict) else np.asarray(x).tolist()


def take_rows(x, idx):
    return {k: np.asarray(v)[idx] for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)[idx]


def n_of(x) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def predicted(out: np.ndarray) -> np.ndarray:
    out = np.asarray(out)
    if out.ndim == 1 or out.shape[-1] == 1:   # one score per row: a binary classifier's probability
        return (out.reshape(len(out)) > 0.5).astype(int)
    return np.argmax(out.reshape(len(out), -1), axis=-1)


# ------------------------------------------------------------------------------------------ the models

def find_bundles(home: Path) -> tuple[list[tuple[str, Path]], str]:
    """(model, bundle folder) of every `bundle:<model>` stage in the newest run record, and which record."""
    runs = sorted((home / ".pipeline" / "runs").glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    if not runs:
        return [], f"no run record under {home / '.pipeline' / 'runs'}"
    record = json.loads(runs[-1].read_text())
    found = []
    for s in record.get("stages", []):
        name = s.get("name", "")
        if name.startswith("bundle:") and s.get("path"):
            path = Path(s["path"])
            path = path if path.is_absolute() else home / path
            found.append((name.split(":", 1)[1], path / "bundle"))
    return found, runs[-1].name


@dataclass
class Row:
    model: str
    variant: str
    size_kb: float = float("nan")
    agent: list = field(default_factory=list)
    bare: list = field(default_factory=list)
    empty: list = field(default_factory=list)
    inline: list = field(default_factory=list)  # the empty server: request.json() + asarray on the loop
    hop: list = field(default_factory=list)     # the same with the asarray in a one-thread executor
    acc_delta_pp: float = float("nan")
    acc_rows: int = 0
    steps: dict = field(default_factory=dict)   # in-process handler steps: name -> p50 ms
    sizes: list = field(default_factory=list)   # inline_costs(): per batch size, fp32 only
    note: str = ""

    @property
    def ratio(self) -> float:
        denom = pct(self.bare, 50) + pct(self.empty, 50)
        return pct(self.agent, 50) / denom if self.agent and denom > 0 else float("nan")


def handler_steps(body: bytes, runner, signature, calls: int) -> dict:
    """The agent's predict handler, step by step, in this process (edge.agent's and edge.serving_path's own
    functions: the JSON decode, the inputs as arrays, the variant's direct interpreter call)."""
    from edge.agent import decode_json, parse_inputs
    from edge.serving_path import VariantServer
    server = VariantServer(runner, signature)
    times = {k: [] for k in ("json parse", "parse_inputs", "interpreter call", "outputs tolist", "json encode")}
    for i in range(calls + 10):
        t0 = time.perf_counter()
        obj = decode_json(body, None)
        t1 = time.perf_counter()
        x = parse_inputs(obj)
        t2 = time.perf_counter()
        with server.lock:
            result = server.predict(x)
        t3 = time.perf_counter()
        outputs = {k: v.tolist() for k, v in result.items()}
        t4 = time.perf_counter()
        json.dumps({"model": "m", "version": 1, "variant": "fp32", "outputs": outputs})
        t5 = time.perf_counter()
        if i >= 10:
            for k, a, b in zip(times, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
                times[k].append((b - a) * 1e3)
    return {k: pct(v, 50) for k, v in times.items()}


INLINE_ROWS = (1, 4, 16, 64, 256)


def inline_costs(x, runner, signature, p50_ms: float | None, calls: int = 30) -> list[tuple]:
    """Per batch size: (rows, body bytes, JSON parse + arrays ms, interpreter call + tolist ms, where the agent
    runs it): what running a request on the event loop would hold the loop for, against the thread hop."""
    from edge.agent import INLINE_BUDGET_MS, INLINE_MAX_BYTES, decode_json, parse_inputs
    from edge.serving_path import VariantServer
    server = VariantServer(runner, signature)
    out = []
    for n in INLINE_ROWS:
        rows = take_rows(x, np.arange(n) % n_of(x))
        body = json.dumps({"inputs": plain(rows)}).encode()
        parse, call = [], []
        for i in range(calls + 3):
            t0 = time.perf_counter()
            xs = parse_inputs(decode_json(body, None))
            t1 = time.perf_counter()
            with server.lock:
                {k: v.tolist() for k, v in server.predict(xs).items()}
            t2 = time.perf_counter()
            if i >= 3:
                parse.append((t1 - t0) * 1e3)
                call.append((t2 - t1) * 1e3)
        inline = len(body) <= INLINE_MAX_BYTES and n * (p50_ms or 0.0) <= INLINE_BUDGET_MS
        out.append((n, len(body), pct(parse, 50), pct(call, 50), "loop" if inline else "thread"))
    return out


def bench_model(model: str, bundle_dir: Path, client, agent_port: int, empty_port: int, token: str,
                private_key: Path, tmp: Path, args) -> list[Row]:
    from edge.package import build_package
    from exporters import litert
    from exporters.bundle import read_bundle

    bundle = read_bundle(bundle_dir)
    from edge.package import VARIANTS
    pkg = build_package(bundle, tmp / f"{model}.tar.gz", private_key, variants=VARIANTS, version=1)
    t = time.perf_counter()
    report = client.push(pkg)
    print(f"{model}: pushed {pkg.stat().st_size / 1024:.0f} KB package, on-device report in "
          f"{time.perf_counter() - t:.1f} s (passed: {report.get('passed')})", flush=True)
    ref = bundle.reference()
    x = ref["x"]
    body = json.dumps({"inputs": plain(take_rows(x, slice(0, 1)))}).encode()
    x1 = take_rows(x, slice(0, 1))
    labels = np.asarray(ref.get("labels", np.full(n_of(x), -1))).reshape(-1)
    keep = np.flatnonzero(labels >= 0)
    y_ref = np.asarray(ref["y"])
    ref_acc = float(np.mean(predicted(y_ref[keep]) == labels[keep])) if len(keep) else float("nan")
    sig = None
    try:
        from parity.signature import Signature
        sig = Signature.from_json(bundle.manifest["signature"]) if bundle.manifest.get("signature") else None
    except Exception:  # noqa: BLE001 - the breakdown maps by artifact names then
        sig = None
    artifacts = {a.variant: a for a in bundle.artifacts("litert")}
    rows = []
    from edge.package import VARIANTS
    for variant in VARIANTS:
        row = Row(model, variant)
        rows.append(row)
        rep = (report.get("variants") or {}).get(variant) or {}
        if rep.get("size_bytes"):
            row.size_kb = rep["size_bytes"] / 1024
        elif variant in artifacts:
            row.size_kb = Path(artifacts[variant].path).stat().st_size / 1024
        if variant not in artifacts:
            row.note = "no such artifact in the bundle"
            continue
        runner = litert.load(artifacts[variant])
        agent_call = RestCaller(agent_port, f"/predict?variant={variant}", body, token)
        empty_call = RestCaller(empty_port, "/predict", body, token)
        inline_call = RestCaller(empty_port, "/inline", body, token)
        hop_call = RestCaller(empty_port, "/hop", body, token)
        try:
            def bare_call():
                return runner(x1) if not isinstance(x1, dict) else runner.infer(x1)
            calls = (("agent", agent_call, row.agent), ("bare", bare_call, row.bare), ("empty", empty_call, row.empty),
                     ("inline", inline_call, row.inline), ("hop", hop_call, row.hop))
            for _ in range(args.warmup):
                for _, call, _ in calls:
                    call()
            rng = np.random.default_rng(0)
            for _ in range(args.calls):
                for i in rng.permutation(len(calls)):   # a new order each round: no series always follows another
                    _, call, lat = calls[i]
                    t = time.perf_counter()
                    call()
                    lat.append((time.perf_counter() - t) * 1e3)
            # accuracy through the agent, in batches
            if len(keep):
                outs = []
                for i in range(0, len(keep), args.acc_batch):
                    got = client.predict(take_rows(x, keep[i:i + args.acc_batch]), variant=variant)
                    outs.append(np.asarray(next(iter(got.values()))) if len(got) == 1 else
                                np.asarray(got.get("y", next(iter(got.values())))))
                acc = float(np.mean(predicted(np.concatenate(outs)) == labels[keep]))
                row.acc_delta_pp, row.acc_rows = (acc - ref_acc) * 100, len(keep)
            row.steps = handler_steps(body, runner, sig, min(args.calls, 200))
            if variant == "fp32":
                row.sizes = inline_costs(x, runner, sig, (rep.get("latency") or {}).get("p50_ms"))
        except Exception as e:  # noqa: BLE001 - a failing row is a note, not a traceback
            row.note = f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            agent_call.close()
            empty_call.close()
            inline_call.close()
            hop_call.close()
            runner.close()
        print(f"  {variant}: agent p50 {pct(row.agent, 50):.3f} ms, bare {pct(row.bare, 50):.3f} ms, "
              f"empty {pct(row.empty, 50):.3f} ms" + (f" ({row.note})" if row.note else ""), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=None, help="PIPELINE_HOME to run in / read bundles from (default: a scratch one)")
    ap.add_argument("--no-run", action="store_true", help="do not run the pipeline; take the bundles in --home")
    ap.add_argument("--spec", default="digits")
    ap.add_argument("--calls", type=int, default=300, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls first")
    ap.add_argument("--acc-batch", type=int, default=64, help="rows per predict request for the accuracy")
    ap.add_argument("--start-timeout", type=float, default=60.0)
    args = ap.parse_args()
    if args.no_run and not args.home:
        ap.error("--no-run needs --home")
    load0 = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average at start: {load_text(load0)}", flush=True)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
           "TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "GIT_PYTHON_REFRESH": "quiet", "TFJS_NODE_MODULES": str(ROOT / "exporters" / "js" / "node_modules"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: list[Proc] = []
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_edge-") as tmp:
        tmp = Path(tmp)
        home = Path(args.home).resolve() if args.home else tmp / "home"
        home.mkdir(parents=True, exist_ok=True)
        try:
            if not args.no_run:
                t = time.perf_counter()
                pipe = Proc("pipeline", [sys.executable, "-m", "pipeline", "run", args.spec, "--no-track"],
                            tmp / "pipeline.log", {**env, "PIPELINE_HOME": str(home)}, home)
                procs.append(pipe)
                pipe.start()
                rc = pipe.wait()
                print(f"pipeline run {args.spec}: rc {rc} in {time.perf_counter() - t:.1f} s"
                      + (f" ({tail(pipe.log, 2)})" if rc else ""), flush=True)
            bundles, which = find_bundles(home)
            print(f"run record {which}: {', '.join(m for m, _ in bundles) or 'no bundle stages'}", flush=True)
            if not bundles:
                return

            from edge.client import EdgeClient
            from edge.keys import init_keys
            private_key, public_key = init_keys(tmp / "keys")
            token = secrets.token_hex(16)
            agent_port, empty_port = free_port(), free_port()
            agent = Proc("agent", [sys.executable, "-m", "edge.agent", "--root", str(tmp / "device"),
                                   "--public-key", str(public_key), "--token", token, "--host", HOST,
                                   "--port", str(agent_port), "--ready-file", str(tmp / "ready.json")],
                         tmp / "agent.log", env, tmp)
            empty = Proc("empty aiohttp server", [sys.executable, "-c", EMPTY_SERVER, HOST, str(empty_port)],
                         tmp / "empty.log", env, tmp)
            for p in (agent, empty):
                procs.append(p)
                p.start()
            for p, port in ((agent, agent_port), (empty, empty_port)):
                problem = wait_health(p, port, args.start_timeout)
                if problem:
                    print(f"cannot measure: {problem}")
                    return
            client = EdgeClient(f"http://{HOST}:{agent_port}", token)
            for model, bundle_dir in bundles:
                try:
                    rows += bench_model(model, bundle_dir, client, agent_port, empty_port, token, private_key,
                                        tmp, args)
                except Exception as e:  # noqa: BLE001 - a model that cannot be pushed is a row saying so
                    rows.append(Row(model, "-", note=f"{type(e).__name__}: {str(e)[:200]}"))
                    print(f"{model}: {rows[-1].note} (agent log: {tail(agent.log, 2)})", flush=True)
        finally:
            for p in reversed(procs):
                p.stop()

    def f(v, d=3):
        return "-" if v != v else f"{v:.{d}f}"
    print(f"\nbatch 1, {args.calls} timed calls after {args.warmup} warm-up calls each, interleaved in a shuffled order; "
          f"accuracy delta: variant through the agent minus the stored reference outputs, labelled held-out rows")
    print("\n| model | variant | size KB | agent p50 ms | agent p99 ms | bare p50 ms | bare p99 ms | "
          "empty RT p50 ms | empty RT p99 ms | agent / (bare + empty) p50 | acc delta pp |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.model} | {r.variant} | {f(r.size_kb, 1)} | {f(pct(r.agent, 50))} | {f(pct(r.agent, 99))} | "
              f"{f(pct(r.bare, 50))} | {f(pct(r.bare, 99))} | {f(pct(r.empty, 50))} | {f(pct(r.empty, 99))} | "
              f"{f(r.ratio, 2)} | {f(r.acc_delta_pp, 2)}" + (f" ({r.acc_rows} rows)" if r.acc_rows else "")
              + (f" {r.note}" if r.note else "") + " |")
    print(f"\ntarget: agent p50 within {TARGET}x of bare p50 + empty round trip p50")
    for r in rows:
        verdict = "n/a" if r.ratio != r.ratio else ("within" if r.ratio <= TARGET else "OVER")
        print(f"  {r.model}/{r.variant}: {f(r.ratio, 2)}x: {verdict}")
    with_steps = [r for r in rows if r.steps]
    if with_steps:
        names = list(with_steps[0].steps)
        print("\nthe agent's handler steps in this process (p50 ms; edge.agent's own functions):")
        print("| model | variant | " + " | ".join(names) + " | sum | agent p50 - empty p50 | "
              "json + asarray on the loop (inline - empty) | executor hop (hop - inline) |")
        print("|---|---|" + "---|" * (len(names) + 4))
        for r in with_steps:
            print(f"| {r.model} | {r.variant} | " + " | ".join(f(r.steps[n]) for n in names)
                  + f" | {f(sum(r.steps.values()))} | {f(pct(r.agent, 50) - pct(r.empty, 50))} | "
                  f"{f(pct(r.inline, 50) - pct(r.empty, 50))} | {f(pct(r.hop, 50) - pct(r.inline, 50))} |")
    with_sizes = [r for r in rows if r.sizes]
    if with_sizes:
        from edge.agent import INLINE_BUDGET_MS, INLINE_MAX_BYTES
        print(f"\ninline or thread, by batch size (fp32, in this process, p50 ms): the agent answers on the event "
              f"loop when the body is <= {INLINE_MAX_BYTES} bytes and rows x the on-device batch-1 p50 <= "
              f"{INLINE_BUDGET_MS} ms; the thread hop it saves is the 'executor hop' column above")
        print("| model | rows | body bytes | json + arrays ms | interpreter call + tolist ms | agent runs it on |")
        print("|---|---|---|---|---|---|")
        for r in with_sizes:
            for n, nbytes, parse, call, where in r.sizes:
                print(f"| {r.model} | {n} | {nbytes} | {f(parse)} | {f(call)} | {where} |")
    load1 = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs, load average at start: {load_text(load0)}; at end: {load_text(load1)}")


if __name__ == "__main__":
    main()
