"""Keras 3 on its JAX backend: `framework = "keras"` with `backend = "jax"` in a spec. The same
keras.Model from a factory as the `keras` style, trained by `fit` in a lane whose process imports Keras
with KERAS_BACKEND=jax. The exporters see the "keras-jax" family: Keras' own `export` makes the
SavedModel (through jax2tf) and ONNX (through jax2onnx); the other formats are converted from those."""
from __future__ import annotations

from .keras import Adapter  # noqa: F401 - the keras style's adapter, backend-aware

NAME = "keras_jax"
BACKEND = "jax"
FAMILY = "keras-jax"
LANE = "keras-jax"
LANE_ENVIRONMENT = {"KERAS_BACKEND": "jax"}  # set in the lane's process before Keras is first imported
BUILDS_ON = ("keras",)
PACKAGES = ("jax", "keras")  # imported in this order when the lane starts
INSTALL = "pip install jax (Keras 3 comes with tensorflow)"
PRETRAINED_SUFFIXES = (".keras",)  # saved by Keras on any backend
FLAVOR = "keras"
PRECISIONS = ("fp32", "bf16")  # Keras' mixed_bfloat16 policy (frameworks/precision.py: fp16 is refused on a CPU)
DISTRIBUTION = None
NOT_DISTRIBUTED = ("Keras spreads training over JAX devices with its distribution API (keras.distribution) "
                   "inside one process, not over worker processes; several workers train only on the "
                   "TensorFlow backend (MultiWorkerMirroredStrategy)")
