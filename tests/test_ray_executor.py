"""The Ray executor on a real two-node Ray cluster the tests start: a head and a second node
(`ray start --head`, `ray start --address`) in a network namespace of their own whose only interface
is loopback, so every Ray listener and all of Ray's traffic stay on 127.0.0.1 there. The drivers (a
small graph, `python -m pipeline run toy`) run in the same namespace. Without an address the executor
starts a one-machine cluster of its own, on this machine's loopback, and stops it after the run."""
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.cache import Cache
from pipeline.runner import Stage

from . import netns
from .conftest import ROOT, copy_home, run_cli
from .test_executors import write_number

ME = __name__
RAY = str(Path(sys.executable).parent / "ray")
PORT = 6379  # the namespace is new: nothing else listens there


def die_once(ctx, n: int, marker: str) -> dict:
    """Kill the worker the first time (after the stage has begun writing), succeed when retried."""
    if not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        (ctx.out / "half-written.json").write_text("{")
        os._exit(3)
    return write_number(ctx, n)


def die(ctx) -> dict:
    os._exit(3)


def slow_number(ctx, n: int) -> dict:
    """A stage that holds its node's one CPU for a second: the others must go to the other node."""
    time.sleep(1.0)
    return write_number(ctx, n)


def graph_of(second: str, marker: str = "") -> list[Stage]:
    """a -> b -> c, and d, e, f, g on their own, each holding a CPU for a second: more than one node
    of one CPU can run at once."""
    code = ("tests/test_executors.py", "tests/test_ray_executor.py")
    add = "tests.test_executors:write_number"
    b_fn, b_args = {"write_number": (add, {"n": 2}), "die_once": (f"{ME}:die_once", {"n": 2, "marker": marker}),
                    "die": (f"{ME}:die", {})}[second]
    return [Stage("a", "one", {"n": 1}, code, add, {"n": 1}, lane="plain"),
            Stage("b", "two", {"n": 2, "second": second}, code, b_fn, b_args, inputs=("a",), lane="plain"),
            Stage("c", "three", {"n": 3}, code, add, {"n": 3}, inputs=("b",), lane="plain"),
            *(Stage(name, f"alone-{name}", {"n": n}, code, f"{ME}:slow_number", {"n": n}, lane="plain")
              for name, n in (("d", 4), ("e", 5), ("f", 6), ("g", 7)))]


DRIVER = f"""
import json, os, sys
from pathlib import Path
from pipeline.cache import Cache
from pipeline.runner import StageFailed, execute
from {ME} import graph_of
cache = Path(sys.argv[1])
try:
    results = execute(graph_of(*sys.argv[2:]), Cache(cache, store=os.environ.get("PIPELINE_STORE")), set(),
                      executor="ray", log_dir=cache.parent / "logs")
except StageFailed as e:
    results = e.results
print(json.dumps({{r.name: {{"n": r.facts.get("n"), "ran_in": r.ran_in, "error": r.error, "cached": r.cached}}
                  for r in results}}))
"""


@dataclass
class RayCluster:
    namespace: str
    address: str
    env: dict  # what a client of this cluster needs: its token

    @property
    def within(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace)

    def drive(self, *args: str, timeout: float = 300, env: dict | None = None) -> dict:
        env = {**os.environ, **self.env, **(env or {}), "PYTHONPATH": str(ROOT), "RAY_ADDRESS": self.address}
        r = subprocess.run([*self.within, sys.executable, "-c", DRIVER, *args], env=env, capture_output=True,
                           text=True, timeout=timeout)
        assert r.returncode == 0, r.stdout + r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])


def _nodes_alive(within: tuple[str, ...], address: str, env: dict) -> int:
    r = subprocess.run([*within, RAY, "status", f"--address={address}"], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=60)
    if r.returncode != 0:
        return 0
    active = r.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


@pytest.fixture(scope="module")
def ray_cluster():
    if not netns.can_make_namespaces():
        pytest.skip(netns.why_not())
    name = f"t2e-ray-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
    within = ("ip", "netns", "exec", name)
    subprocess.run([*within, "ip", "link", "set", "lo", "up"], check=True, timeout=20)
    temp = tempfile.mkdtemp(prefix="t2e-ray-")  # short: Ray's socket paths live under it
    # token authentication, with a token of the cluster's own: every node and client must present it
    token = Path(temp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    address = f"127.0.0.1:{PORT}"
    # one CPU a node: two stages at once on this machine's two cores, one on each node
    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    nodes: list[subprocess.Popen] = []
    try:
        for args in (["--head", f"--port={PORT}", "--include-dashboard=false", f"--temp-dir={temp}"],
                     [f"--address={address}"]):
            log = open(Path(temp) / f"start-{len(nodes)}.log", "w")
            nodes.append(subprocess.Popen([*within, RAY, "start", *args, *common], stdout=log,
                                          stderr=subprocess.STDOUT, env={**os.environ, **env},
                                          start_new_session=True))
            deadline = time.monotonic() + 90
            while _nodes_alive(within, address, env) < len(nodes):
                assert time.monotonic() < deadline, Path(log.name).read_text()[-3000:]
                assert nodes[-1].poll() is None, Path(log.name).read_text()[-3000:]
                time.sleep(1)
        yield RayCluster(name, address, env)
    finally:
        for p in nodes:  # each `ray start` leads a process group: its node's daemons and workers
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
        left = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in left:  # a worker that left its group: nothing of the cluster outlives the tests
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", name], timeout=20)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def store_in_namespace(ray_cluster, tmp_path_factory):
    """moto's S3 server inside the cluster's namespace (its loopback is the cluster's), with a bucket:
    the environment a driver and the nodes' stages reach it with."""
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:5555", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    server = subprocess.Popen([*ray_cluster.within, sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", "5555"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([*ray_cluster.within, sys.executable, "-c",
                              "import boto3; boto3.client('s3').create_bucket(Bucket='shared')"],
                             env={**os.environ, **env}, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and server.poll() is None, Path(log.name).read_text()[-2000:]
            time.sleep(0.5)
        yield env
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def test_with_a_store_each_node_keeps_its_own_copy_and_outputs_travel_through_the_store(
        ray_cluster, store_in_namespace, tmp_path):
    nodes = tmp_path / "nodes"
    got = ray_cluster.drive(str(tmp_path / "cache"), "write_number",
                            env={**store_in_namespace, "PIPELINE_STORE": "s3://shared/run",
                                 "PIPELINE_NODE_CACHE": str(nodes)})
    assert {n: r["n"] for n, r in got.items()} == {"a": 1, "b": 3, "c": 6, "d": 4, "e": 5, "f": 6, "g": 7}
    ran_on = {_node_of(r["ran_in"]) for r in got.values()}
    assert len(ran_on) == 2
    # each node's working copy holds what it made, and what it pulled from the store to build on
    copies = {p.name: {m.parent.parent.name for m in p.glob("cache/*/*/stage.json")} for p in nodes.iterdir()}
    assert set(copies) == ran_on and set().union(*copies.values()) == {
        "one", "two", "three", "alone-d", "alone-e", "alone-f", "alone-g"}
    assert not list((tmp_path / "cache").glob("*/*/stage.json")), "an output went through the driver's disk"


def _node_of(ran_in: str) -> str:
    assert ran_in.startswith("ray node "), ran_in
    return ran_in.split()[2]


def test_stages_spread_over_both_nodes_and_give_the_local_results(ray_cluster, tmp_path):
    got = ray_cluster.drive(str(tmp_path / "cache"), "write_number")
    assert {n: r["n"] for n, r in got.items()} == {"a": 1, "b": 3, "c": 6, "d": 4, "e": 5, "f": 6, "g": 7}
    assert not any(r["error"] for r in got.values())
    assert all("(127.0.0.1)" in r["ran_in"] for r in got.values())
    assert len({_node_of(r["ran_in"]) for r in got.values()}) == 2, got  # the second node took work too
    again = ray_cluster.drive(str(tmp_path / "cache"), "write_number")
    assert all(r["cached"] for r in again.values())


def test_a_worker_killed_mid_stage_is_retried_and_its_half_written_output_never_trusted(ray_cluster, tmp_path):
    marker = tmp_path / "died-once"
    got = ray_cluster.drive(str(tmp_path / "cache"), "die_once", str(marker))
    assert marker.exists(), "the stage's first attempt did not run"
    assert got["b"]["error"] is None and got["b"]["n"] == 3 and got["c"]["n"] == 6
    cache = Cache(tmp_path / "cache")
    entries = [p for p in (tmp_path / "cache" / "two").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and not (entries[0] / "half-written.json").exists()
    leftovers = list((tmp_path / "cache" / "two").glob(".tmp-*"))
    assert leftovers and (leftovers[0] / "half-written.json").exists()  # the dead attempt's folder
    assert cache.sweep() == len(leftovers)  # swept, never read


def test_a_stage_whose_worker_dies_every_time_fails_naming_the_stage(ray_cluster, tmp_path):
    got = ray_cluster.drive(str(tmp_path / "cache"), "die")
    assert "stage b" in got["b"]["error"] and "2 tries" in got["b"]["error"], got["b"]
    assert "c" not in got and got["d"]["n"] == 4  # what needs it is blocked, the rest ran
    assert not [p for p in (tmp_path / "cache" / "two").iterdir() if not p.name.startswith(".")]


@pytest.mark.e2e
def test_run_toy_on_the_cluster_gives_the_local_run_s_keys_and_verdicts(toy_run, ray_cluster, tmp_path):
    local_home, _ = toy_run
    home = copy_home(local_home, tmp_path / "home")
    # every verify, bundle and report stage runs again, on the cluster; train and export stay cached
    r = run_cli("run", "toy", "--executor", "ray", "--address", ray_cluster.address, "--from", "verify",
                "--no-track", home=home, env=ray_cluster.env, within=ray_cluster.within)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    records = sorted((home / ".pipeline" / "runs").glob("*.json"))
    local, ray = (json.loads(p.read_text()) for p in (records[0], records[-1]))
    assert ray["executor"] == "ray"
    assert {s["name"]: s["key"] for s in ray["stages"]} == {s["name"]: s["key"] for s in local["stages"]}
    facts = lambda rec: {s["name"]: (s["error"], s["facts"].get("failed")) for s in rec["stages"]}
    assert facts(ray) == facts(local)
    on_ray = [s for s in ray["stages"] if not s["cached"] and s.get("lane")]
    assert on_ray and all(s["ran_in"].startswith("ray node ") for s in on_ray)
    assert len({_node_of(s["ran_in"]) for s in on_ray}) == 2, [s["ran_in"] for s in on_ray]


def test_without_an_address_a_cluster_of_this_machine_is_started_and_stopped(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "cache"), "write_number"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["c"]["n"] == 6 and all("(127.0.0.1)" in v["ran_in"] for v in got.values())
    daemons = subprocess.run(["pgrep", "-af", "gcs_server|raylet"], capture_output=True, text=True).stdout
    left = [line for line in daemons.splitlines() if "t2e-ray-" not in line]  # not the two-node cluster's
    assert not left, f"Ray processes outlived the run: {left}"


def test_an_address_without_the_ray_executor_is_refused(tmp_path):
    r = run_cli("run", "toy", "--address", "127.0.0.1:1", "--no-track", home=tmp_path)
    assert r.returncode == 2 and "--address 127.0.0.1:1 names a Ray cluster" in r.stderr, r.stderr
