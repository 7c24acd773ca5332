"""The model bundle: what a verified model ships as, and what a gate, a server or a device reads.

A bundle is a folder:

    manifest.json      model, framework, task, the model's signature, the artifacts of every format (exporters.base.Artifact
                       records, paths relative to the bundle), their parity verdicts, the tolerance
                       overrides, the sha256 of every other file in the folder, and the files whose converter
                       writes other bytes on every run (`not_reproducible`, with why)
    reference.npz      the stored parity inputs (x, kind, labels) and the trained model's outputs on
                       them (y, y_perturbed): what every copy of the artifacts is compared against
    <format>/...       the artifact files
    profile.json       what each artifact measured in its runtime when it was verified (size, load time,
                       latency, memory): kept with the bundle but not hashed, as timings differ run to run

The same inputs make the same bytes where the converters allow: the manifest holds no timings and no
paths outside the bundle. Where a converter does not allow it, the manifest says so (NOT_REPRODUCIBLE).

Readers need numpy and this package only; nothing here imports a framework, the pipeline or MLflow.
The manifest's own sha256 is kept outside the bundle (the model registry holds it as a version tag),
so a changed manifest is caught as well as a changed file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from parity.feeds import unpack

from .base import Artifact

SCHEMA_VERSION = "1"
MANIFEST = "manifest.json"
REFERENCE = "reference.npz"
PROFILE = "profile.json"  # measurements, not content: outside the manifest's digests


# Files a converter writes differently on every run from the same inputs, matched by name: why.
NOT_REPRODUCIBLE = {
    "fingerprint.pb": "TensorFlow writes a random uuid into every SavedModel's fingerprint.pb on each save "
                      "(its hashes of the graph, signatures and checkpoint are the same run to run)",
    "saved_model.pb": "TensorFlow names each traced function after a counter of the process that saved it "
                      "(__inference_..._N), and other stages run before in the same worker move that counter; "
                      "the graph is the same",
}


class BundleError(RuntimeError):
    """A bundle that cannot be trusted or read: says which file and what was wrong with it."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bundle(out_dir: Path, *, model: str, framework: str, task: str, signature: dict, reference: Path,
                 artifacts: dict[str, list[Artifact]], verdicts: dict[str, str], tolerances: dict,
                 max_batch: int, source: dict, profiles: dict | None = None) -> dict:
    """Write a bundle into `out_dir` (empty): artifact files are hard-linked where the file system
    allows, else copied. `profiles`: label@runtime -> the verify stage's profile of that artifact.
    Returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _place(reference, out_dir / REFERENCE)
    formats = {}
    for fmt, arts in artifacts.items():
        records = []
        for a in arts:
            src = Path(a.path)
            rel = Path(fmt) / src.name
            _place(src, out_dir / rel)
            for name in (a.details or {}).get("companions", ()):  # files that travel with it (a self-check)
                _place(src.with_name(name), out_dir / fmt / name)
            records.append({**_reproducible(a.to_json()), "path": rel.as_posix()})
        formats[fmt] = records
    files = {p.relative_to(out_dir).as_posix(): sha256_file(p)
             for p in sorted(out_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    if profiles:
        (out_dir / PROFILE).write_text(json.dumps(profiles, indent=2, sort_keys=True))
    manifest = {"schema_version": SCHEMA_VERSION, "kind": "model-bundle", "model": model,
                "framework": framework, "task": task, "signature": signature, "reference": REFERENCE,
                "formats": formats,
                "verdicts": verdicts, "tolerances": tolerances, "max_batch": max_batch, "source": source,
                "files": files, **({"profile": PROFILE} if profiles else {}),
                "not_reproducible": {f: NOT_REPRODUCIBLE[Path(f).name] for f in files if Path(f).name in NOT_REPRODUCIBLE}}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _reproducible(record: dict) -> dict:
    """An artifact's record as the bundle keeps it: without how long this export took, and with the
    files it names outside the bundle (its sources in the cache) told by their names only."""
    def local(value):
        if isinstance(value, dict):
            return {k: local(v) for k, v in value.items()}
        if isinstance(value, list):
            return [local(v) for v in value]
        if isinstance(value, str) and os.path.isabs(value):
            return Path(value).name
        return value
    return local({k: v for k, v in record.items() if k != "export_s"})


def reproduction_differences(registered: dict, rerun: dict) -> dict[str, str]:
    """Files of two manifests of the same model whose bytes differ: relative path -> why (the cause
    declared in the manifest, else that the converter made other bytes)."""
    known = {**registered.get("not_reproducible", {}), **rerun.get("not_reproducible", {})}
    a, b = registered.get("files", {}), rerun.get("files", {})
    return {f: known.get(f, "the converter wrote other bytes from the same inputs" if f in a and f in b
                         else "in one bundle only")
            for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)}


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(src), str(dst))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class Bundle:
    root: Path
    manifest: dict

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def formats(self) -> list[str]:
        return list(self.manifest["formats"])

    def artifacts(self, fmt: str) -> list[Artifact]:
        return [Artifact.from_json(d, self.root) for d in self.manifest["formats"].get(fmt, [])]

    def relative(self, artifact: Artifact) -> str:
        return Path(artifact.path).relative_to(self.root).as_posix()

    def reference(self) -> dict[str, np.ndarray]:
        path = self.root / self.manifest["reference"]
        try:
            with np.load(path) as f:
                ref = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise BundleError(f"{path}: expected the bundle's parity inputs and reference outputs, "
                              f"found an unreadable file ({e})") from None
        has_inputs = "x" in ref or any(k.startswith("x:") for k in ref)  # one input, or several as x:<name>
        if not has_inputs or {"y", "kind"} - set(ref):
            raise BundleError(f"{path}: expected the inputs (x, or x:<name> for each of several), y and kind, "
                              f"found {sorted(ref)}")
        # the inputs as every reader takes them: one array, or {name: array} for several
        return {k: v for k, v in ref.items() if not k.startswith("x:")} | {"x": unpack(ref, "x")}

    def profiles(self) -> dict:
        """label@runtime -> what the artifact measured when it was verified ({} for a bundle without)."""
        path = self.root / self.manifest.get("profile", PROFILE)
        return json.loads(path.read_text()) if "profile" in self.manifest and path.is_file() else {}

    def file_problems(self, part: str | None = None) -> dict[str, str]:
        """Files (of one part: an artifact's relative path, or reference.npz; default all) whose bytes
        differ from the manifest's digests, or that are missing or unlisted: relative path -> what is wrong."""
        def inside(rel: str) -> bool:
            return part is None or rel == part or rel.startswith(part.rstrip("/") + "/")
        recorded = {f: d for f, d in self.manifest["files"].items() if inside(f)}
        found = {rel: p for p in sorted(self.root.rglob("*"))
                 if p.is_file() and (rel := p.relative_to(self.root).as_posix()) not in (MANIFEST, PROFILE)
                 and inside(rel)}
        problems = {}
        for rel, digest in recorded.items():
            if rel not in found:
                problems[rel] = "missing from the bundle"
            else:
                got = sha256_file(found[rel])
                if got != digest:
                    problems[rel] = f"sha256 {got[:12]}... differs from the manifest's {digest[:12]}..."
        for rel in sorted(set(found) - set(recorded)):
            problems[rel] = "not listed in the manifest"
        return problems


def manifest_digest(root: Path) -> str:
    return sha256_file(Path(root) / MANIFEST)


def read_bundle(root: Path, expected_manifest_sha256: str | None = None) -> Bundle:
    """Open a bundle, refusing an unreadable manifest or one whose sha256 is not the expected one."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: expected a bundle manifest, found {'a folder' if path.exists() else 'nothing'}")
    if expected_manifest_sha256:
        got = manifest_digest(root)
        if got != expected_manifest_sha256:
            raise BundleError(f"{path}: sha256 {got[:16]}... differs from the registered "
                              f"{expected_manifest_sha256[:16]}...: the bundle was changed after it was registered")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise BundleError(f"{path}: expected JSON, found a malformed file ({e})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION or manifest.get("kind") != "model-bundle":
        raise BundleError(f"{path}: expected a model-bundle manifest, schema_version {SCHEMA_VERSION}, found "
                          f"kind {manifest.get('kind')!r}, schema_version {manifest.get('schema_version')!r}")
    for key in ("model", "framework", "task", "signature", "formats", "files", "reference"):
        if key not in manifest:
            raise BundleError(f"{path}: {key}: required key is missing")
    return Bundle(root, manifest)
