"""The release gate (`check`), registry promotion, `diff` and the CI workflow."""
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, copy_home, run_cli


def test_workflow_passes_actionlint():
    actionlint = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    r = subprocess.run([actionlint, "-color=false", str(ROOT / ".github/workflows/parity-gate.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    actionlint = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    bad = tmp_path / "bad.yml"
    bad.write_text((ROOT / ".github/workflows/parity-gate.yml").read_text().replace("runs-on:", "run-on:"))
    r = subprocess.run([actionlint, str(bad)], capture_output=True, text=True)
    assert r.returncode != 0


def test_a_release_tag_runs_each_spec_against_production_on_the_team_server():
    """The tag job's command is one our CLI takes, and it reads the team's tracking server from a secret."""
    import shlex
    import yaml
    from pipeline.cli import build_parser
    jobs = yaml.safe_load((ROOT / ".github/workflows/parity-gate.yml").read_text())["jobs"]
    job = jobs["against-production"]
    assert "refs/tags/v" in job["if"] and job["needs"] == "gate"
    assert job["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    [run] = [s["run"] for s in job["steps"] if "pipeline check" in s.get("run", "")]
    argv = shlex.split(run.replace("${{ matrix.spec }}", "toy"))
    args = build_parser().parse_args(argv[argv.index("pipeline") + 1:])
    assert (args.command, args.target, args.against) == ("check", "toy", "production")
    assert set(job["strategy"]["matrix"]["spec"]) == set(jobs["gate"]["strategy"]["matrix"]["spec"])


def _tamper_registered_tfjs_shard(home: Path, name: str) -> Path:
    import sqlite3
    con = sqlite3.connect(home / "mlruns" / "mlflow.db")
    version = con.execute("select version from registered_model_aliases where name=? and alias='candidate'",
                          (name,)).fetchone()[0]
    run = dict(con.execute("select key, value from model_version_tags where name=? and version=?",
                           (name, version)))["bundle.run_id"]
    shard = next((home / "mlruns" / "artifacts").glob(f"*/{run}/artifacts/bundle/tfjs/tfjs/*.bin"))
    w = np.frombuffer(shard.read_bytes(), dtype=np.float32).copy()
    w[0] += 0.5
    shard.write_bytes(w.tobytes())
    return shard


@pytest.mark.e2e
def test_gate_passes_then_fails_on_tamper_and_promotion_follows_verdict(toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    step_summary = tmp_path / "step_summary.md"
    step_summary.write_text("earlier step\n")
    ok = run_cli("check", "toy", "--out", str(tmp_path / "ok"), home=home,
                 env={"GITHUB_STEP_SUMMARY": str(step_summary)})
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the job summary GitHub Actions shows: appended to, not replaced
    assert step_summary.read_text().startswith("earlier step\n## Parity gate: `toy` passed")
    assert (tmp_path / "ok" / "report.html").is_file()
    suite = ET.parse(tmp_path / "ok" / "junit.xml").getroot()
    cases = suite.findall(".//testcase")
    assert len(cases) == 20 and not suite.findall(".//failure")  # 16 artifact cells, 4 served (2 models x 2 transports)
    assert "Parity gate" in (tmp_path / "ok" / "summary.md").read_text()

    good = run_cli("promote", "toy-keras@candidate", home=home)
    assert good.returncode == 0, good.stderr
    assert "is now 'production'" in good.stdout

    _tamper_registered_tfjs_shard(home, "toy-keras")
    bad = run_cli("check", "toy-keras@candidate", "--out", str(tmp_path / "bad"), home=home)
    assert bad.returncode == 1
    assert "keras/tfjs" in bad.stderr
    suite = ET.parse(tmp_path / "bad" / "junit.xml").getroot()
    failures = suite.findall(".//failure") + suite.findall(".//error")  # a changed file is an <error>
    assert len(failures) == 2 and all("keras/tfjs" in f.get("message", "") for f in failures)  # cpu and wasm

    refused = run_cli("promote", "toy-keras@candidate", home=home)
    assert refused.returncode == 1
    assert "parity verdict is 'failed'" in refused.stderr

    strict = tmp_path / "strict.toml"  # the same toy with an fp16 tolerance its LiteRT artifacts miss
    strict.write_text((ROOT / "pipeline" / "specs" / "toy.toml").read_text()
                      + '\n[parity.tolerances]\nlitert-fp16 = { atol = 1e-6, rtol = 1e-6 }\n')
    failed = run_cli("check", str(strict), "--out", str(tmp_path / "strict"), home=home)
    assert failed.returncode == 1 and "litert-fp16" in failed.stderr
    runs = sorted(p.stem for p in (home / ".pipeline" / "runs").glob("*.json"))
    d = run_cli("diff", runs[-2], runs[-1], home=home)
    assert d.returncode == 0
    assert "keras/litert-fp16@litert-interpreter" in d.stdout and "failed" in d.stdout


def test_check_unknown_target_is_a_usage_error(tmp_path):
    r = run_cli("check", "nope", home=tmp_path)
    assert r.returncode == 2


def _description_of(home: Path, name: str, version: int) -> str:
    import sqlite3
    con = sqlite3.connect(home / "mlruns" / "mlflow.db")
    try:
        return con.execute("select description from model_versions where name=? and version=?",
                           (name, version)).fetchone()[0] or ""
    finally:
        con.close()


def _toy_variant(tmp_path: Path, epochs: int) -> Path:
    """toy (same name, so the same registered models) with the Keras model trained `epochs` epochs and
    no acceptance bounds, so a worse model still registers as the candidate."""
    text = (ROOT / "pipeline" / "specs" / "toy.toml").read_text()
    text = text.replace('train = { optimizer = "adam" }', f'train = {{ optimizer = "adam", epochs = {epochs} }}')
    text = text[:text.index("[accept]")] + text[text.index("[[model]]"):]
    path = tmp_path / f"toy_{epochs}.toml"
    path.write_text(text)
    return path


@pytest.mark.e2e
def test_check_against_production_stops_a_worse_candidate_and_passes_a_better_one(toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    first = run_cli("check", "toy-keras@candidate", "--against", "production", "--no-track", home=home)
    assert first.returncode == 0 and "no production version of toy-keras yet" in first.stdout, first.stdout
    assert run_cli("promote", "toy-keras@candidate", home=home).returncode == 0  # version 1 in production
    loose = ("--max-latency-ratio", "1000", "--max-size-ratio", "1000")  # here: the metric decides
    worse = run_cli("run", str(_toy_variant(tmp_path, 3)), home=home)
    assert worse.returncode == 0, worse.stdout + worse.stderr
    runs = sorted(p.stem for p in (home / ".pipeline" / "runs").glob("*.json"))
    why = run_cli("diff", runs[0], runs[-1], home=home)  # the cold toy run against the worse one
    causes = [line.split() for line in why.stdout.splitlines() if line.startswith("cause")]
    assert ["cause", "spec.models[0].train.epochs", "200", "3"] in causes, why.stdout
    assert why.stdout.index("cause") < why.stdout.index("metric")  # why, then what
    stopped = run_cli("check", "toy-keras@candidate", "--against", "production", *loose,
                      "--out", str(tmp_path / "worse"), home=home)
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "against production: mse" in stopped.stderr and "> max_metric_drop 0.01" in stopped.stderr
    suite = ET.parse(tmp_path / "worse" / "junit.xml").getroot()
    names = [c.get("name") for c in suite.iter("testcase")]
    assert any("vs production: metric" in n for n in names) and any("vs production: size" in n for n in names)
    assert "against production (version 1)" in (tmp_path / "worse" / "summary.md").read_text()
    described = _description_of(home, "toy-keras", 2)
    assert described.startswith("**Parity: PASSED**") and "| onnx | fp32 | onnxruntime-cpu |" in described
    assert "**Gate gate-" in described and "against production: FAILED**" in described
    refused = run_cli("promote", "toy-keras@candidate", home=home)  # its parity passed; the comparison did not
    assert refused.returncode == 1 and "its gate against 'production' failed" in refused.stderr, refused.stderr

    better = run_cli("run", str(_toy_variant(tmp_path, 400)), home=home)
    assert better.returncode == 0, better.stdout + better.stderr
    passed = run_cli("check", "toy-keras@candidate", "--against", "production", *loose, home=home)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    too_big = run_cli("check", "toy-keras@candidate", "--against", "production", "--max-size-ratio", "0.5",
                      "--max-latency-ratio", "1000", home=home)
    assert too_big.returncode == 1 and "> max_size_ratio 0.5" in too_big.stderr, too_big.stdout + too_big.stderr
    assert run_cli("promote", "toy-keras@candidate", home=home).returncode == 1  # the last gate decides
    forced = run_cli("promote", "toy-keras@candidate", "--force", "--reason", "same model, size limit too tight",
                     home=home)
    assert forced.returncode == 0 and "is now 'production'" in forced.stdout, forced.stdout + forced.stderr

    # the same from a spec: [gate] compares each model's new candidate with its baseline, here production as
    # `--against` tells (over the spec's own alias, which has no version) under the spec's thresholds
    gated = _toy_variant(tmp_path, 3)
    gated.write_text(gated.read_text() + '\n[gate]\nbaseline = "staging"\nmax_latency_ratio = 1000\n'
                                        'max_size_ratio = 1000\n')
    spec_gate = run_cli("check", str(gated), "--against", "production", "--out", str(tmp_path / "spec_gate"),
                        home=home)
    assert spec_gate.returncode == 1, spec_gate.stdout + spec_gate.stderr
    assert "toy-keras@candidate against production" in spec_gate.stderr and "mse" in spec_gate.stderr
    assert (tmp_path / "spec_gate" / "against-keras" / "junit.xml").is_file()


def test_a_comparison_needs_a_baseline_and_a_bundle_folder_has_none(tmp_path):
    r = run_cli("check", "toy", "--max-size-ratio", "2", home=tmp_path)
    assert r.returncode == 2 and "thresholds need a baseline" in r.stderr, r.stderr
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    r = run_cli("check", str(tmp_path / "bundle"), "--against", "production", home=tmp_path)
    assert r.returncode == 2 and "found a bundle folder" in r.stderr, r.stderr
    assert not (tmp_path / ".pipeline").exists()  # refused before any stage ran
