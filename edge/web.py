"""The web bundle: a model's TF.js, ONNX and LiteRT artifacts as a static web page that proves parity in a browser.

    write_web_bundle(bundle, out_dir, webgpu=True) -> Path
        out_dir/model/        the bundle's TF.js graph model (model.json + weight shards), copied
        out_dir/tf.min.js, tf-backend-wasm.min.js, tfjs-backend-wasm*.wasm
                              TF.js' browser builds, copied from exporters/js/node_modules (nothing downloaded)
        out_dir/onnx/model.onnx   the fp32 ONNX artifact, run by onnxruntime-web (ort/: its wasm build, and its
                              webgpu build when webgpu; hard-linked from node_modules where the disk allows)
        out_dir/litert/model.tflite  the fp32 LiteRT artifact, run by LiteRT.js (litert/: @litertjs/core's ES
                              module, its wasm loader and the plain + compat wasm builds)
        out_dir/parity.json   the stored parity inputs (name, dtype, shape, values), the reference outputs and
                              the fp32 tfjs tolerance (parity.compare.tolerance_for), the feed cuts, the layout;
                              "runtimes": {onnx_web, litert_web}: per artifact its file, size, how to feed it
                              (input/output names, [start, rows, size, signature] feeds) and its format's tolerance
        out_dir/index.html    loads the model with tf.loadGraphModel on ?backend=cpu|wasm|webgl, runs the parity
        out_dir/page.js       inputs, compares in the page, shows a result table and sets window.parityResult
        out_dir/runtime.html  the same for ?format=onnx_web|litert_web&backend=wasm|webgpu
        out_dir/runtime.js
        out_dir/compare.js    the comparison both pages use
    A model without one of those artifacts has no such part (and no such cell).

    web_targets(web_dir) -> ("cpu", "wasm", "webgl", "onnx_web:wasm", "onnx_web:webgpu", "litert_web:wasm", ...)
    unsupported_cells(web_dir) -> {format: why}   artifacts carried but not runnable there (LiteRT.js: no
                              dynamic-batch signature), left out of web_targets
    verify_in_browser(web_dir, backends=("cpu", "wasm", "webgl"), screenshot_dir=None) -> list[dict]
        serves web_dir on 127.0.0.1 (a thread), opens the page once per target in headless Chromium
        (playwright driving /usr/bin/chromium; webgpu targets in a second browser with WEBGPU_ARGS), waits for
        window.parityResult, refuses a silent backend fallback (judged by what the backend object that ran the
        model says it is, page.js's backendFacts, checked again here with exporters.tfjs.backend_mismatch; for
        the other runtimes the execution provider / accelerator they report), takes a PNG screenshot per target
        when asked; one result dict per target. $T2E_TFJS_FAULT (tests only) is passed to the page as ?fault=.
    browser_record(bundle, result) -> dict   a result as a ParityRecord (parity.compare, the format's tolerance)

The page judges like parity/compare.py's element check: a value is out of tolerance when its absolute error
exceeds atol AND its relative error |got - ref| / max(|ref|, rel_floor) exceeds rtol; a non-finite value fails.
It feeds like exporters/tfjs.py's Node runner: one input goes to the graph's only input (transposed by
details["input_transpose"] when set), several by name; one output is the graph's first, several are fetched by
the graph node names that details["outputs"] records for their signature keys, matched to the model's outputs
(parity.signature.map_tensors) and concatenated row-wise in the model's order (parity.feeds.flat_rows).
onnxruntime-web and LiteRT.js are fed like exporters/onnx.py's and exporters/litert.py's runners (the file's own
input names, static batches in chunks of the sizes they take), one wasm thread.

Nothing here imports the pipeline or MLflow; playwright is imported only by verify_in_browser.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from exporters.base import Artifact
from exporters.bundle import Bundle
from exporters.tfjs import FAULT_ENV, backend_mismatch
from exporters.verify import feed_cuts
from parity.compare import tolerance_for
from parity.feeds import is_multi, n_rows
from parity.signature import Signature, TensorSpec, batch_plan, map_tensors

ROOT = Path(__file__).resolve().parent.parent
PAGE_DIR = Path(__file__).resolve().parent / "web"       # index.html + page.js (templates, copied as they are)
NODE_MODULES = ROOT / "exporters" / "js" / "node_modules"
CHROMIUM = "/usr/bin/chromium"
BACKENDS = ("cpu", "wasm", "webgl")
# the browser builds the page loads, (source in node_modules, name in the web bundle)
SCRIPTS = (("@tensorflow/tfjs/dist/tf.min.js", "tf.min.js"),
           ("@tensorflow/tfjs-backend-wasm/dist/tf-backend-wasm.min.js", "tf-backend-wasm.min.js"))
WASM_FILES = ("tfjs-backend-wasm.wasm", "tfjs-backend-wasm-simd.wasm", "tfjs-backend-wasm-threaded-simd.wasm")
WASM_SRC = "@tensorflow/tfjs-backend-wasm/dist"
# onnxruntime-web and LiteRT.js: the files the pages load, (source in node_modules, name in the web bundle)
ORT_SRC = "onnxruntime-web/dist"
ORT_FILES = {"wasm": ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"),
             "webgpu": ("ort.webgpu.min.js", "ort-wasm-simd-threaded.asyncify.mjs",
                        "ort-wasm-simd-threaded.asyncify.wasm")}
LITERT_FILES = (("@litertjs/core/dist/index.js", "core.js"), ("@litertjs/wasm-utils/dist/index.js", "wasm-utils.js"),
                *((f"@litertjs/core/wasm/{n}", n) for n in ("litert_wasm_internal.js", "litert_wasm_internal.wasm",
                                                            "litert_wasm_compat_internal.js",
                                                            "litert_wasm_compat_internal.wasm")))
# the formats the bundle proves besides TF.js: format -> (artifact format, page backends, runtime name per backend)
WEB_RUNTIMES = {"onnx_web": ("onnx", ("wasm", "webgpu"), "onnxruntime-web-{}"),
                "litert_web": ("litert", ("wasm", "webgpu"), "litertjs-{}")}
WEBGPU = True  # web_targets lists the webgpu cells (headless Chromium here: SwiftShader's adapter)
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--enable-unsafe-swiftshader")
# WebGPU in headless Chromium: only with the GPU process on (no --disable-gpu) and Dawn's unsafe flag; the
# adapter is SwiftShader's Vulkan, in software (as TF.js' webgl runs on SwiftShader's GL)
WEBGPU_ARGS = (*(a for a in CHROMIUM_ARGS if a != "--disable-gpu"), "--enable-unsafe-webgpu",
               "--use-webgpu-adapter=swiftshader")
_NATIVE_LOG = re.compile(r"^(INFO|WARNING|VERBOSE): (\[[\w.]+:\d+\] |Created TensorFlow Lite)")
_TF_DTYPES = {"float32": "float32", "float64": "float32", "float16": "float32",
              "int32": "int32", "int64": "int32", "int16": "int32", "int8": "int32", "uint8": "int32"}


class WebBundleError(RuntimeError):
    """A web bundle that cannot be written: says which part of the model bundle was wrong or missing."""


# --------------------------------------------------------------------------------------------------- build

def _pick_tfjs(bundle: Bundle) -> Artifact:
    arts = bundle.artifacts("tfjs")
    if not arts:
        raise WebBundleError(f"{bundle.root}: the bundle of {bundle.model} has no tfjs artifact "
                             f"(formats: {', '.join(bundle.formats)})")
    fp32 = [a for a in arts if a.variant == "fp32"]
    return (fp32 or arts)[0]


def _fp32(bundle: Bundle, fmt: str) -> Artifact | None:
    """The bundle's fp32 artifact of `fmt`, or None (then the web bundle has no such cell)."""
    return next((a for a in bundle.artifacts(fmt) if a.variant == "fp32"), None)


def _values(a: np.ndarray) -> list:
    """Flat values for JSON; non-finite ones as null (JSON has no NaN), which the page reads back as NaN."""
    flat = np.asarray(a, dtype=np.float64).ravel()
    finite = np.isfinite(flat)
    out = flat.tolist()
    if not finite.all():
        for i in np.flatnonzero(~finite):
            out[i] = None
    return out


def _tf_dtype(name: str, a: np.ndarray) -> str:
    dtype = _TF_DTYPES.get(np.asarray(a).dtype.name)
    if dtype is None:
        raise WebBundleError(f"input {name!r}: dtype {np.asarray(a).dtype} cannot be fed to TF.js (float32 or int32)")
    return dtype


def _artifact_specs(d: dict, what: str) -> list[dict]:
    return list((d.get(what) or {}).values())


def _spec(t: dict, name: str) -> TensorSpec:
    shape = [None if s is None or int(s) < 0 else int(s) for s in (t.get("shape") or [None])]
    dtype = t.get("dtype") or "float32"
    try:
        return TensorSpec(name, dtype, tuple(shape))
    except ValueError:
        return TensorSpec(name, "float32", tuple(shape))


def parity_document(bundle: Bundle, artifact: Artifact | None = None) -> dict:
    """What parity.json holds: the stored parity inputs and reference outputs, the tolerance, the layout."""
    art = artifact or (_pick_tfjs(bundle) if bundle.artifacts("tfjs") else None)
    d = (art.details or {}) if art is not None else {}
    ref = bundle.reference()
    x, y = ref["x"], np.asarray(ref["y"])
    rows = n_rows(x)
    sig = Signature.from_json(bundle.manifest.get("signature") or {})
    tol = tolerance_for("fp32", "tfjs", bundle.manifest.get("tolerances") or {})

    art_inputs = _artifact_specs(d, "inputs")
    if is_multi(x):
        # named inputs go to the graph's inputs matched by meaning (the Node runner's caller does the same)
        graph = [_spec(t, t.get("name") or t.get("key")) for t in art_inputs]
        model_specs = sig.inputs if len(sig.inputs) == len(x) else tuple(TensorSpec.of(k, v) for k, v in x.items())
        pairs, _ = map_tensors(model_specs, tuple(graph)) if graph else ({}, [])
        items = list(x.items())
    else:
        name = sig.inputs[0].name if sig.inputs else "x"
        pairs = {name: (art_inputs[0].get("name") if art_inputs else d.get("input_name"))}
        items = [(name, x)]
    inputs = []
    for name, v in items:
        v = np.asarray(v)
        inputs.append({"name": name, "graph_name": pairs.get(name, name), "dtype": _tf_dtype(name, v),
                       "shape": list(v.shape), "values": _values(v)})

    # outputs: one -> the graph's first; several -> the graph node of each model output, in the model's order
    recorded = d.get("outputs") or {}
    if len(recorded) > 1 and len(sig.outputs) > 1:
        by_key = {k: o.get("name") for k, o in recorded.items()}
        out_pairs, _ = map_tensors(sig.outputs, tuple(_spec(o, k) for k, o in recorded.items()))
        outputs = [{"name": t.name, "key": out_pairs[t.name], "graph_name": by_key[out_pairs[t.name]]}
                   for t in sig.outputs]
    else:
        first = next(iter(recorded.values()), {})
        outputs = [{"name": sig.outputs[0].name if sig.outputs else "output", "key": first.get("key"),
                    "graph_name": first.get("name") or d.get("output_name")}]

    max_batch = int(bundle.manifest.get("max_batch") or rows or 1)
    if art is not None and art.batch_sizes:  # a graph with a fixed batch takes only that batch
        feeds = [(a, min(a + art.batch_sizes[0], rows)) for a in range(0, rows, art.batch_sizes[0])]
    else:
        feeds = feed_cuts(rows, max_batch)
    return {
        "kind": "tfjs-web-parity", "model": bundle.model, "framework": bundle.manifest.get("framework"),
        "task": bundle.manifest.get("task"), "format": art.format if art else None,
        "variant": art.variant if art else None,
        "model_url": "model/model.json" if art else None, "wasm_dir": "./",
        "rows": rows, "feeds": [list(c) for c in feeds], "max_batch": max_batch,
        "inputs": inputs, "input_transpose": d.get("input_transpose"), "outputs": outputs,
        "reference": {"shape": list(y.shape), "dtype": "float32", "values": _values(y)},
        "tolerance": tol.to_json(), "tolerance_for": "fp32 tfjs", "tolerance_text": tol.describe(),
        "runtimes": runtime_sections(bundle),
    }


def _onnx_io(path: Path, label: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The ONNX file's own graph inputs (initializers left out) and outputs, as TensorSpecs."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise WebBundleError(f"onnx artifact {label}: cannot read {path}: {type(e).__name__}: {e}") from None
    inits = {i.name for i in proto.graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim) or (None,)
        try:
            dtype = np.dtype(tensor_dtype_to_np_dtype(t.elem_type)).name
        except Exception:  # noqa: BLE001
            dtype = "float32"
        try:
            return TensorSpec(v.name, dtype, dims)
        except ValueError:
            return TensorSpec(v.name, "float32", dims)
    return ([spec(v) for v in proto.graph.input if v.name not in inits], [spec(v) for v in proto.graph.output])


def _pairs(model: tuple[TensorSpec, ...], artifact: list[TensorSpec]) -> list[tuple[str, TensorSpec]]:
    """(model tensor name, the artifact's tensor) in the model's order: one tensor goes to the artifact's first,
    several are matched by meaning (parity.signature.map_tensors)."""
    if len(model) <= 1 or len(artifact) <= 1:
        return [(model[0].name if model else "x", artifact[0])]
    matched, _ = map_tensors(tuple(model), tuple(artifact))
    by_name = {t.name: t for t in artifact}
    return [(t.name, by_name[matched[t.name]]) for t in model]


def _model_inputs(bundle: Bundle, sig: Signature) -> tuple[TensorSpec, ...]:
    x = bundle.reference()["x"]
    if is_multi(x):
        return sig.inputs if len(sig.inputs) == len(x) else tuple(TensorSpec.of(k, v) for k, v in x.items())
    return sig.inputs[:1] or (TensorSpec("x", "float32", (None,)),)


def _section(bundle: Bundle, fmt: str, art: Artifact, rows: int, tol_fmt: str) -> dict:
    tol = tolerance_for("fp32", tol_fmt, bundle.manifest.get("tolerances") or {})
    return {"format": fmt, "artifact_format": art.format, "variant": art.variant, "label": art.label,
            "size_bytes": art.size_bytes, "rows": rows,
            "tolerance": tol.to_json(), "tolerance_for": f"fp32 {tol_fmt}", "tolerance_text": tol.describe()}


def _plan(bundle: Bundle, rows: int, static: tuple[int, ...] | None) -> list[tuple[int, int, int]]:
    """(start, rows, size) per call: the pipeline's feed cuts (batch 1, the largest declared batch, the rest),
    each cut in the sizes a static artifact takes (parity.signature.batch_plan: chunks, the last padded)."""
    out = []
    for a, b in feed_cuts(rows, int(bundle.manifest.get("max_batch") or rows or 1)):
        out += [(a + s, n, size) for s, n, size in batch_plan(b - a, static)]
    return out


def _onnx_section(bundle: Bundle, art: Artifact) -> dict:
    """onnxruntime-web feeds the ONNX file as exporters/onnx.py's runner does: the graph's own input names
    (one input: the graph's only one), outputs in the model's order, a fixed batch in padded chunks."""
    sig = Signature.from_json(bundle.manifest.get("signature") or {})
    ins, outs = _onnx_io(Path(art.path), art.label)
    if not ins or not outs:
        raise WebBundleError(f"onnx artifact {art.label}: expected graph inputs and outputs, found "
                             f"{len(ins)} and {len(outs)}")
    rows = n_rows(bundle.reference()["x"])
    fixed = ins[0].shape[0] if ins[0].shape else None
    static = tuple(art.batch_sizes or ()) or ((fixed,) if fixed else None)
    feeds = [[a, n, size, None] for a, n, size in _plan(bundle, rows, static)]
    doc = _section(bundle, "onnx_web", art, rows, "onnx")
    doc.update({"model_url": "onnx/model.onnx", "wasm_dir": "ort/", "feeds": feeds,
                "inputs": [{"name": m, "target": t.name, "dtype": t.dtype} for m, t in _pairs(_model_inputs(bundle, sig), ins)],
                "outputs": [t.name for _, t in _pairs(sig.outputs, outs)]})
    return doc


def _litert_section(bundle: Bundle, art: Artifact) -> dict:
    """LiteRT.js feeds the .tflite file as exporters/litert.py's runner does, by signature: a dynamic-batch
    signature takes each feed whole; static ones (litert-torch: one signature batch_<n> per batch size) take
    their own size, other counts go in chunks of them, the last filled up by repeating its last row and its
    output trimmed (LiteRT.js cannot resize a signature's input, so the runner's resize route is not taken)."""
    sig = Signature.from_json(bundle.manifest.get("signature") or {})
    sigs = (art.details or {}).get("signatures") or {}
    if not sigs:
        raise WebBundleError(f"litert artifact {art.label}: its details record no signatures; re-export it")
    rows = n_rows(bundle.reference()["x"])
    dynamic = next((k for k, v in sigs.items() if v.get("batch") is None), None)
    static = {int(v["batch"]): k for k, v in sigs.items() if v.get("batch") is not None}
    first = sigs[dynamic or static[max(static)]]

    def specs(tensors: dict) -> list[TensorSpec]:
        return [_spec({"shape": t.get("shape"), "dtype": t.get("dtype")}, n) for n, t in tensors.items()]
    feeds = [[a, n, size, dynamic or static[size]] for a, n, size in _plan(bundle, rows, None if dynamic else tuple(static))]
    doc = _section(bundle, "litert_web", art, rows, "litert")
    version = _package_version("@litertjs/core")
    used = {f[3] for f in feeds}
    dyn = {k: t["shape"] for k in sorted(used) for t in (sigs[k].get("inputs") or {}).values()
           if any(int(d) < 0 for d in t.get("shape") or [])}
    if dyn:  # LiteRT.js has no resize: a tensor must have the signature's exact type, -1 included
        k, shape = next(iter(dyn.items()))
        doc["unsupported"] = (f"LiteRT.js {version} cannot feed a signature with a dynamic dimension: signature "
                              f"{k!r} takes {shape} (it has no resize; a tensor must match the declared shape, -1 "
                              f"included), and this {bundle.manifest.get('framework')} artifact has no static one")
    doc.update({"model_url": "litert/model.tflite", "wasm_dir": "litert/", "feeds": feeds,
                "package_version": version,
                "inputs": [{"name": m, "target": t.name, "dtype": t.dtype}
                           for m, t in _pairs(_model_inputs(bundle, sig), specs(first.get("inputs") or {}))],
                "outputs": [t.name for _, t in _pairs(sig.outputs, specs(first.get("outputs") or {}))]})
    return doc


def _package_version(name: str) -> str | None:
    try:
        return json.loads((NODE_MODULES / name / "package.json").read_text()).get("version")
    except (OSError, ValueError):
        return None


def runtime_sections(bundle: Bundle) -> dict:
    """parity.json's "runtimes": one section per format besides TF.js whose fp32 artifact the bundle holds
    (what file, how to feed it, the tolerance of its format); a model without one has no such section."""
    out = {}
    for fmt, build in (("onnx_web", _onnx_section), ("litert_web", _litert_section)):
        art = _fp32(bundle, WEB_RUNTIMES[fmt][0])
        if art is not None:
            out[fmt] = build(bundle, art)
    return out


def unsupported_cells(web_dir) -> dict[str, str]:
    """{format: why}: artifacts the web bundle carries that their browser runtime cannot run (web_targets leaves
    them out; a report shows them as UNSUPPORTED with this reason). verify_in_browser still runs them if asked,
    and the page's error then starts with "UNSUPPORTED:" and quotes the runtime's own refusal."""
    doc = json.loads((Path(web_dir) / "parity.json").read_text())
    return {fmt: sec["unsupported"] for fmt, sec in (doc.get("runtimes") or {}).items() if sec.get("unsupported")}


def _link_or_copy(src: Path, dst: Path) -> None:
    """A runtime's file from node_modules: hard-linked where the disk allows (tens of MB of wasm per bundle)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def web_targets(web_dir, webgpu: bool | None = None) -> tuple[str, ...]:
    """What verify_in_browser can run for this web bundle: the TF.js backends when it holds a TF.js model, and
    "onnx_web:wasm" / "litert_web:wasm" for the artifacts it holds (":webgpu" too when `webgpu`, default
    WEBGPU, and the bundle carries onnxruntime-web's webgpu build)."""
    web_dir = Path(web_dir)
    doc = json.loads((web_dir / "parity.json").read_text())
    webgpu = WEBGPU if webgpu is None else webgpu
    out = list(BACKENDS) if doc.get("model_url") else []
    for fmt, section in (doc.get("runtimes") or {}).items():
        if section.get("unsupported"):
            continue  # unsupported_cells says why
        out.append(f"{fmt}:wasm")
        if webgpu and (fmt != "onnx_web" or (web_dir / "ort" / ORT_FILES["webgpu"][0]).is_file()):
            out.append(f"{fmt}:webgpu")
    return tuple(out)


def write_web_bundle(bundle: Bundle, out_dir, webgpu: bool = True) -> Path:
    """Write the web bundle of `bundle`'s TF.js, ONNX (fp32) and LiteRT (fp32) artifacts into `out_dir`
    (replaced if it exists); a model without one of them has no such part. `webgpu`: also carry
    onnxruntime-web's webgpu build (about 26 MB). Returns out_dir."""
    tfjs = _pick_tfjs(bundle) if bundle.artifacts("tfjs") else None
    onnx_art, litert_art = _fp32(bundle, "onnx"), _fp32(bundle, "litert")
    if tfjs is None and onnx_art is None and litert_art is None:
        raise WebBundleError(f"{bundle.root}: the bundle of {bundle.model} has no tfjs, onnx or litert fp32 "
                             f"artifact (formats: {', '.join(bundle.formats)})")
    missing = []
    if tfjs is not None:
        src = Path(tfjs.path)
        if not src.is_dir():
            raise WebBundleError(f"{bundle.root}: the tfjs artifact {tfjs.label} should be a folder at {src}, "
                                 f"found {'a file' if src.exists() else 'nothing'}")
        missing += [s for s, _ in SCRIPTS if not (NODE_MODULES / s).is_file()]
        missing += [f"{WASM_SRC}/{w}" for w in WASM_FILES if not (NODE_MODULES / WASM_SRC / w).is_file()]
    ort_files = [*ORT_FILES["wasm"], *(ORT_FILES["webgpu"] if webgpu else ())] if onnx_art is not None else []
    missing += [f"{ORT_SRC}/{f}" for f in ort_files if not (NODE_MODULES / ORT_SRC / f).is_file()]
    lite_files = LITERT_FILES if litert_art is not None else ()
    missing += [s for s, _ in lite_files if not (NODE_MODULES / s).is_file()]
    for art in (onnx_art, litert_art):
        if art is not None and not Path(art.path).is_file():
            raise WebBundleError(f"{bundle.root}: the {art.format} artifact {art.label} should be a file at "
                                 f"{art.path}, found {'a folder' if Path(art.path).exists() else 'nothing'}")
    if missing:
        raise WebBundleError(f"browser builds missing from {NODE_MODULES}: {', '.join(missing)}; "
                             f"run: npm ci --prefix exporters/js")
    doc = parity_document(bundle, tfjs)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if tfjs is not None:
        shutil.copytree(Path(tfjs.path), out / "model")
        for s, name in SCRIPTS:
            shutil.copy2(NODE_MODULES / s, out / name)
        for w in WASM_FILES:
            shutil.copy2(NODE_MODULES / WASM_SRC / w, out / w)
    if onnx_art is not None:
        (out / "onnx").mkdir()
        shutil.copy2(onnx_art.path, out / doc["runtimes"]["onnx_web"]["model_url"])
        for f in ort_files:
            _link_or_copy(NODE_MODULES / ORT_SRC / f, out / "ort" / f)
    if litert_art is not None:
        (out / "litert").mkdir()
        shutil.copy2(litert_art.path, out / doc["runtimes"]["litert_web"]["model_url"])
        for s, name in lite_files:
            _link_or_copy(NODE_MODULES / s, out / "litert" / name)
    for name in ("index.html", "page.js", "compare.js", "runtime.html", "runtime.js"):
        shutil.copy2(PAGE_DIR / name, out / name)
    (out / "parity.json").write_text(json.dumps(doc, separators=(",", ":"), allow_nan=False))
    return out


def browser_record(bundle: Bundle, r: dict) -> dict:
    """One result of verify_in_browser as a parity record (ParityRecord.to_json): the page's outputs judged as
    every other artifact is (parity.compare under the fp32 tolerance of the result's format: tfjs for tfjs_web,
    onnx for onnx_web, litert for litert_web), so the verdict cannot drift from the rest of the report; a page
    that failed to load, or ran on another backend than asked, is a failed record with its error (an
    "UNSUPPORTED: ..." error also sets details["outcome"] = "unsupported")."""
    from parity.compare import ParityRecord, compare
    fmt = r.get("format") or "tfjs_web"
    runtime = r.get("runtime") or f"chromium-{r['backend']}"
    tol_fmt = {"tfjs_web": "tfjs"}.get(fmt) or WEB_RUNTIMES[fmt][0]
    details = {"seconds": r.get("seconds"),
               "screenshot": Path(r["screenshot"]).name if r.get("screenshot") else None}
    if fmt == "tfjs_web":
        details.update({"tf_backend": r.get("tf_backend"), "backend_facts": r.get("backend_facts")})
    else:
        details.update({"backend": r.get("backend"), "runtime_facts": r.get("runtime_facts"),
                        "version": (r.get("page") or {}).get("version")})
    values = (r.get("page") or {}).get("outputs")
    if r.get("error") or values is None:
        error = r.get("error") or "the page returned no outputs"
        if error.startswith("UNSUPPORTED:"):
            details["outcome"] = "unsupported"
        return ParityRecord.failed_to_load(bundle.model, fmt, "fp32", runtime, None, error, details=details).to_json()
    ref = bundle.reference()
    y = ref["y"]
    got = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    got = got.reshape(y.shape) if got.size == y.size else got
    tol = tolerance_for("fp32", tol_fmt, bundle.manifest.get("tolerances") or {})
    several = len(bundle.manifest["signature"].get("outputs", [])) > 1
    comparison = compare(y, got, tolerance=tol, task="regression" if several else bundle.manifest["task"],
                         labels=None if several else ref.get("labels"), kinds=ref.get("kind"))
    return ParityRecord.checked(bundle.model, fmt, "fp32", runtime, None, comparison, details=details).to_json()


# ---------------------------------------------------------------------------------------------- serve + run

class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".js": "text/javascript", ".json": "application/json", ".bin": "application/octet-stream"}

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):  # quiet
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):  # the browser dropped a request it no longer needs
            return
        super().handle_error(request, client_address)


class StaticServer:
    """web_dir on http://127.0.0.1:<free port>/, served from a thread; a context manager."""

    def __init__(self, web_dir):
        self.web_dir = Path(web_dir).resolve()
        handler = functools.partial(_Handler, directory=str(self.web_dir))
        self.httpd = _Server(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                       name=f"web-bundle-{self.port}", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _model_name(web_dir: Path) -> str:
    try:
        return str(json.loads((web_dir / "parity.json").read_text()).get("model") or web_dir.name)
    except (OSError, ValueError, AttributeError):
        return web_dir.name


def _tolerances(web_dir: Path) -> dict:
    """{format: "fp32 <format>"}: which tolerance each cell of the web bundle is judged by."""
    try:
        doc = json.loads((web_dir / "parity.json").read_text())
    except (OSError, ValueError):
        return {}
    return {"tfjs_web": doc.get("tolerance_for"),
            **{k: v.get("tolerance_for") for k, v in (doc.get("runtimes") or {}).items()}}


def verify_in_browser(web_dir, backends: Iterable[str] = BACKENDS, screenshot_dir=None, timeout_s: float = 60,
                      chromium: str = CHROMIUM) -> list[dict]:
    """Open the web bundle once per target in headless Chromium; one result dict per target.
    A target is a TF.js backend ("cpu", "wasm", "webgl": index.html) or "<format>:<backend>" for the other
    runtimes ("onnx_web:wasm", "onnx_web:webgpu", "litert_web:wasm", "litert_web:webgpu": runtime.html);
    web_targets(web_dir) lists those the bundle holds.
    Every result: format (tfjs_web, onnx_web, litert_web), backend, runtime (chromium-<backend> for TF.js,
    onnxruntime-web-<backend>, litertjs-<backend>), passed, max_abs, max_rel, rows, screenshot, error,
    console_errors (also any request that left the bundle's server), seconds, tolerance_for, and the page's
    own parityResult as `page`; TF.js results also tf_backend (the kind the backend that ran the model says it
    is) and backend_facts, the others runtime_facts. A backend other than the one asked for (a silent
    fallback) is a failure. webgpu targets run in a second browser with the GPU process on (WEBGPU_ARGS)."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    web_dir = Path(web_dir).resolve()
    if not (web_dir / "index.html").is_file():
        raise FileNotFoundError(f"{web_dir}: expected a web bundle with index.html (write_web_bundle)")
    shots = Path(screenshot_dir) if screenshot_dir is not None else None
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
    model = _model_name(web_dir)
    tolerances = _tolerances(web_dir)
    results: list[dict] = []
    browsers: dict[bool, Any] = {}
    # playwright's launch gives the browser a fresh temporary profile (user data dir) and removes it after
    with StaticServer(web_dir) as server, sync_playwright() as pw:
        try:
            for target in backends:
                gpu = target.endswith(":webgpu")
                if gpu not in browsers:
                    browsers[gpu] = pw.chromium.launch(executable_path=chromium, headless=True,
                                                       args=list(WEBGPU_ARGS if gpu else CHROMIUM_ARGS),
                                                       timeout=timeout_s * 1000)
                results.append(_run_one(browsers[gpu], server.url, target, model, shots, timeout_s, PlaywrightError,
                                        tolerances))
        finally:
            for b in browsers.values():
                b.close()
    return results


def _query(backend: str) -> str:
    params = {"backend": backend}
    if os.environ.get(FAULT_ENV):  # fault injection, tests only (see page.js)
        params["fault"] = os.environ[FAULT_ENV]
    return urllib.parse.urlencode(params)


def _runtime_mismatch(fmt: str, backend: str, facts: dict | None) -> str | None:
    """The page's own facts checked again: the execution provider / accelerator that ran is the one asked for."""
    if not facts:
        return None
    ran = facts.get("execution_provider") if fmt == "onnx_web" else facts.get("accelerator")
    if ran != backend:
        return f"asked {fmt} for the {backend} backend, but it ran on {ran!r}"
    if fmt == "litert_web" and backend != "wasm" and not facts.get("fully_accelerated"):
        return f"asked litert_web for {backend}, but part of the model fell back to wasm"
    return None


def _run_one(browser, url: str, target: str, model: str, shots: Path | None, timeout_s: float, pw_error,
             tolerances: dict | None = None) -> dict:
    t0 = time.perf_counter()
    console: list[str] = []
    log: list[str] = []
    fmt, _, backend = target.rpartition(":")
    fmt = fmt or "tfjs_web"
    tfjs = fmt == "tfjs_web"
    res: dict[str, Any] = {"format": fmt, "backend": backend,
                           "runtime": f"chromium-{backend}" if tfjs else None, "passed": False,
                           "max_abs": None, "max_rel": None,
                           "rows": 0, "screenshot": None, "error": None, "console_errors": console, "page": None,
                           "tolerance_for": (tolerances or {}).get(fmt)}
    if tfjs:
        res.update({"tf_backend": None, "backend_facts": None})
    else:
        spec = WEB_RUNTIMES.get(fmt)
        res.update({"runtime": spec[2].format(backend) if spec else f"{fmt}-{backend}", "runtime_facts": None,
                    "runtime_log": log})
    context = browser.new_context(viewport={"width": 760, "height": 560 if not tfjs else 520})
    try:
        page = context.new_page()
        def on_console(m):
            if m.type != "error":
                return
            # LiteRT.js' native code writes its log (INFO/WARNING lines) to stderr, which the page shows as
            # console errors: kept apart, as the runtime's log
            (log if _NATIVE_LOG.match(m.text) else console).append(m.text)
        page.on("console", on_console)
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: console.append(f"request failed: {r.url} ({r.failure})"))
        page.on("request", lambda r: None if r.url.startswith((url, "data:", "blob:"))
                else console.append(f"request outside the bundle: {r.url}"))
        where = (f"{url}index.html?{_query(backend)}" if tfjs else
                 f"{url}runtime.html?{urllib.parse.urlencode({'format': fmt, 'backend': backend})}")
        try:
            page.goto(where, timeout=timeout_s * 1000)
            page.wait_for_function("() => window.parityResult !== undefined", timeout=timeout_s * 1000)
            got = page.evaluate("() => window.parityResult")
        except pw_error as e:
            got = None
            res["error"] = f"the page gave no parityResult within {timeout_s:g} s: {str(e).splitlines()[0]}"
        if got is not None:
            res["page"] = got
            keys = ("tf_backend", "backend_facts") if tfjs else ("runtime_facts",)
            res.update({k: got.get(k) for k in (*keys, "max_abs", "max_rel", "rows", "error", "gl_renderer")})
            res["rows"] = int(got.get("rows") or 0)
            if not tfjs and got.get("runtime"):
                res["runtime"] = got["runtime"]
            # the page's verdict counts only if what ran the model says it is the one asked for
            why = (backend_mismatch(backend, got.get("backend_facts")) if tfjs
                   else _runtime_mismatch(fmt, backend, got.get("runtime_facts")))
            res["passed"] = bool(got.get("passed")) and why is None and not got.get("error")
            if why and not res["error"]:
                res["error"] = why
        if shots is not None:
            path = shots / (f"{model}-{backend}.png" if tfjs else f"{model}-{fmt}-{backend}.png")
            try:
                page.screenshot(path=str(path), full_page=True, timeout=timeout_s * 1000)
                res["screenshot"] = str(path)
            except pw_error as e:
                console.append(f"screenshot failed: {str(e).splitlines()[0]}")
    finally:
        context.close()
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res
