"""Kubeflow Pipelines: `compile SPEC --to kfp` writes a pipeline the kfp SDK (in its own tool
environment) loads back with one component per stage and the stage graph's edges; its tasks' commands,
run here in graph order against an S3 store on loopback (`run-compiled`), reproduce a local run's keys
and verdicts; a second machine's run of the same YAML finds every stage in the store."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from pipeline import kubeflow

from .conftest import run_cli

# the toy's PyTorch side alone, to two formats: every kind of stage, in ten processes
SPEC = """
[pipeline]
name = "toy-kfp"
seed = 0

[data]
source = "linear"
task = "regression"
n_samples = 200
slope = 3.0
intercept = 2.0
noise = 0.1

[train]
lr = 0.1
epochs = 200
batch_size = "full"
loss = "mse"

[accept]
slope = { target = 3.0, tolerance = 0.05 }
intercept = { target = 2.0, tolerance = 0.05 }

[[model]]
name = "torch"
framework = "torch"
factory = "pipeline.zoo:linear_torch"
train = { optimizer = "sgd" }

[export]
formats = ["torchscript", "onnx"]

[parity]
random_rows = 64
input_range = [-2.0, 2.0]
max_batch = 16
"""


def kfp_sdk(code: str) -> str:
    """Run `code` in the kfp SDK's tool environment; its stdout."""
    r = subprocess.run([str(kubeflow.kfp_python()), "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "toy-kfp.toml"
    path.write_text(SPEC)
    return path


def entries(home: Path) -> dict[str, dict]:
    """Every committed entry of a home's cache, by stage name: its key and facts."""
    found = {}
    for meta in (home / ".pipeline" / "cache").glob("*/*/stage.json"):
        m = json.loads(meta.read_text())
        found[m["name"]] = {"key": m["key"], "facts": m["facts"]}
    return found


@pytest.mark.e2e
def test_the_compiled_pipeline_loads_in_kfp_and_its_tasks_reproduce_the_local_run(spec_file, tmp_path, store_uri):
    out = tmp_path / "toy-kfp.yaml"
    r = run_cli("compile", str(spec_file), "--to", "kfp", str(out), "--store", store_uri, home=tmp_path)
    assert r.returncode == 0, r.stderr
    the_plan = kubeflow.plan(str(spec_file), store=store_uri)
    # the kfp SDK reads it back: one task per stage, each after exactly the stages it needs
    loaded = json.loads(kfp_sdk(f"""
import json
from kfp import components
c = components.load_component_from_file({str(out)!r})
tasks = c.pipeline_spec.root.dag.tasks
print(json.dumps({{t.task_info.name: sorted(tasks[d].task_info.name for d in t.dependent_tasks)
                   for t in tasks.values()}}))"""))
    assert loaded == {s["name"]: sorted(s["inputs"]) for s in the_plan["stages"]}

    # the tasks' own commands, run here in graph order against the store
    machine_a = tmp_path / "a"
    machine_a.mkdir()
    r = run_cli("run-compiled", str(out), home=machine_a, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"{len(the_plan['stages'])} tasks ran" in r.stdout

    # the same spec run locally, without a store: the same keys, the same verdicts
    local = tmp_path / "local"
    local.mkdir()
    r = run_cli("run", str(spec_file), "--no-track", home=local)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    record = json.loads(next((local / ".pipeline" / "runs").glob("*.json")).read_text())
    on_kfp = entries(machine_a)
    assert {n: e["key"] for n, e in on_kfp.items()} == {s["name"]: s["key"] for s in record["stages"]}
    report = next(s for s in record["stages"] if s["name"] == "report")
    assert on_kfp["report"]["facts"]["passed"] is True
    assert (on_kfp["report"]["facts"]["passed"], on_kfp["report"]["facts"]["failures"]) == \
        (report["facts"]["passed"], report["facts"]["failures"])

    # a second machine running the same YAML finds every stage in the store
    machine_b = tmp_path / "b"
    machine_b.mkdir()
    r = run_cli("run-compiled", str(out), home=machine_b, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("cached   (key") == len(the_plan["stages"]), r.stdout[-4000:]


def test_a_stage_whose_input_is_nowhere_is_refused_naming_it(spec_file, tmp_path, store_uri):
    r = run_cli("stage", str(spec_file), "train:torch", home=tmp_path, env={"PIPELINE_STORE": store_uri})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "stage train:torch: expected its input data (key" in r.stderr and f"in the store {store_uri}" in r.stderr
    r = run_cli("stage", str(spec_file), "train:nope", home=tmp_path)
    assert r.returncode == 2 and "expected one of the spec's stages: data, parity_set, train:torch" in r.stderr


def test_compile_refuses_without_a_store_or_without_the_kfp_environment(spec_file, tmp_path):
    assert "PIPELINE_STORE" not in os.environ
    r = run_cli("compile", str(spec_file), "--to", "kfp", str(tmp_path / "x.yaml"), home=tmp_path)
    assert r.returncode == 2 and "expected a shared store every task reaches" in r.stderr, r.stderr
    r = run_cli("compile", str(spec_file), "--to", "kfp", str(tmp_path / "x.yaml"), "--store", "s3://b/p",
                home=tmp_path, env={"PIPELINE_KFP_PYTHON": str(tmp_path / "no-python")})
    assert r.returncode == 2 and "expected the kfp SDK's tool environment" in r.stderr, r.stderr
    assert "scripts/setup.sh --kfp" in r.stderr and not (tmp_path / "x.yaml").exists()


def test_a_failing_task_stops_the_compiled_run_and_is_named(tmp_path):
    yaml_text = """
components:
  comp-a: {executorLabel: exec-a}
  comp-b: {executorLabel: exec-b}
deploymentSpec:
  executors:
    exec-a: {container: {image: x, command: [python, -c, "import sys; sys.exit(3)"]}}
    exec-b: {container: {image: x, command: [python, -c, "open('ran-b', 'w')"]}}
root:
  dag:
    tasks:
      b: {componentRef: {name: comp-b}, dependentTasks: [a], taskInfo: {name: b}}
      a: {componentRef: {name: comp-a}, taskInfo: {name: a}}
"""
    (tmp_path / "p.yaml").write_text(yaml_text)
    assert [t["task"] for t in kubeflow.tasks_in_order(tmp_path / "p.yaml")] == ["a", "b"]
    r = run_cli("run-compiled", str(tmp_path / "p.yaml"), home=tmp_path)
    assert r.returncode == 1 and "task a (stage a) exited 3" in r.stderr, r.stderr
    assert not (tmp_path / "ran-b").exists()
