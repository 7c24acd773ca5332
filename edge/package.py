"""Signed edge packages: the LiteRT artifacts of one model bundle, ready to ship to a device.

An edge package is a .tar.gz holding

    manifest.json     kind "edge-package": model, version, framework, task, max_batch, the model's
                      signature, the tolerance overrides, the bundle it came from (source), the selected
                      LiteRT artifacts' records (exporters.base.Artifact, paths relative to the package),
                      and {"sha256", "size"} of every other file
    manifest.sig      JSON: {"algorithm": "ed25519", "key_id", "signature"}: the Ed25519 signature
                      (base64) over the exact bytes of manifest.json
    reference.npz     the bundle's stored parity inputs and reference outputs
    litert/*.tflite   the artifacts

`verify_package` trusts nothing in the archive until it has checked it: only regular files and folders
(no links, devices or FIFOs), canonical relative names (no absolute paths, no `..`), size limits per file
and in all (counted as the bytes are written, not as the headers claim), the signature over
manifest.json, every file's sha256 and size, and no file the manifest does not list. It unpacks into a
temporary folder beside the destination and renames it into place only when everything holds.

The verifying side needs numpy, cryptography and the parity package; building reads a bundle
(exporters.bundle) but imports no framework.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from cryptography.exceptions import InvalidSignature

from exporters import variants
from exporters.bundle import sha256_file  # one hashing of files for bundles and packages
from parity.feeds import unpack

from .keys import as_private, as_public, key_id

SCHEMA_VERSION = "1"
KIND = "edge-package"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
REFERENCE = "reference.npz"
FORMAT = "litert"
VARIANTS = variants(FORMAT)  # what a package may carry: the format's own variants (exporters/litert.py)
RUNTIME = "litert-interpreter"

DEFAULT_MAX_BYTES = 1 << 30          # all files together, unpacked
DEFAULT_MAX_FILE_BYTES = 512 << 20   # one file
MAX_MANIFEST_BYTES = 4 << 20
MAX_MEMBERS = 256
_PART = re.compile(r"^[A-Za-z0-9._+\-@=,]+$")


class PackageError(RuntimeError):
    """An edge package that cannot be built, trusted or read: names the member or file and what was wrong."""

    def __init__(self, message: str, *, member: str | None = None, reason: str = "invalid"):
        super().__init__(message)
        self.member = member
        self.reason = reason   # a short word for machines: signature, sha256, unsafe-member, size, unlisted, ...


# ------------------------------------------------------------------------------------------------ build

def build_package(bundle, out_file: Path, private_key, *, variants: Iterable[str] = VARIANTS, version: int,
                  require_passed: bool = True) -> Path:
    """Write the signed edge package of `bundle` (an exporters.bundle.Bundle or its folder) to `out_file`.

    `variants` selects the LiteRT artifacts; each must be in the bundle, its files must match the
    bundle's manifest, and (with require_passed) its recorded parity verdict must be "passed".
    `private_key` is an Ed25519PrivateKey or the path of its PEM file. Returns `out_file`."""
    if not isinstance(bundle, (str, os.PathLike)) and not hasattr(bundle, "manifest"):
        raise PackageError(f"expected a model bundle or its folder, found {type(bundle).__name__}")
    if isinstance(bundle, (str, os.PathLike)):
        from exporters.bundle import read_bundle  # the build side only: the agent never reads bundles
        bundle = read_bundle(Path(bundle))
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PackageError(f"version: expected a positive integer, found {version!r}")
    variants = list(dict.fromkeys(variants))
    unknown = [v for v in variants if v not in VARIANTS]
    if not variants or unknown:
        raise PackageError(f"variants: expected some of {', '.join(VARIANTS)}, found {variants!r}")
    key = as_private(private_key)
    root = Path(bundle.root)
    manifest_in = bundle.manifest
    by_variant = {a.variant: a for a in bundle.artifacts(FORMAT)}
    missing = [v for v in variants if v not in by_variant]
    if missing:
        raise PackageError(f"{root}: the bundle has no {FORMAT} artifact for variant(s) {', '.join(missing)} "
                           f"(it has {', '.join(sorted(by_variant)) or 'none'})")
    chosen = [by_variant[v] for v in variants]
    ref_rel = manifest_in.get("reference", REFERENCE)
    rels = [ref_rel] + [Path(a.path).relative_to(root).as_posix() for a in chosen]
    recorded = manifest_in.get("files", {})
    for rel in rels:  # the bundle's own integrity: never package a file the bundle does not vouch for
        path = root / rel
        if not path.is_file():
            raise PackageError(f"{path}: expected a file of the bundle, found nothing", member=rel)
        want = recorded.get(rel)
        if want is None:
            raise PackageError(f"{path}: not listed in the bundle's manifest", member=rel, reason="unlisted")
        got = sha256_file(path)
        if got != want:
            raise PackageError(f"{path}: sha256 {got[:12]}... differs from the bundle manifest's {want[:12]}...",
                               member=rel, reason="sha256")
    verdicts = manifest_in.get("verdicts", {})
    picked_verdicts = {}
    for a in chosen:
        cell = f"{a.label}@{RUNTIME}"
        verdict = verdicts.get(cell)
        picked_verdicts[cell] = verdict
        if require_passed and verdict != "passed":
            raise PackageError(f"{a.label}: the bundle's parity verdict for {cell} is {verdict!r}; only "
                               f"artifacts that passed are packaged (require_passed=False to override)")

    records, files = [], {}
    members: list[tuple[str, Path]] = [(REFERENCE, root / ref_rel)]
    for a in chosen:
        src = Path(a.path)
        rel = f"{FORMAT}/{src.name}"
        members.append((rel, src))
        record = {**a.to_json(), "path": rel}
        records.append(record)
    for rel, src in members:
        files[rel] = {"sha256": sha256_file(src), "size": src.stat().st_size}
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": KIND,
        "model": bundle.model, "version": version, "framework": manifest_in.get("framework"),
        "task": manifest_in.get("task", "regression"), "max_batch": int(manifest_in.get("max_batch") or 1),
        "signature": manifest_in.get("signature"), "tolerances": manifest_in.get("tolerances") or {},
        "source": {**(manifest_in.get("source") or {}),
                   "bundle_manifest_sha256": sha256_file(root / "manifest.json")
                   if (root / "manifest.json").is_file() else None,
                   "bundle_verdicts": picked_verdicts},
        "reference": REFERENCE, "format": FORMAT, "variants": variants, "artifacts": records,
        "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    sig = {"algorithm": "ed25519", "key_id": key_id(key),
           "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}
    sig_bytes = json.dumps(sig, indent=2, sort_keys=True).encode()

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, MANIFEST, manifest_bytes)
            _add_bytes(tar, SIGNATURE, sig_bytes)
            _add_dir(tar, FORMAT)
            for rel, src in members:
                info = tarfile.TarInfo(rel)
                info.size = src.stat().st_size
                info.mode, info.mtime = 0o644, int(time.time())
                with open(src, "rb") as f:
                    tar.addfile(info, f)
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
    tar.addfile(info)


# ----------------------------------------------------------------------------------------------- verify

@dataclass
class Package:
    """A verified, unpacked edge package."""
    root: Path
    manifest: dict
    key_id: str = ""

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    def artifacts(self):
        """The LiteRT artifacts (exporters.base.Artifact), paths absolute."""
        from exporters.base import Artifact
        return [Artifact.from_json(d, self.root) for d in self.manifest["artifacts"]]

    def signature(self):
        from parity.signature import Signature
        sig = self.manifest.get("signature")
        return Signature.from_json(sig) if sig else None

    def reference(self) -> dict:
        path = self.root / self.manifest["reference"]
        try:
            with np.load(path, allow_pickle=False) as f:
                ref = {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:
            raise PackageError(f"{path}: expected the parity inputs and reference outputs, found an unreadable "
                               f"file ({e})", member=self.manifest["reference"], reason="reference") from None
        has_inputs = "x" in ref or any(k.startswith("x:") for k in ref)
        if not has_inputs or {"y", "kind"} - set(ref):
            raise PackageError(f"{path}: expected the inputs (x, or x:<name> for each of several), y and kind, "
                               f"found {sorted(ref)}", member=self.manifest["reference"], reason="reference")
        return {k: v for k, v in ref.items() if not k.startswith("x:")} | {"x": unpack(ref, "x")}

    def size_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.manifest["files"].values())


def _check_name(name: str) -> str:
    """The canonical relative name of a member, or PackageError."""
    raw = name
    if name.endswith("/"):
        name = name.rstrip("/")
    if not name:
        raise PackageError(f"member {raw!r}: an empty name", member=raw, reason="unsafe-member")
    if "\x00" in name or "\\" in name or any(ord(c) < 32 for c in name):
        raise PackageError(f"member {raw!r}: control characters or backslashes in the name", member=raw,
                           reason="unsafe-member")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise PackageError(f"member {raw!r}: an absolute path; expected a path relative to the package",
                           member=raw, reason="unsafe-member")
    parts = name.split("/")
    if ".." in parts:
        raise PackageError(f"member {raw!r}: '..' escapes the package folder", member=raw, reason="unsafe-member")
    if any(p in ("", ".") for p in parts):
        raise PackageError(f"member {raw!r}: not a canonical path (empty or '.' parts)", member=raw,
                           reason="unsafe-member")
    bad = [p for p in parts if not _PART.match(p)]
    if bad:
        raise PackageError(f"member {raw!r}: unexpected characters in {bad[0]!r}", member=raw, reason="unsafe-member")
    return name


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    return f"a member of tar type {member.type!r}"


def verify_package(tar_path: Path, public_key, dest_dir: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, max_members: int = MAX_MEMBERS) -> Package:
    """Check the package at `tar_path` against `public_key` (Ed25519PublicKey or PEM path) and unpack it
    into `dest_dir` (which must not exist). Raises PackageError, leaving nothing behind, on the first
    problem. Returns the Package."""
    tar_path, dest_dir = Path(tar_path), Path(dest_dir)
    key = as_public(public_key)
    if dest_dir.exists() or dest_dir.is_symlink():
        raise PackageError(f"{dest_dir}: the destination exists already", reason="destination")
    dest_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest_dir.parent / f".{dest_dir.name}.unpack-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        found = _unpack(tar_path, tmp, max_bytes=max_bytes, max_file_bytes=max_file_bytes, max_members=max_members)
        manifest, kid = _check_contents(tmp, found, key)
        for rel in found:
            _fsync(tmp / rel)
        for d in {(tmp / rel).parent for rel in found} | {tmp}:
            _fsync(d)
        os.rename(tmp, dest_dir)
        _fsync(dest_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Package(dest_dir, manifest, kid)


def _unpack(tar_path: Path, out: Path, *, max_bytes: int, max_file_bytes: int, max_members: int) -> dict[str, dict]:
    """Stream the archive's members into `out`; returns {relative file name: {sha256, size}}."""
    found: dict[str, dict] = {}
    seen: set[str] = set()
    total = 0
    try:
        raw = open(tar_path, "rb")
    except OSError as e:
        raise PackageError(f"{tar_path}: could not open the package ({e.strerror or e})", reason="archive") from None
    with raw:
        try:
            tar = tarfile.open(fileobj=raw, mode="r|gz")
        except (tarfile.TarError, OSError, EOFError) as e:
            raise PackageError(f"{tar_path.name}: expected a gzip-compressed tar archive, found an unreadable "
                               f"file ({type(e).__name__}: {e})", reason="archive") from None
        count = 0
        try:
            for member in tar:
                count += 1
                if count > max_members:
                    raise PackageError(f"{tar_path.name}: more than {max_members} members", reason="size")
                name = _check_name(member.name)
                if name in seen:
                    raise PackageError(f"member {member.name!r}: appears twice in the archive", member=member.name,
                                       reason="duplicate")
                seen.add(name)
                if member.isdir():
                    (out / name).mkdir(parents=True, exist_ok=True, mode=0o755)
                    continue
                if not member.isreg():
                    raise PackageError(f"member {member.name!r}: {_kind(member)}; only regular files and "
                                       f"folders are accepted", member=member.name, reason="unsafe-member")
                if member.size > max_file_bytes:
                    raise PackageError(f"member {member.name!r}: {member.size} bytes, over the limit of "
                                       f"{max_file_bytes} per file", member=member.name, reason="size")
                if total + member.size > max_bytes:
                    raise PackageError(f"member {member.name!r}: the package would unpack to more than "
                                       f"{max_bytes} bytes", member=member.name, reason="size")
                target = out / name
                if any(p.is_symlink() for p in [target, *target.parents] if p != out and out in p.parents):
                    raise PackageError(f"member {member.name!r}: its path goes through a link", member=member.name,
                                       reason="unsafe-member")
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                src = tar.extractfile(member)
                h, written = hashlib.sha256(), 0
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                with os.fdopen(fd, "wb") as dst:
                    while True:
                        block = src.read(1 << 20)
                        if not block:
                            break
                        written += len(block)
                        if written > max_file_bytes or total + written > max_bytes:
                            raise PackageError(f"member {member.name!r}: more bytes than its header declares or "
                                               f"the size limits allow", member=member.name, reason="size")
                        h.update(block)
                        dst.write(block)
                if written != member.size:
                    raise PackageError(f"member {member.name!r}: {written} bytes, its header declares "
                                       f"{member.size}: the archive is corrupt or truncated", member=member.name, reason="archive")
                total += written
                found[name] = {"sha256": h.hexdigest(), "size": written}
        except PackageError:
            raise
        except Exception as e:  # TarError, EOFError, zlib.error, OSError: a damaged or cut-off stream
            raise PackageError(f"{tar_path.name}: the archive is corrupt or truncated ({type(e).__name__}: {e})",
                               reason="archive") from None
        finally:
            tar.close()
    return found


def _check_contents(root: Path, found: dict[str, dict], key) -> tuple[dict, str]:
    for required in (MANIFEST, SIGNATURE):
        if required not in found:
            raise PackageError(f"{required}: missing from the package", member=required, reason="missing")
    if found[MANIFEST]["size"] > MAX_MANIFEST_BYTES:
        raise PackageError(f"{MANIFEST}: {found[MANIFEST]['size']} bytes, over the limit of {MAX_MANIFEST_BYTES}",
                           member=MANIFEST, reason="size")
    manifest_bytes = (root / MANIFEST).read_bytes()
    try:
        sig = json.loads((root / SIGNATURE).read_bytes())
        if sig.get("algorithm") != "ed25519":
            raise ValueError(f"algorithm {sig.get('algorithm')!r}, expected 'ed25519'")
        signature = base64.b64decode(sig["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PackageError(f"{SIGNATURE}: expected {{algorithm: ed25519, signature: base64}}, found an unreadable "
                           f"file ({e})", member=SIGNATURE, reason="signature") from None
    trusted = key_id(key)
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        signer = sig.get("key_id") if isinstance(sig, dict) else None
        who = (f"it names key {signer}, this device trusts key {trusted}" if signer and signer != trusted
               else f"checked with the trusted key {trusted}")
        raise PackageError(f"{MANIFEST}: the Ed25519 signature in {SIGNATURE} does not match ({who}); the manifest "
                           f"was changed or signed with another key", member=MANIFEST, reason="signature") from None
    # signed: from here on the manifest is what the build side wrote; still check its shape
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as e:
        raise PackageError(f"{MANIFEST}: expected JSON, found a malformed file ({e})", member=MANIFEST,
                           reason="manifest") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND or manifest.get("schema_version") != SCHEMA_VERSION:
        raise PackageError(f"{MANIFEST}: expected kind {KIND!r}, schema_version {SCHEMA_VERSION}", member=MANIFEST,
                           reason="manifest")
    for k in ("model", "version", "artifacts", "files", "reference", "signature", "task"):
        if k not in manifest:
            raise PackageError(f"{MANIFEST}: {k}: required key is missing", member=MANIFEST, reason="manifest")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise PackageError(f"{MANIFEST}: files: expected a table", member=MANIFEST, reason="manifest")
    for rel, want in sorted(files.items()):
        got = found.get(rel)
        if got is None:
            raise PackageError(f"{rel}: listed in the manifest, missing from the package", member=rel, reason="missing")
        if got["sha256"] != want.get("sha256"):
            raise PackageError(f"{rel}: sha256 {got['sha256'][:12]}... differs from the manifest's "
                               f"{str(want.get('sha256'))[:12]}...: the file was changed after signing", member=rel,
                               reason="sha256")
        if got["size"] != want.get("size"):
            raise PackageError(f"{rel}: {got['size']} bytes, the manifest says {want.get('size')}", member=rel,
                               reason="size")
    unlisted = sorted(set(found) - set(files) - {MANIFEST, SIGNATURE})
    if unlisted:
        raise PackageError(f"{unlisted[0]}: not listed in the signed manifest"
                           + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""), member=unlisted[0],
                           reason="unlisted")
    if manifest["reference"] not in files:
        raise PackageError(f"{MANIFEST}: reference {manifest['reference']!r} is not one of the package's files",
                           member=MANIFEST, reason="manifest")
    arts = manifest["artifacts"]
    if not isinstance(arts, list) or not arts:
        raise PackageError(f"{MANIFEST}: artifacts: expected at least one LiteRT artifact", member=MANIFEST,
                           reason="manifest")
    seen_variants = set()
    for a in arts:
        if not isinstance(a, dict) or a.get("format") != FORMAT or a.get("variant") not in VARIANTS \
                or a.get("path") not in files or a.get("variant") in seen_variants:
            raise PackageError(f"{MANIFEST}: artifact {a.get('path') if isinstance(a, dict) else a!r}: expected a "
                               f"{FORMAT} record of a distinct variant ({', '.join(VARIANTS)}) whose path is one of the "
                               f"package's files", member=MANIFEST, reason="manifest")
        seen_variants.add(a["variant"])
    return manifest, trusted


def read_installed(root: Path, public_key) -> Package:
    """Re-check an unpacked package in place (signature, every file's sha256, nothing unlisted): what an
    agent does on start before it serves a version from disk again."""
    root = Path(root)
    key = as_public(public_key)
    found = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise PackageError(f"{rel}: not a regular file or folder", member=rel, reason="unsafe-member")
        if p.is_file():
            found[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest, kid = _check_contents(root, found, key)
    return Package(root, manifest, kid)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
