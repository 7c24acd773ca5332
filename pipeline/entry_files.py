"""What a cache entry is made of, shared by the local cache and the store: its record file, the
digests of its files, and the error a cache that cannot be used raises."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

META_FILE = "stage.json"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (stage.json excluded), keyed by its relative POSIX path."""
    return {p.relative_to(folder).as_posix(): file_digest(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != META_FILE}


def content_digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:20]


class CacheError(OSError):
    """The cache folder cannot be used (not writable); says which folder and what to do."""
    user_error = True
