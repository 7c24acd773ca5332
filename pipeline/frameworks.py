"""Per-framework training, saving, loading and prediction behind one small interface.

Everything here imports its framework inside the function that needs it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .spec import ModelSpec, Spec
from .training import build_model


def adapter(framework: str) -> "KerasAdapter | TorchAdapter":
    return {"keras": KerasAdapter, "torch": TorchAdapter}[framework]()


class KerasAdapter:
    weights_file = "model.weights.h5"

    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def build(self, spec: Spec, m: ModelSpec, input_shape, n_outputs):
        import keras
        keras.utils.set_random_seed(spec.seed)
        return build_model(spec, m, input_shape, n_outputs)

    def train(self, model, m: ModelSpec, x: np.ndarray, y: np.ndarray, seed: int, on_epoch=None) -> list[float]:
        """All epochs in one compiled loop: the same updates as `fit` (one optimizer step per batch, in
        order, or in a seeded per-epoch shuffle), without a Python round trip per epoch."""
        import keras
        import tensorflow as tf
        t = m.train
        loss_fn = {"mse": keras.losses.MeanSquaredError(),
                   "sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy()}[t.loss]
        opt = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[t.optimizer](learning_rate=t.lr)
        n = len(x)
        bs = min(t.batch_size or n, n)
        n_batches = math.ceil(n / bs)
        xs, ys = tf.constant(x), tf.constant(y)
        model(xs[:1])
        opt.build(model.trainable_variables)
        shuffle = t.shuffle

        @tf.function(reduce_retracing=True)
        def run_epochs(epochs):
            losses = tf.TensorArray(tf.float32, size=epochs)
            for epoch in tf.range(epochs):
                if shuffle:
                    order = tf.argsort(tf.random.stateless_uniform([n], seed=[seed, epoch]))
                else:
                    order = tf.range(n)
                total = tf.constant(0.0)
                for b in tf.range(n_batches):
                    idx = order[b * bs: tf.minimum((b + 1) * bs, n)]
                    xb, yb = tf.gather(xs, idx), tf.gather(ys, idx)
                    with tf.GradientTape() as tape:
                        loss = loss_fn(yb, model(xb, training=True))
                    grads = tape.gradient(loss, model.trainable_variables)
                    opt.apply_gradients(zip(grads, model.trainable_variables))
                    total += loss * tf.cast(tf.shape(idx)[0], tf.float32)
                losses = losses.write(epoch, total / n)
            return losses.stack()

        return [float(v) for v in run_epochs(tf.constant(t.epochs)).numpy()]

    def predict(self, model, x: np.ndarray) -> np.ndarray:
        import tensorflow as tf
        return np.asarray(model(tf.constant(x, dtype=tf.float32), training=False))

    def save(self, model, out: Path) -> None:
        model.save_weights(str(out / self.weights_file))

    def load(self, spec: Spec, m: ModelSpec, src: Path, input_shape, n_outputs):
        model = self.build(spec, m, input_shape, n_outputs)
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

    def save_mlflow_model(self, model, path: Path, x_example: np.ndarray, y_example: np.ndarray) -> None:
        from . import tracking
        tracking.save_native_model("keras", model, path, x_example, y_example)


class TorchAdapter:
    weights_file = "model.state_dict.pt"

    def build(self, spec: Spec, m: ModelSpec, input_shape, n_outputs):
        import torch
        torch.set_num_threads(m.train.threads)
        torch.manual_seed(spec.seed)
        return build_model(spec, m, input_shape, n_outputs)

    def train(self, model, m: ModelSpec, x: np.ndarray, y: np.ndarray, seed: int, on_epoch=None) -> list[float]:
        import torch
        import torch.nn.functional as F
        t = m.train
        opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[t.optimizer](model.parameters(), lr=t.lr)
        if t.loss == "mse":
            loss_fn = F.mse_loss
        else:  # the model ends in softmax, as the Keras one does
            def loss_fn(prob, target):
                return F.nll_loss(torch.log(prob.clamp_min(1e-12)), target)
        xs, ys = torch.from_numpy(x), torch.from_numpy(y)
        n = len(x)
        bs = min(t.batch_size or n, n)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        model.train()
        for _ in range(t.epochs):
            order = torch.randperm(n, generator=gen) if t.shuffle else torch.arange(n)
            total = 0.0
            for start in range(0, n, bs):
                idx = order[start:start + bs]
                opt.zero_grad()
                loss = loss_fn(model(xs[idx]), ys[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            losses.append(total / n)
        model.eval()
        return losses

    def predict(self, model, x: np.ndarray) -> np.ndarray:
        import torch
        model.eval()
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    def save(self, model, out: Path) -> None:
        import torch
        torch.save(model.state_dict(), out / self.weights_file)

    def load(self, spec: Spec, m: ModelSpec, src: Path, input_shape, n_outputs):
        import torch
        model = self.build(spec, m, input_shape, n_outputs)
        model.load_state_dict(torch.load(src / self.weights_file, map_location="cpu", weights_only=True))
        model.eval()
        return model

    def perturbed(self, model, scale: float, seed: int):
        import copy
        import torch
        clone = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in clone.parameters():
                p.mul_(1 + scale * torch.randn(p.shape, generator=gen))
        return clone

    def save_mlflow_model(self, model, path: Path, x_example: np.ndarray, y_example: np.ndarray) -> None:
        from . import tracking
        tracking.save_native_model("torch", model, path, x_example, y_example)
