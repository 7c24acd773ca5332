"""The arrows run one way: pipeline -> exporters, serving, edge -> parity. Read from the source (every
import statement, at any depth), so a lazy import inside a function counts as much as one at the top."""
import ast
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

STDLIB = set(sys.stdlib_module_names)
# package -> top-level modules it must never import
FORBIDDEN = {
    "exporters": {"pipeline", "serving", "edge", "mlflow"},
    "serving": {"pipeline", "mlflow"},
    "edge": {"pipeline", "mlflow"},
    "parity": {"pipeline", "exporters", "serving", "edge", "mlflow"},
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


def test_the_check_catches_a_wrong_arrow(tmp_path):
    bad = ROOT / "exporters" / "_arrow_probe.py"
    bad.write_text("def f():\n    from pipeline import api\n")
    try:
        assert "pipeline" in imported_modules(bad)
    finally:
        bad.unlink()
