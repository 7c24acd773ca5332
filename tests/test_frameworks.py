"""The frameworks/ package: one module per framework, what each declares, and the spec's refusals
(unknown framework, missing packages, callbacks that make no sense), all without importing a framework."""
import importlib.util
import subprocess
import sys
import textwrap

import pytest

import exporters
import frameworks
from pipeline.spec import SpecError, load

from .conftest import ROOT, run_cli

DECLARED = ("NAME", "FAMILY", "LANE", "PACKAGES", "INSTALL", "PRETRAINED_SUFFIXES", "FLAVOR", "Adapter")
ADAPTER_METHODS = ("check", "build", "train", "predict", "signature", "save", "load", "load_pretrained",
                   "save_pretrained", "perturbed", "mlflow_form")


def test_every_style_is_one_module_that_declares_what_the_pipeline_and_exporters_need():
    assert set(frameworks.names()) == {"tensorflow", "keras", "keras_jax", "keras_torch", "torch", "lightning",
                                       "fastai", "jax", "flax"}
    for name in frameworks.names():
        mod = frameworks.module(name)
        missing = [a for a in DECLARED if not hasattr(mod, a)]
        assert not missing, f"frameworks/{name}.py lacks {missing}"
        assert mod.NAME == name
        assert mod.LANE in ("tensorflow", "torch") or getattr(mod, "LANE_ENVIRONMENT", None), name
        assert all(callable(getattr(mod.Adapter, m, None)) for m in ADAPTER_METHODS), name
        for fmt in exporters.FORMATS:  # every exporter has a route (or a stated refusal) for the family
            module = exporters.module(fmt)
            assert mod.FAMILY in module.REQUIRES and mod.FAMILY in module.LANE, (name, fmt)
    # Lightning and fastai models are torch modules to every exporter
    assert frameworks.family("lightning") == frameworks.family("fastai") == "torch"


def test_reading_the_declarations_imports_no_framework():
    code = ("import sys, frameworks; [frameworks.module(n).FAMILY for n in frameworks.names()]; "
            "print([m for m in ('tensorflow', 'torch', 'keras', 'jax', 'flax', 'lightning', 'fastai') "
            "if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_no_module_outside_frameworks_names_a_style():
    """A new style is one file: the pipeline dispatches on frameworks/' declarations and the exporters on
    families ("jax" is a family there), never on a style's name."""
    names = {"pipeline": ('"lightning"', '"fastai"', '"jax"', '"flax"'),
             "exporters": ('"lightning"', '"fastai"', '"flax"')}
    wrong = [f"{path.relative_to(ROOT)} names {name}" for package, styles in names.items()
             for path in sorted((ROOT / package).glob("*.py")) for name in styles if name in path.read_text()]
    assert not wrong, wrong


def spec(tmp_path, model: str, train: str = "") -> str:
    path = tmp_path / "spec.toml"
    path.write_text(textwrap.dedent(f"""
        [pipeline]
        name = "fw"
        [data]
        source = "linear"
        task = "regression"
        [train]
        lr = 0.1
        epochs = 5
        loss = "mse"
        optimizer = "sgd"
        {train}
        [[model]]
        name = "m"
        {model}
        """))
    return str(path)


def test_an_unknown_framework_lists_the_known_ones(tmp_path):
    with pytest.raises(SpecError) as e:
        load(spec(tmp_path, 'framework = "mxnet"\nfactory = "pipeline.zoo:linear_torch"'))
    assert "model[0].framework" in str(e.value) and "'mxnet'" in str(e.value)
    for name in frameworks.names():
        assert name in str(e.value)


def test_a_framework_whose_packages_are_missing_says_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "lightning" else real(n, *a))
    with pytest.raises(SpecError) as e:
        load(spec(tmp_path, 'framework = "lightning"\nfactory = "pipeline.zoo:linear_lightning"'))
    assert "lightning needs lightning" in str(e.value) and "install with: pip install lightning==2.6.6" in str(e.value)


@pytest.mark.parametrize("train, expected", [
    ("early_stopping = { monitor = \"accuracy\" }", "early_stopping.monitor: expected a value training logs (loss)"),
    ("early_stopping = { monitor = \"val_loss\" }", "val_loss needs validation_split > 0"),
    ("validation_split = 0.2\ncheckpoint = { monitor = \"val_accuracy\" }", "accuracy is not logged while training"),
    ("validation_split = 1.5", "validation_split: expected a fraction in [0, 1)"),
    ("reduce_lr = { factor = 2.0, monitor = \"loss\" }", "factor in (0, 1)"),
    ("early_stopping = { patience = 0, monitor = \"loss\" }", "patience: expected a positive"),
    ("early_stopping = { wait = 3 }", "early_stopping.wait: expected one of the known keys"),
    ("checkpoint = \"best\"", "checkpoint: expected dict or bool"),
])
def test_callbacks_that_make_no_sense_are_refused_at_load(tmp_path, train, expected):
    with pytest.raises(SpecError) as e:
        load(spec(tmp_path, 'framework = "torch"\nfactory = "pipeline.zoo:linear_torch"', train))
    assert expected in str(e.value)


def test_callbacks_with_a_validation_split_default_to_keras_meanings(tmp_path):
    s = load(spec(tmp_path, 'framework = "torch"\nfactory = "pipeline.zoo:linear_torch"',
                  "validation_split = 0.2\nearly_stopping = true\ncheckpoint = true\nreduce_lr = { patience = 2 }"))
    t = s.models[0].train
    assert t.validation_split == 0.2 and t.early_stopping == {"monitor": "val_loss", "patience": 10, "min_delta": 0.0}
    assert t.checkpoint == {"monitor": "val_loss"} and t.reduce_lr["patience"] == 2 and t.reduce_lr["factor"] == 0.5


@pytest.mark.cli
def test_a_factory_of_the_wrong_kind_says_what_was_expected_and_what_came(tmp_path):
    (tmp_path / "factories.py").write_text(textwrap.dedent("""
        def plain_linear(input_shape, n_outputs, **_):
            import torch.nn as nn
            return nn.Linear(input_shape[-1], n_outputs)

        def keras_model(input_shape, n_outputs, **_):
            import keras
            return keras.Sequential([keras.Input(input_shape), keras.layers.Dense(n_outputs)])
        """))
    for framework, factory, expected in [
        ("lightning", "plain_linear", "framework 'lightning' expected a lightning.LightningModule, the factory "
                                      "returned a torch.nn.modules.linear.Linear"),
        ("tensorflow", "keras_model", "framework 'tensorflow' expected a tf.Module whose __call__ is a tf.function "
                                      "with an input_signature (a keras.Model is framework = \"keras\")")]:
        r = run_cli("validate", spec(tmp_path, f'framework = "{framework}"\nfactory = "factories:{factory}"'),
                    home=tmp_path, timeout=300)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and expected in out, out
