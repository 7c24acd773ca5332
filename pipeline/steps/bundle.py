"""The bundle step: a model's artifacts, parity inputs, reference outputs and verdicts in one folder."""
from __future__ import annotations

import json

from ..spec_slice import from_slice
from ..stage_run import Context


def run_bundle(ctx: Context, spec: dict, model: str) -> dict:
    import exporters
    from exporters.base import read_manifest
    from exporters.bundle import write_bundle
    spec = from_slice(spec)
    m = spec.model(model)
    artifacts, verdicts, profiles = {}, {}, {}
    for fmt in exporters.FORMATS:
        if fmt not in spec.formats:
            continue
        arts = read_manifest(ctx.input_dir(f"export:{m.name}:{fmt}"))
        if arts:
            artifacts[fmt] = arts
        for r in json.loads((ctx.input_dir(f"verify:{m.name}:{fmt}") / "records.json").read_text()):
            cell = f"{r['label']}@{r.get('runtime') or '-'}"
            verdicts[cell] = r["status"]
            if (r.get("details") or {}).get("profile"):
                profiles[cell] = r["details"]["profile"]
    signature = ctx.input_facts(f"reference:{m.name}")["signature"]
    manifest = write_bundle(ctx.out / "bundle", model=m.name, framework=m.framework, task=spec.data.task,
                            signature=signature,
                            reference=ctx.input_dir(f"reference:{m.name}") / "reference.npz",
                            artifacts=artifacts, verdicts=verdicts, tolerances=spec.parity.tolerances,
                            max_batch=spec.parity.max_batch, source={"spec": spec.name, "spec_file": spec.path.name},
                            profiles=profiles)
    n = sum(len(v) for v in artifacts.values())
    return {"formats": sorted(artifacts), "files": len(manifest["files"]),
            "summary": f"{n} artifacts, {len(manifest['files'])} files"}
