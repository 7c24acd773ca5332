#!/usr/bin/env python
"""The mutation check: put one small bug at a time into the modules whose failures would give a wrong
verdict (parity/, the cache, spec and data checks, how artifacts are fed, bundles, exit codes) and
see whether a test notices. Prints every surviving mutant as a table.

    .venv/bin/python scripts/mutation.py [--max-children 2] [--keep]

Configured in pyproject.toml ([tool.mutmut]); installs its pinned tools (requirements-mutation.txt)
into the running venv on first use. Survivors listed in scripts/mutation_equivalents.txt (mutant
name, then why no test can tell it from the original) are shown as equivalent, not as gaps.
Not part of CI: it takes minutes. Run it before calling an issue on those modules done.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS = ROOT / "scripts" / "mutation_equivalents.txt"


def ensure_mutmut() -> None:
    try:
        import mutmut  # noqa: F401
    except ImportError:
        print("installing the mutation tools (requirements-mutation.txt) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-r", "requirements-mutation.txt",
                        "-c", "constraints.txt"], cwd=ROOT, check=True)


def mutmut(*args: str, capture: bool = True) -> str:
    exe = Path(sys.executable).with_name("mutmut")
    r = subprocess.run([str(exe), *args], cwd=ROOT, text=True, capture_output=capture)
    if r.returncode not in (0, 1):
        raise SystemExit(f"mutmut {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout or ""


def equivalents() -> dict[str, str]:
    known = {}
    if EQUIVALENTS.is_file():
        for line in EQUIVALENTS.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, _, why = line.partition(" ")
                known[name] = why.strip()
    return known


_sources: dict[str, dict[str, str]] = {}


def changed_line(name: str) -> str:
    """The mutated line of a mutant: its function in mutants/ set beside the original one."""
    import ast
    import difflib
    module, _, fn = name.rpartition(".")
    if module not in _sources:
        path = ROOT / "mutants" / (module.replace(".", "/") + ".py")
        text = path.read_text()
        lines = text.splitlines()
        _sources[module] = {n.name: [re.sub(r"__mutmut_\w+", "", ln) for ln in lines[n.lineno - 1:n.end_lineno]]
                            for n in ast.walk(ast.parse(text))
                            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    funcs = _sources[module]
    orig = funcs.get(fn.rpartition("__mutmut_")[0] + "__mutmut_orig", [])
    mutant = funcs.get(fn, [])
    changed = [ln[1:].strip() for ln in difflib.ndiff(orig, mutant) if ln.startswith("+ ")]
    return changed[0] if changed else "?"


def function_of(name: str) -> str:
    """'parity.compare.x_compare__mutmut_12' -> 'parity.compare.compare'; methods as Class.method."""
    module, _, rest = name.rpartition("__mutmut_")[0].rpartition(".")
    return f"{module}.{rest.removeprefix('x_').removeprefix('xǁ').replace('ǁ', '.')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="reuse results of an earlier run (mutants/)")
    args = ap.parse_args()
    ensure_mutmut()
    if not args.keep:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    t0 = time.perf_counter()
    mutmut("run", "--max-children", str(args.max_children), capture=False)
    elapsed = time.perf_counter() - t0
    results = {}
    for line in mutmut("results", "--all", "true").splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m:
            results[m.group(1)] = m.group(2).strip()
    counts: dict[str, int] = {}
    for status in results.values():
        counts[status] = counts.get(status, 0) + 1
    known = equivalents()
    survivors = [n for n, s in results.items() if s == "survived"]
    print(f"\n{len(results)} mutants in {elapsed:.0f} s: "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"survivors: {len(survivors)} ({sum(n in known for n in survivors)} listed as equivalent)\n")
    gaps = [n for n in survivors if n not in known]
    by_function: dict[str, list[str]] = {}
    for name in sorted(gaps):
        by_function.setdefault(function_of(name), []).append(name)
    report = ROOT / "mutants" / "survivors.md"
    rows = ["| mutant | equivalent? | mutated line |", "|---|---|---|"]
    for name in sorted(survivors):
        line = changed_line(name).replace("|", "\\|")
        rows.append(f"| `{name}` | {'yes: ' + known[name] if name in known else 'NO'} | `{line[:120]}` |")
    report.write_text("\n".join(rows) + "\n")
    if by_function:
        print("| function | surviving mutants | for example |")
        print("|---|---|---|")
        for fn, names in sorted(by_function.items(), key=lambda kv: -len(kv[1])):
            example = changed_line(names[0]).replace("|", "\\|")
            print(f"| `{fn}` | {len(names)} | `{example[:90]}` |")
    print(f"\nevery survivor with its mutated line: {report}")
    sys.exit(1 if gaps else 0)


if __name__ == "__main__":
    main()
