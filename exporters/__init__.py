"""One module per format; each writes its format and loads it into a runner (see exporters/base.py)."""
from __future__ import annotations

import importlib
from types import ModuleType

FORMATS = ("saved_model", "torchscript", "onnx", "litert", "tfjs")


def module(fmt: str) -> ModuleType:
    """The format's module, imported on first use (format modules import their frameworks lazily)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return importlib.import_module(f"exporters.{fmt}")
