"""Raw TensorFlow: a tf.Module holding tf.Variables, whose `__call__` is a tf.function with an input
signature (its serving signature), trained by a tf.GradientTape loop with `optimizer.apply_gradients`.
A SavedModel folder (Keras' `model.export`, `tf.saved_model.save`) is taken as a trained model: its
`serving_default` signature becomes the module's `__call__`."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from parity.feeds import flatten_outputs, n_rows, one_or_named
from parity.signature import Signature, TensorSpec

from .base import (PRETRAINED, History, PlainCallbacks, PretrainedLoadError, RankRun, WrongModelKind, check_kind,
                   epoch_loop, shuffled_rows, first_line, kept_pretrained, output_kind, output_specs, tf_summaries)

NAME = "tensorflow"
FAMILY = "tensorflow"
LANE = "tensorflow"
PACKAGES = ("tensorflow",)
INSTALL = "pip install tensorflow==2.21.0"
PRETRAINED_SUFFIXES = ()
PRETRAINED_FOLDER = ("saved_model.pb", "a TensorFlow SavedModel folder")
FLAVOR = "tensorflow"
NOT_MIXED = ("this style's model is a tf.Module of tf.Variables whose ops take the variables' own dtype; "
             "computing it in bfloat16 means writing the module for it (Keras' mixed policies do this "
             "for keras models: framework = \"keras\")")
DISTRIBUTION = "multi-worker-mirrored"  # workers > 1: one process per worker, told its place by TF_CONFIG

CHECKPOINT = "checkpoint"  # tf.train.Checkpoint prefix in the train stage's folder


class Adapter:
    output_kind = "values"

    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def check(self, model, where: str) -> None:
        import keras
        import tensorflow as tf
        ok = isinstance(model, tf.Module) and not isinstance(model, keras.Model)
        check_kind(model, ok, NAME, "a tf.Module whose __call__ is a tf.function with an input_signature "
                                    "(a keras.Model is framework = \"keras\")", where)
        call = getattr(type(model), "__call__", None)
        if not getattr(call, "input_signature", None):
            raise WrongModelKind(f"{where}: framework 'tensorflow' expected the tf.Module's __call__ to be a "
                            f"tf.function with an input_signature (its serving signature), found "
                            f"{type(call).__name__}")
        if not model.trainable_variables:
            raise WrongModelKind(f"{where}: framework 'tensorflow' expected a tf.Module with trainable tf.Variables, "
                            f"found none")

    def build(self, make, *, seed: int, threads: int | None = None):
        import tensorflow as tf
        tf.random.set_seed(seed)
        np.random.seed(seed)
        return make()

    def train(self, model, t, x, y: np.ndarray, seed: int, on_epoch=None, val=None, logdir=None) -> History:
        import tensorflow as tf
        variables = list(model.trainable_variables)
        loss_fn, opt = self._loss_and_optimizer(model, t, x)

        @tf.function(reduce_retracing=True)
        def step(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb))
            grads = tape.gradient(loss, variables)
            opt.apply_gradients(zip(grads, variables))
            return loss

        @tf.function(reduce_retracing=True)
        def evaluate(xb, yb):
            return loss_fn(yb, model(xb))

        history = History()
        callbacks = PlainCallbacks(
            t, history, get_weights=lambda: [v.numpy() for v in variables],
            set_weights=lambda ws: [v.assign(w) for v, w in zip(variables, ws)],
            get_lr=lambda: float(opt.learning_rate.numpy()), set_lr=lambda lr: opt.learning_rate.assign(lr))
        xs, ys = tf.constant(x, tf.float32), tf.constant(y)
        n = n_rows(x)
        epoch_loop(t, history, callbacks, rows=shuffled_rows(n, t.shuffle, seed), batch=min(t.batch_size or n, n),
                   step=lambda idx: step(tf.gather(xs, idx), tf.gather(ys, idx)),
                   evaluate=None if val is None else
                   lambda: evaluate(tf.constant(val[0], tf.float32), tf.constant(val[1])), on_epoch=on_epoch)
        if logdir:
            tf_summaries(logdir, history, graph_fn=model.__call__.get_concrete_function())
        return history

    def _loss_and_optimizer(self, model, t, x):
        """The spec's loss (a mean over the batch; cross entropy on logits or on a softmax head) and optimizer."""
        import keras
        import tensorflow as tf
        if t.loss == "mse":
            def loss_fn(target, pred):
                return tf.reduce_mean(tf.square(tf.reshape(pred, tf.shape(target)) - target))
        else:
            self.output_kind = output_kind(model(tf.constant(x[:8], tf.float32)).numpy())
            from_logits = self.output_kind == "logits"

            def loss_fn(target, pred):
                return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(target, pred,
                                                                                      from_logits=from_logits))
        opt = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[t.optimizer](learning_rate=t.lr)
        return loss_fn, opt

    def train_rank(self, make, t, x, y: np.ndarray, seed: int, *, workers: int, on_epoch=None, val=None,
                   logdir=None) -> RankRun:
        """One worker of tf.distribute.MultiWorkerMirroredStrategy (TF_CONFIG says which): the module's
        variables and the optimizer made in the strategy's scope with the same seed on every worker, the
        GradientTape step run by `strategy.run` over this worker's shard (frameworks/mirrored.py); the
        first worker writes TensorBoard."""
        from .mirrored import strategy as mirrored, train_mirrored
        strategy = mirrored(t.threads)
        with strategy.scope():
            model = self.build(make, seed=seed)
            variables = list(model.trainable_variables)
            loss_fn, opt = self._loss_and_optimizer(model, t, x)
            opt.build(variables)
        history, rows = train_mirrored(
            strategy, t, np.asarray(x, np.float32), y, seed, workers=workers, call=lambda xb, training: model(xb),
            variables=variables, loss_fn=loss_fn, opt=opt, get_weights=lambda: [v.numpy() for v in variables],
            set_weights=lambda ws: [v.assign(w) for v, w in zip(variables, ws)], on_epoch=on_epoch,
            val=None if val is None else (np.asarray(val[0], np.float32), val[1]))
        rank = strategy.cluster_resolver.task_id
        if logdir and rank == 0:
            tf_summaries(logdir, history, graph_fn=model.__call__.get_concrete_function())
        return RankRun(model, history, rank, strategy.num_replicas_in_sync, rows)

    def signature(self, model, x, y: np.ndarray) -> Signature:
        spec = type(model).__call__.input_signature[0]
        return Signature((TensorSpec.of(spec.name or "x", x),), output_specs(y, "output_0"))

    def predict(self, model, x):
        """One array, or {name: array} for a module returning several named outputs."""
        import tensorflow as tf
        return one_or_named(flatten_outputs(model(tf.constant(x, tf.float32)), np.asarray))

    def load_pretrained(self, path: Path, *, where: str, make=None, input_shape=None):
        """A SavedModel folder, wrapped as a tf.Module whose __call__ is its serving_default signature."""
        import tensorflow as tf
        try:
            loaded = tf.saved_model.load(str(path))
        except Exception as e:  # noqa: BLE001 - a truncated file, a missing variables folder, ...
            raise PretrainedLoadError(f"{where}: {path}: tf.saved_model.load failed ({type(e).__name__}: "
                                      f"{first_line(e)}); expected a SavedModel folder (saved_model.pb and "
                                      f"variables/), as model.export(...) or tf.saved_model.save writes") from None
        fn = loaded.signatures.get("serving_default")
        inputs = fn.structured_input_signature[1] if fn is not None else {}
        if fn is None or len(inputs) != 1:
            raise PretrainedLoadError(f"{where}: {path}: expected a serving_default signature of one input, found "
                                      + ("no serving_default" if fn is None else f"inputs {sorted(inputs)}"))
        return served_module(loaded, *next(iter(inputs.items())))

    def save_pretrained(self, model, out: Path, path: Path) -> None:
        shutil.copytree(path, out / PRETRAINED)

    def save(self, model, out: Path) -> None:
        import tensorflow as tf
        tf.train.Checkpoint(model=model).write(str(out / CHECKPOINT))

    def load(self, src: Path, *, make, pretrained: bool, input_shape, where: str):
        import tensorflow as tf
        if pretrained:
            return self.load_pretrained(kept_pretrained(src), where=where)
        model = make()
        tf.train.Checkpoint(model=model).read(str(src / CHECKPOINT)).assert_existing_objects_matched()
        return model

    def perturbed(self, model, scale: float, seed: int):
        """A copy of the module with every variable nudged by `scale` relative noise; a loaded SavedModel
        (which does not copy) is nudged for the duration of each call instead."""
        import copy

        def nudged(variables):
            return [(w * (1 + scale * np.random.default_rng(seed + i).standard_normal(w.shape))).astype(w.dtype)
                    for i, w in enumerate(v.numpy() for v in variables)]
        if not hasattr(model, "loaded"):
            clone = copy.deepcopy(model)
            for v, w in zip(clone.trainable_variables, nudged(clone.trainable_variables)):
                v.assign(w)
            return clone
        return _Nudged(model, nudged(model.weights()))

    def mlflow_form(self, model, x_example) -> dict:
        """What pipeline/tracking.py saves as the MLflow model: mlflow.tensorflow takes a tf.Module and
        saves it as a SavedModel."""
        import tensorflow as tf
        return {"flavor": "tensorflow", "model": model, "example": x_example, "input_example": False,
                "pip_requirements": [f"tensorflow=={tf.__version__}"]}


def served_module(loaded, input_name: str, input_spec):
    """A loaded SavedModel as a tf.Module whose `__call__` (a tf.function with the signature's input spec)
    calls its serving_default signature: one output comes back as a tensor, several as a dict."""
    import tensorflow as tf

    class ServedSavedModel(tf.Module):
        def __init__(self):
            super().__init__(name="saved_model")
            self.loaded = loaded  # tracked: re-saving the module keeps the variables

        @tf.function(input_signature=[tf.TensorSpec(input_spec.shape, input_spec.dtype, name=input_name)])
        def __call__(self, x):
            out = self.loaded.signatures["serving_default"](**{input_name: x})
            return next(iter(out.values())) if len(out) == 1 else out

        def weights(self):
            """The variables the signature reads (a restored object is not a tf.Module)."""
            return list(self.loaded.signatures["serving_default"].variables)

    return ServedSavedModel()


class _Nudged:
    """A served SavedModel whose variables hold nudged values during each call, restored after."""

    def __init__(self, model, values):
        self.model, self.values = model, values

    def __call__(self, x):
        variables = self.model.weights()
        kept = [v.numpy() for v in variables]
        try:
            for v, w in zip(variables, self.values):
                v.assign(w)
            return self.model(x)
        finally:
            for v, w in zip(variables, kept):
                v.assign(w)
