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
