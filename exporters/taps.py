"""An artifact's intermediate tensors, run in its own runtime: what parity/localize.py pairs with the
original model's layers when a cell fails. Paid only then (or on `explain`), never on a passing run.

Each function returns parity.localize.Tap objects in the order the runtime computes them, each with
the layer names the converter left on it (its hints).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from parity.localize import Tap

def artifact_taps(fmt: str, path: str | Path, x) -> list[Tap]:
    """Every intermediate tensor of the artifact at `path` on the rows `x` (an array, or {name: array})."""
    if fmt in TAPS:
        return TAPS[fmt](Path(path), x)
    raise NotImplementedError(f"reading intermediate tensors of a {fmt} artifact is not built yet; "
                              f"it is for {', '.join(FORMATS_WITH_TAPS)}")


def fit_layout(rows: np.ndarray, shape) -> np.ndarray:
    """Rows of the original's layout for an input that takes the other one (onnx2tf makes NCHW models
    take NHWC): transposed when that is what fits the input's shape."""
    want = [None if d is None else int(d) for d in list(shape)[1:]]
    fits = lambda a: all(w is None or w == g for w, g in zip(want, a.shape[1:])) and len(want) == a.ndim - 1
    if fits(rows) or rows.ndim != 4:
        return rows
    moved = np.ascontiguousarray(rows.transpose(0, 2, 3, 1))
    return moved if fits(moved) else rows


# ------------------------------------------------------------------------------------------- ONNX

def onnx_taps(path: Path, x) -> list[Tap]:
    """Every node's outputs, made graph outputs of a copy of the model held in memory, run in ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    graph = model.graph
    known = {o.name for o in graph.output}
    hints, order = {}, []
    for node in graph.node:
        for out in node.output:
            if out and out not in order:
                order.append(out)
                hints[out] = _onnx_hints(node)
    for name in order:
        if name not in known:
            graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every node as the file has it
    session = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    feed = _onnx_feed(session, x)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(names, feed)))
    return [Tap(n, values[n], hints[n], n in known) for n in order if n in values and _numeric(values[n])]


def _onnx_hints(node) -> tuple[str, ...]:
    """The layer a node belongs to: the innermost torch module in its metadata (torch.onnx's dynamo
    exporter records the module path), else the scopes of its name (tf2onnx keeps Keras layer names)."""
    for prop in node.metadata_props:
        if prop.key == "namespace":
            modules = [seg.split(":")[0].strip() for seg in prop.value.split("/")
                       if ":" in seg and not seg.split(":", 1)[1].strip().startswith("aten.")]
            modules = [m for m in modules if m]  # the root module has no name
            return (modules[-1],) if modules else ()
    return (node.name,) if "/" in node.name else ()


def _onnx_feed(session, x) -> dict:
    inputs = session.get_inputs()
    if isinstance(x, dict):
        return {i.name: np.asarray(x[i.name]) for i in inputs if i.name in x} or \
            {i.name: np.asarray(v) for i, v in zip(inputs, x.values())}
    return {inputs[0].name: np.asarray(x)}


def _numeric(v) -> bool:
    return isinstance(v, np.ndarray) and v.dtype.kind in "fiub"


# ------------------------------------------------------------------------------------------ LiteRT

def litert_taps(path: Path, x) -> list[Tap]:
    """Every op's output, kept by the interpreter (experimental_preserve_all_tensors), one row at a
    time; int8 tensors are dequantized with their own scale and zero point."""
    from ai_edge_litert.interpreter import Interpreter

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the interpreter warns that keeping every tensor is for debugging
        interp = Interpreter(model_path=str(path), num_threads=1, experimental_preserve_all_tensors=True)
    details = interp.get_input_details()
    rows = x if isinstance(x, dict) else {details[0]["name"]: x}
    n = len(next(iter(rows.values())))
    for d in details:
        interp.resize_tensor_input(d["index"], [1, *d["shape"][1:]])
    interp.allocate_tensors()
    by_index = {t["index"]: t for t in interp.get_tensor_details()}
    # the rows' tensors: fed one row at a time, they have a batch of 1 (a DEQUANTIZE of float16 weights
    # is an op too, but its output is a weight)
    outputs = list(dict.fromkeys(i for op in interp._get_ops_details() if op["op_name"] != "DEQUANTIZE"
                                 for i in op["outputs"] if i >= 0 and len(by_index[i]["shape"])
                                 and by_index[i]["shape"][0] == 1))
    final = {d["index"] for d in interp.get_output_details()}
    per_row: dict[int, list] = {i: [] for i in outputs}
    for r in range(n):
        for d, value in zip(details, _litert_inputs(details, rows)):
            interp.set_tensor(d["index"], np.asarray(value[r:r + 1]).astype(d["dtype"]))
        interp.invoke()
        for i in outputs:
            per_row[i].append(_dequantized(interp.get_tensor(i), by_index[i]))
    taps = []
    for i in outputs:
        name = by_index[i]["name"]
        taps.append(Tap(name, np.concatenate(per_row[i]), _litert_hints(name), i in final))
    return taps


def _litert_hints(name: str) -> tuple[str, ...]:
    """The scopes a fused tensor's name lists, its own op first ('relu1/Relu;conv1/convolution'); the
    root module and the counter litert-torch adds ('Net;;Net/...Conv2d_conv2;1') are left out."""
    parts = [p for p in name.split(";") if p and not p.isdigit()]
    scoped = [p for p in parts if "/" in p]
    return tuple(scoped or parts)


def _litert_inputs(details, rows: dict) -> list:
    if len(rows) == 1:
        return [next(iter(rows.values()))] * len(details)
    return [rows[re.sub(r"^serving_default_|:\d+$", "", d["name"])] for d in details]


def _dequantized(value: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail.get("quantization", (0.0, 0))
    if value.dtype.kind in "iu" and scale:
        return (value.astype(np.float32) - zero) * scale
    return value


# ------------------------------------------------------------------------------------- SavedModel

def saved_model_taps(path: Path, x) -> list[Tap]:
    """Every op output of the serving signature that carries the batch, from its graph with the
    variables frozen in and every function inlined (op names keep the Keras layer scopes), run in a
    TensorFlow session."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    loaded = tf.saved_model.load(str(path))  # kept alive: the signature's variables belong to it
    fn = loaded.signatures["serving_default"]
    frozen = convert_variables_to_constants_v2(fn)
    stated = list(fn.structured_input_signature[1])  # the signature's inputs; the rest are captured constants
    feeds = _saved_model_feeds(stated, x)
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(frozen.graph.as_graph_def(), name="")
    inputs = {n: graph.get_tensor_by_name(t.name) for t in frozen.inputs
              for n in [t.name.split(":")[0]] if n in feeds}
    if not inputs:  # the placeholders were renamed: the signature's inputs are the first ones, in order
        inputs = {n: graph.get_tensor_by_name(t.name) for n, t in zip(feeds, frozen.inputs)}
    first = next(iter(inputs.values()))
    batch = first.shape[0] if first.shape.rank else None
    finals = {t.name for t in frozen.outputs}
    fetched = [t for op in graph.get_operations() if op.type not in ("Placeholder", "Const", "NoOp")
               and not _plumbing(op) for t in op.outputs
               if t.dtype.is_floating and t.shape.rank and t.shape[0] == batch]
    rows = len(next(iter(feeds.values())))
    step = batch or rows  # a fixed batch (a graph converted at batch 1) is fed in pieces of it
    with tf.compat.v1.Session(graph=graph) as session:
        parts = [session.run(fetched, {t: fit_layout(feeds[n][i:i + step], t.shape) for n, t in inputs.items()})
                 for i in range(0, rows, step)]
    return [Tap(t.name, np.concatenate([p[j] for p in parts]), (t.op.name,), t.name in finals)
            for j, t in enumerate(fetched)]


def _plumbing(op) -> bool:
    """An inlined function's Identity ops: the same values again under the call's name."""
    return op.type == "Identity" and any(k in op.name for k in ("/input/", "/output/", "ReadVariableOp"))


def _saved_model_feeds(names: list[str], x) -> dict:
    if isinstance(x, dict):
        return {n: np.asarray(x[n]) for n in names if n in x} or dict(zip(names, map(np.asarray, x.values())))
    return {names[0]: np.asarray(x)}


# ------------------------------------------------------------------------------------------- TF.js

def tfjs_taps(path: Path, x) -> list[Tap]:
    """Every op node of the graph model, fetched by name in one execute() on the cpu backend of the
    shared Node runner (node names keep the SavedModel's scopes)."""
    from .tfjs import _b64, _from_b64, node_process

    node = node_process()
    folder = path if path.is_dir() else path.parent
    loaded = _ok(node.request({"cmd": "load", "path": str(folder.resolve()), "backend": "cpu"}, 120, "load"))
    handle = loaded["handle"]
    try:
        names = [n["name"] for n in _ok(node.request({"cmd": "nodes", "handle": handle}, 60, "nodes"))["nodes"]]
        finals = {o["name"].split(":")[0] for o in loaded["outputs"]}
        rows = x if isinstance(x, dict) else {loaded["inputs"][0]["name"]: x}
        shape = loaded["inputs"][0]["shape"] or [None]
        n = len(next(iter(rows.values())))
        step = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else n  # a fixed batch: pieces of it
        pieces = []
        for start in range(0, n, step):
            inputs = []
            for spec, value in zip(loaded["inputs"], rows.values()):
                value = fit_layout(np.asarray(value[start:start + step], np.float32),
                                   [None, *(spec["shape"] or [None])[1:]])
                inputs.append({"name": spec["name"], "shape": list(value.shape), "dtype": "float32",
                               "b64": _b64(value, "float32")})
            pieces.append(_ok(node.request({"cmd": "predict", "handle": handle, "inputs": inputs, "fetch": names},
                                           300, "predict of every node"))["outputs"])
    finally:
        node.request({"cmd": "close", "handle": handle}, 30, "close")
    return [Tap(o["name"], np.concatenate([_from_b64(p[j]) for p in pieces]), (o["name"],),
                o["name"].split(":")[0] in finals) for j, o in enumerate(pieces[0])]


def _ok(res: dict) -> dict:
    if not res.get("ok"):
        raise RuntimeError(f"the TF.js runner refused: {res.get('error')}")
    return res


# ------------------------------------------------------------------------------------- TorchScript

def torchscript_taps(path: Path, x) -> list[Tap]:
    """Every tensor an op of the inlined forward graph computes, returned by a copy of that graph run on
    the loaded module; an op is hinted with the module whose parameters it reads (a loaded archive keeps
    the module tree, not the scopes)."""
    import torch

    module = torch.jit.load(str(path), map_location="cpu").eval()
    graph = module.inlined_graph.copy()
    owner = {next(graph.inputs()).unique(): ""}  # value -> the module path it is, or whose parameter it is
    tapped, hints = [], []
    for node in graph.nodes():
        if node.kind() == "prim::GetAttr":
            parent = owner.get(node.input().unique())
            if parent is not None:
                out = node.output()
                owner[out.unique()] = parent if out.type().kind() == "TensorType" else \
                    ".".join(p for p in (parent, node.s("name")) if p)
            continue
        for out in node.outputs():
            if out.type().kind() == "TensorType" and node.kind().startswith("aten::"):
                tapped.append(out)
                hints.append(tuple(dict.fromkeys(owner[i.unique()] for i in node.inputs()
                                                 if owner.get(i.unique()))))
    final = next(graph.outputs()).unique()
    graph.eraseOutput(0)
    pack = graph.create("prim::TupleConstruct", tapped, 1)
    graph.insertNode(pack)
    pack.output().setType(torch._C.TupleType([v.type() for v in tapped]))
    graph.registerOutput(pack.output())
    run = torch._C._create_function_from_graph("taps", graph)
    rows = list(x.values()) if isinstance(x, dict) else [x]
    with torch.no_grad():
        values = run(module._c, *[torch.from_numpy(np.ascontiguousarray(r)) for r in rows])
    return [Tap(v.debugName(), out.detach().numpy(), h, v.unique() == final)
            for v, out, h in zip(tapped, values, hints)]


# the formats whose intermediate tensors are read, and how
TAPS = {"onnx": onnx_taps, "litert": litert_taps, "saved_model": saved_model_taps, "tfjs": tfjs_taps,
        "torchscript": torchscript_taps}
FORMATS_WITH_TAPS = tuple(TAPS)
