"""The Python API behind the command line: run a spec, read past runs.

    from pipeline import api
    record = api.run("toy")            # or a path to your own spec.toml
    record["status"], record["models"]["keras"]["metrics"]
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

from . import spec as spec_mod
from .cache import PACKAGE_ROOT, Cache
from .runner import STAGE_ORDER, StageFailed, execute

PACKAGES = ("pipeline", "exporters", "parity", "serving", "edge")


def home_dir() -> Path:
    """Where the cache, run records and MLflow store live: $PIPELINE_HOME, else the current folder."""
    return Path(os.environ.get("PIPELINE_HOME", ".")).resolve()


def work_dir(home: Path) -> Path:
    return home / ".pipeline"


def code_version() -> str:
    import hashlib
    h = hashlib.sha256()
    for pkg in PACKAGES:
        for f in sorted((PACKAGE_ROOT / pkg).rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def rerun_kinds(force: bool, from_stage: str | None) -> set[str]:
    if force:
        return set(STAGE_ORDER)
    if from_stage:
        if from_stage not in STAGE_ORDER:
            raise spec_mod.SpecError(f"--from {from_stage}: expected one of {', '.join(STAGE_ORDER)}")
        return set(STAGE_ORDER[STAGE_ORDER.index(from_stage):])
    return set()


def run(spec_ref: str, *, home: Path | None = None, force: bool = False, from_stage: str | None = None,
        parallel: bool = True, track: bool = True) -> dict:
    """Run a spec end to end. Returns the run record (also saved under .pipeline/runs/).

    Raises SpecError for a spec that cannot run (nothing is started); a failed stage gives a record
    with status "failed" and the error, after MLflow has been told.
    """
    from .stages import build_stages
    home = home or home_dir()
    spec = spec_mod.load(spec_ref)
    kinds = rerun_kinds(force, from_stage)
    cache = Cache(work_dir(home) / "cache")
    cache.sweep()
    started = time.time()
    run_id = time.strftime("%Y%m%d-%H%M%S", time.localtime(started)) + "-" + uuid.uuid4().hex[:4]
    print(f"pipeline {spec.name}: run {run_id} (cache {cache.root})", flush=True)

    # MLflow's import and store set-up take seconds: overlap them with the stages (the parent
    # process only waits on its workers); the report's plotting library warms up the same way.
    recorder, helpers = None, []
    if track:
        from .tracking import Recorder
        recorder = Recorder(home, spec.name)
        helpers.append(_background(recorder.prepare))

    def on_plan(will_run: dict[str, bool]) -> None:
        if will_run.get("report"):
            helpers.append(_background(_warm_plotting))

    error, results = None, []
    try:
        results = execute(build_stages(spec), cache, kinds, str(spec.path), parallel=parallel, on_plan=on_plan)
    except StageFailed as e:
        error = str(e)
        results = getattr(e, "results", [e.result])
    report = next((r for r in results if r.name == "report" and not r.error), None)
    if error is None and report is not None and not report.facts["passed"]:
        failures = report.facts["failures"]
        error = (f"parity failed: {len(failures)} artifact check(s) failed; first: "
                 + (failures[0] if failures else "no artifact was checked"))
    finished = time.time()
    record = _record(spec, run_id, started, finished, results, error)
    if report is not None:
        # a snapshot per run: a later forced verify rewrites the cache entry this run read
        record["report_dir"] = str(_snapshot_reports(home, run_id, Path(report.path)))
        _print_parity(Path(record["report_dir"]))
    for thread in helpers:
        thread.join()
    if recorder is not None:
        t0 = time.perf_counter()
        record["mlflow"] = recorder.record(record)
        record["mlflow_s"] = time.perf_counter() - t0
    save_record(home, record)
    return record


def _background(fn) -> threading.Thread:
    def guarded() -> None:
        try:
            fn()
        except Exception:  # whoever needs it later does it again and sees the error
            pass
    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    return thread


def _warm_plotting() -> None:
    import parity.plots  # noqa: F401
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def verify(run_ref: str | None = None, *, home: Path | None = None, track: bool = True) -> dict:
    """Re-verify the artifacts of a past run (default: the latest) in every runtime, without
    retraining or re-exporting: the verify and report stages run again on the cached artifacts."""
    record = load_record(run_ref, home)
    return run(record["spec_path"], home=home, from_stage="verify", track=track)


def check(target: str, *, home: Path | None = None, out_dir: Path | None = None, track: bool = True) -> dict:
    """The release gate: run (or reuse from the cache) every stage of a spec, always re-verify every
    artifact, and write parity.json, junit.xml and summary.md into `out_dir` (default: reports/).

    `target` is a spec (built-in name or .toml path) or a registered model version
    (NAME, NAME@ALIAS or NAME/VERSION), whose spec is found through the version's tags."""
    import shutil
    home = home or home_dir()
    try:
        spec_ref = str(spec_mod.resolve(target))
    except spec_mod.SpecError:
        if not any(c in target for c in "@/") and "-" not in target:
            raise
        from .tracking import resolve_version
        version = resolve_version(home, target)
        spec_ref = version.tags.get("pipeline.spec_path")
        if not spec_ref:
            raise LookupError(f"model version {version.name}/{version.version} carries no pipeline.spec_path tag")
    record = run(spec_ref, home=home, from_stage="verify", track=track)
    out = (out_dir or home / "reports").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if record.get("report_dir"):
        for name in ("parity.json", "junit.xml", "parity.md"):
            shutil.copy2(Path(record["report_dir"]) / name, out / name)
        (out / "summary.md").write_text(_summary_markdown(record, out / "parity.md"))
    record["reports"] = str(out)
    return record


def _summary_markdown(record: dict, parity_md: Path) -> str:
    verdict = "passed" if record["status"] == "passed" else "FAILED"
    head = f"## Parity gate: `{record['spec']}` {verdict}\n\nrun `{record['run_id']}`\n\n"
    if record.get("error"):
        head += f"> {record['error']}\n\n"
    return head + parity_md.read_text()


def diff(run_a: str, run_b: str, home: Path | None = None) -> list[tuple[str, str, object, object]]:
    """What changed between two runs: (section, what, value in A, value in B) for metrics and parity."""
    a, b = load_record(run_a, home), load_record(run_b, home)
    rows: list[tuple[str, str, object, object]] = []
    for model in sorted(set(a["models"]) | set(b["models"])):
        ma = a["models"].get(model, {}).get("metrics", {})
        mb = b["models"].get(model, {}).get("metrics", {})
        for k in sorted(set(ma) | set(mb)):
            if ma.get(k) != mb.get(k):
                rows.append(("metric", f"{model}.{k}", ma.get(k), mb.get(k)))
    pa, pb = _parity_cells(a), _parity_cells(b)
    for cell in sorted(set(pa) | set(pb)):
        va, vb = pa.get(cell, ("absent", None)), pb.get(cell, ("absent", None))
        if va != vb:
            rows.append(("parity", cell, _cell_text(va), _cell_text(vb)))
    if a["status"] != b["status"]:
        rows.append(("run", "status", a["status"], b["status"]))
    return rows


def _parity_cells(record: dict) -> dict[str, tuple[str, float | None]]:
    if not record.get("report_dir") or not (Path(record["report_dir"]) / "parity.json").is_file():
        return {}
    parity = json.loads((Path(record["report_dir"]) / "parity.json").read_text())
    cells = {}
    for r in parity["records"]:
        m = (r.get("comparison") or {}).get("metrics", {})
        cells[f"{r['model']}/{r['format']}-{r['variant']}@{r.get('runtime') or '-'}"] = (r["status"], m.get("max_abs"))
    return cells


def _cell_text(v: tuple[str, float | None]) -> str:
    status, max_abs = v
    return status + (f" (max abs {max_abs:.2e})" if isinstance(max_abs, (int, float)) else "")


def _record(spec, run_id: str, started: float, finished: float, results, error: str | None) -> dict:
    stages = [r.__dict__ for r in results]
    by_name = {r.name: r for r in results}
    models = {}
    for m in spec.models:
        train = by_name.get(f"train:{m.name}")
        info = {"framework": m.framework, "factory": m.factory,
                "params": {"framework": m.framework, "factory": m.factory, **m.train.__dict__,
                           **{f"model.{k}": v for k, v in m.params.items()}, "seed": spec.seed}}
        if train is not None and train.error:
            info["error"] = train.error
        if train is not None and not train.error:
            out = Path(train.path)
            info["metrics"] = train.facts.get("metrics", {})
            info["loss_history"] = json.loads((out / "history.json").read_text())["loss"]
            info["mlflow_model_dir"] = str(out / "mlflow_model")
            info["train_key"] = train.key
        info["exports"] = {r.facts["format"]: r.path for r in results
                           if r.kind == "export" and r.name.split(":")[1] == m.name and not r.error}
        models[m.name] = info
    return {
        "run_id": run_id, "spec": spec.name, "spec_path": str(spec.path), "spec_hash": spec.digest()[:12],
        "code_version": code_version(), "started": started, "finished": finished,
        "elapsed_s": finished - started, "status": "failed" if error else "passed", "error": error,
        "stages": stages, "models": models,
        "report_dir": by_name["report"].path if "report" in by_name and not by_name["report"].error else None,
        "params": {"spec": spec.name, "seed": spec.seed, "data.source": spec.data.source,
                   "formats": ",".join(spec.formats), "models": ",".join(m.name for m in spec.models)},
    }


def _snapshot_reports(home: Path, run_id: str, report_dir: Path) -> Path:
    import shutil
    dest = runs_dir(home) / run_id
    shutil.copytree(report_dir, dest, ignore=shutil.ignore_patterns("stage.json"), dirs_exist_ok=True)
    return dest


def _print_parity(report_dir: Path) -> None:
    from parity.report import ParityReport, print_table
    print()
    print(print_table(ParityReport.from_json(report_dir / "parity.json")), end="")
    print(f"reports: {report_dir / 'parity.md'}, {report_dir / 'junit.xml'}")


# --------------------------------------------------------------------------- run records

def runs_dir(home: Path) -> Path:
    return work_dir(home) / "runs"


def save_record(home: Path, record: dict) -> Path:
    d = runs_dir(home)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{record['run_id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)
    return path


def list_records(home: Path | None = None) -> list[Path]:
    d = runs_dir(home or home_dir())
    return sorted(d.glob("*.json")) if d.exists() else []


def load_record(ref: str | None = None, home: Path | None = None) -> dict:
    """A run record by pipeline run id, MLflow parent run id, or (None) the latest."""
    records = list_records(home)
    if not records:
        raise LookupError("no runs yet: run `python -m pipeline run toy` first")
    if ref is None:
        return json.loads(records[-1].read_text())
    for path in reversed(records):
        rec = json.loads(path.read_text())
        if ref in (rec["run_id"], rec.get("mlflow", {}).get("parent_run_id")):
            return rec
    raise LookupError(f"no run '{ref}' (known: {', '.join(p.stem for p in records[-5:])} ...)")
