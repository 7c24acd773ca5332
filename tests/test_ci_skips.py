"""Under CI a skipped test fails the run (it names what the set-up should have installed); elsewhere a
skip stays a skip."""
import os
import subprocess
import sys

from .conftest import ROOT

PROBE = "import pytest\n\ndef test_needs_a_tool():\n    pytest.skip('no such tool here')\n\ndef test_plain():\n    pass\n"


def _run(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_fails_the_run_under_ci_and_names_itself(tmp_path):
    r = _run(tmp_path, ci=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "test_needs_a_tool: Skipped: no such tool here" in r.stdout


def test_a_skip_is_only_a_skip_elsewhere(tmp_path):
    r = _run(tmp_path, ci=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 1 skipped" in r.stdout
