"""A Keras model -> TorchScript by Keras 3 itself on its torch backend, without ONNX.

The TorchScript exporter's second route for a Keras model whose ONNX graph onnx2fx cannot convert. A
`.keras` file holds no backend: loaded with KERAS_BACKEND=torch, the model is a torch.nn.Module whose
call runs torch ops, which torch.jit.trace records like any module. The backend is fixed when Keras is
first imported, so this runs in a process of its own; the lane that asks keeps its own imports.

    python -m exporters.keras_torch_route MODEL.keras EXAMPLE.npz OUT.pt   # prints one JSON line
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from exporters.base import ExportError

ROUTE = "keras.saving.load_model under KERAS_BACKEND=torch -> torch.jit.trace"
TIMEOUT_S = 600


def keras_file(trained_dir: str | None) -> Path | None:
    """The .keras file a train stage kept (a model brought as a file); None for weights of a factory."""
    if not trained_dir:
        return None
    found = sorted(Path(trained_dir).glob("pretrained.keras"))
    return found[0] if found else None


def convert(keras_path: Path, example, out_path: Path, name: str) -> dict:
    """Run this module in a child process; returns its facts (batch_sizes, details). Raises ExportError
    with the child's own last words when it fails."""
    with tempfile.TemporaryDirectory(prefix="keras-torch-") as tmp:
        npz = Path(tmp) / "example.npz"
        np.savez(npz, **(example if isinstance(example, dict) else {"x": example}))  # "x": one unnamed input
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "KERAS_BACKEND": "torch", "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        try:
            done = subprocess.run([sys.executable, "-m", "exporters.keras_torch_route", str(keras_path), str(npz),
                                   str(out_path)], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise ExportError(f"torchscript export of {name} (keras on torch): no answer in {TIMEOUT_S} s") from e
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines or not out_path.is_file():
        tail = [ln for ln in (done.stderr or "").strip().splitlines() if ln.strip()][-2:]
        raise ExportError(f"torchscript export of {name} (keras on torch): exit code {done.returncode}: "
                          f"{' / '.join(tail) or 'no output'}")
    return json.loads(lines[-1])


def _main(keras_path: str, example_npz: str, out_path: str) -> None:
    import warnings
    warnings.simplefilter("ignore")
    import keras
    import torch

    from exporters.base import keras_feed, keras_input_names, package_version
    from exporters.torchscript import _trace

    if keras.backend.backend() != "torch":
        raise SystemExit(f"expected the torch backend, Keras started with {keras.backend.backend()!r}")
    model = keras.saving.load_model(keras_path, compile=False)
    with np.load(example_npz) as f:
        example = {k: f[k] for k in f.files}
    # one input is called positionally, as model(x) does; several go by the model's input names
    names = list(example) if len(example) == 1 else (keras_input_names(model) or list(example))

    class KerasOnTorch(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *xs):
            x = xs[0] if len(xs) == 1 else dict(zip(names, xs))
            return self.inner(keras_feed(self.inner, x) if len(xs) > 1 else x, training=False)

    module = KerasOnTorch(model).eval()
    traced, batch_sizes, details = _trace(module, Path(keras_path).stem, "keras", [example[n] for n in names])
    torch.jit.save(traced, out_path)
    details["versions"] = {"keras": package_version("keras"), "torch": package_version("torch")}
    details["input_names"] = names
    print(json.dumps({"batch_sizes": batch_sizes, "details": details}, default=str))


if __name__ == "__main__":
    _main(*sys.argv[1:4])
