"""A run's verdict from its report stage, shared by the pipeline run, the release gate and a stage
run alone: what fails a run, and the parity table printed at its end."""
from __future__ import annotations

from pathlib import Path


def verdict_error(report_facts: dict) -> str | None:
    """The run's error for a report that did not pass: failed checks, or a parity set that cannot
    tell a right artifact from a wrong one (INCONCLUSIVE, a failure for the gate)."""
    if not report_facts["passed"]:
        failures = report_facts["failures"]
        # a candidate that keeps parity but is worse than its baseline fails the comparison, not parity
        what = "the comparison with the baseline" if failures and all(" against " in f for f in failures) else "parity"
        return (f"{what} failed: {len(failures)} artifact check(s) failed; first: "
                + (failures[0] if failures else "no artifact was checked"))
    if report_facts.get("verdict") == "inconclusive":
        return (f"parity inconclusive: every check passed, but the parity set of "
                f"{', '.join(report_facts['inconclusive'])} does not discriminate (its reference outputs barely "
                f"vary), so the passes prove little; see the discrimination lines above")
    return None


def print_parity(report_dir: Path) -> None:
    from parity.report import ParityReport, print_table
    print()
    print(print_table(ParityReport.from_json(report_dir / "parity.json")), end="")
    print(f"reports: {report_dir / 'parity.md'}, {report_dir / 'junit.xml'}")
