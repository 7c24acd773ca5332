"""The release gate for a registered model version: verify the bundle the registry holds for it.

`check NAME@ALIAS` (or NAME/VERSION) takes the bundle the version carries (its artifacts, exactly as
logged, and the parity inputs and reference outputs stored with them), checks every file against the
manifest and the manifest against the digest the registry keeps, loads each artifact in its own
runtime and compares it with those reference outputs. Only that model is checked; nothing is read
from the local cache, so the verdict is about what a deploy would take.
"""
from __future__ import annotations

import shutil
import time
import uuid
from pathlib import Path

from .cache import Cache
from .code_deps import closure
from .runner import STAGE_ORDER, Stage, StageFailed, execute

GATE_CODE = closure("pipeline/steps/verify.py", "pipeline/steps/common.py", "exporters/bundle.py",
                    "exporters/verify.py", "parity/compare.py")


AGAINST_CODE = closure("pipeline/steps/against.py", "exporters/bundle.py", "exporters/profile.py", "parity/against.py")


class GateError(RuntimeError):
    """The version cannot be checked at all (no bundle, a changed manifest): the gate fails (exit 1)."""


def check_version(home: Path, ref: str, work: Path, *, track: bool = True, against: str | None = None,
                  thresholds: dict | None = None) -> dict:
    """Verify the bundle of the registered version `ref`; with `against` (an alias such as production),
    also compare it with that version of the same model (parity/against.py). Returns a record like a
    pipeline run's."""
    from . import tracking
    version = tracking.resolve_version(home, ref)
    label = f"{version.name}/{version.version}"
    run_id, sha = version.tags.get("bundle.run_id"), version.tags.get("bundle.sha256")
    if not run_id or not sha:
        raise GateError(f"model version {label} carries no registered bundle (tags bundle.run_id and "
                        f"bundle.sha256): it was registered before bundles were recorded; run its spec "
                        f"again so a passing run registers one")
    gate_id = _gate_id()
    print(f"gate {label}: checking the bundle registered with it (MLflow run {run_id})", flush=True)
    download = work / "gates" / gate_id / "download"
    try:
        bundle_dir = tracking.download_bundle(home, run_id, download)
    except LookupError as e:
        raise GateError(f"model version {label}: {e}") from None
    baseline_dir, note = None, None
    if against:
        baseline_dir, note = _baseline(home, version, against, download / "baseline")
        print(f"gate {label}: {note}", flush=True)
    try:
        record = check_bundle(bundle_dir, label, work, expected_manifest_sha256=sha, gate_id=gate_id,
                              baseline=baseline_dir, against=against, thresholds=thresholds)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    if note:
        record["against"] = note
    if track:
        parity_failed, against_failed = _failed_checks(record)
        tracking.tag_gate_result(home, version, "failed" if parity_failed or (record["status"] == "failed" and
                                                                             not against_failed) else "passed",
                                 gate_id, record["summary"],
                                 against=(against, "failed" if against_failed else "passed", note)
                                 if baseline_dir is not None else None)
    return record


def _failed_checks(record: dict) -> tuple[bool, bool]:
    """(did a parity check fail, did a comparison with the baseline fail), from the gate's report."""
    import json
    report = Path(record.get("report_dir") or "") / "parity.json"
    if not report.is_file():
        return True, False
    failed = [r for r in json.loads(report.read_text())["records"] if r["status"] == "failed"]
    against = [r for r in failed if "against" in (r.get("details") or {})]
    return len(failed) > len(against), bool(against)


def _baseline(home: Path, version, alias: str, dest: Path) -> tuple[Path | None, str]:
    """The bundle of the model's version under `alias` and a sentence on what the gate compares; no
    bundle when there is no such version yet (a first release is judged on parity alone)."""
    from . import tracking
    try:
        base = tracking.resolve_version(home, f"{version.name}@{alias}")
    except LookupError:
        return None, f"no {alias} version of {version.name} yet: a first release, judged on parity alone"
    if base.version == version.version:
        return None, f"version {version.version} is {alias} already: judged on parity alone"
    run_id = base.tags.get("bundle.run_id")
    if not run_id:
        raise GateError(f"{version.name}/{base.version} ({alias}) carries no registered bundle to compare with")
    return (tracking.download_bundle(home, run_id, dest),
            f"against {alias} (version {base.version}): task metric, latency and size of every artifact")


def check_bundle(bundle_dir: Path, label: str, work: Path, *, expected_manifest_sha256: str | None = None,
                 gate_id: str | None = None, baseline: Path | None = None, against: str | None = None,
                 thresholds: dict | None = None) -> dict:
    """Verify a bundle folder: every file against its manifest (and the manifest against the expected
    digest, when one is known), every artifact in its runtime against the stored reference outputs."""
    from exporters.bundle import BundleError, read_bundle
    t0 = time.perf_counter()
    gate_id = gate_id or _gate_id()
    dest = work / "gates" / gate_id
    try:
        bundle = read_bundle(bundle_dir, expected_manifest_sha256=expected_manifest_sha256)
    except BundleError as e:
        raise GateError(f"{label}: {e}") from None
    error, results = None, []
    try:
        results = execute(gate_stages(bundle.root, bundle.manifest, baseline=baseline, against=against,
                                      thresholds=thresholds), Cache(dest / "cache"),
                          set(STAGE_ORDER) | {"gate_verify", "gate_against", "gate_report"})
    except StageFailed as e:
        error = str(e)
        results = getattr(e, "results", [e.result])
    report = next((r for r in results if r.name == "report" and not r.error), None)
    report_dir = None
    if report is not None:  # keep the reports, drop the scratch cache
        report_dir = dest / "reports"
        copy_reports(Path(report.path), report_dir)
    shutil.rmtree(dest / "cache", ignore_errors=True)
    if error is None and report is not None:
        from .verdict import verdict_error
        error = verdict_error(report.facts)
    status = "failed" if error or report is None else "passed"
    if report_dir is not None:
        from .verdict import print_parity
        print_parity(report_dir)
    return {"run_id": gate_id, "spec": label, "status": status, "error": error,
            "stages": [r.__dict__ for r in results], "elapsed_s": time.perf_counter() - t0,
            "models": {bundle.model: {"framework": bundle.manifest["framework"]}},
            "report_dir": str(report_dir) if report_dir else None,
            "summary": report.facts.get("summary", "") if report else (error or "")}


def _gate_id() -> str:
    return time.strftime("gate-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]


def gate_stages(bundle_root: Path, manifest: dict, *, baseline: Path | None = None, against: str | None = None,
                thresholds: dict | None = None) -> list[Stage]:
    import exporters
    from .steps.common import side
    arg = {"bundle": str(bundle_root)}
    stages = []
    for fmt in sorted(manifest["formats"], key=lambda f: exporters.FORMATS.index(f) if f in exporters.FORMATS else 99):
        lane = exporters.module(fmt).RUNTIME_LANE
        lane = side(manifest["framework"]) if lane == "any" else lane
        stages.append(Stage(f"verify:{manifest['model']}:{fmt}", "gate_verify", {"format": fmt},
                            GATE_CODE + closure(f"exporters/{fmt}.py"), "pipeline.steps.verify:run_bundle_verify",
                            {**arg, "fmt": fmt}, lane=lane))
        if baseline is not None:
            stages.append(Stage(f"against:{manifest['model']}:{fmt}", "gate_against",
                                {"format": fmt, "baseline": str(baseline), "thresholds": thresholds or {}},
                                AGAINST_CODE + closure(f"exporters/{fmt}.py"), "pipeline.steps.against:run_against",
                                {"candidate": str(bundle_root), "baseline": str(baseline), "fmt": fmt,
                                 "against": against, "thresholds": thresholds or {}}, lane=lane))
    stages.append(Stage("report", "gate_report", {}, closure("pipeline/steps/report.py", "pipeline/steps/common.py",
                                                             "parity/report.py", "parity/compare.py"),
                        "pipeline.steps.report:run_gate_report", arg, inputs=tuple(s.name for s in stages)))
    return stages


def copy_reports(report_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("parity.json", "junit.xml", "parity.md", "report.html"):
        if (report_dir / name).is_file():  # report.html: reports made before it existed have none
            shutil.copy2(report_dir / name, out / name)

