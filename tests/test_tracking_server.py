"""A team's tracking server: `python -m pipeline tracking-server` (MLflow on PostgreSQL, artifacts in an S3
store served through it), and every command that reads or writes MLflow working against it, on loopback."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, copy_home, run_cli

pytestmark = pytest.mark.e2e

S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TeamServer:
    """One `tracking-server` process (PostgreSQL and mlflow server under it) that a test may stop and
    start again on the same store: the cluster and the artifacts outlive it."""

    def __init__(self, store: Path, artifacts: str, s3_endpoint: str):
        self.store, self.artifacts, self.port = store, artifacts, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # only the server holds the object store's credentials: clients reach artifacts through it
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, **S3_KEYS}
        self.proc, self.log = None, store.parent / "server.log"

    def start(self) -> None:
        from pipeline.tracking_server import healthy
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline", "tracking-server", "--store", str(self.store),
                                      "--artifacts", self.artifacts, "--port", str(self.port), "--workers", "1"],
                                     env=self.env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 240
        while not healthy(self.url, timeout=1):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.5)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def team_server(s3_endpoint):
    import shutil
    import tempfile
    import boto3
    boto3.client("s3", endpoint_url=s3_endpoint, **{k.lower(): v for k, v in S3_KEYS.items()
                                                    if k != "AWS_DEFAULT_REGION"},
                 region_name="us-east-1").create_bucket(Bucket="team-mlflow")
    # PostgreSQL runs as an unprivileged user when the tests run as root: its store must be reachable by
    # that user, which pytest's own temporary folders (mode 0700) are not
    top = Path(tempfile.mkdtemp(prefix="team-server-"))
    top.chmod(0o755)
    server = TeamServer(top / "store", "s3://team-mlflow/artifacts", s3_endpoint)
    server.start()
    yield server
    if server.proc.poll() is None:
        server.stop()
    shutil.rmtree(top, ignore_errors=True)


def _rows(server: TeamServer, sql: str) -> list[tuple]:
    """What the server's PostgreSQL holds, over its socket (MLflow's own tables)."""
    import psycopg2
    from pipeline.tracking_server import DATABASE, DB_USER, PG_PORT
    con = psycopg2.connect(host=str(server.store / "socket"), port=PG_PORT, user=DB_USER, dbname=DATABASE)
    try:
        with con.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        con.close()


def _s3_keys(s3_endpoint: str) -> list[str]:
    import boto3
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                      region_name="us-east-1")
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="team-mlflow")
            for o in page.get("Contents", [])]


def test_runs_models_and_the_registry_live_on_the_team_server(team_server, toy_run, tmp_path, s3_endpoint,
                                                               monkeypatch):
    home = copy_home(toy_run[0], tmp_path / "home")
    spec = tmp_path / "toy.toml"  # toy, told its tracking server by the spec itself
    spec.write_text((ROOT / "pipeline/specs/toy.toml").read_text() + f'\n[tracking]\nuri = "{team_server.url}"\n')
    before = (home / "mlruns" / "mlflow.db").stat().st_mtime_ns
    r = run_cli("run", str(spec), home=home)  # every stage cached: only the record is new, on the server
    assert r.returncode == 0, r.stdout + r.stderr
    assert "30 cached" in r.stdout and "MLflow run" in r.stdout
    assert (home / "mlruns" / "mlflow.db").stat().st_mtime_ns == before  # the local store was not touched

    assert {n for (n,) in _rows(team_server, "select name from registered_models")} >= {"toy-keras", "toy-torch"}
    tags = dict(_rows(team_server, "select key, value from model_version_tags where name = 'toy-keras'"))
    assert tags["parity.verdict"] == "passed" and tags["bundle.sha256"]
    stored = _s3_keys(s3_endpoint)
    assert any(k.endswith("bundle/manifest.json") for k in stored), stored[:20]
    assert any("/tensorboard/" in k for k in stored)  # the training's event files too

    uri = ("--tracking-uri", team_server.url)
    gate = run_cli("check", "toy-torch@candidate", "--out", str(tmp_path / "gate"), *uri, home=home)
    assert gate.returncode == 0, gate.stdout + gate.stderr  # the bundle came back through the server
    assert run_cli("promote", "toy-torch@candidate", *uri, home=home).returncode == 0
    against = run_cli("check", "toy-torch@candidate", "--against", "production", *uri, home=home)
    assert against.returncode == 0 and "is production already" in against.stdout, against.stdout + against.stderr
    ui = run_cli("ui", *uri, home=home)
    assert ui.returncode == 0 and f"MLflow UI: {team_server.url}" in ui.stdout
    assert f"latest run: {team_server.url}/#/experiments/" in ui.stdout

    # a registered version as a pretrained source resolves and downloads through the client API
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.url)
    from pipeline import tracking
    ref = tracking.resolve_ref(home, "models:/toy-torch@production")
    assert (ref.name, ref.version, ref.framework) == ("toy-torch", 1, "torch")
    got = tracking.download_model_file(home, ref, tmp_path / "download", (".pt2", ".pth", ".pt"))
    assert got.stat().st_size > 0
    with pytest.raises(LookupError, match=r"no alias 'staging' on registered model 'toy-torch' \(aliases: "):
        tracking.resolve_ref(home, "models:/toy-torch@staging")
    with pytest.raises(LookupError, match="no registered model 'nope'.*registered: .*toy-keras"):
        tracking.resolve_ref(home, "models:/nope/1")


def test_a_server_that_does_not_answer_stops_the_run_before_any_stage(toy_run, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    closed = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    r = run_cli("run", "toy", "--tracking-uri", closed, home=home)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"the MLflow tracking server {closed} does not answer" in r.stderr and time.monotonic() - t0 < 60
    assert not (home / ".pipeline" / "cache").exists() and not (home / "mlruns").exists()
    promote = run_cli("promote", "toy-keras@candidate", "--tracking-uri", closed, home=home)
    assert promote.returncode == 2 and closed in promote.stderr


def test_a_server_lost_mid_run_fails_the_run_and_the_next_run_records(team_server, toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    cmd = [sys.executable, "-m", "pipeline", "run", "toy", "--from", "verify", "--tracking-uri", team_server.url]
    env = {**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = subprocess.Popen(cmd, cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in run.stdout:  # the verify stages are under way: the record comes after them
        out.append(line)
        if "verify:" in line:
            assert team_server.stop() == 0
            break
    out += run.stdout.readlines()
    assert run.wait(timeout=300) == 1, "".join(out)
    text = "".join(out)
    assert f"recording the run in MLflow at {team_server.url} failed" in text and "cached" in text, text
    assert "tracking-server: stopped" in team_server.log.read_text()

    team_server.start()  # the same store: the cluster and the artifacts of the earlier tests are still there
    again = run_cli("run", "toy", "--tracking-uri", team_server.url, home=home)
    assert again.returncode == 0 and "30 cached" in again.stdout, again.stdout + again.stderr
    recorded = again.stdout.rsplit("MLflow run ", 1)[1].split()[0]
    [(status,)] = _rows(team_server, f"select status from runs where run_uuid = '{recorded}'")
    assert status == "FINISHED"


def test_two_homes_record_at_once_and_a_reviewer_reads_the_run_on_the_server(team_server, toy_run, tmp_path):
    """Two teammates' runs against one server at the same time: each keeps its own runs and versions,
    nothing lost or mixed; the run page opens in headless Chromium with its parity table."""
    import json
    homes = [copy_home(toy_run[0], tmp_path / name) for name in ("alice", "bob")]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    runs = [subprocess.Popen([sys.executable, "-m", "pipeline", "run", "toy", "--from", "report",
                              "--tracking-uri", team_server.url], cwd=h, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env={**env, "PIPELINE_HOME": str(h), "PYTHONPATH": str(ROOT)})
            for h in homes]
    outs = [r.communicate(timeout=600)[0] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    records = [json.loads(sorted((h / ".pipeline" / "runs").glob("*.json"))[-1].read_text()) for h in homes]
    for home, rec in zip(homes, records):
        ids = [rec["mlflow"]["parent_run_id"]] + [m["run_id"] for m in rec["mlflow"]["models"].values()]
        found = _rows(team_server, "select r.run_uuid, r.status, t.value from runs r join tags t on "
                                   "t.run_uuid = r.run_uuid and t.key = 'pipeline.home' "
                                   f"where t.value = '{home}'")
        assert sorted(i for i, _, _ in found) == sorted(ids), (home, found)  # its three runs, and only those
        assert {s for _, s, _ in found} == {"FINISHED"}
        for m in rec["mlflow"]["models"].values():  # its version exists, and the run it names is one of its own
            [(run_id,)] = _rows(team_server, "select value from model_version_tags where name = "
                                             f"'{m['registered_model']}' and version = {m['version']} and "
                                             "key = 'pipeline.run_id'")
            assert run_id in {r["run_id"] for r in records}

    from playwright.sync_api import sync_playwright
    from edge.web import CHROMIUM, CHROMIUM_ARGS
    rec = records[0]
    page_url = (f"{team_server.url}/#/experiments/{rec['mlflow']['experiment_id']}/runs/"
                f"{rec['mlflow']['parent_run_id']}?workflowType=machine_learning")
    shots = ROOT / "test-artifacts"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(page_url, timeout=60_000)
            page.get_by_text("Parity", exact=False).first.wait_for(timeout=60_000)
            page.get_by_text("Show more", exact=True).first.click()  # the description holds the parity table
            page.get_by_text("tfjs-node-wasm", exact=False).first.wait_for(state="visible", timeout=30_000)
            body = page.inner_text("body")
            assert "PASSED" in body and "litert-interpreter" in body
            page.screenshot(path=str(shots / "mlflow_team_server_run.png"), full_page=True)
        finally:
            browser.close()
