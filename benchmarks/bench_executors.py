#!/usr/bin/env python
"""Where the time goes when one spec runs on each executor, and what the Ray cluster and the store cost.

    .venv/bin/python benchmarks/bench_executors.py [--spec toy] [--repeat 1] [--skip-ray-cluster]
                                                   [--store-entries 50] [--big-mb 10] [--timeout 1200]

Prints Markdown tables (with the machine's cores and load above each):

1. a cold `python -m pipeline run SPEC --no-track` in a fresh PIPELINE_HOME on `--executor inprocess`,
   `local`, `ray` (no address: the run starts a one-machine cluster) and `ray --address` (a two-node
   cluster this script starts in a network namespace): wall time, ratio against `local` in the same
   round, the stages' own seconds (from the run record), the longest dependency chain of them, the
   scheduling overhead per stage, and how many processes and nodes ran stages;
2. a fully cached rerun in the same home on each;
3. the cluster's start-up (`ray start --head` to one node alive, to two) and what each executor costs
   around the stages (start, a trivial stage cold and warm, close), `ray.init` included;
4. the shared store's cost per entry (push, pull) against a plain local cache (commit, lookup), through
   pipeline.cache.Cache, against moto's S3 server on 127.0.0.1.

Two cores show no speed-up from a cluster; the tables say where the time goes so one can tell what more
nodes would buy. Every pipeline run happens in a network namespace of its own whose only interface is
loopback (so no Ray listener can be reached from outside, and whatever a run leaves behind is found and
killed); the two-node cluster is started the way tests/test_ray_executor.py starts it, with a token of its
own. Everything started here is stopped (process groups killed, waited for, namespaces deleted) on a
normal exit, an exception, Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RAY = str(Path(sys.executable).parent / "ray")
PORT = 6379  # the cluster's namespace is new: nothing else listens there
EXECUTORS = ("inprocess", "local", "ray", "ray --address")


# --------------------------------------------------------------------------- stopping what we start

class Cleanup:
    """Undo actions, run last-in first-out exactly once, whatever ends the script."""

    def __init__(self):
        self.actions: list[tuple[str, object]] = []

    def add(self, what: str, fn) -> None:
        self.actions.append((what, fn))

    def run(self) -> None:
        while self.actions:
            what, fn = self.actions.pop()
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep tearing down the rest
                print(f"# cleanup: {what} failed: {type(e).__name__}: {e}", file=sys.stderr)


CLEANUP = Cleanup()


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through every `finally`, like Ctrl-C does


def become_subreaper() -> None:
    """Orphans of our children (daemons a run leaves behind) become ours, so they can be waited for."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def reap_orphans() -> None:
    """Wait for every exited descendant that was handed to us (only once no Popen of ours is pending)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def reap(pids: list[int]) -> None:
    """Wait for those of `pids` that became our children (orphans handed to us) and have exited."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not ours: init's to reap


def kill_group(proc: subprocess.Popen) -> None:
    """Kill the process group `proc` leads (it was started with start_new_session) and wait for it."""
    if proc.returncode is None:
        try:  # the leader still exists (running or not yet reaped), so its group id is still ours
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)


def run_in_group(cmd: list[str], *, env: dict, cwd: Path, log: Path, timeout: float) -> tuple[int | str, float]:
    """Run `cmd` as the leader of a new process group, output to `log`; (exit code or 'timeout', wall s).
    Whatever the group still holds once the leader exits (a stray worker) is killed before the leader is
    reaped, so the group id cannot have been reused."""
    info = None
    with open(log, "w") as out:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:  # wait for its exit without reaping it (WNOWAIT)
                info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
                if info is not None:
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            wall = time.perf_counter() - t
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=60)
    return (proc.returncode if info is not None else "timeout"), wall


class Namespace:
    """A network namespace whose only interface is loopback (up): nothing in it can be reached from outside."""

    def __init__(self, tag: str):
        self.name = f"t2e-bx-{tag}-{uuid.uuid4().hex[:6]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=20, capture_output=True)
        CLEANUP.add(f"namespace {self.name}", self.destroy)
        subprocess.run([*self.within, "ip", "link", "set", "lo", "up"], check=True, timeout=20, capture_output=True)
        self.alive = True

    @property
    def within(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def pids(self) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, timeout=20)
        return [int(p) for p in r.stdout.split() if p.isdigit()]

    def kill_all(self) -> int:
        """Kill whatever still runs in the namespace; how many there were."""
        left = [p for p in self.pids() if p != os.getpid()]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 20
        killed = len(left)
        while left and time.monotonic() < deadline:  # they are ours (subreaper) or init's: wait either way
            reap(left)
            left = [p for p in left if _exists(p)]
            time.sleep(0.05)
        return killed

    def destroy(self) -> None:
        if not getattr(self, "alive", True):
            return
        self.kill_all()
        subprocess.run(["ip", "netns", "del", self.name], timeout=20, capture_output=True)
        self.alive = False


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def fresh_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))  # short: Ray's socket paths live under some of these
    CLEANUP.add(f"folder {d}", lambda: shutil.rmtree(d, ignore_errors=True))
    return d


# --------------------------------------------------------------------------- the two-node cluster

@dataclass
class Cluster:
    ns: Namespace
    address: str
    env: dict  # what a client needs: the cluster's token
    head_started_s: float | None = None   # `ray start --head` until it printed "Ray runtime started"
    one_alive_s: float = 0.0              # `ray start --head` until `ray status` shows one node
    second_started_s: float | None = None # second `ray start` until it printed "Ray runtime started"
    two_alive_s: float = 0.0              # `ray start --head` until `ray status` shows two nodes
    second_join_s: float = 0.0            # second `ray start` until `ray status` shows two nodes
    status_poll_s: list[float] = field(default_factory=list)


def _nodes_alive(within, address: str, env: dict) -> int:
    r = subprocess.run([*within, RAY, "status", f"--address={address}"], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=60)
    if r.returncode != 0:
        return 0
    active = r.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


def _watch_for(log: Path, text: str, t0: float, said: list[float], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            if text in log.read_text(errors="replace"):
                said.append(time.perf_counter() - t0)
                return
        except OSError:
            pass
        time.sleep(0.02)
    if text in log.read_text(errors="replace"):  # said while the last poll ran: this is an upper bound
        said.append(time.perf_counter() - t0)


def start_cluster() -> Cluster:
    """Head and a second node, one CPU each, in a loopback-only namespace, with a token of their own
    (as tests/test_ray_executor.py's fixture does); stopped by CLEANUP."""
    ns = Namespace("ray")
    temp = fresh_dir("t2e-bx-")
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    cluster = Cluster(ns, f"127.0.0.1:{PORT}", env)
    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    for i, args in enumerate((["--head", f"--port={PORT}", "--include-dashboard=false", f"--temp-dir={temp}"],
                              [f"--address={cluster.address}"])):
        log = temp / f"start-{i}.log"
        out = open(log, "w")
        t0 = time.perf_counter()
        proc = subprocess.Popen([*ns.within, RAY, "start", *args, *common], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **env}, start_new_session=True)
        CLEANUP.add(f"ray node {i}", lambda proc=proc, out=out: (kill_group(proc), out.close()))
        if i == 0:
            head_t0 = t0
        said: list[float] = []  # when `ray start` printed that its node runs, read every 20 ms
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_for, args=(log, "Ray runtime started", t0, said, stop), daemon=True)
        watcher.start()
        deadline = time.monotonic() + 120
        while True:
            p0 = time.perf_counter()
            alive = _nodes_alive(ns.within, cluster.address, env)
            cluster.status_poll_s.append(time.perf_counter() - p0)
            if alive >= i + 1:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {i} did not come up: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        now = time.perf_counter()
        stop.set()
        watcher.join()
        started = said[0] if said else None
        if i == 0:
            cluster.head_started_s, cluster.one_alive_s = started, now - head_t0
        else:
            cluster.second_started_s, cluster.two_alive_s, cluster.second_join_s = started, now - head_t0, now - t0
    return cluster


# --------------------------------------------------------------------------- one pipeline run

@dataclass
class Run:
    executor: str
    round: int
    rc: int | str
    wall: float
    cached_rc: int | str = ""
    cached_wall: float = 0.0
    record: dict | None = None
    leftovers: int = 0  # processes still in the run's namespace after it exited (killed by us)


def cli_env(home: Path, extra: dict | None = None) -> dict:
    env = {**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2",
           "TFJS_NODE_MODULES": str(ROOT / "exporters" / "js" / "node_modules"), **(extra or {})}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PIPELINE_STORE"):
        env.pop(name, None)
    return env


def latest_record(home: Path) -> dict | None:
    records = sorted((home / ".pipeline" / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(records[-1].read_text()) if records else None


def run_spec(spec: str, executor: str, rnd: int, cluster: Cluster | None, timeout: float) -> Run:
    """A cold run in a fresh home, then a fully cached rerun in it, in a loopback-only namespace (the
    cluster's, for `ray --address`; a fresh one otherwise, removed after). The home goes after it."""
    home = fresh_dir(f"t2e-bx-{executor.split()[0]}-")
    try:
        return _run_spec(spec, executor, rnd, cluster, timeout, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _run_spec(spec: str, executor: str, rnd: int, cluster: Cluster | None, timeout: float, home: Path) -> Run:
    args = ["run", spec, "--no-track", "--executor", "ray" if executor.startswith("ray") else executor]
    extra: dict = {}
    if executor == "ray --address":
        ns = cluster.ns
        args += ["--address", cluster.address]
        extra = dict(cluster.env)
    else:
        ns = Namespace(executor)
        if executor == "ray":  # the run's own cluster keeps its sessions and sockets in a folder of ours
            extra = {"RAY_TMPDIR": str(fresh_dir("t2e-bx-rt-"))}
    env = cli_env(home, extra)
    cmd = [*ns.within, PY, "-m", "pipeline", *args]
    rc, wall = run_in_group(cmd, env=env, cwd=home, log=home / "cold.log", timeout=timeout)
    leftovers = ns.kill_all() if executor != "ray --address" else 0
    record = latest_record(home)
    for s in (record or {}).get("stages", []):
        s["inputs_"] = stage_inputs(s)  # read now: the home is deleted after the run
    run = Run(executor, rnd, rc, wall, record=record, leftovers=leftovers)
    if rc != 0:
        print(f"# {executor}: cold run exit {rc}; last lines of {home / 'cold.log'}:\n"
              + _tail(home / "cold.log"), file=sys.stderr)
    else:
        run.cached_rc, run.cached_wall = run_in_group(cmd, env=env, cwd=home, log=home / "cached.log",
                                                      timeout=timeout)
        if run.cached_rc != 0:
            print(f"# {executor}: cached rerun exit {run.cached_rc}:\n" + _tail(home / "cached.log"), file=sys.stderr)
    if executor != "ray --address":
        ns.destroy()
    return run


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- reading a run record

def stage_inputs(stage: dict) -> list[str]:
    """The names of a stage's inputs, from its cache entry's stage.json (the run record has none)."""
    try:
        return list(json.loads((Path(stage["path"]) / "stage.json").read_text()).get("inputs", []))
    except (OSError, ValueError, KeyError, TypeError):
        return []


def longest_chain(stages: list[dict]) -> float:
    """The largest sum of elapsed_s along a dependency path (a cached stage counts 0)."""
    by_name = {s["name"]: s for s in stages}
    memo: dict[str, float] = {}

    def chain(name: str, seen: frozenset) -> float:
        if name not in memo:
            s = by_name[name]
            own = 0.0 if s.get("cached") else float(s.get("elapsed_s") or 0.0)
            memo[name] = own + max((chain(u, seen | {name}) for u in s.get("inputs_", [])
                                    if u in by_name and u not in seen), default=0.0)
        return memo[name]

    return max((chain(n, frozenset()) for n in by_name), default=0.0)


def place(ran_in: str) -> tuple[str, str]:
    """(node, process) from `ran_in`: 'HOST pid N' or 'ray node ID (IP) pid N'."""
    parts = (ran_in or "?").split()
    if ran_in.startswith("ray node ") and len(parts) >= 6:
        return parts[2], f"{parts[2]}/{parts[-1]}"
    return parts[0], ran_in


def where_ran(stages: list[dict]) -> tuple[int, int, int]:
    """(processes, nodes) that ran the lane stages that ran, and how many stages without a lane ran
    (those always run in the main process, whatever the executor)."""
    ran = [s for s in stages if not s.get("cached")]
    places = {place(s.get("ran_in") or "") for s in ran if s.get("lane")}
    return len({p for _, p in places}), len({n for n, _ in places}), sum(1 for s in ran if not s.get("lane"))


def by_lane(stages: list[dict]) -> dict[str, tuple[int, int, float, float]]:
    """lane -> (stages run, processes, Σ elapsed_s, the longest stage's elapsed_s)."""
    out: dict[str, list] = {}
    for s in stages:
        if s.get("cached"):
            continue
        lane = s.get("lane") or "(none: main process)"
        row = out.setdefault(lane, [0, set(), 0.0, 0.0])
        row[0] += 1
        row[1].add(place(s.get("ran_in") or "")[1])
        row[2] += float(s.get("elapsed_s") or 0.0)
        row[3] = max(row[3], float(s.get("elapsed_s") or 0.0))
    return {lane: (n, len(procs), total, longest) for lane, (n, procs, total, longest) in sorted(out.items())}


def same_as(record: dict | None, peer: dict | None) -> str:
    if not record or not peer:
        return "-"
    keys = lambda r: {s["name"]: s["key"] for s in r["stages"]}
    verdicts = lambda r: {s["name"]: (bool(s.get("error")), (s.get("facts") or {}).get("failed"))
                          for s in r["stages"]}
    return "yes" if keys(record) == keys(peer) and verdicts(record) == verdicts(peer) else "NO"


# --------------------------------------------------------------------------- what an executor costs

def probe_stage(ctx, i: int) -> dict:
    """A trivial stage (the probe below runs it): one small file, the process it ran in."""
    (ctx.out / "i.json").write_text(json.dumps(i))
    return {"i": i, "pid": os.getpid()}


PROBE = """
import json, os, sys, time
from pathlib import Path
name, cache_root = sys.argv[1], Path(sys.argv[2])
t = time.perf_counter()
from pipeline.executors import Result, executor_class
from pipeline.stage_run import Stage
out = {"import pipeline": time.perf_counter() - t}
if name == "ray":
    t = time.perf_counter()
    import ray
    out["import ray"] = time.perf_counter() - t
cls = executor_class(name)
t = time.perf_counter()
ex = cls({"plain"}, cache_root, cache_root.parent / "logs")
out["start"] = time.perf_counter() - t
def one(i):
    s = Stage(f"probe{i}", "probe", {"i": i}, ("benchmarks/bench_executors.py",),
              "benchmarks.bench_executors:probe_stage", {"i": i}, lane="plain", key=f"probe{i}-{os.getpid()}")
    t = time.perf_counter()
    ex.submit(s, True)
    while True:
        ev = ex.next_event({s.name: s})
        if isinstance(ev, Result):
            return time.perf_counter() - t, ev.result
out["first stage"], r1 = one(1)
out["second stage"], r2 = one(2)
t = time.perf_counter()
ex.close()
out["close"] = time.perf_counter() - t
out["ran_in"] = [r1.ran_in, r2.ran_in]
out["error"] = r1.error or r2.error
print("PROBE " + json.dumps(out))
"""


def probe_executor(executor: str, cluster: Cluster | None, timeout: float) -> dict:
    """Start the executor, hand it a trivial stage twice (a cold worker, then a warm one), close it: each
    timed inside a fresh process, in a loopback-only namespace (the cluster's, for `ray --address`)."""
    work = fresh_dir("t2e-bx-p-")
    extra: dict = {}
    if executor == "ray --address":
        ns, extra = cluster.ns, {**cluster.env, "RAY_ADDRESS": cluster.address}
    else:
        ns = Namespace("probe")
        if executor == "ray":
            extra = {"RAY_TMPDIR": str(fresh_dir("t2e-bx-rt-"))}
    env = cli_env(work, extra)
    if executor == "ray --address":
        env["RAY_ADDRESS"] = cluster.address
    cmd = [*ns.within, PY, "-c", PROBE, executor.split()[0], str(work / "cache")]
    rc, wall = run_in_group(cmd, env=env, cwd=work, log=work / "probe.log", timeout=timeout)
    if executor != "ray --address":
        ns.destroy()
    line = next((ln for ln in (work / "probe.log").read_text(errors="replace").splitlines()
                 if ln.startswith("PROBE ")), None)
    if rc != 0 or line is None:
        print(f"# probe of {executor}: exit {rc}:\n" + _tail(work / "probe.log"), file=sys.stderr)
        return {"error": f"exit {rc}", "process": wall}
    got = json.loads(line[len("PROBE "):])
    got["process"] = wall
    return got


# --------------------------------------------------------------------------- the store

STORE_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
MOTO = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # until our end of the pipe closes
server.stop()
"""


@contextlib.contextmanager
def store_settings(endpoint: str):
    """This process's environment as tests/conftest.py's store_uri fixture sets it; restored after."""
    saved = dict(os.environ)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
        os.environ.pop(name, None)
    os.environ.update(STORE_ENV, AWS_ENDPOINT_URL=endpoint,
                      NO_PROXY=",".join(filter(None, (os.environ.get("NO_PROXY"), "127.0.0.1"))))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_moto() -> str:
    proc = subprocess.Popen([PY, "-c", MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # no request log
    CLEANUP.add("moto server", lambda: kill_group(proc))
    endpoint = proc.stdout.readline().strip()
    if not endpoint.startswith("http://127.0.0.1:"):
        raise RuntimeError(f"moto's server did not start (said {endpoint!r})")
    return endpoint


def bench_store(n_small: int, big_mb: float, rnd: int, endpoint: str) -> list[dict]:
    """ms per entry: local commit vs push, local lookup vs pull into an empty working copy."""
    sys.path.insert(0, str(ROOT))
    from pipeline.cache import Cache
    work = fresh_dir("t2e-bx-s-")
    rows = []
    with store_settings(endpoint):
        import boto3
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        boto3.client("s3").create_bucket(Bucket=bucket)
        uri = f"s3://{bucket}/team"
        for label, count, size in ((f"{n_small} small entries of one {1024} B file", n_small, 1024),
                                   (f"one entry of one {big_mb:g} MB file", 1, int(big_mb * 1e6))):
            tag = f"r{rnd}-{size}"
            entries = [(f"bench-{tag}", f"{tag}-{i:04d}", os.urandom(size)) for i in range(count)]
            local = Cache(work / f"local-{tag}")
            shared_src = Cache(work / f"src-{tag}", store=uri)
            empty = Cache(work / f"pulled-{tag}", store=uri)  # another machine: an empty working copy
            shared_src.store.check()  # each store's S3 client made (and the endpoint reached) before timing
            assert empty.lookup("bench-none", "nothing") is None
            commit_s = push_s = 0.0
            for kind, key, data in entries:
                for cache in (local, shared_src):
                    tmp = cache.begin(kind, key)
                    (tmp / "data.bin").write_bytes(data)
                    meta = {"name": key, "settings": {}, "inputs": [], "facts": {}, "elapsed_s": 0.0}
                    if cache is local:
                        t = time.perf_counter()
                        cache.commit(kind, key, tmp, meta)
                        commit_s += time.perf_counter() - t
                    else:  # the local commit without the store, then the push on its own
                        cache.store, store = None, cache.store
                        cache.commit(kind, key, tmp, meta)
                        cache.store = store
                        t = time.perf_counter()
                        cache.publish(kind, key)
                        push_s += time.perf_counter() - t
            fresh_local = Cache(local.root)  # a new process: every entry's files are hashed again
            t = time.perf_counter()
            assert all(fresh_local.lookup(k, key) is not None for k, key, _ in entries)
            lookup_s = time.perf_counter() - t
            t = time.perf_counter()
            assert all(empty.lookup(k, key) is not None for k, key, _ in entries), "a pull failed"
            pull_s = time.perf_counter() - t
            assert all((empty.entry(k, key).path / "data.bin").read_bytes() == data for k, key, data in entries)
            rows.append({"what": label, "round": rnd, "n": count, "commit": commit_s / count * 1e3,
                         "push": push_s / count * 1e3, "lookup": lookup_s / count * 1e3,
                         "pull": pull_s / count * 1e3})
    return rows


# --------------------------------------------------------------------------- tables

LOADS: dict[str, tuple[float, float, float]] = {}  # section -> load average when its measurements began


def header(title: str, section: str) -> None:
    load = ", ".join(f"{x:.2f}" for x in LOADS.get(section, os.getloadavg()))
    print(f"\n### {title}\n\nmachine: {os.cpu_count()} cores; load average (1/5/15 min) when these measurements "
          f"began: {load}\n")


def fmt(x, spec=".1f") -> str:
    return "-" if x is None or x == "" else (format(x, spec) if isinstance(x, (int, float)) else str(x))


def table_runs(runs: list[Run], spec: str) -> None:
    header(f"1. Cold `run {spec} --no-track` per executor", "runs")
    print("| executor | round | exit | wall s | / local | stages run | Σ stage s | longest chain s | "
          "Σ / wall | overhead ms / stage | lane stages ran in: processes / nodes | no-lane stages (main process) | "
          "keys & verdicts = local's |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        peer = next((p for p in runs if p.executor == "local" and p.round == r.round), None)
        stages = (r.record or {}).get("stages", [])
        ran = [s for s in stages if not s.get("cached")]
        total = sum(float(s.get("elapsed_s") or 0) for s in ran)
        chain = longest_chain(stages) if stages else None
        overhead = (r.wall - chain) / len(ran) * 1e3 if ran and chain is not None else None
        procs, nodes, main = where_ran(stages) if stages else (0, 0, 0)
        ratio = r.wall / peer.wall if peer and peer.rc == 0 and r.rc == 0 else None
        print(f"| {r.executor} | {r.round} | {r.rc} | {r.wall:.1f} | {fmt(ratio, '.2f')} | {len(ran)} | "
              f"{total:.1f} | {fmt(chain)} | {fmt(total / r.wall if r.wall else None, '.2f')} | {fmt(overhead, '.0f')} | "
              f"{procs} / {nodes} | {main} | {same_as(r.record, peer.record if peer else None)} |")
    print("\nwall s: from spawning `python -m pipeline run` to its exit (interpreter start, spec, planning, the "
          "executor's start and close, every stage, the run record; no MLflow), in a fresh PIPELINE_HOME, inside a "
          "loopback-only network namespace. / local: wall over the `local` run's of the same round. stages run, "
          "Σ stage s: the stages not taken from the cache and the sum of their own elapsed_s (the run record in "
          "PIPELINE_HOME/.pipeline/runs/; timed inside run_stage, so a Ray worker's first TensorFlow or torch import "
          "is in its first stage, while the local executor's workers import their framework before any stage). "
          "longest chain s: the largest sum of elapsed_s along a path of inputs (from each entry's stage.json): no "
          "cluster, however wide, finishes sooner. Σ / wall: stage seconds per wall second (1 = one stage at a time "
          "on average). overhead ms / stage = (wall − longest chain) / stages run: all the time not spent on the "
          "critical path's own work (start-up, hand-over, waiting for a free worker on two cores) spread over the "
          "stages. lane stages ran in: the distinct processes and hosts (or Ray nodes) in `ran_in` of the stages that "
          "ran and have a lane; no-lane stages: how many stages without a lane ran (every executor runs them in the "
          "main process). keys & verdicts = "
          "local's: every stage's key, error and failed flag match the local run of the same round.")


def table_lanes(runs: list[Run]) -> None:
    print("\n| executor | round | lane | stages run | processes | Σ stage s | Σ / local's | longest stage s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        peer = next((p for p in runs if p.executor == "local" and p.round == r.round), None)
        theirs = by_lane((peer.record or {}).get("stages", [])) if peer else {}
        for lane, (n, procs, total, longest) in by_lane((r.record or {}).get("stages", [])).items():
            ratio = total / theirs[lane][2] if lane in theirs and theirs[lane][2] else None
            print(f"| {r.executor} | {r.round} | {lane} | {n} | {procs} | {total:.1f} | {fmt(ratio, '.2f')} | "
                  f"{longest:.1f} |")
    print("\nThe same runs by lane (a lane is a worker pool: a process that imported one framework runs only its "
          "lane's stages). processes: distinct `ran_in` processes that ran the lane's stages; with Ray every new "
          "worker process of a lane imports that lane's framework again inside its first stage, so Σ stage s grows "
          "with processes. Σ / local's: the lane's stage seconds over the local run's in the same round.")


def table_cached(runs: list[Run], spec: str) -> None:
    header(f"2. Fully cached rerun of `run {spec} --no-track` (same home, right after the cold run)", "runs")
    print("| executor | round | exit | wall s | / local | / its cold run |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        peer = next((p for p in runs if p.executor == "local" and p.round == r.round), None)
        ratio = r.cached_wall / peer.cached_wall if peer and peer.cached_wall and r.cached_wall else None
        print(f"| {r.executor} | {r.round} | {r.cached_rc} | {fmt(r.cached_wall or None, '.2f')} | "
              f"{fmt(ratio, '.2f')} | {fmt(r.cached_wall / r.wall if r.cached_wall else None, '.3f')} |")
    print("\nwall s: the same command again in the same home and namespace, every stage a cache hit. With no stage "
          "to run the runner builds no executor at all (pipeline/runner.py: no lanes, no workers), so no process is "
          "spawned and no Ray cluster is started or joined: the executors differ only by noise here.")


def table_cluster(cluster: Cluster | None, probes: dict[str, list[dict]], runs: list[Run]) -> None:
    header("3. What the cluster and each executor cost around the stages", "cluster")
    if cluster is not None:
        polls = cluster.status_poll_s
        print("| two-node cluster start-up (loopback-only namespace, 1 CPU a node) | s |")
        print("|---|---|")
        print(f"| `ray start --head` → it prints \"Ray runtime started\" | {fmt(cluster.head_started_s, '.2f')} |")
        print(f"| `ray start --head` → `ray status` shows 1 node alive | {cluster.one_alive_s:.2f} |")
        print(f"| second `ray start --address` → it prints \"Ray runtime started\" | "
              f"{fmt(cluster.second_started_s, '.2f')} |")
        print(f"| second `ray start --address` → `ray status` shows 2 nodes | {cluster.second_join_s:.2f} |")
        print(f"| `ray start --head` → `ray status` shows 2 nodes alive | {cluster.two_alive_s:.2f} |")
        print(f"| one `ray status` poll (median of {len(polls)}) | {statistics.median(polls):.2f} |")
        print("\nThe second node is started as soon as `ray status` shows the head alive, as the test fixture "
              "does. \"alive\" is seen by polling `ray status` (one poll every 0.2 s plus the poll's own time, in "
              "the last row), so those figures may be late by up to one poll; the \"Ray runtime started\" line is "
              "watched for in the `ray start` output every 20 ms. The `ray status` polls run on the same two cores "
              "as the starting node, as they do in the test fixture.\n")
    names = [n for n in EXECUTORS if probes.get(n)]
    if names:
        print("load average (1/5/15 min) when the probes below began: "
              + ", ".join(f"{x:.2f}" for x in LOADS.get("probes", os.getloadavg())) + "\n")
    cols = ("import ray", "start", "first stage", "second stage", "close", "process")
    print("| executor | round | " + " | ".join(f"{c} s" for c in cols) + " | ran in |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    for n in names:
        for i, p in enumerate(probes[n], 1):
            if p.get("error") and "start" not in p:
                print(f"| {n} | {i} | FAILED ({p['error']}) |" + " |" * len(cols))
                continue
            where = [w.replace("ray node ", "node ").replace(" (127.0.0.1)", "") if w.startswith("ray node")
                     else "pid " + w.split(" pid ")[-1] for w in p.get("ran_in", [])]
            print(f"| {n} | {i} | " + " | ".join(fmt(p.get(c), ".2f") for c in cols) + f" | {'; '.join(where)} |")
    print("\nEach row is a fresh `python -c` in a loopback-only namespace that builds the executor as the runner does "
          "(lanes {\"plain\"}), hands it a trivial stage (one small file) and waits for its Result, a second one, then "
          "closes it. import ray: `import ray` alone (done before start, so it is not in start). start: the executor's "
          "constructor: for `ray` that is `ray.init(address=\"local\", num_cpus=cores)` (a new one-machine cluster: "
          "GCS, raylet, object store) plus the event Queue actor; for `ray --address` `ray.init` joining the running "
          "cluster plus the Queue; for `local` spawning the lane's process. first stage: submit to Result with a "
          "worker not yet started (Ray starts one for the lane's runtime environment; the local lane's process is "
          "already spawned but still starting). second stage: the same again, a warm worker if the scheduler picks one: the "
          "per-stage hand-over cost (on the two-node cluster SPREAD may place it on the other node, which then "
          "starts a worker of its own: `ran in` says where each ran). close: `ray.shutdown()` (which for `ray` stops the cluster it started) or joining the lane process. "
          "process: the whole `python -c`, interpreter start and imports included.")
    by = {(r.executor, r.round): r for r in runs}
    lines = []
    sigma = lambda run: sum(float(s.get("elapsed_s") or 0) for s in (run.record or {}).get("stages", [])
                            if not s.get("cached"))
    for (ex, rnd), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        local = by.get(("local", rnd))
        if ex.startswith("ray") and local and r.rc == 0 and local.rc == 0:
            probe = (probes.get(ex) or [{}])[min(rnd, len(probes.get(ex) or [{}])) - 1]
            fixed = sum(probe.get(k) or 0.0 for k in ("import ray", "start", "close"))
            lines.append(f"round {rnd}: `{ex}` − `local` = {r.wall - local.wall:+.1f} s wall, of which the "
                         f"executor's own import + start + close (probe) ≈ {fixed:.1f} s, while its stages took "
                         f"{sigma(r) - sigma(local):+.1f} stage-seconds more (over two cores)")
    if lines:
        print("\nThe same cost as whole runs pay it (table 1): " + "; ".join(lines) + ".")


def table_store(rows: list[dict], endpoint: str) -> None:
    header("4. The shared store's cost per entry (pipeline.cache.Cache, store=s3://...)", "store")
    print("| entries | round | local commit ms | push ms | push / commit | local lookup ms | pull ms | "
          "pull / lookup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['round']} | {r['commit']:.2f} | {r['push']:.2f} | {r['push'] / r['commit']:.1f} | "
              f"{r['lookup']:.2f} | {r['pull']:.2f} | {r['pull'] / r['lookup']:.1f} |")
    print(f"\nms per entry, each entry one file of random bytes plus its stage.json. The store is moto's "
          f"ThreadedMotoServer ({endpoint}, in memory, in a child process so it does not share this process's GIL), "
          "reached with tests/conftest.py's store_uri settings (AWS_ENDPOINT_URL, fake credentials, "
          "AWS_CONFIG_FILE=/dev/null). local commit: Cache.commit without a store (hash the files, write "
          "stage.json, rename into place). push: Cache.publish of that committed entry (a HEAD per file, a PUT per "
          "file not already there, the manifest's PUT). local lookup: Cache.lookup through a new Cache object on "
          "the same folder (so each entry's files are hashed again, as in a new process). pull: Cache.lookup in an "
          "empty working copy with the store (the manifest's GET, a GET per file, re-hashing, rename, the local "
          "check). No network, no TLS: a real store adds its round trips (3 requests to push a one-file entry, 2 to "
          "pull it) and its bandwidth. Each store's S3 client is made before the timing starts.")


# --------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:5]))
    ap.add_argument("--spec", default="toy", help="a built-in spec or a spec's path (default toy)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N", help="rounds of every measurement (default 1)")
    ap.add_argument("--skip-ray-cluster", action="store_true",
                    help="leave out the two-node cluster (its start-up, its run, its probe)")
    ap.add_argument("--store-entries", type=int, default=50, metavar="N", help="small entries pushed and pulled")
    ap.add_argument("--big-mb", type=float, default=10.0, help="size of the one large entry (MB)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds one pipeline run may take")
    args = ap.parse_args()
    if args.repeat < 1 or args.store_entries < 1 or args.big_mb <= 0:
        ap.error("--repeat and --store-entries take a positive count, --big-mb a positive size")
    if Path(args.spec).is_file():  # a spec of one's own: runs happen in other folders
        args.spec = str(Path(args.spec).resolve())
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("this benchmark runs every pipeline in a loopback-only network namespace: it needs root and "
              "iproute2's `ip`", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    become_subreaper()
    t_all = time.perf_counter()
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    print(f"# bench_executors: spec {args.spec}, {args.repeat} round(s); machine: {os.cpu_count()} cores, load "
          f"average {', '.join(f'{x:.2f}' for x in os.getloadavg())}; Python {sys.version.split()[0]}, "
          f"Ray {ray_version}", flush=True)
    executors = [e for e in EXECUTORS if not (e == "ray --address" and args.skip_ray_cluster)]
    runs: list[Run] = []
    probes: dict[str, list[dict]] = {}
    store_rows: list[dict] = []
    cluster = None
    endpoint = ""
    try:
        LOADS["cluster"] = LOADS["runs"] = os.getloadavg()
        if not args.skip_ray_cluster:
            print("# starting the two-node cluster ...", flush=True)
            cluster = start_cluster()
            print(f"# cluster: 2 nodes alive {cluster.two_alive_s:.1f} s after `ray start --head`", flush=True)
        LOADS["runs"] = os.getloadavg()
        for rnd in range(1, args.repeat + 1):
            for ex in executors:
                print(f"# round {rnd}: {ex}: cold run ...", flush=True)
                r = run_spec(args.spec, ex, rnd, cluster, args.timeout)
                runs.append(r)
                print(f"#   exit {r.rc}, {r.wall:.1f} s; cached rerun exit {r.cached_rc}, {r.cached_wall:.2f} s"
                      + (f"; {r.leftovers} process(es) left in its namespace, killed" if r.leftovers else ""),
                      flush=True)
            LOADS.setdefault("probes", os.getloadavg())
            for ex in ("inprocess", "local", "ray", "ray --address"):
                if ex in executors:
                    probes.setdefault(ex, []).append(probe_executor(ex, cluster, 300))
                    print(f"# round {rnd}: probe of {ex}: "
                          + ", ".join(f"{k} {v:.2f} s" for k, v in probes[ex][-1].items() if isinstance(v, float)),
                          flush=True)
        print("# store ...", flush=True)
        LOADS["store"] = os.getloadavg()
        endpoint = start_moto()
        for rnd in range(1, args.repeat + 1):
            store_rows += bench_store(args.store_entries, args.big_mb, rnd, endpoint)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        print("# stopping everything started here ...", flush=True)
        CLEANUP.run()
        reap_orphans()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    table_runs(runs, args.spec)
    table_lanes(runs)
    table_cached(runs, args.spec)
    table_cluster(cluster, probes, runs)
    table_store(store_rows, endpoint)
    print(f"\nthis script took {time.perf_counter() - t_all:.0f} s; load average after: "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if all(r.rc == 0 and r.cached_rc == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
