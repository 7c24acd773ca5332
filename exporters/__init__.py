"""The formats, listed once: FORMATS, in the order reports show them (stages run a format after those it is
converted from, whatever this order). Each is one module, exporters/<format>.py, that writes its format and loads it into a runner
(exporters/base.py), and declares, importing no converter:

    FORMAT = "litert"                    # its name in specs, records and bundles
    VARIANTS = ("fp32", "fp16", "int8")  # the artifacts it writes per model (("fp32",) when absent), each
    PRECISION = {"xnnpack": "fp32"}      #   judged by parity's tolerance for its precision: the variant's own
                                         #   name unless PRECISION says (ExecuTorch's delegates are all fp32)
    RUNTIMES = ("litert-interpreter",)   # where its artifacts run, the default first
    OPTIONS = ("int8_fallback", ...)     # what a spec's [export.<format>] table may say (() when absent)
    SUFFIXES = (".tflite",)              # how a file of it is told (a folder: its marker file, MARKER)
    REQUIRES = {family: (format, ...)}   # per model family: the formats it is converted from
    LANE = {family: lane}                # per model family: the worker that converts
    RUNTIME_LANE = "any"                 # the worker that loads the artifact ("any": none in particular)
    CONVERTER_PACKAGES, RUNTIME_PACKAGES # the distributions whose versions key its stages

Every other place reads these (tests/test_format_registry.py lists the places that name formats), so a new
format is its module and its name here.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

FORMATS = ("saved_model", "torchscript", "onnx", "litert", "tfjs", "executorch")
# made only when a spec's [export] formats names them: ExecuTorch lowers torch models alone, so by default
# every other model would carry a refused cell
OPT_IN = ("executorch",)


def module(fmt: str) -> ModuleType:
    """The format's module, imported on first use (format modules import their converters lazily)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return importlib.import_module(f"exporters.{fmt}")


def variants(fmt: str) -> tuple[str, ...]:
    return tuple(getattr(module(fmt), "VARIANTS", ("fp32",)))


def precision(fmt: str, variant: str) -> str:
    """The precision a variant computes in: which of parity's tolerances judges it."""
    return getattr(module(fmt), "PRECISION", {}).get(variant, variant)


def by_default() -> tuple[str, ...]:
    """The formats a spec exports when its [export] formats names none."""
    return tuple(f for f in FORMATS if f not in OPT_IN)


def runtimes(fmt: str) -> tuple[str, ...]:
    return tuple(module(fmt).RUNTIMES)


def options(fmt: str) -> tuple[str, ...]:
    return tuple(getattr(module(fmt), "OPTIONS", ()))


def format_of(path: Path) -> str | None:
    """The format of an artifact file or folder, told by its suffix or the marker file a folder holds."""
    path = Path(path)
    for fmt in FORMATS:
        mod = module(fmt)
        marker = getattr(mod, "MARKER", None)
        if path.is_dir() and marker and (path / marker).is_file() or \
                path.is_file() and path.suffix in getattr(mod, "SUFFIXES", ()):
            return fmt
    return None
