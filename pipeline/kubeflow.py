"""Kubeflow Pipelines: a spec's stage graph as a KFP v2 pipeline, and that pipeline run here.

`python -m pipeline compile SPEC --to kfp OUT.yaml` writes one container component per stage, each
running `python -m pipeline stage SPEC NAME` in the toolkit's image, wired by the stage graph and
sized by lane. The stages hand their outputs to one another through the shared store
(PIPELINE_STORE, set on every task), so KFP passes no artifacts and its own caching stays off: the
toolkit's content-addressed keys decide what runs.

The kfp SDK lives in a tool environment of its own (`.venv-kfp`, `scripts/setup.sh --kfp`): kfp 2.17
needs protobuf < 7, and the TensorFlow, TF Serving, ONNX and LiteRT protos here are pinned on 7.x
(sentencepiece's needs a 7.x runtime), so one environment cannot hold both. The toolkit writes the
plan as JSON and runs pipeline/kfp_compile.py there; nothing here imports kfp.

`python -m pipeline run-compiled OUT.yaml` runs each task's container command from the compiled
YAML on this machine, in the DAG's order, with each task's environment: the closest thing to a
cluster without Kubernetes (kfp's local runners need Docker for container components).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import spec as spec_mod
from .cache import PACKAGE_ROOT

KFP_PYTHON_ENV = "PIPELINE_KFP_PYTHON"
DEFAULT_IMAGE = "train-to-edge:latest"  # the Dockerfile's image, as `docker build -t train-to-edge .` tags it
# what a stage's container asks for, by lane: a framework lane imports TensorFlow or torch and converts
RESOURCES = {"tensorflow": ("2", "6G"), "torch": ("2", "4G"), "keras-jax": ("2", "6G"), "keras-torch": ("2", "4G"),
             None: ("1", "2G")}


class KfpError(spec_mod.SpecError):
    """The kfp tool environment is missing or refused the plan; says what to do (exit 2, like a bad spec)."""


def kfp_python() -> Path:
    """The interpreter of the kfp tool environment: PIPELINE_KFP_PYTHON, else .venv-kfp in this checkout."""
    path = Path(os.environ.get(KFP_PYTHON_ENV) or PACKAGE_ROOT / ".venv-kfp" / "bin" / "python")
    if not path.is_file():
        raise KfpError(f"expected the kfp SDK's tool environment at {path}, found none; make it with "
                       f"`scripts/setup.sh --kfp` (or point {KFP_PYTHON_ENV} at a Python that has kfp 2.17)")
    return path


def plan(spec_ref: str, image: str = DEFAULT_IMAGE, store: str | None = None) -> dict:
    """The spec's stages as plain data for kfp_compile.py: names, edges, commands, resources."""
    from .one_stage import stages_of
    spec, stages = stages_of(spec_ref)
    store = store if store is not None else os.environ.get("PIPELINE_STORE", "")
    if not store.startswith("s3://"):
        raise spec_mod.SpecError(f"compile --to kfp: expected a shared store every task reaches (--store "
                                 f"s3://BUCKET/PREFIX or PIPELINE_STORE), found {store or 'none'}")
    # a built-in spec by its name (the image holds it); a spec of one's own by its path, which the
    # image must hold at the same place
    ref = spec.name if spec_mod.builtin_specs().get(spec.name) == spec.path else str(spec.path)
    return {
        "name": spec.name,
        "description": f"{spec.name}: {len(stages)} stages of the train-to-edge toolkit, through {store}",
        "image": image,
        "env": {"PIPELINE_STORE": store},
        "stages": [{"name": s.name, "inputs": list(s.inputs), "key": s.key, "lane": s.lane,
                    "command": ["python", "-m", "pipeline", "stage", ref, s.name],
                    "cpu": RESOURCES[s.lane][0], "memory": RESOURCES[s.lane][1]}
                   for s in stages],
    }


def compile_to(spec_ref: str, out: Path, image: str = DEFAULT_IMAGE, store: str | None = None) -> dict:
    """Write the KFP pipeline YAML for the spec; returns the plan it was made from."""
    the_plan = plan(spec_ref, image, store)
    python = kfp_python()
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(json.dumps(the_plan))
        r = subprocess.run([str(python), str(PACKAGE_ROOT / "pipeline" / "kfp_compile.py"), str(plan_file),
                            str(out)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise KfpError(f"the kfp SDK ({python}) could not compile {the_plan['name']}: "
                       f"{(r.stderr or r.stdout).strip()[-2000:]}")
    return the_plan


def tasks_in_order(yaml_path: Path) -> list[dict]:
    """The compiled pipeline's tasks, upstream first: name, the stage's display name, command, env."""
    import yaml
    doc = yaml.safe_load(Path(yaml_path).read_text())
    try:
        tasks = doc["root"]["dag"]["tasks"]
        executors = doc["deploymentSpec"]["executors"]
        components = doc["components"]
    except (KeyError, TypeError):
        raise spec_mod.SpecError(f"{yaml_path}: expected a KFP v2 pipeline (root.dag.tasks, deploymentSpec), "
                                 f"found something else") from None
    ordered, done = [], set()
    while len(ordered) < len(tasks):
        ready = [n for n, t in tasks.items() if n not in done and set(t.get("dependentTasks", [])) <= done]
        if not ready:
            raise spec_mod.SpecError(f"{yaml_path}: its tasks' dependencies form a cycle or name a missing task")
        for name in ready:
            container = executors[components[tasks[name]["componentRef"]["name"]]["executorLabel"]]["container"]
            ordered.append({"task": name, "stage": tasks[name].get("taskInfo", {}).get("name", name),
                            "command": container["command"] + container.get("args", []),
                            "env": {e["name"]: e["value"] for e in container.get("env", [])}})
            done.add(name)
    return ordered


def run_compiled(yaml_path: Path, home: Path, python: str = sys.executable) -> list[dict]:
    """Run each task's command here, in order (the image's `python` is this interpreter), stopping at
    the first that fails; each returned row has the task, its exit code and the seconds it took."""
    import time
    rows = []
    for task in tasks_in_order(yaml_path):
        command = [python if task["command"][0] == "python" else task["command"][0], *task["command"][1:]]
        env = {**os.environ, **task["env"], "PIPELINE_HOME": str(home), "PYTHONPATH": str(PACKAGE_ROOT)}
        print(f"[kfp task {task['task']}] {' '.join(task['command'])}", flush=True)
        t0 = time.perf_counter()
        code = subprocess.run(command, env=env, cwd=home).returncode
        rows.append({"task": task["task"], "stage": task["stage"], "exit_code": code,
                     "seconds": round(time.perf_counter() - t0, 2)})
        if code != 0:
            break
    return rows
