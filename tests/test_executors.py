"""The executor seam: the runner hands stages to an executor and hears back typed events; the local
lanes and the in-process executor run the same stages to the same results, a dead worker is a clear
failure, and the same spec gives the same keys and verdicts on either."""
import json
import os
from pathlib import Path

import pytest

from pipeline import executors, runner, spec as spec_mod
from pipeline.cache import Cache
from pipeline.executors.base import Executor
from pipeline.executors.inprocess import InProcess
from pipeline.runner import Stage, StageFailed, execute
from pipeline.spec import SpecError

from .conftest import run_cli

ME = f"{__name__}"


def write_number(ctx, n: int) -> dict:
    """A stage body with no framework: its input's number plus n, and the process it ran in."""
    base = sum(json.loads((ctx.input_dir(name) / "n.json").read_text()) for name in ctx.inputs)
    ctx.progress(1, 2, "half")
    ctx.log(f"adding {n}")
    (ctx.out / "n.json").write_text(json.dumps(base + n))
    return {"n": base + n, "pid": os.getpid(), "summary": f"= {base + n}"}


def fail(ctx) -> dict:
    raise ValueError("this stage always fails")


def die(ctx) -> dict:
    os._exit(3)  # the worker process goes without a word


def graph(second: str = "write_number", lane: str | None = "plain") -> list[Stage]:
    code = ("tests/test_executors.py",)
    return [Stage("a", "one", {"n": 1}, code, f"{ME}:write_number", {"n": 1}, lane=lane),
            Stage("b", "two", {"n": 2}, code, f"{ME}:{second}", {"n": 2} if second == "write_number" else {},
                  inputs=("a",), lane=lane),
            Stage("c", "three", {"n": 3}, code, f"{ME}:write_number", {"n": 3}, inputs=("b",), lane=lane),
            Stage("d", "four", {"n": 4}, code, f"{ME}:write_number", {"n": 4}, lane=lane)]


@pytest.mark.parametrize("name", ["local", "inprocess"])
def test_each_executor_runs_the_graph_to_the_same_results(tmp_path, name, capsys):
    results = {r.name: r for r in execute(graph(), Cache(tmp_path / "cache"), set(), executor=name,
                                          log_dir=tmp_path / "logs")}
    assert {n: r.facts["n"] for n, r in results.items()} == {"a": 1, "b": 3, "c": 6, "d": 4}
    pids = {r.facts["pid"] for r in results.values()}
    # the local executor runs a lane's stages in a worker of its own, the in-process one right here
    assert (pids == {os.getpid()}) == (name == "inprocess") and len(pids) == 1
    shown = capsys.readouterr().out
    assert "adding 2" in shown and "= 6" in shown  # log lines and summaries reach the display either way
    again = execute(graph(), Cache(tmp_path / "cache"), set(), executor=name, log_dir=tmp_path / "logs")
    assert all(r.cached for r in again)


@pytest.mark.parametrize("name", ["local", "inprocess"])
def test_a_failed_stage_blocks_what_needs_it_and_nothing_else(tmp_path, name):
    with pytest.raises(StageFailed) as e:
        execute(graph("fail"), Cache(tmp_path / "cache"), set(), executor=name, log_dir=tmp_path / "logs")
    results = {r.name: r for r in e.value.results}
    assert "this stage always fails" in results["b"].error
    assert "c" not in results and results["d"].facts["n"] == 4 and results["a"].facts["n"] == 1
    assert not list((tmp_path / "cache" / "two").glob("*/*")), "a failed stage left an entry"


def test_a_worker_that_dies_fails_its_stage_naming_the_lane_and_its_log(tmp_path):
    with pytest.raises(StageFailed) as e:
        execute(graph("die"), Cache(tmp_path / "cache"), set(), executor="local", log_dir=tmp_path / "logs")
    b = next(r for r in e.value.results if r.name == "b")
    assert "the plain worker process died (exit code 3)" in b.error and str(tmp_path / "logs") in b.error
    assert b.ran_in.startswith("lane plain pid ")


def test_an_executor_is_one_class_the_runner_takes(tmp_path):
    """What a new executor (Ray, Dask) has to be: an Executor subclass; the runner asks nothing else."""
    submitted = []

    class Recording(InProcess):
        def submit(self, stage, force):
            submitted.append(stage.name)
            super().submit(stage, force)

    results = execute(graph(), Cache(tmp_path / "cache"), set(), executor=Recording, log_dir=tmp_path / "logs")
    assert sorted(submitted) == ["a", "b", "c", "d"] and len(results) == 4
    # stages without a lane run in the runner's process and are never submitted
    submitted.clear()
    execute(graph(lane=None), Cache(tmp_path / "other"), set(), executor=Recording, log_dir=tmp_path / "logs")
    assert submitted == []


def test_an_event_of_no_known_kind_is_refused(tmp_path):
    class Garbled(InProcess):
        def next_event(self, in_flight):
            return ("line", "a", "an untyped tuple")

    with pytest.raises(TypeError, match="expected one of the events"):
        execute(graph(), Cache(tmp_path / "cache"), set(), executor=Garbled, log_dir=tmp_path / "logs")


def test_executors_are_found_by_name_and_an_unknown_one_is_a_usage_error(tmp_path):
    assert {"local", "inprocess"} <= set(executors.names())
    assert issubclass(executors.executor_class("local"), Executor)
    with pytest.raises(ValueError, match="unknown executor 'dask': expected one of inprocess, local, ray"):
        executors.executor_class("dask")
    r = run_cli("run", "toy", "--executor", "dask", "--no-track", home=tmp_path)
    assert r.returncode == 2 and "--executor dask: expected one of inprocess, local, ray" in r.stderr, r.stderr
    assert not (tmp_path / ".pipeline" / "cache").exists()  # refused before anything ran


@pytest.mark.e2e
def test_the_same_spec_on_the_in_process_executor_gives_the_local_run_s_keys_and_verdicts(toy_run, tmp_path):
    local_home, _ = toy_run
    r = run_cli("run", "toy", "--executor", "inprocess", "--no-track", home=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # the shared home's first record is its cold run; later tests rerun toy there, fully cached
    local, here = (json.loads(sorted((h / ".pipeline" / "runs").glob("*.json"))[0].read_text())
                   for h in (local_home, tmp_path))
    assert local["executor"] == "local" and here["executor"] == "inprocess"
    assert {s["name"]: s["key"] for s in here["stages"]} == {s["name"]: s["key"] for s in local["stages"]}
    facts = lambda rec: {s["name"]: (s["error"], s["facts"].get("failed")) for s in rec["stages"]}
    assert facts(here) == facts(local)
    assert len({s["ran_in"] for s in here["stages"]}) == 1  # every stage in the one process
    ran = {s["ran_in"] for s in local["stages"] if not s["cached"]}
    assert len(ran) >= 3  # the parent and one worker per lane


def test_allow_unsupported_is_part_of_the_verify_key_of_the_cells_it_names(tmp_path):
    from pipeline.stages import build_stages
    base = spec_mod.load("toy")
    text = Path(base.path).read_text()
    keys = []
    for extra in ("", '\nallow_unsupported = ["keras/litert-int8"]\n'):
        path = tmp_path / f"toy{len(keys)}.toml"
        path.write_text(text.replace("\n[parity]\n", "\n[parity]" + extra) if extra else text)
        assert not extra or "allow_unsupported" in path.read_text()
        stages = build_stages(spec_mod.load(str(path)))
        runner.assign_keys(stages)
        keys.append({s.name: s.key for s in stages if s.kind == "verify"})
    changed = {n for n in keys[0] if keys[0][n] != keys[1][n]}
    assert changed == {"verify:keras:litert"}, changed


def test_a_spec_may_name_its_executor_and_an_unknown_one_is_refused(tmp_path):
    text = Path(spec_mod.load("toy").path).read_text()
    for name in ("inprocess", "dask"):
        path = tmp_path / f"toy-{name}.toml"
        path.write_text(text.replace("[pipeline]\n", f'[pipeline]\nexecutor = "{name}"\n', 1))
        if name == "dask":
            with pytest.raises(SpecError, match="pipeline.executor.*one of inprocess, local, ray"):
                spec_mod.load(str(path))
        else:
            assert spec_mod.load(str(path)).executor == "inprocess"
    assert spec_mod.load("toy").executor is None
