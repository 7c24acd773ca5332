"""The source files a stage's output depends on, found by reading imports rather than listed by hand.

A stage's key hashes its code (pipeline/cache.py code_version). Starting from the files that do a
stage's work (an exporter, a runtime, the serving or edge modules), every import of the toolkit's
own step packages is followed, at module level or inside a function, absolute or relative, with the
packages' `__init__.py` on the way: a file the stage can run is in its key. The orchestration in
`pipeline/` is not followed (the spec parser, the runner and the executors decide *which* settings a
stage gets, and its key hashes those settings); the pipeline modules that hold a stage's body are
named as roots by the stage.
"""
from __future__ import annotations

import ast
import functools

from .cache import PACKAGE_ROOT

FOLLOWED = ("exporters", "parity", "serving", "edge", "frameworks")


def closure(*roots: str) -> tuple[str, ...]:
    """`roots` (paths relative to the package root) and every toolkit file they import, sorted."""
    return _closure(tuple(sorted(set(roots))))


@functools.lru_cache(maxsize=None)
def _closure(roots: tuple[str, ...]) -> tuple[str, ...]:
    found: set[str] = set()
    todo = list(roots)
    for root in roots:  # importing a module runs its packages' __init__.py first
        name = root.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        if root.endswith(".py") and name.split(".")[0] in FOLLOWED:
            todo += _files_of(name)
    while todo:
        rel = todo.pop()
        if rel in found:
            continue
        found.add(rel)
        if rel.endswith(".py"):
            todo.extend(f for f in _imported_files(rel) if f not in found)
    return tuple(sorted(found))


@functools.lru_cache(maxsize=None)
def _imported_files(rel: str) -> tuple[str, ...]:
    path = PACKAGE_ROOT / rel
    tree = ast.parse(path.read_text(), filename=str(path))
    package = rel.rsplit("/", 1)[0].replace("/", ".") if "/" in rel else ""
    if rel.endswith("/__init__.py"):
        package = rel[: -len("/__init__.py")].replace("/", ".")
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module or "", node.level, package)
            names.append(base)
            names += [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
    files: list[str] = []
    for name in names:
        if name.split(".")[0] in FOLLOWED:
            files += _files_of(name)
    return tuple(files)


def _absolute(module: str, level: int, package: str) -> str:
    if not level:
        return module
    parts = package.split(".")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _files_of(name: str) -> list[str]:
    """The files importing `name` runs: each package's __init__.py on the way, then the module itself."""
    parts = name.split(".")
    files = []
    for i in range(1, len(parts) + 1):
        stem = "/".join(parts[:i])
        if (PACKAGE_ROOT / stem / "__init__.py").is_file():
            files.append(f"{stem}/__init__.py")
        elif (PACKAGE_ROOT / f"{stem}.py").is_file():
            files.append(f"{stem}.py")
            break
        else:
            break  # a name imported from a module (a function, a class): not a file
    return files


@functools.lru_cache(maxsize=None)
def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def package_versions(distributions) -> dict[str, str]:
    """The installed version of each distribution (a converter, a runtime, a framework), for a stage's
    key: an upgrade makes the stages it decides run again. A few milliseconds for a whole spec."""
    return {d: _version(d) for d in sorted(set(distributions))}
