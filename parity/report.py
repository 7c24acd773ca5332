"""The parity report: every record of a run, the discrimination of each model's parity set, and writers
for JSON (parity/SCHEMA.md), Markdown, JUnit XML and a terminal table.

Imports only the Python standard library, numpy (through parity.compare) and parity.compare.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .compare import (ParityRecord, _e, _f6, _jsonable, describe_discrimination)

SCHEMA_VERSION = "1"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class ParityReport:
    """All parity records of one run plus the discrimination of each model's parity set.

    `passed` is True when no record failed and at least one record was checked (a report of only
    skipped cells proves nothing). A non-discriminative parity set does not fail the report; it is
    listed in `warnings` and shown beside the verdicts.
    """
    records: list[ParityRecord] = field(default_factory=list)
    discrimination: dict[str, dict] = field(default_factory=dict)
    spec: str | None = None
    run_id: str | None = None
    created: str = field(default_factory=_now)
    metadata: dict[str, Any] = field(default_factory=dict)

    # -- views --------------------------------------------------------------------------------
    @property
    def failed_records(self) -> list[ParityRecord]:
        return [r for r in self.records if r.status == "failed"]

    @property
    def passed_records(self) -> list[ParityRecord]:
        return [r for r in self.records if r.status == "passed"]

    @property
    def skipped_records(self) -> list[ParityRecord]:
        return [r for r in self.records if r.status == "skipped"]

    @property
    def passed(self) -> bool:
        return not self.failed_records and bool(self.passed_records)

    @property
    def inconclusive(self) -> list[str]:
        """Models whose parity set was measured and does not discriminate: their PASS proves little."""
        return [m for m, d in self.discrimination.items() if not d.get("discriminative")]

    @property
    def verdict(self) -> str:
        """"failed" (a record failed, or nothing was checked), "inconclusive" (every check passed on a
        parity set that cannot tell a right artifact from a wrong one) or "passed"."""
        if not self.passed:
            return "failed"
        return "inconclusive" if self.inconclusive else "passed"

    @property
    def counts(self) -> dict[str, int]:
        return {"total": len(self.records), "passed": len(self.passed_records),
                "failed": len(self.failed_records), "skipped": len(self.skipped_records),
                "errors": sum(1 for r in self.records if r.error is not None)}

    @property
    def models(self) -> list[str]:
        """Model names in first-seen order (records first, then discrimination-only models)."""
        return list(dict.fromkeys([r.model for r in self.records] + list(self.discrimination)))

    @property
    def warnings(self) -> list[str]:
        out = [f"parity set of {m} is not discriminative: {d.get('reason')}"
               for m, d in self.discrimination.items() if not d.get("discriminative")]
        out += [f"{m}: {d['task_hint']}" for m, d in self.discrimination.items() if d.get("task_hint")]
        if not self.passed_records and not self.failed_records:
            out.append("no artifact was checked")
        return out

    def add(self, record: ParityRecord) -> ParityRecord:
        self.records.append(record)
        return record

    def summary_line(self) -> str:
        c = self.counts
        return f"parity: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"

    # -- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return _jsonable({
            "schema_version": SCHEMA_VERSION,
            "kind": "parity-report",
            "spec": self.spec,
            "run_id": self.run_id,
            "created": self.created,
            "passed": self.passed,
            "verdict": self.verdict,
            "summary": self.summary_line(),
            "counts": self.counts,
            "warnings": self.warnings,
            "metadata": self.metadata,
            "records": [r.to_json() for r in self.records],
            "discrimination": self.discrimination,
        })

    def write_json(self, path) -> Path:
        return _write_atomic(Path(path), json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ParityReport":
        version = str(d.get("schema_version"))
        if version != SCHEMA_VERSION:
            raise ValueError(f"parity report: schema_version {d.get('schema_version')!r}, "
                             f"expected {SCHEMA_VERSION!r}")
        return cls(records=[ParityRecord.from_json(r) for r in d.get("records") or []],
                   discrimination={k: dict(v) for k, v in (d.get("discrimination") or {}).items()},
                   spec=d.get("spec"), run_id=d.get("run_id"), created=d.get("created") or _now(),
                   metadata=dict(d.get("metadata") or {}))

    @classmethod
    def from_json(cls, path) -> "ParityReport":
        """Read a report written by write_json (a path), or build one from an already parsed dict."""
        if isinstance(path, Mapping):
            return cls.from_dict(path)
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"parity report {p}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    # -- Markdown -----------------------------------------------------------------------------
    def to_markdown(self) -> str:
        title = "Parity report" + (f": {self.spec}" if self.spec else "")
        lines = [f"# {title}", ""]
        meta = [f"verdict **{ {'passed': 'PASS', 'failed': 'FAIL'}.get(self.verdict, 'INCONCLUSIVE') }**",
                self.summary_line()]
        if self.run_id:
            meta.append(f"run `{self.run_id}`")
        meta.append(f"created {self.created}")
        lines += [" · ".join(meta), ""]
        header = ["model", "format", "variant", "runtime", "max abs", "max rel", "cosine", "top-1",
                  "tolerance", "verdict"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join(["---"] * 4 + ["---:"] * 4 + ["---"] * 2) + "|")
        for r in self.records:
            m = r.comparison.metrics if r.comparison is not None else {}
            tol = r.comparison.tolerance.describe() if r.comparison is not None else "-"
            cells = [r.model, r.format, r.variant, r.runtime or "-",
                     _e(m.get("max_abs")) if m else "-", _e(m.get("max_rel")) if m else "-",
                     _f6(m.get("cosine")) if m else "-",
                     f"{m['top1_agreement']:.4f}" if "top1_agreement" in m else "-",
                     tol, _verdict(r)]
            lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
            for name, v in _per_output(r):  # a model of several outputs: each one's error too
                lines.append("| " + " | ".join(["", "", "", _md(f"output {name}"), _e(v), "", "", "", "", ""]) + " |")
        lines.append("")
        failed = self.failed_records
        lines += ["## Failures", ""]
        if not failed:
            lines += ["None.", ""]
        for r in failed:
            lines.append(f"- {_md(r.message)}")
            for f in (r.comparison.failures[1:] if r.comparison is not None else []):
                lines.append(f"  - also: {_md(f)}")
            if r.artifact:
                lines.append(f"  - artifact: `{r.artifact}`")
            lines += _layer_lines((r.details or {}).get("localization"))
        if failed:
            lines.append("")
        lines += self._artifact_lines()
        lines += self._profile_lines()
        lines += self._reproducibility_lines()
        lines += ["## Discrimination of the parity set", ""]
        if not self.discrimination:
            lines += ["Not measured.", ""]
        for model, d in self.discrimination.items():
            mark = "ok" if d.get("discriminative") else "INCONCLUSIVE, not discriminative"
            lines.append(f"- {mark}: {_md(describe_discrimination(model, d))}")
        if self.discrimination:
            lines.append("")
        return "\n".join(lines)

    def _reproducibility_lines(self) -> list[str]:
        """The files of these artifacts that their converter writes anew on every run (metadata
        `not_reproducible`: why -> the files, as artifact label: path), where two bundles of the same model differ."""
        found = self.metadata.get("not_reproducible") or {}
        if not found:
            return []
        lines = ["## Reproducibility", "",
                 "Bundles are written without timings or machine paths; only these files differ between two runs "
                 "from the same inputs, because their converter writes them anew:", ""]
        for why, files in found.items():
            lines.append(f"- {', '.join(f'`{_md(f)}`' for f in files)}: {_md(why)}")
        return lines + [""]

    def _profile_lines(self) -> list[str]:
        """Each passing artifact's speed and size in its runtime (exporters/profile.py)."""
        rows = [(r, (r.details or {}).get("profile")) for r in self.records]
        rows = [(r, p) for r, p in rows if p and "batch_1" in p]
        if not rows:
            return []
        lines = ["## Profile", "",
                 "Warm latency over a fixed number of repetitions (p99 / p50 is the spread); memory is the peak "
                 "of the process that ran it.", "",
                 "| artifact | runtime | size KiB | load ms | batch 1 p50 / p99 ms | batch N | p50 / p99 ms "
                 "| rows/s at N | peak MB | threads |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r, p in rows:
            b1, bn = p["batch_1"], p["max_batch"]
            size = f"{p['size_bytes'] / 1024:.1f}" if p.get("size_bytes") else "-"
            lines.append(f"| `{r.label}` | {r.runtime} | {size} | {p['load_ms']:.1f} | {b1['p50_ms']:.3f} / "
                         f"{b1['p99_ms']:.3f} | {bn['rows']} | {bn['p50_ms']:.3f} / {bn['p99_ms']:.3f} | "
                         f"{bn['rows_per_s']:,.0f} | {p['peak_rss_mb'] if p.get('peak_rss_mb') is not None else '-'} "
                         f"| {_md(p.get('threads', '-'))} |")
        return lines + [""]

    def _artifact_lines(self) -> list[str]:
        """How each artifact was made (from the records' details), with any converter note."""
        seen, lines = set(), []
        for r in self.records:
            d = r.details or {}
            if r.label in seen or not d.get("route"):
                continue
            seen.add(r.label)
            size = f", {d['size_bytes'] / 1024:.1f} KiB" if d.get("size_bytes") else ""
            batches = f", batch sizes {d['batch_sizes']}" if d.get("batch_sizes") else ", any batch"
            note = f". Note: {d['note']}" if d.get("note") else ""
            mapping = f". Mapping: {d['mapping']}" if d.get("mapping") else ""
            left = "".join(f". Route left: {x['route']}, because {_first_line(x['why'], 200)}"
                           for x in d.get("routes_left") or [])
            lines.append(f"- `{r.label}`: {_md(d['route'])}{size}{batches}{_md(mapping)}{_md(note)}{_md(left)}")
        return (["## Artifacts", ""] + lines + [""]) if lines else []

    def write_markdown(self, path) -> Path:
        return _write_atomic(Path(path), self.to_markdown() + "\n")

    # -- one self-contained HTML page -----------------------------------------------------------
    def to_html(self, plots: Iterable[Path] = ()) -> str:
        """The verdict, every record, the failures, the profiles and the plots (inlined as data URIs)
        in one file a person opens in a browser, with nothing else beside it."""
        import base64
        import html
        esc = html.escape
        verdict = {"passed": "PASS", "failed": "FAIL"}.get(self.verdict, "INCONCLUSIVE")
        head = ["model", "format", "variant", "runtime", "max abs", "cosine", "top-1", "verdict"]
        rows = []
        for r in self.records:
            m = r.comparison.metrics if r.comparison is not None else {}
            cells = [r.model, r.format, r.variant, r.runtime or "-", _e(m.get("max_abs")) if m else "-",
                     _f6(m.get("cosine")) if m else "-",
                     f"{m['top1_agreement']:.4f}" if "top1_agreement" in m else "-", _verdict(r)]
            rows.append(f'<tr class="{r.status}">' + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
        failures = "".join(f"<li>{esc(r.message)}</li>" for r in self.failed_records) or "<li>None.</li>"
        profile = _markdown_table_html(self._profile_lines())
        images = "".join(
            f'<figure><img alt="{esc(p.stem)}" src="data:image/png;base64,'
            f'{base64.b64encode(Path(p).read_bytes()).decode("ascii")}"><figcaption>{esc(p.stem)}</figcaption></figure>'
            for p in plots)
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(self.spec or "parity")}: {verdict}</title>
<style>body{{font-family:sans-serif;margin:1.5em;color:#222}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 7px;text-align:left}} tr.failed td{{background:#fde2e2}}
tr.skipped td{{color:#888}} .verdict{{font-size:1.3em;font-weight:bold}} img{{max-width:900px}}
figure{{display:inline-block;margin:0.5em}}</style></head><body>
<h1>Parity report{": " + esc(self.spec) if self.spec else ""}</h1>
<p class="verdict" id="verdict">{verdict}</p><p>{esc(self.summary_line())}{" · run " + esc(self.run_id) if self.run_id else ""}</p>
<table id="records"><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{"".join(rows)}</table>
<h2>Failures</h2><ul id="failures">{failures}</ul>
{profile}
<h2>Plots</h2><div id="plots">{images or "<p>None.</p>"}</div>
</body></html>
"""

    def write_html(self, path, plots: Iterable[Path] = ()) -> Path:
        return _write_atomic(Path(path), self.to_html(plots))

    # -- JUnit XML ----------------------------------------------------------------------------
    def to_junit(self) -> ET.Element:
        """One <testsuite> per model, one <testcase> per record. A comparison that failed is a
        <failure>; an artifact that could not be loaded or run is an <error>; a skipped cell is <skipped>."""
        root = ET.Element("testsuites", name="parity" + (f" {self.spec}" if self.spec else ""))
        totals = dict(tests=0, failures=0, errors=0, skipped=0, time=0.0)
        for model in self.models:
            recs = [r for r in self.records if r.model == model]
            suite = ET.SubElement(root, "testsuite", name=model, timestamp=self.created)
            n = dict(tests=len(recs), failures=0, errors=0, skipped=0, time=0.0)
            d = self.discrimination.get(model)
            if d is not None or self.run_id or self.spec:
                props = ET.SubElement(suite, "properties")
                for k, v in (("spec", self.spec), ("run_id", self.run_id)):
                    if v:
                        ET.SubElement(props, "property", name=k, value=str(v))
                ET.SubElement(props, "property", name="verdict", value=self.verdict)
                if d is not None:
                    ET.SubElement(props, "property", name="discriminative", value=str(bool(d.get("discriminative"))).lower())
                    ET.SubElement(props, "property", name="discrimination", value=describe_discrimination(model, d))
            for r in recs:
                case = ET.SubElement(suite, "testcase", classname=f"{r.model}.{r.format}",
                                     name=f"{r.variant}@{r.runtime or 'none'}", time=f"{r.elapsed_s:.3f}")
                n["time"] += r.elapsed_s
                if r.status == "skipped":
                    n["skipped"] += 1
                    ET.SubElement(case, "skipped", message=r.reason or "", type=r.skip or "excluded")
                elif r.error is not None:
                    n["errors"] += 1
                    el = ET.SubElement(case, "error", message=r.message, type="ArtifactError")
                    el.text = _details(r)
                elif r.status == "failed":
                    n["failures"] += 1
                    el = ET.SubElement(case, "failure", message=r.message, type="ParityMismatch")
                    el.text = _details(r)
                else:
                    ET.SubElement(case, "system-out").text = _details(r)
            for k in ("tests", "failures", "errors", "skipped"):
                suite.set(k, str(n[k]))
                totals[k] += n[k]
            suite.set("time", f"{n['time']:.3f}")
            totals["time"] += n["time"]
        for k in ("tests", "failures", "errors", "skipped"):
            root.set(k, str(totals[k]))
        root.set("time", f"{totals['time']:.3f}")
        return root

    def write_junit(self, path) -> Path:
        root = self.to_junit()
        ET.indent(root)
        text = ET.tostring(root, encoding="unicode", xml_declaration=False)
        return _write_atomic(Path(path), '<?xml version="1.0" encoding="UTF-8"?>\n' + text + "\n")


def _verdict(r: ParityRecord) -> str:
    if r.status == "skipped":
        return f"SKIPPED ({r.reason})"
    if r.status == "passed":
        return "PASS"
    if r.error is not None and (r.details or {}).get("outcome") == "unsupported":
        return f"UNSUPPORTED ({_short(r.error.removeprefix('UNSUPPORTED: '))})"
    if r.error is not None:
        return f"FAIL ({_short(r.error)})"
    return "FAIL" + (f" ({_short(_brief(r.comparison.failures[0]))})" if r.comparison is not None and r.comparison.failures else "")


def _brief(failure: str) -> str:
    """A failure sentence for a table cell: without the relative-error aside and the values."""
    s = re.sub(r" \(and relative error [^)]*\)", "", failure)
    s = re.sub(r" \(expected [^()]*, got [^()]*\)", "", s)
    return s


def _short(s: str, n: int = 110) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def _md(s: Any) -> str:
    return str(s).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _details(r: ParityRecord) -> str:
    lines = [r.message]
    if r.artifact:
        lines.append(f"artifact: {r.artifact}")
    if r.comparison is not None:
        lines += [f"failure: {f}" for f in r.comparison.failures]
        lines.append("tolerance: " + r.comparison.tolerance.describe())
        lines.append("metrics: " + json.dumps(_jsonable(r.comparison.metrics), sort_keys=True))
    if r.error is not None:
        lines.append(f"error: {r.error}")
    return "\n".join(lines)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a report is for others to read too
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# --------------------------------------------------------------------------- terminal table

def print_table(report: ParityReport, file=None, width: int | None = None) -> str:
    """A compact fixed-width table of the records, the discrimination lines and the summary line.
    Returns the text (ending in a newline); also writes it to `file` when one is given. The verdict
    column is cut to fit `width` (default: the terminal's, at least 100)."""
    cols = ["model", "format", "variant", "runtime", "max abs", "cosine", "top-1", "verdict"]
    rows = []
    for r in report.records:
        m = r.comparison.metrics if r.comparison is not None else {}
        if r.status == "skipped":
            verdict = f"SKIP {r.reason}"
        elif r.status == "passed":
            verdict = "PASS"
        elif (r.details or {}).get("outcome") == "unsupported":
            verdict = r.error
        else:
            verdict = "FAIL " + (r.error if r.error is not None else
                                 (_brief(r.comparison.failures[0]) if r.comparison.failures else ""))
        first = ((r.details or {}).get("localization") or {}).get("layer")
        if r.status == "failed" and first:
            verdict = f"FAIL first diverges at {first}: " + verdict[5:]
        rows.append([r.model, r.format, r.variant, r.runtime or "-",
                     _e(m.get("max_abs")) if m else "-", _f6(m.get("cosine")) if m else "-",
                     f"{m['top1_agreement']:.4f}" if "top1_agreement" in m else "-", " ".join(verdict.split())])
        rows += [["", "", "", f"  output {name}", _e(v), "-", "-", ""] for name, v in _per_output(r)]
    widths = [max([len(c)] + [len(row[i]) for row in rows]) for i, c in enumerate(cols[:-1])]
    fixed = sum(widths) + 2 * len(widths)
    if width is None:
        width = max(shutil.get_terminal_size((150, 24)).columns, 100)
    limit = width - fixed
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols[:-1], widths)) + "  " + cols[-1]]
    lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    for row in rows:
        verdict = _short(row[-1], max(limit, 20))
        lines.append("  ".join(v.ljust(w) if i < 4 else v.rjust(w) for i, (v, w) in enumerate(zip(row[:-1], widths)))
                     + "  " + verdict)
    for model, d in report.discrimination.items():
        lines.append(describe_discrimination(model, d))
    lines.append(report.summary_line() + ("" if report.verdict != "inconclusive" else
                 f"; INCONCLUSIVE: the parity set of {', '.join(report.inconclusive)} does not discriminate"))
    text = "\n".join(lines) + "\n"
    if file is not None:
        print(text, file=file, end="")
    return text


def merge_reports(reports: Iterable[ParityReport], **meta) -> ParityReport:
    """One report from several (e.g. one per model lane): records and discrimination concatenated."""
    reports = list(reports)
    out = ParityReport(**meta)
    for rep in reports:
        out.records.extend(rep.records)
        out.discrimination.update(rep.discrimination)
        for k, v in rep.metadata.items():
            out.metadata.setdefault(k, v)
        out.spec = out.spec or rep.spec
        out.run_id = out.run_id or rep.run_id
    return out


def _first_line(text: str, limit: int) -> str:
    line = (str(text).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _layer_lines(loc: Mapping[str, Any] | None) -> list[str]:
    """A localised failure's layers in the original's order: max abs against what its tolerance allows,
    the first divergence in bold, an unmatched layer said so."""
    if not loc or not loc.get("layers"):
        return []
    shown = []
    for p in loc["layers"]:
        if p.get("matched_by") == "unmatched":
            shown.append(f"{p['layer']} (unmatched)")
            continue
        text = f"{p['layer']} {_e(p.get('max_abs'))}/{_e(p.get('allowed'))}"
        shown.append(f"**{text}**" if p["layer"] == loc.get("layer") else text)
    lines = [f"  - per layer, max abs / allowed: {', '.join(shown)}"]
    for output, first in (loc.get("outputs") or {}).items():
        lines.append(f"  - output {output}: " + (f"first diverges at {first['layer']}, max abs {_e(first['max_abs'])}"
                                                  if first.get("layer") else first.get("note", "")))
    return lines


def _per_output(r: ParityRecord) -> list[tuple[str, float]]:
    """Each output's max abs error of a record of a model with several outputs (none for one output)."""
    per = (r.details or {}).get("outputs_max_abs") or {}
    return list(per.items()) if len(per) > 1 else []


def _markdown_table_html(lines: list[str]) -> str:
    """A section of Markdown lines (a heading, a sentence, one pipe table) as HTML."""
    import html
    out, table = [], []
    for line in lines:
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("|") and not set(line) <= set("|-: "):
            table.append("<tr>" + "".join(f"<td>{html.escape(c.strip().strip('`'))}</td>"
                                          for c in line.strip("|").split("|")) + "</tr>")
        elif line and not line.startswith("|"):
            out.append(f"<p>{html.escape(line)}</p>")
    return "".join(out) + (f'<table id="profile">{"".join(table)}</table>' if table else "")

