"""One stage of a spec, run on its own: `python -m pipeline stage SPEC NAME`.

What an engine that schedules our stages itself (a Kubeflow Pipelines component, a batch job) runs.
The stage's key is computed from the whole spec, exactly as a full run computes it; its inputs are
found in the local cache or, with PIPELINE_STORE set, pulled from the shared store; its output is
committed and pushed there for the stages after it. A stage already in the store is not run again.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import lanes
from . import spec as spec_mod
from .cache import Cache
from .progress import Display
from .runner import StageFailed, StageResult, assign_keys, run_stage


def stages_of(spec_ref: str):
    from .stages import build_stages
    spec = spec_mod.load(spec_ref)
    stages = build_stages(spec)
    assign_keys(stages)
    return spec, stages


def run_one(spec_ref: str, name: str, home: Path) -> StageResult:
    """Run stage `name` of the spec here; SpecError when there is no such stage or an input is missing."""
    _, stages = stages_of(spec_ref)
    by_name = {s.name: s for s in stages}
    if name not in by_name:
        raise spec_mod.SpecError(f"stage {name!r}: expected one of the spec's stages: {', '.join(by_name)}")
    stage = by_name[name]
    cache = Cache(home / ".pipeline" / "cache", store=os.environ.get("PIPELINE_STORE"))
    cache.check_writable()
    where = f"the store {cache.store.uri}" if cache.store else "the local cache (PIPELINE_STORE is not set)"
    for upstream in stage.inputs:
        if cache.lookup(stage.input_kinds[upstream], stage.input_keys[upstream], volatile_ok=True) is None:
            raise spec_mod.SpecError(f"stage {name}: expected its input {upstream} (key "
                                     f"{stage.input_keys[upstream][:10]}) in {where}, found none; run stage "
                                     f"{upstream} first")
    lanes.enter(stage.lane, warm=False)  # before any framework loads (Keras reads its backend once)
    display = Display()
    try:
        for line in cache.changed:
            display.note(line)
        return run_stage(stage, cache, {}, False, display)
    except StageFailed as e:
        display.error(e.result.traceback.rstrip() or e.result.error or "")
        return e.result
    finally:
        display.close()
