"""A TensorFlow SavedModel folder as a trained model (`framework = "tensorflow"`, or `export DIR`): its
serving_default signature becomes the module every format is converted from and verified against."""
import json
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT, run_cli

pytestmark = pytest.mark.cli

MAKE = """
import numpy as np, keras
keras.utils.set_random_seed(0)
m = keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(2)])
m.export("saved", verbose=False)
np.savez("example.npz", x=np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32))
"""


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sm")
    subprocess.run([sys.executable, "-c", MAKE], cwd=folder, check=True, capture_output=True, text=True)
    return folder


def test_a_saved_model_folder_exports_to_every_format_verified(saved_model, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = run_cli("export", str(saved_model / "saved"), "--example", str(saved_model / "example.npz"), "--no-track",
                home=home, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    assert rec["models"]["saved"]["framework"] == "tensorflow"
    parity = json.loads((ROOT.__class__(rec["report_dir"]) / "parity.json").read_text())
    cells = [(x["format"], x["variant"], x.get("runtime"), x["status"]) for x in parity["records"]]
    assert len(cells) == 8 and all(c[3] == "passed" for c in cells), cells
    assert parity["discrimination"]["saved"]["perturbation_caught"] is True  # the nudged copy differs


def test_a_saved_model_folder_without_its_variables_is_refused_naming_the_folder(saved_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_model / "saved", broken)
    shutil.rmtree(broken / "variables")
    r = run_cli("export", str(broken), "--example", str(saved_model / "example.npz"), "--no-track",
                home=tmp_path, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "tf.saved_model.load failed" in out and str(broken) in out, out[-3000:]
    assert "expected a SavedModel folder (saved_model.pb and variables/)" in out
