"""Content-addressed stage cache with atomic outputs.

An entry lives in CACHE/<kind>/<key>/ and exists only once complete: a stage writes into a private
temporary folder beside it and renames it into place at the end, so a run killed mid-stage leaves
only a `.tmp-*` folder that no later run trusts (and the next run sweeps away).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_code_hashes: dict[tuple[str, ...], str] = {}


def code_version(files: tuple[str, ...]) -> str:
    """Hash of the source files a stage's result depends on (paths relative to the package root)."""
    if files not in _code_hashes:
        h = hashlib.sha256()
        for rel in files:
            h.update(rel.encode())
            h.update((PACKAGE_ROOT / rel).read_bytes())
        _code_hashes[files] = h.hexdigest()[:16]
    return _code_hashes[files]


def stage_key(kind: str, settings: dict, input_keys: dict[str, str], code: str) -> str:
    blob = json.dumps({"kind": kind, "settings": settings, "inputs": input_keys, "code": code},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Entry:
    kind: str
    key: str
    path: Path

    @property
    def meta_path(self) -> Path:
        return self.path / "stage.json"

    def meta(self) -> dict:
        return json.loads(self.meta_path.read_text())


class Cache:
    def __init__(self, root: Path):
        self.root = root

    def entry(self, kind: str, key: str) -> Entry:
        return Entry(kind, key, self.root / kind / key)

    def lookup(self, kind: str, key: str) -> Entry | None:
        entry = self.entry(kind, key)
        return entry if entry.meta_path.is_file() else None

    def begin(self, kind: str, key: str) -> Path:
        """A fresh private folder to write a stage's outputs into."""
        tmp = self.root / kind / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, kind: str, key: str, tmp: Path, meta: dict) -> Entry:
        """Write stage.json last, then move the folder into place in one rename."""
        (tmp / "stage.json").write_text(json.dumps({**meta, "key": key, "kind": kind,
                                                    "finished": time.time()}, indent=2, default=str))
        entry = self.entry(kind, key)
        if entry.path.exists():  # a stale entry without stage.json, or a concurrent run won the race
            shutil.rmtree(entry.path, ignore_errors=True)
        os.rename(tmp, entry.path)
        return entry

    def abandon(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def sweep(self, older_than_s: float = 0.0) -> int:
        """Remove temporary folders that killed runs left behind."""
        removed = 0
        if not self.root.exists():
            return 0
        for kind_dir in self.root.iterdir():
            for tmp in kind_dir.glob(".tmp-*"):
                pid = _pid_of(tmp.name)
                if pid and _alive(pid):
                    continue  # another live run is writing it
                if time.time() - tmp.stat().st_mtime >= older_than_s:
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed += 1
        return removed


def _pid_of(name: str) -> int | None:
    parts = name.split("-")
    try:
        return int(parts[2])
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process nobody has reaped yet is a zombie: dead for our purposes
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except OSError:
        return True
