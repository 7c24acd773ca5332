"""The frameworks a model comes from, one module each (frameworks/<name>.py), as exporters/ has one
module per format. A framework module declares, without importing its framework (the spec reads these
declarations before any worker starts):

    NAME = "lightning"                  # what a spec's `framework = ...` says
    FAMILY = "torch"                    # what the exporters dispatch on: "tensorflow" (a TensorFlow graph:
                                        #   a Keras model or a tf.Module), "torch" (an nn.Module) or "jax"
                                        #   (a function with its parameter pytree)
    LANE = "torch"                      # the worker process that runs it: "tensorflow" or "torch", or a lane
    LANE_ENVIRONMENT = {...}            #   of its own whose process starts with this environment (optional;
                                        #   pipeline/lanes.py): Keras on JAX sets KERAS_BACKEND=jax
    PACKAGES = ("torch", "lightning")   # top-level modules it needs, checked without importing them
    INSTALL = "pip install lightning"   # what to run when they are missing
    PRETRAINED_SUFFIXES = (".pt",)      # the files `source =` may name; () when none
    PRETRAINED_FOLDER = ("config.json", "a Hugging Face save_pretrained folder")  # optional: a folder
                                        # `source =` may name, told by the file inside it
    FLAVOR = "pytorch"                  # the MLflow flavor its native model is saved with
    PRECISIONS = ("fp32", "bf16")       # what `[train] precision` may say (fp32 only when absent), with
                                        #   NOT_MIXED saying why the others are not built (frameworks/precision.py)
    DISTRIBUTION = "lightning-ddp"      # how `[train] workers = N` trains it on N processes (a kind in
                                        #   frameworks/distributed.py; the adapter's train_rank is one rank),
                                        #   or None, with NOT_DISTRIBUTED saying why it cannot
    class Adapter                       # check, build, train, predict, signature, save, load,
                                        # load_pretrained, save_pretrained, perturbed, mlflow_form

A new framework is one new module here (plus its tests); nothing else names frameworks.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from functools import lru_cache
from types import ModuleType

_HELPERS = {"base", "distributed", "dist_worker", "mirrored", "precision"}  # modules of this package that are not frameworks


class UnknownFramework(ValueError):
    user_error = True


class FrameworkNotInstalled(RuntimeError):
    """The framework's packages are missing here: says which and what to install."""
    user_error = True


@lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """Every framework, found as this package's modules (nothing imported)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__)
                        if not m.name.startswith("_") and m.name not in _HELPERS))


def module(name: str) -> ModuleType:
    if name not in names():
        raise UnknownFramework(f"unknown framework {name!r}: expected one of {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")


def missing_packages(name: str) -> list[str]:
    """The framework's modules that are not installed here (found without importing them)."""
    return [p for p in module(name).PACKAGES if importlib.util.find_spec(p) is None]


def require(name: str) -> ModuleType:
    """The framework's module, refusing one whose packages are missing with what to install."""
    mod = module(name)
    missing = missing_packages(name)
    if missing:
        raise FrameworkNotInstalled(f"framework {name!r} needs {', '.join(missing)}, which "
                                    f"{'is' if len(missing) == 1 else 'are'} not installed here; "
                                    f"install with: {mod.INSTALL}")
    return mod


def adapter(name: str):
    return require(name).Adapter()


def takes_folder(name: str, path) -> bool:
    """Whether `source =` may name this folder for the framework (its marker file is inside)."""
    from pathlib import Path
    marker = getattr(module(name), "PRETRAINED_FOLDER", None)
    return bool(marker) and Path(path).is_dir() and (Path(path) / marker[0]).is_file()


def for_file(path) -> str | None:
    """The framework that loads this model file or folder: the first whose folder marker or file
    suffix it has (None when none does)."""
    from pathlib import Path
    path = Path(path)
    return next((fw for fw in names() if takes_folder(fw, path)), None) or \
        next((fw for fw in names() if path.suffix in module(fw).PRETRAINED_SUFFIXES), None)


def pretrained_forms(name: str) -> str:
    """What `source =` may name for the framework, for a message."""
    mod = module(name)
    forms = [f"a {name} model file ({', '.join(mod.PRETRAINED_SUFFIXES)})"] if mod.PRETRAINED_SUFFIXES else []
    folder = getattr(mod, "PRETRAINED_FOLDER", None)
    if folder:
        forms.append(f"{folder[1]} (with {folder[0]})")
    return ", or ".join(forms)


def family(name: str) -> str:
    return module(name).FAMILY


def lane(name: str) -> str:
    return module(name).LANE
