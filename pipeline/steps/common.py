"""What the step bodies share: the model a stage names, the arrays of the data
stage, a trained model handed between the stages of one lane, and the facts the graph reads too
(the lanes, the formats one converts from, the variants)."""
from __future__ import annotations

import numpy as np

from parity.feeds import unpack

from ..stage_run import Context
from ..spec import ModelSpec, Spec


PERTURBATION = 1e-3  # relative weight noise of the "slightly perturbed model" the parity set must catch


def side(framework: str) -> str:
    """The worker lane whose process has this framework imported."""
    import frameworks
    return frameworks.lane(framework)


def family(framework: str) -> str:
    """What the exporters dispatch on: the kind of model the framework makes."""
    import frameworks
    return frameworks.family(framework)


def where(m: ModelSpec) -> str:
    return f"model {m.name} ({m.framework})"


def maker(spec: Spec, m: ModelSpec, input_shape, n_outputs):
    """A call that builds the model from the spec's factory (None without one). Loading the factory
    puts the spec's folder on sys.path, where a pickled module's class lives too."""
    from ..training import build_model, load_factory
    if not m.factory:
        return None
    load_factory(spec, m)
    return lambda: build_model(spec, m, input_shape, n_outputs)


def load_arrays(ctx: Context) -> dict:
    with np.load(ctx.input_dir("data") / "arrays.npz") as f:
        entries = {k: f[k] for k in f.files}
    return {name: unpack(entries, name) for name in ("x_train", "x_test", "y_train", "y_test")
            if name in entries or any(k.startswith(name + ":") for k in entries)}


def trained_model(ctx: Context, spec: Spec, m: ModelSpec):
    """The model trained earlier in this lane, or loaded from the train stage's outputs."""
    from frameworks import adapter
    key = ("model", m.name)
    if key not in ctx.memo:
        facts = ctx.input_facts(f"train:{m.name}")
        ctx.memo[key] = adapter(m.framework).load(
            ctx.input_dir(f"train:{m.name}"), make=maker(spec, m, facts["input_shape"], facts["n_outputs"]),
            pretrained=m.pretrained, input_shape=facts["input_shape"], where=where(m))
    return ctx.memo[key]


def converted_from(fmt: str, framework: str) -> tuple[str, ...]:
    import exporters
    return tuple(exporters.module(fmt).REQUIRES.get(family(framework), ()))


def export_options(m: ModelSpec, fmt: str, tolerances: dict, task: str) -> dict:
    """What an export reads besides the model: LiteRT's batch sizes, and its int8 fallback with the
    tolerance the int8 cell is judged by (its fallback stops once the cell meets it)."""
    if fmt != "litert":
        return {}
    from parity.compare import tolerance_for
    # the fallback is TFLiteConverter's (its QuantizationDebugger and denylist): the SavedModel route only
    fallback = m.int8_fallback and family(m.framework) == "tensorflow" and {
        **m.int8_fallback, "task": task, "tolerance": tolerance_for("int8", "litert", tolerances).to_json()}
    return {"batch_sizes": list(m.litert_batch_sizes), **({"int8_fallback": fallback} if fallback else {})}
