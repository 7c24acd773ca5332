"""The flax training style: a flax.nnx.Module put into the jax style's form (frameworks/flax.py). Its
end-to-end runs share others': the toy in `run styles` (tests/test_styles.py) and the digits MLP in `run
digits` (tests/test_e2e_foundation.py::test_digits_accuracy), each with every format verified."""
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from .conftest import ROOT


def test_a_factory_of_the_wrong_kind_is_refused_naming_what_was_expected_and_what_came():
    from frameworks.base import WrongModelKind
    from frameworks.flax import Adapter
    from frameworks.jax import JaxModel
    fw = Adapter()
    for made, came in (({"W": [1.0]}, "a builtins.dict"), (JaxModel(lambda p, x: x, {}), "a frameworks.jax.JaxModel"),
                       (None, "None")):
        with pytest.raises(WrongModelKind) as e:
            fw.check(fw.build(lambda: made, seed=0), "model m (flax): factory 'f:g'")
        assert "model m (flax): factory 'f:g': framework 'flax' expected a flax.nnx.Module" in str(e.value)
        assert f"the factory returned {came}" in str(e.value)
    from flax import nnx

    class Empty(nnx.Module):
        def __call__(self, x):
            return x
    with pytest.raises(WrongModelKind, match="expected a module with nnx.Param values to train, found none in "
                                             "the factory's .*Empty"):
        fw.check(fw.build(Empty, seed=0), "model m (flax)")


def test_a_linen_module_is_refused_with_the_bridge_that_converts_it():
    import flax.linen as nn
    from frameworks.base import WrongModelKind
    from frameworks.flax import Adapter
    with pytest.raises(WrongModelKind, match=r"expected a flax.nnx.Module \(a linen module converts with "
                                             r"flax.nnx.bridge.ToNNX"):
        Adapter().check(Adapter().build(lambda: nn.Dense(1), seed=0), "model m (flax)")


def test_an_nnx_module_trains_in_the_jax_form_and_saves_and_loads(tmp_path):
    """The jax style's loop on the nnx.Param values (a softmax head: the probabilities' loss), the trained
    values back in the module, and a save/load through the factory giving the same outputs."""
    from pipeline.zoo import mlp_flax
    from frameworks.flax import Adapter, FlaxModel
    fw = Adapter()
    make = lambda: mlp_flax((4,), 3, hidden=16)  # noqa: E731
    model = fw.build(make, seed=0)
    fw.check(model, "model m (flax)")
    assert isinstance(model, FlaxModel) and sorted(model.params) == ["hidden/bias", "hidden/kernel",
                                                                     "out/bias", "out/kernel"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)
    t = SimpleNamespace(loss="sparse_categorical_crossentropy", optimizer="adam", lr=0.01, epochs=30,
                        batch_size=32, shuffle=True, early_stopping=None, checkpoint=None, reduce_lr=None)
    history = fw.train(model, t, x, y, seed=0)
    assert fw.output_kind == "probabilities" and history.loss[-1] < 0.5 * history.loss[0], history.loss
    out = fw.predict(model, x)
    assert (out.argmax(1) == y).mean() > 0.9
    np.testing.assert_allclose(np.asarray(model.module()(x)), out, atol=1e-6)  # the module, trained values in
    fw.save(model, tmp_path)
    again = fw.load(tmp_path, make=make, pretrained=False, input_shape=[4], where="model m (flax)")
    np.testing.assert_array_equal(fw.predict(again, x), out)
    assert "flax==" in " ".join(fw.mlflow_form(model, x[:2])["pip_requirements"])


def test_the_declarations_import_no_framework():
    code = textwrap.dedent("""
        import sys
        import frameworks, frameworks.flax
        assert frameworks.family("flax") == "jax" and frameworks.lane("flax") == frameworks.lane("jax")
        assert frameworks.module("flax").PACKAGES == ("jax", "optax", "flax")
        print(sorted(m for m in ("jax", "optax", "flax", "tensorflow", "torch") if m in sys.modules))
        """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
