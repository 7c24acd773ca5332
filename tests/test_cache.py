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
