"""JAX: a pure function and its parameter pytree, `JaxModel(apply, params)` with `apply(params, x) -> y`
written in jax.numpy; trained by a jitted optax step (sgd or adam, the learning rate injected so the
reduce-on-plateau callback can change it). Runs in the TensorFlow worker: jax2tf (the SavedModel route)
needs TensorFlow in the same process. MLflow has no JAX flavor: the MLflow copy is a python_function
model that loads the saved parameters with numpy and applies the function with jax."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from parity.feeds import n_rows
from parity.signature import Signature, TensorSpec

from .base import (History, PlainCallbacks, WrongModelKind, check_kind, epoch_loop, shuffled_rows, output_kind, output_specs,
                   tf_summaries)

NAME = "jax"
FAMILY = "jax"
LANE = "tensorflow"
PACKAGES = ("jax", "optax")
INSTALL = "pip install jax optax"
PRETRAINED_SUFFIXES = ()
FLAVOR = "python_function"
NOT_MIXED = ("the factory's function computes in its parameters' dtype (float32); bfloat16 means casting "
             "inside that function, which the style cannot do for it")
DISTRIBUTION = None
NOT_DISTRIBUTED = ("this style trains with one jitted step on one device, and JAX has no launcher that spreads such "
                   "a step over processes: its multi-process runtime (jax.distributed.initialize, with gloo "
                   "collectives on the CPU) runs programs written for arrays sharded over a mesh of every "
                   "process's devices, a different training loop from this style's")

PARAMS_FILE = "params.npz"  # the parameter pytree's leaves (leaf_0, leaf_1, ... in tree_flatten order)


class JaxModel:
    """What a jax factory returns: `apply(params, x) -> y`, a pure jax.numpy function of one batch of
    float32 inputs, and `params`, a pytree (dicts, lists, tuples) of float arrays."""

    def __init__(self, apply, params):
        self.apply = apply
        self.params = params
        self._jitted = None

    def __call__(self, x):
        if self._jitted is None:
            import jax
            self._jitted = jax.jit(self.apply)
        return self._jitted(self.params, x)

    def __getstate__(self):  # a jitted function does not pickle (mlflow, deepcopy)
        return {"apply": self.apply, "params": self.params, "_jitted": None}


def _flat(params) -> tuple[list, object]:
    import jax
    return jax.tree_util.tree_flatten(params)


class Adapter:
    output_kind = "values"  # set by train for classifiers: "probabilities" (softmax head) or "logits"

    def check(self, model, where: str) -> None:
        """A JaxModel with a callable apply and array leaves (checked without importing jax)."""
        check_kind(model, isinstance(model, JaxModel), NAME,
                   "a frameworks.jax.JaxModel(apply, params) (apply(params, x) -> y a pure jax.numpy function, "
                   "params a pytree of jax arrays)", where)
        if not callable(model.apply):
            raise WrongModelKind(f"{where}: framework 'jax' expected JaxModel.apply to be a function "
                            f"apply(params, x) -> y, found {type(model.apply).__name__}")
        leaves, _ = _flat(model.params)
        bad = [type(v).__name__ for v in leaves if not hasattr(v, "shape") or not hasattr(v, "dtype")]
        if not leaves or bad:
            raise WrongModelKind(f"{where}: framework 'jax' expected JaxModel.params to be a pytree of arrays, found "
                            + ("no leaves" if not leaves else f"leaves of type {', '.join(sorted(set(bad)))}"))

    def build(self, make, *, seed: int, threads: int | None = None):
        np.random.seed(seed)  # a factory seeds jax itself (jax.random.PRNGKey): jax has no global seed
        return make()

    def loss_fn(self, model, t, x):
        import jax.numpy as jnp
        if t.loss == "mse":
            def mse(params, xb, yb):
                pred = model.apply(params, xb)
                return jnp.mean(jnp.square(pred.reshape(yb.shape) - yb))
            return mse
        import optax
        self.output_kind = output_kind(np.asarray(model(jnp.asarray(x[:8]))))
        if self.output_kind == "logits":
            def cross_entropy(params, xb, yb):
                logits = model.apply(params, xb)
                return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb.reshape(-1)))
            return cross_entropy

        def nll_of_probabilities(params, xb, yb):  # a softmax head
            prob = model.apply(params, xb)
            picked = jnp.take_along_axis(prob, yb.reshape(-1, 1).astype(jnp.int32), axis=-1)
            return -jnp.mean(jnp.log(jnp.clip(picked, 1e-12)))
        return nll_of_probabilities

    def train(self, model, t, x, y: np.ndarray, seed: int, on_epoch=None, val=None, logdir=None) -> History:
        """A jitted optax step per batch (seeded shuffle; full batch when batch_size is None), the spec's
        callbacks with Keras' meanings, TensorBoard scalars through tf.summary."""
        import jax
        import jax.numpy as jnp
        import optax
        if isinstance(x, dict):
            raise TypeError("framework 'jax' trains models of one input: JaxModel.apply(params, x)")
        x = np.asarray(x, np.float32)
        loss_fn = self.loss_fn(model, t, x)
        opt = optax.inject_hyperparams({"adam": optax.adam, "sgd": optax.sgd}[t.optimizer])(learning_rate=t.lr)
        box = {"params": model.params, "state": opt.init(model.params)}

        @jax.jit
        def step(params, state, xb, yb):
            loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state, loss

        evaluate = jax.jit(loss_fn)

        def set_lr(lr: float) -> None:
            hyper = box["state"].hyperparams
            hyper["learning_rate"] = jnp.asarray(lr, dtype=jnp.asarray(hyper["learning_rate"]).dtype)

        history = History()
        callbacks = PlainCallbacks(
            t, history, get_weights=lambda: box["params"],  # immutable arrays: the pytree is its own snapshot
            set_weights=lambda p: box.__setitem__("params", p),
            get_lr=lambda: float(box["state"].hyperparams["learning_rate"]), set_lr=set_lr)
        xs, ys = jnp.asarray(x), jnp.asarray(y)
        n = n_rows(x)

        def one_step(idx):
            xb, yb = (xs, ys) if len(idx) == n and not t.shuffle else (xs[idx], ys[idx])
            box["params"], box["state"], loss = step(box["params"], box["state"], xb, yb)
            return loss
        epoch_loop(t, history, callbacks, rows=shuffled_rows(n, t.shuffle, seed), batch=min(t.batch_size or n, n),
                   step=one_step, on_epoch=on_epoch,
                   evaluate=None if val is None else
                   lambda: evaluate(box["params"], jnp.asarray(val[0], jnp.float32), jnp.asarray(val[1])))
        model.params = box["params"]
        if logdir:
            tf_summaries(logdir, history)
        return history

    def signature(self, model, x, y: np.ndarray) -> Signature:
        return Signature((TensorSpec.of("x", x),), output_specs(y, "output"))

    def predict(self, model, x):
        import jax.numpy as jnp
        if isinstance(x, dict):
            raise TypeError("framework 'jax' models take one input: JaxModel.apply(params, x)")
        return np.asarray(model(jnp.asarray(np.asarray(x, np.float32))))

    def load_pretrained(self, path: Path, *, where: str, make=None, input_shape=None):
        raise NotImplementedError(f"{where}: framework 'jax' builds its model from a factory")

    def save_pretrained(self, model, out: Path, path: Path) -> None:
        raise NotImplementedError("framework 'jax' has no pretrained files")

    def save(self, model, out: Path) -> None:
        leaves, _ = _flat(model.params)
        np.savez(Path(out) / PARAMS_FILE, **{f"leaf_{i}": np.asarray(v) for i, v in enumerate(leaves)})

    def load(self, src: Path, *, make, pretrained: bool, input_shape, where: str):
        """The factory's model (its pytree structure) with the saved leaves put back, shape-checked."""
        import jax
        import jax.numpy as jnp
        model = make()
        self.check(model, where)
        leaves, treedef = _flat(model.params)
        with np.load(Path(src) / PARAMS_FILE) as f:
            saved = [f[f"leaf_{i}"] for i in range(len(f.files))]
        shapes = [tuple(np.shape(v)) for v in leaves], [tuple(v.shape) for v in saved]
        if shapes[0] != shapes[1]:
            raise ValueError(f"{where}: {Path(src) / PARAMS_FILE} holds leaves of shapes {shapes[1]}; the factory's "
                             f"params have {shapes[0]}")
        model.params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in saved])
        return model

    def perturbed(self, model, scale: float, seed: int):
        """A copy with every leaf nudged by `scale` relative noise (seed + the leaf's index)."""
        import jax
        import jax.numpy as jnp
        leaves, treedef = _flat(model.params)
        noise = [np.random.default_rng(seed + i).standard_normal(np.shape(w)) for i, w in enumerate(leaves)]
        noisy = [jnp.asarray((np.asarray(w) * (1 + scale * e)).astype(np.asarray(w).dtype)) for w, e in zip(leaves, noise)]
        return JaxModel(model.apply, jax.tree_util.tree_unflatten(treedef, noisy))

    def mlflow_form(self, model, x_example) -> dict:
        """What pipeline/tracking.py saves as the MLflow model: a python_function model, the parameters
        as an .npz artifact and the function applied with jax at predict time. `apply` and `restore`
        are made here, so cloudpickle (as MLflow pickles the model) keeps them by value, not by import."""
        import jax
        leaves, treedef = _flat(model.params)
        skeleton = jax.tree_util.tree_unflatten(treedef, list(range(len(leaves))))  # ints where the leaves go
        function = model.apply

        def apply(params, x):
            import numpy as _np
            return _np.asarray(function(params, _np.asarray(x, _np.float32)))

        def restore(structure, arrays: dict):  # the pytree again, each int replaced by its leaf
            import jax as _jax
            return _jax.tree_util.tree_map(lambda i: arrays[i], structure)
        return {"flavor": "python_function", "apply": apply, "restore": restore, "structure": skeleton,
                "leaves": [np.asarray(v) for v in leaves], "params_file": PARAMS_FILE,
                "example": np.asarray(x_example), "input_example": False,
                "pip_requirements": [f"jax=={jax.__version__}", f"jaxlib=={_version('jaxlib')}",
                                     f"numpy=={np.__version__}"]}


def _version(dist: str) -> str:
    from importlib import metadata
    return metadata.version(dist)
