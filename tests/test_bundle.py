"""The model bundle: every file's digest in the manifest, the manifest's own digest kept outside it."""
import json

import numpy as np
import pytest

from exporters.base import Artifact
from exporters.bundle import (MANIFEST, NOT_REPRODUCIBLE, BundleError, manifest_digest, read_bundle,
                              reproduction_differences, write_bundle)


@pytest.fixture
def bundle(tmp_path):
    src = tmp_path / "src"
    (src / "onnx").mkdir(parents=True)
    (src / "onnx" / "model.onnx").write_bytes(b"onnx bytes")
    (src / "sm" / "saved").mkdir(parents=True)
    (src / "sm" / "saved" / "saved_model.pb").write_bytes(b"pb")
    np.savez(src / "reference.npz", x=np.zeros((3, 1)), y=np.ones((3, 1)), kind=np.zeros(3, np.int8))
    arts = {"onnx": [Artifact("m", "onnx", "fp32", str(src / "onnx" / "model.onnx"), "torch", "r")],
            "saved_model": [Artifact("m", "saved_model", "fp32", str(src / "sm" / "saved"), "torch", "r")]}
    out = tmp_path / "bundle"
    sig = {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, 1], "layout": None}], "outputs": []}
    write_bundle(out, model="m", framework="torch", task="regression", signature=sig, reference=src / "reference.npz",
                 artifacts=arts, verdicts={"m/onnx@onnxruntime-cpu": "passed"}, tolerances={}, max_batch=16,
                 source={"spec": "s"})
    return out


def test_written_bundle_reads_back_with_every_file_listed(bundle):
    b = read_bundle(bundle, expected_manifest_sha256=manifest_digest(bundle))
    assert set(b.manifest["files"]) == {"reference.npz", "onnx/model.onnx", "saved_model/saved/saved_model.pb"}
    assert b.file_problems() == {}
    [onnx] = b.artifacts("onnx")
    assert onnx.path == str(bundle / "onnx" / "model.onnx") and b.relative(onnx) == "onnx/model.onnx"
    assert b.reference()["y"].shape == (3, 1)


def test_each_kind_of_change_is_named_for_its_part_only(bundle):
    b = read_bundle(bundle)
    (bundle / "onnx" / "model.onnx").write_bytes(b"other bytes")
    (bundle / "saved_model" / "saved" / "extra").write_bytes(b"x")
    (bundle / "reference.npz").unlink()
    assert "differs from the manifest" in b.file_problems("onnx/model.onnx")["onnx/model.onnx"]
    assert b.file_problems("saved_model/saved") == {"saved_model/saved/extra": "not listed in the manifest"}
    assert b.file_problems("reference.npz") == {"reference.npz": "missing from the bundle"}
    assert b.file_problems("saved_model/sav") == {}  # a prefix of a name is not the artifact


def test_a_changed_manifest_is_refused_against_the_registered_digest(bundle):
    digest = manifest_digest(bundle)
    m = json.loads((bundle / MANIFEST).read_text())
    m["tolerances"] = {"fp32": {"atol": 1}}
    (bundle / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="changed after it was registered"):
        read_bundle(bundle, expected_manifest_sha256=digest)
    assert read_bundle(bundle).manifest["tolerances"]  # without a registered digest it opens


@pytest.mark.parametrize("text, match", [("{not json", "malformed"), ('{"kind": "other"}', "model-bundle")])
def test_a_broken_manifest_is_refused(bundle, text, match):
    (bundle / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match=match):
        read_bundle(bundle)


def test_no_manifest_is_refused(tmp_path):
    with pytest.raises(BundleError, match="expected a bundle manifest, found nothing"):
        read_bundle(tmp_path)


def _write(home, export_s: float, fingerprint: bytes, profiles=None):
    """A bundle made in `home` of one SavedModel artifact whose record names its source in the cache, as
    exporters do."""
    src = home / "cache" / "export"
    (src / "sm" / "saved").mkdir(parents=True)
    (src / "sm" / "saved" / "saved_model.pb").write_bytes(b"pb")
    (src / "sm" / "saved" / "fingerprint.pb").write_bytes(fingerprint)
    np.savez(src / "reference.npz", x=np.zeros((3, 1)), y=np.ones((3, 1)), kind=np.zeros(3, np.int8))
    art = Artifact("m", "saved_model", "fp32", str(src / "sm" / "saved"), "torch", "r", export_s=export_s,
                   details={"onnx_source": str(src / "onnx" / "model.onnx"), "nested": [{"from": str(src)}]})
    write_bundle(home / "bundle", model="m", framework="torch", task="regression", signature={},
                 reference=src / "reference.npz", artifacts={"saved_model": [art]}, verdicts={}, tolerances={},
                 max_batch=16, source={"spec": "s"}, profiles=profiles)
    return home / "bundle"


def test_the_same_inputs_make_the_same_manifest_but_for_declared_files(tmp_path):
    """No timing and no path outside the bundle is hashed; a converter's file that differs on every run
    (a SavedModel's fingerprint) is declared, and a comparison of two bundles names it with why."""
    assert manifest_digest(_write(tmp_path / "home1", 1.5, b"uuid")) == \
        manifest_digest(_write(tmp_path / "home2", 2.5, b"uuid"))  # another home, another export time
    a = json.loads((_write(tmp_path / "a", 1.5, b"uuid 1") / MANIFEST).read_text())
    b = json.loads((_write(tmp_path / "b", 2.5, b"uuid 2") / MANIFEST).read_text())
    [rec] = a["formats"]["saved_model"]
    assert "export_s" not in rec and rec["details"] == {"onnx_source": "model.onnx", "nested": [{"from": "export"}]}
    assert a["not_reproducible"] == {f"saved_model/saved/{f}": NOT_REPRODUCIBLE[f]
                                     for f in ("fingerprint.pb", "saved_model.pb")}
    assert reproduction_differences(a, b) == {"saved_model/saved/fingerprint.pb": NOT_REPRODUCIBLE["fingerprint.pb"]}
    b["files"]["reference.npz"] = "0" * 64  # an undeclared file that differs is named too
    assert reproduction_differences(a, b)["reference.npz"] == \
        "the converter wrote other bytes from the same inputs"


def test_the_profile_travels_with_the_bundle_outside_its_digests(tmp_path):
    profiles = {"m/saved_model@tensorflow": {"batch_1": {"p50_ms": 0.2}, "size_bytes": 10}}
    root = _write(tmp_path / "p", 1.0, b"u", profiles=profiles)
    b = read_bundle(root, expected_manifest_sha256=manifest_digest(root))
    assert b.profiles() == profiles and "profile.json" not in b.manifest["files"]
    (root / "profile.json").write_text("{}")  # measurements change run to run: not part of what is verified
    assert b.file_problems() == {} and read_bundle(root, manifest_digest(root)).profiles() == {}
    assert read_bundle(_write(tmp_path / "q", 1.0, b"u")).profiles() == {}


def test_tfjs_node_attributes_are_written_in_key_order(tmp_path):
    from exporters.tfjs_graph import sorted_node_attributes
    model = {"signature": {"inputs": {"b": {}, "a": {}}},
             "modelTopology": {"node": [{"name": "n", "attr": {"transpose_b": 1, "dtype": 2}}],
                               "library": {"function": [{"nodeDef": [{"attr": {"z": 1, "y": 2}}], "attr": {"d": 1, "c": 2}}]}}}
    sorted_node_attributes(tmp_path / "model.json", model)
    written = json.loads((tmp_path / "model.json").read_text())
    assert list(written["modelTopology"]["node"][0]["attr"]) == ["dtype", "transpose_b"]
    f = written["modelTopology"]["library"]["function"][0]
    assert list(f["nodeDef"][0]["attr"]) == ["y", "z"] and list(f["attr"]) == ["c", "d"]
    assert list(written["signature"]["inputs"]) == ["b", "a"]  # TF.js binds inputs given by position in this order
