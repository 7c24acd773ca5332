import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def run_cli(*args, home: Path, timeout: float = 600, env: dict | None = None,
            within: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a fresh process with its own home (cache + MLflow store);
    `within` goes before it (`ip netns exec NAME`: run it in a network namespace)."""
    full_env = {**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([*within, sys.executable, "-m", "pipeline", *args], cwd=home, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def home(tmp_path):
    return tmp_path


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """One cold `run toy` shared by the end-to-end tests (copy it before changing anything)."""
    home = tmp_path_factory.mktemp("toy")
    dump = home / "modules"  # each process writes the modules it loaded (tests/test_e2e_parity.py reads them)
    dump.mkdir()
    first = run_cli("run", "toy", home=home, env={"PIPELINE_MODULES_DUMP": str(dump)})
    assert first.returncode == 0, first.stdout + first.stderr
    return home, first


DIGITS_MORE_MODELS = """
[[model]]
name = "keras-jax-cnn"
framework = "keras"
backend = "jax"
factory = "pipeline.zoo:cnn_keras"
train = { epochs = 30 }

[[model]]
name = "keras-torch-cnn"
framework = "keras"
backend = "torch"
factory = "pipeline.zoo:cnn_keras"
train = { epochs = 30 }

[[model]]
name = "keras-bf16"
framework = "keras"
factory = "pipeline.zoo:mlp_keras"
train = { precision = "bf16" }

[[model]]
name = "torch-bf16"
framework = "torch"
factory = "pipeline.zoo:mlp_torch"
train = { precision = "bf16" }
"""


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The built-in digits spec and more models in one cold run (tests/test_digits_frameworks.py says which):
    (the run's record, its parity records, its home)."""
    import json

    from pipeline.spec import builtin_specs
    home = tmp_path_factory.mktemp("digits")
    spec = home / "digits.toml"
    spec.write_text(builtin_specs()["digits"].read_text() + DIGITS_MORE_MODELS)
    r = run_cli("run", str(spec), "--no-track", home=home, timeout=1500)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    rec = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    parity = json.loads((home / ".pipeline" / "runs" / rec["run_id"] / "parity.json").read_text())
    return rec, parity["records"], home


def copy_home(src: Path, dst: Path) -> Path:
    """A copy of a home whose MLflow store points at its own artifacts (the store records absolute
    artifact locations, so a plain copy would still read, and let a test tamper with, the original's)."""
    import shutil
    import sqlite3
    shutil.copytree(src, dst, symlinks=True)
    db = dst / "mlruns" / "mlflow.db"
    if db.is_file():
        con = sqlite3.connect(db)
        tables = [t for (t,) in con.execute("select name from sqlite_master where type='table'")]
        for t in tables:
            for _, col, kind, *_ in con.execute(f"pragma table_info('{t}')").fetchall():
                if kind.upper().startswith(("VARCHAR", "TEXT")):
                    con.execute(f'update "{t}" set "{col}" = replace("{col}", ?, ?) where "{col}" like ?',
                                (str(src), str(dst), f"%{src}%"))
        con.commit()
        con.close()
    return dst


# --------------------------------------------------------------------------- no silent skips in CI
# A test that skips on a fresh machine is a test that does not run: every skip here means something the
# set-up (scripts/setup.sh --test) should have installed. Under CI the run fails, naming each one.
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") and _skipped and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("CI") and _skipped:
        terminalreporter.section("skipped under CI (the set-up should have installed what they need)")
        for line in _skipped:
            terminalreporter.write_line(line)


# --------------------------------------------------------------------------- an S3-compatible store

@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (an ephemeral port), in a thread of this process: gone at teardown;
    one for the whole session, each test in a bucket of its own."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def store_uri(s3_endpoint, monkeypatch, request):
    """A fresh bucket per test, reached through boto3's standard settings only."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)  # this machine's own AWS settings stay out of it
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    bucket = "cache-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    import boto3
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/team"
