"""Flax: a `flax.nnx.Module` from a factory, put into the jax style's form and trained, saved and exported
exactly as that style is (frameworks/jax.py): `nnx.split` takes the module apart into its graph and its
`nnx.Param` values, `params` is those values as a flat {"path/to/leaf": array} dict, and
`apply(params, x)` is the module put back together (`nnx.merge`) with them and called on x. So the
exporters see the "jax" family (jax2tf for the SavedModel, jax2onnx for ONNX, and the routes from those).
The module is called in eval mode (`Module.eval()`: dropout off, batch statistics as they are); variables
other than `nnx.Param` (batch statistics, RNG state) are kept as the factory made them. Runs in the
TensorFlow worker, as the jax style does; the MLflow copy is the jax style's python_function model."""
from __future__ import annotations

from . import jax as _jax_style
from .base import WrongModelKind, check_kind
from .jax import JaxModel

NAME = "flax"
FAMILY = "jax"
LANE = _jax_style.LANE
PACKAGES = ("jax", "optax", "flax")
INSTALL = "pip install jax optax flax"
PRETRAINED_SUFFIXES = ()
FLAVOR = "python_function"
NOT_MIXED = ("a flax module computes in the dtype its layers were built with (their dtype= argument, e.g. "
             "nnx.Linear(..., dtype=jnp.bfloat16)), which the factory decides; the style trains the module as made")
DISTRIBUTION = None
NOT_DISTRIBUTED = _jax_style.NOT_DISTRIBUTED  # the same jitted one-device step


class FlaxModel(JaxModel):
    """An nnx.Module in the jax style's form (see the module's docstring); `module()` is the module
    again, with the current parameters."""

    def __init__(self, module):
        from flax import nnx
        if hasattr(module, "eval"):
            module.eval()
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        template = list(nnx.to_flat_state(params))
        names = ["/".join(map(str, path)) for path, _ in template]

        def rebuilt(params):  # made here: cloudpickle keeps it (and the graph) by value for MLflow
            from flax import nnx as _nnx
            state = _nnx.from_flat_state([(path, var.replace(params[n])) for n, (path, var) in zip(names, template)])
            return _nnx.merge(graphdef, state, rest)

        def apply(params, x):
            import jax
            # what depends on concrete values only (the parameters an exporter closes over) is computed
            # here, so its graph holds initializers, not ops on them: onnx2tf mis-converts nnx.Linear's
            # bias reshape (a Flatten of an initializer), which the TF.js route goes through
            with jax.ensure_compile_time_eval():
                return rebuilt(params)(x)

        super().__init__(apply, {n: var.get_value() for n, (_, var) in zip(names, template)})
        self._rebuilt = rebuilt

    def module(self):
        return self._rebuilt(self.params)

    def __getstate__(self):
        return {**super().__getstate__(), "_rebuilt": self._rebuilt}


class Adapter(_jax_style.Adapter):
    """The jax style's adapter (its optax loop, classifier heads, save, load, MLflow form) on a FlaxModel."""

    def made(self, make):
        """The factory's object: an nnx.Module in the jax style's form, anything else as it came (for
        `check` to refuse, naming it)."""
        from flax import nnx
        model = make()
        return FlaxModel(model) if isinstance(model, nnx.Module) else model

    def check(self, model, where: str) -> None:
        linen = type(model).__module__.startswith("flax.linen")
        check_kind(model, isinstance(model, FlaxModel), NAME,
                   "a flax.nnx.Module" + (" (a linen module converts with flax.nnx.bridge.ToNNX(module, "
                                          "rngs=nnx.Rngs(0)) and nnx.bridge.lazy_init)" if linen else ""), where)
        if not model.params:
            raise WrongModelKind(f"{where}: framework 'flax' expected a module with nnx.Param values to train, "
                                 f"found none in the factory's {type(model.module()).__qualname__}")
        super().check(model, where)

    def build(self, make, *, seed: int, threads: int | None = None):
        return super().build(lambda: self.made(make), seed=seed, threads=threads)

    def load(self, src, *, make, pretrained: bool, input_shape, where: str):
        return super().load(src, make=lambda: self.made(make), pretrained=pretrained, input_shape=input_shape,
                            where=where)

    def load_pretrained(self, path, *, where: str, make=None, input_shape=None):
        raise NotImplementedError(f"{where}: framework 'flax' builds its model from a factory")

    def save_pretrained(self, model, out, path) -> None:
        raise NotImplementedError("framework 'flax' has no pretrained files")

    def mlflow_form(self, model, x_example) -> dict:
        form = super().mlflow_form(model, x_example)
        form["pip_requirements"].append(f"flax=={_jax_style._version('flax')}")
        return form
