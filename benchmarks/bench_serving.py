#!/usr/bin/env python
"""Our TF Serving stand-in (`python -m serving`) against `mlflow models serve`, on the toy and digits models.

    .venv/bin/python benchmarks/bench_serving.py [--home DIR] [--no-run] [--requests 500] [--mlflow-requests 100]
                                                 [--clients 8] [--specs toy,digits] [--start-timeout 150]
                                                 [--baseline-root DIR] [--no-mlflow] [--client loop|threads]

Runs `python -m pipeline run <spec> --no-track` for each spec in a scratch home (or in --home; --no-run
takes the bundles already there), writes a TF Serving repository per model (served as `<spec>-<model>`)
and serves them all from one `python -m serving --model_config_file ...` subprocess; each model's native
MLflow model (the train stage's mlflow_model folder) gets its own `mlflow models serve --env-manager local`
subprocess. All servers start together; nothing is measured until every one answers (or timed out), and
the client load runs in this process. Each request carries one row of the bundle's stored parity inputs.

Per model: REST predict (columnar `{"inputs": {...}}`, keep-alive connections, TCP_NODELAY) and gRPC Predict
(tensorflow_serving stubs, the request built once), first on one connection, then on --clients connections
(--requests sequential, clients x requests/2 concurrent); MLflow's POST /invocations likewise with
--mlflow-requests (clients x mlflow-requests/4). REST load comes from benchmarks/http_load.py, one thread
keeping one request in flight on each connection (as wrk; --client threads: a thread with an http.client
connection each, the client of the tables before it, whose own GIL contention shows in its latencies);
gRPC from a thread per channel. A few untimed requests go first on each connection (all connections warm up
side by side). "bare" rows: http_load's fixed-reply server with the same client, the round trip with nothing
behind it. Prints one table (req/s, p50 / p99 latency of the successful requests, errors;
a server that did not come up is a row saying so), then per model our req/s over MLflow's (the target is
>= 50x) and our p99 against MLflow's p50 / 20 at the same client count (the target is p99 below it), then
our sequential REST req/s against our REST handler alone (transport "handler": what answers a REST predict,
called without HTTP in a child process over the same repository, --requests per model, after the servers
are up and before any of them is measured: the app's post_inline, which the REST port's own protocol hands
the path and body to, or in a tree without that protocol the aiohttp handler on prebuilt requests; the
target is >= 0.7x; also against the handler's time plus the bare round trip) with p99 / p50 at --clients
(the target is below 2; the bare row's spread is the client's and machine's own), and the machine's load at
start and end. Nothing here asserts on timings.

--baseline-root DIR serves the same repository a second time from another checkout of this toolkit (e.g. a
`git worktree` of an older commit: its `serving` package, this interpreter) and measures its REST predict
alternately with ours (ROUNDS rounds each, model by model), so the two are compared in one run under the same
load; a table gives our REST req/s over the baseline's. --no-mlflow leaves MLflow's servers out (their rows say so).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_load  # noqa: E402 - beside this file
WARMUP = 20           # untimed requests per connection first; MLflow's keras answers slowly: fewer
MLFLOW_WARMUP = 5
HOST = "127.0.0.1"


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
    return " | ".join(lines[-n:])[:200]


@dataclass
class Proc:
    """A server subprocess in its own process group, with its output in a log file."""
    name: str
    cmd: list[str]
    log: Path
    env: dict
    cwd: Path
    popen: subprocess.Popen | None = None
    ready: bool = False
    problem: str = ""
    port: int = 0                        # MLflow's port; ours: gRPC and REST below
    grpc_port: int = 0
    rest_port: int = 0

    def start(self) -> None:
        with open(self.log, "wb") as f:
            self.popen = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=self.env, cwd=self.cwd, start_new_session=True)

    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def stop(self) -> None:
        """SIGTERM to the whole group (MLflow's workers outlive their parent), wait, then SIGKILL the group."""
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
        try:  # whatever is left of the group (forked workers), and the parent if it ignored SIGTERM
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def wait_all(checks: list[tuple[Proc, callable]], timeout_s: float) -> None:
    """Poll every server's readiness check until each answers, exits, or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    pending = list(checks)
    while pending:
        for item in list(pending):
            proc, check = item
            rc = proc.exited()
            if rc is not None:
                proc.problem = f"exited with {rc}: {tail(proc.log)}"
                pending.remove(item)
                continue
            try:
                if check():
                    proc.ready = True
                    pending.remove(item)
            except Exception:  # noqa: BLE001 - not up yet
                pass
        if pending and time.monotonic() >= deadline:
            for proc, _ in pending:
                proc.problem = f"not up within {timeout_s:g} s (last log line: {tail(proc.log)})"
            return
        if pending:
            time.sleep(0.25)


# ---------------------------------------------------------------------------------------------- load

@dataclass
class Result:
    model: str
    server: str
    transport: str
    clients: int
    n: int = 0
    wall_s: float = 0.0
    lat_ms: list = field(default_factory=list)
    errors: int = 0
    note: str = ""

    @property
    def rps(self) -> float | None:
        return self.n / self.wall_s if self.wall_s > 0 and self.n else None

    def pct(self, q: float) -> float | None:
        return float(np.percentile(self.lat_ms, q)) if self.lat_ms else None


class RestCaller:
    """POST one body over one keep-alive connection (TCP_NODELAY), reconnecting after a failure."""

    def __init__(self, port: int, path: str, body: bytes, timeout_s: float = 30.0):
        self.port, self.path, self.body, self.timeout_s = port, path, body, timeout_s
        self.headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        self.conn = None
        self.last_error = ""

    def _connect(self) -> None:
        self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout_s)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __call__(self) -> bytes | None:
        try:
            if self.conn is None:
                self._connect()
            self.conn.request("POST", self.path, self.body, self.headers)
            r = self.conn.getresponse()
            data = r.read()
            if r.status == 200:
                return data
            self.last_error = f"HTTP {r.status}: {data[:200].decode(errors='replace')}"
            if r.will_close:
                self.close()
            return None
        except (OSError, http.client.HTTPException) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            self.close()
            return None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class GrpcCaller:
    """Predict with one prebuilt request over one channel of its own (a local subchannel pool, so eight
    callers are eight connections, not one shared)."""

    def __init__(self, port: int, request, timeout_s: float = 30.0):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc
        self.grpc = grpc
        self.channel = grpc.insecure_channel(f"{HOST}:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        grpc.channel_ready_future(self.channel).result(timeout=10)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.request, self.timeout_s = request, timeout_s
        self.last_error = ""

    def __call__(self):
        try:
            return self.stub.Predict(self.request, timeout=self.timeout_s)
        except self.grpc.RpcError as e:
            self.last_error = f"{e.code().name}: {e.details()}"
            return None

    def close(self) -> None:
        self.channel.close()


def drive(res: Result, make_caller, clients: int, per_client: int, warmup: int) -> Result:
    """`clients` threads, each with its own caller (connection), `per_client` timed calls each after
    `warmup` untimed ones; wall time from the common start to the last answer."""
    callers, lats, errs = [], [[] for _ in range(clients)], [0] * clients
    try:
        for _ in range(clients):
            callers.append(make_caller())
        start = threading.Barrier(clients + 1)

        def work(i: int) -> None:
            call, lat = callers[i], lats[i]
            try:
                for _ in range(warmup):  # side by side, so no connection idles long before the start
                    call()
            finally:
                start.wait()
            for _ in range(per_client):
                t = time.perf_counter()
                ok = call() is not None
                dt = time.perf_counter() - t
                if ok:
                    lat.append(dt * 1e3)
                else:
                    errs[i] += 1

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        res.wall_s = time.perf_counter() - t0
        res.n = clients * per_client
        res.lat_ms = [x for lat in lats for x in lat]
        res.errors = sum(errs)
        if res.errors:
            res.note = next((c.last_error for c in callers if c.last_error), "")[:120]
    except Exception as e:  # noqa: BLE001 - a caller that cannot connect is a row, not a traceback
        res.note = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        res.errors = res.errors or clients * per_client
    finally:
        for c in callers:
            c.close()
    return res


def drive_rest(res: Result, port: int, path: str, body: bytes, clients: int, per_client: int, warmup: int,
               client: str) -> Result:
    """REST load on `clients` keep-alive connections: "loop" is http_load's one-thread client (as wrk),
    "threads" a thread with an http.client connection each (the tables before it)."""
    if client == "threads":
        return drive(res, lambda: RestCaller(port, path, body), clients, per_client, warmup)
    got = http_load.drive(port, http_load.request_bytes(port, path, body), clients, per_client, warmup)
    res.n, res.wall_s, res.lat_ms, res.errors = got["n"], got["wall_s"], got["lat_ms"], got["errors"]
    res.note = res.note or got["note"]
    return res


ROUNDS = 5  # --baseline-root: the baseline's and our REST runs alternate in this many rounds


def merge(into: Result, part: Result) -> None:
    """Add a round's measurement to a row."""
    into.n += part.n
    into.wall_s += part.wall_s
    into.lat_ms += part.lat_ms
    into.errors += part.errors
    into.note = into.note or part.note


class _Body:
    """A request payload for aiohttp's make_mocked_request: the body in one read."""

    def __init__(self, body: bytes):
        self.body = body

    async def readany(self) -> bytes:
        body, self.body = self.body, b""
        return body

    def at_eof(self) -> bool:
        return not self.body

    def set_read_chunk_size(self, n: int) -> None:
        pass


def handler_alone(res: Result, app, path: str, body: bytes, n: int, warmup: int) -> Result:
    """Our REST handler called directly (route match, body read, JSON in and out, the model): what a
    request costs without HTTP. Requests are built before the clock starts (aiohttp's mocked requests
    are slow to make); each call is timed on its own."""
    import asyncio
    import gc

    from aiohttp.test_utils import make_mocked_request

    async def run() -> None:
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        probe = make_mocked_request("POST", path, headers=headers, app=app, payload=_Body(body))
        match = await app.router.resolve(probe)
        reqs = [make_mocked_request("POST", path, headers=headers, app=app, payload=_Body(body), match_info=match)
                for _ in range(warmup + n)]
        lat = []
        # the prebuilt requests are a heap of young objects: collected now, they do not set off full
        # collections inside the timed loop (which a server's steady state has no reason to run)
        gc.collect()
        t0 = time.perf_counter()
        for i, req in enumerate(reqs):
            if i == warmup:
                t0 = time.perf_counter()
            t = time.perf_counter()
            resp = await match.handler(req)
            dt = time.perf_counter() - t
            if resp.status != 200:
                res.errors += 1
                res.note = res.note or f"HTTP {resp.status}: {resp.text[:100]}"
            elif i >= warmup:
                lat.append(dt * 1e3)
        res.wall_s = time.perf_counter() - t0
        res.n, res.lat_ms = n, lat

    try:
        asyncio.run(run())
    except Exception as e:  # noqa: BLE001 - a row, not a traceback
        res.note = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return res


def inline_alone(res: Result, post_inline, path: str, body: bytes, n: int, warmup: int) -> Result:
    """What answers a REST predict on our port (serving/server.py _FastV1Protocol hands the path and body to
    the app's post_inline: JSON in and out, the model, the metrics) called directly, without HTTP."""
    import gc
    lat = []
    gc.collect()
    t0 = time.perf_counter()
    for i in range(warmup + n):
        if i == warmup:
            t0 = time.perf_counter()
        t = time.perf_counter()
        status, text = post_inline(path, body)
        dt = time.perf_counter() - t
        if status != 200:
            res.errors += 1
            res.note = res.note or f"HTTP {status}: {text[:100]}"
        elif i >= warmup:
            lat.append(dt * 1e3)
    res.wall_s = time.perf_counter() - t0
    res.n, res.lat_ms = n, lat
    return res


def handler_alone_child(job_file: str) -> None:
    """`--handler-alone JOB`: our REST app over the served repository in this fresh process (what
    `python -m serving` builds, predict answered on the event loop as there, and no more imported than
    there: this process's TensorFlow, torch and MLflow would slow the garbage collector), each model's
    handler measured in turn; prints one JSON line of results."""
    from serving.models import ModelManager, ModelSettings
    from serving.server import DEFAULT_MAX_REQUEST_BYTES, Core, _make_rest_app
    job = json.loads(Path(job_file).read_text())
    repo = Path(job["repo"])
    manager = ModelManager([ModelSettings(name=m["served"], base_path=str(repo / m["served"]))
                            for m in job["models"]], None, 0)
    manager.start()

    async def run_blocking(fn, *args):
        return fn(*args)
    hooks: dict = {}
    try:
        app = _make_rest_app(Core(manager), DEFAULT_MAX_REQUEST_BYTES, run_blocking, hooks=hooks)
    except TypeError:  # a tree without the REST port's own protocol
        app = _make_rest_app(Core(manager), DEFAULT_MAX_REQUEST_BYTES, run_blocking)
    out = {}
    try:
        for m in job["models"]:
            path, body = f"/v1/models/{m['served']}:predict", m["body"].encode()
            row = Result(m["label"], "ours", "handler", 1)
            if "post_inline" in hooks:
                r = inline_alone(row, hooks["post_inline"], path, body, job["n"], job["warmup"])
            else:
                r = handler_alone(row, app, path, body, job["n"], job["warmup"])
            out[m["label"]] = {"n": r.n, "wall_s": r.wall_s, "lat_ms": r.lat_ms, "errors": r.errors, "note": r.note}
    finally:
        manager.stop()
    print(json.dumps(out))


def measure_handlers(models: list, repo: Path, n: int, env: dict, tmp: Path) -> dict[str, Result]:
    """Run handler_alone_child over `models` (label -> Result; a failure is a note on every row)."""
    job = tmp / "handler-job.json"
    job.write_text(json.dumps({"repo": str(repo), "n": n, "warmup": WARMUP, "models": [
        {"label": m.label, "served": m.served, "body": m.rest_body.decode()} for m in models]}))
    rows = {m.label: Result(m.label, "ours", "handler", 1) for m in models}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--handler-alone", str(job)], env=env,
                          cwd=tmp, capture_output=True, text=True)
    try:
        got = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        for r in rows.values():
            r.note = f"handler run failed (rc {done.returncode}): {done.stderr.strip()[-160:]}"
        return rows
    for label, r in rows.items():
        g = got.get(label) or {}
        r.n, r.wall_s, r.lat_ms = g.get("n", 0), g.get("wall_s", 0.0), g.get("lat_ms", [])
        r.errors, r.note = g.get("errors", 0), g.get("note", "")
    return rows


# ------------------------------------------------------------------------------------------ the models

@dataclass
class Model:
    spec: str
    model: str
    bundle_dir: Path
    mlflow_dir: Path | None
    served: str = ""
    rest_body: bytes = b""
    grpc_request: object = None
    mlflow_body: bytes = b""
    problem: str = ""

    @property
    def label(self) -> str:
        return f"{self.spec}/{self.model}"


def find_models(home: Path, specs: list[str]) -> tuple[list[Model], list[str]]:
    """Each spec's newest bundle per model, and its train stage's mlflow_model folder, found through the
    stage.json files: bundle <- reference:<m> <- train:<m>, matched by the content digests they record."""
    cache = home / ".pipeline" / "cache"
    metas: dict[str, list[tuple[Path, dict]]] = {}
    for kind in ("bundle", "reference", "train"):
        metas[kind] = []
        for f in sorted((cache / kind).glob("*/stage.json")):
            try:
                metas[kind].append((f.parent, json.loads(f.read_text())))
            except (OSError, ValueError):
                pass
    by_content = {kind: {m.get("content"): (p, m) for p, m in metas[kind]} for kind in ("reference", "train")}
    newest: dict[tuple[str, str], tuple[float, Path, dict]] = {}
    for path, meta in metas["bundle"]:
        try:
            manifest = json.loads((path / "bundle" / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        spec = (manifest.get("source") or {}).get("spec", "?")
        key = (spec, manifest["model"])
        if spec in specs and (key not in newest or meta.get("finished", 0) > newest[key][0]):
            newest[key] = (meta.get("finished", 0), path, meta)
    models, notes = [], []
    for (spec, name), (_, path, meta) in sorted(newest.items(), key=lambda kv: (specs.index(kv[0][0]), kv[0][1])):
        mlflow_dir = None
        ref = by_content["reference"].get((meta.get("input_content") or {}).get(f"reference:{name}"))
        if ref is not None:
            train = by_content["train"].get((ref[1].get("input_content") or {}).get(f"train:{name}"))
            if train is not None and train[1].get("name") == f"train:{name}":
                cand = train[0] / "mlflow_model"
                if (cand / "MLmodel").is_file():
                    mlflow_dir = cand
                else:
                    notes.append(f"{spec}/{name}: train entry {train[0]} has no mlflow_model/MLmodel "
                                 f"({train[1].get('facts', {}).get('mlflow_model') or 'no note'})")
        if mlflow_dir is None and not any(n.startswith(f"{spec}/{name}:") for n in notes):
            notes.append(f"{spec}/{name}: no train entry found behind bundle {path.name}")
        models.append(Model(spec, name, path / "bundle", mlflow_dir))
    for spec in specs:
        if not any(m.spec == spec for m in models):
            notes.append(f"{spec}: no bundle found under {cache / 'bundle'}")
    return models, notes


def prepare(m: Model, repo: Path) -> None:
    """The served repository and the three request bodies, from one row of the stored parity inputs."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    from exporters.bundle import read_bundle
    from serving.repository import passed_saved_model, serving_feed, write_repository

    bundle = read_bundle(m.bundle_dir)
    m.served = f"{m.spec}-{m.model}"
    write_repository(bundle, repo, version=1, model_name=m.served)
    feed = serving_feed(bundle, passed_saved_model(bundle))
    row = {k: np.ascontiguousarray(v[:1]) for k, v in feed.items()}
    m.rest_body = json.dumps({"inputs": {k: v.tolist() for k, v in row.items()}}).encode()
    req = predict_pb2.PredictRequest()
    req.model_spec.name = m.served
    req.model_spec.signature_name = "serving_default"
    for k, v in row.items():
        req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
    m.grpc_request = req
    x = bundle.reference()["x"]
    native = {k: np.asarray(v)[:1].tolist() for k, v in x.items()} if isinstance(x, dict) else np.asarray(x)[:1].tolist()
    m.mlflow_body = json.dumps({"inputs": native}).encode()


# ------------------------------------------------------------------------------------------------ main

def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=None, help="PIPELINE_HOME to run in / read bundles from (default: a scratch one)")
    ap.add_argument("--no-run", action="store_true", help="do not run the pipeline; take the bundles in --home")
    ap.add_argument("--specs", default="toy,digits")
    ap.add_argument("--requests", type=int, default=500, help="our sequential requests (concurrent: clients x N/2)")
    ap.add_argument("--mlflow-requests", type=int, default=100,
                    help="MLflow's sequential requests (concurrent: clients x N/4)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--start-timeout", type=float, default=150.0, help="seconds for every server to come up")
    ap.add_argument("--baseline-root", default=None, metavar="DIR",
                    help="another checkout whose `python -m serving` is measured beside ours (REST)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not start MLflow's servers")
    ap.add_argument("--client", choices=("loop", "threads"), default="loop",
                    help="REST load: one thread multiplexing the connections (as wrk), or a thread with an "
                         "http.client connection each (the tables before the loop client)")
    ap.add_argument("--handler-alone", metavar="JOB", help=argparse.SUPPRESS)  # the child measure_handlers runs
    args = ap.parse_args()
    if args.handler_alone:
        handler_alone_child(args.handler_alone)
        return
    if args.no_run and not args.home:
        ap.error("--no-run needs --home")
    specs = [s for s in args.specs.split(",") if s]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # this process imports TensorFlow for the request protos
    load0 = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}",
          flush=True)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
           "TF_CPP_MIN_LOG_LEVEL": "2", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "GIT_PYTHON_REFRESH": "quiet", "TFJS_NODE_MODULES": str(ROOT / "exporters" / "js" / "node_modules"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    procs: list[Proc] = []
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench_serving-") as tmp:
        tmp = Path(tmp)
        home = Path(args.home).resolve() if args.home else tmp / "home"
        home.mkdir(parents=True, exist_ok=True)
        try:
            if not args.no_run:
                for spec in specs:
                    t = time.perf_counter()
                    log = tmp / f"pipeline-{spec}.log"
                    with open(log, "wb") as f:
                        rc = subprocess.run([sys.executable, "-m", "pipeline", "run", spec, "--no-track"], cwd=home,
                                            env={**env, "PIPELINE_HOME": str(home)}, stdout=f,
                                            stderr=subprocess.STDOUT).returncode
                    print(f"pipeline run {spec}: rc {rc} in {time.perf_counter() - t:.1f} s"
                          + (f" ({tail(log, 2)})" if rc else ""), flush=True)
            models, notes = find_models(home, specs)
            for n in notes:
                print(f"note: {n}")
            repo = tmp / "repository"
            for m in list(models):
                try:
                    prepare(m, repo)
                except Exception as e:  # noqa: BLE001 - a model that cannot be served is reported, the rest run
                    m.problem = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    print(f"note: {m.label}: not served: {m.problem}")
            served = [m for m in models if not m.problem]
            if not models:
                print("no models to serve")
                return

            # ---- start every server at once, then wait for all of them
            checks = []
            ours = None
            if served:
                from serving.config import ModelEntry, write_model_config
                config = write_model_config(tmp / "models.config",
                                            [ModelEntry(m.served, str(repo / m.served)) for m in served])
                gport, rport = free_port(), free_port()
                ours = Proc("ours", [sys.executable, "-m", "serving", f"--port={gport}", f"--rest_api_port={rport}",
                                     f"--host={HOST}", f"--model_config_file={config}",
                                     "--file_system_poll_wait_seconds=0"], tmp / "ours.log", env, tmp)
                ours.grpc_port, ours.rest_port = gport, rport
                ours.start()
                procs.append(ours)
                from serving.client import ServingClient
                status_client = ServingClient(HOST, grpc_port=gport, timeout_s=2)

                def ours_ready() -> bool:
                    return all(any(s.state == "AVAILABLE" for s in status_client.status(m.served)) for m in served)
                checks.append((ours, ours_ready))
                if args.baseline_root:
                    base_root = Path(args.baseline_root).resolve()
                    bg, br = free_port(), free_port()
                    base = Proc("baseline", [sys.executable, "-m", "serving", f"--port={bg}", f"--rest_api_port={br}",
                                             f"--host={HOST}", f"--model_config_file={config}",
                                             "--file_system_poll_wait_seconds=0"], tmp / "baseline.log",
                                {**env, "PYTHONPATH": str(base_root)}, tmp)
                    base.grpc_port, base.rest_port = bg, br
                    base.start()
                    procs.append(base)
                    base_client = ServingClient(HOST, grpc_port=bg, timeout_s=2)

                    def base_ready() -> bool:
                        return all(any(s.state == "AVAILABLE" for s in base_client.status(m.served)) for m in served)
                    checks.append((base, base_ready))
            mlflow_procs: dict[str, Proc] = {}
            for m in models:
                if m.mlflow_dir is None or args.no_mlflow:
                    continue
                port = free_port()
                p = Proc(f"mlflow {m.label}", [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(m.mlflow_dir),
                                              "--env-manager", "local", "-p", str(port), "--host", HOST],
                         tmp / f"mlflow-{m.spec}-{m.model}.log", env, tmp)
                p.port = port
                p.start()
                procs.append(p)
                mlflow_procs[m.label] = p

                def ping(port=port) -> bool:
                    c = http.client.HTTPConnection(HOST, port, timeout=2)
                    try:
                        c.request("GET", "/ping")
                        return c.getresponse().status == 200
                    finally:
                        c.close()
                checks.append((p, ping))
            bare = None
            if served:  # a server answering a fixed reply: the round trip with nothing behind it
                bare = Proc("bare", [sys.executable, str(Path(http_load.__file__).resolve()), "--serve-fixed",
                                     str(free_port())], tmp / "bare.log", env, tmp)
                bare.port = int(bare.cmd[-1])
                bare.start()
                procs.append(bare)
                checks.append((bare, lambda: not http_load.drive(bare.port, http_load.request_bytes(
                    bare.port, "/", b"{}"), 1, 1, 0, timeout_s=2)["errors"]))
            t = time.perf_counter()
            wait_all(checks, args.start_timeout)
            print("servers: " + ", ".join(f"{p.name} {'up' if p.ready else 'DOWN'}" for p in procs)
                  + f" after {time.perf_counter() - t:.1f} s", flush=True)

            # ---- measure, one model and one server at a time
            # this process holds TensorFlow's objects (for the request protos): a full collection of them
            # takes a few hundred ms, a pause that would land on whichever server is being measured
            import gc
            gc.collect()
            gc.freeze()
            n, c = args.requests, args.clients
            nm = args.mlflow_requests
            handlers = {}
            base = next((p for p in procs if p.name == "baseline"), None)
            if served and ours is not None and ours.ready:  # the REST handler without HTTP: the bound for REST
                t = time.perf_counter()
                handlers = measure_handlers(served, repo, n, env, tmp)
                print(f"handler alone: measured in {time.perf_counter() - t:.1f} s", flush=True)
            if bare is not None:
                body = next(m.rest_body for m in served)
                for k in (1, c):
                    r = Result("-", "bare", "rest", k)
                    if bare.ready:
                        drive_rest(r, bare.port, "/", body, k, n if k == 1 else max(1, n // 2), WARMUP, args.client)
                    else:
                        r.note = bare.problem
                    results.append(r)
                    print(f"  bare rest x{k}: {fmt(r.rps, '.0f')} req/s", flush=True)
            for m in models:
                rows = [Result(m.label, "ours", tr, k) for tr in ("rest", "grpc") for k in (1, c)]
                if m.problem or ours is None or not ours.ready:
                    for r in rows:
                        r.note = m.problem or (ours.problem if ours else "not started")
                else:
                    path = f"/v1/models/{m.served}:predict"
                    if m.label in handlers:
                        rows.insert(0, handlers[m.label])
                    brows = {}
                    if base is not None:  # interleaved with ours, round by round, under the same load
                        brows = {k: Result(m.label, "baseline", "rest", k) for k in (1, c)}
                        if not base.ready:
                            for r in brows.values():
                                r.note = base.problem
                        results += brows.values()
                    for r in rows:
                        if r.transport == "handler":  # measured in its child process above
                            continue
                        per = n if r.clients == 1 else max(1, n // 2)
                        if r.transport == "rest":
                            b = brows.get(r.clients)
                            if b is None or not base.ready:
                                drive_rest(r, ours.rest_port, path, m.rest_body, r.clients, per, WARMUP, args.client)
                            else:
                                for i in range(ROUNDS):
                                    part = max(1, per // ROUNDS)
                                    for row, port in ((b, base.rest_port), (r, ours.rest_port)):
                                        merge(row, drive_rest(Result(row.model, row.server, "rest", row.clients),
                                                              port, path, m.rest_body, row.clients, part, WARMUP,
                                                              args.client))
                                print(f"  {m.label} baseline rest x{b.clients}: {fmt(b.rps, '.0f')} req/s", flush=True)
                        else:
                            drive(r, lambda: GrpcCaller(ours.grpc_port, m.grpc_request), r.clients, per, WARMUP)
                        print(f"  {m.label} ours {r.transport} x{r.clients}: {fmt(r.rps, '.0f')} req/s", flush=True)
                results += rows
                mrows = [Result(m.label, "mlflow", "rest", k) for k in (1, c)]
                p = mlflow_procs.get(m.label)
                if p is None or not p.ready:
                    for r in mrows:
                        r.note = ("not started (--no-mlflow)" if args.no_mlflow else
                                  "no MLflow model found" if p is None else p.problem)
                else:
                    for r in mrows:
                        per = nm if r.clients == 1 else max(1, nm // 4)
                        drive_rest(r, p.port, "/invocations", m.mlflow_body, r.clients, per, MLFLOW_WARMUP, args.client)
                        print(f"  {m.label} mlflow rest x{r.clients}: {fmt(r.rps, '.0f')} req/s", flush=True)
                results += mrows
        finally:
            for p in reversed(procs):
                p.stop()

    # ---- report
    print("\n| model | server | transport | clients | requests | req/s | p50 ms | p99 ms | errors | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.model} | {r.server} | {r.transport} | {r.clients} | {r.n or '-'} | {fmt(r.rps, '.0f')} | "
              f"{fmt(r.pct(50), '.2f')} | {fmt(r.pct(99), '.2f')} | {r.errors if r.n else '-'} | {r.note} |")
    print("\nper model, ours against MLflow's REST at the same client count "
          "(targets: req/s ratio >= 50x; our p99 < MLflow p50 / 20):")
    print("| model | ours | clients | req/s ratio | our p99 ms | MLflow p50 / 20 ms | p99 target |")
    print("|---|---|---|---|---|---|---|")
    for model in dict.fromkeys(r.model for r in results):
        mine = {(r.transport, r.clients): r for r in results if r.model == model and r.server == "ours"}
        theirs = {r.clients: r for r in results if r.model == model and r.server == "mlflow"}
        for (tr, k), r in mine.items():
            if tr == "handler":
                continue
            ml = theirs.get(k)
            ratio = r.rps / ml.rps if r.rps and ml and ml.rps else None
            bound = ml.pct(50) / 20 if ml and ml.pct(50) is not None else None
            p99 = r.pct(99)
            verdict = "-" if p99 is None or bound is None else ("met" if p99 < bound else "missed")
            print(f"| {model} | {tr} | {k} | {fmt(ratio, '.1f')}{'x' if ratio else ''} | {fmt(p99, '.2f')} | "
                  f"{fmt(bound, '.2f')} | {verdict} |")
    print("\nper model, our REST against our handler alone (same run; targets: REST x1 >= 0.7x the handler; "
          "p99 < 2x p50 at the most clients); bare: a fixed reply's round trip with this client, and REST x1 "
          "against the handler's time plus that round trip:")
    print("| model | handler req/s | REST x1 req/s | REST / handler | bare x1 req/s | REST / (handler + bare) "
          "| transport | clients | p50 ms | p99 ms | p99 / p50 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    bare1 = next((r for r in results if r.server == "bare" and r.clients == 1), None)
    for model in dict.fromkeys(r.model for r in results if r.server != "bare"):
        mine = {(r.transport, r.clients): r for r in results if r.model == model and r.server == "ours"}
        h, r1 = mine.get(("handler", 1)), mine.get(("rest", 1))
        share = r1.rps / h.rps if h and r1 and h.rps and r1.rps else None
        floor = (1 / (1 / h.rps + 1 / bare1.rps) if h and h.rps and bare1 is not None and bare1.rps else None)
        over_floor = r1.rps / floor if floor and r1 and r1.rps else None
        for tr in ("rest", "grpc"):
            r = mine.get((tr, c))
            if r is None:
                continue
            p50, p99 = r.pct(50), r.pct(99)
            spread = p99 / p50 if p50 and p99 is not None else None
            print(f"| {model} | {fmt(h.rps if h else None, '.0f')} | {fmt(r1.rps if r1 else None, '.0f')} | "
                  f"{fmt(share, '.2f')} | {fmt(bare1.rps if bare1 else None, '.0f')} | {fmt(over_floor, '.2f')} | "
                  f"{tr} | {c} | {fmt(p50, '.2f')} | {fmt(p99, '.2f')} | {fmt(spread, '.2f')} |")
    if args.baseline_root:
        print(f"\nper model, our REST against the baseline tree's ({args.baseline_root}), same run:")
        print("| model | clients | baseline req/s | ours req/s | ours / baseline | baseline p50 ms | ours p50 ms |")
        print("|---|---|---|---|---|---|---|")
        rest = {(r.model, r.server, r.clients): r for r in results if r.transport == "rest"}
        for model in dict.fromkeys(r.model for r in results):
            for k in (1, c):
                b, o = rest.get((model, "baseline", k)), rest.get((model, "ours", k))
                if b is None or o is None:
                    continue
                ratio = o.rps / b.rps if o.rps and b.rps else None
                print(f"| {model} | {k} | {fmt(b.rps, '.0f')} | {fmt(o.rps, '.0f')} | {fmt(ratio, '.2f')}"
                      f"{'x' if ratio else ''} | {fmt(b.pct(50), '.2f')} | {fmt(o.pct(50), '.2f')} |")
    load1 = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} CPUs, load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; "
          f"at end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")


if __name__ == "__main__":
    main()
