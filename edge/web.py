"""The TF.js web bundle: a model's TF.js graph model as a static web page that proves parity in a browser.

    write_web_bundle(bundle, out_dir) -> Path
        out_dir/model/        the bundle's TF.js graph model (model.json + weight shards), copied
        out_dir/tf.min.js, tf-backend-wasm.min.js, tfjs-backend-wasm*.wasm
                              TF.js' browser builds, copied from exporters/js/node_modules (nothing downloaded)
        out_dir/parity.json   the stored parity inputs (name, dtype, shape, values), the reference outputs and
                              the fp32 tfjs tolerance (parity.compare.tolerance_for), the feed cuts, the layout
        out_dir/index.html    loads the model with tf.loadGraphModel on ?backend=cpu|wasm|webgl, runs the parity
        out_dir/page.js       inputs, compares in the page, shows a result table and sets window.parityResult

    verify_in_browser(web_dir, backends=("cpu", "wasm", "webgl"), screenshot_dir=None) -> list[dict]
        serves web_dir on 127.0.0.1 (a thread), opens the page once per backend in headless Chromium
        (playwright driving /usr/bin/chromium), waits for window.parityResult, refuses a silent backend
        fallback (judged by what the backend object that ran the model says it is, page.js's backendFacts,
        checked again here with exporters.tfjs.backend_mismatch), takes a PNG screenshot per backend when
        asked; one result dict per backend. $T2E_TFJS_FAULT (tests only) is passed to the page as ?fault=.

The page judges like parity/compare.py's element check: a value is out of tolerance when its absolute error
exceeds atol AND its relative error |got - ref| / max(|ref|, rel_floor) exceeds rtol; a non-finite value fails.
It feeds like exporters/tfjs.py's Node runner: one input goes to the graph's only input (transposed by
details["input_transpose"] when set), several by name; one output is the graph's first, several are fetched by
the graph node names that details["outputs"] records for their signature keys, matched to the model's outputs
(parity.signature.map_tensors) and concatenated row-wise in the model's order (parity.feeds.flat_rows).

Nothing here imports the pipeline or MLflow; playwright is imported only by verify_in_browser.
"""
from __future__ import annotations

import functools
import http.server
import json
import os
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
from parity.signature import Signature, TensorSpec, map_tensors

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
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--enable-unsafe-swiftshader")
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
    art = artifact or _pick_tfjs(bundle)
    d = art.details or {}
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
    if art.batch_sizes:  # a graph with a fixed batch takes only that batch
        feeds = [(a, min(a + art.batch_sizes[0], rows)) for a in range(0, rows, art.batch_sizes[0])]
    else:
        feeds = feed_cuts(rows, max_batch)
    return {
        "kind": "tfjs-web-parity", "model": bundle.model, "framework": bundle.manifest.get("framework"),
        "task": bundle.manifest.get("task"), "format": art.format, "variant": art.variant,
        "model_url": "model/model.json", "wasm_dir": "./",
        "rows": rows, "feeds": [list(c) for c in feeds], "max_batch": max_batch,
        "inputs": inputs, "input_transpose": d.get("input_transpose"), "outputs": outputs,
        "reference": {"shape": list(y.shape), "dtype": "float32", "values": _values(y)},
        "tolerance": tol.to_json(), "tolerance_for": "fp32 tfjs", "tolerance_text": tol.describe(),
    }


def write_web_bundle(bundle: Bundle, out_dir) -> Path:
    """Write the web bundle of `bundle`'s TF.js artifact into `out_dir` (replaced if it exists). Returns it."""
    art = _pick_tfjs(bundle)
    src = Path(art.path)
    if not src.is_dir():
        raise WebBundleError(f"{bundle.root}: the tfjs artifact {art.label} should be a folder at {src}, "
                             f"found {'a file' if src.exists() else 'nothing'}")
    missing = [s for s, _ in SCRIPTS if not (NODE_MODULES / s).is_file()]
    missing += [f"{WASM_SRC}/{w}" for w in WASM_FILES if not (NODE_MODULES / WASM_SRC / w).is_file()]
    if missing:
        raise WebBundleError(f"TF.js browser builds missing from {NODE_MODULES}: {', '.join(missing)}; "
                             f"run: npm ci --prefix exporters/js")
    doc = parity_document(bundle, art)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(src, out / "model")
    for s, name in SCRIPTS:
        shutil.copy2(NODE_MODULES / s, out / name)
    for w in WASM_FILES:
        shutil.copy2(NODE_MODULES / WASM_SRC / w, out / w)
    for name in ("index.html", "page.js"):
        shutil.copy2(PAGE_DIR / name, out / name)
    (out / "parity.json").write_text(json.dumps(doc, separators=(",", ":"), allow_nan=False))
    return out


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


def verify_in_browser(web_dir, backends: Iterable[str] = BACKENDS, screenshot_dir=None, timeout_s: float = 60,
                      chromium: str = CHROMIUM) -> list[dict]:
    """Open the web bundle once per backend in headless Chromium; one result dict per backend:
    backend, tf_backend (the kind the backend that ran the model says it is), backend_facts, passed, max_abs,
    max_rel, rows, screenshot, error, console_errors, seconds (and the page's own parityResult as `page`).
    A backend other than the one asked for (a silent fallback) is a failure."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    web_dir = Path(web_dir).resolve()
    if not (web_dir / "index.html").is_file():
        raise FileNotFoundError(f"{web_dir}: expected a web bundle with index.html (write_web_bundle)")
    shots = Path(screenshot_dir) if screenshot_dir is not None else None
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
    model = _model_name(web_dir)
    results: list[dict] = []
    # playwright's launch gives the browser a fresh temporary profile (user data dir) and removes it after
    with StaticServer(web_dir) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=list(CHROMIUM_ARGS),
                                     timeout=timeout_s * 1000)
        try:
            for backend in backends:
                results.append(_run_one(browser, server.url, backend, model, shots, timeout_s, PlaywrightError))
        finally:
            browser.close()
    return results


def _query(backend: str) -> str:
    params = {"backend": backend}
    if os.environ.get(FAULT_ENV):  # fault injection, tests only (see page.js)
        params["fault"] = os.environ[FAULT_ENV]
    return urllib.parse.urlencode(params)


def _run_one(browser, url: str, backend: str, model: str, shots: Path | None, timeout_s: float, pw_error) -> dict:
    t0 = time.perf_counter()
    console: list[str] = []
    res: dict[str, Any] = {"backend": backend, "tf_backend": None, "backend_facts": None, "passed": False,
                           "max_abs": None, "max_rel": None,
                           "rows": 0, "screenshot": None, "error": None, "console_errors": console, "page": None}
    context = browser.new_context(viewport={"width": 760, "height": 520})
    try:
        page = context.new_page()
        page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
        page.on("requestfailed", lambda r: console.append(f"request failed: {r.url} ({r.failure})"))
        try:
            page.goto(f"{url}index.html?{_query(backend)}", timeout=timeout_s * 1000)
            page.wait_for_function("() => window.parityResult !== undefined", timeout=timeout_s * 1000)
            got = page.evaluate("() => window.parityResult")
        except pw_error as e:
            got = None
            res["error"] = f"the page gave no parityResult within {timeout_s:g} s: {str(e).splitlines()[0]}"
        if got is not None:
            res["page"] = got
            res.update({k: got.get(k) for k in ("tf_backend", "backend_facts", "max_abs", "max_rel", "rows",
                                                   "error", "gl_renderer")})
            res["rows"] = int(got.get("rows") or 0)
            # the page's verdict counts only if the backend that ran the model says it is the one asked for
            why = backend_mismatch(backend, got.get("backend_facts"))
            res["passed"] = bool(got.get("passed")) and why is None and not got.get("error")
            if why and not res["error"]:
                res["error"] = why
        if shots is not None:
            path = shots / f"{model}-{backend}.png"
            try:
                page.screenshot(path=str(path), full_page=True, timeout=timeout_s * 1000)
                res["screenshot"] = str(path)
            except pw_error as e:
                console.append(f"screenshot failed: {str(e).splitlines()[0]}")
    finally:
        context.close()
    res["seconds"] = round(time.perf_counter() - t0, 3)
    return res
