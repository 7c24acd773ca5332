"""The Ray executor: each lane becomes a pool of Ray actors, placed over the cluster's nodes by Ray's
own scheduler (SPREAD), each a process that imports its framework once, when it starts, and then runs
that lane's stages one at a time as their inputs complete, keeping the trained model in memory from
train to reference as a local lane does.

Why actors and not a task per stage: Ray pools task workers per runtime environment and stops idle
ones within a second, so with two lanes on a small node a task worker was started again and again,
each time importing TensorFlow or torch inside its stage (benchmarks/bench_executors.py measured the
TensorFlow lane's stages at 10x their time on the local executor). An actor keeps its process.

How many: per lane, as many actors as the cluster has nodes (one process per lane per machine, as
the local executor has), each asking for its share of the cluster's CPUs so that every lane's actors
fit at once. The driver hands a stage to an idle actor of its lane, or holds it until one is free:
Ray places the actors and runs their calls; nothing here picks a node.

Stage outputs travel through the store when PIPELINE_STORE names one: each node then keeps a working
copy of its own (PIPELINE_NODE_CACHE), pulls the inputs it lacks and pushes what it makes, and no
output passes through the driver's disk unless a stage of the driver's reads it (the report).
Without a store, the driver's cache folder must be reachable by every node at the same path. The
driver receives only results (plain data) and events, which come back live through a Ray queue. The cluster: RAY_ADDRESS (or `run --executor ray --address ADDR`) names an
existing one; with none, a cluster of this machine is started for the run and stopped after it.
An actor whose process or node dies is restarted by Ray (elsewhere if need be) and its stage run
once more; the stage never commits a partial entry (run_stage writes under a temporary name and
commits only a complete one). A stage lost twice fails, naming itself and what Ray said.
"""
from __future__ import annotations

import os
from collections import deque
from pathlib import Path

from .. import lanes
from ..cache import PACKAGE_ROOT
from ..stage_run import Stage, StageResult
from .base import Event, Executor, Result

RETRIES = 1  # a stage whose actor died runs once more, on the restarted actor
RESTARTS = 4  # how often Ray restarts a lane's actor before giving it up
# what a stage may read from its environment (its home, the store, MLflow, fault switches), handed on
# from the driver: a Ray worker inherits the environment of whoever started its node, not ours
PASSED_ON = ("PIPELINE_", "T2E_", "MLFLOW_", "AWS_", "TF_ENABLE_ONEDNN_OPTS")


def _stage_environment(lane: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ON)}
    env["PIPELINE_HOME"] = str(Path(os.environ.get("PIPELINE_HOME", ".")).resolve())
    return {**env, **lanes.environment(lane), "PIPELINE_LANE": lane, "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": str(PACKAGE_ROOT)}


def node_cache(node_id: str) -> Path:
    """A node's own working copy of the store: PIPELINE_NODE_CACHE, else the system's temporary
    folder, then the node's id (two nodes on one machine keep apart, as two machines would)."""
    import tempfile
    base = Path(os.environ.get("PIPELINE_NODE_CACHE") or Path(tempfile.gettempdir()) / "train-to-edge-nodes")
    return base / node_id[:12] / "cache"


class LaneWorker:
    """One lane's process on some node: imports the lane's framework once, then runs stages on request."""

    def __init__(self, lane: str, cache_root: str, events):
        import ray
        from ..cache import Cache
        from .base import EventRelay
        lanes.enter(lane)
        node = ray.get_runtime_context().get_node_id()
        store = os.environ.get("PIPELINE_STORE")
        # with a store, a node keeps a working copy of its own and every output travels through the
        # store; without one, the driver's cache folder must be shared by every node
        self.cache = Cache(node_cache(node), store=store) if store else Cache(Path(cache_root))
        self.memo: dict = {}  # a trained model, handed from train to reference, as in a local lane
        self.events = events
        self.relay = EventRelay(lambda event: events.put(event))
        self.where = f"ray node {node[:12]} ({ray.util.get_node_ip_address()}) pid {os.getpid()}"

    def run(self, stage: Stage, force: bool) -> StageResult:
        from ..stage_run import StageFailed, run_stage
        from .base import Note
        try:
            result = run_stage(stage, self.cache, self.memo, force, self.relay)
        except StageFailed as e:
            result = e.result
        for line in self.cache.changed:
            self.events.put(Note(line))
        self.cache.changed.clear()
        result.ran_in = self.where
        return result


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, lanes, cache_root, log_dir, on_event=None):
        super().__init__(lanes, cache_root, log_dir, on_event)
        self.address = os.environ.get("RAY_ADDRESS") or None
        if not self.address:  # a cluster of this machine alone: every Ray listener on 127.0.0.1
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:
            import ray
            from ray.util.queue import Queue
        except ImportError as e:
            raise RuntimeError(f"the ray executor needs Ray: {e}; scripts/setup.sh installs it") from e
        self.ray = ray
        self.started_here = not ray.is_initialized()
        if self.started_here:
            # "local": a new cluster for this run, never one a `ray start` left running on this machine
            ray.init(address=self.address or "local", log_to_driver=False, include_dashboard=False,
                     configure_logging=False, **({} if self.address else {"num_cpus": os.cpu_count() or 1}))
        self.events = Queue(actor_options={"num_cpus": 0})
        self.idle: dict[str, deque] = {}      # lane -> its actors with nothing to do
        self.waiting: dict[str, deque] = {}   # lane -> stages (and force) waiting for one of them
        self.futures: dict = {}               # ObjectRef -> (stage, the actor running it)
        self.backlog: deque[Event] = deque()
        self.actors = []
        self._start_actors()

    def _start_actors(self) -> None:
        nodes = max(1, sum(1 for n in self.ray.nodes() if n.get("Alive")))
        cpus = float(self.ray.cluster_resources().get("CPU", 1.0))
        share = min(1.0, cpus / (nodes * len(self.lanes)))  # every lane's actors fit at once
        worker = self.ray.remote(LaneWorker)
        for lane in sorted(self.lanes):
            pool = [worker.options(num_cpus=share, scheduling_strategy="SPREAD", max_restarts=RESTARTS,
                                   max_task_retries=RETRIES, runtime_env={"env_vars": _stage_environment(lane)})
                    .remote(lane, str(self.cache_root.resolve()), self.events) for _ in range(nodes)]
            self.actors += pool
            self.idle[lane] = deque(pool)
            self.waiting[lane] = deque()

    def submit(self, stage: Stage, force: bool) -> None:
        self.waiting[stage.lane].append((stage, force))
        self._dispatch(stage.lane)

    def _dispatch(self, lane: str) -> None:
        while self.idle[lane] and self.waiting[lane]:
            actor = self.idle[lane].popleft()
            stage, force = self.waiting[lane].popleft()
            self.futures[actor.run.remote(stage, force)] = (stage, actor)

    def next_event(self, in_flight: dict[str, Stage]) -> Event:
        while not self.backlog:
            if self._drain():
                continue
            done, _ = self.ray.wait(list(self.futures), num_returns=1, timeout=0.1)
            if done:
                stage, actor = self.futures.pop(done[0])
                self._drain()  # a call's puts finish before it returns: its last lines come before its result
                self.backlog.append(self._result(done[0], stage))
                self.idle[stage.lane].append(actor)
                self._dispatch(stage.lane)
        return self.backlog.popleft()

    def _drain(self) -> bool:
        from ray.util.queue import Empty
        got = False
        while True:
            try:
                self.backlog.append(self.events.get_nowait())
                got = True
            except Empty:
                return got

    def _result(self, ref, stage: Stage) -> Result:
        try:
            return Result(self.ray.get(ref))
        except Exception as e:  # the actor or its node died twice, or Ray could not run the call
            return Result(StageResult(stage.name, stage.kind, stage.key, stage.lane, False, 0.0,
                                      error=f"stage {stage.name} was lost on Ray after {RETRIES + 1} tries: "
                                            f"{type(e).__name__}: {str(e)[:600]}",
                                      ran_in=f"ray ({self.address or 'a local cluster'})"))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        if self.started_here:
            self.ray.shutdown()


EXECUTOR = RayExecutor
