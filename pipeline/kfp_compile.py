"""Compile a stage plan into a Kubeflow Pipelines (v2) pipeline with the kfp SDK.

This file runs in the kfp tool environment (`.venv-kfp`, made by `scripts/setup.sh --kfp`), not in
the toolkit's: kfp 2.17 needs protobuf < 7 and the toolkit's pins hold 7.x. It imports kfp and the
standard library only, and reads the plan `python -m pipeline compile` wrote:

    python pipeline/kfp_compile.py PLAN.json OUT.yaml

A plan is plain data: the pipeline's name, the image, the store, and per stage its name, the stages
it needs, its command and its resources (see pipeline/kubeflow.py). Each stage becomes one container component running that
command in the toolkit's image; the graph's edges become task dependencies (`.after`), since
stages hand their outputs over through the shared store, not through KFP artifacts.
"""
from __future__ import annotations

import json
import re
import sys


def component_name(stage: str) -> str:
    """A stage's name as KFP accepts it ("verify:keras:litert" -> "verify-keras-litert")."""
    return re.sub(r"[^a-z0-9-]+", "-", stage.lower()).strip("-")


def _component_yaml(stage: dict, image: str) -> str:
    spec = {"name": component_name(stage["name"]),
            "description": f"stage {stage['name']} of the toolkit's pipeline",
            "implementation": {"container": {"image": image, "command": stage["command"]}}}
    return json.dumps(spec)  # JSON is YAML: the v1 component text load_component_from_text reads


def build(plan: dict):
    from kfp import components, dsl

    ops = {s["name"]: components.load_component_from_text(_component_yaml(s, plan["image"])) for s in plan["stages"]}

    @dsl.pipeline(name=component_name(plan["name"]), description=plan["description"])
    def stages_pipeline():
        tasks = {}
        for s in plan["stages"]:  # listed upstream first
            task = ops[s["name"]]()
            task.set_display_name(s["name"])
            task.set_caching_options(False)  # the toolkit's own cache, keyed by content, decides
            task.set_cpu_request(s["cpu"]).set_cpu_limit(s["cpu"])
            task.set_memory_request(s["memory"]).set_memory_limit(s["memory"])
            for name, value in plan["env"].items():
                task.set_env_variable(name, value)
            for upstream in s["inputs"]:
                task.after(tasks[upstream])
            tasks[s["name"]] = task

    return stages_pipeline


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python pipeline/kfp_compile.py PLAN.json OUT.yaml", file=sys.stderr)
        return 2
    from kfp import compiler
    plan = json.loads(open(argv[0]).read())
    compiler.Compiler().compile(build(plan), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
