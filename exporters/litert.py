"""LiteRT (.tflite): three variants per model, run in the LiteRT interpreter (ai_edge_litert), one thread.

Variants and files
  fp32  model.tflite        float32 weights and activations
  fp16  model_fp16.tflite   float16 weights (dequantized to float32 at load), float32 activations
  int8  model_int8.tflite   dynamic-range int8: int8 weights (per channel), float32 inputs/outputs,
                            activations quantized on the fly by the kernels. No calibration data is used,
                            so options["calibration"] is not needed (and is ignored).

Routes
- keras: `tf.lite.TFLiteConverter.from_saved_model(<the SavedModel artifact>)`; fp16 with
  `optimizations=[Optimize.DEFAULT]` + `target_spec.supported_types=[tf.float16]`; int8 with
  `optimizations=[Optimize.DEFAULT]` and no representative dataset. The `serving_default` signature keeps a
  dynamic batch (-1), which the interpreter resizes per call. jax models take the same route from the
  jax2tf SavedModel (the converter lowers its XlaCallModule op).
- torch: litert-torch (`litert_torch.signature(name, module, args)...convert(quant_config=...)`). A
  dynamic batch fails inside its JAX bridge, so the model is traced once per batch size in
  options["batch_sizes"] (default [1, 16]), one signature `batch_<n>` each, in one file sharing the weights.
  fp16 and int8 use litert-torch's own quantization hook (`quant_config=`, which runs ai-edge-quantizer on
  the converted model): `quant_recipes.full_fp16_recipe()` (fp16 weight-only) and
  `quant_recipes.full_dynamic_recipe()` (int8 dynamic range, channel-wise).

Any batch N: the runner uses a signature with a dynamic batch; else the signature whose static batch is
N; else it resizes the largest static signature to N if that was proven to work (the same rows give the
same outputs after `resize_tensor_input(strict=False)`: measured at export, recorded as
details["resize_ok"], re-measured at load if absent); else it splits the batch into chunks of the static
batch sizes, zero-pads the last chunk and trims the output. details["batch_strategy"] says which.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporters.base import (Artifact, ArtifactLoadError, BaseRunner, ExportError, example_batch, family_of,
                            forward_order, package_version, pick_runtime, size_of, unsupported_family)
from parity.signature import Signature, TensorSpec

FORMAT = "litert"
REQUIRES = {"tensorflow": ("saved_model",), "torch": (), "jax": ("saved_model",), "keras-jax": ("saved_model",),
            "keras-torch": ()}
# the installed distributions whose versions decide the artifact (per family) and its runtime's answers
CONVERTER_PACKAGES = {"tensorflow": ("tensorflow",), "torch": ("litert-torch", "torch"), "jax": ("tensorflow",),
                      "keras-jax": ("tensorflow",), "keras-torch": ("litert-torch", "torch", "keras")}
RUNTIME_PACKAGES = ("ai-edge-litert",)
RUNTIMES = ("litert-interpreter",)
LANE = {"tensorflow": "tensorflow", "torch": "torch", "jax": "tensorflow",  # TFLiteConverter vs litert-torch
        "keras-jax": "tensorflow", "keras-torch": "keras-torch"}
RUNTIME_LANE = "any"  # the process that loads the artifact ("any": no framework)

VARIANTS = ("fp32", "fp16", "int8")
OPTIONS = ("int8_fallback", "int8_max_float_layers")  # [export.litert]: the int8 variant's layers left in float
SUFFIXES = (".tflite",)
FILES = {"fp32": "model.tflite", "fp16": "model_fp16.tflite", "int8": "model_int8.tflite"}
DEFAULT_BATCH_SIZES = (1, 16)
QUANTIZATION = {
    "fp32": "none",
    "fp16": "float16 weights, float32 activations",
    "int8": "dynamic-range int8 weights (per channel), float32 inputs/outputs; no calibration data",
}


QUANTIZATION_WITH_FALLBACK = ("int8 weights and activations calibrated on training rows, float32 inputs/outputs; "
                              "the layers int8_fallback names left in float")


# --------------------------------------------------------------------------------------------- export

def export(model, *, framework: str, name: str, example: np.ndarray, out_dir, upstream: dict | None = None,
           options: dict | None = None, expected=None, family: str | None = None) -> list[Artifact]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = example_batch(example, FORMAT, name, framework, several=True)
    options = dict(options or {})
    family = family_of(framework, family)
    if family in ("tensorflow", "jax", "keras-jax"):  # jax: the jax2tf SavedModel (one XlaCallModule op),
        made = _export_saved_model(name, out_dir, upstream or {}, options, example, expected)  # which it lowers
    elif family in ("torch", "keras-torch"):  # Keras on torch: its model is a torch.nn.Module
        made = _export_torch(model, name, example, out_dir, options)
    else:
        raise unsupported_family(FORMAT, name, family, REQUIRES)

    artifacts = []
    for variant, (path, route, export_s, extra) in made.items():
        label = f"{name}/litert" + ("" if variant == "fp32" else f"-{variant}")
        interp = _open_interpreter(path, label, ExportError)
        sigs = _signatures_of(path, label, error=ExportError, interp=interp)
        static = sorted({s["batch"] for s in sigs.values() if s["batch"] is not None})
        dynamic = any(s["batch"] is None for s in sigs.values())
        details: dict[str, Any] = {
            "signatures": sigs,
            "quantization": QUANTIZATION_WITH_FALLBACK if "int8_fallback" in extra else QUANTIZATION[variant],
            "tensor_dtypes": _tensor_dtypes(interp),
            **extra,
        }
        want = {"fp16": "float16", "int8": "int8"}.get(variant)
        if want and want not in details["tensor_dtypes"]:
            details["note"] = (f"the converter left every weight in float32 (no {want} tensor in the file; "
                               f"converters skip small weights, e.g. TFLiteConverter those under 1024 elements): "
                               f"this file computes as fp32")
        if not dynamic:
            ok, why = _probe_resize(path, sigs, probe_rows=example)
            details["resize_ok"] = ok
            details["resize_probe"] = why
        details["batch_strategy"] = _strategy_text(dynamic, static, details.get("resize_ok", False))
        artifacts.append(Artifact(
            model=name, format=FORMAT, variant=variant, path=str(path), framework=framework, route=route,
            batch_sizes=None if dynamic else static, input_layout="as-trained",
            size_bytes=size_of(path), export_s=export_s, details=details))
    return artifacts


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _export_saved_model(name: str, out_dir: Path, upstream: dict, options: dict | None = None, example=None,
                        expected=None) -> dict:
    sms = upstream.get("saved_model") or []
    if not sms:
        raise ExportError(f"litert artifact {name}: the keras route converts the SavedModel artifact, expected "
                          f"upstream['saved_model'] with one artifact, found {sorted(upstream) or 'none'}")
    sm_path = Path(sms[0].path)
    if not (sm_path / "saved_model.pb").is_file():
        raise ExportError(f"litert artifact {name}: expected a SavedModel (saved_model.pb) at {sm_path}, "
                          f"found {'nothing' if not sm_path.exists() else 'no saved_model.pb'}")

    import tensorflow as tf

    versions = {"tensorflow": tf.__version__, "ai_edge_litert": package_version("ai-edge-litert")}
    made = {}
    fallback = (options or {}).get("int8_fallback")
    for variant in VARIANTS:
        t0 = time.perf_counter()
        if variant == "int8" and fallback and example is not None and expected is not None:
            made[variant] = _int8_with_fallback(name, sm_path, out_dir, fallback, options, example, expected, versions)
            continue
        try:
            converter = tf.lite.TFLiteConverter.from_saved_model(str(sm_path))
            if variant == "fp16":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            elif variant == "int8":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]   # no representative dataset: dynamic range
            data = converter.convert()
        except Exception as e:  # noqa: BLE001 - the converter's error, rewrapped with context
            raise ExportError(f"litert artifact {name} ({variant}): TFLiteConverter.from_saved_model({sm_path}) "
                              f"failed: {type(e).__name__}: {e}") from e
        path = out_dir / FILES[variant]
        _write_atomic(path, data)
        route = "tf.lite.TFLiteConverter.from_saved_model" + {
            "fp32": "", "fp16": " + Optimize.DEFAULT, supported_types=[float16]",
            "int8": " + Optimize.DEFAULT (dynamic range, no representative dataset)"}[variant]
        made[variant] = (path, route, time.perf_counter() - t0,
                         {"source_saved_model": str(sm_path), "versions": versions})
    return made


def _int8_with_fallback(name: str, sm_path: Path, out_dir: Path, fallback: dict, options: dict, example, expected,
                        versions: dict) -> tuple:
    """The int8 variant quantized with calibration rows, its worst layers left in float until it meets
    the cell's tolerance (exporters/int8_fallback.py)."""
    from .int8_fallback import quantize_with_fallback
    t0 = time.perf_counter()
    if isinstance(example, dict) or options.get("calibration") is None:
        raise ExportError(f"litert artifact {name} (int8): int8_fallback needs one input array and calibration "
                          f"rows; this model has {'several inputs' if isinstance(example, dict) else 'no calibration rows'}")
    try:
        data, found = quantize_with_fallback(  # on every parity row where the caller gives them
            str(sm_path), options["calibration"], np.asarray(fallback.get("x", example)),
            np.asarray(fallback.get("y", expected)),
            tolerance=fallback["tolerance"], task=fallback.get("task", "regression"),
            max_float_layers=int(fallback.get("max_float_layers", 8)))
    except Exception as e:  # noqa: BLE001 - the converter's or debugger's words, with what was being done
        raise ExportError(f"litert artifact {name} (int8): quantization with int8_fallback = \"auto\" failed: "
                          f"{type(e).__name__}: {e}") from e
    path = out_dir / FILES["int8"]
    _write_atomic(path, data)
    kept = found["float_layers"]
    route = (f"tf.lite.TFLiteConverter.from_saved_model + Optimize.DEFAULT + representative_dataset "
             f"({found['calibration_rows']} rows), int8_fallback: {len(kept)} layer(s) left in float")
    return path, route, time.perf_counter() - t0, {"source_saved_model": str(sm_path), "versions": versions,
                                                   "int8_fallback": found}


def _export_torch(model, name: str, example: np.ndarray, out_dir: Path, options: dict) -> dict:
    batch_sizes = options.get("batch_sizes") or DEFAULT_BATCH_SIZES
    try:
        batch_sizes = sorted({int(b) for b in batch_sizes})
    except (TypeError, ValueError) as e:
        raise ExportError(f"litert artifact {name}: options['batch_sizes'] must be positive integers, "
                          f"found {batch_sizes!r}") from e
    if not batch_sizes or batch_sizes[0] < 1:
        raise ExportError(f"litert artifact {name}: options['batch_sizes'] must be positive integers, "
                          f"found {batch_sizes!r}")
    # several named inputs go by the forward's positional order (litert-torch names them args_0, ...)
    arrays = [example[n] for n in forward_order(model, example)] if isinstance(example, dict) else [example]
    if arrays[0].ndim < 1 or arrays[0].shape[0] < 1:
        raise ExportError(f"litert artifact {name}: expected an example batch with at least one row, "
                          f"found shape {list(arrays[0].shape)}")

    import torch

    import litert_torch
    from litert_torch.generative.quantize import quant_recipes

    versions = {"torch": torch.__version__, "litert_torch": litert_torch.__version__,
                "ai_edge_quantizer": package_version("ai-edge-quantizer"), "ai_edge_litert": package_version("ai-edge-litert")}
    recipes = {"fp32": (None, ""), "fp16": (quant_recipes.full_fp16_recipe, "quant_recipes.full_fp16_recipe()"),
               "int8": (quant_recipes.full_dynamic_recipe, "quant_recipes.full_dynamic_recipe()")}

    # static sample batches, one per signature, cut from (or tiled over) the real example rows
    rows = arrays[0].shape[0]
    samples = {b: tuple(torch.from_numpy(np.ascontiguousarray(a[np.arange(b) % rows])) for a in arrays)
               for b in batch_sizes}
    was_training = model.training
    prev_progress = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"  # litert-torch's own switch for its progress lines (read per call)
    model.eval()
    made = {}
    try:
        for variant in VARIANTS:
            make_recipe, recipe_name = recipes[variant]
            t0 = time.perf_counter()
            log = io.StringIO()
            try:
                converter = None
                for b in batch_sizes:
                    converter = (litert_torch.signature(f"batch_{b}", model, samples[b]) if converter is None
                                 else converter.signature(f"batch_{b}", model, samples[b]))
                with contextlib.redirect_stdout(log):   # ai-edge-quantizer prints a size summary
                    edge_model = converter.convert(quant_config=make_recipe() if make_recipe else None)
                path = out_dir / FILES[variant]
                tmp = path.with_name(f".{path.name}.tmp")
                with contextlib.redirect_stdout(log):
                    edge_model.export(str(tmp))
                os.replace(tmp, path)
            except Exception as e:  # noqa: BLE001
                raise ExportError(f"litert artifact {name} ({variant}): litert_torch.convert with signatures "
                                  f"{['batch_%d' % b for b in batch_sizes]}"
                                  f"{' and quant_config=' + recipe_name if recipe_name else ''} failed: "
                                  f"{type(e).__name__}: {e}") from e
            route = (f"litert_torch.signature(batch_<n>, module, static sample) x {len(batch_sizes)}.convert("
                     + (f"quant_config={recipe_name}" if recipe_name else "") + ")")
            made[variant] = (path, route, time.perf_counter() - t0,
                             {"requested_batch_sizes": batch_sizes, "versions": versions,
                              "dynamic_batch": "not attempted: a dynamic batch fails inside litert-torch's "
                                               "JAX bridge; one static signature per batch size instead"})
    finally:
        model.train(was_training)
        if prev_progress is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = prev_progress
    return made


# ----------------------------------------------------------------------------------- signatures, resize

def _open_interpreter(path: Path, label: str, error=ArtifactLoadError, expected_size: int | None = None):
    from ai_edge_litert.interpreter import Interpreter

    path = Path(path)
    if not path.is_file():
        raise error(f"litert artifact {label}: expected a .tflite file at {path}, found "
                    f"{'a folder' if path.exists() else 'nothing'}")
    found = path.stat().st_size
    if expected_size and found != expected_size:
        raise error(f"litert artifact {label}: expected {expected_size} bytes at {path}, found {found} "
                    f"(truncated or replaced)")
    try:
        interp = Interpreter(model_path=str(path), num_threads=1)
        sig_list = interp.get_signature_list()
        if not sig_list:
            raise ValueError("the model declares no signatures")
        for key in sig_list:
            interp.get_signature_runner(key)
    except Exception as e:  # noqa: BLE001 - not a flatbuffer, bad schema, unknown ops, ...
        raise error(f"litert artifact {label}: the LiteRT interpreter could not load {path} ({found} bytes): "
                    f"{type(e).__name__}: {str(e).strip()[:300]}") from e
    return interp


def _signatures_of(path: Path, label: str, error=ArtifactLoadError, interp=None) -> dict[str, dict]:
    """{signature key: {input, output, batch (None = dynamic), feature_shape, dtype}}."""
    interp = interp or _open_interpreter(path, label, error)
    out = {}
    for key, io_names in interp.get_signature_list().items():
        if not io_names["inputs"] or not io_names["outputs"]:
            raise error(f"litert artifact {label}: expected inputs and outputs in signature {key!r}, "
                        f"found inputs {io_names['inputs']} and outputs {io_names['outputs']}")
        runner = interp.get_signature_runner(key)
        ins, outs = runner.get_input_details(), runner.get_output_details()
        (in_name, ind), (out_name, outd) = next(iter(ins.items())), next(iter(outs.items()))
        sig_shape = [int(d) for d in ind["shape_signature"]]
        if not sig_shape:
            raise error(f"litert artifact {label}: signature {key!r} input {in_name!r} is a scalar; "
                        f"expected a batch dimension")
        out[key] = {"input": in_name, "output": out_name, "input_tensor": ind["name"],
                    "output_tensor": outd["name"],
                    "batch": None if sig_shape[0] == -1 else sig_shape[0],
                    "feature_shape": sig_shape[1:], "dtype": np.dtype(ind["dtype"]).name,
                    "output_shape": [int(d) for d in outd["shape_signature"]],
                    "output_dtype": np.dtype(outd["dtype"]).name,
                    "inputs": {n: {"dtype": np.dtype(d["dtype"]).name, "shape": [int(v) for v in d["shape_signature"]]}
                               for n, d in ins.items()},
                    "outputs": {n: {"dtype": np.dtype(d["dtype"]).name, "shape": [int(v) for v in d["shape_signature"]]}
                                for n, d in outs.items()}}
    return out


def _tensor_dtypes(interp) -> dict[str, int]:
    """How many tensors of each dtype the first subgraph holds: shows whether quantization really happened
    (converters leave small weights in float32, e.g. TFLiteConverter below 1024 elements)."""
    counts: dict[str, int] = {}
    for t in interp.get_tensor_details():
        name = np.dtype(t["dtype"]).name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _strategy_text(dynamic: bool, static: list[int], resize_ok: bool) -> str:
    if dynamic:
        return "dynamic batch: the input is resized to N per call"
    text = f"static signatures for batch {static}: a matching signature when N is one of them"
    if resize_ok:
        return text + f", else resize_tensor_input(strict=False) of the batch-{static[-1]} signature to N"
    return text + f", else chunks of {static[-1]} (the last filled up to a signature size by repeating its last row, output trimmed)"


def _probe_resize(path: Path, sigs: dict, probe_rows: np.ndarray | None = None) -> tuple[bool, str]:
    """Can the largest static signature run another batch size after resize_tensor_input(strict=False)?

    Run B rows at the static batch B, then the same rows plus 3 more at B+3 in a separate interpreter;
    resizing is accepted only if it runs and the first B rows come out the same.
    """
    key, sig = max(sigs.items(), key=lambda kv: kv[1]["batch"])
    b = sig["batch"]
    if len(sig["inputs"]) > 1:
        return False, f"not probed for a signature of {len(sig['inputs'])} inputs: other batch sizes go in chunks"
    feat = [d if d > 0 else 1 for d in sig["feature_shape"]]
    if probe_rows is not None and list(probe_rows.shape[1:]) == feat:
        rows = probe_rows[np.arange(b + 3) % probe_rows.shape[0]].astype(sig["dtype"])
    else:
        rows = np.random.default_rng(0).random((b + 3, *feat)).astype(sig["dtype"])
    try:
        interp = _open_interpreter(path, "probe", ArtifactLoadError)
        runner = interp.get_signature_runner(key)
        y_static = runner(**{sig["input"]: rows[:b]})[sig["output"]]
        y_big = runner(**{sig["input"]: rows})[sig["output"]]
    except Exception as e:  # noqa: BLE001 - a failed resize is the answer "no"
        return False, f"resize of {key!r} from {b} to {b + 3} rows failed: {type(e).__name__}: {str(e)[:200]}"
    if y_big.shape[0] != b + 3:
        return False, f"resize of {key!r} to {b + 3} rows gave an output of shape {list(y_big.shape)}"
    diff = float(np.max(np.abs(y_big[:b].astype(np.float64) - y_static))) if y_static.size else 0.0
    if diff > 1e-6 * (1.0 + float(np.max(np.abs(y_static)))):
        return False, f"resize of {key!r} to {b + 3} rows changed the outputs of the same rows by {diff:.3g}"
    return True, f"resize of {key!r} from {b} to {b + 3} rows runs and reproduces the same rows (max diff {diff:.3g})"


# ---------------------------------------------------------------------------------------------- load

class LiteRTRunner(BaseRunner):
    """The LiteRT interpreter, one thread. A dynamic-batch signature takes any batch; static signatures
    (one per batch size) take their own, any other batch either by resizing the largest (where that was
    proven to give the same rows) or in padded chunks (BaseRunner)."""

    runtime = "litert-interpreter"

    def __init__(self, artifact: Artifact):
        label = artifact.label
        path = Path(artifact.path)
        interp = _open_interpreter(path, label, ArtifactLoadError, expected_size=artifact.size_bytes or None)
        try:
            sigs = _signatures_of(path, label, ArtifactLoadError, interp=interp)
        except ArtifactLoadError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ArtifactLoadError(f"litert artifact {label}: could not read the signatures of {path}: "
                                    f"{type(e).__name__}: {e}") from e
        feats = {json.dumps({n: (d["shape"][1:], d["dtype"]) for n, d in s["inputs"].items()}, sort_keys=True)
                 for s in sigs.values()}
        if len(feats) != 1:
            raise ArtifactLoadError(f"litert artifact {label}: expected all signatures to take the same "
                                    f"inputs, per-row shapes and dtypes, found {sorted(feats)}")
        self._interp, self._sigs = interp, sigs
        self._runners = {k: interp.get_signature_runner(k) for k in sigs}
        self._dynamic = next((k for k, s in sigs.items() if s["batch"] is None), None)
        self._static = {s["batch"]: k for k, s in sigs.items() if s["batch"] is not None}
        first = sigs[self._dynamic or self._static[max(self._static)]]

        def dims(shape):
            return (None, *(d if d > 0 else None for d in shape[1:]))
        signature = Signature(tuple(TensorSpec(n, d["dtype"], dims(d["shape"])) for n, d in first["inputs"].items()),
                              tuple(TensorSpec(n, d["dtype"], dims(d["shape"])) for n, d in first["outputs"].items()))
        super().__init__(artifact, signature, static_batches=None if self._dynamic else sorted(self._static))
        self.resize_ok = False
        probe = "not needed"
        if self._dynamic is None:
            recorded = (artifact.details or {}).get("resize_ok")
            if recorded is None:
                self.resize_ok, probe = _probe_resize(path, sigs)
                probe = "measured at load: " + probe
            else:
                self.resize_ok, probe = bool(recorded), "recorded at export: " + str(
                    (artifact.details or {}).get("resize_probe", ""))
        self.details = {
            "signatures": sigs,
            "batch_strategy": _strategy_text(self._dynamic is not None, sorted(self._static), self.resize_ok),
            "resize_probe": probe,
            "num_threads": 1,
            "ai_edge_litert": package_version("ai-edge-litert"),
        }

    def feed_sizes(self, n_rows: int):
        return None if self.resize_ok else self.static_batches

    def describe_call(self, n_rows: int) -> str:
        if self._dynamic is not None:
            return f"dynamic batch: {self._dynamic!r} resized to {n_rows}"
        if n_rows in self._static:
            return f"signature {self._static[n_rows]!r}"
        return f"signature {self._static[max(self._static)]!r} resized to {n_rows}"

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(feed.values())))
        key = self._dynamic or self._static.get(n) or self._static[max(self._static)]
        out = self._runners[key](**feed)
        return {name: out[name] for name in self.signature.output_names}

    def close(self) -> None:
        super().close()
        self._runners = {}
        self._interp = None


def load(artifact: Artifact, runtime: str | None = None) -> LiteRTRunner:
    pick_runtime(FORMAT, artifact, runtime, RUNTIMES)
    return LiteRTRunner(artifact)
