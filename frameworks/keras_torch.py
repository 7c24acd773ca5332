"""Keras 3 on its PyTorch backend: `framework = "keras"` with `backend = "torch"` in a spec. The same
keras.Model from a factory as the `keras` style, trained by `fit` in a lane whose process imports Keras
with KERAS_BACKEND=torch; the model is then a torch.nn.Module. The exporters see the "keras-torch"
family: Keras' own `export` makes ONNX (through torch.onnx), TorchScript traces the module, LiteRT
converts it with litert-torch, and the SavedModel and TF.js come from the ONNX file."""
from __future__ import annotations

from .keras import Adapter  # noqa: F401 - the keras style's adapter, backend-aware

NAME = "keras_torch"
BACKEND = "torch"
FAMILY = "keras-torch"
LANE = "keras-torch"
LANE_ENVIRONMENT = {"KERAS_BACKEND": "torch"}  # set in the lane's process before Keras is first imported
BUILDS_ON = ("keras",)
PACKAGES = ("torch", "keras")  # imported in this order when the lane starts
INSTALL = "pip install torch (Keras 3 comes with tensorflow)"
PRETRAINED_SUFFIXES = (".keras",)  # saved by Keras on any backend
FLAVOR = "keras"
PRECISIONS = ("fp32", "bf16")  # Keras' mixed_bfloat16 policy (frameworks/precision.py: fp16 is refused on a CPU)
DISTRIBUTION = None
NOT_DISTRIBUTED = ("Keras' torch backend trains in one process (keras.distribution covers only JAX); several "
                   "workers train only on the TensorFlow backend (MultiWorkerMirroredStrategy)")
