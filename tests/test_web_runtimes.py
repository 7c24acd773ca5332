"""The web bundle beyond TF.js (edge/web.py): the ONNX fp32 artifact in onnxruntime-web and the LiteRT fp32
artifact in LiteRT.js, in headless Chromium (wasm, and webgpu on SwiftShader's adapter), judged like every
other cell. Test names carry the formats (onnx_web, litert_web): `pytest -k "onnx_web or litert_web"`.

One web bundle per toy model and one browser session per scenario (module-scoped); the screenshots are kept
in test-artifacts/web-runtimes/."""
import json
import shutil
from pathlib import Path

import pytest

from edge.web import CHROMIUM, browser_record, unsupported_cells, verify_in_browser, web_targets, write_web_bundle
from exporters.bundle import read_bundle
from parity.compare import tolerance_for
from parity.feeds import n_rows

from .test_edge_web import latest_bundles

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"headless Chromium is not installed at {CHROMIUM}")

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-artifacts" / "web-runtimes"
PNG = b"\x89PNG\r\n\x1a\n"
RUNTIMES = {("onnx_web", "wasm"): "onnxruntime-web-wasm", ("onnx_web", "webgpu"): "onnxruntime-web-webgpu",
            ("litert_web", "wasm"): "litertjs-wasm", ("litert_web", "webgpu"): "litertjs-webgpu"}


@pytest.fixture(scope="module")
def bundles(toy_run):
    home, _ = toy_run
    found = latest_bundles(home)
    return {m: read_bundle(found[m]) for m in ("keras", "torch")}


@pytest.fixture(scope="module")
def webs(bundles, tmp_path_factory):
    root = tmp_path_factory.mktemp("web-runtimes")
    return {m: write_web_bundle(b, root / m) for m, b in bundles.items()}


@pytest.fixture(scope="module")
def results(webs):
    """Every onnx_web / litert_web cell each toy bundle offers (web_targets), one browser session per model."""
    out = {}
    for model, web in webs.items():
        targets = [t for t in web_targets(web) if ":" in t]
        out[model] = {(r["format"], r["backend"]): r
                      for r in verify_in_browser(web, targets, screenshot_dir=SHOTS, timeout_s=90)}
    return out


def _summary(r: dict) -> str:
    return json.dumps({k: v for k, v in r.items() if k not in ("page", "runtime_log")})


def test_onnx_web_and_litert_web_cells_follow_the_artifacts(webs, bundles):
    # torch: both artifacts take static feeds the page can give; keras' LiteRT file has only a dynamic-batch
    # signature, which LiteRT.js cannot feed: no cell, and the reason is there for the report
    assert web_targets(webs["torch"])[3:] == ("onnx_web:wasm", "onnx_web:webgpu", "litert_web:wasm",
                                              "litert_web:webgpu")
    assert web_targets(webs["keras"])[3:] == ("onnx_web:wasm", "onnx_web:webgpu")
    assert unsupported_cells(webs["torch"]) == {}
    why = unsupported_cells(webs["keras"])["litert_web"]
    assert "dynamic dimension" in why and "'serving_default'" in why and "[-1, 1]" in why, why
    for model, web in webs.items():
        doc = json.loads((web / "parity.json").read_text())
        rows = n_rows(bundles[model].reference()["x"])
        for fmt, fmt_name, path in (("onnx_web", "onnx", "onnx/model.onnx"), ("litert_web", "litert", "litert/model.tflite")):
            sec = doc["runtimes"][fmt]
            art = next(a for a in bundles[model].artifacts(fmt_name) if a.variant == "fp32")
            assert sec["model_url"] == path and (web / path).read_bytes() == Path(art.path).read_bytes()
            assert sec["tolerance"] == tolerance_for("fp32", fmt_name, bundles[model].manifest["tolerances"]).to_json()
            assert sum(n for _, n, _, _ in sec["feeds"]) == rows and sec["feeds"][0][:2] == [0, 1]
        # the runtimes' files come from node_modules, nothing from a CDN
        for name in ("ort/ort.wasm.min.js", "ort/ort-wasm-simd-threaded.wasm", "ort/ort.webgpu.min.js",
                     "litert/core.js", "litert/wasm-utils.js", "litert/litert_wasm_internal.wasm",
                     "runtime.html", "runtime.js", "compare.js"):
            assert (web / name).is_file() and (web / name).stat().st_size > 0, name
    # LiteRT torch: the artifact's static signatures, one per batch size (130 rows: 1, 16, 7 x 16, 1)
    feeds = json.loads((webs["torch"] / "parity.json").read_text())["runtimes"]["litert_web"]["feeds"]
    assert feeds[0] == [0, 1, 1, "batch_1"] and feeds[1] == [1, 16, 16, "batch_16"]
    assert {(n, size, sig) for _, n, size, sig in feeds} == {(1, 1, "batch_1"), (16, 16, "batch_16")}


@pytest.mark.parametrize("model", ["keras", "torch"])
def test_onnx_web_and_litert_web_pass_against_the_reference_in_chromium(model, results, bundles):
    got = results[model]
    expected = {("onnx_web", "wasm"), ("onnx_web", "webgpu")} | (
        {("litert_web", "wasm"), ("litert_web", "webgpu")} if model == "torch" else set())
    assert set(got) == expected
    rows = n_rows(bundles[model].reference()["x"])
    for (fmt, backend), r in got.items():
        s = _summary(r)
        assert r["passed"] and r["error"] is None and r["runtime"] == RUNTIMES[fmt, backend], s
        tol = tolerance_for("fp32", fmt.split("_")[0], bundles[model].manifest["tolerances"])
        assert r["tolerance_for"] == f"fp32 {fmt.split('_')[0]}" and r["max_abs"] <= tol.atol, s
        assert r["rows"] == rows and r["console_errors"] == [], s  # no request left the bundle's server
        facts = r["runtime_facts"]
        if fmt == "onnx_web":
            assert facts["execution_provider"] == backend and facts["threads"] == 1, s
            if backend == "webgpu":
                assert facts["adapter"]["device"], s
        else:
            assert facts["accelerator"] == backend and facts["fully_accelerated"], s
        assert Path(r["screenshot"]).read_bytes()[:8] == PNG, s
        record = browser_record(bundles[model], r)  # the same values judged by parity.compare
        assert record["status"] == "passed" and record["format"] == fmt and record["runtime"] == r["runtime"], record
        print(f"{model} {fmt} {backend}: max abs {r['max_abs']:.3g} in {r['seconds']:.2f} s")


def test_litert_web_on_a_dynamic_batch_signature_is_unsupported_with_litertjs_own_refusal(webs, bundles):
    (r,) = verify_in_browser(webs["keras"], ("litert_web:wasm",), timeout_s=60)
    assert not r["passed"] and r["error"].startswith("UNSUPPORTED: LiteRT.js"), r["error"]
    assert "does not match expected ranked tensor type" in r["error"], r["error"]  # what LiteRT.js said
    record = browser_record(bundles["keras"], r)
    assert record["status"] == "failed" and record["details"]["outcome"] == "unsupported", record


def test_onnx_web_and_litert_web_fail_with_shifted_references(webs, bundles, tmp_path):
    web = shutil.copytree(webs["torch"], tmp_path / "shifted")
    doc = json.loads((web / "parity.json").read_text())
    doc["reference"]["values"] = [v + 0.01 for v in doc["reference"]["values"]]
    (web / "parity.json").write_text(json.dumps(doc))
    for r in verify_in_browser(web, ("onnx_web:wasm", "litert_web:wasm"), timeout_s=60):
        assert not r["passed"] and r["error"] is None, _summary(r)
        assert r["max_abs"] == pytest.approx(0.01, abs=1e-4), _summary(r)
        assert r["page"]["n_out_of_tolerance"] > 0
        # parity.compare, on the same outputs against the bundle's own reference, still passes them: the
        # page's verdict comes from the shifted reference alone
        assert browser_record(bundles["torch"], r)["status"] == "passed"


def test_onnx_web_and_litert_web_name_a_truncated_model_file(webs, tmp_path):
    web = shutil.copytree(webs["torch"], tmp_path / "truncated")
    sizes = {}
    for path in ("onnx/model.onnx", "litert/model.tflite"):
        data = (web / path).read_bytes()
        sizes[path] = len(data)
        (web / path).write_bytes(data[: len(data) // 2])
    onnx, litert = verify_in_browser(web, ("onnx_web:wasm", "litert_web:wasm"), timeout_s=60)
    for r, path in ((onnx, "onnx/model.onnx"), (litert, "litert/model.tflite")):
        assert not r["passed"] and r["max_abs"] is None and r["rows"] == 0, _summary(r)
        assert path in r["error"] and f"has {sizes[path] // 2} bytes" in r["error"], r["error"]
        assert f"recorded {sizes[path]} (truncated or replaced)" in r["error"], r["error"]
    # with the recorded size made to match, the runtimes themselves refuse the half file, and say so
    doc = json.loads((web / "parity.json").read_text())
    for sec in doc["runtimes"].values():
        sec["size_bytes"] = None
    (web / "parity.json").write_text(json.dumps(doc))
    onnx, litert = verify_in_browser(web, ("onnx_web:wasm", "litert_web:wasm"), timeout_s=60)
    assert not onnx["passed"] and onnx["error"].startswith("onnxruntime-web could not load onnx/model.onnx"), onnx["error"]
    assert not litert["passed"] and litert["error"].startswith("LiteRT.js could not load litert/model.tflite"), litert["error"]


def test_onnx_web_and_litert_web_pass_on_the_digits_models_in_chromium(digits_run, tmp_path):
    """The digits MLPs (10 softmax outputs over 8x8 images; the shared digits run's bundles): the ONNX file
    of the Keras and the PyTorch model in onnxruntime-web, and the PyTorch model's LiteRT file (static
    signatures of 1 and 32 rows) in LiteRT.js, on wasm, each judged as every other cell is (fp32: top-1 kept
    on every row besides the values)."""
    _, _, home = digits_run
    found = latest_bundles(home)
    for model, targets in (("keras", ["onnx_web:wasm"]), ("torch", ["onnx_web:wasm", "litert_web:wasm"])):
        bundle = read_bundle(found[model])
        web = write_web_bundle(bundle, tmp_path / model, webgpu=False)
        for r in verify_in_browser(web, targets, screenshot_dir=SHOTS, timeout_s=90):
            rec = browser_record(bundle, r)
            assert r["passed"] and rec["status"] == "passed", _summary(r)  # fp32: every row's top-1 kept too
            assert rec["runtime"] == RUNTIMES[r["format"], r["backend"]], rec
