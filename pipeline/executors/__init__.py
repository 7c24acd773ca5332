"""Executors, found by name: `pipeline.executors.<name>` is a module whose EXECUTOR is an Executor
subclass, so adding one (Ray, Dask, ...) is one new file here and nothing else."""
from __future__ import annotations

import importlib
import pkgutil

from .base import Event, Executor, Finished, LogLine, Note, Progress, Result, Started  # noqa: F401

DEFAULT = "local"


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


def executor_class(name: str) -> type[Executor]:
    """The executor called `name`; a clear error naming the ones there are."""
    if name not in names():
        raise ValueError(f"unknown executor {name!r}: expected one of {', '.join(names())}")
    cls = getattr(importlib.import_module(f"{__name__}.{name}"), "EXECUTOR", None)
    if not (isinstance(cls, type) and issubclass(cls, Executor)):
        raise ValueError(f"pipeline.executors.{name}: expected EXECUTOR to be an Executor subclass, found {cls!r}")
    return cls
