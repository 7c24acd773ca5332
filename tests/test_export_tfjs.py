"""TF.js graph models converted from Keras SavedModels, run in the shared Node process on the cpu and wasm backends."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from exporters import tfjs
from exporters.base import Artifact, ArtifactLoadError, ExportError
from parity.signature import InputMismatch

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (tfjs.NODE_MODULES / "@tensorflow" / "tfjs").is_dir(),
    reason=f"needs node and exporters/js/node_modules ({tfjs.INSTALL_HINT})")

ATOL = 1e-4


def _keras_model(kind: str, seed: int):
    import keras
    keras.utils.set_random_seed(seed)
    if kind == "toy":
        m = keras.Sequential([keras.Input((1,), name="x"), keras.layers.Dense(1)])
    else:
        m = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(),
                              keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    rng = np.random.default_rng(seed)
    # non-zero biases, so the converted graph keeps its bias adds and outputs are not centred on 0
    m.set_weights([w if w.ndim > 1 else rng.normal(0, 0.5, w.shape).astype("float32") for w in m.get_weights()])
    return m


def _inputs(kind: str, n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "toy":
        return rng.normal(0, 2, (n, 1)).astype("float32")
    return rng.random((n, 8, 8), dtype=np.float32)


def _saved_model(model, name: str, out: Path, **extra) -> Artifact:
    path = out / f"{name}.saved_model"
    model.export(str(path), format="tf_saved_model", verbose=False)
    return Artifact(model=name, format="saved_model", variant="fp32", path=str(path), framework="keras",
                    route="keras.Model.export(format='tf_saved_model')", **extra)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """keras model, its tfjs artifact and reference outputs for toy and digits."""
    out = tmp_path_factory.mktemp("tfjs")
    res = {}
    for seed, kind in enumerate(("toy", "digits")):
        model = _keras_model(kind, seed)
        sm = _saved_model(model, kind, out)
        [art] = tfjs.export(model, framework="keras", name=kind, example=_inputs(kind, 4), out_dir=out / kind / "export",
                            upstream={"saved_model": [sm]}, options={})
        res[kind] = (model, art)
    return res


def _reference(model, x):
    return np.asarray(model(x))


@pytest.mark.parametrize("runtime", tfjs.RUNTIMES)
@pytest.mark.parametrize("kind", ["toy", "digits"])
def test_parity_with_keras(built, kind, runtime):
    model, art = built[kind]
    runner = tfjs.load(art, runtime)
    try:
        assert runner.runtime == runtime
        for n in (1, 16):
            x = _inputs(kind, n, seed=10 + n)
            ref = _reference(model, x)
            y = runner(x)
            assert y.shape == ref.shape and y.dtype == np.float32
            err = float(np.max(np.abs(y - ref)))
            print(f"{kind} keras {runtime} batch {n}: max abs {err:.2e}")
            assert err <= ATOL, f"{art.label} on {runtime}, batch {n}: max abs {err:.3g} > {ATOL}"
        # the check is meaningful only if outputs move with the inputs
        assert float(np.std(_reference(model, _inputs(kind, 16)), axis=0).max()) > 1e-2
    finally:
        runner.close()


def test_export_records_names_versions_and_layout(built, tmp_path):
    model, art = built["digits"]
    assert art.format == "tfjs" and art.variant == "fp32" and art.batch_sizes is None
    assert (Path(art.path) / "model.json").is_file() and art.size_bytes > 64 * 128 * 4
    d = art.details
    assert d["converter"] == "tensorflowjs 4.22.0"
    assert d["runtime_packages"] == {"@tensorflow/tfjs": "4.22.0", "@tensorflow/tfjs-backend-wasm": "4.22.0"}
    assert d["inputs"]["as-trained input"]["shape"] == [-1, 8, 8]
    assert d["outputs"]["output"]["shape"] == [-1, 10]
    assert "tensorflow_decision_forests" not in __import__("sys").modules  # the placeholder was removed

    # a SavedModel that takes its input transposed: the TF.js runner feeds the same layout as its runner would
    sm = _saved_model(model, "digits_t", tmp_path, input_layout="(8, 8) transposed",
                      details={"input_transpose": [0, 2, 1]})
    [t_art] = tfjs.export(model, framework="keras", name="digits_t", example=_inputs("digits", 2), out_dir=tmp_path,
                          upstream={"saved_model": [sm]}, options={})
    assert t_art.input_layout == "(8, 8) transposed" and t_art.details["input_transpose"] == [0, 2, 1]
    x = _inputs("digits", 5)
    with tfjs.load(t_art, "tfjs-node-wasm") as r:
        y = r(x)
    assert np.max(np.abs(y - _reference(model, x.transpose(0, 2, 1)))) <= ATOL


def test_export_refuses_missing_upstream_and_unknown_options(built, tmp_path):
    model, _ = built["toy"]
    with pytest.raises(ExportError, match="expected an upstream saved_model"):
        tfjs.export(model, framework="keras", name="toy", example=None, out_dir=tmp_path, upstream={}, options={})
    bogus = Artifact(model="toy", format="saved_model", variant="fp32", path=str(tmp_path / "nope"),
                     framework="keras", route="-")
    with pytest.raises(ExportError, match="saved_model.pb"):
        tfjs.export(model, framework="keras", name="toy", example=None, out_dir=tmp_path,
                    upstream={"saved_model": [bogus]}, options={})
    with pytest.raises(ExportError, match="unknown option"):
        tfjs.export(model, framework="keras", name="toy", example=None, out_dir=tmp_path,
                    upstream={"saved_model": [bogus]}, options={"quantize": "uint8"})


def test_one_node_process_serves_all_runners(built):
    before = tfjs.node_process_info()["starts"]
    runners = [tfjs.load(built[k][1], rt) for k in ("toy", "digits") for rt in tfjs.RUNTIMES]
    try:
        for r in runners:
            r(_inputs(r.artifact.model, 3))
        pids = {r.info["pid"] for r in runners}
        info = tfjs.node_process_info()
        assert pids == {info["pid"]} and info["alive"]
        assert info["starts"] - before <= 1   # at most one start (none if an earlier test started it)
        # what TF.js itself reports (tf.getBackend() at load and after each prediction), not the request echoed
        assert {r.info["backend"] for r in runners} == {"cpu", "wasm"}
        assert all(r.ran_on == r.backend == {"tfjs-node-cpu": "cpu", "tfjs-node-wasm": "wasm"}[r.runtime]
                   for r in runners)
    finally:
        for r in runners:
            r.close()
    assert tfjs.node_process_info()["alive"]   # closing runners keeps the warm process


def test_a_prediction_on_another_backend_than_asked_is_an_error(built, monkeypatch):
    with tfjs.load(built["toy"][1], "tfjs-node-wasm") as runner:
        node = runner._node
        real = node.request

        def falls_back_to_cpu(msg, timeout, what):  # the name still says wasm; the backend's facts say cpu
            res = real(msg, timeout, what)
            cpu = {"kind": "cpu", "registered": "wasm", "class": "MathBackendCPU", "threads": None, "simd": None}
            return {**res, "backend_facts": cpu} if msg.get("cmd") == "predict" else res
        monkeypatch.setattr(node, "request", falls_back_to_cpu)
        with pytest.raises(tfjs.TfjsRunError, match="asked for the wasm backend, but TF.js ran the model on 'cpu' "
                                                     r"\(backend class MathBackendCPU, registered as 'wasm'\)"):
            runner(_inputs("toy", 2))


def test_wasm_asked_but_served_by_cpu_fails_the_cell_instead_of_passing_as_wasm(built, monkeypatch):
    """The silent fallback, injected into runner.js (T2E_TFJS_FAULT): TF.js' CPU backend registered under the
    name 'wasm', so tf.getBackend() says 'wasm' while the CPU computes (and computes the right numbers). The
    wasm cell must fail naming what was asked and what ran; only the backend's own facts can tell."""
    from exporters.verify import check_artifact
    from parity.compare import tolerance_for
    model, art = built["toy"]
    x = _inputs("toy", 8, seed=3)
    reference = {"x": x, "y": _reference(model, x), "kind": np.zeros(len(x), np.int8)}
    tol = tolerance_for("fp32", "tfjs", {})

    def cell(runtime):
        rec, _, _ = check_artifact(tfjs, art, runtime, reference, tol, task="regression", max_batch=4)
        return rec

    honest = cell("tfjs-node-wasm")   # the record says what ran, from the backend itself
    assert honest.passed, honest.message
    facts = honest.details["backend"]
    assert facts["kind"] == facts["registered"] == "wasm" and facts["class"] == "BackendWasm", facts
    assert isinstance(facts["threads"], int) and facts["threads"] >= 1, facts

    tfjs.shutdown_node()   # the fault is read when runner.js starts
    monkeypatch.setenv(tfjs.FAULT_ENV, "wasm-served-by-cpu")
    try:
        faulty = cell("tfjs-node-wasm")
        assert faulty.status == "failed" and not faulty.passed, faulty.to_json()
        assert "asked for the wasm backend" in faulty.message and "'cpu'" in faulty.message, faulty.message
        assert "backend class MathBackendCPU, registered as 'wasm'" in faulty.message, faulty.message
        assert (faulty.details.get("backend") or {}).get("kind") != "wasm", faulty.to_json()
        cpu = cell("tfjs-node-cpu")   # the cpu cell in the same process is untouched by the fault
        assert cpu.passed and cpu.details["backend"]["kind"] == "cpu", cpu.to_json()
    finally:
        tfjs.shutdown_node()   # later tests start a process without the fault


def _copy(art: Artifact, dest: Path) -> Artifact:
    shutil.copytree(art.path, dest)
    return Artifact(**{**art.__dict__, "path": str(dest)})


def _weight_offset(model_dir: Path, shape: list[int]) -> int:
    """Byte offset in the (single) shard of the first float32 weight with this shape."""
    manifest = json.loads((model_dir / "model.json").read_text())["weightsManifest"]
    assert len(manifest) == 1 and manifest[0]["paths"] == ["group1-shard1of1.bin"]
    off = 0
    for w in manifest[0]["weights"]:
        if w["shape"] == shape and w["dtype"] == "float32":
            return off
        off += int(np.prod(w["shape"], dtype=np.int64)) * 4
    raise AssertionError(f"no float32 weight of shape {shape} in {model_dir}")


@pytest.mark.parametrize("kind,shape", [("toy", [1, 1]), ("digits", [128, 10])])
def test_tampered_weight_changes_outputs(built, tmp_path, kind, shape):
    model, art = built[kind]
    bad = _copy(art, tmp_path / "tampered")
    shard = Path(bad.path) / "group1-shard1of1.bin"
    off = _weight_offset(Path(bad.path), shape)
    raw = bytearray(shard.read_bytes())
    if kind == "digits":   # output-layer weight from the hidden unit most active on these inputs, to class 0
        w1, b1 = model.layers[1].get_weights()
        hidden = np.maximum(_inputs(kind, 16).reshape(16, 64) @ w1 + b1, 0)
        off += int(hidden.mean(0).argmax()) * 10 * 4
    (w,) = np.frombuffer(bytes(raw[off:off + 4]), "<f4")
    raw[off:off + 4] = np.float32(w + 3.0).astype("<f4").tobytes()
    shard.write_bytes(bytes(raw))
    x = _inputs(kind, 16)
    for runtime in tfjs.RUNTIMES:
        with tfjs.load(art, runtime) as good, tfjs.load(bad, runtime) as tampered:
            diff = float(np.max(np.abs(tampered(x) - good(x))))
            assert np.max(np.abs(good(x) - _reference(model, x))) <= ATOL
        print(f"{kind} tampered weight on {runtime}: max abs diff {diff:.3g}")
        assert diff > 1e-3


def test_corrupt_artifacts_raise_artifact_load_error(built, tmp_path):
    _, art = built["digits"]
    corrupt = _copy(art, tmp_path / "corrupt_json")
    mj = Path(corrupt.path) / "model.json"
    mj.write_text(mj.read_text()[: len(mj.read_text()) // 2])   # truncated JSON
    with pytest.raises(ArtifactLoadError, match="not valid JSON"):
        tfjs.load(corrupt, "tfjs-node-cpu")

    short = _copy(art, tmp_path / "short_shard")
    shard = Path(short.path) / "group1-shard1of1.bin"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ArtifactLoadError, match="manifest expects"):
        tfjs.load(short, "tfjs-node-wasm")

    gone = _copy(art, tmp_path / "no_shard")
    (Path(gone.path) / "group1-shard1of1.bin").unlink()
    with pytest.raises(ArtifactLoadError, match="does not exist"):
        tfjs.load(gone, "tfjs-node-cpu")

    with pytest.raises(ArtifactLoadError, match="does not exist"):
        tfjs.load(Artifact(**{**art.__dict__, "path": str(tmp_path / "missing")}), "tfjs-node-cpu")

    # the shared process survives bad artifacts and still answers
    with tfjs.load(art, "tfjs-node-cpu") as r:
        assert r(_inputs("digits", 2)).shape == (2, 10)


def test_wrong_input_shape_names_the_expectation(built):
    _, art = built["digits"]
    with tfjs.load(art, "tfjs-node-cpu") as r:  # refused by the signature, before Node sees it
        with pytest.raises(InputMismatch, match=r"expected rank 3 \(.*float32\[N, 8, 8\]\), found shape \[2, 64\]"):
            r(np.zeros((2, 64), np.float32))


def test_missing_node_or_node_modules_says_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setattr(tfjs, "NODE_MODULES", tmp_path / "node_modules")
    with pytest.raises(ArtifactLoadError, match="npm ci --prefix exporters/js"):
        tfjs.NodeProcess()
    monkeypatch.setattr(tfjs.shutil, "which", lambda name: None)
    with pytest.raises(ArtifactLoadError, match="`node` executable is not on PATH"):
        tfjs.NodeProcess()


def test_hung_node_times_out_instead_of_hanging():
    node = tfjs.NodeProcess()   # a private process, not the shared one
    try:
        os.kill(node.pid, signal.SIGSTOP)
        with pytest.raises(TimeoutError, match="gave no answer"):
            node.request({"cmd": "hello"}, timeout=0.5, what="hello")
        assert not node.alive   # killed, so the next use starts a fresh one
    finally:
        node.kill()
        node.close()


def test_runner_that_cannot_load_tfjs_reports_it(monkeypatch, tmp_path):
    # runner.js resolves @tensorflow/* next to itself: a copy elsewhere finds none and says what to run
    shutil.copy(tfjs.RUNNER_JS, tmp_path / "runner.js")
    monkeypatch.setattr(tfjs, "RUNNER_JS", tmp_path / "runner.js")
    with pytest.raises(ArtifactLoadError, match="failed to start: cannot load @tensorflow/tfjs.*npm ci --prefix"):
        tfjs.NodeProcess()
