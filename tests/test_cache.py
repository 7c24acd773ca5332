"""The stage cache: keys follow settings, inputs and code; outputs appear atomically."""
import subprocess
import sys

from pipeline.cache import Cache, stage_key


def test_key_changes_with_settings_inputs_and_code():
    base = stage_key("train", {"lr": 0.1}, {"data": "abc"}, "code1")
    assert base == stage_key("train", {"lr": 0.1}, {"data": "abc"}, "code1")
    assert base != stage_key("train", {"lr": 0.2}, {"data": "abc"}, "code1")
    assert base != stage_key("train", {"lr": 0.1}, {"data": "abd"}, "code1")
    assert base != stage_key("train", {"lr": 0.1}, {"data": "abc"}, "code2")


def test_entry_exists_only_after_commit(tmp_path):
    cache = Cache(tmp_path)
    tmp = cache.begin("train", "k1")
    (tmp / "model.bin").write_bytes(b"half")
    assert cache.lookup("train", "k1") is None
    entry = cache.commit("train", "k1", tmp, {"facts": {"a": 1}})
    assert cache.lookup("train", "k1") == entry
    assert (entry.path / "model.bin").read_bytes() == b"half"
    assert entry.meta()["facts"] == {"a": 1}
    assert not tmp.exists()


def test_sweep_removes_leftovers_of_dead_runs_only(tmp_path):
    cache = Cache(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = tmp_path / "train" / f".tmp-k1-{dead.pid}-abcdef"
    leftover.mkdir(parents=True)
    mine = cache.begin("train", "k2")  # this live process is writing it
    assert cache.sweep() == 1
    assert not leftover.exists() and mine.exists()


def test_a_changed_added_or_missing_file_is_never_a_cache_hit(tmp_path):
    cache = Cache(tmp_path)
    for what in ("changed", "added", "missing"):
        tmp = cache.begin("export", what)
        (tmp / "model.onnx").write_bytes(b"weights")
        entry = cache.commit("export", what, tmp, {"name": f"export:{what}"})
        fresh = Cache(tmp_path)  # another process: nothing verified yet
        if what == "changed":
            (entry.path / "model.onnx").write_bytes(b"weightz")
        elif what == "added":
            (entry.path / "extra.bin").write_bytes(b"x")
        else:
            (entry.path / "model.onnx").unlink()
        assert fresh.lookup("export", what) is None
        assert not entry.path.exists() and list(tmp_path.glob(f"export/.changed-{what}-*"))
        assert len(fresh.changed) == 1 and f"({what}: " in fresh.changed[0] and f"export:{what}" in fresh.changed[0]


def test_an_unchanged_entry_is_a_hit_in_another_process(tmp_path):
    cache = Cache(tmp_path)
    tmp = cache.begin("train", "k")
    (tmp / "w.bin").write_bytes(b"w")
    cache.commit("train", "k", tmp, {"name": "train:m"})
    fresh = Cache(tmp_path)
    assert fresh.lookup("train", "k") is not None and not fresh.changed


def test_a_volatile_entry_is_read_by_its_run_but_never_a_later_hit(tmp_path):
    cache = Cache(tmp_path)
    tmp = cache.begin("verify", "k")
    (tmp / "records.json").write_text("[]")
    cache.commit("verify", "k", tmp, {"name": "verify:m:tfjs"}, volatile="node is missing")
    assert cache.lookup("verify", "k") is None
    assert cache.lookup("verify", "k", volatile_ok=True).volatile == "node is missing"


def test_a_stage_reruns_when_its_input_is_not_what_it_was_built_from(tmp_path):
    from pipeline.runner import Stage, assign_keys, plan
    cache = Cache(tmp_path)
    up = Stage("export:m:onnx", "export", {}, (), "x:y")
    down = Stage("verify:m:onnx", "verify", {}, (), "x:y", inputs=("export:m:onnx",))
    stages = [up, down]
    assign_keys(stages)
    tmp = cache.begin("export", up.key)
    (tmp / "a").write_text("1")
    first = cache.commit("export", up.key, tmp, {"name": up.name})
    tmp = cache.begin("verify", down.key)
    cache.commit("verify", down.key, tmp, {"name": down.name, "input_content": {up.name: first.content}})
    assert plan(stages, Cache(tmp_path), set()) == {up.name: False, down.name: False}
    tmp = cache.begin("export", up.key)  # the same key, other bytes (a concurrent or forced rebuild)
    (tmp / "a").write_text("2")
    cache.commit("export", up.key, tmp, {"name": up.name})
    assert plan(stages, Cache(tmp_path), set()) == {up.name: False, down.name: True}


def test_an_unwritable_cache_is_refused_before_anything_runs(tmp_path):
    import pytest
    from pipeline.cache import CacheError
    (tmp_path / "cache").write_text("a file, not a folder")
    with pytest.raises(CacheError, match="expected a cache folder this user can write"):
        Cache(tmp_path / "cache").check_writable()


def test_a_key_does_not_depend_on_the_order_settings_were_written_in():
    assert stage_key("train", {"a": 1, "b": 2}, {"x": "1", "y": "2"}, "c") == \
        stage_key("train", {"b": 2, "a": 1}, {"y": "2", "x": "1"}, "c")
    assert stage_key("train", {"a": 1}, {}, "c") != stage_key("export", {"a": 1}, {}, "c")
