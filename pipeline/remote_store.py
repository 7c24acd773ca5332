"""A shared copy of the stage cache on an S3-compatible object store, so several machines reuse one
another's stages with the same guarantees as the local cache.

Layout under s3://BUCKET/PREFIX:

    objects/<sha256>            every file once, named by the sha256 of its bytes
    entries/<kind>/<key>.json   an entry's manifest: its stage.json, listing each file's sha256

The manifest is written last, in one PUT, after all its blobs are uploaded: it is the commit marker.
A writer killed before it leaves only blobs, which no manifest names and nobody trusts. Two writers
of one key each upload complete blobs before their own manifest, and a blob's name is its content,
so whichever manifest lands last names blobs that are all there and all right.

A reader trusts nothing it downloads: each file is re-hashed against the manifest, and a blob whose
bytes do not match (changed in the store) or that is missing is refused, like a changed local file.

The endpoint and credentials come from boto3's standard settings (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws/config); boto3 is imported only when used.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from pathlib import Path, PurePosixPath

from .entry_files import META_FILE, CacheError, file_digest

STORE_ENV = "PIPELINE_STORE"
_CHUNK = 1 << 20


class StoreError(CacheError):
    """The store cannot be used (bad URI, no bucket, no endpoint, no credentials); says which and what to do.
    A CacheError, so the command line reports it as a usage error (exit 2) without a traceback."""


class UntrustedEntry(Exception):
    """A stored entry that must not be used: a file's bytes differ from its manifest, or a blob is missing."""


class RemoteStore:
    def __init__(self, uri: str):
        uri = uri.strip()
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not uri.startswith("s3://") or not bucket:
            raise StoreError(f"store {uri!r} (from {STORE_ENV} or the caller): expected s3://BUCKET or "
                             f"s3://BUCKET/PREFIX")
        self.uri = uri.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = None
        self._client_lock = threading.Lock()  # boto3's session is not thread-safe; its clients are

    def __repr__(self) -> str:
        return f"RemoteStore({self.uri!r})"

    # -- names --------------------------------------------------------------------------------------
    def _name(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def blob_name(self, sha256: str) -> str:
        return self._name("objects", sha256)

    def manifest_name(self, kind: str, key: str) -> str:
        return self._name("entries", kind, f"{key}.json")

    # -- the two operations -------------------------------------------------------------------------
    def push(self, kind: str, key: str, folder: Path) -> None:
        """Upload a committed entry: its files as blobs (those not already there), then its manifest."""
        manifest = json.loads((folder / META_FILE).read_text())
        for rel, sha in sorted(manifest["files"].items()):
            if self._exists(self.blob_name(sha)):
                continue
            self._upload_blob(folder / rel, sha, f"{kind}/{key}")
        self._call("writing the manifest of", kind, key, "put_object", Bucket=self.bucket,
                   Key=self.manifest_name(kind, key), Body=json.dumps(manifest, indent=2).encode(),
                   ContentType="application/json")

    def pull(self, kind: str, key: str, dest: Path) -> dict | None:
        """Download the entry into `dest` (an empty private folder) and return its manifest; None when
        the store has no manifest for it. Raises UntrustedEntry when a file is missing or changed."""
        what = f"{self.uri} entry {kind}/{key}"
        body = self._get(self.manifest_name(kind, key), kind, key)
        if body is None:
            return None
        try:
            manifest = json.loads(body.read())
            files = manifest["files"]
            if not isinstance(files, dict):
                raise TypeError("files is not a mapping")
        except (ValueError, KeyError, TypeError):
            raise UntrustedEntry(f"{what}: expected a manifest listing its files' sha256, found an unreadable "
                                 f"one at {self.manifest_name(kind, key)}") from None
        for rel, sha in sorted(files.items()):
            if not _is_sha256(sha):
                raise UntrustedEntry(f"{what}: expected a sha256 for file {rel} in its manifest, found {sha!r}")
            target = dest / _safe_relative(rel, what)
            target.parent.mkdir(parents=True, exist_ok=True)
            blob = self._get(self.blob_name(sha), kind, key)
            if blob is None:
                raise UntrustedEntry(f"{what}: file {rel} is missing from the store (expected blob "
                                     f"{self.blob_name(sha)}, found none); the entry is incomplete")
            found = _write_hashing(blob, target)
            if found != sha:
                raise UntrustedEntry(f"{what}: file {rel} was changed in the store (expected sha256 "
                                     f"{sha[:12]}..., found {found[:12]}...); {self._move_blob_aside(sha)}")
        (dest / META_FILE).write_text(json.dumps(manifest, indent=2))
        return manifest

    def check(self) -> None:
        """Refuse, before anything runs, a store whose endpoint does not answer or whose bucket is missing."""
        self._call("reaching", "", "", "head_bucket", Bucket=self.bucket)

    # -- S3 calls, with errors that name the store --------------------------------------------------
    @property
    def client(self):
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config
                # a dead endpoint should fail in seconds, not after boto3's default minutes of retries
                config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"})
                self._client = boto3.session.Session().client("s3", config=config)
            return self._client

    def _exists(self, name: str) -> bool:
        return self._call("checking", "", name, "head_object", Bucket=self.bucket, Key=name) is not None

    def _get(self, name: str, kind: str, key: str):
        """The streaming body of object `name`, or None when there is none."""
        response = self._call("reading", kind, key, "get_object", Bucket=self.bucket, Key=name)
        return None if response is None else response["Body"]

    def _upload_blob(self, path: Path, sha: str, entry: str) -> None:
        # hash what is uploaded, so a file changed since its commit never lands under another's name
        found = file_digest(path)
        if found != sha:
            raise UntrustedEntry(f"local entry {entry}: file {path.name} changed after it was committed "
                                 f"(expected sha256 {sha[:12]}..., found {found[:12]}...); not uploading it")
        kind, _, key = entry.partition("/")
        # one PUT (up to 5 GB): the object appears whole or not at all, and errors stay ClientErrors
        with open(path, "rb") as body:
            self._call("uploading a file of", kind, key, "put_object", Bucket=self.bucket,
                       Key=self.blob_name(sha), Body=body)

    def _move_blob_aside(self, sha: str) -> str:
        """Keep a changed blob for a person to look at, and free its name so the next push re-uploads it
        (a push skips blobs already there). Says where it went, or why it could not (read-only credentials)."""
        aside = self._name("changed", f"{sha}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")
        name = self.blob_name(sha)
        try:
            self._call("moving aside", "", name, "copy_object", Bucket=self.bucket, Key=aside,
                       CopySource={"Bucket": self.bucket, "Key": name})
            self._call("moving aside", "", name, "delete_object", Bucket=self.bucket, Key=name)
        except StoreError as e:
            return f"its blob could not be moved aside ({e}), so a rebuild will not repair the store"
        return f"its blob was moved aside to {aside}"

    def _call(self, doing: str, kind: str, key: str, method: str, *args, **kwargs):
        """Call the client; None for a missing object, StoreError naming the store for everything else."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
        what = f"{kind}/{key}" if kind else key
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code == "NoSuchBucket" or (method == "head_bucket" and code == "404"):
                raise StoreError(f"{self.uri}: expected an existing bucket {self.bucket!r} at "
                                 f"{self.endpoint}, found none; create it or point {STORE_ENV} elsewhere") from None
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreError(f"{self.uri}: {doing} {what or 'the bucket'} was refused ({code}); expected "
                                 f"credentials that may read and write the bucket (AWS_ACCESS_KEY_ID, "
                                 f"AWS_SECRET_ACCESS_KEY)") from None
            raise StoreError(f"{self.uri}: {doing} {what or 'the bucket'} failed at {self.endpoint}: "
                             f"{code or e}") from None
        except NoCredentialsError:
            raise StoreError(f"{self.uri}: expected credentials for the store, found none; set "
                             f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        except BotoCoreError as e:  # endpoint down, DNS, timeouts
            raise StoreError(f"{self.uri}: expected an S3-compatible endpoint answering at {self.endpoint}, "
                             f"found no answer while {doing} {what or 'the bucket'} ({e}); check "
                             f"AWS_ENDPOINT_URL") from None

    @property
    def endpoint(self) -> str:
        try:
            return self.client.meta.endpoint_url
        except Exception:  # noqa: BLE001  (only for a message)
            return "the configured endpoint"


def _safe_relative(rel: str, what: str) -> PurePosixPath:
    """A manifest comes from a shared store: refuse a path that would land outside the entry."""
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts or not path.parts or str(path) == META_FILE:
        raise UntrustedEntry(f"{what}: expected file paths inside the entry, found {rel!r} in its manifest")
    return path


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _write_hashing(body, target: Path) -> str:
    h = hashlib.sha256()
    with open(target, "wb") as f:
        for block in iter(lambda: body.read(_CHUNK), b""):
            h.update(block)
            f.write(block)
    return h.hexdigest()

