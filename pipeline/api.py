"""The Python API behind the command line: run a spec, read past runs.

    from pipeline import api
    record = api.run("toy")            # or a path to your own spec.toml
    record["status"], record["models"]["keras"]["metrics"]
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

from . import executors
from . import spec as spec_mod
from .cache import PACKAGE_ROOT, Cache
from .home_lock import home_lock
from .runner import STAGE_ORDER, StageFailed, dump_modules, execute
from .verdict import print_parity, verdict_error  # noqa: F401  (verdict_error: also the API's)

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
        parallel: bool = True, track: bool = True, executor: str | None = None,
        address: str | None = None) -> dict:
    """Run a spec end to end and return the run record (also saved under .pipeline/runs/).

    `executor` names one in pipeline/executors/ (default: the spec's [pipeline] executor, else local
    lanes); `address` is the Ray cluster the ray executor joins (default RAY_ADDRESS, else its own).

    Raises SpecError for a spec that cannot run (nothing is started); a failed stage gives a record
    with status "failed" and the error, after MLflow has been told. One run at a time per home: a
    second run waits for the first.
    """
    home = home or home_dir()
    spec = spec_mod.load(spec_ref)
    kinds = rerun_kinds(force, from_stage)
    if executor is None:
        executor = (spec.executor or executors.DEFAULT) if parallel else "inprocess"
    if executor not in executors.names():
        raise spec_mod.SpecError(f"--executor {executor}: expected one of {', '.join(executors.names())}")
    if address:
        if executor != "ray":
            raise spec_mod.SpecError(f"--address {address} names a Ray cluster: expected it with --executor ray "
                                     f"(or [pipeline] executor = \"ray\"), found executor {executor}")
        os.environ["RAY_ADDRESS"] = address  # where Ray's own client looks for the cluster
    from . import tracking
    with tracking.pointed_at(spec.tracking_uri):
        if track:  # a tracking server that does not answer stops the run before any stage
            tracking.check_reachable(home)
        with home_lock(work_dir(home), f"run {spec.name}"):
            return _run(spec, home, kinds, executor, track)


def _run(spec, home: Path, kinds: set[str], executor: str, track: bool) -> dict:
    from .stages import build_stages
    t_start = time.perf_counter()
    cache = Cache(work_dir(home) / "cache", store=os.environ.get("PIPELINE_STORE"))
    cache.check_writable()
    cache.sweep()
    started = time.time()
    # sortable: runs of a home are serialised by its lock, and milliseconds order two in one second
    run_id = (time.strftime("%Y%m%d-%H%M%S", time.localtime(started)) + f"{int(started * 1000) % 1000:03d}-"
              + uuid.uuid4().hex[:4])
    print(f"pipeline {spec.name}: run {run_id} (cache {cache.root})", flush=True)
    stages = build_stages(spec)

    # MLflow's import and store set-up take seconds: overlap them with the stages (the parent
    # process only waits on its workers); the report's plotting library warms up the same way.
    # When nothing runs, nothing new needs recording: the earlier run that holds it is named instead.
    recorder, helpers, unchanged_since = None, [], None

    def on_plan(will_run: dict[str, bool]) -> None:
        nonlocal recorder, unchanged_since
        if not any(will_run.values()) and track:
            unchanged_since = _recorded_run_with_keys(home, {s.name: s.key for s in stages})
        if track and unchanged_since is None:
            from .tracking import Recorder
            recorder = Recorder(home, spec.name)
            helpers.append(_background(recorder.prepare))
        if will_run.get("report"):
            helpers.append(_background(_warm_plotting))

    error, error_kind, results = None, None, []
    try:
        results = execute(stages, cache, kinds, executor=executor, on_plan=on_plan)
    except StageFailed as e:
        error, error_kind = str(e), e.result.error_kind
        if error_kind == "usage":
            error = e.result.error
        results = getattr(e, "results", [e.result])
    report = next((r for r in results if r.name == "report" and not r.error), None)
    if error is None and report is not None:
        error = verdict_error(report.facts)
    record = _record(spec, run_id, started, time.time(), results, error)
    record["executor"] = executor
    record["error_kind"] = error_kind
    if report is not None:
        # a snapshot per run: a later forced verify rewrites the cache entry this run read
        record["report_dir"] = str(_snapshot_reports(home, run_id, Path(report.path)))
        print_parity(Path(record["report_dir"]))
    for thread in helpers:
        thread.join()
    if unchanged_since is not None:
        record["mlflow"] = {**unchanged_since["mlflow"], "reused_from": unchanged_since["run_id"]}
        print(f"nothing changed since run {unchanged_since['run_id']}: MLflow run "
              f"{unchanged_since['mlflow']['parent_run_id']} holds this result (not recorded again)")
    elif recorder is not None:
        t0 = time.perf_counter()
        try:
            record["mlflow"] = recorder.record(record)
        except Exception as e:  # the tracking server went away mid-run: the stages' results stay cached
            from .tracking import tracking_uri
            record.update(status="failed", error_kind="tracking",
                          error=f"recording the run in MLflow at {tracking_uri(home)} failed: {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:300] if str(e) else ''}; every stage's result is "
                                f"cached, so a rerun once it answers records it without running them again")
            print(f"error: {record['error']}", file=sys.stderr, flush=True)
        record["mlflow_s"] = time.perf_counter() - t0
    record["elapsed_s"] = time.perf_counter() - t_start
    record["finished"] = time.time()
    save_record(home, record)
    dump_modules("main")
    return record


def _recorded_run_with_keys(home: Path, keys: dict[str, str]) -> dict | None:
    """The latest run recorded in this tracking store whose stages had exactly these cache keys (so the
    same results)."""
    from .tracking import store_identity
    store = store_identity(home)
    for path in reversed(list_records(home)):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        recorded = rec.get("mlflow", {})
        if recorded.get("parent_run_id") and recorded.get("tracking_store", "mlruns") == store and \
                {s["name"]: s["key"] for s in rec.get("stages", [])} == keys:
            return rec
    return None


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
    from . import plots  # noqa: F401
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def verify(run_ref: str | None = None, *, home: Path | None = None, track: bool = True) -> dict:
    """Re-verify the artifacts of a past run (default: the latest) in every runtime, without
    retraining or re-exporting: the verify and report stages run again on the cached artifacts."""
    record = load_record(run_ref, home)
    return run(record["spec_path"], home=home, from_stage="verify", track=track)


def check(target: str, *, home: Path | None = None, out_dir: Path | None = None, track: bool = True,
          against: str | None = None, thresholds: dict | None = None) -> dict:
    """The release gate; writes parity.json, junit.xml and summary.md into `out_dir` (default: reports/).

    `target` is a spec (built-in name or .toml path): every stage runs or is reused from the cache, and
    every artifact is verified again. Or a registered model version (NAME, NAME@ALIAS or NAME/VERSION):
    the bundle the registry holds for that version is verified, and only that model (pipeline.gate).
    Or a bundle folder (one holding manifest.json): its files and artifacts are verified as they are."""
    from . import gate
    home = home or home_dir()
    spec_ref = None
    if (against or thresholds) and Path(target, "manifest.json").is_file():
        raise spec_mod.SpecError(f"check {target} --against: expected a registered version (NAME@ALIAS or "
                                 f"NAME/VERSION) or a spec to compare with another version; found a bundle folder")
    if Path(target, "manifest.json").is_file():  # a bundle folder, as a deploy would take it
        with home_lock(work_dir(home), f"check {target}"):
            record = gate.check_bundle(Path(target).resolve(), target, work_dir(home))
    else:
        try:
            spec_ref = str(spec_mod.resolve(target))
        except spec_mod.SpecError:
            if not any(c in target for c in "@/") and "-" not in target:
                raise
        if spec_ref is not None:
            spec = spec_mod.load(spec_ref)
            settings = {**spec.gate, **({"baseline": against} if against else {}), **(thresholds or {})}
            if len(settings) > ("baseline" in settings) and "baseline" not in settings:
                raise spec_mod.SpecError(f"check {target}: thresholds need a baseline to compare with: "
                                         f"--against ALIAS, or [gate] baseline in the spec")
            record = run(spec_ref, home=home, from_stage="verify", track=track)
            record = _against_baseline(spec, settings, record, home, track, out_dir)
        else:
            with home_lock(work_dir(home), f"check {target}"):
                record = gate.check_version(home, target, work_dir(home), track=track, against=against,
                                            thresholds=thresholds)
    out = (out_dir or home / "reports").resolve()
    out.mkdir(parents=True, exist_ok=True)
    if record.get("report_dir"):
        gate.copy_reports(Path(record["report_dir"]), out)
        (out / "summary.md").write_text(_summary_markdown(record, out / "parity.md"))
        step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if step_summary:  # GitHub Actions shows what a step appends there on the job's page
            with open(step_summary, "a") as f:
                f.write((out / "summary.md").read_text() + "\n")
    record["reports"] = str(out)
    return record


def export(model_path: str, *, example: str | None, formats: list[str] | None = None, task: str = "regression",
           factory: str | None = None, tolerances: dict | None = None, home: Path | None = None,
           track: bool = True) -> dict:
    """The front door for a model someone already trained: its file in, every format out, each verified
    in its own runtime against the model on the example inputs. Writes the spec it implies (under
    .pipeline/implicit/) and runs it, so caching, MLflow and the reports work as for any spec."""
    import frameworks
    from . import registry_ref
    from .spec import FORMATS, by_default
    suffixes_of = {fw: frameworks.module(fw).PRETRAINED_SUFFIXES for fw in frameworks.names()}
    home = home or home_dir()
    if registry_ref.is_ref(model_path):  # a registered version: its framework tag says which loader
        try:
            from .tracking import resolve_ref
            found = resolve_ref(home, model_path)
        except (LookupError, ValueError) as e:
            raise spec_mod.SpecError(str(e)) from None
        framework, path = found.framework, None
    else:
        path = Path(model_path).resolve()
        framework = frameworks.for_file(path)
    if framework is None and path is None:
        raise spec_mod.SpecError(f"{model_path}: version {found.version} of {found.name} has no framework tag; "
                                 f"expected one registered by a pipeline run (or write a spec with framework = ...)")
    if framework is None:
        known = ", ".join(f"{s} ({fw})" for fw, suffixes in suffixes_of.items() for s in suffixes)
        folders = ", ".join(f"{m.PRETRAINED_FOLDER[1]} (with {m.PRETRAINED_FOLDER[0]})"
                            for m in map(frameworks.module, frameworks.names()) if getattr(m, "PRETRAINED_FOLDER", None))
        raise spec_mod.SpecError(f"{model_path}: expected a model file of a known kind ({known}) or a folder: "
                                 f"{folders}; found "
                                 f"{'a folder without either' if path.is_dir() else repr(path.suffix or 'no suffix')}")
    if path is not None and not path.exists():
        raise spec_mod.SpecError(f"{model_path}: no such model file")
    if not example:
        raise spec_mod.SpecError(f"{model_path}: expected --example INPUTS.npz holding an array x of real inputs "
                                 f"(the rows the parity set is drawn from)")
    example_path = Path(example).resolve()
    if not example_path.is_file():
        raise spec_mod.SpecError(f"--example {example}: no such file")
    for fmt in formats or ():
        if fmt not in FORMATS:
            raise spec_mod.SpecError(f"--formats {fmt}: expected formats among {', '.join(FORMATS)}")
    stem = found.name if path is None else path.stem
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem) or "model"
    inputs = _example_inputs(example_path)
    lines = ["# written by `python -m pipeline export`: the spec this export implies", "[pipeline]",
             f'name = "export-{name}"', "", "[data]", 'source = "npz"', f"path = {json.dumps(str(example_path))}",
             *([f"inputs = {json.dumps(inputs)}"] if inputs else []),
             f'task = "{task}"', "", "[[model]]", f'name = "{name}"', f'framework = "{framework}"',
             f"source = {json.dumps(model_path if path is None else str(path))}"]
    if factory:
        lines.append(f"factory = {json.dumps(factory)}")
    lines += ["", "[export]", f"formats = {json.dumps(list(formats or by_default()))}", ""]
    if tolerances:  # checked like any spec's, when the spec is loaded
        lines += ["[parity.tolerances]"] + [
            f'"{key}" = {{ ' + ", ".join(f"{f} = {v!r}" for f, v in fields.items()) + " }"
            for key, fields in tolerances.items()] + [""]
    text = "\n".join(lines)
    import hashlib
    spec_path = work_dir(home) / "implicit" / f"export-{name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}.toml"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(text)
    print(f"export {model_path if path is None else path.name} ({framework}): spec {spec_path}", flush=True)
    return run(str(spec_path), home=home, track=track)


def _example_inputs(path: Path) -> list[str] | None:
    """The named inputs of an example npz without an `x` (input_ids, attention_mask, ...); None with one."""
    import numpy as np
    try:
        with np.load(path) as f:
            names = [k for k in f.files if k != "y"]
    except Exception as e:  # noqa: BLE001
        raise spec_mod.SpecError(f"--example {path}: not a readable .npz ({type(e).__name__}: {e})") from None
    return None if "x" in names or not names else names


def validate(spec_ref: str, *, models: bool = True) -> dict:
    """Check a spec without running it: its keys and types, its data (files, arrays, labels) and,
    with `models`, that each factory builds a model that takes the data's inputs (this imports each
    model's framework in its own process). Raises SpecError (DataError, ...) naming the problem."""
    import tempfile
    from . import data as data_mod
    from .stages import probe_stages
    from .training import n_outputs
    spec = spec_mod.load(spec_ref)
    arrays = data_mod.load_arrays(spec)
    from parity.feeds import n_rows, row_shapes
    shape = row_shapes(arrays["x_train"])
    outputs = n_outputs(spec.data.task, arrays["y_train"]) if "y_train" in arrays else None
    facts = {"spec": spec, "input_shape": shape, "n_outputs": outputs, "rows": n_rows(arrays["x_train"])}
    if models:
        with tempfile.TemporaryDirectory(prefix="validate-") as tmp:
            try:
                execute(probe_stages(spec, shape, outputs), Cache(Path(tmp) / "cache"), {"probe"},
                        log_dir=Path(tmp) / "logs")
            except StageFailed as e:
                raise spec_mod.SpecError(e.result.error if e.result.error_kind == "usage" else
                                         f"{spec.path}: {e.result.name}: {e.result.error}") from None
    return facts


def _against_baseline(spec, settings: dict, record: dict, home: Path, track: bool, out_dir: Path | None) -> dict:
    """With a baseline (the spec's [gate], or `check SPEC --against ALIAS`): each model's candidate (the
    version this run registered) against the model's version under that alias, as `check NAME@candidate
    --against ALIAS` does; its reports go beside the spec's, under against-<model>/."""
    from . import gate, tracking
    baseline = settings.get("baseline")
    if not baseline or record["status"] != "passed":
        return record
    if not track:
        record["against"] = f"[gate] baseline = {baseline!r} not compared: nothing is registered with --no-track"
        return record
    thresholds = {k: v for k, v in settings.items() if k != "baseline"}
    notes, failed = [], []
    for m in spec.models:
        ref = f"{tracking.registered_name(spec.name, m.name)}@candidate"
        with home_lock(work_dir(home), f"check {ref}"):
            found = gate.check_version(home, ref, work_dir(home), track=track, against=baseline,
                                       thresholds=thresholds)
        if found.get("report_dir"):
            gate.copy_reports(Path(found["report_dir"]), (out_dir or home / "reports").resolve() / f"against-{m.name}")
        notes.append(f"{m.name}: {found.get('against', '')} ({found['status']})")
        if found["status"] != "passed":
            failed.append(f"{ref} against {baseline}: {found.get('error') or found['summary']}")
    record["against"] = "; ".join(notes)
    if failed:
        record.update(status="failed", error="; ".join(failed))
    return record


def _summary_markdown(record: dict, parity_md: Path) -> str:
    verdict = "passed" if record["status"] == "passed" else "FAILED"
    head = f"## Parity gate: `{record['spec']}` {verdict}\n\nrun `{record['run_id']}`\n\n"
    if record.get("error"):
        head += f"> {record['error']}\n\n"
    if record.get("against"):
        head += f"Compared {record['against']}.\n\n"
    return head + parity_md.read_text()


def diff(run_a: str, run_b: str, home: Path | None = None) -> list[tuple[str, str, object, object]]:
    """What changed between two runs: (section, what, value in A, value in B): first the causes (the
    settings that changed), then metrics and parity."""
    a, b = load_record(run_a, home), load_record(run_b, home)
    rows: list[tuple[str, str, object, object]] = _causes(a, b)
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


def _causes(a: dict, b: dict) -> list[tuple[str, str, object, object]]:
    """Why the two runs differ, before what differs: each setting a stage's key hashes (the spec's
    fields it reads, file digests, converter and runtime versions) that changed, once, at the first stage
    (upstream first) that reads it; a stage whose settings and inputs are the same but whose key is
    not changed code. Read from the stages' cache entries, where they still exist."""
    from .entry_files import META_FILE
    stages_a = {s["name"]: s for s in a.get("stages", [])}
    stages_b = {s["name"]: s for s in b.get("stages", [])}
    rows, seen = [], set()
    for name, sb in stages_b.items():
        sa = stages_a.get(name)
        if sa is None or sa["key"] == sb["key"]:
            continue
        metas = [json.loads((Path(s["path"]) / META_FILE).read_text()) if s.get("path") and
                 (Path(s["path"]) / META_FILE).is_file() else None for s in (sa, sb)]
        if None in metas:
            continue
        changed = [(k, va, vb) for k, va, vb in _leaf_changes(metas[0]["settings"], metas[1]["settings"])]
        for what, va, vb in changed:
            if what not in seen:
                seen.add(what)
                rows.append(("cause", what, va, vb))
        upstream_moved = any(stages_a.get(i, {}).get("key") != stages_b.get(i, {}).get("key")
                             for i in metas[1].get("inputs", []))
        if not changed and not upstream_moved:
            rows.append(("cause", f"{name}: its code", sa["key"][:10], sb["key"][:10]))
    return rows


def _leaf_changes(x, y, path: str = ""):
    """(dotted path, old, new) for every leaf that differs between two JSON values."""
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y)):
            yield from _leaf_changes(x.get(k), y.get(k), f"{path}.{k}" if path else k)
    elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for i, (u, v) in enumerate(zip(x, y)):
            yield from _leaf_changes(u, v, f"{path}[{i}]")
    elif x != y:
        yield path, x, y


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
                "params": {"framework": m.framework, "factory": m.factory, **(m.train.__dict__ if m.train else {}),
                           **({"source": m.source} if m.source else {}),
                           **{f"model.{k}": v for k, v in m.params.items()}, "seed": spec.seed,
                           "distribution": ((train.facts if train is not None else {}).get("distribution")
                                            or {}).get("kind", "none")}}
        if train is not None and train.error:
            info["error"] = train.error
        if train is not None and not train.error:
            out = Path(train.path)
            info["metrics"] = train.facts.get("metrics", {})
            info["loss_history"] = json.loads((out / "history.json").read_text())["loss"]
            info["mlflow_model_dir"] = str(out / "mlflow_model")
            if (out / "tensorboard").is_dir():
                info["tensorboard_dir"] = str(out / "tensorboard")
            info["train_key"] = train.key
        info["exports"] = {r.facts["format"]: r.path for r in results
                           if r.kind == "export" and r.name.split(":")[1] == m.name and not r.error}
        bundle = by_name.get(f"bundle:{m.name}")
        if bundle is not None and not bundle.error:
            info["bundle_dir"] = str(Path(bundle.path) / "bundle")
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
    """Copy the reports into runs/<run_id>/, with this run's id in parity.json and junit.xml."""
    import shutil
    from parity.report import ParityReport
    dest = runs_dir(home) / run_id
    shutil.copytree(report_dir, dest, ignore=shutil.ignore_patterns("stage.json"), dirs_exist_ok=True)
    report = ParityReport.from_json(dest / "parity.json")
    report.run_id = run_id
    report.write_json(dest / "parity.json")
    report.write_junit(dest / "junit.xml")
    report.write_markdown(dest / "parity.md")
    report.write_html(dest / "report.html", sorted(dest.glob("*.png")))
    return dest


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


def deployment_of(ref: str | None = None, home: Path | None = None) -> Path:
    """The TF Serving deployment folder of a run (its id, None for the latest), of a spec (run first,
    so a cached spec costs nothing), or of a registered version (models:/NAME@ALIAS, NAME/VERSION: its
    registered bundle, checked against the digest kept with the version, deployed afresh)."""
    from . import registry_ref
    if ref is not None and (registry_ref.is_ref(ref) or ("@" in ref or "/" in ref) and not ref.endswith(".toml")):
        return _deployment_of_version(ref.removeprefix(registry_ref.PREFIX), home or home_dir())
    if ref is not None and (ref.endswith(".toml") or ref in spec_mod.builtin_specs()):
        record = run(ref, home=home, track=False)
        if record["status"] != "passed":
            raise LookupError(f"{ref}: the run did not pass ({record.get('error')}); nothing to serve")
    else:
        record = load_record(ref, home)
    stage = next((s for s in record["stages"] if s["name"] == "deploy:serving"), None)
    if stage is None or not stage.get("path"):
        raise LookupError(f"run {record['run_id']} ({record['spec']}) has no deploy:serving stage: add a "
                          f"[deploy.serving] table to its spec")
    folder = Path(stage["path"]) / "deployment"
    if not (folder / "models.config").is_file():
        raise LookupError(f"{folder}: expected the deployment written by run {record['run_id']}, found no "
                          f"models.config (the cache entry was removed?): run the spec again")
    return folder


def _deployment_of_version(ref: str, home: Path) -> Path:
    import subprocess
    import sys
    from exporters.bundle import BundleError, read_bundle
    from . import tracking
    version = tracking.resolve_version(home, ref)
    run_id, sha = version.tags.get("bundle.run_id"), version.tags.get("bundle.sha256")
    if not run_id or not sha:
        raise LookupError(f"model version {version.name}/{version.version} carries no registered bundle: run its spec again")
    out = work_dir(home) / "deployments" / f"{version.name}-{version.version}"
    if (out / "deployment" / "models.config").is_file():
        return out / "deployment"
    bundle_dir = tracking.download_bundle(home, run_id, out / "download")
    try:
        read_bundle(bundle_dir, expected_manifest_sha256=sha)
    except BundleError as e:
        raise LookupError(f"model version {version.name}/{version.version}: {e}") from None
    # the deployment is written where TensorFlow may be imported: its own process
    done = subprocess.run([sys.executable, "-m", "serving.deploy", str(bundle_dir), "--out", str(out / "deployment"),
                           "--version", str(version.version)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    if done.returncode != 0:
        raise LookupError(f"model version {version.name}/{version.version}: the deployment could not be written: "
                          f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return out / "deployment"
