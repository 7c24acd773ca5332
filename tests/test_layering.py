"""The arrows run one way: pipeline -> frameworks, exporters, serving, edge -> parity (frameworks may
use exporters.base's helpers). Read from the source (every
import statement, at any depth), so a lazy import inside a function counts as much as one at the top."""
import ast
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

STDLIB = set(sys.stdlib_module_names)
# package -> top-level modules it must never import
FORBIDDEN = {
    "frameworks": {"pipeline", "serving", "edge", "mlflow"},
    "exporters": {"pipeline", "frameworks", "serving", "edge", "mlflow"},
    "serving": {"pipeline", "frameworks", "mlflow"},
    "edge": {"pipeline", "frameworks", "mlflow"},
    "parity": {"pipeline", "frameworks", "exporters", "serving", "edge", "mlflow"},
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports (relative imports resolved to their package)."""
    package = path.relative_to(ROOT).parts[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else (node.module or "").split(".")[0])
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_arrow_runs_back(package):
    wrong = {f"{p.relative_to(ROOT)} imports {m}" for p in sources(package)
             for m in imported_modules(p) & FORBIDDEN[package]}
    assert not wrong, sorted(wrong)


def test_parity_imports_numpy_and_the_standard_library_only():
    allowed = STDLIB | {"numpy", "parity", "__future__"}
    wrong = {f"{p.relative_to(ROOT)} imports {m}" for p in sources("parity") for m in imported_modules(p) - allowed}
    assert not wrong, sorted(wrong)


def test_mlflow_is_called_from_the_tracking_module_only():
    """MLflow's API is called by pipeline/tracking.py alone (the tracking server module starts `mlflow
    server` as a program and imports nothing of it)."""
    callers = {p.relative_to(ROOT).as_posix() for package in ("pipeline", "frameworks", "exporters", "serving",
                                                               "edge", "parity")
               for p in sources(package) if "mlflow" in imported_modules(p)}
    assert callers == {"pipeline/tracking.py"}, sorted(callers)


def test_the_check_catches_a_wrong_arrow(tmp_path):
    bad = ROOT / "exporters" / "_arrow_probe.py"
    bad.write_text("def f():\n    from pipeline import api\n    import mlflow.pyfunc\n")
    try:
        assert {"pipeline", "mlflow"} <= imported_modules(bad)
    finally:
        bad.unlink()


def test_the_edge_extra_and_the_agent_stay_small():
    """A device installs `.[edge]` alone: no TensorFlow, torch or MLflow in it, and nothing the agent
    imports needs more than it (read from the source, as above)."""
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    edge_extra = {d.split("=")[0].split("<")[0].split(">")[0].strip().lower() for d in
                  project["dependencies"] + project["optional-dependencies"]["edge"]}
    assert not edge_extra & {"tensorflow", "torch", "mlflow", "tf-keras", "keras"}, edge_extra
    allowed = STDLIB | {"numpy", "cryptography", "aiohttp", "ai_edge_litert", "parity", "exporters", "edge", "__future__"}
    agent_side = ["agent.py", "package.py", "keys.py", "client.py", "__main__.py", "__init__.py"]
    wrong = {f"edge/{f} imports {m}" for f in agent_side for m in imported_modules(ROOT / "edge" / f) - allowed}
    assert not wrong, sorted(wrong)


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Which of a package's modules each of its modules imports, at any depth (a lazy import counts)."""
    def name_of(path: Path) -> str:
        parts = list(path.relative_to(root).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {name_of(p): p for p in sorted((root / package).rglob("*.py"))}
    graph = {}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                parts = here.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every set of modules that import one another round a loop (Tarjan's strongly connected components)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_pipeline_s_modules_import_no_one_round_a_loop():
    assert cycles(module_graph(ROOT, "pipeline")) == []


def test_the_loop_check_finds_a_loop_through_a_lazy_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "api.py").write_text("from .gate import check\n")
    (tmp_path / "pkg" / "gate.py").write_text("def check():\n    from .api import run\n")
    (tmp_path / "pkg" / "alone.py").write_text("from . import api\n")
    assert cycles(module_graph(tmp_path, "pkg")) == [["pkg.api", "pkg.gate"]]


def test_a_step_never_imports_the_graph_that_names_it():
    """pipeline/steps/ holds the stage bodies; their keys hash their own code, not the graph's, so a
    step that read the graph module would run code its key does not hash."""
    graph = module_graph(ROOT, "pipeline")
    wrong = {f"{m} imports {t}" for m, targets in graph.items() if m.startswith("pipeline.steps")
             for t in targets if t in ("pipeline.stages", "pipeline.api", "pipeline.gate", "pipeline.runner",
                                       "pipeline.executors")}
    assert not wrong, sorted(wrong)
