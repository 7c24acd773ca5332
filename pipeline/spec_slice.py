"""What a stage reads of its spec, as plain data. A stage carries its slice (not the spec's path to
reload) and its key hashes that slice, so editing a part of the spec a stage does not read reuses its
entry, and editing a part it reads never does. A step reading a field its slice does not carry fails
loudly (NOT_CARRIED) instead of reading a value its key never saw.

A slice names fields as "section.field" ("parity.max_batch") or whole sections ("parity", "seed"),
and the models it reads (their fields, less any named in `drop_model`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .spec import Bound, DataSpec, ModelSpec, ParitySpec, Spec, TrainSettings

SECTIONS = {"data": DataSpec, "parity": ParitySpec}
PLAIN = ("seed", "formats", "deploy")  # plain values, carried whole


class NotCarried:
    """A field a stage's slice does not carry: any use of it is a bug in the stage graph."""

    def __init__(self, field: str):
        self._field = field

    def _refuse(self, *_: Any, **__: Any):
        raise RuntimeError(f"spec field {self._field} is read by a stage whose slice does not carry it "
                           f"(pipeline/stages.py decides what each stage carries and hashes)")

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self._refuse()

    __bool__ = __iter__ = __len__ = __getitem__ = __int__ = __float__ = __index__ = __contains__ = _refuse
    __call__ = _refuse


def spec_slice(spec: Spec, *fields: str, models: tuple[ModelSpec, ...] = (), drop_model: tuple[str, ...] = (),
               cell: tuple[str, str] | None = None) -> dict:
    """The named fields of `spec` (and its models') as JSON-able data, with the spec's name and path.
    With `cell` (model, format), [parity] allow_unsupported keeps only that cell's entries."""
    out: dict[str, Any] = {"name": spec.name, "path": str(spec.path)}
    for f in fields:
        section, _, name = f.partition(".")
        value = getattr(spec, section)
        if section in SECTIONS:
            chosen = dataclasses.asdict(value)
            out.setdefault(section, {}).update({name: chosen[name]} if name else chosen)
        elif section in PLAIN and not name:
            out[section] = list(value) if isinstance(value, tuple) else value
        elif section == "deploy":  # one target's table
            out.setdefault(section, {}).update({name: value[name]} if name in value else {})
        else:
            raise ValueError(f"no spec field {f!r}; expected one of {', '.join((*SECTIONS, *PLAIN))}[.field]")
    if models:
        out["models"] = [{k: v for k, v in dataclasses.asdict(m).items() if k not in drop_model} for m in models]
    if cell and "allow_unsupported" in out.get("parity", {}):
        out["parity"]["allow_unsupported"] = [c for c in out["parity"]["allow_unsupported"]
                                              if c == "/".join(cell) or c.startswith("/".join(cell) + "-")]
    return out


def hashed(slice_: dict) -> dict:
    """The slice as the key sees it: without the spec's path (moving a spec folder retrains nothing;
    the factories' sources are hashed by content)."""
    return {k: v for k, v in slice_.items() if k != "path"}


def from_slice(slice_: dict) -> Spec:
    """A Spec holding what the slice carries; every other field is NOT_CARRIED."""
    return Spec(name=slice_["name"], path=Path(slice_["path"]),
                seed=slice_.get("seed", NotCarried("seed")),
                data=_section(DataSpec, "data", slice_.get("data")),
                models=tuple(map(_model, slice_["models"])) if "models" in slice_ else NotCarried("models"),
                formats=tuple(slice_["formats"]) if "formats" in slice_ else NotCarried("formats"),
                parity=_section(ParitySpec, "parity", slice_.get("parity")),
                deploy=slice_.get("deploy", NotCarried("deploy")), raw={})


def _section(cls, name: str, values: dict | None):
    if values is None:
        return NotCarried(name)
    kwargs = {f.name: NotCarried(f"{name}.{f.name}") for f in dataclasses.fields(cls)}
    kwargs.update(values)
    if cls is ParitySpec:
        for key in ("input_range", "allow_unsupported"):
            if values.get(key) is not None:
                kwargs[key] = tuple(values[key])
    return cls(**kwargs)


def _model(values: dict) -> ModelSpec:
    kwargs = {f.name: NotCarried(f"model.{f.name}") for f in dataclasses.fields(ModelSpec)}
    kwargs.update(values)
    if values.get("train") is not None:
        kwargs["train"] = TrainSettings(**values["train"])
    if "accept" in values:
        kwargs["accept"] = tuple(Bound(**b) for b in values["accept"])
    if "litert_batch_sizes" in values:
        kwargs["litert_batch_sizes"] = tuple(values["litert_batch_sizes"])
    return ModelSpec(**kwargs)
