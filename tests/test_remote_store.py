"""The stage cache shared through an S3-compatible store: what one machine commits another reuses, and
nothing in the store is trusted that does not match its manifest. Runs against moto's S3 server on
loopback (tests/conftest.py), started once for the session."""
import hashlib
import json
import os
import socket
import threading
from pathlib import Path

import pytest

from pipeline.cache import Cache
from pipeline.remote_store import RemoteStore, StoreError
from pipeline.runner import Stage, execute

ME = f"{__name__}"


def s3():
    import boto3
    return boto3.client("s3")


def bucket_of(uri: str) -> str:
    return uri.removeprefix("s3://").split("/")[0]


def stored(uri: str, under: str) -> dict[str, bytes]:
    """Every object under PREFIX/<under>, by its name below the prefix."""
    bucket, prefix = bucket_of(uri), uri.removeprefix("s3://").split("/", 1)[1]
    listed = s3().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{under}").get("Contents", [])
    return {o["Key"].removeprefix(prefix + "/"): s3().get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for o in listed}


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def commit(cache: Cache, kind: str, key: str, files: dict[str, bytes], volatile: str | None = None):
    tmp = cache.begin(kind, key)
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    return cache.commit(kind, key, tmp, {"name": kind, "facts": {}}, volatile=volatile)


# -- a small graph of plain Python stages (no framework), as in tests/test_executors.py --------------
def add_number(ctx, n: int) -> dict:
    base = sum(json.loads((ctx.input_dir(name) / "n.json").read_text()) for name in ctx.inputs)
    (ctx.out / "n.json").write_text(json.dumps(base + n))
    return {"n": base + n, "pid": os.getpid()}


def graph(lane: str | None = "plain") -> list[Stage]:
    code = ("tests/test_remote_store.py",)
    return [Stage("a", "one", {"n": 1}, code, f"{ME}:add_number", {"n": 1}, lane=lane),
            Stage("b", "two", {"n": 2}, code, f"{ME}:add_number", {"n": 2}, inputs=("a",), lane=lane),
            Stage("c", "three", {"n": 3}, code, f"{ME}:add_number", {"n": 3}, inputs=("b",), lane=lane),
            Stage("d", "four", {"n": 4}, code, f"{ME}:add_number", {"n": 4}, lane=lane)]


def run_graph(root: Path, uri: str, executor: str = "inprocess") -> dict:
    results = execute(graph(), Cache(root / "cache", store=uri), set(), executor=executor, log_dir=root / "logs")
    return {r.name: r for r in results}


# -- the tests ----------------------------------------------------------------------------------------
def test_a_pushed_entry_pulls_into_a_fresh_cache_with_identical_files(tmp_path, store_uri):
    files = {"model.bin": os.urandom(3000), "nested/deeper/weights.npy": os.urandom(100),
             "copy.bin": b"same bytes", "other/copy.bin": b"same bytes"}
    written = commit(Cache(tmp_path / "one", store=store_uri), "train", "k1", files)

    fresh = Cache(tmp_path / "two", store=store_uri)
    entry = fresh.lookup("train", "k1")
    assert entry is not None and files_of(entry.path) == files_of(written.path)
    assert entry.meta() == written.meta()
    # the layout: one manifest, and each distinct file once under its sha256
    assert list(stored(store_uri, "entries")) == ["entries/train/k1.json"]
    blobs = stored(store_uri, "objects")
    assert blobs == {f"objects/{hashlib.sha256(b).hexdigest()}": b for b in files.values()}
    assert not fresh.changed and not list((tmp_path / "two" / "train").glob(".tmp-*"))


def test_a_second_machine_finds_every_stage_cached_through_the_store(tmp_path, store_uri):
    # the first machine's lane stages run in a worker process; the runner shares what it committed
    first = run_graph(tmp_path / "first", store_uri, executor="local")
    assert not any(r.cached for r in first.values())
    second = run_graph(tmp_path / "second", store_uri)
    assert all(r.cached for r in second.values()), {n: r.cached for n, r in second.items()}
    assert {n: r.facts for n, r in second.items()} == {n: r.facts for n, r in first.items()}
    assert len(stored(store_uri, "entries")) == 4


def test_a_volatile_entry_is_never_pushed(tmp_path, store_uri):
    commit(Cache(tmp_path / "one", store=store_uri), "verify", "k1", {"v.json": b"{}"}, volatile="node missing")
    assert stored(store_uri, "") == {}
    assert Cache(tmp_path / "two", store=store_uri).lookup("verify", "k1", volatile_ok=True) is None


def test_a_blob_changed_in_the_store_is_refused_and_the_stage_rebuilt(tmp_path, store_uri, capsys):
    run_graph(tmp_path / "first", store_uri)
    sha = hashlib.sha256(b"1").hexdigest()  # stage a's n.json
    name = f"team/objects/{sha}"
    s3().put_object(Bucket=bucket_of(store_uri), Key=name, Body=b"1000")

    second = run_graph(tmp_path / "second", store_uri)
    assert not second["a"].cached and second["a"].facts["n"] == 1  # rebuilt, not the store's 1000
    shown = capsys.readouterr().out
    assert "entry one/" in shown and "file n.json was changed in the store" in shown, shown
    # the bad blob was kept aside for a person, and the rebuild re-uploaded the right bytes
    assert list(stored(store_uri, "changed").values()) == [b"1000"]
    assert stored(store_uri, f"objects/{sha}") == {f"objects/{sha}": b"1"}
    third = run_graph(tmp_path / "third", store_uri)
    assert all(r.cached for r in third.values())


def test_a_manifest_without_its_blobs_is_not_trusted(tmp_path, store_uri):
    commit(Cache(tmp_path / "one", store=store_uri), "train", "k1", {"model.bin": b"weights", "log.txt": b"ok"})
    s3().delete_object(Bucket=bucket_of(store_uri), Key=f"team/objects/{hashlib.sha256(b'weights').hexdigest()}")

    fresh = Cache(tmp_path / "two", store=store_uri)
    assert fresh.lookup("train", "k1") is None
    assert len(fresh.changed) == 1 and "file model.bin is missing from the store" in fresh.changed[0]
    assert not list((tmp_path / "two" / "train").iterdir()), "an incomplete pull left files behind"
    # rebuilding it (same bytes) completes the store again
    commit(fresh, "train", "k1", {"model.bin": b"weights", "log.txt": b"ok"})
    assert Cache(tmp_path / "three", store=store_uri).lookup("train", "k1") is not None


def test_a_writer_killed_before_its_manifest_leaves_nothing_trusted(tmp_path, store_uri, monkeypatch):
    killed = RuntimeError("killed")
    uploads = []

    def upload_then_die(self, path, sha, entry):
        if uploads:
            raise killed  # dies during its second file
        uploads.append(path.name)
        original(self, path, sha, entry)

    original = RemoteStore._upload_blob
    with monkeypatch.context() as patched, pytest.raises(RuntimeError, match="killed"):
        patched.setattr(RemoteStore, "_upload_blob", upload_then_die)
        commit(Cache(tmp_path / "one", store=store_uri), "train", "k1", {"a.bin": b"A", "b.bin": b"B"})

    assert uploads and stored(store_uri, "entries") == {}, "a manifest was written before all its blobs"
    fresh = Cache(tmp_path / "two", store=store_uri)
    assert fresh.lookup("train", "k1") is None and not fresh.changed


def test_two_writers_of_one_key_leave_a_valid_entry(tmp_path, store_uri, monkeypatch):
    """Two machines build the same stage at once, to different bytes (training is not bit-exact). Writer
    one stalls after its first file until writer two has finished, then completes: its manifest lands
    last, over files writer two uploaded in between. A reader must find a complete, consistent entry."""
    original = RemoteStore._upload_blob
    two_done, one_started = threading.Event(), threading.Event()

    def stalling_upload(self, path, sha, entry):
        original(self, path, sha, entry)
        if "one" in path.parts and not one_started.is_set():
            one_started.set()
            assert two_done.wait(30)

    monkeypatch.setattr(RemoteStore, "_upload_blob", stalling_upload)
    outputs = {name: {f"part{i}.bin": f"{name} {i}".encode() * 500 for i in range(4)} for name in ("one", "two")}
    errors = []

    def write(name: str) -> None:
        try:
            if name == "two":
                assert one_started.wait(30)
            commit(Cache(tmp_path / name, store=store_uri), "train", "k1", outputs[name])
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)
        finally:
            if name == "two":
                two_done.set()

    writers = [threading.Thread(target=write, args=(n,)) for n in ("one", "two")]
    for t in writers:
        t.start()
    for t in writers:
        t.join(60)
    assert not errors, errors

    reader = Cache(tmp_path / "reader", store=store_uri)
    entry = reader.lookup("train", "k1")
    assert entry is not None, reader.changed
    found = {k: v for k, v in files_of(entry.path).items() if k != "stage.json"}
    assert found == outputs["one"]  # the last manifest wins, whole


def test_two_processes_pulling_into_one_folder_both_get_the_entry(tmp_path, store_uri):
    commit(Cache(tmp_path / "writer", store=store_uri), "train", "k1", {f"f{i}": os.urandom(20000) for i in range(8)})
    results, start = [], threading.Barrier(4)

    def read() -> None:
        cache = Cache(tmp_path / "shared", store=store_uri)
        start.wait()
        results.append(cache.lookup("train", "k1"))

    readers = [threading.Thread(target=read) for _ in range(4)]
    for t in readers:
        t.start()
    for t in readers:
        t.join(60)
    assert len(results) == 4 and all(e is not None for e in results)
    assert not list((tmp_path / "shared" / "train").glob(".tmp-*"))


def test_a_missing_bucket_is_a_clear_usage_error(tmp_path, store_uri):
    cache = Cache(tmp_path / "cache", store="s3://no-such-bucket/team")
    with pytest.raises(StoreError) as e:
        cache.check_writable()
    assert e.value.user_error
    assert "s3://no-such-bucket/team: expected an existing bucket 'no-such-bucket'" in str(e.value)
    with pytest.raises(StoreError, match="expected an existing bucket"):
        commit(cache, "train", "k1", {"f": b"x"})


def test_an_endpoint_that_does_not_answer_and_a_bad_uri_are_clear_errors(tmp_path, store_uri, monkeypatch):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(StoreError) as e:
        Cache(tmp_path / "cache", store=store_uri).lookup("train", "k1")
    assert f"{store_uri}: expected an S3-compatible endpoint answering at http://127.0.0.1:{port}" in str(e.value)
    with pytest.raises(StoreError, match="expected s3://BUCKET or s3://BUCKET/PREFIX"):
        Cache(tmp_path / "cache", store="https://example.invalid/bucket")


def test_without_a_store_the_cache_stays_local(tmp_path, store_uri):
    cache = Cache(tmp_path / "cache")
    assert cache.store is None and Cache(tmp_path / "c2", store="").store is None
    commit(cache, "train", "k1", {"f": b"x"})
    assert stored(store_uri, "") == {}


def test_the_command_line_refuses_a_store_it_cannot_use_before_anything_runs(tmp_path, store_uri):
    from .conftest import run_cli
    r = run_cli("run", "toy", "--no-track", home=tmp_path, env={"PIPELINE_STORE": "s3://no-such-bucket/team"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "expected an existing bucket 'no-such-bucket'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list((tmp_path / ".pipeline" / "cache").rglob("stage.json"))  # nothing ran
