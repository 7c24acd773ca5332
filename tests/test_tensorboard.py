"""`python -m pipeline tensorboard`: TensorBoard on a run's training event files (pipeline/tensorboard.py), seen
in a real (headless Chromium) browser. The event files are real ones in the layout every style writes (Keras':
train/, validation/, tag epoch_loss), by TensorFlow's summary writer and by TensorBoard's own writer (plain
scalars, as torch's SummaryWriter writes them), under a fake run whose train stages point at them."""
import io
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from edge.web import CHROMIUM, CHROMIUM_ARGS
from pipeline import api
from pipeline.tensorboard import NoEventFiles, event_dirs, start

from .conftest import ROOT, run_cli

RUN_ID = "20990101-120000000-cafe"     # the latest run of the home: two trained models, one pretrained
OLD_RUN = "20980101-120000000-0ld0"    # an earlier run: no event files
STEPS = 20
RUNS = {"keras/train": 0.0, "keras/validation": 0.1, "torch/train": 0.05}  # run -> offset of its curve

# in a subprocess: the pytest process imports no framework (the pipeline's own rule for its main process)
WRITER = r"""
import math, sys, time
from pathlib import Path
import tensorflow as tf
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
root = Path(sys.argv[1])
def loss(step, offset):
    return 2.0 * math.exp(-step / 5) + offset
for run, offset in ((root / "keras" / "train", 0.0), (root / "keras" / "validation", 0.1)):
    writer = tf.summary.create_file_writer(str(run))   # what Keras' TensorBoard callback writes
    with writer.as_default():
        for step in range(%(steps)d):
            tf.summary.scalar("epoch_loss", loss(step, offset), step=step)
    writer.close()
writer = EventFileWriter(str(root / "torch" / "train"))  # what torch's SummaryWriter writes: simple values
for step in range(%(steps)d):
    value = summary_pb2.Summary.Value(tag="epoch_loss", simple_value=loss(step, 0.05))
    writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=[value])))
writer.close()
""" % {"steps": STEPS}


def expected_loss(run: str, step: int) -> float:
    return 2.0 * math.exp(-step / 5) + RUNS[run]


def stage(name: str, kind: str, path: Path | str) -> dict:
    return {"name": name, "kind": kind, "key": "0" * 64, "lane": None, "cached": False, "elapsed_s": 0.1,
            "facts": {}, "error": None, "path": str(path), "error_kind": None, "volatile": None, "traceback": ""}


def record(run_id: str, stages: list[dict]) -> dict:
    return {"run_id": run_id, "spec": "toy", "status": "passed", "error": None, "started": time.time(),
            "finished": time.time(), "elapsed_s": 1.0, "stages": stages, "models": {}}


@pytest.fixture(scope="module")
def run_home(tmp_path_factory):
    """A home whose latest run trained keras and torch (with event files) and took a pretrained model."""
    home = tmp_path_factory.mktemp("tbhome")
    cache = home / ".pipeline" / "cache" / "train"
    folders = {m: cache / f"{m}-entry" for m in ("keras", "torch", "pretrained")}
    for f in folders.values():
        f.mkdir(parents=True)
    logs = home / "logs"
    done = subprocess.run([sys.executable, "-c", WRITER, str(logs)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    for m in ("keras", "torch"):
        (logs / m).rename(folders[m] / "tensorboard")
    trained = record(RUN_ID, [stage("data", "data", home / "data"), stage("train:keras", "train", folders["keras"]),
                              stage("train:torch", "train", folders["torch"]),
                              stage("train:pretrained", "train", folders["pretrained"]),
                              stage("export:keras:onnx", "export", home / "x")])
    old = record(OLD_RUN, [stage("train:keras", "train", cache / "removed-entry"),
                           stage("train:pretrained", "train", folders["pretrained"])])
    api.save_record(home, old)
    api.save_record(home, trained)
    assert api.load_record(None, home)["run_id"] == RUN_ID
    return home, folders


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except OSError:
        return False


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line names `text` (zombies have an empty one)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and d.name != str(os.getpid()):
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def test_event_dirs_are_the_trained_models_folders_and_a_run_without_any_says_why(run_home):
    home, folders = run_home
    assert event_dirs(api.load_record(None, home)) == {"keras": folders["keras"] / "tensorboard",
                                                       "torch": folders["torch"] / "tensorboard"}
    with pytest.raises(NoEventFiles) as e:
        event_dirs(api.load_record(OLD_RUN, home))
    assert isinstance(e.value, ValueError) and e.value.user_error is True
    msg = str(e.value)
    assert OLD_RUN in msg and "no TensorBoard event files" in msg
    assert "keras, pretrained" in msg and "not trained here" in msg and "predates event files" in msg
    with pytest.raises(NoEventFiles, match="no train stages"):
        event_dirs(record("r1", [stage("data", "data", home)]))


def test_start_fails_clearly_on_a_busy_port_and_with_tensorboards_own_words_when_it_exits(run_home, monkeypatch):
    import socket
    from pipeline import tensorboard
    dirs = event_dirs(api.load_record(None, run_home[0]))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(tensorboard.TensorBoardFailed, match=f"127.0.0.1:{port}: Address already in use"):
            start(dirs, port=port)
    monkeypatch.setattr(tensorboard, "LAUNCH",  # a TensorBoard that refuses its flags
                        "import sys; print('E0101 no such flag --logdir_spec', file=sys.stderr); sys.exit(3)")
    with pytest.raises(tensorboard.TensorBoardFailed) as e:
        start(dirs)
    assert "exited with code 3 before it served" in str(e.value) and "no such flag --logdir_spec" in str(e.value)


def series_pixels(png: bytes) -> int:
    """Strongly coloured pixels: the curves (the axes, grid and labels are grey)."""
    from PIL import Image
    img = Image.open(io.BytesIO(png)).convert("RGB")
    return sum(1 for r, g, b in img.getdata() if max(r, g, b) - min(r, g, b) > 80)


@pytest.mark.e2e
@pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"headless Chromium is not installed at {CHROMIUM}")
def test_the_browser_shows_the_loss_curves_of_every_model(run_home, tmp_path):
    from playwright.sync_api import sync_playwright
    home, _ = run_home
    t0 = time.monotonic()
    board = start(event_dirs(api.load_record(None, home)))
    started_s = time.monotonic() - t0
    outside = []
    try:
        assert board.url.startswith("http://127.0.0.1:")
        # TensorBoard's own API: each model's runs, the tag, all 20 steps with the values written
        tags = get_json(board.url + "data/plugin/scalars/tags")
        assert {run: set(t) for run, t in tags.items()} == {run: {"epoch_loss"} for run in RUNS}
        for run in RUNS:
            q = urllib.parse.urlencode({"run": run, "tag": "epoch_loss"})
            points = get_json(f"{board.url}data/plugin/scalars/scalars?{q}")
            assert [p[1] for p in points] == list(range(STEPS)), run
            assert [p[2] for p in points] == pytest.approx([expected_loss(run, s) for s in range(STEPS)], rel=1e-6)

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS),
                                         timeout=60_000)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})

                def local_only(route):  # TensorBoard's page must need nothing but its own server
                    if route.request.url.startswith(board.url):
                        route.continue_()
                    else:
                        outside.append(route.request.url)
                        route.abort()
                page.route("**/*", local_only)
                page.goto(board.url + "#timeseries", timeout=30_000)
                card = page.locator("scalar-card").filter(has_text="epoch_loss").first
                card.wait_for(timeout=30_000)
                for run in RUNS:  # the card's legend table, one row per run
                    card.get_by_text(run, exact=True).first.wait_for(timeout=15_000)
                chart = card.locator("line-chart").first
                chart.locator("canvas, svg path").first.wait_for(state="attached", timeout=15_000)
                deadline = time.monotonic() + 15  # drawn: the curves' colours are on the chart
                while (coloured := series_pixels(chart.screenshot())) < 200 and time.monotonic() < deadline:
                    time.sleep(0.5)
                page.screenshot(path=str(tmp_path / "tensorboard_timeseries.png"))
                assert coloured >= 200, f"the line chart shows no curves ({coloured} coloured pixels)"
            finally:
                browser.close()
        assert outside == [], f"TensorBoard's page asked for something beyond its server: {outside}"
        assert (tmp_path / "tensorboard_timeseries.png").stat().st_size > 10_000
    finally:
        board.stop()
    assert board.proc.poll() is not None and not answers(board.url)
    assert not board.log.exists()
    assert started_s < 60


@pytest.fixture
def cli_env(run_home):
    return {**os.environ, "PIPELINE_HOME": str(run_home[0]), "PYTHONPATH": str(ROOT)}


@pytest.mark.e2e
@pytest.mark.cli
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_the_command_prints_the_url_once_it_answers_and_a_signal_ends_tensorboard(run_home, cli_env, sig):
    home, folders = run_home
    from pipeline.tensorboard import free_port
    port = free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "tensorboard", "--port", str(port)], cwd=home,
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    try:
        seen, deadline = [], time.monotonic() + 60
        while not (seen and seen[-1].startswith("TensorBoard:")):
            try:
                seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no URL line within 60 s: {''.join(seen)}") from None
        url = f"http://127.0.0.1:{port}"
        assert seen[-1].strip() == f"TensorBoard: {url} (run {RUN_ID}, models keras, torch)"
        # printed only once it serves
        assert set(get_json(url + "/data/plugin/scalars/tags")) == set(RUNS)
        assert processes_naming(str(folders["keras"]))  # TensorBoard, in its own process group
        proc.send_signal(sig)  # to the command, not its group: it must end TensorBoard itself
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not answers(url + "/data/logdir")
    assert processes_naming(str(folders["keras"])) == []


@pytest.mark.cli
def test_the_command_exits_2_for_a_home_without_runs_or_a_run_without_event_files(run_home, tmp_path):
    home, _ = run_home
    none = run_cli("tensorboard", home=tmp_path)
    assert none.returncode == 2 and "no runs yet" in none.stderr, none.stderr
    old = run_cli("tensorboard", OLD_RUN, home=home)
    assert old.returncode == 2, old.stdout + old.stderr
    assert f"error: run {OLD_RUN} (toy) has no TensorBoard event files" in old.stderr
    assert "Traceback" not in old.stderr


@pytest.mark.e2e
def test_a_real_toy_run_serves_each_models_loss_curve(toy_run):
    """The files `run toy` really writes (Keras' layout for both, by tf.summary and torch.utils.tensorboard),
    read back through TensorBoard's own API: every epoch's loss, ending at the run's final loss."""
    home, _ = toy_run
    rec = api.load_record(None, home)
    dirs = event_dirs(rec)
    assert set(dirs) == {"keras", "torch"}
    with start(dirs, port=0) as board:
        tags = get_json(board.url.rstrip("/") + "/data/plugin/scalars/tags")
        # TensorBoard names a run by its folder under the model's: keras/train, torch/train
        assert {run: set(t) for run, t in tags.items()} == {f"{m}/train": {"epoch_loss", "epoch_learning_rate"}
                                                            for m in ("keras", "torch")}, tags
        for run, tag in (("keras/train", "epoch_loss"), ("torch/train", "epoch_loss")):
            q = urllib.parse.urlencode({"run": run, "tag": tag})
            points = get_json(board.url.rstrip("/") + f"/data/plugin/scalars/scalars?{q}")
            final = rec["models"][run.split("/")[0]]["metrics"]["final_loss"]
            assert len(points) == 200 and abs(points[-1][2] - final) < 1e-6 * max(1.0, final), (run, points[-1])
