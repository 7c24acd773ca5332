"""Ed25519 signing keys for edge packages: the build side holds the private key, every device agent
the public one. PEM files (PKCS#8 private, SubjectPublicKeyInfo public); cryptography only.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PRIVATE_NAME = "edge_ed25519.pem"
PUBLIC_NAME = "edge_ed25519.pub.pem"


class KeyFileError(ValueError):
    """A key file that is missing, unreadable or not an Ed25519 key of the expected kind: says which file."""


def init_keys(folder: Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair into `folder` (created if needed): the private key with mode 0600,
    the public key 0644. Refuses (FileExistsError) to overwrite either file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private_path, public_path = folder / PRIVATE_NAME, folder / PUBLIC_NAME
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise FileExistsError(f"{p}: a key file is already there; refusing to overwrite it "
                                  f"(move it away first to make a new pair)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, 0o644)
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away from (or, for 0644, left) the requested mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path, what: str) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{path}: expected an Ed25519 {what} key (PEM), could not read it "
                           f"({e.strerror or e})") from None


def load_private(path: Path) -> Ed25519PrivateKey:
    data = _read(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: expected an unencrypted Ed25519 private key (PEM), found an "
                           f"unreadable one ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: expected an Ed25519 private key, found a {type(key).__name__}")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    data = _read(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: expected an Ed25519 public key (PEM), found an unreadable one ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path}: expected an Ed25519 public key, found a {type(key).__name__}")
    return key


def key_id(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """A short name for a key pair (the first 16 hex digits of the sha256 of the raw public key)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def as_private(key) -> Ed25519PrivateKey:
    return key if isinstance(key, Ed25519PrivateKey) else load_private(Path(key))


def as_public(key) -> Ed25519PublicKey:
    return key if isinstance(key, Ed25519PublicKey) else load_public(Path(key))
