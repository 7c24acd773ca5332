"""The export step: one format's artifacts from the trained model (or from another artifact)."""
from __future__ import annotations

import time

import numpy as np

from parity.feeds import take, unpack

from ..spec_slice import from_slice
from ..stage_run import Context
from .common import converted_from, family, load_arrays, trained_model


def run_export(ctx: Context, spec: dict, model: str, fmt: str, options: dict) -> dict:
    """Write one format's artifacts. A converter failure is recorded (and becomes a failed parity
    record with the converter's message), not raised: the other formats still get made and checked.
    A failure because the machine lacks the converter is not kept for later runs."""
    import exporters
    from exporters.base import read_manifest, size_of, write_manifest
    from exporters.verify import environment_problem
    spec = from_slice(spec)
    m = spec.model(model)
    requires = converted_from(fmt, m.framework)
    model_obj = None if requires else trained_model(ctx, spec, m)
    arrays = load_arrays(ctx)
    with np.load(ctx.input_dir(f"reference:{m.name}") / "reference.npz") as f:
        example, expected = take(unpack(f, "x"), slice(0, spec.parity.max_batch)), f["y"][: spec.parity.max_batch]
    def callable_form(model):  # the form each converter calls (a torch forward's keyword inputs: by keyword)
        from frameworks import adapter
        fw = adapter(m.framework)
        return fw.for_inputs(model, example) if hasattr(fw, "for_inputs") else model
    model_obj = None if model_obj is None else callable_form(model_obj)
    upstream, missing = {}, []
    for req in requires:
        src = ctx.input_dir(f"export:{m.name}:{req}")
        arts = read_manifest(src)
        if not arts:
            missing.append(f"{req}: {ctx.input_facts(f'export:{m.name}:{req}').get('error', 'no artifact')}")
        upstream[req] = arts
    out_dir = ctx.out / fmt
    out_dir.mkdir()
    options = dict(options)
    if fmt == "litert":  # rows for int8 calibration, from the training data
        options["calibration"] = take(arrays["x_train"], slice(0, 256))
    if "int8_fallback" in options:  # judged on every parity row, as the verify stage will judge it
        with np.load(ctx.input_dir(f"reference:{m.name}") / "reference.npz") as f:
            options["int8_fallback"] = {**options["int8_fallback"], "x": unpack(f, "x"), "y": f["y"]}
    if requires and f"train:{m.name}" in ctx.stage.inputs:  # for a later route, loaded only if one runs
        options["load_model"] = lambda: callable_form(trained_model(ctx, spec, m))
        options["trained_dir"] = str(ctx.input_dir(f"train:{m.name}"))
    t0 = time.perf_counter()
    try:
        if missing and "load_model" not in options:  # else a later route converts the model itself
            raise RuntimeError(f"converted from an artifact that could not be made ({'; '.join(missing)})")
        artifacts = exporters.module(fmt).export(model_obj, framework=m.framework, family=family(m.framework), name=m.name, example=example,
                                                 out_dir=out_dir, upstream=upstream, options=options,
                                                 expected=expected)
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        cause = environment_problem(e) or environment_problem(e.__cause__ or e)
        if cause:
            ctx.volatile(f"the converter is missing here: {cause[:200]}")
        ctx.log(f"export failed: {error[:300]}")
        write_manifest(out_dir, [])
        (ctx.out / "artifacts.json").write_text("[]")
        return {"format": fmt, "error": error, "artifacts": [], "summary": f"FAILED: {error[:120]}"}
    elapsed = time.perf_counter() - t0
    for a in artifacts:
        a.size_bytes = a.size_bytes or size_of(a.path)
        a.export_s = a.export_s or elapsed / len(artifacts)
    write_manifest(ctx.out, artifacts)
    return {"format": fmt, "artifacts": [a.to_json(ctx.out) for a in artifacts],
            "summary": ", ".join(f"{a.variant} {a.size_bytes / 1024:.0f} KiB" for a in artifacts)
            + f" in {elapsed:.2f} s"}
