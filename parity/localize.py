"""Where an artifact first disagrees with its original model: the original's layers paired with the
artifact's intermediate tensors, and the first layer (in the original's order) whose tensor already
exceeds what the cell's tolerance allows.

Framework-free: the original's layer outputs and the artifact's tensors arrive as arrays (frameworks/
and exporters/ read them); this module pairs and judges them.

Pairing, and every pair says which one made it:
  "name"   the artifact's tensor carries the layer's name (torch module paths survive into ONNX node
           metadata and litert-torch tensor names, Keras layer names into tf2onnx, SavedModel and TFLite
           names); of several, the last one the artifact computes, since that is the layer's output.
           A layer a converter fused away is then listed as unmatched, never guessed;
  "output" the original's last layer and the artifact's output (the tensor named after that layer
           may come before an activation the converter made an op of its own);
  "order"  only for an artifact whose names carry none of the layers' (onnx2tf renames every op): the
           one tensor with the layer's number of elements, in the original's order;
  "value"  as "order" where several tensors could be it: the closest fits are paired first, each
           tensor once, in order, and only a tensor pointing the layer's way (cosine at least
           MIN_COSINE): a layer scaled wrong still pairs, one folded into the next stays unmatched.
In all, a tensor laid out differently (NCHW against NHWC) is compared after the transpose that fits,
and one a converter fused an activation into against the original's through that activation.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class Tap:
    """One intermediate tensor of an artifact, in the order its runtime computes them."""
    name: str                         # the artifact's tensor or node name
    value: np.ndarray
    hints: tuple[str, ...] = ()       # layer names the artifact attaches to it, outermost op first
    is_output: bool = False           # one of the artifact's outputs


@dataclass
class Pair:
    layer: str
    node: str | None
    matched_by: str                   # "name", "order" or "unmatched"
    layout: str = ""                  # how the tensors were aligned: a transpose ("NCHW->NHWC"), a fused activation
    max_abs: float | None = None
    cosine: float | None = None
    allowed: float | None = None      # the error the cell's tolerance allows at this layer
    scale: float | None = None        # max |value| of the original's output of this layer

    @property
    def diverges(self) -> bool:
        return self.max_abs is not None and self.allowed is not None and self.max_abs > self.allowed

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != ""}


@dataclass
class Localization:
    pairs: list[Pair] = field(default_factory=list)
    first: Pair | None = None
    note: str = ""                    # why nothing was named, when nothing was
    expected: np.ndarray | None = None  # what the first diverging tensor should hold, in the artifact's layout

    def to_json(self) -> dict:
        out = {"layers": [p.to_json() for p in self.pairs],
               "unmatched": [p.layer for p in self.pairs if p.matched_by == "unmatched"]}
        if self.first is not None:
            out.update(layer=self.first.layer, node=self.first.node, max_abs=self.first.max_abs,
                       matched_by=self.first.matched_by)
        if self.note:
            out["note"] = self.note
        return out


def per_output(loc: dict, groups: dict[str, list[str]]) -> dict[str, dict]:
    """Each output's own first diverging layer, among the layers it is computed from (`groups`:
    output -> its layers), from the pairs already measured."""
    found = {}
    for output, layers in groups.items():
        pairs = [p for p in loc.get("layers", []) if p["layer"] in layers]
        first = next((p for p in pairs if "max_abs" in p and p["max_abs"] > p["allowed"]), None)
        found[output] = ({k: first[k] for k in ("layer", "node", "max_abs", "matched_by")} if first else
                         {"note": f"none of its {len(pairs)} layers exceeds the tolerance"})
    return found


def one_line(loc: dict, fmt: str) -> str:
    """'first diverges at conv2 (onnx node /conv2/Conv): max abs 2.1e-01', or why none was named."""
    if loc.get("layer"):
        return (f"first diverges at {loc['layer']} ({fmt} node {loc['node']}): max abs {loc['max_abs']:.1e}"
                f" (matched by {loc['matched_by']})")
    return f"no diverging layer named: {loc.get('note') or 'no layer paired with the artifact'}"


MODULE_SCOPE = re.compile(r"^(?:[\w.<>]+\.)?[A-Z]\w*_([\w.]+)$")  # litert-torch: 'torch.nn.modules.conv.Conv2d_conv2'


def name_parts(text: str) -> list[str]:
    """The scope components of a tensor or node name, each also without a trailing _<n> that graph
    builders add ('functional_1/conv2_1/Relu' -> functional, conv2, Relu ...), and a torch module's
    path where a converter wrote it after its class ('...Conv2d_layer1.0.conv1' -> layer1.0.conv1)."""
    parts = [p for p in re.split(r"[/:;]", text) if p]
    modules = [m.group(1) for m in map(MODULE_SCOPE.match, parts) if m]
    return parts + [re.sub(r"_\d+$", "", p) for p in parts] + modules


def allowed_error(reference: np.ndarray, atol: float | None, rtol: float | None) -> float:
    """What a tolerance allows a tensor of this size: its absolute bound, or its relative one on the
    tensor's largest magnitude, whichever is larger (as an element passes on either)."""
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    bounds = [b for b in (atol, None if rtol is None else rtol * scale) if b is not None]
    return max(bounds) if bounds else 0.0


def localize(layers: Sequence[tuple[str, np.ndarray]], taps: Sequence[Tap], *, atol: float | None,
             rtol: float | None) -> Localization:
    """Pair each of the original's layers (in its order, with its outputs on the same rows) with the
    artifact's taps, measure each pair, and name the first that exceeds the tolerance."""
    refs = [(layer, np.asarray(ref, dtype=np.float64)) for layer, ref in layers]
    by_name: dict[str, int] = {}
    for layer, ref in refs:
        index = _by_name(layer, ref, taps, set(by_name.values()))
        if index is not None:
            by_name[layer] = index
    used = set(by_name.values())
    found: dict[int, tuple[int, str]] = {}
    last = len(refs) - 1
    if refs:  # the model's output is the last layer's, whatever its name (a fused softmax)
        index, _ = _as_output(refs[last][1], taps, used - {by_name.get(refs[last][0])})
        if index is not None:
            found[last] = (index, "output")
    for n, (layer, _) in enumerate(refs):
        if n not in found and layer in by_name and by_name[layer] not in {i for i, _ in found.values()}:
            found[n] = (by_name[layer], "name")
    if not by_name:  # the names say nothing here: the order and the values do
        found.update(_by_values(refs, taps, found))
    pairs = []
    expected: dict[str, np.ndarray] = {}
    for n, (layer, ref) in enumerate(refs):
        index, how = found.get(n, (None, ""))
        if index is None:
            pairs.append(Pair(layer, None, "unmatched"))
            continue
        value = np.asarray(taps[index].value, dtype=np.float64)
        ref, got, layout, axes = _aligned(ref, value)
        diff = np.abs(got - ref)
        expected[layer] = np.transpose(ref, np.argsort(axes)).reshape(value.shape)
        pairs.append(Pair(layer, taps[index].name, how, layout, max_abs=float(diff.max()) if diff.size else 0.0,
                          cosine=_cosine(ref, got), allowed=allowed_error(ref, atol, rtol),
                          scale=float(np.max(np.abs(ref))) if ref.size else 0.0))
    first = next((p for p in pairs if p.diverges), None)
    note = ""
    if first is None:
        matched = sum(p.matched_by != "unmatched" for p in pairs)
        note = (f"no paired layer exceeds the tolerance ({matched} of {len(pairs)} layers paired)" if matched
                else f"none of the original's {len(pairs)} layers paired with the artifact's {len(taps)} tensors")
    return Localization(pairs, first, note, expected.get(first.layer) if first else None)


def _same_size(ref: np.ndarray, value: np.ndarray) -> bool:
    return value.size == ref.size and value.ndim >= 1


def _by_name(layer: str, ref: np.ndarray, taps: Sequence[Tap], used: set[int]) -> int | None:
    """The last tap whose own op (its first hint, or its name) carries the layer's name."""
    found = None
    for i, tap in enumerate(taps):
        if i in used or not _same_size(ref, np.asarray(tap.value)):
            continue
        own = tap.hints[:1] if tap.hints else (tap.name,)
        if any(layer in name_parts(h) or h == layer for h in own):
            found = i
    return found


def _as_output(ref: np.ndarray, taps: Sequence[Tap], used: set[int]) -> tuple[int | None, str]:
    outputs = [i for i, t in enumerate(taps) if t.is_output and i not in used and _same_size(ref, np.asarray(t.value))]
    return (outputs[0], "output") if len(outputs) == 1 else (None, "output")


MIN_COSINE = 0.9  # below it a tensor is not taken for the layer's output by its values


def _by_values(refs, taps: Sequence[Tap], fixed: dict[int, tuple[int, str]]) -> dict[int, tuple[int, str]]:
    """Layers paired with unnamed tensors of their size: the closest fits first (smallest error for the
    layer's scale), each tensor to one layer, keeping the original's order in the artifact's; "order"
    where a layer had one candidate, "value" where it had several. A tensor that fits a later layer
    better is left to it, so a layer the converter folded into the next one stays unmatched."""
    options = []
    sizes: dict[int, int] = {}
    for n, (_, ref) in enumerate(refs):
        if n in fixed:
            continue
        candidates = [i for i, t in enumerate(taps) if _same_size(ref, np.asarray(t.value))]
        sizes[n] = len(candidates)
        scale = float(np.max(np.abs(ref))) or 1.0
        for i in candidates:
            target, got, _, _ = _aligned(ref, np.asarray(taps[i].value, dtype=np.float64))
            if _cosine(target, got) >= MIN_COSINE:
                options.append((float(np.max(np.abs(got - target))) / scale, n, i))
    chosen = dict(fixed)
    for _, n, i in sorted(options):
        if n in chosen or i in {t for t, _ in chosen.values()}:
            continue
        if all((m < n) == (t < i) for m, (t, _) in chosen.items()):  # the artifact computes them in order
            chosen[n] = (i, "order" if sizes[n] == 1 else "value")
    return {n: p for n, p in chosen.items() if n not in fixed}


LAYOUTS = {4: {"": (0, 1, 2, 3), "NCHW->NHWC": (0, 2, 3, 1), "NHWC->NCHW": (0, 3, 1, 2)},
           3: {"": (0, 1, 2), "NCL->NLC": (0, 2, 1)}}


# activations converters fuse into the op before them (TFLite, TF.js): the artifact's tensor is then
# the activation's output, which the original computes outside the layer (torch.relu in forward)
FUSED = {"": lambda a: a, "relu": lambda a: np.maximum(a, 0), "relu6": lambda a: np.clip(a, 0, 6)}


def _aligned(ref: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray, str, tuple[int, ...]]:
    """(the original's tensor, the artifact's in the same layout, how they were aligned, the axes that
    moved the artifact's): the artifact's as it is or transposed, against the original's as it is or
    through an activation fused after it; whichever fits best, and the alignment says which."""
    same = tuple(range(ref.ndim))
    best, best_err = (ref, value.reshape(ref.shape), "", same), math.inf
    for name, axes in LAYOUTS.get(value.ndim, {"": tuple(range(value.ndim))}).items():
        moved = np.transpose(value, axes)
        if name and moved.shape != ref.shape:
            continue
        if moved.shape != ref.shape:  # the same size in another shape (a flatten the converter left out)
            moved, axes = moved.reshape(ref.shape), same
        for act, fn in FUSED.items():
            target = fn(ref)
            err = float(np.max(np.abs(moved - target))) if ref.size else 0.0
            if err < best_err:
                how = ", ".join(p for p in (name, f"{act} fused" if act else "") if p)
                best, best_err = (target, moved, how, axes), err
    return best


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb))
