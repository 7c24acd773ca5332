"""The small models the exporter tests convert: the toy line and the digits MLP, in each framework,
with weights that look trained (non-zero biases, outputs that spread across inputs)."""
from __future__ import annotations

import numpy as np

SHAPES = {"toy": (1,), "digits": (8, 8)}


def keras_model(kind: str):
    import keras

    keras.utils.set_random_seed(0)
    if kind == "toy":
        m = keras.Sequential([keras.Input((1,), name="x"), keras.layers.Dense(1)])
    else:
        m = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(),
                              keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    rng = np.random.default_rng(1)  # non-zero biases and larger weights, as after training
    for layer in m.layers:
        w = layer.get_weights()
        if w:
            layer.set_weights([w[0] * 2.0, rng.normal(0, 0.3, w[1].shape).astype(np.float32)])
    return m


def torch_model(kind: str):
    import torch

    torch.manual_seed(0)
    if kind == "toy":
        m = torch.nn.Linear(1, 1)
        with torch.no_grad():  # a fresh Linear(1, 1) can have a near-zero slope; use a trained-looking one
            m.weight.fill_(2.0)
            m.bias.fill_(0.5)
        return m.eval()
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 128), torch.nn.ReLU(),
                            torch.nn.Linear(128, 10), torch.nn.Softmax(-1)).eval()
    with torch.no_grad():
        m[3].weight.mul_(4.0)  # a sharper softmax, so outputs spread across inputs
    return m


def reference(framework: str, model, x: np.ndarray) -> np.ndarray:
    """The framework model's own outputs on `x`."""
    if framework == "keras":
        return np.asarray(model(x))
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def inputs(kind: str, n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).random((n, *SHAPES[kind]), dtype=np.float32)
    return x * 6 - 3 if kind == "toy" else x


def first_weight(framework: str, model) -> np.ndarray:
    """The first layer's weight matrix as the framework holds it."""
    if framework == "keras":
        return next(layer.get_weights()[0] for layer in model.layers if layer.get_weights())
    return next(p.detach().numpy() for p in model.parameters() if p.ndim == 2)


def fails_parity(expected: np.ndarray, got: np.ndarray, variant: str, fmt: str, task: str = "classification") -> str:
    """The parity verdict the pipeline would give `got`: returns the failure message, or raises if it passed."""
    from parity.compare import compare, tolerance_for
    c = compare(expected, got, tolerance=tolerance_for(variant, fmt), task=task)
    assert not c.passed, f"{fmt}-{variant}: the tampered artifact still passed parity ({c.metrics.get('max_abs')})"
    return c.failures[0]


def tamper_tflite(path, variant: str) -> None:
    """Change the largest constant buffer of a .tflite in place (the first layer's weights): one weight
    +10 for float variants, every weight negated for int8 (whose tolerance allows small changes)."""
    from tensorflow.lite.python import schema_py_generated as schema
    data = bytearray(open(path, "rb").read())
    model = schema.Model.GetRootAsModel(data, 0)
    buffers = [model.Buffers(i) for i in range(model.BuffersLength())]
    largest = max(buffers, key=lambda b: b.DataLength())
    raw = largest.DataAsNumpy()  # a view into `data`
    assert raw.base is not None and largest.DataLength() >= 64, "no weight buffer to change"
    if variant == "int8":
        w = raw.view(np.int8)
        w[:] = -w
    else:
        w = raw.view(np.float16 if variant == "fp16" else np.float32)
        w[0] += 10.0
    open(path, "wb").write(bytes(data))
