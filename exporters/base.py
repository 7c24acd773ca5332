"""What every format module shares: the Artifact record, the Runner contract, typed errors.

A format module (exporters/<format>.py) has this small surface:

    FORMAT = "onnx"
    REQUIRES = {"keras": (), "torch": ()}     # formats whose artifacts this one is converted from
    RUNTIMES = ("onnxruntime",)               # runtimes that load it; the first is the default
    LANE = {"keras": "tensorflow", "torch": "torch"}   # which side's process runs the converter
    RUNTIME_LANE = "any"                      # which side's process loads the artifact ("any": no framework)
    export(model, *, framework, name, example, out_dir, upstream, options, expected) -> list[Artifact]
    load(artifact, runtime=None) -> Runner    # numpy in, numpy out

`model` is the in-memory framework model (keras.Model or torch.nn.Module), or None for a route that
converts an upstream artifact (so a TensorFlow-side process never imports torch, and the reverse);
`expected` the trained model's outputs on `example`, a float32 batch of real inputs; `upstream` maps each REQUIRED format to its artifacts; `options` holds per-format
settings from the spec (e.g. litert "batch_sizes", "calibration" rows for int8).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class ExportError(RuntimeError):
    """A converter failed; says which model, which format and which route."""


class ArtifactLoadError(RuntimeError):
    """An artifact could not be loaded in its runtime (missing, truncated or corrupt)."""


@dataclass
class Artifact:
    model: str                      # the spec's model name
    format: str                     # saved_model | torchscript | onnx | litert | tfjs
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


class Runner(Protocol):
    runtime: str                    # e.g. "onnxruntime-cpu", "tfjs-node-wasm"

    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


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
