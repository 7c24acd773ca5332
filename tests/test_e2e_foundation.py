"""End to end: `run toy` trains both frameworks, caches, records MLflow runs; bad input fails cleanly."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from .conftest import ROOT, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def toy_home(toy_run):
    return toy_run


def records(home):
    return [json.loads(p.read_text()) for p in sorted((home / ".pipeline" / "runs").glob("*.json"))]


def test_toy_trains_both_frameworks_within_tolerance(toy_home):
    home, first = toy_home
    for fw in ("keras", "torch"):
        line = next(l for l in first.stdout.splitlines() if l.strip().startswith(f"{fw} ("))
        assert "slope=" in line and "intercept=" in line
    rec = records(home)[0]
    for name in ("keras", "torch"):
        m = rec["models"][name]["metrics"]
        assert abs(m["slope"] - 3.0) <= 0.05 and abs(m["intercept"] - 2.0) <= 0.05
        assert len(rec["models"][name]["loss_history"]) == 200


def test_rerun_is_fully_cached_and_imports_no_framework(toy_home):
    home, _ = toy_home
    code = ("import sys; from pipeline.cli import main; rc = main(['run', 'toy']); "
            "print('HEAVY', [m for m in ('tensorflow', 'torch', 'keras') if m in sys.modules]); sys.exit(rc)")
    # the environment run_cli gives: an MLflow URI some earlier test left in this process's environment
    # would otherwise point the rerun at another home's store
    env = {**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=home, env=env, capture_output=True, text=True, timeout=300)
    shown = r.stdout + r.stderr  # what the rerun said, stage by stage, when a check below fails
    assert r.returncode == 0, shown
    assert "HEAVY []" in r.stdout, shown
    rec = records(home)[-1]
    assert all(s["cached"] for s in rec["stages"]), ([s["name"] for s in rec["stages"] if not s["cached"]], shown)


def test_mlflow_store_holds_parent_children_metrics_and_registered_models(toy_home):
    home, _ = toy_home
    db = home / "mlruns" / "mlflow.db"
    assert db.is_file()
    con = sqlite3.connect(db)
    runs = dict(con.execute("select run_uuid, name from runs"))
    parents = [r for (r,) in con.execute("select run_uuid from runs where run_uuid not in "
                                         "(select run_uuid from tags where key='mlflow.parentRunId')")]
    assert len(parents) >= 1
    children = con.execute("select run_uuid, value from tags where key='mlflow.parentRunId'").fetchall()
    assert {runs[c] for c, p in children if p == parents[0]} == {"keras", "torch"}
    child = next(c for c, p in children if p == parents[0] and runs[c] == "keras")
    steps = con.execute("select count(*) from metrics where run_uuid=? and key='loss'", (child,)).fetchone()[0]
    assert steps == 200
    params = dict(con.execute("select key, value from params where run_uuid=?", (child,)))
    assert params["optimizer"] == "adam" and params["lr"] == "0.1" and params["epochs"] == "200"
    tags = dict(con.execute("select key, value from tags where run_uuid=?", (parents[0],)))
    assert tags["pipeline.spec_hash"] and tags["pipeline.code_version"] and "pipeline.cached_stages" in tags
    versions = con.execute("select name, version, source from model_versions").fetchall()
    assert {"toy-keras", "toy-torch"} <= {n for n, _, _ in versions}
    logged = con.execute("select count(*) from logged_models").fetchone()[0]
    assert logged >= 2
    mlmodel = list((home / "mlruns" / "artifacts").rglob("MLmodel"))
    flavors = " ".join(p.read_text() for p in mlmodel)
    assert "keras_version" in flavors and "pytorch" in flavors and "signature" in flavors


def test_show_prints_stages_and_metrics(toy_home):
    home, _ = toy_home
    r = run_cli("show", home=home)
    assert r.returncode == 0, r.stderr
    assert "train:keras" in r.stdout and "slope=" in r.stdout


USER_SPEC = """
[pipeline]
name = "user"
seed = 0

[data]
source = "{source}"
task = "regression"
{data_extra}

[train]
optimizer = "sgd"
lr = 0.1
epochs = {epochs}
loss = "mse"

[accept]
slope = {{ target = 3.0, tolerance = 0.05 }}

[[model]]
name = "net"
framework = "torch"
factory = "my_models:{factory}"
"""

MY_MODELS = """
from pathlib import Path
import torch.nn as nn

def good(input_shape, n_outputs, **_):
    # a trace the test can check: this factory, not a built-in one, made the model
    Path(__file__).with_name("factory_calls.txt").open("a").write(f"good {tuple(input_shape)} {n_outputs}\\n")
    return nn.Linear(input_shape[-1], n_outputs)

def broken(input_shape, n_outputs, **_):
    raise RuntimeError("my factory is broken")
"""


def user_spec(tmp_path, source="linear", data_extra="", epochs=200, factory="good"):
    (tmp_path / "my_models.py").write_text(MY_MODELS)
    p = tmp_path / "spec.toml"
    p.write_text(USER_SPEC.format(source=source, data_extra=data_extra, epochs=epochs, factory=factory))
    return p


def test_user_spec_with_own_factory(tmp_path):
    r = run_cli("run", str(user_spec(tmp_path)), "--no-track", home=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "slope=" in r.stdout
    calls = (tmp_path / "factory_calls.txt").read_text().splitlines()
    assert calls and set(calls) == {"good (1,) 1"}  # built by the user's factory (training, and reloads)
    rec = records(tmp_path)[-1]
    assert rec["models"]["net"]["factory"] == "my_models:good"


def test_factory_that_raises_marks_run_failed_and_keeps_data(tmp_path):
    r = run_cli("run", str(user_spec(tmp_path, factory="broken")), home=tmp_path)
    assert r.returncode == 1
    assert "my factory is broken" in r.stderr
    rec = records(tmp_path)[-1]
    assert rec["status"] == "failed"
    assert next(s for s in rec["stages"] if s["name"] == "data")["error"] is None
    assert list((tmp_path / ".pipeline" / "cache" / "data").glob("*/arrays.npz"))
    con = sqlite3.connect(tmp_path / "mlruns" / "mlflow.db")
    statuses = {s for (s,) in con.execute("select status from runs")}
    assert statuses == {"FAILED"}
    errors = [v for (v,) in con.execute("select value from tags where key='pipeline.error'")]
    assert any("my factory is broken" in e for e in errors)


def test_non_finite_training_data_is_refused_before_training(tmp_path):
    x = np.linspace(-1, 1, 50, dtype=np.float32).reshape(-1, 1)
    y = 3 * x + 2
    y[7, 0] = np.nan
    np.savez(tmp_path / "data.npz", x=x, y=y)
    r = run_cli("run", str(user_spec(tmp_path, source="npz", data_extra='path = "data.npz"')), "--no-track",
                home=tmp_path)
    assert r.returncode == 2
    assert "data.npz: array 'y' holds 1 non-finite" in r.stderr and "[7]" in r.stderr
    assert "Traceback" not in r.stderr
    rec = records(tmp_path)[-1]
    assert [s["name"] for s in rec["stages"]] == ["data"]


def test_model_missing_tolerance_fails_with_numbers(tmp_path):
    r = run_cli("run", str(user_spec(tmp_path, epochs=2)), "--no-track", home=tmp_path)
    assert r.returncode == 1
    assert "missed its acceptance bounds" in r.stderr and "slope = " in r.stderr and "not within 0.05 of 3.0" in r.stderr


def test_kill_9_during_training_then_rerun_completes(tmp_path):
    env = {**os.environ, "PIPELINE_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "toy", "--no-track"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if "train:torch" in line and "running" in line:  # the slower of the two (about 3.5 s)
            break
        assert time.time() < deadline
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cache = tmp_path / ".pipeline" / "cache"
    finished = {json.loads(p.read_text())["name"] for p in (cache / "train").glob("*/stage.json")}
    assert "train:torch" not in finished, "torch finished training before the kill: the test proved nothing"
    leftovers = list((cache / "train").glob(".tmp-*"))
    assert leftovers, "the killed stage left no half-written folder: the test proved nothing"
    r = run_cli("run", "toy", "--no-track", home=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list(cache.rglob(".tmp-*")) and not any(p.exists() for p in leftovers)
    rec = records(tmp_path)[-1]
    killed = next(s for s in rec["stages"] if s["name"] == "train:torch")
    assert not killed["cached"] and killed["error"] is None  # the killed stage ran again, from the start
    for name in ("keras", "torch"):
        assert abs(rec["models"][name]["metrics"]["slope"] - 3.0) <= 0.05


def test_from_stage_and_force(tmp_path):
    spec = user_spec(tmp_path)
    spec.write_text(spec.read_text() + '\n[export]\nformats = ["onnx", "torchscript"]\n')
    first = run_cli("run", str(spec), "--no-track", home=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr

    def cached_by_kind(rec):
        kinds = {}
        for s in rec["stages"]:
            kinds.setdefault(s["kind"], set()).add(s["cached"])
        return kinds

    r = run_cli("run", str(spec), "--no-track", "--from", "export", home=tmp_path)
    assert r.returncode == 0, r.stderr
    kinds = cached_by_kind(records(tmp_path)[-1])
    assert kinds["data"] == kinds["train"] == kinds["reference"] == {True}
    assert kinds["export"] == kinds["verify"] == kinds["report"] == {False}

    r = run_cli("run", str(spec), "--no-track", "--force", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not any(s["cached"] for s in records(tmp_path)[-1]["stages"])

    r = run_cli("run", str(spec), "--no-track", "--from", "nowhere", home=tmp_path)
    assert r.returncode == 2 and "--from nowhere: expected one of" in r.stderr
