"""What a stage's key hashes: the code it can run, found by reading imports (a lazy import counts),
and the versions of the converters, runtimes and frameworks that decide its output; a change to one
reruns the stages it decides and no other."""
import pytest

from pipeline import code_deps, runner, spec as spec_mod
from pipeline.stages import build_stages


def keys() -> dict[str, str]:
    stages = build_stages(spec_mod.load("toy"))
    runner.assign_keys(stages)
    return {s.name: s.key for s in stages}


def code_of(name: str) -> tuple[str, ...]:
    return next(s.code for s in build_stages(spec_mod.load("toy")) if s.name == name)


def test_a_stage_s_code_holds_the_files_its_step_imports_even_inside_a_function():
    # exporters/saved_model.py imports its nobuco route inside a function; tfjs.py its graph repairs
    assert "exporters/nobuco_route.py" in code_of("export:torch:saved_model")
    assert "exporters/tfjs_graph.py" in code_of("export:keras:tfjs")
    assert {"serving/server.py", "exporters/bundle.py"} <= set(code_of("deploy:serving"))
    assert "exporters/js/package-lock.json" in code_of("verify:torch:tfjs")  # the npm runtime's versions
    # the orchestration is not followed: editing the runner or an executor reruns nothing
    assert not any(f.startswith("pipeline/executors/") or f == "pipeline/runner.py"
                   for name in ("train:keras", "export:torch:onnx", "verify:keras:litert", "report")
                   for f in code_of(name))


def test_closure_follows_relative_and_package_imports(tmp_path):
    files = code_deps.closure("serving/deploy.py")
    assert "serving/__init__.py" in files and "parity/compare.py" in files
    assert all((code_deps.PACKAGE_ROOT / f).is_file() for f in files)


def downstream_of(names: set[str]) -> set[str]:
    """`names` and every stage that takes one of them as an input, directly or not."""
    stages = build_stages(spec_mod.load("toy"))
    found = set(names)
    for s in stages:  # upstream first
        if found & set(s.inputs):
            found.add(s.name)
    return found


@pytest.mark.parametrize("package, decides", [
    ("onnxruntime", {"verify:keras:onnx", "verify:torch:onnx"}),
    ("tf2onnx", {"export:keras:onnx"}),
    ("litert-torch", {"export:torch:litert"}),
    ("torch", {"train:torch", "export:torch:onnx", "export:torch:saved_model", "export:torch:torchscript",
               "export:torch:litert", "export:keras:torchscript", "verify:keras:torchscript",
               "verify:torch:torchscript"}),
    ("lightning", set()),  # no stage of toy uses it
])
def test_an_upgraded_package_reruns_the_stages_it_decides_and_what_needs_them(monkeypatch, package, decides):
    before = keys()
    real = code_deps._version.__wrapped__
    code_deps._version.cache_clear()
    monkeypatch.setattr(code_deps, "_version", lambda d: "99.0" if d == package else real(d))
    after = keys()
    assert {n for n in before if before[n] != after[n]} == downstream_of(decides)


def keys_of(path) -> dict[str, str]:
    stages = build_stages(spec_mod.load(str(path)))
    runner.assign_keys(stages)
    return {s.name: s.key for s in stages}


@pytest.mark.parametrize("edit, reads", [
    # a LiteRT batch size is read by the LiteRT export alone: nothing is retrained
    (('litert_batch_sizes = [1, 16]', 'litert_batch_sizes = [1, 8]'), {"export:keras:litert", "export:torch:litert"}),
    # the int8 fallback is the Keras model's LiteRT export's (TFLiteConverter's denylist)
    (('litert_batch_sizes = [1, 16]', 'litert_batch_sizes = [1, 16]\n[export.litert]\nint8_fallback = "auto"'),
     {"export:keras:litert"}),
    # tolerances decide verdicts, not models or artifacts
    (('max_batch = 16', 'max_batch = 16\ntolerances = { fp16 = { atol = 0.5, rtol = 0.5 } }'),
     {f"verify:{m}:{f}" for m in ("keras", "torch") for f in ("saved_model", "torchscript", "onnx", "litert", "tfjs")}
     | {"bundle:keras", "bundle:torch", "report"}),
    # allowing one cell's gap re-judges that cell alone
    (('max_batch = 16', 'max_batch = 16\nallow_unsupported = ["torch/tfjs"]'), {"verify:torch:tfjs"}),
    # a stated signature is checked by the reference stage
    (('train = { optimizer = "sgd" }', 'train = { optimizer = "sgd" }\nsignature = { inputs = { x = "float32" } }'),
     {"reference:torch"}),
])
def test_editing_a_spec_field_reruns_the_stages_that_read_it_and_no_other(tmp_path, edit, reads):
    text = spec_mod.resolve("toy").read_text()
    (tmp_path / "before.toml").write_text(text)
    assert edit[0] in text
    (tmp_path / "after.toml").write_text(text.replace(edit[0], edit[1], 1))
    before, after = keys_of(tmp_path / "before.toml"), keys_of(tmp_path / "after.toml")
    assert {n for n in before if before[n] != after[n]} == downstream_of(reads)


def test_a_stage_carries_its_slice_of_the_spec_and_reading_beyond_it_fails_loudly(tmp_path):
    from pipeline.spec_slice import from_slice
    stage = next(s for s in build_stages(spec_mod.load("toy")) if s.name == "train:keras")
    carried = stage.args["spec"]
    assert isinstance(carried, dict) and [m["name"] for m in carried["models"]] == ["keras"]
    assert stage.settings["spec"] == {k: v for k, v in carried.items() if k != "path"}  # the key hashes it
    spec = from_slice(carried)
    assert spec.seed == 0 and spec.data.task == "regression" and spec.model("keras").train.epochs == 200
    with pytest.raises(RuntimeError, match="spec field parity is read by a stage whose slice does not carry it"):
        spec.parity.tolerances.get("fp32")
    with pytest.raises(RuntimeError, match="model.litert_batch_sizes"):
        list(spec.model("keras").litert_batch_sizes)
