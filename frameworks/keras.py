"""Keras 3 on TensorFlow: a keras.Model from a factory or a .keras/.h5 file, trained in compiled chunks
of epochs (the same updates as `fit`, without a Python round trip per epoch).

The same model on Keras' other backends is `framework = "keras"` with `backend = "jax"` or `"torch"` in
the spec, which names the modules keras_jax.py and keras_torch.py (BACKENDS): each a lane of its own,
since Keras picks its backend once per process, and a model family of its own for the exporters. This
module's Adapter serves all three; on those backends it trains by `fit`."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np

from exporters.base import keras_feed, keras_input_names
from parity.feeds import flatten_outputs, n_rows, one_or_named
from parity.signature import Signature, TensorSpec

from .base import (PRETRAINED, History, PretrainedLoadError, RankRun, callbacks_of, check_kind, first_line,
                   kept_pretrained, output_kind, output_specs, tf_summaries)

NAME = "keras"
FAMILY = "tensorflow"
LANE = "tensorflow"
PACKAGES = ("tensorflow", "keras")
INSTALL = "pip install tensorflow==2.21.0 (Keras 3 comes with it)"
PRETRAINED_SUFFIXES = (".keras", ".h5")
FLAVOR = "keras"
PRECISIONS = ("fp32", "bf16")  # Keras' mixed_bfloat16 policy (frameworks/precision.py: fp16 is refused on a CPU)
DISTRIBUTION = "multi-worker-mirrored"  # workers > 1: one process per worker, told its place by TF_CONFIG

# `backend = ...` in a spec: the framework module that runs Keras on it (its lane sets KERAS_BACKEND)
BACKENDS = {"tensorflow": "keras", "jax": "keras_jax", "torch": "keras_torch"}
EPOCH_CHUNKS = 20  # epochs are trained in this many compiled chunks, reporting progress between chunks


class Adapter:
    weights_file = "model.weights.h5"
    output_kind = "values"  # set by train for classifiers: "probabilities" (softmax head) or "logits"

    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def check(self, model, where: str) -> None:
        import keras
        check_kind(model, isinstance(model, keras.Model), NAME, "a keras.Model", where)

    def build(self, make, *, seed: int, threads: int | None = None):
        import keras
        keras.utils.set_random_seed(seed)
        return make()

    def train(self, model, t, x, y: np.ndarray, seed: int, on_epoch=None, val=None, logdir=None) -> History:
        """Keras' own `fit` with its callbacks when the spec asks for validation or callbacks; else the
        same updates in compiled chunks of epochs (several times faster on small models)."""
        import keras
        if t.precision != "fp32":
            return self._train_mixed(model, t, x, y, seed, on_epoch, val, logdir)
        xs = keras_feed(model, x)
        loss_fn, opt = self._loss_and_optimizer(model, t, xs)
        if val is not None or any(callbacks_of(t).values()) or keras.backend.backend() != "tensorflow":
            return self._fit(model, t, x, y, loss_fn, opt, on_epoch, val, logdir)
        losses = self._chunked(model, t, xs, y, seed, loss_fn, opt, on_epoch)
        # the rate is constant here; recorded as fit's TensorBoard callback logs it (epoch_learning_rate)
        history = History(loss=losses, lr=[float(t.lr)] * len(losses))
        if logdir:
            tf_summaries(logdir, history)
        return history

    def _train_mixed(self, model, t, x, y, seed, on_epoch, val, logdir) -> History:
        """Keras' mixed precision: a copy of the model whose layers compute in bfloat16 under
        Keras' mixed policy, its last layer in float32 as Keras advises, trained like any model; its
        float32 weights then go back into `model`, which computes in float32 as before."""
        from dataclasses import replace

        import keras
        mixed = _in_policy(model, {"bf16": "mixed_bfloat16"}[t.precision])
        history = self.train(mixed, replace(t, precision="fp32"), x, y, seed, on_epoch, val, logdir)
        model.set_weights(mixed.get_weights())
        first = keras_feed(mixed, x)
        first = {k: v[:1] for k, v in first.items()} if isinstance(first, dict) else first[:1]
        history.compute_dtype = str(keras.ops.dtype(mixed.layers[0](first)))  # the first layer, seen computing
        return history

    def _loss_and_optimizer(self, model, t, xs, reduction="sum_over_batch_size"):
        import keras
        multi = isinstance(xs, dict)
        if t.loss == "mse":
            loss_fn = keras.losses.MeanSquaredError(reduction=reduction)
        else:
            self.output_kind = output_kind(_numpy(model({k: v[:8] for k, v in xs.items()} if multi else xs[:8])))
            loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=self.output_kind == "logits",
                                                                 reduction=reduction)
        opt = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[t.optimizer](learning_rate=t.lr)
        return loss_fn, opt

    def train_rank(self, make, t, x, y: np.ndarray, seed: int, *, workers: int, on_epoch=None, val=None,
                   logdir=None) -> RankRun:
        """One worker of tf.distribute.MultiWorkerMirroredStrategy (TF_CONFIG says which): the model, its
        loss and optimizer made in the strategy's scope with the same seed on every worker, trained by
        `strategy.run` over this worker's shard (frameworks/mirrored.py: Keras 3's `fit` does not run
        under this strategy); the first worker writes TensorBoard."""
        import tensorflow as tf
        from .mirrored import strategy as mirrored, train_mirrored
        strategy = mirrored(t.threads)
        with strategy.scope():
            model = self.build(make, seed=seed)
            xs = keras_feed(model, x)
            model({k: v[:1] for k, v in xs.items()} if isinstance(xs, dict) else xs[:1])  # its variables, made here
            per_row, opt = self._loss_and_optimizer(model, t, xs, reduction=None)
            opt.build(model.trainable_variables)
        history, rows = train_mirrored(
            strategy, t, xs, y, seed, workers=workers, call=lambda xb, training: model(xb, training=training),
            variables=model.trainable_variables, loss_fn=lambda yb, pred: tf.reduce_mean(per_row(yb, pred)),
            opt=opt, get_weights=model.get_weights, set_weights=model.set_weights, on_epoch=on_epoch,
            val=None if val is None else (keras_feed(model, val[0]), val[1]))
        rank = strategy.cluster_resolver.task_id
        if logdir and rank == 0:
            tf_summaries(logdir, history)
        return RankRun(model, history, rank, strategy.num_replicas_in_sync, rows)

    def _fit(self, model, t, x, y, loss_fn, opt, on_epoch, val, logdir) -> History:
        import tempfile

        import keras
        cb = callbacks_of(t)
        model.compile(optimizer=opt, loss=loss_fn)
        callbacks = [keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: on_epoch and on_epoch(epoch + 1, float(logs["loss"])))]
        if logdir:
            callbacks.append(_tensorboard(logdir))
        stop = cb["early_stopping"] and keras.callbacks.EarlyStopping(
            monitor=cb["early_stopping"]["monitor"], patience=cb["early_stopping"]["patience"],
            min_delta=cb["early_stopping"]["min_delta"])
        if cb["reduce_lr"]:
            r = cb["reduce_lr"]
            callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor=r["monitor"], factor=r["factor"],
                                                               patience=r["patience"], min_delta=r["min_delta"],
                                                               min_lr=r["min_lr"]))
        with tempfile.TemporaryDirectory(prefix="keras-best-") as tmp:
            best = Path(tmp) / "best.weights.h5"
            if cb["checkpoint"]:
                callbacks.append(keras.callbacks.ModelCheckpoint(str(best), monitor=cb["checkpoint"]["monitor"],
                                                                 save_best_only=True, save_weights_only=True))
            if stop:
                callbacks.append(stop)
            n = n_rows(x)
            fitted = model.fit(keras_feed(model, x), y, batch_size=min(t.batch_size or n, n), epochs=t.epochs,
                               shuffle=t.shuffle, validation_data=None if val is None else (keras_feed(model, val[0]), val[1]),
                               callbacks=callbacks, verbose=0).history
            history = History(loss=fitted["loss"], val_loss=fitted.get("val_loss", []),
                              lr=fitted.get("learning_rate", []))
            if cb["checkpoint"] and best.is_file():
                model.load_weights(str(best))
                series = fitted[cb["checkpoint"]["monitor"]]
                history.best_epoch = int(np.argmin(series)) + 1
        if stop and stop.stopped_epoch:
            history.stopped_epoch = int(stop.stopped_epoch) + 1
        return history

    def _chunked(self, model, t, xs, y, seed, loss_fn, opt, on_epoch) -> list[float]:
        import tensorflow as tf
        ys = tf.constant(y)
        multi = isinstance(xs, dict)
        n = int(next(iter(xs.values())).shape[0]) if multi else int(xs.shape[0])
        bs = min(t.batch_size or n, n)
        n_batches = math.ceil(n / bs)
        model({k: v[:1] for k, v in xs.items()} if multi else xs[:1])
        opt.build(model.trainable_variables)
        shuffle = t.shuffle

        @tf.function(reduce_retracing=True)
        def run_epochs(start, stop):
            losses = tf.TensorArray(tf.float32, size=stop - start)
            for epoch in tf.range(start, stop):
                if shuffle:
                    order = tf.argsort(tf.random.stateless_uniform([n], seed=[seed, epoch]))
                else:
                    order = tf.range(n)
                total = tf.constant(0.0)
                for b in tf.range(n_batches):
                    idx = order[b * bs: tf.minimum((b + 1) * bs, n)]
                    xb = {k: tf.gather(v, idx) for k, v in xs.items()} if multi else tf.gather(xs, idx)
                    yb = tf.gather(ys, idx)
                    with tf.GradientTape() as tape:
                        loss = loss_fn(yb, model(xb, training=True))
                    grads = tape.gradient(loss, model.trainable_variables)
                    opt.apply_gradients(zip(grads, model.trainable_variables))
                    total += loss * tf.cast(tf.shape(idx)[0], tf.float32)
                losses = losses.write(epoch - start, total / n)
            return losses.stack()

        losses: list[float] = []
        step = max(1, math.ceil(t.epochs / EPOCH_CHUNKS))
        for start in range(0, t.epochs, step):
            stop = min(start + step, t.epochs)
            losses += [float(v) for v in run_epochs(tf.constant(start), tf.constant(stop)).numpy()]
            if on_epoch:
                on_epoch(stop, losses[-1])
        return losses

    def signature(self, model, x, y: np.ndarray) -> Signature:
        """The model's own names (Keras inputs, output layers) with the dtypes and shapes of real rows."""
        outs = list(getattr(model, "output_names", None) or []) or ["output"]
        outputs = output_specs(y, outs[0])
        if isinstance(x, dict):  # a functional model takes a dict keyed by its inputs' names
            return Signature(tuple(TensorSpec.of(k, v) for k, v in x.items()), outputs)
        ins = [t.name for t in getattr(model, "inputs", None) or []] or ["x"]
        return Signature((TensorSpec.of(ins[0], x),), outputs)

    def bind(self, model, x) -> dict[str, str]:
        """How `x`'s arrays meet the model's inputs (by name, then one by position); raises
        InputBindingError when they cannot."""
        from parity.feeds import bind_inputs
        return bind_inputs(x, keras_input_names(model))[1]

    def predict(self, model, x):
        """One array, or {name: array} for a model of several outputs (a list is named by output_names)."""
        names = list(getattr(model, "output_names", None) or []) or None
        return one_or_named(flatten_outputs(model(keras_feed(model, x), training=False), _numpy, names=names))

    def layer_outputs(self, model, x) -> list[tuple[str, np.ndarray]]:
        """Each layer's output on `x`, in the model's order (what parity/localize.py pairs with an
        artifact's tensors); a layer of several outputs, or a model with no graph of layers (a
        subclassed one), gives none."""
        import keras
        layers = [l for l in getattr(model, "layers", []) if not isinstance(l, keras.layers.InputLayer)]
        try:
            outs = [(l.name, l.output) for l in layers if not isinstance(l.output, (list, tuple, dict))]
            tapped = keras.Model(model.inputs, [o for _, o in outs])
        except (AttributeError, ValueError):
            return []
        values = tapped(keras_feed(model, x), training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        return [(name, _numpy(v)) for (name, _), v in zip(outs, values)]

    def output_layers(self, model) -> dict[str, list[str]]:
        """For a model of several outputs: each output (by its last layer) with the layers it is computed
        from, in the model's order, found by cutting the functional graph at that output; {} otherwise."""
        import keras
        outputs = getattr(model, "outputs", None) or []
        if len(outputs) < 2:
            return {}
        found = {}
        for tensor in outputs:
            try:
                layers = [l.name for l in keras.Model(model.inputs, tensor).layers
                          if not isinstance(l, keras.layers.InputLayer)]
            except (AttributeError, ValueError):
                return {}
            if layers:
                found[layers[-1]] = layers
        return found

    def load_pretrained(self, path: Path, *, where: str, make=None, input_shape=None):
        import keras
        try:
            return keras.models.load_model(str(path), compile=False)
        except Exception as e:
            raise PretrainedLoadError(f"{where}: {path}: keras.models.load_model failed "
                                      f"({type(e).__name__}: {first_line(e)}); expected a model "
                                      f"saved with model.save(...) as .keras or .h5") from None

    def save_pretrained(self, model, out: Path, path: Path) -> None:
        shutil.copy2(path, out / (PRETRAINED + path.suffix))

    def save(self, model, out: Path) -> None:
        model.save_weights(str(out / self.weights_file))

    def load(self, src: Path, *, make, pretrained: bool, input_shape, where: str):
        if pretrained:
            return self.load_pretrained(kept_pretrained(src), where=where)
        model = make()
        if not isinstance(input_shape, dict):  # a Sequential without an Input layer builds on its first call
            model(np.zeros((1, *input_shape), np.float32))
        model.load_weights(str(src / self.weights_file))
        return model

    def perturbed(self, model, scale: float, seed: int):
        """A copy of the model with every weight nudged by `scale` relative noise."""
        import keras
        clone = keras.models.clone_model(model)
        clone.set_weights([w * (1 + scale * np.random.default_rng(seed + i).standard_normal(w.shape))
                           .astype(w.dtype) for i, w in enumerate(model.get_weights())])
        return clone

    def mlflow_form(self, model, x_example) -> dict:
        """What pipeline/tracking.py saves as the MLflow model: Keras 3's own flavor (mlflow.tensorflow
        expects tf.keras models)."""
        import keras
        from exporters.base import package_version
        backend = keras.backend.backend()
        needs = {"tensorflow": ["tensorflow"], "jax": ["jax", "jaxlib"], "torch": ["torch"]}[backend]
        return {"flavor": "keras", "model": model, "example": x_example, "input_example": True,
                "pip_requirements": [f"{p}=={package_version(p)}" for p in needs] + [f"keras=={keras.__version__}"]}


def _in_policy(model, policy: str):
    """A clone of a Sequential or functional model with every layer under `policy` but the last (float32,
    so the outputs and the loss stay float32), holding the model's weights."""
    import keras
    from .base import WrongModelKind
    last = model.layers[-1] if model.layers else None

    def clone(layer):
        config = layer.get_config()
        config["dtype"] = "float32" if layer is last else policy
        return layer.__class__.from_config(config)
    try:
        mixed = keras.models.clone_model(model, clone_function=clone)
        mixed.set_weights(model.get_weights())
    except (ValueError, TypeError, NotImplementedError) as e:
        raise WrongModelKind(f"mixed precision ({policy}) clones the model with each layer under Keras' mixed "
                             f"policy; expected a Sequential or functional keras.Model whose layers clone, "
                             f"cloning failed: {type(e).__name__}: {first_line(e)}") from None
    return mixed


def _numpy(value) -> np.ndarray:
    """A backend's tensor as numpy (a torch tensor that requires grad included)."""
    import keras
    return np.asarray(keras.ops.convert_to_numpy(value))


def _tensorboard(logdir: Path):
    """Keras' TensorBoard callback, the layout every style writes, less its evaluation_<name>_vs_iterations
    scalars: validation/epoch_<name> again, stepped by optimizer iterations (a second, differently
    stepped chart no other style has)."""
    import keras

    class EpochTensorBoard(keras.callbacks.TensorBoard):
        def on_test_end(self, logs=None):
            super().on_test_end({})  # nothing to write; it still pops the validation writer

    return EpochTensorBoard(log_dir=str(logdir), histogram_freq=0, write_graph=True)
