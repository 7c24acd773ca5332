"""What every format module shares: the Artifact record, the Runner contract, typed errors.

A format module (exporters/<format>.py) has this small surface:

    FORMAT = "onnx"
    REQUIRES = {"tensorflow": (), "torch": ()}  # per model family: formats this one is converted from
    RUNTIMES = ("onnxruntime",)               # runtimes that load it; the first is the default
    LANE = {"tensorflow": "tensorflow", "torch": "torch"}   # per family: which side's process converts
    RUNTIME_LANE = "any"                      # which side's process loads the artifact ("any": no framework)
    export(model, *, framework, family, name, example, out_dir, upstream, options, expected) -> list[Artifact]
    load(artifact, runtime=None) -> BaseRunner  # feeds of named arrays in, named arrays out

Routes dispatch on the model's family (frameworks/ declares each framework's): "tensorflow" (a Keras
model or a tf.Module with a serving signature), "torch" (an nn.Module: plain, Lightning, fastai's) or
"jax" (a function and its parameters); `framework` only names where the model came from.
`model` is the in-memory model (keras.Model, tf.Module, torch.nn.Module, ...), or None for a route that
converts an upstream artifact (so a TensorFlow-side process never imports torch, and the reverse);
`expected` the trained model's outputs on `example`, a float32 batch of real inputs; `upstream` maps each REQUIRED format to its artifacts; `options` holds per-format
settings from the spec (e.g. litert "batch_sizes", "calibration" rows for int8).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from parity.signature import InputMismatch, Signature, batch_plan, pad_rows


class ExportError(RuntimeError):
    """A converter failed; says which model, which format and which route."""


class ArtifactLoadError(RuntimeError):
    """An artifact could not be loaded in its runtime (missing, truncated or corrupt)."""


class OpNotImplemented(RuntimeError):
    """The runtime has no kernel for an op the artifact uses (TF.js' CPU backend and a fused tanh, say):
    the cell is UNSUPPORTED in that runtime, not a numeric disagreement."""


class RuntimeUnavailable(ArtifactLoadError):
    """The runtime itself is missing on this machine (a package, an executable): says what to install.
    It says nothing about the artifact, so no verdict built on it is ever reused."""


@dataclass
class Artifact:
    model: str                      # the spec's model name
    format: str                     # one of exporters.FORMATS
    variant: str                    # fp32 | fp16 | int8
    path: str                       # file or folder, absolute when handed around, relative in stage.json
    framework: str                  # framework the model was trained in
    route: str                      # how it was made, for a person: "torch.onnx.export(dynamo=True)"
    batch_sizes: list[int] | None = None   # None: any batch; else the static batch sizes it carries
    input_layout: str = "as-trained"       # or e.g. "NHWC (transposed from NCHW by onnx2tf)"
    size_bytes: int = 0
    export_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)  # input/output names mapped, converter versions

    @property
    def label(self) -> str:
        return f"{self.model}/{self.format}" + ("" if self.variant == "fp32" else f"-{self.variant}")

    def to_json(self, relative_to: Path | None = None) -> dict:
        d = asdict(self)
        if relative_to is not None:
            d["path"] = str(Path(self.path).relative_to(relative_to))
        return d

    @classmethod
    def from_json(cls, d: dict, base: Path | None = None) -> "Artifact":
        d = dict(d)
        if base is not None:
            d["path"] = str(base / d["path"])
        return cls(**d)


class RunnerClosed(RuntimeError):
    """A runner used after close()."""


class BaseRunner:
    """What every format's runner shares (after Polygraphy's BaseRunner): it owns the artifact's input
    and output signature, checks and casts a feed before the runtime sees it, feeds an artifact that
    takes only some batch sizes in chunks of those (one padding rule for every format), is a context
    manager, and raises typed errors: InputMismatch (a feed that does not fit), RunnerClosed,
    ArtifactLoadError (at load). Feeds and results are dicts of name -> array; calling the runner with
    one array is the same for a one-input model and returns its first output.

    A format implements `infer_impl(feed) -> {output name: array}` for one call of a size the
    artifact takes; `static_batches` (None: any) says which sizes those are.
    """
    runtime: str = ""

    def __init__(self, artifact: "Artifact", signature: Signature, static_batches=None):
        self.artifact = artifact
        self.signature = signature
        self.static_batches = tuple(sorted(static_batches)) if static_batches else None
        self.last_strategy: str | None = None   # how the latest call was fed, for reports and tests
        self._closed = False

    @property
    def label(self) -> str:
        return f"{self.artifact.format} artifact {self.artifact.label} ({self.runtime})"

    def infer(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self._closed:
            raise RunnerClosed(f"{self.label}: the runner is closed")
        feed = self.signature.prepare_feed(feed, self.label)
        n = len(next(iter(feed.values())))
        plan = batch_plan(n, self.feed_sizes(n))
        if len(plan) == 1 and plan[0][1] == plan[0][2]:
            self.last_strategy = self.describe_call(n)
            return self.infer_impl(feed)
        parts = []
        for start, rows, size in plan:
            chunk = {k: pad_rows(v[start:start + rows], size) for k, v in feed.items()}
            parts.append({k: v[:rows] for k, v in self.infer_impl(chunk).items()})
        self.last_strategy = (f"chunks of {[size for _, _, size in plan]} rows (last padded "
                              f"{plan[-1][2] - plan[-1][1]}), trimmed to {n}")
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def __call__(self, x) -> np.ndarray:
        """One array in (a one-input artifact), its first output out."""
        if isinstance(x, Mapping):
            out = self.infer(x)
        else:
            if len(self.signature.inputs) != 1:
                raise InputMismatch(f"{self.label}: takes inputs {', '.join(map(repr, self.signature.input_names))}; "
                                    f"expected a feed of named arrays, found one array")
            out = self.infer({self.signature.inputs[0].name: x})
        return next(iter(out.values()))

    def feed_sizes(self, n_rows: int) -> tuple[int, ...] | None:
        """The batch sizes a call may have for n rows (None: any); a format may override (LiteRT can
        resize some static signatures)."""
        return self.static_batches

    def describe_call(self, n_rows: int) -> str:
        return "dynamic batch" if self.static_batches is None else f"static batch {n_rows}"

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def size_of(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_manifest(out_dir: Path, artifacts: list[Artifact]) -> None:
    (out_dir / "artifacts.json").write_text(
        json.dumps([a.to_json(out_dir) for a in artifacts], indent=2))


def read_manifest(out_dir: Path) -> list[Artifact]:
    return [Artifact.from_json(d, out_dir) for d in json.loads((out_dir / "artifacts.json").read_text())]


# --------------------------------------------------------------------------- shared by the format modules

def package_version(dist: str) -> str | None:
    """An installed distribution's version, for Artifact.details (None when it is not installed)."""
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def example_batch(example, fmt: str, name: str, framework: str, *, several: bool = False):
    """The example inputs as a contiguous float32 batch of at least one row; with `several`, a model of
    named inputs may give {name: array} (each keeping its dtype). A route that takes one input refuses
    several with an ExportError, which the run reports as UNSUPPORTED for that cell."""
    if isinstance(example, Mapping):
        if not several:
            raise ExportError(f"{fmt} export of {name} ({framework}): this route takes a model of one input; "
                              f"this model takes {len(example)} ({', '.join(example)})")
        example = {k: np.ascontiguousarray(v) for k, v in example.items()}
        if min(len(v) for v in example.values()) < 1:
            raise ExportError(f"{fmt} export of {name} ({framework}): expected example rows for every input")
        return example
    example = np.ascontiguousarray(example, dtype=np.float32)
    if example.ndim < 1 or example.shape[0] < 1:
        raise ExportError(f"{fmt} export of {name} ({framework}): expected an example batch with at least "
                          f"one row, found shape {example.shape}")
    return example


# the families of the two frameworks callers named before families existed
_FAMILY_OF = {"keras": "tensorflow", "torch": "torch"}


def family_of(framework: str, family: str | None) -> str:
    """The family a route dispatches on: as given, else the family of a framework named alone."""
    return family or _FAMILY_OF.get(framework, framework)


def unsupported_family(fmt: str, name: str, family: str, known) -> ExportError:
    return ExportError(f"{fmt} export of {name}: no route for models of the {family!r} family "
                       f"(expected one of {', '.join(known)})")


def pick_runtime(fmt: str, artifact: Artifact, runtime: str | None, runtimes: tuple[str, ...]) -> str:
    """`runtime`, or the format's default, refusing one the format does not have."""
    runtime = runtime or runtimes[0]
    if runtime not in runtimes:
        raise ValueError(f"{fmt} artifact {artifact.label}: runtime {runtime!r} is not supported "
                         f"(expected one of {', '.join(runtimes)})")
    return runtime


def check_file(fmt: str, artifact: Artifact, what: str) -> Path:
    """The artifact's file, refusing a missing one or one whose size differs from the export's."""
    path = Path(artifact.path)
    if not path.is_file():
        raise ArtifactLoadError(f"{fmt} artifact {artifact.label}: expected {what} at {path}, found "
                                f"{'a folder' if path.exists() else 'nothing'}")
    found = path.stat().st_size
    if artifact.size_bytes and found != artifact.size_bytes:
        raise ArtifactLoadError(f"{fmt} artifact {artifact.label}: expected {artifact.size_bytes} bytes at {path} "
                                f"(as exported), found {found}: the file is truncated or was replaced")
    return path


def graph_order(names) -> list[str]:
    """Output names in the graph's order: converters name several outputs `output_N` (onnx2tf, a
    SavedModel's signature) after the model's order, but hand them around as dicts ordered by name,
    where output_10 sorts before output_2."""
    def key(name: str):
        head, _, tail = name.rpartition("_")
        return (head, int(tail)) if tail.isdigit() else (name, -1)
    return sorted(names, key=key)


def forward_order(module, names) -> list[str]:
    """Named inputs in the order a torch module's forward takes them: by parameter name where they
    match, else as given. Converters take inputs by position (litert-torch names them args_0, ...)."""
    import inspect
    names = list(names)
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()]
    except (TypeError, ValueError):  # a ScriptModule's forward has no Python signature
        return names
    return sorted(names, key=lambda n: params.index(n) if n in params else len(params) + names.index(n))


def keras_input_names(model) -> list[str] | None:
    """The names a Keras functional model matches a dict of inputs against (its inputs' own names,
    or the keys of a dict it was built with); None for a model that does not say (a subclassed one)."""
    struct = getattr(model, "_inputs_struct", None)
    if isinstance(struct, dict):
        return list(struct)
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # a subclassed model has no symbolic inputs
        return None
    return [t.name for t in inputs] if inputs else None


def keras_feed(model, x):
    """`x` bound to a Keras model's inputs (parity.feeds.bind_inputs) as tensors: one float32 tensor
    for one input (called positionally, as model(x) is), else {name: tensor} keeping each dtype."""
    import keras
    from parity.feeds import bind_inputs
    bound, _ = bind_inputs(x, keras_input_names(model))
    if keras.backend.backend() != "tensorflow":  # numpy: every backend takes it, and TensorFlow stays unloaded
        return {k: np.asarray(v) for k, v in bound.items()} if isinstance(bound, dict) else \
            np.asarray(bound, dtype=np.float32)
    import tensorflow as tf
    if isinstance(bound, dict):
        return {k: tf.constant(v) for k, v in bound.items()}
    return tf.constant(bound, dtype=tf.float32)


def keyword_call(module, names):
    """`module` itself when its forward takes `names` positionally (forward_order's order, from its first
    parameter on); else a module whose forward takes them positionally and passes them to `module` by
    keyword. A forward with keyword-only inputs, or whose inputs skip a parameter (Hugging Face's
    `forward(input_ids, token_type_ids=None, attention_mask=None)` given input_ids and attention_mask),
    would otherwise be fed the wrong tensor in a slot, silently. Every torch route calls and traces
    modules positionally, so wrapping once here serves them all."""
    import inspect
    names = list(names)
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # a ScriptModule: positional is all it has
        return module
    by_name = {p.name: p for p in params}
    order = forward_order(module, names)
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if positional[:len(order)] == order or not all(n in by_name or _takes_kwargs(params) for n in order):
        return module
    import torch

    arglist = ", ".join(order)
    code = f"def forward(self, {arglist}):\n    return self.inner({', '.join(f'{n}={n}' for n in order)})\n"
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - names are the data's input names, checked identifiers
    cls = type(f"KeywordCall_{type(module).__name__}", (torch.nn.Module,), {"forward": scope["forward"]})
    wrapper = cls()
    wrapper.inner = module
    return wrapper


def _takes_kwargs(params) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in params)
