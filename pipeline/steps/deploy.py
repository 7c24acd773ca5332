"""The deploy steps: the bundles to TF Serving (served and blessed) and to edge devices and the browser."""
from __future__ import annotations

import json

from ..spec_slice import from_slice
from ..stage_run import Context


def run_serving(ctx: Context, spec: dict) -> dict:
    """Deploy the bundles, serve them, replay the parity inputs over gRPC and REST and compare the
    answers with the reference outputs: records.json (one record per model and transport) for the report."""
    from exporters.bundle import read_bundle
    from serving.deploy import deploy_and_bless, dump, settings
    spec = from_slice(spec)
    bundles = [read_bundle(ctx.input_dir(f"bundle:{m.name}") / "bundle") for m in spec.models]
    result = deploy_and_bless(bundles, ctx.out / "deployment", settings(spec.deploy["serving"]), log=ctx.log)
    dump(result, ctx.out / "blessing.json")
    records = [r for b in result["blessings"].values() for r in b["records"]]
    (ctx.out / "records.json").write_text(json.dumps(records, indent=2))
    return {"blessed": {m: b["blessed"] for m, b in result["blessings"].items()},
            "docker_build": result["written"]["docker_build"], "docker_run": result["written"]["docker_run"],
            "ready_s": result["server"]["ready_s"], "summary": result["summary"]}


def run_edge(ctx: Context, spec: dict) -> dict:
    from edge.deploy import deploy, settings
    from exporters.bundle import read_bundle
    from ..keys import private_key_path
    spec = from_slice(spec)
    s = settings(spec.deploy["edge"], spec.path.parent)
    bundles = [read_bundle(ctx.input_dir(f"bundle:{m.name}") / "bundle") for m in spec.models]
    result = deploy(bundles, s, ctx.out / "edge", private_key_path() if s.devices else None, log=ctx.log)
    (ctx.out / "records.json").write_text(json.dumps(result.pop("records"), indent=2, default=str))
    (ctx.out / "edge.json").write_text(json.dumps(result, indent=2, default=str))
    passed = {d: all(r.get("passed") for r in models.values()) for d, models in result["devices"].items()}
    seen = {m: all(r.get("passed") for r in rs) for m, rs in result["browser"].items()}
    return {"devices": passed, "browser": seen,
            "summary": ", ".join([f"edge:{d} {'passed' if ok else 'FAILED'}" for d, ok in passed.items()] +
                                 [f"browser {m} {'passed' if ok else 'FAILED'}" for m, ok in seen.items()])}
