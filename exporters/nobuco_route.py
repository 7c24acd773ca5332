"""A PyTorch module -> TensorFlow SavedModel by nobuco (PyTorch -> Keras by tracing), without ONNX.

The SavedModel exporter's route for a torch graph onnx2tf refuses (a Hugging Face encoder: "Output
tensors of a Functional model must be the output of a TensorFlow `Layer`"). nobuco traces the module's
forward on two example rows and builds a Keras 2 (tf_keras) functional model op by op; that model is
saved with a `serving_default` taking the named inputs with a dynamic batch and returning the outputs
by the model's own names.

nobuco 0.17 assumes two things this stack does not have, both handled for its import only:
- it is Keras 2 code (`keras.src.engine...`) while `keras` here is Keras 3: `keras.*` is served by the
  pinned `tf_keras` while nobuco is imported, then Keras 3's modules are put back;
- it imports torchvision at module level (and names torch.ops.torchvision.nms in one converter), and
  torchvision is not installed: empty placeholders stand in during the import.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.util
import io
import sys
import types
from pathlib import Path

import numpy as np

ROUTE = "nobuco.pytorch_to_keras (tf_keras, dynamic batch) -> tf.saved_model.save(serving_default)"


class _KerasServedByTfKeras(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import keras.X` answered with the module `tf_keras.X` (the same object, its own spec kept)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "keras" or fullname.startswith("keras."):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        real = importlib.import_module("tf_keras" + spec.name[len("keras"):])
        self._spec = getattr(real, "__spec__", None)
        return real

    def exec_module(self, module):
        if getattr(self, "_spec", None) is not None:
            module.__spec__ = self._spec  # the import system wrote the alias' spec over it


def _placeholder(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__doc__ = "placeholder inserted by exporters.nobuco_route for nobuco's import only"
    module.__dict__.update(attrs)
    return module


def _is(name: str, top: str) -> bool:
    return name == top or name.startswith(top + ".")


@contextlib.contextmanager
def _import_shims():
    import torch
    saved = {k: v for k, v in sys.modules.items() if _is(k, "keras") or _is(k, "torchvision")}
    for k in saved:
        del sys.modules[k]
    finder = _KerasServedByTfKeras()
    sys.meta_path.insert(0, finder)
    noop = lambda *a, **k: None  # noqa: E731
    ops = _placeholder("torchvision.ops", StochasticDepth=type("StochasticDepth", (), {}),
                       FrozenBatchNorm2d=type("FrozenBatchNorm2d", (), {}), nms=noop, batched_nms=noop)
    ops.boxes = _placeholder("torchvision.ops.boxes", _upcast=noop)
    ops.poolers = _placeholder("torchvision.ops.poolers")
    tv = _placeholder("torchvision", _is_tracing=lambda: False, ops=ops, utils=_placeholder("torchvision.utils"),
                      transforms=_placeholder("torchvision.transforms"))
    tv.transforms.functional = _placeholder("torchvision.transforms.functional")
    for m in (tv, ops, ops.boxes, ops.poolers, tv.utils, tv.transforms, tv.transforms.functional):
        sys.modules[m.__name__] = m
    added_nms = not hasattr(torch.ops.torchvision, "nms")
    if added_nms:
        setattr(torch.ops.torchvision, "nms", noop)
    try:
        yield
    finally:
        if added_nms:
            delattr(torch.ops.torchvision, "nms")
        sys.meta_path.remove(finder)
        for k in [k for k in sys.modules if _is(k, "keras") or _is(k, "torchvision")]:
            del sys.modules[k]
        sys.modules.update(saved)


def import_nobuco():
    """nobuco, imported once per process under the shims above."""
    if "nobuco" in sys.modules:
        return sys.modules["nobuco"]
    with _import_shims():
        import nobuco
    return nobuco


def torch_to_saved_model(model, example, staged: Path, *, trace_rows: int = 2) -> dict:
    """Write `model` (a torch.nn.Module called positionally, one input or named ones in forward's order)
    as a SavedModel in `staged`. `example`: one array or {name: array}, batch first. Returns what it did;
    raises whatever nobuco or TensorFlow raised (the caller words it)."""
    import tensorflow as tf
    import torch

    from exporters.base import forward_order
    from parity.feeds import flatten_outputs

    nobuco = import_nobuco()
    order = forward_order(model, example) if isinstance(example, dict) else ["x"]
    arrays = example if isinstance(example, dict) else {"x": example}
    sample = [torch.from_numpy(np.ascontiguousarray(arrays[k][:trace_rows])) for k in order]
    model.eval()
    with torch.no_grad():
        out_names = list(flatten_outputs(model(*sample), lambda t: t))

    class Positional(torch.nn.Module):  # nobuco traces positional arguments into a tuple of tensors
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return tuple(flatten_outputs(self.inner(*args), lambda t: t).values())

    trace = io.StringIO()  # nobuco prints its whole trace, coloured
    with contextlib.redirect_stdout(trace), torch.no_grad():
        keras_model = nobuco.pytorch_to_keras(
            Positional(model).eval(), args=sample,
            input_shapes={t: (None, *t.shape[1:]) for t in sample},
            inputs_channel_order=nobuco.ChannelOrder.PYTORCH, outputs_channel_order=nobuco.ChannelOrder.PYTORCH,
            trace_shape=True, save_trace_html=False)

    specs = [tf.TensorSpec([None, *arrays[k].shape[1:]], tf.as_dtype(arrays[k].dtype), name=k) for k in order]
    module = tf.Module()
    module.keras_model = keras_model

    @tf.function(input_signature=specs, autograph=False)
    def serve(*args):
        ys = keras_model(list(args) if len(args) > 1 else args[0], training=False)
        ys = ys if isinstance(ys, (list, tuple)) else [ys]
        return {n: tf.identity(y, name=n) for n, y in zip(out_names, ys)}

    module.serve = serve
    tf.saved_model.save(module, str(staged), signatures={"serving_default": serve})
    return {"inputs": order, "outputs": out_names,
            "versions": {"nobuco": _version("nobuco"), "tf_keras": _version("tf_keras")}}


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"
