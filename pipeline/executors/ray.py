"""The Ray executor: each stage that has to run becomes a Ray task, placed by Ray's own scheduler
(spread over the cluster's nodes) as its inputs complete; nothing here schedules.

A lane is a runtime environment of its own (its name in the task's environment variables), so Ray
keeps a separate pool of worker processes per lane: a process that imported TensorFlow runs only
TensorFlow-lane stages, and a worker kept warm imports its framework once. Stage outputs travel
through the cache, which every node must reach at the same path; the driver receives only results
(plain data) and events. Lines and progress come back live through a Ray queue.

The cluster: RAY_ADDRESS (or `run --executor ray --address ADDR`) names an existing one; with none,
a local one is started for the run and stopped after it. A task whose worker or node dies is
retried once by Ray (the stage never commits a partial entry: run_stage writes under a temporary
name and commits only a complete one); a second loss fails the stage, naming it and the node.
"""
from __future__ import annotations

import os
from collections import deque
from pathlib import Path

from ..cache import PACKAGE_ROOT
from ..stage_run import Stage, StageResult
from .base import Event, Executor, Result

RETRIES = 1  # a stage whose worker or node died runs once more, elsewhere if Ray so places it
# what a stage may read from its environment (its home, the store, MLflow, fault switches), handed on
# from the driver: a Ray worker inherits the environment of whoever started its node, not ours
PASSED_ON = ("PIPELINE_", "T2E_", "MLFLOW_", "AWS_", "TF_ENABLE_ONEDNN_OPTS")


def _stage_environment(lane: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ON)}
    env["PIPELINE_HOME"] = str(Path(os.environ.get("PIPELINE_HOME", ".")).resolve())
    # the lane's name keeps each lane in a worker pool of its own (Ray pools workers by environment)
    return {**env, "PIPELINE_LANE": lane, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(PACKAGE_ROOT)}


def _run_on_a_node(stage: Stage, force: bool, cache_root: str, events) -> StageResult:
    """The task's body, in a Ray worker of the stage's lane."""
    import ray
    from ..cache import Cache
    from ..stage_run import StageFailed, run_stage
    from .base import EventRelay, Note
    where = f"ray node {ray.get_runtime_context().get_node_id()[:12]} ({ray.util.get_node_ip_address()}) " \
            f"pid {os.getpid()}"
    cache = Cache(Path(cache_root))
    relay = EventRelay(lambda event: events.put(event))
    try:
        result = run_stage(stage, cache, {}, force, relay)  # a fresh memo: a warm worker outlives runs
    except StageFailed as e:
        result = e.result
    for line in cache.changed:
        events.put(Note(line))
    result.ran_in = where
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
        self.remote = {lane: ray.remote(_run_on_a_node).options(
            num_cpus=1, max_retries=RETRIES, scheduling_strategy="SPREAD",
            runtime_env={"env_vars": _stage_environment(lane)})  # PYTHONPATH: this checkout's code, on every node
            for lane in self.lanes}
        self.futures: dict = {}  # ObjectRef -> the stage it will answer for
        self.backlog: deque[Event] = deque()

    def submit(self, stage: Stage, force: bool) -> None:
        ref = self.remote[stage.lane].remote(stage, force, str(self.cache_root.resolve()), self.events)
        self.futures[ref] = stage

    def next_event(self, in_flight: dict[str, Stage]) -> Event:
        while not self.backlog:
            if self._drain():
                continue
            done, _ = self.ray.wait(list(self.futures), num_returns=1, timeout=0.1)
            if done:
                stage = self.futures.pop(done[0])
                self._drain()  # a task's puts finish before it returns: its last lines come before its result
                self.backlog.append(self._result(done[0], stage))
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
        except Exception as e:  # the worker or its node died (twice), or the task could not be run
            return Result(StageResult(stage.name, stage.kind, stage.key, stage.lane, False, 0.0,
                                      error=f"the Ray task for stage {stage.name} was lost after {RETRIES + 1} "
                                            f"tries: {type(e).__name__}: {str(e)[:600]}",
                                      ran_in=f"ray ({self.address or 'a local cluster'})"))

    def close(self) -> None:
        if self.started_here:
            self.ray.shutdown()


EXECUTOR = RayExecutor
