"""Repairs of ONNX graphs that a converter writes valid by the standard but that runtimes refuse.

jax2onnx writes JAX's `reduce_window` pooling over an NHWC tensor (a Keras or Flax MaxPooling2D on JAX)
as two Unsqueezes that make the tensor 6-D, a MaxPool (or AveragePool) whose kernel spans all four of
N, H, W and C with 1s on N and C, and a Squeeze back. The ONNX standard allows pooling over four spatial
dimensions, but onnxruntime pools over at most three ("Unsupported pooling size"), and onnx2fx and onnx2tf
refuse it too. The same pooling, spatial dimensions only, is NHWC -> NCHW, a 2-D pool, and back."""
from __future__ import annotations

from pathlib import Path

POOLS = ("MaxPool", "AveragePool")


def _ints(node, name: str) -> list[int] | None:
    from onnx import helper
    found = [helper.get_attribute_value(a) for a in node.attribute if a.name == name]
    return list(found[0]) if found else None


def _constant(graph, name: str):
    """An initializer's (or a Constant node's) value as a list, or None."""
    from onnx import numpy_helper
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init).reshape(-1).tolist()
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            return numpy_helper.to_array(node.attribute[0].t).reshape(-1).tolist()
    return None


def _channels_last_pool(graph, pool, producers, consumers):
    """The (first Unsqueeze, Squeeze) around `pool` when it is jax2onnx's N-and-C-spanning pool, else None."""
    kernel, strides = _ints(pool, "kernel_shape"), _ints(pool, "strides") or []
    pads, dilations = _ints(pool, "pads"), _ints(pool, "dilations")
    if not kernel or len(kernel) < 3 or kernel[0] != 1 or kernel[-1] != 1:
        return None
    if strides and (strides[0] != 1 or strides[-1] != 1) or dilations and set(dilations) != {1}:
        return None
    if pads and (pads[0] or pads[len(kernel) - 1] or pads[len(kernel)] or pads[-1]):
        return None
    second = producers.get(pool.input[0])
    first = producers.get(second.input[0]) if second is not None and second.op_type == "Unsqueeze" else None
    squeeze = consumers.get(pool.output[0], [])
    if first is None or first.op_type != "Unsqueeze" or len(squeeze) != 1 or squeeze[0].op_type != "Squeeze":
        return None
    if consumers.get(first.output[0], []) != [second] or consumers.get(second.output[0], []) != [pool]:
        return None
    axes = [_constant(graph, n.input[1]) if len(n.input) > 1 else _ints(n, "axes") for n in (first, second, squeeze[0])]
    if axes[0] != [0] or axes[1] not in ([0], [1]) or sorted(axes[2] or []) != [0, 1]:
        return None
    return first, squeeze[0]


def spatial_pools(path: Path) -> int:
    """Rewrite each such pool in the ONNX file at `path` as Transpose -> 2-D pool -> Transpose; returns
    how many were rewritten (the file is written only when there were some)."""
    import onnx
    from onnx import helper
    model = onnx.load(str(path))
    graph = model.graph
    producers = {out: n for n in graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rewritten = 0
    for pool in [n for n in graph.node if n.op_type in POOLS]:
        found = _channels_last_pool(graph, pool, producers, consumers)
        if found is None:
            continue
        first, squeeze = found
        kernel = _ints(pool, "kernel_shape")
        rank = len(kernel)  # the NHWC tensor's rank
        strides = (_ints(pool, "strides") or [1] * rank)[1:-1]
        pads = _ints(pool, "pads") or [0] * (2 * rank)
        pads = pads[1:rank - 1] + pads[rank + 1:2 * rank - 1]
        tag = pool.output[0]
        to_first = [0, rank - 1, *range(1, rank - 1)]
        to_last = [0, *range(2, rank), 1]
        extra = [helper.make_attribute(a.name, helper.get_attribute_value(a)) for a in pool.attribute
                 if a.name not in ("kernel_shape", "strides", "pads", "dilations")]
        nodes = [
            helper.make_node("Transpose", [first.input[0]], [f"{tag}_channels_first"], perm=to_first,
                             name=f"{tag}_to_channels_first"),
            helper.make_node(pool.op_type, [f"{tag}_channels_first"], [f"{tag}_pooled"], name=f"{tag}_spatial",
                             kernel_shape=kernel[1:-1], strides=strides, pads=pads),
            helper.make_node("Transpose", [f"{tag}_pooled"], [squeeze.output[0]], perm=to_last,
                             name=f"{tag}_to_channels_last"),
        ]
        nodes[1].attribute.extend(extra)
        at = list(graph.node).index(first)
        for old in (first, producers[pool.input[0]], pool, squeeze):
            graph.node.remove(old)
        for offset, node in enumerate(nodes):
            graph.node.insert(at + offset, node)
        rewritten += 1
    if rewritten:
        used = {i for n in graph.node for i in n.input}
        for init in [i for i in graph.initializer if i.name not in used]:  # the Unsqueeze and Squeeze axes
            graph.initializer.remove(init)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
    return rewritten
