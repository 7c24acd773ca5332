"""TensorFlow SavedModel: written by Keras itself, or from the ONNX artifact by onnx2tf for PyTorch models.

Routes
- keras: `model.export(dir, format="tf_saved_model")`; the `serving_default` signature keeps a dynamic batch.
- torch: the upstream ONNX file (exporters/onnx.py) -> `onnx2tf.convert(...)` -> SavedModel, or where
  onnx2tf refuses it, nobuco on the module itself (exporters/nobuco_route.py), or onnx2tf on the ONNX
  stage's batch-1 export; every route left is recorded with its reason. onnx2tf
  rewrites its input file, so it works on a copy in a temp dir; it also writes .tflite files beside the
  SavedModel, which are dropped here (LiteRT has its own route, exporters/litert.py). onnx2tf may turn a
  channels-first input (NCW/NCHW/NCDHW) into channels-last; which layout the SavedModel wants is measured
  on the example batch against the torch model, recorded in `input_layout` / details["input_transpose"],
  and the runner transposes so callers always feed the layout the model was trained with.
- jax: `jax2tf.convert(apply)` (batch polymorphic, lowered for the CPU), the parameters as tf.Variables of a
  tf.Module, saved with a tf.function `serving_default` taking "x"; the graph is one XlaCallModule op.

Runtime "tensorflow": `tf.saved_model.load(path).signatures["serving_default"]`, the single input
mapped by its name in the signature's structured_input_signature, the single output returned as numpy.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporters.base import (Artifact, ArtifactLoadError, BaseRunner, ExportError, example_batch, family_of,
                            forward_order, graph_order, pick_runtime, size_of, unsupported_family)
from parity.feeds import flat_rows, take
from parity.signature import Signature, TensorSpec

FORMAT = "saved_model"
REQUIRES = {"tensorflow": (), "torch": ("onnx",), "jax": (), "keras-jax": (), "keras-torch": ("onnx",)}
# the installed distributions whose versions decide the artifact (per family) and its runtime's answers:
# both join the stages' cache keys, so an upgraded converter or runtime makes and checks anew
CONVERTER_PACKAGES = {"tensorflow": ("tensorflow", "keras"), "torch": ("torch", "onnx", "onnx2tf", "nobuco", "tensorflow"),
                      "jax": ("jax", "tensorflow"), "keras-jax": ("keras", "jax", "tensorflow"),
                      "keras-torch": ("onnx", "onnx2tf", "tensorflow")}
RUNTIME_PACKAGES = ("tensorflow",)
RUNTIMES = ("tensorflow",)
# nobuco converts the torch module itself when onnx2tf refuses the ONNX file; a Keras model on torch is
# loaded with the same weights on this lane's TensorFlow backend, and Keras exports it
LATER_ROUTES_TAKE_MODEL = ("torch", "keras-torch")
LANE = {"tensorflow": "tensorflow", "torch": "tensorflow", "jax": "tensorflow",  # onnx2tf, jax2tf need TensorFlow;
        "keras-jax": "keras-jax", "keras-torch": "tensorflow"}  # Keras' own export runs on its JAX backend (jax2tf)
RUNTIME_LANE = "tensorflow"  # the process that loads the artifact ("any": no framework)

SIGNATURE_KEY = "serving_default"
MARKER = "saved_model.pb"  # a folder holding it is a SavedModel
_DIR_NAME = "saved_model"


# --------------------------------------------------------------------------------------------- export

def export(model, *, framework: str, name: str, example: np.ndarray, out_dir, upstream: dict,
           options: dict | None = None, expected=None, family: str | None = None) -> list[Artifact]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    example = example_batch(example, FORMAT, name, framework, several=True)
    family = family_of(framework, family)
    if family in ("tensorflow", "keras-jax"):  # Keras on JAX: Model.export lowers it through jax2tf
        return [_export_tensorflow(model, framework, name, example, out_dir)]
    if family in ("torch", "keras-torch"):  # Keras on torch: from its ONNX file (its own export needs torch_xla)
        return [_export_torch(model, framework, name, example, out_dir, upstream or {}, expected,
                              (options or {}).get("load_model"), keras=family == "keras-torch")]
    if family == "jax":
        return [_export_jax(model, framework, name, example, out_dir)]
    raise unsupported_family(FORMAT, name, family, REQUIRES)


def _replace_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(src, dst)


def _export_tensorflow(model, framework: str, name: str, example: np.ndarray, out_dir: Path) -> Artifact:
    """A Keras model by its own export; a tf.Module by tf.saved_model.save with its serving function
    (a tf.function with an input signature) as `serving_default`."""
    import keras
    import tensorflow as tf

    is_keras = isinstance(model, keras.Model)
    if is_keras:
        route = 'keras Model.export(format="tf_saved_model")'
    else:
        route = "tf.saved_model.save(module, signatures={'serving_default': module.__call__})"
    t0 = time.perf_counter()
    final = out_dir / _DIR_NAME
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".saved_model-") as tmp:
        staged = Path(tmp) / _DIR_NAME
        try:
            if is_keras:
                model.export(str(staged), format="tf_saved_model", verbose=False)
            else:
                tf.saved_model.save(model, str(staged),
                                    signatures={SIGNATURE_KEY: model.__call__.get_concrete_function()})
        except Exception as e:  # noqa: BLE001 - the converter's own error, rewrapped with context
            raise ExportError(f"saved_model artifact {name}: {route} failed: {type(e).__name__}: {e}") from e
        _replace_dir(staged, final)
    export_s = time.perf_counter() - t0

    sig = _describe_signature(final, name)
    return Artifact(
        model=name, format=FORMAT, variant="fp32", path=str(final), framework=framework, route=route,
        batch_sizes=sig["batch_sizes"], input_layout="as-trained",
        size_bytes=size_of(final), export_s=export_s,
        details={"signature": SIGNATURE_KEY, "input_name": sig["input_name"],
                 "input_spec": sig["input_spec"], "output_name": sig["output_name"],
                 "output_spec": sig["output_spec"], "input_transpose": None,
                 "versions": {"tensorflow": tf.__version__, "keras": keras.__version__}},
    )


def _export_jax(model, framework: str, name: str, example, out_dir: Path) -> Artifact:
    """jax2tf.convert(apply) with the parameters held as tf.Variables of a tf.Module, a polymorphic batch
    dimension, and a tf.function serving signature taking "x" of [None, *input_shape]. The graph is one
    XlaCallModule op (JAX's native serialization, lowered for the CPU)."""
    if isinstance(example, dict):
        raise ExportError(f"saved_model artifact {name} (jax): the jax2tf route takes a model of one input; "
                          f"this model takes {len(example)} ({', '.join(example)})")
    import jax
    import tensorflow as tf
    from jax.experimental import jax2tf

    route = ("jax2tf.convert(apply, polymorphic_shapes=[None, '(b, ...)'], native_serialization_platforms=('cpu',)) "
             "-> tf.saved_model.save(signatures={'serving_default': ...})")
    t0 = time.perf_counter()
    final = out_dir / _DIR_NAME
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".saved_model-") as tmp:
        staged = Path(tmp) / _DIR_NAME
        try:
            module = tf.Module(name="jax_model")
            module.params = tf.nest.map_structure(lambda a: tf.Variable(np.asarray(a), trainable=False),
                                                  jax.tree_util.tree_map(np.asarray, model.params))
            converted = jax2tf.convert(model.apply, polymorphic_shapes=[None, "(b, ...)"], with_gradient=False,
                                       native_serialization_platforms=("cpu",))

            @tf.function(input_signature=[tf.TensorSpec([None, *example.shape[1:]], tf.float32, name="x")],
                         autograph=False)
            def serve(x):
                return {"output": converted(module.params, x)}
            module.serve = serve
            tf.saved_model.save(module, str(staged), signatures={SIGNATURE_KEY: serve})
        except Exception as e:  # noqa: BLE001 - the converter's own error, rewrapped with context
            raise ExportError(f"saved_model artifact {name}: {route} failed: {type(e).__name__}: {e}") from e
        _replace_dir(staged, final)
    export_s = time.perf_counter() - t0

    sig = _describe_signature(final, name)
    return Artifact(
        model=name, format=FORMAT, variant="fp32", path=str(final), framework=framework, route=route,
        batch_sizes=sig["batch_sizes"], input_layout="as-trained",
        size_bytes=size_of(final), export_s=export_s,
        details={"signature": SIGNATURE_KEY, "input_name": sig["input_name"],
                 "input_spec": sig["input_spec"], "output_name": sig["output_name"],
                 "output_spec": sig["output_spec"], "input_transpose": None,
                 "graph": "XlaCallModule (jax2tf native serialization, platform cpu)",
                 "versions": {"tensorflow": tf.__version__, "jax": jax.__version__}},
    )


def _torch_outputs(model, example) -> np.ndarray:
    import torch
    from parity.feeds import flatten_outputs
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            args = (torch.from_numpy(example),) if not isinstance(example, dict) else \
                tuple(torch.from_numpy(example[n]) for n in forward_order(model, example))
            return flat_rows(flatten_outputs(model(*args), lambda t: t.detach().cpu().numpy()))
    finally:
        model.train(was_training)


def _export_torch(model, framework: str, name: str, example: np.ndarray, out_dir: Path, upstream: dict,
                  expected=None, load_model=None, keras: bool = False) -> Artifact:
    """The routes of _torch_routes in turn; the first that writes a SavedModel is kept, and each one
    left is recorded with its reason. `load_model` gives the model, for the route that needs it: the
    torch module, or (`keras`) the Keras model, loaded in this process on its TensorFlow backend."""
    onnx_artifacts = upstream.get("onnx") or []
    onnx_artifact = onnx_artifacts[0] if onnx_artifacts else None
    if onnx_artifact is None and load_model is None:
        raise ExportError(f"saved_model artifact {name}: the torch route converts the ONNX artifact, "
                          f"expected upstream['onnx'] with one artifact, found {sorted(upstream) or 'none'}")

    import onnx2tf
    import tensorflow as tf

    t0 = time.perf_counter()
    final = out_dir / _DIR_NAME
    # `expected` (the model's stored outputs on `example`) spares importing torch next to TensorFlow
    ref = np.asarray(expected) if expected is not None else _torch_outputs(model, example)
    taken, left = None, []
    for route in _torch_routes(onnx_artifact, final, name, example, load_model, keras):
        try:
            route.facts = route.run()
            sig = _describe_signature(final, name)
            # Which layout does the SavedModel want? Measured on the example against the torch model.
            rows = slice(0, sig["batch_sizes"][0]) if sig["batch_sizes"] else slice(None)
            perm, errors = _measure_layout(final, sig, take(example, rows), ref[rows], name)
        except ExportError as e:
            left.append({"route": route.text, "why": str(e).split(": ", 1)[-1][:600]})
            continue
        taken = route
        break
    if taken is None:
        raise ExportError(f"saved_model artifact {name}: every route failed. "
                          + "\n".join(f"{i}) {r['route']}: {r['why']}" for i, r in enumerate(left, 1)))
    export_s = time.perf_counter() - t0
    route = taken.text + (" (the first route failed)" if left else "")
    facts = dict(taken.facts)
    route_versions = facts.pop("versions", {})
    if perm is None:
        layout = "as-trained"
    else:
        layout = (f"{_layout_name(example.ndim, channels_last=True)} inside the SavedModel "
                  f"(onnx2tf transposed it from {_layout_name(example.ndim, channels_last=False)}); "
                  f"the runner transposes with {list(perm)}, callers feed the as-trained layout")

    import onnx
    return Artifact(
        model=name, format=FORMAT, variant="fp32", path=str(final), framework=framework, route=route,
        batch_sizes=sig["batch_sizes"], input_layout=layout,
        size_bytes=size_of(final), export_s=export_s,
        details={"signature": SIGNATURE_KEY, "input_name": sig["input_name"],
                 "input_spec": sig["input_spec"], "output_name": sig["output_name"],
                 "output_spec": sig["output_spec"],
                 "input_transpose": None if perm is None else list(perm),
                 "layout_check_max_abs": errors,
                 "route_taken": taken.label, **facts,
                 **({"onnx_source": str(taken.onnx_path)} if taken.onnx_path else {}),
                 **({"routes_left": left} if left else {}),
                 "versions": {"tensorflow": tf.__version__, "onnx2tf": onnx2tf.__version__,
                              "onnx": onnx.__version__, **route_versions}},
    )


@dataclass
class _Route:
    label: str                        # short, for tables: "onnx2tf", "nobuco", "onnx2tf, batch 1"
    text: str                         # the record's route
    run: Callable[[], dict]           # writes the SavedModel at `final`; returns facts for the details
    onnx_path: Path | None = None     # the ONNX file it converts, if any
    facts: dict = field(default_factory=dict)


def _torch_routes(onnx_artifact: Artifact | None, final: Path, name: str, example, load_model,
                  keras: bool = False) -> list[_Route]:
    """1) onnx2tf on the dynamic-batch ONNX artifact; 2) nobuco on the torch module itself (a dynamic
    batch still), or for a Keras model on torch, Keras' own export of the same model and weights on the
    TensorFlow backend; 3) onnx2tf on the batch-1 export the ONNX stage keeps for graphs that compute with
    their shapes (the SavedModel then takes one row at a time)."""
    options = "onnx2tf.convert(not_use_onnxsim=True, output_signaturedefs=True)"
    onnx_path = Path(onnx_artifact.path) if onnx_artifact is not None else None

    def first():
        if onnx_path is None or not onnx_path.is_file():
            raise ExportError(f"saved_model artifact {name}: no ONNX file to convert "
                              f"({'the ONNX artifact could not be made' if onnx_path is None else f'nothing at {onnx_path}'})")
        return {"onnx2tf_extra_files_dropped": _onnx2tf(onnx_path, final, name)}
    routes = [_Route("onnx2tf", f"ONNX ({onnx_path.name if onnx_path else 'model.onnx'}) -> {options}", first,
                     onnx_path)]
    if load_model is not None and keras:
        routes.append(_Route("keras on tensorflow", KERAS_ON_TENSORFLOW,
                             lambda: keras_on_tensorflow(load_model, final, name)))
    elif load_model is not None:
        from exporters import nobuco_route
        routes.append(_Route("nobuco", nobuco_route.ROUTE,
                             lambda: _nobuco(load_model, example, final, name)))
    fixed_name = (onnx_artifact.details or {}).get("fixed_batch_copy") if onnx_artifact is not None else None
    fixed = onnx_path.with_name(fixed_name) if fixed_name else None
    if fixed is not None and fixed.is_file():
        routes.append(_Route("onnx2tf, batch 1", f"ONNX with a fixed batch of 1 ({fixed.name}) -> {options}",
                             lambda: {"onnx2tf_extra_files_dropped": _onnx2tf(fixed, final, name)}, fixed))
    return routes


KERAS_ON_TENSORFLOW = ("the same keras.Model and weights loaded on Keras' TensorFlow backend -> "
                       "Model.export(format=\"tf_saved_model\") (Keras' own export on torch needs torch_xla)")


def keras_on_tensorflow(load_model, final: Path, name: str) -> dict:
    import keras
    try:
        model = load_model()
    except Exception as e:  # noqa: BLE001 - the route cannot start: said as its reason
        raise ExportError(f"saved_model artifact {name}: loading the Keras model on the TensorFlow backend "
                          f"failed: {type(e).__name__}: {e}") from e
    if keras.backend.backend() != "tensorflow":
        raise ExportError(f"saved_model artifact {name}: this process runs Keras on {keras.backend.backend()}, "
                          f"expected TensorFlow")
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".saved_model-") as tmp:
        staged = Path(tmp) / _DIR_NAME
        try:
            model.export(str(staged), format="tf_saved_model", verbose=False)
        except Exception as e:  # noqa: BLE001 - the converter's own error, with what was being done
            raise ExportError(f"saved_model artifact {name}: Keras' export on TensorFlow failed: "
                              f"{type(e).__name__}: {str(e).strip()[:1500]}") from e
        _replace_dir(staged, final)
    return {"versions": {"keras": keras.__version__}}


def _nobuco(load_model, example, final: Path, name: str) -> dict:
    from exporters import nobuco_route
    try:
        model = load_model()
    except Exception as e:  # noqa: BLE001 - the route cannot start: said as its reason
        raise ExportError(f"saved_model artifact {name}: loading the torch module for nobuco failed: "
                          f"{type(e).__name__}: {e}") from e
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".saved_model-") as tmp:
        staged = Path(tmp) / _DIR_NAME
        try:
            facts = nobuco_route.torch_to_saved_model(model, example, staged)
        except ModuleNotFoundError as e:
            raise ExportError(f"saved_model artifact {name}: nobuco is not installed ({e}); "
                              f"pip install --no-deps nobuco==0.17.0 sty==1.0.6") from e
        except Exception as e:  # noqa: BLE001 - the converter's own error, with what was being done
            raise ExportError(f"saved_model artifact {name}: nobuco failed: {type(e).__name__}: "
                              f"{str(e).strip()[:1500]}") from e
        _replace_dir(staged, final)
    return {"nobuco": {k: v for k, v in facts.items() if k != "versions"}, "versions": facts["versions"]}


def _onnx2tf(onnx_path: Path, final: Path, name: str) -> list[str]:
    """onnx2tf on a copy of `onnx_path` (it rewrites its input in place), the SavedModel moved to `final`;
    the .tflite files it also writes are dropped (LiteRT has its own route) and their names returned."""
    import onnx2tf
    log = io.StringIO()
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".saved_model-") as tmp:
        tmp = Path(tmp)
        onnx_copy = tmp / "model.onnx"          # onnx2tf rewrites its input in place: never hand it ours
        shutil.copyfile(onnx_path, onnx_copy)
        staged = tmp / _DIR_NAME
        try:
            with contextlib.redirect_stdout(log):
                onnx2tf.convert(
                    input_onnx_file_path=str(onnx_copy),
                    output_folder_path=str(staged),
                    not_use_onnxsim=True,          # onnxsim is not installed; avoids its warning
                    output_signaturedefs=True,     # a `serving_default` signature named after the ONNX input
                    verbosity="error",
                )
        except (Exception, SystemExit) as e:  # onnx2tf calls sys.exit(1) on some failures
            tail = log.getvalue()[-2000:]
            raise ExportError(f"saved_model artifact {name}: onnx2tf {onnx2tf.__version__} failed on "
                              f"{onnx_path.name}: {type(e).__name__}: {e}\n{tail}") from e
        if not (staged / "saved_model.pb").is_file():
            raise ExportError(f"saved_model artifact {name}: onnx2tf finished but wrote no saved_model.pb "
                              f"in {staged}; its log:\n{log.getvalue()[-2000:]}")
        dropped = sorted(p.name for p in staged.glob("*.tflite"))
        for p in staged.glob("*.tflite"):
            p.unlink()
        _replace_dir(staged, final)
    return dropped


def _layout_name(ndim: int, channels_last: bool) -> str:
    spatial = {3: "W", 4: "HW", 5: "DHW"}.get(ndim, "...")
    return "N" + (spatial + "C" if channels_last else "C" + spatial)


def _measure_layout(path: Path, sig: dict, example: np.ndarray, ref: np.ndarray, name: str):
    """Feed the example as-is and channels-last; keep the layout that reproduces the torch outputs."""
    _loaded, fn = _open(path, name, "saved_model")
    input_name = sig["input_name"]
    import tensorflow as tf

    want = sig["input_spec"]["shape"][1:]
    candidates: list[tuple[str, tuple[int, ...] | None]] = [("as-trained", None)]
    if not isinstance(example, dict) and example.ndim >= 3:
        candidates.append(("channels-last", (0, *range(2, example.ndim), 1)))
    errors: dict[str, float | str] = {}
    best: tuple[float, tuple[int, ...] | None] | None = None
    for label, perm in candidates:
        if isinstance(example, dict):  # several inputs, each to the signature's tensor of its meaning
            feed = _named_feed(fn, example)
        else:
            x = example if perm is None else np.ascontiguousarray(np.transpose(example, perm))
            if not _shape_fits(want, x.shape[1:]):
                errors[label] = f"shape {list(x.shape)} does not fit the signature {sig['input_spec']['shape']}"
                continue
            feed = {input_name: tf.constant(x)}
        try:
            y = flat_rows(_in_graph_order(fn(**feed)))
            y = y.reshape(ref.shape) if y.size == ref.size else y
        except Exception as e:  # noqa: BLE001
            errors[label] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        if y.shape != ref.shape:
            errors[label] = f"output shape {list(y.shape)} != torch output shape {list(ref.shape)}"
            continue
        err = float(np.max(np.abs(y.astype(np.float64) - ref))) if ref.size else 0.0
        errors[label] = err
        if best is None or err < best[0]:
            best = (err, perm)
    tol = 1e-3 + 1e-3 * float(np.max(np.abs(ref))) if ref.size else 1e-3
    if best is None or best[0] > tol:
        raise ExportError(f"saved_model artifact {name}: the SavedModel reproduces the torch model in "
                          f"no input layout (tolerance {tol:.2g}); max abs error per layout: {errors}")
    return best[1], errors


def _named_feed(fn, example: dict) -> dict:
    """The example's named arrays keyed by the signature's inputs (matched by name, then shape and dtype),
    each cast to the dtype the signature takes (onnx2tf may make int64 ids int32)."""
    import tensorflow as tf
    from parity.signature import map_tensors
    inputs = fn.structured_input_signature[1]
    theirs = tuple(_tf_spec(k, v) for k, v in inputs.items())
    pairs, _ = map_tensors(tuple(TensorSpec.of(k, v) for k, v in example.items()), theirs)
    return {pairs[k]: tf.constant(v, dtype=inputs[pairs[k]].dtype) for k, v in example.items()}


def _in_graph_order(outputs: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(outputs[k]) for k in graph_order(outputs)}


def _shape_fits(spec: list, shape: tuple) -> bool:
    return len(spec) == len(shape) and all(s is None or s == d for s, d in zip(spec, shape))


# ----------------------------------------------------------------------------------------- signature

def _open(path: Path, name: str, what: str):
    """Load the SavedModel; return (loaded object, its serving function). The loaded object owns the
    variables the function reads: keep it alive as long as the function."""
    import tensorflow as tf

    path = Path(path)
    if not (path / "saved_model.pb").is_file() and not (path / "saved_model.pbtxt").is_file():
        if not path.exists():
            found = "nothing"
        elif path.is_dir():
            found = f"a folder holding {sorted(os.listdir(path))}"
        else:
            found = "a file"
        raise ArtifactLoadError(f"{what} artifact {name}: expected a SavedModel directory with saved_model.pb "
                                f"at {path}, found {found}")
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # noqa: BLE001 - corrupt protobuf, missing/corrupt variables (checksums), ...
        raise ArtifactLoadError(f"{what} artifact {name}: tf.saved_model.load({path}) failed: "
                                f"{type(e).__name__}: {_first_line(e)}") from e
    sigs = getattr(loaded, "signatures", {})
    if SIGNATURE_KEY not in sigs:
        raise ArtifactLoadError(f"{what} artifact {name}: expected the signature {SIGNATURE_KEY!r} in {path}, "
                                f"found {sorted(sigs) or 'no signatures'}")
    return loaded, sigs[SIGNATURE_KEY]


def _spec_json(spec) -> dict[str, Any]:
    return {"name": spec.name, "shape": list(spec.shape.as_list()) if spec.shape.rank is not None else None,
            "dtype": spec.dtype.name}


def _describe_signature(path: Path, name: str) -> dict[str, Any]:
    try:
        _loaded, fn = _open(path, name, "saved_model")
    except ArtifactLoadError as e:
        raise ExportError(f"the SavedModel just written does not load: {e}") from e
    inputs, outputs = fn.structured_input_signature[1], fn.structured_outputs
    if not inputs or not isinstance(outputs, dict) or not outputs:
        raise ExportError(f"saved_model artifact {name}: expected named inputs and outputs in {SIGNATURE_KEY}, "
                          f"found {fn.structured_input_signature} -> {outputs}")
    input_name, output_name = next(iter(inputs)), next(iter(outputs))
    in_spec, out_spec = inputs[input_name], outputs[output_name]
    batch = in_spec.shape.as_list()[0] if in_spec.shape.rank else None
    return {"input_name": input_name, "output_name": output_name, "input_names": list(inputs),
            "input_spec": _spec_json(in_spec), "output_spec": _spec_json(out_spec),
            "batch_sizes": None if batch is None else [int(batch)]}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:500] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------- load

def _tf_spec(name: str, spec, perm: tuple[int, ...] | None = None) -> TensorSpec:
    shape = spec.shape.as_list() if spec.shape.rank is not None else [None]
    if perm is not None:  # the artifact's layout, told back in the as-trained order its callers feed
        inverse = np.argsort(perm)
        shape = [shape[i] for i in inverse]
    return TensorSpec(name, spec.dtype.name if spec.dtype.name != "half" else "float16", tuple(shape))


class SavedModelRunner(BaseRunner):
    """The `serving_default` signature through TensorFlow. Callers feed the as-trained layout: an input
    the converter transposed (onnx2tf: NCHW -> NHWC) is transposed back here, by details['input_transpose']."""

    runtime = "tensorflow"

    def __init__(self, artifact: Artifact):
        import tensorflow as tf

        self._tf = tf
        self._loaded, self._fn = _open(Path(artifact.path), artifact.label, FORMAT)
        if self._fn.structured_input_signature[0]:
            raise ArtifactLoadError(f"saved_model artifact {artifact.label}: expected named inputs in "
                                    f"{SIGNATURE_KEY}, found positional ones {self._fn.structured_input_signature[0]}")
        inputs = self._fn.structured_input_signature[1]
        outputs = self._fn.structured_outputs
        if not isinstance(outputs, dict):
            raise ArtifactLoadError(f"saved_model artifact {artifact.label}: expected named outputs in "
                                    f"{SIGNATURE_KEY}, found {outputs}")
        perm = (artifact.details or {}).get("input_transpose")
        self._perm = tuple(perm) if perm and len(inputs) == 1 else None
        signature = Signature(tuple(_tf_spec(k, v, self._perm) for k, v in inputs.items()),
                              tuple(_tf_spec(k, outputs[k]) for k in graph_order(outputs)))
        batches = {t.shape[0] for t in signature.inputs}
        static = next(iter(batches)) if len(batches) == 1 else None
        super().__init__(artifact, signature, static_batches=None if static is None else (static,))
        self.input_name = signature.input_names[0]
        self.output_name = signature.output_names[0]
        self.details = {"signature": SIGNATURE_KEY, "input_name": self.input_name,
                        "output_name": self.output_name, "input_transpose": list(self._perm) if self._perm else None,
                        "batch_strategy": "dynamic batch" if static is None else f"chunks of the static batch {static}",
                        "tensorflow": tf.__version__}

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._perm is not None:
            feed = {k: np.ascontiguousarray(np.transpose(v, self._perm)) for k, v in feed.items()}
        out = self._fn(**{k: self._tf.constant(v) for k, v in feed.items()})
        return {k: out[k].numpy() for k in self.signature.output_names}

    def close(self) -> None:
        super().close()
        self._fn = None
        self._loaded = None


def load(artifact: Artifact, runtime: str | None = None) -> SavedModelRunner:
    pick_runtime(FORMAT, artifact, runtime, RUNTIMES)
    return SavedModelRunner(artifact)
