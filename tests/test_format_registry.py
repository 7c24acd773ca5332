"""One registry of formats: exporters/__init__.py lists them (FORMATS) and each format's module declares the
rest (variants, runtimes, options, what it converts from, where it runs); every other place reads those, so
adding a format touches its module and the registry only."""
import ast

import exporters
import frameworks
from parity.compare import VARIANTS

from .conftest import ROOT

PACKAGES = ("pipeline", "parity", "edge", "serving", "exporters", "frameworks", "benchmarks", "scripts")
# where a list of formats or of variants may be written: the registry, and the declarations it reads
ALLOWED = {("exporters/__init__.py", "formats"), ("exporters/litert.py", "variants"),
           ("parity/compare.py", "variants"),
           ("frameworks/precision.py", "variants")}  # what training computes in (fp32, bf16, fp16), not artifacts


def named_lists(tree: ast.AST, names: set[str]):
    """Each tuple, list or set literal holding two or more of `names` as strings, with its line."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            found = {e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in names}
            if len(found) >= 2:
                yield node.lineno, sorted(found)


def places_naming(kinds: dict[str, set[str]]) -> list[tuple[str, str, int, list[str]]]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            tree = ast.parse(path.read_text(), rel)
            for kind, names in kinds.items():
                found += [(rel, kind, line, hit) for line, hit in named_lists(tree, names)]
    return found


def test_only_the_registry_lists_the_formats_and_only_their_declarations_list_variants():
    found = places_naming({"formats": set(exporters.FORMATS), "variants": set(VARIANTS)})
    wrong = [f for f in found if (f[0], f[1]) not in ALLOWED]
    assert not wrong, "formats or variants listed outside the registry: " + "; ".join(
        f"{rel}:{line} {kind} {hit}" for rel, kind, line, hit in wrong)
    assert ("exporters/__init__.py", "formats") in {(f[0], f[1]) for f in found}  # the scan sees the registry


def test_the_scan_finds_a_list_of_formats_written_elsewhere():
    """The check above can fail: a module that writes its own list is found."""
    tree = ast.parse('KNOWN = ("onnx", "tfjs")\nONE = ("onnx",)\nCALL = f("onnx", x)\n')
    assert list(named_lists(tree, set(exporters.FORMATS))) == [(1, ["onnx", "tfjs"])]


def test_every_format_module_declares_what_the_registry_reads():
    families = {frameworks.family(n) for n in frameworks.names()}
    for fmt in exporters.FORMATS:
        mod = exporters.module(fmt)
        assert mod.FORMAT == fmt
        precisions = {exporters.precision(fmt, v) for v in exporters.variants(fmt)}
        assert exporters.runtimes(fmt) and precisions <= set(VARIANTS) and "fp32" in precisions, fmt
        assert set(mod.REQUIRES) == set(mod.LANE) == families, (fmt, families ^ set(mod.LANE))
        for family, sources in mod.REQUIRES.items():  # converted only from formats there are
            assert set(sources) <= set(exporters.FORMATS) - {fmt}, (fmt, family)
        assert mod.RUNTIME_LANE and callable(mod.export), fmt
        assert getattr(mod, "SUFFIXES", ()) or getattr(mod, "MARKER", None), fmt


def test_an_artifact_file_is_told_by_its_formats_declaration(tmp_path):
    (tmp_path / "m.tflite").write_bytes(b"x")
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"x")
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "model.json").write_text("{}")
    assert exporters.format_of(tmp_path / "m.tflite") == "litert"
    assert exporters.format_of(tmp_path / "sm") == "saved_model" and exporters.format_of(tmp_path / "web") == "tfjs"
    assert exporters.format_of(tmp_path / "m.bin") is None
