"""ONNX: one fp32 file with a dynamic batch dimension, run in onnxruntime on the CPU.

Routes (each writes a single self-contained .onnx file):
  keras: `model.export(path, format="onnx")` (Keras drives tf2onnx on the TensorFlow backend); where that
         fails or leaves graph inputs for tensors the model captured, the model's tf.function with
         everything it captures frozen into constants, through tf2onnx.convert.from_graph_def
  torch: `torch.onnx.export(model, (x,), path, dynamo=True, external_data=False, dynamic_shapes=...)`
  jax:   `jax2onnx.to_onnx(x -> apply(params, x), inputs=[("B", ...)], export_mode="web")`

After writing, the file itself is read back and its first input must declare a symbolic (dynamic) batch
dimension; if a converter wrote a fixed batch, the artifact says so in `batch_sizes`.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporters.base import (Artifact, ArtifactLoadError, BaseRunner, ExportError, check_file,
                             example_batch, family_of, forward_order, keras_feed, keras_input_names, package_version,
                             pick_runtime, size_of, unsupported_family)
from parity.feeds import flatten_outputs
from parity.signature import Signature, TensorSpec

FORMAT = "onnx"
REQUIRES = {"tensorflow": (), "torch": (), "jax": (), "keras-jax": (), "keras-torch": ()}
# the installed distributions whose versions decide the artifact (per family) and its runtime's answers
CONVERTER_PACKAGES = {"tensorflow": ("keras", "tensorflow", "tf2onnx", "onnx"), "torch": ("torch", "onnxscript", "onnx"),
                      "jax": ("jax", "jax2onnx", "onnx"), "keras-jax": ("keras", "jax", "jax2onnx", "onnx"),
                      "keras-torch": ("keras", "torch", "onnxscript", "onnx")}
RUNTIME_PACKAGES = ("onnxruntime",)
RUNTIMES = ("onnxruntime-cpu",)
LANE = {"tensorflow": "tensorflow", "torch": "torch", "jax": "tensorflow",  # tf2onnx needs TensorFlow; dynamo
        "keras-jax": "keras-jax", "keras-torch": "keras-torch"}  # needs torch; jax2onnx needs only jax, which
# runs in the TensorFlow worker; Keras exports on its own backend, in that backend's lane
RUNTIME_LANE = "any"  # the process that loads the artifact ("any": no framework)

FILE_NAME = "model.onnx"
SUFFIXES = (".onnx",)


def export(model, *, framework: str, name: str, example: np.ndarray, out_dir, upstream=None,
           options=None, expected=None, family: str | None = None) -> list[Artifact]:
    """Write `out_dir/model.onnx` (fp32, dynamic batch) and return its Artifact."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAME
    example = example_batch(example, FORMAT, name, framework, several=True)
    t0 = time.perf_counter()
    family = family_of(framework, family)
    if family == "tensorflow":
        route, details = _export_tensorflow(model, name, example, path)
    elif family == "torch":
        route, details = _export_torch(model, name, example, path)
    elif family == "jax":
        route, details = _export_jax(model, name, example, path)
    elif family in ("keras-jax", "keras-torch"):
        route, details = _export_keras(model, name, example, path)
    else:
        raise unsupported_family(FORMAT, name, family, REQUIRES)
    if family in ("jax", "keras-jax"):  # jax2onnx's pooling over N and C, which runtimes refuse
        from .onnx_graph import spatial_pools
        pools = spatial_pools(path)
        if pools:
            details["repairs"] = [f"{pools} pooling node(s) over NHWC with a kernel spanning N and C rewritten "
                                  f"as Transpose -> 2-D pool -> Transpose (exporters/onnx_graph.py)"]
    export_s = time.perf_counter() - t0
    _drop_function_counter(path)

    batch_dim, io = _describe(path, name, framework, route)
    details.update(io)
    if isinstance(batch_dim, str):
        batch_sizes = None
        details["batch_dim"] = batch_dim
    else:
        batch_sizes = [int(batch_dim)]
        details["batch_dim"] = int(batch_dim)
        details["batch_note"] = (f"the converter wrote a fixed batch of {batch_dim}, not a symbolic one; "
                                 "the runner feeds other batch sizes in padded chunks of that size")
    return [Artifact(model=name, format=FORMAT, variant="fp32", path=str(path), framework=framework,
                     route=route, batch_sizes=batch_sizes, size_bytes=size_of(path), export_s=export_s,
                     details=details)]


_TRACED_NAME = re.compile(r"(__inference_\w*?)_\d+\b")


def _drop_function_counter(path: Path) -> None:
    """tf2onnx writes "converted from __inference___call___4087" into the graph's doc string: the number is
    a counter of the TensorFlow process, which other work in it moves. Without it, the same model makes
    the same bytes; the doc string is a note, which no runtime reads."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    plain = _TRACED_NAME.sub(r"\1", model.graph.doc_string)
    if plain != model.graph.doc_string:
        model.graph.doc_string = plain
        onnx.save(model, str(path))


def _export_tensorflow(model, name: str, example, path: Path) -> tuple[str, dict[str, Any]]:
    import keras
    if not isinstance(model, keras.Model):
        return _export_tf_module(model, name, path)
    return _export_keras(model, name, example, path)


def _export_tf_module(module, name: str, path: Path) -> tuple[str, dict[str, Any]]:
    """A tf.Module's serving function (a tf.function with an input signature), through tf2onnx."""
    import tf2onnx
    fn = module.__call__
    try:
        tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, output_path=str(path))
    except Exception as e:  # noqa: BLE001 - the converter's own error, with what was being done
        raise ExportError(f"onnx export of {name} (tensorflow): tf2onnx.convert.from_function on the module's "
                          f"__call__ failed: {type(e).__name__}: {str(e).strip()[:2000]}") from e
    details = {"converter": "tf2onnx.convert.from_function(module.__call__)",
               "versions": {"tensorflow": package_version("tensorflow"), "tf2onnx": package_version("tf2onnx"),
                            "onnx": package_version("onnx")}}
    return "tf2onnx.convert.from_function (the tf.Module's serving function)", details


def _export_keras(model, name: str, example: np.ndarray, path: Path) -> tuple[str, dict[str, Any]]:
    import keras

    model(keras_feed(model, example))  # Keras refuses to export a model that has never been called
    backend = keras.backend.backend()
    via = {"tensorflow": "tf2onnx", "jax": "jax2onnx", "torch": "torch.onnx"}.get(backend, f"{backend} backend")
    converters = {"tensorflow": ("tensorflow", "tf2onnx"), "jax": ("jax", "jax2onnx"), "torch": ("torch", "onnxscript")}
    details = {"converter": "keras.Model.export(format='onnx')", "keras_backend": backend,
               "versions": {p: package_version(p) for p in ("keras", *converters.get(backend, ()), "onnx")}}
    route = f"keras.Model.export(format='onnx') ({via})"
    try:
        model.export(str(path), format="onnx", verbose=False)
        why = _extra_graph_inputs(path, len(example) if isinstance(example, dict) else 1)
    except Exception as e:  # the converter's own error, reworded with what was being done
        why = f"model.export(format='onnx') failed: {type(e).__name__}: {str(e).strip()[:600]}"
    if why is None:
        return route, details
    if backend != "tensorflow":
        raise ExportError(f"onnx export of {name} (keras on {backend}): {route}: {why}")
    # the second route: the model's function with its captured tensors frozen into constants first
    try:
        _export_keras_frozen(model, example, path)
    except Exception as e:  # noqa: BLE001 - both routes' words go to the user
        raise ExportError(f"onnx export of {name} (keras): every route failed. 1) {route}: {why}\n"
                          f"2) {KERAS_FROZEN_ROUTE}: {type(e).__name__}: {str(e).strip()[:600]}") from e
    details.update(converter=KERAS_FROZEN_ROUTE, route_taken="tf2onnx on the frozen graph",
                   routes_left=[{"route": route, "why": why}])
    return f"{KERAS_FROZEN_ROUTE} (the first route failed)", details


KERAS_FROZEN_ROUTE = "tf.function(model) -> convert_variables_to_constants_v2 -> tf2onnx.convert.from_graph_def"


def _extra_graph_inputs(path: Path, n_inputs: int) -> str | None:
    """Why a Keras ONNX file is unusable, or None. tf2onnx turns tensors the model's function captures
    (a Normalization layer's mean and variance given as constants) into graph inputs nobody feeds."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    if len(inputs) <= n_inputs:
        return None
    return (f"the graph takes {len(inputs)} inputs where the model takes {n_inputs}: "
            f"{', '.join(inputs[n_inputs:])} are tensors the model captured, left for the caller to feed")


def _export_keras_frozen(model, example, path: Path) -> None:
    import onnx
    import tensorflow as tf
    import tf2onnx
    from keras.src.export.onnx import patch_tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from parity.feeds import bind_inputs
    bound, _ = bind_inputs(example, keras_input_names(model))  # as keras_feed binds them
    several = isinstance(bound, dict)
    if several:
        arrays = bound
    else:  # one input, called positionally as model(x) is, under the name the data gave it
        arrays = {next(iter(example)) if isinstance(example, dict) else "x": np.asarray(bound, np.float32)}
    specs = [tf.TensorSpec([None, *a.shape[1:]], tf.as_dtype(a.dtype), name=k) for k, a in arrays.items()]

    def call(*xs):
        return model(dict(zip(arrays, xs)) if several else xs[0], training=False)
    frozen = convert_variables_to_constants_v2(tf.function(call).get_concrete_function(*specs))
    patch_tf2onnx()  # what Keras' own export does for numpy 2
    proto, _ = tf2onnx.convert.from_graph_def(frozen.graph.as_graph_def(),
                                              input_names=[t.name for t in frozen.inputs],
                                              output_names=[t.name for t in frozen.outputs])
    out_names = list(getattr(model, "output_names", None) or [])
    renames = {t.name: k for t, k in zip(frozen.inputs, arrays)}
    if len(out_names) == len(frozen.outputs):
        renames.update({t.name: k for t, k in zip(frozen.outputs, out_names)})
    else:
        renames.update({t.name: t.name.split(":")[0] for t in frozen.outputs})
    _rename(proto.graph, renames)
    onnx.save(proto, str(path))


def _rename(graph, renames: dict[str, str]) -> None:
    """Graph inputs and outputs under the model's names (tf2onnx keeps TensorFlow's `name:0`)."""
    for v in (*graph.input, *graph.output):
        v.name = renames.get(v.name, v.name)
    for node in graph.node:
        node.input[:] = [renames.get(i, i) for i in node.input]
        node.output[:] = [renames.get(o, o) for o in node.output]


def _export_torch(model, name: str, example: np.ndarray, path: Path) -> tuple[str, dict[str, Any]]:
    import inspect

    import torch

    arg_names = [p for p in inspect.signature(model.forward).parameters]
    was_training = model.training
    model.eval()
    try:
        if isinstance(example, dict):  # named inputs, in the order forward takes them
            order = forward_order(model, example)
            args = tuple(torch.from_numpy(example[n]) for n in order)
        else:
            args = (torch.from_numpy(example),)
        batch = torch.export.Dim("batch")
        # positional form: works whatever the forward argument is called (nn.Sequential calls it `input`)
        dynamic_shapes = tuple({0: batch} for _ in args)
        # several outputs keep the model's names (dict keys, tuple positions) rather than the graph's node names
        with torch.no_grad():
            outputs = flatten_outputs(model(*args), lambda t: t)
        named = {"output_names": list(outputs)} if len(outputs) > 1 else {}
        try:
            torch.onnx.export(model, args, str(path), dynamo=True, external_data=False,
                              dynamic_shapes=dynamic_shapes, verbose=False, **named)
        except Exception as e:
            raise ExportError(f"onnx export of {name} (torch): torch.onnx.export(dynamo=True) with a dynamic "
                              f"batch dimension failed: {type(e).__name__}: {str(e).strip()[:2000]}") from e
        fixed = _fixed_batch_copy(model, args, path, named)
    finally:
        model.train(was_training)
    details = {"converter": "torch.onnx.export(dynamo=True, external_data=False)",
               "forward_args": arg_names,
               "dynamic_shapes": "batch dimension 0 of every positional argument",
               **fixed,
               "versions": {"torch": package_version("torch"), "onnxscript": package_version("onnxscript"),
                            "onnx": package_version("onnx")}}
    return "torch.onnx.export(dynamo=True, dynamic batch)", details


FIXED_BATCH_FILE_NAME = "model.batch1.onnx"


def _fixed_batch_copy(model, args: tuple, path: Path, named: dict) -> dict[str, str]:
    """A second export with batch 1 fixed, beside the dynamic one, for a graph that computes with its own
    shapes (Shape ops: attention masks broadcast to the batch, say). onnx2tf cannot convert such a graph
    when the batch is symbolic, and takes this one (the SavedModel's second route). Not an artifact of its
    own; a failure here only means there is no second route."""
    import onnx
    import torch
    graph = onnx.load(str(path), load_external_data=False).graph
    if not any(node.op_type == "Shape" for node in graph.node):
        return {}
    fixed = path.with_name(FIXED_BATCH_FILE_NAME)
    try:
        with torch.no_grad():
            torch.onnx.export(model, tuple(a[:1] for a in args), str(fixed), dynamo=True, external_data=False,
                              verbose=False, **named)
    except Exception as e:  # noqa: BLE001 - recorded: the SavedModel then has one route only
        fixed.unlink(missing_ok=True)
        return {"fixed_batch_copy_error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
    return {"fixed_batch_copy": fixed.name}


def _jax2onnx_plugins() -> str:
    """jax2onnx registers its op plugins by importing its whole plugins tree on the first call, examples
    for Flax and Equinox models included, which build and compile those models at import (about 20 s
    here). A function of jax.numpy/lax needs only the `jax` subtree (about 4 s): import that one and mark
    the registry filled. Left to jax2onnx itself when its internals are not as expected."""
    try:
        from jax2onnx.plugins import plugin_system as ps
        if ps._already_imported_plugins:
            return "already registered"
        ps._import_tree(Path(ps.__file__).parent / "jax", "jax2onnx.plugins.jax")
        ps._already_imported_plugins = True
        return "jax2onnx.plugins.jax only (jax.numpy/lax primitives)"
    except Exception:  # noqa: BLE001 - a changed jax2onnx: its own full import happens in to_onnx
        return "all (jax2onnx's own import)"


def _export_jax(model, name: str, example, path: Path) -> tuple[str, dict[str, Any]]:
    """jax2onnx.to_onnx on x -> apply(params, x), the parameters closed over (initializers in the
    graph), a symbolic batch dimension "B", written as one self-contained file (export_mode="web")."""
    if isinstance(example, dict):
        raise ExportError(f"onnx export of {name} (jax): the jax2onnx route takes a model of one input; "
                          f"this model takes {len(example)} ({', '.join(example)})")
    plugins = _jax2onnx_plugins()
    from jax2onnx import to_onnx
    params = model.params

    def convert():
        to_onnx(lambda x: model.apply(params, x), inputs=[("B", *example.shape[1:])], input_names=["x"],
                output_names=["output"], model_name="jax_model", return_mode="file", output_path=str(path),
                export_mode="web")
    try:
        try:
            convert()
        except Exception:  # noqa: BLE001 - maybe a plugin outside the jax subtree: every plugin, once more
            if not plugins.startswith("jax2onnx.plugins.jax"):
                raise
            from jax2onnx.plugins import plugin_system as ps
            ps._already_imported_plugins = False
            ps.import_all_plugins()
            plugins = "all (retried after the jax subtree alone failed)"
            convert()
    except Exception as e:  # noqa: BLE001 - the converter's own error, with what was being done
        raise ExportError(f"onnx export of {name} (jax): jax2onnx.to_onnx with a dynamic batch dimension "
                          f"failed: {type(e).__name__}: {str(e).strip()[:2000]}") from e
    details = {"converter": "jax2onnx.to_onnx(inputs=[('B', ...)], export_mode='web')",
               "jax2onnx_plugins": plugins,
               "versions": {"jax": package_version("jax"), "jax2onnx": package_version("jax2onnx"),
                            "onnx": package_version("onnx")}}
    return "jax2onnx.to_onnx (dynamic batch B)", details


def _describe(path: Path, name: str, framework: str, route: str) -> tuple[str | int, dict[str, Any]]:
    """Read the written file back: its input/output names, and the first input's batch dimension."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ExportError(f"onnx export of {name} ({framework}) by {route}: the written file {path} is not a "
                          f"valid ONNX model: {type(e).__name__}: {e}") from e
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if not inputs:
        raise ExportError(f"onnx export of {name} ({framework}) by {route}: expected a graph input, found none")

    def dims(value_info):
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
                for d in value_info.type.tensor_type.shape.dim]

    in_dims = dims(inputs[0])
    if not in_dims:
        raise ExportError(f"onnx export of {name} ({framework}) by {route}: expected a batched input, found "
                          f"input {inputs[0].name!r} of rank 0")
    first = inputs[0].type.tensor_type.shape.dim[0]
    batch_dim: str | int = first.dim_param if first.dim_param else (first.dim_value or "?")
    io = {"input_name": inputs[0].name, "input_shape": in_dims, "input_names": [i.name for i in inputs],
          "output_names": [o.name for o in proto.graph.output],
          "output_shapes": [dims(o) for o in proto.graph.output],
          "opset": {op.domain or "ai.onnx": op.version for op in proto.opset_import},
          "producer": " ".join(p for p in (proto.producer_name, proto.producer_version) if p and p != "None")}
    return batch_dim, io


ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def _spec(node) -> TensorSpec:
    dtype = ORT_DTYPES.get(node.type)
    if dtype is None:
        raise ArtifactLoadError(f"onnx: tensor {node.name!r} has type {node.type}, which this runner does not feed")
    shape = tuple(d if isinstance(d, int) else None for d in (node.shape or [None]))
    return TensorSpec(node.name, dtype, shape)


class OnnxRunner(BaseRunner):
    """onnxruntime on the CPU, one intra-op thread. Its signature is the session's; a graph with a fixed
    batch takes padded chunks of that batch (BaseRunner)."""

    runtime = "onnxruntime-cpu"

    def __init__(self, session, artifact: Artifact):
        signature = Signature(tuple(_spec(i) for i in session.get_inputs()),
                              tuple(_spec(o) for o in session.get_outputs()))
        batch = signature.inputs[0].shape[0]
        super().__init__(artifact, signature, static_batches=None if batch is None else (batch,))
        self._session = session
        self.input_name = signature.inputs[0].name
        self.input_shape = [d if d is not None else "N" for d in signature.inputs[0].shape]
        self.output_names = signature.output_names

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self._session.run(self.output_names, feed)))

    def close(self) -> None:
        super().close()
        self._session = None


def load(artifact: Artifact, runtime: str | None = None) -> OnnxRunner:
    pick_runtime(FORMAT, artifact, runtime, RUNTIMES)
    path = check_file(FORMAT, artifact, "a model file")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactLoadError(f"onnx artifact {artifact.label}: onnxruntime could not load {path} "
                                f"({path.stat().st_size} bytes); expected a complete ONNX model, the file is corrupt or "
                                f"truncated: {first_line}") from None
    return OnnxRunner(session, artifact)
