#!/usr/bin/env python
"""Run the `styles` spec (the toy in every training style) and write each style's outcome, trained line
and every cell's verdict, into the README between its styles markers. The table is generated, never typed.

    .venv/bin/python scripts/styles_table.py              # a cold `run styles` in a scratch home (minutes)
    .venv/bin/python scripts/styles_table.py --home DIR   # the latest run of styles in DIR's home
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_table import COLUMN_KEYS, COLUMNS, README, ROOT, cell  # noqa: E402 - the zoo's cells, the same columns

START, END = "<!-- styles:start -->", "<!-- styles:end -->"


def latest_styles_run(home: Path) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted((home / ".pipeline" / "runs").glob("*.json"))]
    runs = [r for r in runs if r["spec"] == "styles"]
    if not runs:
        raise SystemExit(f"{home}: no run of the styles spec; run `python -m pipeline run styles` there first")
    return runs[-1]


def table(rec: dict) -> str:
    parity = json.loads((Path(rec["report_dir"]) / "parity.json").read_text())
    train = {s["name"].split(":", 1)[1]: s for s in rec["stages"] if s["kind"] == "train"}
    rows = ["| style | trained | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for name, info in rec["models"].items():
        m, facts = info.get("metrics", {}), train[name]["facts"]
        trained = (f"slope {m['slope']:.4f}, intercept {m['intercept']:.4f}, {facts['epochs']} epochs"
                   if "slope" in m else info.get("error", "not trained"))
        cells = {f"{r['format']}-{r['variant']}@{r.get('runtime') or '-'}": cell(r)
                 for r in parity["records"] if r["model"] == name}
        shown = [cells.get(c) or cells.get(c.split("@")[0] + "@-", "-") for c in COLUMN_KEYS]
        rows.append(f"| {name} ({info['framework']}) | {trained} | " + " | ".join(shown) + " |")
    reasons = sorted({f"- {r['model']}/{r['format']}: {(r.get('error') or r.get('message') or '')[:300]}"
                      for r in parity["records"] if (r.get("details") or {}).get("outcome") == "unsupported"})
    return "\n".join(rows + ([""] + ["UNSUPPORTED, with the converter's reason:"] + reasons if reasons else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, help="a home whose latest styles run to read (default: run it afresh)")
    args = ap.parse_args()
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README}: expected the markers {START} and {END}")
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp)
        if not args.home:
            env = {**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(ROOT)}
            subprocess.run([sys.executable, "-m", "pipeline", "run", "styles", "--no-track"], cwd=home, env=env,
                           check=False)
        body = table(latest_styles_run(home))
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{body}\n{END}", text, flags=re.S)
    README.write_text(new)
    print(body)


if __name__ == "__main__":
    main()
