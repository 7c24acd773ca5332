"""Rewrites of a converted TF.js graph model (model.json and its weights) that TF.js' wasm backend needs:
its fused ops take a bias of rank 1 only, where the converter can leave one of rank 2 or a scalar. Each
rewrite keeps the numbers (a broadcast bias is the same bias) and is listed in the artifact's details."""
from __future__ import annotations

import base64
import collections
import json
from pathlib import Path

import numpy as np


def sorted_node_attributes(path: Path, model_json: dict) -> None:
    """Every node's `attr` map written in key order. The converter prints the graph's protobuf maps in
    whatever order they iterate, which differs from one conversion of the same SavedModel to the next;
    sorted, the same graph gives the same bytes. Only maps of attributes: the order of the signature's
    inputs is how TF.js binds inputs given by position, and stays as converted."""
    topology = model_json.get("modelTopology", {})
    functions = topology.get("library", {}).get("function", [])
    for node in topology.get("node", []) + [n for f in functions for n in f.get("nodeDef", [])]:
        if "attr" in node:
            node["attr"] = dict(sorted(node["attr"].items()))
    for f in functions:
        if "attr" in f:
            f["attr"] = dict(sorted(f["attr"].items()))
    path.write_text(json.dumps(model_json))


def rank1_fused_biases(path: Path, model_json: dict) -> list[str]:
    """A bias of shape [1, ..., 1, n] in a fused op (_FusedMatMul, _FusedConv2D: fused_ops starting with
    BiasAdd) told as shape [n] in the weights manifest; the bytes are the same. jax broadcasts a bias to
    (1, n) before adding it, onnx2tf keeps that shape, the converter fuses the add, and TF.js' wasm
    backend refuses the result ("_FusedMatMul only supports rank-1 bias but got rank 2"); broadcast
    against the op's output, [n] and [1, n] are the same bias. Only a weight no other node reads."""
    nodes = model_json.get("modelTopology", {}).get("node", [])
    readers = collections.Counter(i.split(":")[0].lstrip("^") for n in nodes for i in n.get("input", []))
    biases = set()
    for n in nodes:
        fused = _fused_ops(n)
        if n.get("op", "").startswith("_Fused") and fused[:1] == ["BiasAdd"] and len(n.get("input", [])) > 2:
            bias = n["input"][2].split(":")[0]
            if readers[bias] == 1:
                biases.add(bias)
    squeezed, done = [], set()
    for group in model_json.get("weightsManifest", []):
        for w in group.get("weights", []):
            shape = w.get("shape", [])
            if w.get("name") in biases and len(shape) > 1 and all(d == 1 for d in shape[:-1]):
                w["shape"] = [shape[-1]]
                done.add(w["name"])
                squeezed.append(f"{w['name']}: {shape} -> {w['shape']}")
    for n in nodes:  # the Const node tells the shape too
        dims = n.get("attr", {}).get("value", {}).get("tensor", {}).get("tensorShape", {}).get("dim")
        if n.get("name") in done and n.get("op") == "Const" and dims:
            n["attr"]["value"]["tensor"]["tensorShape"]["dim"] = dims[-1:]
    if squeezed:
        path.write_text(json.dumps(model_json))
    return squeezed


def _fused_ops(node: dict) -> list[str]:
    return [base64.b64decode(f).decode() for f in node.get("attr", {}).get("fused_ops", {}).get("list", {}).get("s", [])]


# the output channels of a fused op, from its filter's shape (HWIO; depthwise HWIM; a matmul's [in, out])
_FILTER_CHANNELS = {"_FusedConv2D": lambda s: s[-1], "FusedDepthwiseConv2dNative": lambda s: s[-2] * s[-1],
                    "_FusedMatMul": lambda s: s[-1]}


def widened_scalar_biases(folder: Path, model_json: dict) -> list[str]:
    """A scalar bias in a fused op (a `x + 3` folded into the conv before hard-swish's relu6) as one
    value per output channel, in a weights file of its own: TF.js' wasm backend refuses a rank-0 bias
    ("FusedConv2D only supports rank-1 bias but got rank 0"); broadcast, the two are the same bias."""
    nodes = model_json.get("modelTopology", {}).get("node", [])
    weights = {w["name"]: w for g in model_json.get("weightsManifest", []) for w in g.get("weights", [])}
    added, notes = [], []
    for n in nodes:
        fused = _fused_ops(n)
        ins = n.get("input", [])
        if n.get("op") not in _FILTER_CHANNELS or fused[:1] != ["BiasAdd"] or len(ins) < 3:
            continue
        bias, filt = ins[2].split(":")[0], ins[1].split(":")[0]
        if bias not in weights or filt not in weights or weights[bias].get("shape") != []:
            continue
        w = weights[bias]
        transposed = n["op"] == "_FusedMatMul" and n["attr"].get("transpose_b", {}).get("b")
        if w.get("dtype") != "float32" or w.get("quantization") or transposed:
            continue
        try:
            value = _read_weight(folder, model_json, bias)
        except (KeyError, OSError):  # a weight laid out in a way not read here: left as the converter made it
            continue
        channels = _FILTER_CHANNELS[n["op"]](weights[filt]["shape"])
        name = f"{n['name']}/bias_per_channel"
        added.append((name, np.full(channels, value, np.float32)))
        ins[2] = name  # the scalar's Const node stays for any other reader
        notes.append(f"{n['name']}: scalar bias {value:g} -> [{channels}]")
    if added:
        _add_constants(folder, model_json, added, "group-widened-biases.bin")
    return notes


_FLOAT = {"T": {"type": "DT_FLOAT"}}


def unfused_hard_swish(folder: Path, model_json: dict) -> list[str]:
    """A conv with hard-swish fused in (`_FusedHardSwish`, which TensorFlow's oneDNN remapper makes on x86)
    as the conv with its bias, then hard-swish spelt out, x * relu6(x + 3) / 6, in ops every TF.js
    backend has: neither the cpu nor the wasm backend implements the fused activation ("Activation
    _fusedhardswish has not been implemented"), so MobileNetV3 and its kin would run nowhere."""
    nodes = model_json.get("modelTopology", {}).get("node", [])
    three, sixth = "hard_swish/three", "hard_swish/one_sixth"
    done = []
    for n in list(nodes):
        if n.get("op") != "_FusedConv2D" or _fused_ops(n) != ["BiasAdd", "_FusedHardSwish"]:
            continue
        name = n["name"]
        conv = dict(n, name=f"{name}/conv", attr=dict(n["attr"], fused_ops={"list": {"s": [
            base64.b64encode(b"BiasAdd").decode()]}}))
        nodes[nodes.index(n)] = conv
        nodes += [{"name": f"{name}/plus_three", "op": "AddV2", "input": [conv["name"], three], "attr": _FLOAT},
                  {"name": f"{name}/relu6", "op": "Relu6", "input": [f"{name}/plus_three"], "attr": _FLOAT},
                  {"name": f"{name}/gated", "op": "Mul", "input": [conv["name"], f"{name}/relu6"], "attr": _FLOAT},
                  # the last op keeps the fused node's name: its readers are unchanged
                  {"name": name, "op": "Mul", "input": [f"{name}/gated", sixth], "attr": _FLOAT}]
        done.append(f"{name}: _FusedConv2D(BiasAdd, _FusedHardSwish) -> _FusedConv2D(BiasAdd), x * relu6(x + 3) / 6")
    if done:
        _add_constants(folder, model_json, [(three, np.float32(3.0)), (sixth, np.float32(1.0 / 6.0))],
                       "group-hard-swish.bin")
    return done


def _add_constants(folder: Path, model_json: dict, named: list[tuple[str, np.ndarray]], file: str) -> None:
    """float32 constants as Const nodes with their weights in a file of their own; writes model.json."""
    arrays = [(name, np.asarray(a, np.float32)) for name, a in named]
    (folder / file).write_bytes(b"".join(a.tobytes() for _, a in arrays))
    model_json["weightsManifest"].append({"paths": [file], "weights": [
        {"name": name, "shape": list(a.shape), "dtype": "float32"} for name, a in arrays]})
    for name, a in arrays:
        model_json["modelTopology"]["node"].append({"name": name, "op": "Const", "attr": {
            "dtype": {"type": "DT_FLOAT"},
            "value": {"tensor": {"dtype": "DT_FLOAT", "tensorShape": {"dim": [{"size": str(d)} for d in a.shape]}}}}})
    (folder / "model.json").write_text(json.dumps(model_json))


_DTYPE = {"float32": np.float32, "int32": np.int32, "bool": np.bool_, "uint8": np.uint8, "uint16": np.uint16,
          "float16": np.float16}


def _read_weight(folder: Path, model_json: dict, name: str) -> float:
    """One unquantized weight's value, read from its group's shards in manifest order."""
    for group in model_json["weightsManifest"]:
        blob = b"".join((folder / p).read_bytes() for p in group["paths"])
        at = 0
        for w in group["weights"]:
            dtype = np.dtype(_DTYPE[(w.get("quantization") or {}).get("dtype", w["dtype"])])
            size = int(np.prod(w["shape"])) * dtype.itemsize if w["shape"] else dtype.itemsize
            if w["name"] == name:
                return float(np.frombuffer(blob[at:at + size], dtype)[0])
            at += size
    raise KeyError(name)
