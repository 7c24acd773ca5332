"""Spec validation: every bad spec stops early with exit code 2 and says file, key and expectation."""
import subprocess
import sys
import textwrap

import pytest

from pipeline import spec as spec_mod
from pipeline.spec import SpecError

from .conftest import ROOT, run_cli

GOOD = """
[pipeline]
name = "mine"

[data]
source = "linear"
task = "regression"

[train]
optimizer = "sgd"
lr = 0.1
epochs = 3
loss = "mse"

[[model]]
name = "m"
framework = "torch"
factory = "pipeline.zoo:linear_torch"
"""


def write(tmp_path, text, name="spec.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_builtin_specs_load():
    for name, styles in (("toy", {"keras", "torch"}), ("digits", {"keras", "torch", "flax"})):
        s = spec_mod.load(name)
        assert {m.framework for m in s.models} == styles
    toy = spec_mod.load("toy")
    assert toy.model("keras").train.optimizer == "adam" and toy.model("torch").train.optimizer == "sgd"
    assert toy.model("keras").train.epochs == 200 and toy.model("keras").train.lr == 0.1


def test_unknown_spec_name_lists_builtins():
    with pytest.raises(SpecError, match=r"unknown spec 'nope'.*digits, styles, toy"):
        spec_mod.load("nope")


def test_malformed_toml_names_file_and_line(tmp_path):
    p = write(tmp_path, GOOD + "\n[broken\n")
    with pytest.raises(SpecError) as e:
        spec_mod.load(str(p))
    assert str(p) in str(e.value) and "line" in str(e.value)


@pytest.mark.parametrize("old,new,needle", [
    ('name = "mine"', 'name = "mine"\ncolour = "red"', "pipeline.colour: expected one of the known keys"),
    ('lr = 0.1', 'lr = "fast"', "train.lr: expected float, found 'fast'"),
    ('framework = "torch"', 'framework = "mxnet"',
     "model[0].framework: expected one of fastai, flax, jax, keras, keras_jax, keras_torch, lightning, tensorflow, torch, found 'mxnet'"),
    ('factory = "pipeline.zoo:linear_torch"', 'factory = "no_such_module:build"',
     "model[0].factory: expected an importable module 'no_such_module'"),
    ('factory = "pipeline.zoo:linear_torch"', 'factory = "pipeline.zoo"', "expected 'module:function'"),
    ('epochs = 3', 'epochs = -3', "train.epochs: expected a positive number"),
    ('source = "linear"', 'source = "csv"', "data.source: expected one of linear, digits, npz"),
    ('factory = "pipeline.zoo:linear_torch"', 'factory = "pipeline.zoo:linear_torch"\n[export.litert]\nint8_fallback = "sometimes"',
     'export.litert.int8_fallback: expected "auto" or "off", found \'sometimes\''),
    ('factory = "pipeline.zoo:linear_torch"', 'factory = "pipeline.zoo:linear_torch"\n[gate]\nmax_size_ratio = 1.5',
     "gate.baseline: expected the alias to compare with"),
    ('factory = "pipeline.zoo:linear_torch"', 'factory = "pipeline.zoo:linear_torch"\n[gate]\nbaseline = "production"'
                                              '\nmax_metric_drop = -1', "gate.max_metric_drop: expected a number >= 0"),
    ('factory = "pipeline.zoo:linear_torch"',
     'factory = "pipeline.zoo:linear_torch"\n[export.litert]\nint8_fallback = "auto"\nint8_max_float_layers = 0',
     "export.litert.int8_max_float_layers: expected a positive integer, found 0"),
    ('factory = "pipeline.zoo:linear_torch"', 'factory = "pipeline.zoo:linear_torch"\n[tracking]\nuri = "team-server"',
     'tracking.uri: expected a tracking URI such as "http://127.0.0.1:5000"'),
    ('factory = "pipeline.zoo:linear_torch"', 'factory = "pipeline.zoo:linear_torch"\n[tracking]\nserver = "x"',
     "tracking.server: expected one of the known keys"),
])
def test_bad_values_name_the_key(tmp_path, old, new, needle):
    p = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(SpecError) as e:
        spec_mod.load(str(p))
    assert str(p) in str(e.value)
    assert needle in str(e.value)


def test_missing_required_key(tmp_path):
    p = write(tmp_path, GOOD.replace('epochs = 3\n', ''))
    with pytest.raises(SpecError, match=r"model\[0\]\.train\.epochs: required key is missing"):
        spec_mod.load(str(p))


def test_cli_exits_2_without_importing_frameworks(tmp_path):
    p = write(tmp_path, GOOD.replace('framework = "torch"', 'framework = "mxnet"'))
    code = ("import sys; from pipeline.cli import main; rc = main(['run', %r]); "
            "heavy = [m for m in ('tensorflow', 'torch', 'keras', 'mlflow') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)" % str(p))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "HEAVY []" in r.stdout
    assert "model[0].framework" in r.stderr


@pytest.mark.cli
def test_cli_unknown_spec_exit_code(tmp_path):
    r = run_cli("run", "nope", home=tmp_path)
    assert r.returncode == 2
    assert "toy" in r.stderr and "digits" in r.stderr


def test_help_imports_nothing_heavy():
    code = ("import sys; from pipeline.cli import build_parser; build_parser().format_help(); "
            "print([m for m in ('tensorflow', 'torch', 'keras', 'mlflow', 'numpy') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_unknown_tolerance_override_is_refused_early(tmp_path):
    p = write(tmp_path, GOOD + "\n[parity.tolerances]\nlitert-int4 = { atol = 0.1 }\n")
    with pytest.raises(SpecError, match=r"parity.tolerances: expected valid tolerance overrides.*litert-int4"):
        spec_mod.load(str(p))


def test_tolerance_override_with_unknown_field_is_refused(tmp_path):
    p = write(tmp_path, GOOD + "\n[parity.tolerances]\nfp16 = { atoll = 0.1 }\n")
    with pytest.raises(SpecError, match="parity.tolerances"):
        spec_mod.load(str(p))


@pytest.mark.parametrize("table,where", [
    ("[pipeline]", "pipeline"), ("[data]", "data"), ("[train]", "train"), ("[[model]]", "model[0]"),
    ("[export]", "export"), ("[parity]", "parity"),
])
def test_unknown_keys_are_refused_in_every_table(tmp_path, table, where):
    text = GOOD if table in GOOD else GOOD + f"\n{table}\n"
    p = write(tmp_path, text.replace(table, f"{table}\ncolour = \"red\"", 1))
    with pytest.raises(SpecError) as e:
        spec_mod.load(str(p))
    assert f"{where}.colour: expected one of the known keys" in str(e.value)


def test_unknown_keys_are_refused_in_a_models_own_train_table(tmp_path):
    p = write(tmp_path, GOOD.replace('factory = "pipeline.zoo:linear_torch"',
                                     'factory = "pipeline.zoo:linear_torch"\ntrain = { colour = "red" }'))
    with pytest.raises(SpecError, match=r"model\[0\]\.train\.colour: expected one of the known keys"):
        spec_mod.load(str(p))


def test_allow_unsupported_names_cells_of_the_spec(tmp_path):
    ok = write(tmp_path, GOOD + '\n[export]\nformats = ["onnx", "litert"]\n[parity]\nallow_unsupported = ["m/litert-int8", "m/onnx"]\n')
    p = spec_mod.load(str(ok)).parity
    assert p.allows_unsupported("m", "litert", "int8") and p.allows_unsupported("m", "onnx", "fp32")
    assert not p.allows_unsupported("m", "litert", "fp32")
    bad = write(tmp_path, GOOD + '\n[export]\nformats = ["onnx"]\n[parity]\nallow_unsupported = ["m/tfjs"]\n',
                name="bad.toml")
    with pytest.raises(SpecError, match=r"parity.allow_unsupported: expected cells such as .*found 'm/tfjs'"):
        spec_mod.load(str(bad))


def test_a_failed_converter_is_unsupported_with_what_to_do_unless_the_spec_allows_it(tmp_path):
    from parity.report import ParityReport, print_table
    from pipeline.steps.verify import unsupported_record
    text = GOOD + '\n[export]\nformats = ["onnx", "litert"]\n'
    strict = spec_mod.load(str(write(tmp_path, text)))
    rec = unsupported_record(strict, strict.model("m"), "litert", "int8", "ValueError: op FFT is not supported")
    assert rec.failed and rec.details["outcome"] == "unsupported"
    assert "op FFT is not supported" in rec.error and '"m/litert-int8" under [parity] allow_unsupported' in rec.error
    assert "drop litert from export.formats" in rec.error
    assert "UNSUPPORTED" in print_table(ParityReport(records=[rec]))
    allowing = spec_mod.load(str(write(tmp_path, text + '[parity]\nallow_unsupported = ["m/litert"]\n', "a.toml")))
    rec = unsupported_record(allowing, allowing.model("m"), "litert", "int8", "ValueError: op FFT is not supported")
    assert rec.status == "skipped" and rec.skip == "not-produced" and "allowed by the spec" in rec.reason


def test_a_spec_names_its_tracking_server_unless_the_user_named_one(tmp_path, monkeypatch):
    from pipeline import tracking
    p = write(tmp_path, GOOD + '\n[tracking]\nuri = "http://127.0.0.1:5999"\n')
    spec = spec_mod.load(str(p))
    assert spec.tracking_uri == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking.pointed_at(spec.tracking_uri):
        assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5999"
    assert tracking.tracking_uri(tmp_path).startswith("sqlite:///")  # only for the length of the run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5111")  # --tracking-uri sets this: it wins
    with tracking.pointed_at(spec.tracking_uri):
        assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5111"
