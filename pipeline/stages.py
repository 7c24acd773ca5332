"""The graph of a spec's stages: which stages there are, what each one reads (its settings, its
inputs, its arguments), which lane runs it, and its code, from which its cache key is made. The
bodies live in pipeline/steps/, one module per kind of step; this module only names them.
"""
from __future__ import annotations

import json
from pathlib import Path

from .code_deps import closure, package_versions
from .runner import Stage
from .spec import ModelSpec, Spec
from .spec_slice import hashed, spec_slice
from .steps.common import PERTURBATION, converted_from, export_options, family, side

def step_code(step: str, *roots: str) -> tuple[str, ...]:
    """A stage's code: its step's module and the steps' shared one, the files that do its work, and
    every toolkit file those import (pipeline/code_deps.py reads the imports). This graph is not in
    it: what the graph decides reaches a stage as settings, which its key hashes. tracking.py (the
    MLflow model folder) is not either, on purpose: changing how runs are recorded must not retrain."""
    return closure(f"pipeline/steps/{step}.py", "pipeline/steps/common.py", *roots)


DATA_CODE = step_code("data", "pipeline/data.py")
TRAIN_ROOTS = ("pipeline/training.py", "frameworks/__init__.py", "frameworks/base.py")


def train_code(m: ModelSpec) -> tuple[str, ...]:
    """What a model's training is built from: the shared code and its framework's own module (and the
    modules that one builds on, named by its BUILDS_ON)."""
    import frameworks
    mod = frameworks.module(m.framework)
    return step_code("train", *TRAIN_ROOTS, *(f"frameworks/{n}.py"
                                             for n in (*getattr(mod, "BUILDS_ON", ()), m.framework)))


def framework_versions(m: ModelSpec) -> dict[str, str]:
    import frameworks
    return package_versions(frameworks.module(m.framework).PACKAGES)


# model fields no step reads from the slice: the LiteRT export gets its batch sizes and int8 fallback
# as its options (export_options), so changing them reruns that export alone
NOT_CARRIED_MODEL_FIELDS = ("litert_batch_sizes", "int8_fallback")


def carried(spec: Spec, *fields: str, models: tuple[ModelSpec, ...] = (), settings: dict | None = None,
            cell: tuple[str, str] | None = None, drop_model: tuple[str, ...] = (), **args) -> dict:
    """A stage's settings and arguments: the slice of the spec it reads (pipeline/spec_slice.py) goes
    in both, so its key hashes exactly what its body can read; `settings` adds what the spec's text
    does not hold (file digests, package versions)."""
    part = spec_slice(spec, *fields, models=models, drop_model=NOT_CARRIED_MODEL_FIELDS + drop_model,
                      cell=cell)
    return {"settings": {"spec": hashed(part), **(settings or {})}, "args": {"spec": part, **args}}


def build_stages(spec: Spec) -> list[Stage]:
    """Every stage of a spec, upstream first. A stage carries the slice of the spec it reads and
    names its function, so stages travel as plain data and any process can run one."""
    need_targets = not all(m.pretrained for m in spec.models)  # targets are optional when none trains
    stages = [
        Stage("data", "data", code=DATA_CODE, fn="pipeline.steps.data:run_data",
              **carried(spec, "seed", "data", need_targets=need_targets,
                        settings={"file": _data_file_digest(spec), "need_targets": need_targets})),
        Stage("parity_set", "parity_set", code=DATA_CODE, fn="pipeline.steps.data:run_parity_set", inputs=("data",),
              **carried(spec, "seed", "parity.held_out_rows", "parity.random_rows", "parity.input_range",
                        "parity.max_batch", "parity.inputs")),
    ]
    for m in spec.models:
        stages.append(Stage(
            f"train:{m.name}", "train", code=train_code(m), fn="pipeline.steps.train:run_train",
            inputs=("data",), lane=side(m.framework),
            # the stated signature is checked by the reference stage, not here
            **carried(spec, "seed", "data.task", models=(m,), model=m.name, drop_model=("signature",),
                      settings={"factory_source": m.factory_source_hash(), "source": m.source_digest(),
                                "framework_versions": framework_versions(m)})))
        stages.append(Stage(
            f"reference:{m.name}", "reference", code=train_code(m), fn="pipeline.steps.train:run_reference",
            inputs=("data", "parity_set", f"train:{m.name}"), lane=side(m.framework),
            **carried(spec, "seed", "data.task", models=(m,), model=m.name,
                      settings={"perturbation": PERTURBATION})))
        stages += export_stages(spec, m)
        stages += verify_stages(spec, m)
        stages.append(bundle_stage(spec, m))
    if "serving" in spec.deploy:
        stages.append(serving_stage(spec))
    if "edge" in spec.deploy:
        stages.append(edge_stage(spec))
    stages.append(report_stage(spec))
    return stages


def _data_file_digest(spec: Spec) -> str | None:
    from .cache import file_digest, folder_digests
    path = spec.data.options.get("path")
    if path and Path(path).is_dir():  # a folder of .npy files: every one of them
        return json.dumps(folder_digests(Path(path)), sort_keys=True)
    return file_digest(Path(path)) if path and Path(path).is_file() else None


def probe_stages(spec: Spec, input_shape: list[int], n_outputs: int) -> list[Stage]:
    """For `validate`: build each model from its factory and call it on rows shaped like the data."""
    return [Stage(f"probe:{m.name}", "probe", code=train_code(m), fn="pipeline.steps.train:run_probe",
                  lane=side(m.framework),
                  **carried(spec, "seed", models=(m,), model=m.name,
                            input_shape=input_shape, n_outputs=n_outputs)) for m in spec.models]


def export_stages(spec: Spec, m: ModelSpec) -> list[Stage]:
    """One stage per format; a format converted from another (TF.js from SavedModel) takes it as input."""
    import exporters
    from exporters import FORMATS
    stages = []
    for fmt in _upstream_first([f for f in FORMATS if f in spec.formats], m.framework):
        requires = converted_from(fmt, m.framework)
        for req in requires:
            if req not in spec.formats:
                raise_spec(spec, f"export.formats: {fmt} for {m.framework} models is converted from {req}, "
                                 f"which must be listed too")
        # a route that converts another artifact needs no model, so it may run on the other side;
        # an exporter whose later routes convert the model itself (nobuco) takes it too, loaded only then
        needs_model = not requires or family(m.framework) in getattr(exporters.module(fmt), "LATER_ROUTES_TAKE_MODEL", ())
        model_input = (f"train:{m.name}",) if needs_model else ()
        options = export_options(m, fmt, spec.parity.tolerances, spec.data.task)
        stages.append(Stage(
            f"export:{m.name}:{fmt}", "export",
            code=step_code("export", f"exporters/{fmt}.py") + _converter_files(fmt),
            fn="pipeline.steps.export:run_export",
            inputs=("data", f"reference:{m.name}") + model_input + tuple(f"export:{m.name}:{r}" for r in requires),
            lane=exporters.module(fmt).LANE[family(m.framework)],
            **carried(spec, "parity.max_batch", models=(m,), model=m.name, fmt=fmt, options=options,
                      settings={"format": fmt, "options": options,
                                "converters": package_versions(getattr(exporters.module(fmt), "CONVERTER_PACKAGES", {})
                                                               .get(family(m.framework), ()))})))
    return stages


def _upstream_first(formats: list[str], framework: str) -> list[str]:
    ordered: list[str] = []

    def visit(fmt: str) -> None:
        if fmt not in ordered:
            for req in converted_from(fmt, framework):
                if req in formats:
                    visit(req)
            ordered.append(fmt)
    for fmt in formats:
        visit(fmt)
    return ordered


def raise_spec(spec: Spec, message: str) -> None:
    from .spec import SpecError
    raise SpecError(f"{spec.path}: {message}")


VERIFY_ROOTS = ("parity/compare.py", "exporters/verify.py")


def verify_stages(spec: Spec, m: ModelSpec) -> list[Stage]:
    """One stage per format, in the lane whose process has that format's runtime."""
    import exporters
    stages = []
    for fmt in exporters.FORMATS:
        if fmt not in spec.formats:
            continue
        lane = exporters.module(fmt).RUNTIME_LANE
        stages.append(Stage(
            f"verify:{m.name}:{fmt}", "verify",
            code=step_code("verify", *VERIFY_ROOTS, f"exporters/{fmt}.py") + _runtime_files(fmt),
            fn="pipeline.steps.verify:run_verify",
            # the trained model is loaded only to localise a failed cell (pipeline/localization.py)
            inputs=(f"reference:{m.name}", f"export:{m.name}:{fmt}", f"train:{m.name}"),
            lane=side(m.framework) if lane == "any" else lane,
            # an UNSUPPORTED cell's verdict turns on allow_unsupported: its own entries are carried
            **carried(spec, "data.task", "parity.tolerances", "parity.max_batch", "parity.allow_unsupported",
                      models=(m,), cell=(m.name, fmt), model=m.name, fmt=fmt,
                      settings={"runtimes": package_versions(getattr(exporters.module(fmt), "RUNTIME_PACKAGES", ()))})))
    return stages


def _runtime_files(fmt: str) -> tuple[str, ...]:
    """Files besides the Python modules that its runtime runs (part of the verify stage's key)."""
    import exporters
    return tuple(getattr(exporters.module(fmt), "RUNTIME_FILES", ()))


def _converter_files(fmt: str) -> tuple[str, ...]:
    """Files besides the Python modules that its converters run (part of the export stage's key)."""
    import exporters
    return tuple(getattr(exporters.module(fmt), "CONVERTER_FILES", ()))


BUNDLE_CODE = step_code("bundle", "exporters/bundle.py")


def bundle_stage(spec: Spec, m: ModelSpec) -> Stage:
    """The model's bundle: its artifacts, the stored parity inputs and reference outputs, the verdicts
    and the digest of every file (what the registry keeps, and what the gate and deploys read)."""
    import exporters
    formats = [f for f in exporters.FORMATS if f in spec.formats]
    return Stage(f"bundle:{m.name}", "bundle", code=BUNDLE_CODE, fn="pipeline.steps.bundle:run_bundle",
                 inputs=(f"reference:{m.name}",) + tuple(f"export:{m.name}:{f}" for f in formats)
                 + tuple(f"verify:{m.name}:{f}" for f in formats),
                 **carried(spec, "formats", "data.task", "parity.tolerances", "parity.max_batch", models=(m,),
                           model=m.name))


SERVING_CODE = step_code("deploy", "exporters/bundle.py", "serving/deploy.py")


def serving_stage(spec: Spec) -> Stage:
    """Every model to TF Serving: the deployment folder, a server, and the blessing of each model."""
    return Stage("deploy:serving", "deploy", code=SERVING_CODE, fn="pipeline.steps.deploy:run_serving",
                 inputs=tuple(f"bundle:{m.name}" for m in spec.models), lane="tensorflow",
                 **carried(spec, "deploy.serving", models=spec.models))


# the browser page the web bundle runs is no Python module: named here
EDGE_CODE = step_code("deploy", "exporters/bundle.py", "edge/deploy.py", "pipeline/keys.py") + \
    ("edge/web/index.html", "edge/web/page.js")


def edge_stage(spec: Spec) -> Stage:
    """Every model to the spec's edge devices (signed packages, on-device parity) and into the browser."""
    from edge.deploy import settings
    s = settings(spec.deploy["edge"], spec.path.parent)
    devices = {"file": s.devices, "content": _file_text_digest(s.devices)} if s.devices else None
    # cached like any stage: a rerun pushes again only when a bundle, the settings or the devices file changed
    return Stage("deploy:edge", "deploy", code=EDGE_CODE, fn="pipeline.steps.deploy:run_edge",
                 inputs=tuple(f"bundle:{m.name}" for m in spec.models),
                 **carried(spec, "deploy.edge", models=spec.models, settings={"devices": devices}))


def _file_text_digest(path: str) -> str:
    from .cache import file_digest
    return file_digest(Path(path))


REPORT_CODE = step_code("report", "parity/compare.py", "parity/report.py", "pipeline/plots.py", "exporters/bundle.py")


def report_stage(spec: Spec) -> Stage:
    import exporters
    verifies = tuple(f"verify:{m.name}:{fmt}" for m in spec.models for fmt in exporters.FORMATS
                     if fmt in spec.formats)
    inputs = verifies + tuple(f"{k}:{m.name}" for m in spec.models for k in ("train", "reference"))
    inputs += tuple(f"deploy:{t}" for t in ("serving", "edge") if t in spec.deploy)
    return Stage("report", "report", code=REPORT_CODE, fn="pipeline.steps.report:run_report", inputs=inputs,
                 **carried(spec, "formats", "deploy", "data.task", "parity.tolerances", models=spec.models))
