"""Model factories of the built-in specs. A user's own factory has the same signature:

    factory(input_shape: tuple[int, ...], n_outputs: int, **params) -> keras.Model | torch.nn.Module

Frameworks are imported inside each factory, so naming one never imports the other.
"""


def linear_keras(input_shape, n_outputs, **_):
    import keras
    return keras.Sequential([keras.Input(input_shape, name="x"), keras.layers.Dense(n_outputs)], name="linear")


def linear_torch(input_shape, n_outputs, **_):
    import torch.nn as nn
    return nn.Linear(input_shape[-1], n_outputs)


def mlp_keras(input_shape, n_outputs, hidden=128, **_):
    import keras
    return keras.Sequential([
        keras.Input(input_shape, name="x"),
        keras.layers.Flatten(),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(n_outputs, activation="softmax"),
    ], name="mlp")


def cnn_keras(input_shape, n_outputs, filters=16, **_):
    """A small CNN on one-channel images (digits' 8x8): Conv2D(3x3, relu) -> max pool -> Dense(softmax).
    Plain Keras layers, so it runs on every Keras backend."""
    import keras
    return keras.Sequential([
        keras.Input(input_shape, name="x"),
        keras.layers.Reshape((*input_shape, 1)),
        keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(n_outputs, activation="softmax"),
    ], name="cnn")


def mlp_torch(input_shape, n_outputs, hidden=128, **_):
    import math
    import torch.nn as nn
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, n_outputs),
        nn.Softmax(dim=-1),
    )


def mlp_lightning(input_shape, n_outputs, hidden=128, **_):
    """mlp_torch as a LightningModule with no steps of its own: the spec's loss and optimizer train it."""
    import lightning
    net = mlp_torch(input_shape, n_outputs, hidden)

    class MLP(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    return MLP()


def linear_tf_module(input_shape, n_outputs, **_):
    """Raw TensorFlow: W and b as tf.Variables; __call__ is the serving signature."""
    import tensorflow as tf
    n_in = int(input_shape[-1])

    class Linear(tf.Module):
        def __init__(self):
            super().__init__(name="linear")
            self.W = tf.Variable(tf.random.normal([n_in, n_outputs], stddev=0.1), name="W")
            self.b = tf.Variable(tf.zeros([n_outputs]), name="b")

        @tf.function(input_signature=[tf.TensorSpec([None, n_in], tf.float32, name="x")])
        def __call__(self, x):
            return tf.matmul(x, self.W) + self.b

    return Linear()


def linear_lightning(input_shape, n_outputs, **_):
    """A LightningModule around one nn.Linear, with its own training and validation steps; the
    optimizer comes from the spec's [train] (the module has no configure_optimizers)."""
    import lightning
    import torch.nn as nn
    import torch.nn.functional as F

    class LinearRegression(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(input_shape[-1], n_outputs)

        def forward(self, x):
            return self.linear(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self(x), y)
            self.log("loss", loss, on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.mse_loss(self(x), y), on_step=False, on_epoch=True)

    return LinearRegression()


def linear_fastai(input_shape, n_outputs, **_):
    """The module a fastai Learner trains: one linear layer (fastai's tabular models end in one)."""
    import torch.nn as nn
    return nn.Linear(input_shape[-1], n_outputs)


def linear_jax(input_shape, n_outputs, **_):
    """JAX: y = x @ W + b, W a small seeded normal and b zeros, as a frameworks.jax.JaxModel."""
    import jax
    import jax.numpy as jnp
    from frameworks.jax import JaxModel
    n_in = int(input_shape[-1])

    def apply(params, x):
        return x @ params["W"] + params["b"]

    params = {"W": 0.1 * jax.random.normal(jax.random.PRNGKey(0), (n_in, n_outputs), jnp.float32),
              "b": jnp.zeros((n_outputs,), jnp.float32)}
    return JaxModel(apply, params)


def linear_flax(input_shape, n_outputs, **_):
    """Flax: one nnx.Linear (seeded by nnx.Rngs(0)); the flax style trains its nnx.Param values."""
    from flax import nnx
    return nnx.Linear(int(input_shape[-1]), n_outputs, rngs=nnx.Rngs(0))


def mlp_flax(input_shape, n_outputs, hidden=128, **_):
    """mlp_keras as a flax.nnx.Module: Flatten -> Linear(hidden), relu -> Linear(n_outputs), softmax."""
    import math
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(math.prod(input_shape), hidden, rngs=rngs)
            self.out = nnx.Linear(hidden, n_outputs, rngs=rngs)

        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            return nnx.softmax(self.out(nnx.relu(self.hidden(x))))

    return MLP(nnx.Rngs(0))
