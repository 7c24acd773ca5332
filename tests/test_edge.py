"""The edge target: Ed25519 keys, signed LiteRT packages (build, safe verify), and the device agent as a
real subprocess on 127.0.0.1 (push, on-device parity, predict, rollback, every rejection, kill -9 during
activation, no framework imported).

The package tests run on a small synthetic bundle (no framework, fast); the agent tests on the toy run's
real LiteRT bundle (the session's `toy_run`)."""
from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edge.client import EdgeClient, EdgeError
from edge.keys import KeyFileError, init_keys, load_private, load_public
from edge.package import PackageError, build_package, read_installed, verify_package
from exporters.base import Artifact
from exporters.bundle import read_bundle, sha256_file, write_bundle

from .conftest import ROOT

TOKEN = "edge-test-token-" + uuid.uuid4().hex[:8]
FORBIDDEN_IN_AGENT = ("tensorflow", "torch", "mlflow")


# --------------------------------------------------------------------------------------------- helpers

def repack(src: Path, dst: Path, transform) -> Path:
    """Copy a package's members (TarInfo, bytes) through `transform(list) -> list` into a new .tar.gz,
    keeping manifest.json and manifest.sig as they were (not re-signed)."""
    members = []
    with tarfile.open(src, "r:gz") as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read() if m.isreg() else None
            members.append((m, data))
    with tarfile.open(dst, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for m, data in transform(members):
            if data is not None:
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            else:
                tar.addfile(m)
    return dst


def extra_member(name: str, *, data: bytes | None = b"evil\n", kind=tarfile.REGTYPE, linkname: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info, (data if kind == tarfile.REGTYPE else None)


def tamper(members, name: str):
    out = []
    for m, data in members:
        if m.name == name:
            data = bytearray(data)
            data[len(data) // 2] ^= 0xFF
            data = bytes(data)
        out.append((m, data))
    return out


def work_in_progress(root: Path) -> list[str]:
    """What an agent has in its upload and staging folders."""
    return sorted(p.name for d in ("incoming", "staging") for p in (root / d).iterdir())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".unpack-" in p.name)


# --------------------------------------------------------------------------------------------- keys

def test_init_keys_writes_a_private_key_only_its_owner_reads_and_refuses_to_overwrite(tmp_path):
    priv, pub = init_keys(tmp_path / "keys")
    assert oct(priv.stat().st_mode & 0o777) == "0o600"
    assert b"PRIVATE KEY" in priv.read_bytes() and b"PUBLIC KEY" in pub.read_bytes()
    key = load_private(priv)
    signature = key.sign(b"hello")
    load_public(pub).verify(signature, b"hello")
    before = priv.read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        init_keys(tmp_path / "keys")
    assert priv.read_bytes() == before
    with pytest.raises(KeyFileError, match="public key"):
        load_public(priv)
    with pytest.raises(KeyFileError, match="could not read"):
        load_private(tmp_path / "nope.pem")


# ------------------------------------------------------------------------------ packages (synthetic)

@pytest.fixture(scope="module")
def fake_bundle(tmp_path_factory):
    """A bundle with three fake .tflite files (the package code never runs them) and a real reference."""
    tmp = tmp_path_factory.mktemp("fake_bundle")
    src = tmp / "src"
    src.mkdir()
    arts = []
    for variant, fname in (("fp32", "model.tflite"), ("fp16", "model_fp16.tflite"), ("int8", "model_int8.tflite")):
        p = src / fname
        p.write_bytes(os.urandom(3000))
        arts.append(Artifact(model="m", format="litert", variant=variant, path=str(p), framework="torch",
                             route="fake", batch_sizes=[1], size_bytes=3000))
    x = np.arange(8, dtype=np.float32).reshape(8, 1)
    np.savez(src / "reference.npz", x=x, y=3 * x + 2, kind=np.zeros(8, np.int8))
    sig = {"inputs": [{"name": "input", "dtype": "float32", "shape": [None, 1], "layout": None}],
           "outputs": [{"name": "output", "dtype": "float32", "shape": [None, 1], "layout": None}]}
    verdicts = {f"m/litert{'' if a.variant == 'fp32' else '-' + a.variant}@litert-interpreter": "passed" for a in arts}
    write_bundle(tmp / "bundle", model="m", framework="torch", task="regression", signature=sig,
                 reference=src / "reference.npz", artifacts={"litert": arts}, verdicts=verdicts, tolerances={},
                 max_batch=4, source={"spec": "fake"})
    keys = init_keys(tmp / "keys")
    other = init_keys(tmp / "other")
    good = build_package(read_bundle(tmp / "bundle"), tmp / "good.tar.gz", keys[0], version=1)
    return {"tmp": tmp, "bundle": tmp / "bundle", "keys": keys, "other": other, "good": good}


def test_a_package_holds_a_signed_manifest_the_artifacts_and_the_reference(fake_bundle, tmp_path):
    with tarfile.open(fake_bundle["good"], "r:gz") as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isreg())
        manifest = json.loads(tar.extractfile("manifest.json").read())
    assert names == ["litert/model.tflite", "litert/model_fp16.tflite", "litert/model_int8.tflite",
                     "manifest.json", "manifest.sig", "reference.npz"]
    assert manifest["kind"] == "edge-package" and manifest["model"] == "m" and manifest["version"] == 1
    assert manifest["task"] == "regression" and manifest["max_batch"] == 4 and manifest["tolerances"] == {}
    assert manifest["signature"]["inputs"][0]["name"] == "input"
    assert [a["variant"] for a in manifest["artifacts"]] == ["fp32", "fp16", "int8"]
    assert all(a["path"].startswith("litert/") for a in manifest["artifacts"])
    assert set(manifest["files"]) == {"litert/model.tflite", "litert/model_fp16.tflite", "litert/model_int8.tflite",
                                      "reference.npz"}
    assert manifest["files"]["reference.npz"]["sha256"] == sha256_file(fake_bundle["bundle"] / "reference.npz")
    assert manifest["source"]["spec"] == "fake" and manifest["source"]["bundle_manifest_sha256"]

    pkg = verify_package(fake_bundle["good"], fake_bundle["keys"][1], tmp_path / "out")
    assert pkg.version == 1 and [a.variant for a in pkg.artifacts()] == ["fp32", "fp16", "int8"]
    assert Path(pkg.artifacts()[0].path).read_bytes() == (fake_bundle["bundle"] / "litert/model.tflite").read_bytes()
    np.testing.assert_array_equal(pkg.reference()["y"], 3 * np.arange(8, dtype=np.float32).reshape(8, 1) + 2)
    assert read_installed(tmp_path / "out", fake_bundle["keys"][1]).manifest == pkg.manifest
    assert leftovers(tmp_path) == []

    one = build_package(fake_bundle["bundle"], tmp_path / "fp32.tar.gz", fake_bundle["keys"][0],
                        variants=("fp32",), version=2)
    assert [a.variant for a in verify_package(one, fake_bundle["keys"][1], tmp_path / "one").artifacts()] == ["fp32"]


def _sign_differently(fake_bundle, tmp):
    return build_package(fake_bundle["bundle"], tmp / "other.tar.gz", fake_bundle["other"][0], version=1)


CASES = {
    "signed with another key": (
        lambda fb, tmp: _sign_differently(fb, tmp), "signature", "manifest.json"),
    "a .tflite changed after signing": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz", lambda ms: tamper(ms, "litert/model_int8.tflite")),
        "sha256", "litert/model_int8.tflite"),
    "manifest changed after signing": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz", lambda ms: [
            (m, d.replace(b'"version": 1', b'"version": 9') if m.name == "manifest.json" else d) for m, d in ms]),
        "signature", "manifest.json"),
    "a member escaping with ..": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz", lambda ms: ms + [extra_member("../evil")]),
        "'..' escapes", "../evil"),
    "an absolute member": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz", lambda ms: ms + [extra_member("/tmp/evil")]),
        "absolute path", "/tmp/evil"),
    "a symlink member": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz", lambda ms: ms + [
            extra_member("litert/link.tflite", kind=tarfile.SYMTYPE, linkname="/etc/passwd")]),
        "symbolic link", "litert/link.tflite"),
    "a hard link member": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz", lambda ms: ms + [
            extra_member("litert/hard.tflite", kind=tarfile.LNKTYPE, linkname="reference.npz")]),
        "hard link", "litert/hard.tflite"),
    "a device member": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz", lambda ms: ms + [
            extra_member("litert/dev", kind=tarfile.CHRTYPE)]), "device file", "litert/dev"),
    "a FIFO member": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz", lambda ms: ms + [
            extra_member("litert/fifo", kind=tarfile.FIFOTYPE)]), "FIFO", "litert/fifo"),
    "an unlisted file": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz", lambda ms: ms + [extra_member("litert/extra.bin")]),
        "not listed in the signed manifest", "litert/extra.bin"),
    "a listed file missing": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz",
                               lambda ms: [(m, d) for m, d in ms if m.name != "litert/model_fp16.tflite"]),
        "missing from the package", "litert/model_fp16.tflite"),
    "a member twice": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz", lambda ms: ms + [
            (m, d) for m, d in ms if m.name == "reference.npz"]), "appears twice", "reference.npz"),
    "no signature file": (
        lambda fb, tmp: repack(fb["good"], tmp / "p.tar.gz", lambda ms: [(m, d) for m, d in ms
                                                                          if m.name != "manifest.sig"]),
        "missing from the package", "manifest.sig"),
    "not a tar.gz": (
        lambda fb, tmp: (tmp / "p.tar.gz").write_bytes(b"not a package") and tmp / "p.tar.gz",
        "gzip-compressed tar", None),
    "a cut-off archive": (
        lambda fb, tmp: (tmp / "p.tar.gz").write_bytes(fb["good"].read_bytes()[: fb["good"].stat().st_size // 2])
        and tmp / "p.tar.gz", "corrupt or truncated", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_refuses_and_leaves_nothing_behind(case, fake_bundle, tmp_path):
    make, words, member = CASES[case]
    bad = make(fake_bundle, tmp_path)
    dest = tmp_path / "unpacked" / "pkg"
    with pytest.raises(PackageError) as e:
        verify_package(bad, fake_bundle["keys"][1], dest)
    assert words in str(e.value)
    if member is not None:
        assert e.value.member == member and member in str(e.value)
    assert not dest.exists() and leftovers(dest.parent) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "unpacked" / "evil").exists()


def test_verify_enforces_size_limits_by_the_bytes_written(fake_bundle, tmp_path):
    with pytest.raises(PackageError, match="over the limit of 1000 per file") as e:
        verify_package(fake_bundle["good"], fake_bundle["keys"][1], tmp_path / "a", max_file_bytes=1000)
    assert e.value.reason == "size"
    with pytest.raises(PackageError, match="more than 5000 bytes"):
        verify_package(fake_bundle["good"], fake_bundle["keys"][1], tmp_path / "b", max_bytes=5000)
    with pytest.raises(PackageError, match="more than 3 members"):
        verify_package(fake_bundle["good"], fake_bundle["keys"][1], tmp_path / "c", max_members=3)
    (tmp_path / "d").mkdir()
    with pytest.raises(PackageError, match="exists already"):
        verify_package(fake_bundle["good"], fake_bundle["keys"][1], tmp_path / "d")
    assert leftovers(tmp_path) == []


def test_build_refuses_a_bundle_it_cannot_vouch_for(fake_bundle, tmp_path):
    copy = shutil.copytree(fake_bundle["bundle"], tmp_path / "bundle")
    with pytest.raises(PackageError, match="expected some of fp32, fp16, int8, found"):
        build_package(copy, tmp_path / "x.tar.gz", fake_bundle["keys"][0], variants=("fp32", "bf16x"), version=1)
    manifest = json.loads((copy / "manifest.json").read_text())
    few = {**manifest, "formats": {"litert": manifest["formats"]["litert"][:1]}}
    (copy / "manifest.json").write_text(json.dumps(few))
    with pytest.raises(PackageError, match="no litert artifact for variant\\(s\\) fp16, int8"):
        build_package(copy, tmp_path / "x.tar.gz", fake_bundle["keys"][0], version=1)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="positive integer"):
        build_package(copy, tmp_path / "x.tar.gz", fake_bundle["keys"][0], version=0)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["verdicts"]["m/litert-int8@litert-interpreter"] = "failed"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="verdict .* is 'failed'"):
        build_package(copy, tmp_path / "x.tar.gz", fake_bundle["keys"][0], version=1)
    assert build_package(copy, tmp_path / "x.tar.gz", fake_bundle["keys"][0], variants=("fp32",), version=1).is_file()
    (copy / "litert" / "model.tflite").write_bytes(b"changed")
    with pytest.raises(PackageError, match="differs from the bundle manifest"):
        build_package(copy, tmp_path / "y.tar.gz", fake_bundle["keys"][0], variants=("fp32",), version=1)
    assert not (tmp_path / "y.tar.gz").exists()


# ------------------------------------------------------------------------------------ the agent (real)

class AgentProcess:
    """`python -m edge.agent` on 127.0.0.1, any free port (port 0, read back from --ready-file)."""

    def __init__(self, root: Path, public_key: Path, work: Path, *, env: dict | None = None):
        self.work = work
        tag = uuid.uuid4().hex[:6]
        self.ready = work / f"ready-{tag}.json"
        self.log_path = work / f"agent-{tag}.log"
        self._log = open(self.log_path, "w")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        full_env.update({"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge.agent", "--root", str(root), "--public-key", str(public_key),
             "--token", TOKEN, "--host", "127.0.0.1", "--port", "0", "--ready-file", str(self.ready),
             "--debug-modules"], cwd=work, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the agent did not start: {self.log()}")
            time.sleep(0.05)
        self.url = json.loads(self.ready.read_text())["url"]
        self.port = json.loads(self.ready.read_text())["port"]
        self.client = EdgeClient(self.url, TOKEN, timeout=120)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} never appeared in the agent's log: {self.log()}"
            assert self.proc.poll() is None, f"the agent exited: {self.log()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


def _toy_bundle(home: Path, model: str = "torch") -> Path:
    run = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    stage = next(s for s in run["stages"] if s["name"] == f"bundle:{model}")
    return Path(stage["path"]) / "bundle"


@pytest.fixture(scope="module")
def edge(toy_run, tmp_path_factory):
    home, _ = toy_run
    tmp = tmp_path_factory.mktemp("edge")
    bundle = read_bundle(_toy_bundle(home))
    keys, other = init_keys(tmp / "keys"), init_keys(tmp / "other")
    reference = bundle.reference()
    versions = itertools.count(1)

    def package(*, key=None, version=None, bundle_=None) -> tuple[Path, int]:
        v = next(versions) if version is None else version
        out = tmp / f"pkg-{uuid.uuid4().hex[:6]}-v{v}.tar.gz"
        return build_package(bundle_ or bundle, out, key or keys[0], version=v), v

    return {"tmp": tmp, "bundle": bundle, "keys": keys, "other": other, "reference": reference,
            "package": package, "versions": versions}


@pytest.fixture(scope="module")
def agent(edge):
    root = edge["tmp"] / "device"
    proc = AgentProcess(root, edge["keys"][1], edge["tmp"])
    proc.root = root
    yield proc
    proc.stop()


def ensure_active(agent, edge) -> dict:
    status = agent.client.status()
    if status["active"] is None:
        pkg, _ = edge["package"]()
        agent.client.push(pkg)
        status = agent.client.status()
    return status


def assert_serves_reference(client: EdgeClient, reference, rows: int = 5, variant: str | None = None, atol=1e-5):
    x, y = reference["x"], reference["y"]
    got = client.predict({"input": x[:rows]}, variant=variant)["output"]
    np.testing.assert_allclose(got, y[:rows], atol=atol, rtol=0)


@pytest.mark.e2e
def test_push_status_predict_then_v2_and_rollback(agent, edge):
    pkg1, v1 = edge["package"]()
    report = agent.client.push(pkg1)
    assert report["passed"] is True and report["version"] == v1 and report["model"] == "torch"
    assert set(report["variants"]) == {"fp32", "fp16", "int8"}
    for variant, r in report["variants"].items():
        assert r["passed"] and r["status"] == "passed" and r["n_rows"] == len(edge["reference"]["y"])
        assert r["max_abs"] is not None and r["max_abs"] <= r["tolerance"]["atol"]
        assert r["size_bytes"] > 0 and r["record"]["runtime"] == "litert-interpreter"
        lat = r["latency"]
        assert lat["batch"] == 1 and lat["calls"] == 50 and 0 < lat["p50_ms"] <= lat["p99_ms"]
        print(f"on-device {variant}: max abs {r['max_abs']:.2e}, p50 {lat['p50_ms']:.4f} ms, "
              f"p99 {lat['p99_ms']:.4f} ms, {r['size_bytes']} bytes")
    assert report["package_bytes"] == pkg1.stat().st_size and report["bundle_bytes"] > 0

    status = agent.client.status()
    assert status["version"] == v1 and status["active"]["variants"] == ["fp16", "fp32", "int8"]
    assert status["previous"] is None and status["report"]["passed"] and status["latency"]["fp32"]["calls"] == 50
    assert status["last_push"]["status"] == 201

    assert_serves_reference(agent.client, edge["reference"])
    assert_serves_reference(agent.client, edge["reference"], variant="int8", atol=0.1)
    rows = agent.client.predict_raw({"instances": edge["reference"]["x"][:3].tolist()})
    assert rows["version"] == v1 and rows["variant"] == "fp32"
    np.testing.assert_allclose(rows["outputs"]["output"], edge["reference"]["y"][:3], atol=1e-5)
    with pytest.raises(EdgeError) as e:
        agent.client.predict({"input": [[1.0, 2.0]]})
    assert e.value.status == 400 and "dimension 1" in e.value.message
    with pytest.raises(EdgeError) as e:
        agent.client.predict({"input": [[1.0]]}, variant="bf16")
    assert e.value.status == 404

    pkg2, v2 = edge["package"]()
    assert agent.client.push(pkg2)["version"] == v2
    status = agent.client.status()
    assert status["version"] == v2 and status["previous"]["version"] == v1
    with pytest.raises(EdgeError) as e:
        agent.client.push(pkg2)
    assert e.value.status == 409 and "already the active version" in e.value.message
    back = agent.client.rollback()
    assert back["version"] == v1 and back["rolled_back_from"].endswith(f"-v{v2}")
    status = agent.client.status()
    assert status["version"] == v1 and status["previous"] is None
    assert_serves_reference(agent.client, edge["reference"])
    with pytest.raises(EdgeError) as e:
        agent.client.rollback()
    assert e.value.status == 409 and "no previous version" in e.value.message
    assert json.loads((agent.root / "active.json").read_text())["active"] == f"torch-v{v1}"
    assert sorted(p.name for p in (agent.root / "versions").iterdir()) == [f"torch-v{v1}"]


def _parity_failing_package(edge) -> Path:
    """Reference outputs shifted by 1.0, the bundle's digests updated, signed properly."""
    copy = shutil.copytree(edge["bundle"].root, edge["tmp"] / f"shifted-{uuid.uuid4().hex[:6]}")
    with np.load(copy / "reference.npz") as f:
        ref = {k: f[k] for k in f.files}
    ref["y"] = ref["y"] + 1.0
    (copy / "reference.npz").unlink()
    np.savez(copy / "reference.npz", **ref)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["reference.npz"] = sha256_file(copy / "reference.npz")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    pkg, _ = edge["package"](bundle_=read_bundle(copy))
    return pkg


def break_variant(bundle_root: Path, variant: str, by: float = 1.0) -> float:
    """In place: the `variant` LiteRT model of a toy bundle gets its bias (its one float32 constant of shape
    [1]) moved by `by`, the other variants untouched, and the bundle's digest of that file updated, so the
    bundle still packages and signs cleanly and only that variant is wrong. Returns the old bias."""
    from ai_edge_litert.interpreter import Interpreter
    manifest = json.loads((bundle_root / "manifest.json").read_text())
    (rel,) = [a["path"] for a in manifest["formats"]["litert"] if a["variant"] == variant]
    path = bundle_root / rel
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    (bias,) = [float(interpreter.get_tensor(d["index"])[0]) for d in interpreter.get_tensor_details()
               if d["dtype"] == np.float32 and list(d["shape"]) == [1]]
    data = path.read_bytes()
    old = np.float32(bias).astype("<f4").tobytes()
    assert data.count(old) == 1, f"the bias {bias} of {path} is not one 4-byte run in the file"
    path.write_bytes(data.replace(old, np.float32(bias + by).astype("<f4").tobytes()))
    manifest["files"][rel] = sha256_file(path)
    (bundle_root / "manifest.json").write_text(json.dumps(manifest))
    return bias


def _one_variant_failing_package(edge, variant: str) -> Path:
    """A properly signed package of the toy bundle in which only `variant`'s weights were changed."""
    copy = shutil.copytree(edge["bundle"].root, edge["tmp"] / f"broken-{variant}-{uuid.uuid4().hex[:6]}")
    break_variant(copy, variant)
    pkg, _ = edge["package"](bundle_=read_bundle(copy))
    return pkg


def _raw_cut_off_upload(agent, pkg: Path) -> None:
    data = pkg.read_bytes()
    s = socket.create_connection(("127.0.0.1", agent.port), timeout=10)
    try:
        s.sendall((f"POST /bundles HTTP/1.1\r\nHost: 127.0.0.1:{agent.port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                   f"Content-Type: application/gzip\r\nContent-Length: {len(data)}\r\n\r\n").encode())
        s.sendall(data[: len(data) // 2])
        time.sleep(0.3)
    finally:
        s.close()


def _push_raw(agent, edge, make):
    pkg = make(edge)
    return agent.client.push(pkg)


REJECTIONS = {
    "signed with another key": (lambda a, e: a.client.push(e["package"](key=e["other"][0])[0]), 400,
                                "signature"),
    "a .tflite changed and re-packed unsigned": (
        lambda a, e: a.client.push(repack(e["package"]()[0], e["tmp"] / f"t-{uuid.uuid4().hex[:6]}.tar.gz",
                                          lambda ms: tamper(ms, "litert/model.tflite"))), 400,
        "litert/model.tflite: sha256"),
    "a member escaping with ../evil": (
        lambda a, e: a.client.push(repack(e["package"]()[0], e["tmp"] / f"t-{uuid.uuid4().hex[:6]}.tar.gz",
                                          lambda ms: ms + [extra_member("../evil")])), 400, "'../evil'"),
    "a symlink member": (
        lambda a, e: a.client.push(repack(e["package"]()[0], e["tmp"] / f"t-{uuid.uuid4().hex[:6]}.tar.gz",
                                          lambda ms: ms + [extra_member("litert/model2.tflite", kind=tarfile.SYMTYPE,
                                                                        linkname="/etc/passwd")])), 400,
        "symbolic link"),
    "no token": (lambda a, e: EdgeClient(a.url, None).push(e["package"]()[0]), 401, "missing bearer token"),
    "a wrong token": (lambda a, e: EdgeClient(a.url, "wrong").push(e["package"]()[0]), 401, "wrong bearer token"),
    "on-device parity fails": (lambda a, e: a.client.push(_parity_failing_package(e)), 422,
                               "on-device parity failed for fp32, fp16, int8"),
    "an upload cut off halfway": (lambda a, e: _raw_cut_off_upload(a, e["package"]()[0]), None,
                                  "upload cut off after"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(REJECTIONS))
def test_the_agent_rejects_and_the_old_model_keeps_answering(case, agent, edge):
    before = ensure_active(agent, edge)
    versions_before = sorted(p.name for p in (agent.root / "versions").iterdir())
    attempt, status, words = REJECTIONS[case]
    if status is None:  # no answer reaches a client that went away: the agent's log says what happened
        attempt(agent, edge)
        agent.wait_for_log(words, timeout=20)
    else:
        with pytest.raises(EdgeError) as e:
            attempt(agent, edge)
        assert e.value.status == status, e.value.body
        assert words in e.value.message, e.value.message
        if status == 422:
            report = e.value.body["report"]
            assert report["passed"] is False and all(not v["passed"] for v in report["variants"].values())
            assert all("max abs" in v["message"] for v in report["variants"].values())
    # nothing left behind, nothing switched, the old version answers as before
    deadline = time.monotonic() + 10
    while work_in_progress(agent.root):
        assert time.monotonic() < deadline, "a rejected push left files behind"
        time.sleep(0.05)
    assert sorted(p.name for p in (agent.root / "versions").iterdir()) == versions_before
    assert not (agent.root / "evil").exists() and not (agent.root.parent / "evil").exists()
    after = agent.client.status()
    assert (after["model"], after["version"]) == (before["model"], before["version"])
    assert_serves_reference(agent.client, edge["reference"])


@pytest.mark.e2e
def test_one_variant_failing_on_the_device_refuses_the_whole_version(agent, edge):
    """Every variant must pass on the device: a signed package whose int8 model alone is wrong (fp32 and fp16
    pass) is refused with 422 naming int8 only, and the previous version stays active and answering."""
    before = ensure_active(agent, edge)
    versions_before = sorted(p.name for p in (agent.root / "versions").iterdir())
    pkg = _one_variant_failing_package(edge, "int8")
    with pytest.raises(EdgeError) as e:
        agent.client.push(pkg)
    assert e.value.status == 422, e.value.body
    assert "on-device parity failed for int8 (the active version is unchanged)" in e.value.message, e.value.message
    assert "fp32" not in e.value.message.split(":")[0] and "fp16" not in e.value.message.split(":")[0]
    report = e.value.body["report"]
    assert report["passed"] is False
    assert {v: r["passed"] for v, r in report["variants"].items()} == {"fp32": True, "fp16": True, "int8": False}
    assert "max abs" in report["variants"]["int8"]["message"], report["variants"]["int8"]
    after = agent.client.status()
    assert (after["model"], after["version"]) == (before["model"], before["version"])
    assert after["last_push"]["outcome"] == "rejected" and "int8" in after["last_push"]["error"]
    assert sorted(p.name for p in (agent.root / "versions").iterdir()) == versions_before
    assert_serves_reference(agent.client, edge["reference"])
    assert_serves_reference(agent.client, edge["reference"], variant="int8", atol=0.1)  # the old int8 answers


@pytest.mark.e2e
def test_the_agent_process_never_imports_a_framework(agent, edge):
    ensure_active(agent, edge)  # after a push: verify, on-device parity and serving have all run
    agent.client.predict({"input": [[0.5]]}, variant="fp16")
    body = agent.client._request("GET", "/debug/modules")
    assert body["pid"] == agent.proc.pid
    modules = set(body["modules"])
    assert {"ai_edge_litert", "aiohttp", "cryptography", "numpy", "parity", "exporters", "edge"} <= modules
    assert not modules & set(FORBIDDEN_IN_AGENT), sorted(modules & set(FORBIDDEN_IN_AGENT))
    with pytest.raises(EdgeError) as e:
        EdgeClient(agent.url, None)._request("GET", "/debug/modules")
    assert e.value.status == 401
    assert EdgeClient(agent.url, None).health() == {"status": "ok"}


@pytest.mark.e2e
def test_kill_9_between_writing_a_version_and_switching_leaves_the_old_one_working(edge):
    root = edge["tmp"] / f"crash-{uuid.uuid4().hex[:6]}"
    base = next(edge["versions"]) + 10   # this device's own numbers (an older one is pushed at the end)
    pkg1, v1 = edge["package"](version=base)
    pkg2, v2 = edge["package"](version=base + 1)
    first = AgentProcess(root, edge["keys"][1], edge["tmp"], env={"EDGE_AGENT_PAUSE_BEFORE_SWITCH": str(v2)})
    second = None
    try:
        assert first.client.push(pkg1)["version"] == v1
        outcome = {}

        def push_v2():
            try:
                outcome["report"] = first.client.push(pkg2)
            except EdgeError as e:
                outcome["error"] = e
        pusher = threading.Thread(target=push_v2)
        pusher.start()
        first.wait_for_log(f"TEST HOOK: paused before switching to torch-v{v2}")
        assert (root / "versions" / f"torch-v{v2}" / "package" / "manifest.json").is_file()  # written, not active
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=15)
        pusher.join(timeout=30)
        assert "report" not in outcome and outcome["error"].status == 0
        assert json.loads((root / "active.json").read_text())["active"] == f"torch-v{v1}"

        second = AgentProcess(root, edge["keys"][1], edge["tmp"])
        status = second.client.status()
        assert status["version"] == v1 and status["load_error"] is None
        assert_serves_reference(second.client, edge["reference"])
        assert sorted(p.name for p in (root / "versions").iterdir()) == [f"torch-v{v1}"]  # the half-done one removed
        assert not work_in_progress(root)
        assert second.client.push(pkg2)["version"] == v2   # and the same package goes in cleanly now
        assert second.client.status()["previous"]["version"] == v1
        assert_serves_reference(second.client, edge["reference"])
        older, _ = edge["package"](version=v1 - 1)   # a properly signed but older package: a downgrade
        with pytest.raises(EdgeError) as e:
            second.client.push(older)
        assert e.value.status == 409 and "downgrade" in e.value.message
        assert second.client.push(older, allow_downgrade=True)["version"] == v1 - 1
        assert second.client.status()["previous"]["version"] == v2
    finally:
        first.stop()
        if second is not None:
            second.stop()
