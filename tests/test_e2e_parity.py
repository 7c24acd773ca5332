"""End to end: `run toy` exports every format, verifies each artifact in its runtime, reports it,
and a tampered or truncated artifact fails verification by name."""
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from exporters.bundle import read_bundle

from .conftest import ROOT, copy_home, run_cli

pytestmark = pytest.mark.e2e

# every format, and the blessing of the served model (TF Serving's API over gRPC and REST)
FP32_CELLS = {(m, f) for m in ("keras", "torch")
              for f in ("saved_model", "torchscript", "onnx", "litert", "tfjs", "tf_serving")}


def report_dir(home):
    rec = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    return home / rec["report_dir"] if not rec["report_dir"].startswith("/") else __import__("pathlib").Path(rec["report_dir"])


def test_every_format_of_both_models_passes_in_its_runtime(toy_run):
    home, out = toy_run
    parity = json.loads((report_dir(home) / "parity.json").read_text())
    passed = {(r["model"], r["format"]) for r in parity["records"] if r["status"] == "passed" and r["variant"] == "fp32"}
    assert passed == FP32_CELLS
    assert not [r for r in parity["records"] if r["status"] == "failed"]
    variants = {(r["model"], r["variant"]) for r in parity["records"] if r["format"] == "litert" and r["status"] == "passed"}
    assert {("keras", "fp16"), ("keras", "int8"), ("torch", "fp16"), ("torch", "int8")} <= variants
    runtimes = {r["runtime"] for r in parity["records"] if r["status"] == "passed"}
    assert {"tensorflow", "torch-jit", "onnxruntime-cpu", "litert-interpreter", "tfjs-node-cpu", "tfjs-node-wasm"} <= runtimes
    for m in ("keras", "torch"):
        assert parity["discrimination"][m]["discriminative"]
    assert "PASS" in out.stdout


def test_every_passed_artifact_has_a_plausible_profile_in_the_record_and_parity_md(toy_run):
    home, _ = toy_run
    parity = json.loads((report_dir(home) / "parity.json").read_text())
    passed = [r for r in parity["records"] if r["status"] == "passed"]
    assert passed
    for r in passed:
        p = r["details"]["profile"]
        assert p["load_ms"] > 0 and p["repetitions"] == {"batch_1": 20, "max_batch": 10}, r["label"]
        for key in ("batch_1", "max_batch"):
            assert 0 < p[key]["p50_ms"] <= p[key]["p99_ms"] and p[key]["rows_per_s"] > 0, (r["label"], p)
        assert p["max_batch"]["rows"] == 16 and p["threads"]
        if not r["runtime"].startswith("tf-serving"):
            assert p["peak_rss_mb"] > 0 and p["size_bytes"] > 0, (r["label"], p)
    markdown = (report_dir(home) / "parity.md").read_text()
    assert "## Profile" in markdown and markdown.count("| `keras/onnx` | onnxruntime-cpu |") == 1
    assert (report_dir(home) / "profiles.png").stat().st_size > 10_000
    bundles = sorted((home / ".pipeline" / "cache" / "bundle").glob("*/bundle"))
    assert bundles and all(read_bundle(b).profiles() for b in bundles)  # the profile is kept with the bundle
    kept = {cell for b in bundles for cell in read_bundle(b).profiles()}
    assert {f"{r['label']}@{r['runtime']}" for r in passed if r["format"] != "tf_serving"} <= kept


def test_the_report_names_the_files_the_converters_write_anew_on_every_run(toy_run):
    home, _ = toy_run
    markdown = (report_dir(home) / "parity.md").read_text()
    section = markdown.split("## Reproducibility", 1)[1].split("\n## ", 1)[0]
    assert "`keras/saved_model: saved_model/fingerprint.pb`" in section and "random uuid" in section
    assert "onnx" not in section and "tfjs" not in section  # their bytes repeat: not listed


def test_report_html_is_one_file_a_browser_shows_with_its_tables_and_plots(toy_run):
    from playwright.sync_api import sync_playwright
    from edge.web import CHROMIUM, CHROMIUM_ARGS
    home, _ = toy_run
    page_file = report_dir(home) / "report.html"
    shots = ROOT / "test-artifacts"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_file.as_uri())
            assert page.inner_text("#verdict") == "PASS"
            assert page.locator("#records tr").count() == 21  # a header and 20 records
            assert page.locator("#profile tr").count() > 10
            widths = page.eval_on_selector_all("#plots img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) >= 4 and all(w > 100 for w in widths)  # parity and training plots, decoded
            assert requests == [page_file.as_uri()]  # self-contained: nothing else fetched
            page.screenshot(path=str(shots / "report_html.png"), full_page=True)
        finally:
            browser.close()


def test_reports_are_written_and_junit_is_valid(toy_run):
    home, _ = toy_run
    d = report_dir(home)
    suites = ET.parse(d / "junit.xml").getroot()
    cases = suites.findall(".//testcase")
    parity = json.loads((d / "parity.json").read_text())
    assert len(cases) == len(parity["records"])
    assert "| keras | onnx |" in (d / "parity.md").read_text().replace("  ", " ")
    assert (d / "parity_keras.png").stat().st_size > 10_000 and (d / "training_torch.png").is_file()


def bundle_copy(home, model, dest):
    """A copy of the model's bundle as the run wrote it (what `check BUNDLE` and a deploy read)."""
    import shutil
    for meta in (home / ".pipeline" / "cache" / "bundle").glob("*/stage.json"):
        if json.loads(meta.read_text())["name"] == f"bundle:{model}":
            return shutil.copytree(meta.parent / "bundle", dest)
    raise AssertionError(f"no bundle for {model}")


def rewrite_digests(bundle, keep_sizes=False):
    """Make the manifest agree with changed files: only the parity check itself can catch them then."""
    from exporters.bundle import MANIFEST, sha256_file
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"] = {f: sha256_file(bundle / f) for f in manifest["files"]}
    if not keep_sizes:
        for arts in manifest["formats"].values():
            for a in arts:
                a["size_bytes"] = (bundle / a["path"]).stat().st_size
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def test_tampered_onnx_weight_fails_verify_and_names_the_artifact(toy_run, tmp_path):
    import onnx
    from onnx import numpy_helper
    home = copy_home(toy_run[0], tmp_path / "home")
    bundle = bundle_copy(home, "keras", tmp_path / "bundle")
    path = bundle / "onnx" / "model.onnx"
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if numpy_helper.to_array(i).size == 1
                and numpy_helper.to_array(i).dtype == np.float32)
    arr = numpy_helper.to_array(init).copy()
    arr += 0.01
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(path))
    rewrite_digests(bundle)
    r = run_cli("check", str(bundle), "--out", str(tmp_path / "reports"), home=home)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "keras/onnx" in r.stderr and "registered bundle was changed" not in r.stderr
    assert "max abs error" in r.stderr and "expected" in r.stderr and "got" in r.stderr
    parity = json.loads((tmp_path / "reports" / "parity.json").read_text())
    assert [x["label"] for x in parity["records"] if x["status"] == "failed"] == ["keras/onnx"]


def test_truncated_litert_file_is_a_clear_load_failure(toy_run, tmp_path):
    home = copy_home(toy_run[0], tmp_path / "home")
    bundle = bundle_copy(home, "torch", tmp_path / "bundle")
    for path in (bundle / "litert").glob("*.tflite"):
        path.write_bytes(path.read_bytes()[:100])
    rewrite_digests(bundle, keep_sizes=True)
    r = run_cli("check", str(bundle), "--out", str(tmp_path / "reports"), home=home)
    assert r.returncode == 1
    parity = json.loads((tmp_path / "reports" / "parity.json").read_text())
    broken = [x for x in parity["records"] if x["format"] == "litert"]
    assert len(broken) == 3 and all(x["status"] == "failed" and "ArtifactLoadError" in x["error"] and
                                     "truncated" in x["error"] for x in broken)
    assert "Traceback" not in r.stderr


def test_each_worker_imports_only_its_own_framework(toy_run):
    """Read off each process's own sys.modules (dumped after every stage), not a field it reports."""
    home, _ = toy_run
    loaded = {}
    for dump in (home / "modules").glob("*.json"):
        process = dump.name.split("-")[0]
        loaded.setdefault(process, set()).update(json.loads(dump.read_text()))
    assert set(loaded) == {"main", "tensorflow", "torch"}
    heavy = {"tensorflow", "keras", "torch", "jax", "onnx2tf", "tensorflowjs", "litert_torch", "tf_keras"}
    assert not loaded["main"] & heavy, loaded["main"] & heavy
    assert {"tensorflow", "keras"} <= loaded["tensorflow"] and not loaded["tensorflow"] & {"torch", "litert_torch"}
    assert {"torch", "litert_torch"} <= loaded["torch"]
    assert not loaded["torch"] & {"tensorflow", "keras", "tf_keras", "onnx2tf", "tensorflowjs"}
    rec = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[0].read_text())
    lanes = {s["name"]: s["lane"] for s in rec["stages"]}
    assert lanes["export:keras:torchscript"] == "torch" and lanes["export:torch:saved_model"] == "tensorflow"
    assert lanes["data"] is lanes["report"] is None


def test_every_artifact_is_fed_batch_1_the_largest_batch_and_the_rest(toy_run):
    home, _ = toy_run
    parity = json.loads((report_dir(home) / "parity.json").read_text())
    checked = [r for r in parity["records"] if r["status"] != "skipped"]
    assert checked and all(r["details"]["feeds"] == [1, 16, 113] for r in checked)  # 130 rows, max_batch 16
    for m in ("keras", "torch"):
        d = parity["discrimination"][m]
        assert d["discriminative"] and d["perturbation_caught"] is True and d["perturbation_max_abs"] > 1e-4


CONSTANT_SPEC = """
[pipeline]
name = "flat"
[data]
source = "linear"
task = "regression"
[train]
optimizer = "sgd"
lr = 0.1
epochs = 20
loss = "mse"
[[model]]
name = "flat"
framework = "torch"
factory = "flat_models:constant"
[export]
formats = ["onnx"]
"""

FLAT_MODELS = """
import torch
import torch.nn as nn

class Constant(nn.Module):
    '''Ignores its input: every row gets the same output, so every artifact of it "passes".'''
    def __init__(self, n_outputs):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(n_outputs))

    def forward(self, x):
        return self.b.expand(x.shape[0], -1) + 0.0 * x[:, :1]

def constant(input_shape, n_outputs, **_):
    return Constant(n_outputs)
"""


def test_a_parity_set_that_cannot_discriminate_is_inconclusive_and_fails_the_gate(tmp_path):
    import xml.etree.ElementTree as ET
    (tmp_path / "flat_models.py").write_text(FLAT_MODELS)
    spec = tmp_path / "flat.toml"
    spec.write_text(CONSTANT_SPEC)
    r = run_cli("check", str(spec), "--out", str(tmp_path / "reports"), "--no-track", home=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "flat: NOT discriminative" in r.stdout and "INCONCLUSIVE" in r.stdout
    assert "parity inconclusive" in r.stderr
    parity = json.loads((tmp_path / "reports" / "parity.json").read_text())
    assert parity["passed"] and parity["verdict"] == "inconclusive"  # every cell passed, and that proves little
    assert "INCONCLUSIVE" in (tmp_path / "reports" / "parity.md").read_text()
    props = {p.get("name"): p.get("value") for p in ET.parse(tmp_path / "reports" / "junit.xml").getroot().iter("property")}
    assert props["discriminative"] == "false" and props["verdict"] == "inconclusive"


def test_tampered_litert_torchscript_and_saved_model_artifacts_fail_the_gate(toy_run, tmp_path):
    """One weight changed in each format's own file (and the manifest made to agree): only the parity
    check can catch it, and it names each artifact."""
    import onnx
    import torch
    from onnx import numpy_helper
    home = copy_home(toy_run[0], tmp_path / "home")
    bundle = bundle_copy(home, "torch", tmp_path / "bundle")
    weight = next(numpy_helper.to_array(i) for i in onnx.load(str(bundle / "onnx" / "model.onnx")).graph.initializer
                  if numpy_helper.to_array(i).ndim == 2).astype(np.float32)
    for path in (bundle / "saved_model" / "saved_model" / "saved_model.pb", bundle / "litert" / "model.tflite"):
        data = path.read_bytes()
        at = data.find(weight.tobytes())
        assert at >= 0, f"the weight's float32 bytes are not in {path.name}"
        path.write_bytes(data[:at] + np.float32(weight.flat[0] + 1.0).tobytes() + data[at + 4:])
    ts = torch.jit.load(str(bundle / "torchscript" / "model.pt"))
    with torch.no_grad():
        next(p for p in ts.parameters() if p.ndim == 2).add_(1.0)
    torch.jit.save(ts, str(bundle / "torchscript" / "model.pt"))
    rewrite_digests(bundle)
    r = run_cli("check", str(bundle), "--out", str(tmp_path / "reports"), home=home)
    assert r.returncode == 1, r.stdout + r.stderr
    parity = json.loads((tmp_path / "reports" / "parity.json").read_text())
    failed = {x["label"] for x in parity["records"] if x["status"] == "failed"}
    assert failed == {"torch/saved_model", "torch/torchscript", "torch/litert"}
    assert all("max abs error" in x["message"] for x in parity["records"] if x["status"] == "failed")
