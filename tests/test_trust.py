"""Verdicts that cannot be fooled: the gate checks what a version ships, the cache never vouches for a
changed file, an outcome caused by the machine is never reused, and two runs on one home both end well."""
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, copy_home, run_cli

pytestmark = pytest.mark.e2e


def records(home):
    return [json.loads(p.read_text()) for p in sorted((home / ".pipeline" / "runs").glob("*.json"))]


def stage(rec, name):
    return next(s for s in rec["stages"] if s["name"] == name)


def nudge_onnx_weight(path: Path) -> None:
    """Change one weight of an ONNX file and save it as a valid model (a tamper, not a corruption)."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(path))
    init = m.graph.initializer[0]
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.05
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, str(path))


def cache_entry(home: Path, name: str) -> Path:
    for meta in (home / ".pipeline" / "cache").glob("*/*/stage.json"):
        if json.loads(meta.read_text())["name"] == name:
            return meta.parent
    raise AssertionError(f"no cache entry {name}")


def version_tags(home: Path, name: str, alias: str = "candidate") -> dict:
    con = sqlite3.connect(home / "mlruns" / "mlflow.db")
    version = con.execute("select version from registered_model_aliases where name=? and alias=?",
                          (name, alias)).fetchone()[0]
    return dict(con.execute("select key, value from model_version_tags where name=? and version=?",
                            (name, version)))


def registered_onnx(home: Path, name: str) -> Path:
    run = version_tags(home, name)["bundle.run_id"]
    found = list((home / "mlruns" / "artifacts").glob(f"*/{run}/artifacts/bundle/onnx/model.onnx"))
    assert len(found) == 1, found
    return found[0]


def test_changed_cached_artifact_is_rebuilt_not_passed(toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    entry = cache_entry(home, "export:torch:onnx")
    nudge_onnx_weight(entry / "onnx" / "model.onnx")
    r = run_cli("run", "toy", home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "export:torch:onnx" in r.stdout and "was changed since it was written" in r.stdout
    rec = records(home)[-1]
    for name in ("export:torch:onnx", "verify:torch:onnx", "bundle:torch", "report"):
        assert not stage(rec, name)["cached"], name  # rebuilt and verified again, never taken on trust
    assert stage(rec, "export:keras:onnx")["cached"]  # what did not change is still reused
    assert list(entry.parent.glob(f".changed-{entry.name}-*")), "the changed entry is kept for a person to see"
    parity = json.loads((Path(rec["report_dir"]) / "parity.json").read_text())
    onnx_rec = next(x for x in parity["records"] if x["label"] == "torch/onnx")
    assert onnx_rec["status"] == "passed" and onnx_rec["comparison"]["metrics"]["max_abs"] < 1e-5


def test_gate_on_a_version_checks_its_registered_bundle_and_only_that_model(toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    ok = run_cli("check", "toy-torch@candidate", "--out", str(tmp_path / "ok"), home=home)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    parity = json.loads((tmp_path / "ok" / "parity.json").read_text())
    assert {r["model"] for r in parity["records"]} == {"torch"}
    assert {r["format"] for r in parity["records"]} == {"saved_model", "torchscript", "onnx", "litert", "tfjs"}
    assert parity["passed"]

    nudge_onnx_weight(registered_onnx(home, "toy-torch"))
    bad = run_cli("check", "toy-torch@candidate", "--out", str(tmp_path / "bad"), home=home)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "torch/onnx" in bad.stderr and "registered bundle was changed" in bad.stderr
    parity = json.loads((tmp_path / "bad" / "parity.json").read_text())
    failed = [r for r in parity["records"] if r["status"] == "failed"]
    assert [r["label"] for r in failed] == ["torch/onnx"]
    assert failed[0]["comparison"]["metrics"]["max_abs"] > 1e-3  # the numbers show it too
    assert version_tags(home, "toy-torch")["parity.verdict"] == "failed"
    refused = run_cli("promote", "toy-torch@candidate", home=home)
    assert refused.returncode == 1 and "parity verdict is 'failed'" in refused.stderr
    # the local cache was never touched: the spec's own artifacts still pass
    assert run_cli("check", "toy-keras@candidate", "--out", str(tmp_path / "k"), home=home).returncode == 0


def test_gate_refuses_a_changed_manifest_and_a_missing_bundle(toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    manifest = registered_onnx(home, "toy-keras").parents[1] / "manifest.json"
    data = json.loads(manifest.read_text())
    data["tolerances"] = {"fp32": {"atol": 1.0}}  # a loosened tolerance must not slip through
    manifest.write_text(json.dumps(data))
    r = run_cli("check", "toy-keras@candidate", home=home)
    assert r.returncode == 1
    assert "changed after it was registered" in r.stderr and "manifest.json" in r.stderr
    assert "Traceback" not in r.stderr

    import shutil
    shutil.rmtree(manifest.parent)
    r = run_cli("check", "toy-keras@candidate", home=home)
    assert r.returncode == 1
    assert "missing from the store" in r.stderr and "Traceback" not in r.stderr


def test_a_missing_runtime_is_reported_and_never_cached(toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    no_node = {"PATH": str(Path(sys.executable).parent)}  # the venv's tools, but no `node`
    r = run_cli("run", "toy", "--from", "verify", "--no-track", home=home, env=no_node)
    assert r.returncode == 1
    assert "node" in r.stderr and "not on PATH" in r.stderr
    rec = records(home)[-1]
    assert stage(rec, "verify:keras:tfjs")["volatile"]
    assert not stage(rec, "verify:keras:onnx")["volatile"]

    again = run_cli("run", "toy", "--no-track", home=home)  # node is back: checked again, not replayed
    assert again.returncode == 0, again.stdout + again.stderr
    rec = records(home)[-1]
    assert not stage(rec, "verify:keras:tfjs")["cached"] and not stage(rec, "report")["cached"]
    assert stage(rec, "verify:keras:onnx")["cached"]


def test_two_runs_at_once_on_one_home_both_finish(toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    env = {**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "run", "toy", "--force"], cwd=home, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    assert sum("waiting: another run is using this home" in err for _, err in outs) == 1
    recs = records(home)[-2:]
    assert all(r["status"] == "passed" and not any(s["cached"] for s in r["stages"]) for r in recs)
    con = sqlite3.connect(home / "mlruns" / "mlflow.db")
    assert con.execute("select count(*) from runs where status='RUNNING'").fetchone()[0] == 0
    versions = con.execute("select name, count(*) from model_versions group by name").fetchall()
    assert dict(versions) == {"toy-keras": 1, "toy-torch": 1}  # the same trained models: no copies


FAILING_SPEC = """
[pipeline]
name = "strict"
[data]
source = "linear"
task = "regression"
[train]
optimizer = "sgd"
lr = 0.1
epochs = 50
loss = "mse"
[[model]]
name = "net"
framework = "torch"
factory = "pipeline.zoo:linear_torch"
[export]
formats = ["onnx", "litert"]
[parity.tolerances]
litert = { atol = 1e-12, rtol = 1e-12 }
"""


def test_a_failed_run_registers_no_model_version(tmp_path):
    spec = tmp_path / "strict.toml"
    spec.write_text(FAILING_SPEC)
    r = run_cli("run", str(spec), home=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "net/litert" in r.stderr
    con = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db")
    assert con.execute("select count(*) from model_versions").fetchone()[0] == 0
    assert {s for (s,) in con.execute("select status from runs")} == {"FAILED"}


def test_cached_rerun_records_nothing_new_and_bundles_are_logged_once(toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    con = sqlite3.connect(home / "mlruns" / "mlflow.db")
    runs_before = con.execute("select count(*) from runs").fetchone()[0]
    r = run_cli("run", "toy", home=home)
    assert r.returncode == 0 and "not recorded again" in r.stdout
    assert con.execute("select count(*) from runs").fetchone()[0] == runs_before
    rec = records(home)[-1]
    assert rec["mlflow"]["parent_run_id"] == records(home)[0]["mlflow"]["parent_run_id"]

    r = run_cli("run", "toy", "--from", "verify", home=home)  # something ran: recorded, bundles not copied
    assert r.returncode == 0, r.stderr
    rec = records(home)[-1]
    child = rec["mlflow"]["models"]["torch"]
    assert child["bundle"]["reused"] and child["bundle"]["run_id"] != child["run_id"]
    assert not list((home / "mlruns" / "artifacts").glob(f"*/{child['run_id']}/artifacts/bundle"))


def test_reports_carry_the_run_id_and_are_readable_by_others(toy_run):
    home, _ = toy_run
    rec = records(home)[0]
    report_dir = Path(rec["report_dir"])
    assert json.loads((report_dir / "parity.json").read_text())["run_id"] == rec["run_id"]
    for name in ("parity.json", "parity.md", "junit.xml"):
        assert (report_dir / name).stat().st_mode & 0o044 == 0o044, name


def test_interrupted_mlflow_runs_are_marked_failed_by_the_next_run(toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    code = ("import mlflow, sys; from pipeline import tracking; tracking.configure(__import__('pathlib').Path('.'));"
            "exp = mlflow.get_experiment_by_name('toy');"
            "r = mlflow.MlflowClient().create_run(exp.experiment_id, tags={'pipeline.home': sys.argv[1]});"
            "print(r.info.run_id)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stale = subprocess.run([sys.executable, "-c", code, str(home)], cwd=home, env=env, capture_output=True,
                           text=True, check=True).stdout.split()[-1]
    r = run_cli("run", "toy", "--from", "report", home=home)
    assert r.returncode == 0, r.stderr
    con = sqlite3.connect(home / "mlruns" / "mlflow.db")
    assert con.execute("select status from runs where run_uuid=?", (stale,)).fetchone()[0] == "FAILED"
    assert con.execute("select count(*) from runs where status='RUNNING'").fetchone()[0] == 0


def test_an_unwritable_cache_is_a_clear_usage_error(tmp_path):
    (tmp_path / ".pipeline").mkdir()
    (tmp_path / ".pipeline" / "cache").write_text("not a folder")
    r = run_cli("run", "toy", "--force", "--no-track", home=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "expected a cache folder this user can write" in r.stderr and "PIPELINE_HOME" in r.stderr
    assert "Traceback" not in r.stderr


def test_each_home_configured_in_one_process_gets_its_own_store_and_the_environment_is_left_as_it_was(tmp_path):
    """MLflow writes the URI it is given into the environment, where the toolkit reads the user's own
    choice: left there, the first home configured in a process would be the store of every later one
    (and of every child process)."""
    code = ("import os, sys; from pathlib import Path; from pipeline import tracking;"
            "a = tracking.configure(Path(sys.argv[1])); b = tracking.configure(Path(sys.argv[2]));"
            "print(a); print(b); print(os.environ.get('MLFLOW_TRACKING_URI'))")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(ROOT)
    a, b, left = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a"), str(tmp_path / "b")], env=env,
                                capture_output=True, text=True, check=True, timeout=120).stdout.split()[-3:]
    assert a.endswith("/a/mlruns/mlflow.db") and b.endswith("/b/mlruns/mlflow.db") and left == "None"
    shared = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a"), str(tmp_path / "b")],
                            env={**env, "MLFLOW_TRACKING_URI": "sqlite:////tmp/team.db"}, capture_output=True,
                            text=True, check=True, timeout=120).stdout.split()[-3:]
    assert shared == ["sqlite:////tmp/team.db"] * 3  # a URI the user set is everyone's, and stays set


def test_a_registered_version_keeps_the_bundle_it_was_verified_with(toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    before = version_tags(home, "toy-keras")
    r = run_cli("run", "toy", "--force", home=home)  # the same trained model, every stage run again
    assert r.returncode == 0, r.stdout + r.stderr
    after = version_tags(home, "toy-keras")
    assert (after["bundle.sha256"], after["bundle.run_id"]) == (before["bundle.sha256"], before["bundle.run_id"])
    # toy ships a SavedModel, whose fingerprint.pb TensorFlow writes anew on every save: other bytes, noted
    # with the file and why, and not swapped in; every other file is made again byte for byte, or its
    # bundle declares why not (exporters/bundle.py NOT_REPRODUCIBLE)
    from exporters.bundle import NOT_REPRODUCIBLE
    assert after["bundle.rerun_sha256"] != before["bundle.sha256"]
    assert "keeps the bundle it was registered with" in r.stdout and "fingerprint.pb (TensorFlow writes" in r.stdout
    differs = dict(d.split(": ", 1) for d in after["bundle.rerun_differs"].splitlines())
    assert "fingerprint.pb" in {Path(f).name for f in differs} and \
        all(why == NOT_REPRODUCIBLE.get(Path(f).name) for f, why in differs.items()), differs
