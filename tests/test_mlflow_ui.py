"""A reviewer's view: the MLflow UI, started against a store made by `run toy`, shows the verdicts,
the parity table and the registered model in a real (headless Chromium) browser."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium")
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_ui(toy_run):
    home = toy_run[0]
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{home / 'mlruns' / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, "mlflow ui exited"
                assert time.time() < deadline, "mlflow ui did not answer /health in 90 s"
                time.sleep(0.5)
        yield home, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the UI's workers share its process group
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by `scripts/setup.sh --test`")
def test_run_page_shows_verdicts_table_plots_and_registered_model(mlflow_ui):
    from playwright.sync_api import sync_playwright
    home, port = mlflow_ui
    rec = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[0].read_text())
    exp, run_id = rec["mlflow"]["experiment_id"], rec["mlflow"]["parent_run_id"]
    child = rec["mlflow"]["models"]["keras"]["run_id"]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(f"http://127.0.0.1:{port}/#/experiments/{exp}/runs/{run_id}", timeout=60_000)
            page.get_by_text("Parity", exact=False).first.wait_for(timeout=60_000)
            body = page.inner_text("body")
            assert "PASSED" in body
            assert "tfjs-node-wasm" in body and "litert-interpreter" in body  # the parity table
            page.screenshot(path=str(ARTIFACTS / "mlflow_run_page.png"), full_page=True)

            page.get_by_role("tab", name="Artifacts").click()  # the plots, as images
            page.get_by_text("plots", exact=True).first.click()
            page.get_by_text("parity_keras.png", exact=True).first.click()
            plot = page.locator("img[src^='blob:']").first  # the UI shows a fetched PNG as a blob
            plot.wait_for(timeout=60_000)
            page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=plot.element_handle(),
                                   timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_parity_plot.png"), full_page=True)

            page.goto(f"http://127.0.0.1:{port}/#/experiments/{exp}/runs/{child}", timeout=60_000)
            page.get_by_text("toy-keras", exact=False).first.wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_model_run_page.png"), full_page=True)
        finally:
            browser.close()


def test_ui_command_answers_before_it_prints_and_sigterm_ends_the_server(toy_run):
    home = toy_run[0]
    port = free_port()
    env = {**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "ui", "--port", str(port)], cwd=home, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("latest run:"):
                break
        assert lines and lines[-1].startswith("latest run:"), "".join(lines)
        # printed only once the server answers, and it opens the training-runs view
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        assert "workflowType=machine_learning" in lines[-1]
        proc.send_signal(signal.SIGTERM)  # to the command, not its group: it must end the server itself
        proc.wait(timeout=30)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                time.sleep(0.5)
            except OSError:
                break
        else:
            raise AssertionError("the MLflow server still answers after SIGTERM to `pipeline ui`")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
