"""The TF.js web bundle (edge/web.py), run in headless Chromium on the cpu, wasm and webgl backends."""
import json
import shutil
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edge.web import CHROMIUM, StaticServer, verify_in_browser, write_web_bundle
from exporters.bundle import read_bundle
from parity.compare import tolerance_for
from parity.feeds import n_rows

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"headless Chromium is not installed at {CHROMIUM}")

PNG = b"\x89PNG\r\n\x1a\n"
BACKENDS = ("cpu", "wasm", "webgl")


def latest_bundles(home: Path) -> dict:
    runs = sorted((home / ".pipeline" / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    assert runs, f"no run record under {home / '.pipeline' / 'runs'}"
    record = json.loads(runs[-1].read_text())
    return {s["name"].split(":", 1)[1]: Path(s["path"]) / "bundle"
            for s in record["stages"] if s["name"].startswith("bundle:") and s.get("path")}


@pytest.fixture(scope="module")
def bundles(toy_run):
    home, _ = toy_run
    found = latest_bundles(home)
    assert {"keras", "torch"} <= set(found), found
    return {m: read_bundle(found[m]) for m in ("keras", "torch")}


@pytest.fixture(scope="module")
def web_dirs(bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    return {m: write_web_bundle(b, root / m) for m, b in bundles.items()}


def test_the_web_bundle_holds_the_model_the_scripts_and_the_parity_data(bundles, web_dirs):
    for model, web in web_dirs.items():
        b = bundles[model]
        art = b.artifacts("tfjs")[0]
        for name in ["index.html", "page.js", "tf.min.js", "tf-backend-wasm.min.js", "tfjs-backend-wasm.wasm",
                     "tfjs-backend-wasm-simd.wasm", "model/model.json",
                     *(f"model/{p.name}" for p in Path(art.path).iterdir())]:
            assert (web / name).is_file() and (web / name).stat().st_size > 0, f"{model}: {name}"
        doc = json.loads((web / "parity.json").read_text())
        ref = b.reference()
        assert doc["model"] == model and doc["rows"] == n_rows(ref["x"])
        (inp,) = doc["inputs"]
        assert inp["name"] == b.manifest["signature"]["inputs"][0]["name"]
        assert inp["dtype"] == "float32" and inp["shape"] == list(ref["x"].shape)
        np.testing.assert_array_equal(np.asarray(inp["values"], np.float32).reshape(inp["shape"]), ref["x"])
        np.testing.assert_array_equal(np.asarray(doc["reference"]["values"], np.float32).reshape(ref["y"].shape),
                                      ref["y"])
        assert doc["tolerance"] == tolerance_for("fp32", "tfjs", b.manifest["tolerances"]).to_json()
        assert [list(c) for c in doc["feeds"]][0] == [0, 1]  # batch 1 first, as the pipeline's verify feeds


def test_the_server_serves_wasm_with_its_mime_type(web_dirs):
    with StaticServer(web_dirs["keras"]) as server:
        with urllib.request.urlopen(server.url + "tfjs-backend-wasm.wasm", timeout=10) as r:
            assert r.headers["Content-Type"] == "application/wasm"
            assert r.read()[:4] == b"\0asm"
    with pytest.raises(OSError):  # closed: nothing listens any more
        urllib.request.urlopen(server.url + "index.html", timeout=2)


@pytest.mark.parametrize("model", ["keras", "torch"])
def test_the_web_bundle_passes_in_chromium_on_every_backend(model, web_dirs, bundles, tmp_path):
    results = verify_in_browser(web_dirs[model], BACKENDS, screenshot_dir=tmp_path / "shots", timeout_s=60)
    assert [r["backend"] for r in results] == list(BACKENDS)
    atol = tolerance_for("fp32", "tfjs", bundles[model].manifest["tolerances"]).atol
    rows = n_rows(bundles[model].reference()["x"])
    for r in results:
        summary = json.dumps({k: v for k, v in r.items() if k != "page"})
        assert r["passed"], summary
        assert r["error"] is None, summary
        assert r["tf_backend"] == r["backend"], summary  # the backend's own facts: no silent fallback
        assert r["backend_facts"]["registered"] == r["backend"], summary
        if r["backend"] == "wasm":  # a fact only the wasm module has
            assert isinstance(r["backend_facts"]["threads"], int) and r["backend_facts"]["threads"] >= 1, summary
        assert r["rows"] == rows and r["max_abs"] is not None and r["max_abs"] <= atol, summary
        assert r["console_errors"] == [], summary
        shot = Path(r["screenshot"])
        assert shot.is_file() and shot.stat().st_size > 1000, summary
        assert shot.read_bytes()[:8] == PNG, summary
        print(f"{model} {r['backend']}: max abs {r['max_abs']:.3g} in {r['seconds']:.2f} s"
              + (f" ({r['gl_renderer']})" if r.get("gl_renderer") else ""))


def test_wasm_asked_but_served_by_cpu_in_chromium_is_a_failure_not_a_wasm_pass(web_dirs, bundles, monkeypatch):
    """The silent fallback, injected into page.js ($T2E_TFJS_FAULT, passed as ?fault=): TF.js' CPU backend
    registered under the name 'wasm', so tf.getBackend() says 'wasm' while the CPU computes the right numbers.
    The wasm result and its record must fail, naming what was asked and what ran (the backend's own facts);
    the cpu result still passes."""
    from edge.web import browser_record
    from exporters.tfjs import FAULT_ENV
    monkeypatch.setenv(FAULT_ENV, "wasm-served-by-cpu")
    cpu, wasm = verify_in_browser(web_dirs["keras"], ("cpu", "wasm"), timeout_s=60)
    assert cpu["passed"] and cpu["tf_backend"] == "cpu" and cpu["error"] is None, cpu
    assert not wasm["passed"], wasm
    assert wasm["tf_backend"] == "cpu" and wasm["backend_facts"]["registered"] == "wasm", wasm
    assert "asked for the wasm backend" in wasm["error"] and "cpu" in wasm["error"], wasm["error"]
    record = browser_record(bundles["keras"], wasm)
    assert record["status"] == "failed" and record["runtime"] == "chromium-wasm", record
    assert record["details"]["tf_backend"] == "cpu", record
    assert "asked for the wasm backend" in record["message"], record["message"]


def test_shifted_reference_outputs_fail_with_the_shift_as_max_abs(web_dirs, tmp_path):
    web = shutil.copytree(web_dirs["keras"], tmp_path / "shifted")
    doc = json.loads((web / "parity.json").read_text())
    doc["reference"]["values"] = [v + 0.01 for v in doc["reference"]["values"]]
    (web / "parity.json").write_text(json.dumps(doc))
    results = verify_in_browser(web, ("cpu", "wasm"), timeout_s=60)
    for r in results:
        assert not r["passed"], r
        assert r["tf_backend"] == r["backend"]
        assert r["max_abs"] == pytest.approx(0.01, abs=1e-4), r
        assert r["page"]["n_out_of_tolerance"] > 0


def test_a_corrupt_model_json_reports_an_error_not_a_pass(web_dirs, tmp_path):
    web = shutil.copytree(web_dirs["torch"], tmp_path / "corrupt")
    text = (web / "model" / "model.json").read_text()
    (web / "model" / "model.json").write_text(text[: len(text) // 2])  # truncated mid-JSON
    (r,) = verify_in_browser(web, ("cpu",), timeout_s=60)
    assert not r["passed"] and r["error"], r
    assert r["max_abs"] is None and r["rows"] == 0, r


def test_an_unknown_backend_is_an_error(web_dirs):
    (r,) = verify_in_browser(web_dirs["keras"], ("webgpu-nope",), timeout_s=30)
    assert not r["passed"] and "unknown backend" in r["error"], r
