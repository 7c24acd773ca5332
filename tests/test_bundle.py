"""The model bundle: every file's digest in the manifest, the manifest's own digest kept outside it."""
import json

import numpy as np
import pytest

from exporters.base import Artifact
from exporters.bundle import MANIFEST, BundleError, manifest_digest, read_bundle, write_bundle


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
