"""Content-addressed stage cache with atomic outputs that vouches only for what it wrote.

An entry lives in CACHE/<kind>/<key>/ and exists only once complete: a stage writes into a private
temporary folder beside it and renames it into place at the end, so a run killed mid-stage leaves
only a `.tmp-*` folder that no later run trusts (and the next run sweeps away).

Each entry's stage.json lists the sha256 of every file the stage wrote. A lookup checks them (once
per process) and refuses an entry whose files were changed, added or removed since: the entry is
moved aside to `.changed-*` for a person to inspect and the stage is rebuilt. An entry marked
volatile (its outcome said something about the machine, not the inputs: a runtime was missing) is
readable by the run that wrote it but is never a cache hit for a later run.

With a store (pipeline/remote_store.py, an S3-compatible bucket several machines share) the local
folder is a working copy: a local miss is pulled from the store into a private `.tmp-*` folder and
renamed into place, then checked like any local entry; a commit is pushed after it lands locally
(never a volatile one). A pulled entry whose files do not match its manifest is refused and rebuilt.
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
from typing import TYPE_CHECKING

# what an entry is made of lives in entry_files.py (the store reads it too); callers import it from here
from .entry_files import META_FILE, CacheError, content_digest, file_digest, folder_digests  # noqa: F401

if TYPE_CHECKING:
    from .remote_store import RemoteStore

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


@dataclass(frozen=True)
class Entry:
    kind: str
    key: str
    path: Path

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    def meta(self) -> dict:
        return json.loads(self.meta_path.read_text())

    @property
    def content(self) -> str:
        """Digest of the files the stage wrote, as recorded when it was committed."""
        return self.meta().get("content", "")

    @property
    def volatile(self) -> str | None:
        return self.meta().get("volatile")


class Cache:
    def __init__(self, root: Path, store: RemoteStore | str | None = None):
        """`store`: a shared copy on an object store, or its s3:// URI; None or "" keeps the cache local."""
        self.root = root
        if isinstance(store, str):
            from .remote_store import RemoteStore
            store = RemoteStore(store) if store.strip() else None
        self.store = store
        self._verified: set[Path] = set()
        self.changed: list[str] = []   # one line per entry found changed and moved aside in this process

    def entry(self, kind: str, key: str) -> Entry:
        return Entry(kind, key, self.root / kind / key)

    def lookup(self, kind: str, key: str, *, volatile_ok: bool = False) -> Entry | None:
        """The committed, unchanged entry for (kind, key), else None.

        `volatile_ok`: also accept an entry marked volatile (the run that wrote it reads its own outputs).
        """
        entry = self.entry(kind, key)
        try:
            meta = entry.meta()
        except (OSError, ValueError):
            if not self._pull(kind, key):
                return None
            try:
                meta = entry.meta()
            except (OSError, ValueError):
                return None
        if meta.get("volatile") and not volatile_ok:
            return None
        if entry.path in self._verified:
            return entry
        problem = self._changed_files(entry, meta)
        if problem:
            self._move_aside(entry, meta, problem)
            return None
        self._verified.add(entry.path)
        return entry

    def _pull(self, kind: str, key: str) -> bool:
        """Fetch (kind, key) from the store into place; False when the store lacks it or refuses it."""
        if self.store is None:
            return False
        from .remote_store import UntrustedEntry
        tmp = self.begin(kind, key)  # private until complete, like a stage's outputs
        try:
            manifest = self.store.pull(kind, key, tmp)
        except UntrustedEntry as e:
            self.abandon(tmp)
            self.changed.append(f"{e}; not using it; rebuilding it")
            return False
        except BaseException:
            self.abandon(tmp)
            raise
        if manifest is None:
            self.abandon(tmp)
            return False
        self._move_into_place(tmp, self.entry(kind, key).path)
        return True

    @staticmethod
    def _move_into_place(tmp: Path, path: Path) -> None:
        if path.exists() and not (path / META_FILE).exists():  # a stale entry without stage.json
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / META_FILE).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process put the same entry there first

    @staticmethod
    def _changed_files(entry: Entry, meta: dict) -> str | None:
        recorded = meta.get("files")
        if recorded is None:
            return "its stage.json records no file digests (written by an older version)"
        found = folder_digests(entry.path)
        changed = sorted(f for f in recorded if f in found and found[f] != recorded[f])
        missing = sorted(set(recorded) - set(found))
        added = sorted(set(found) - set(recorded))
        parts = [f"{what}: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}"
                 for what, files in (("changed", changed), ("missing", missing), ("added", added)) if files]
        return "; ".join(parts) or None

    def _move_aside(self, entry: Entry, meta: dict, problem: str) -> None:
        aside = entry.path.parent / f".changed-{entry.key}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        try:
            os.rename(entry.path, aside)
            where = f"moved aside to {aside}"
        except OSError as e:
            where = f"could not be moved aside ({e})"
        self.changed.append(f"cache entry {meta.get('name', entry.kind)} (key {entry.key[:10]}) was changed "
                            f"since it was written ({problem}); {where}; rebuilding it")

    def check_writable(self) -> None:
        """Refuse, before anything runs, a cache this process cannot write to (and a store it cannot reach)."""
        probe = self.root / f".probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise CacheError(f"{self.root}: expected a cache folder this user can write, found "
                             f"{'no folder' if not self.root.is_dir() else 'one it cannot write'} "
                             f"({e.strerror or e}); fix its permissions or set PIPELINE_HOME to another "
                             f"folder") from None
        if self.store is not None:
            self.store.check()

    def begin(self, kind: str, key: str) -> Path:
        """A fresh private folder to write a stage's outputs into."""
        tmp = self.root / kind / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            raise CacheError(f"{tmp.parent}: expected a cache folder this user can write ({e.strerror or e}); "
                             f"fix its permissions or set PIPELINE_HOME to another folder") from None
        return tmp

    def commit(self, kind: str, key: str, tmp: Path, meta: dict, volatile: str | None = None) -> Entry:
        """Record the digest of every file, write stage.json last, then move the folder into place."""
        files = folder_digests(tmp)
        record = {**meta, "key": key, "kind": kind, "finished": time.time(), "files": files,
                  "content": content_digest(files)}
        if volatile:
            record["volatile"] = volatile
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, default=str))
        entry = self.entry(kind, key)
        if entry.path.exists():  # a stale entry without stage.json, or one a forced run replaces
            shutil.rmtree(entry.path, ignore_errors=True)
        os.rename(tmp, entry.path)
        self._verified.add(entry.path)
        self.publish(kind, key)
        return entry

    def publish(self, kind: str, key: str) -> None:
        """Push a committed entry to the store, if there is one. Also for entries another process of
        this run committed (an executor's worker writes locally; the runner shares what it wrote)."""
        if self.store is None:
            return
        entry = self.entry(kind, key)
        if not entry.meta_path.is_file():  # committed in another machine's cache, which pushed it itself
            return
        if entry.volatile:  # its outcome said something about this machine, not the inputs
            return
        self.store.push(kind, key, entry.path)

    def abandon(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    def sweep(self, older_than_s: float = 0.0) -> int:
        """Remove temporary folders that killed runs left behind."""
        removed = 0
        if not self.root.exists():
            return 0
        for kind_dir in self.root.iterdir():
            if not kind_dir.is_dir():
                continue
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
