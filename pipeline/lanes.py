"""The worker lanes: a process per lane runs its stages, with what it imports first and what its environment
must say before any framework loads. "tensorflow" and "torch" are the two sides of most runs; a framework
module may declare a lane of its own with the environment it needs (LANE_ENVIRONMENT): Keras on JAX or
PyTorch, because Keras reads KERAS_BACKEND once, when it is first imported."""
from __future__ import annotations

import importlib
import os

WARM_IMPORTS = {"tensorflow": ("tensorflow", "keras"), "torch": ("torch",)}  # the two sides' frameworks


def _declaring(lane: str | None) -> list:
    """The framework modules whose models train in this lane (read without importing a framework)."""
    import frameworks
    return [mod for mod in map(frameworks.module, frameworks.names()) if mod.LANE == lane]


def environment(lane: str | None) -> dict[str, str]:
    """What a lane's process must have in its environment before it imports anything."""
    return {k: v for mod in _declaring(lane) for k, v in getattr(mod, "LANE_ENVIRONMENT", {}).items()}


def warm_imports(lane: str | None) -> tuple[str, ...]:
    """The modules a lane's process imports while the parent prepares: the two sides' frameworks, or the
    packages of the frameworks that declare the lane."""
    if lane in WARM_IMPORTS:
        return WARM_IMPORTS[lane]
    return tuple(dict.fromkeys(p for mod in _declaring(lane) for p in mod.PACKAGES))


def enter(lane: str | None, warm: bool = True) -> None:
    """Make this process the lane's: its environment set, then (warm) its frameworks imported."""
    os.environ.update(environment(lane))
    if warm:
        for module in warm_imports(lane):
            importlib.import_module(module)


def foreign(lanes) -> list[str]:
    """The lanes this process cannot run stages of: those whose environment differs from its own
    (a Keras backend other than the one this process would import)."""
    return sorted(lane for lane in lanes if lane and
                  any(os.environ.get(k) != v for k, v in environment(lane).items()))
