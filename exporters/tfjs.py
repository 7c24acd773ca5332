"""TF.js graph model: converted from the SavedModel artifact, run in Node on the pure-JS cpu and wasm backends.

Export: `tensorflowjs.converters.convert_tf_saved_model` on the upstream SavedModel (the layers format made
from a Keras 3 model does not load in TF.js: "An InputLayer should be passed either a batchInputShape or
an inputShape"; the graph model does). jax models: the converter refuses jax2tf's SavedModel ("Unsupported
Ops in the model before optimization: XlaCallModule, PreventGradient"), so their ONNX artifact goes through
onnx2tf to a SavedModel of plain TF ops, which is converted and then dropped.

Run: one warm Node process (exporters/js/runner.js, pure-JS `@tensorflow/tfjs` + `@tensorflow/tfjs-backend-wasm`;
`@tensorflow/tfjs-node` cannot be installed offline) serves every TF.js runner of this Python process, every
model and both backends. It is started on first use, shared through a module-level pool, restarted if it dies
and closed at exit. Requests and responses are newline-delimited JSON; tensors travel as base64 of
little-endian float32 bytes. Every wait on the pipe has a timeout, so a hung Node never hangs Python.

Install the Node side once with `npm ci --prefix exporters/js`.
"""
from __future__ import annotations

import atexit
import base64
import collections
import itertools
import json
import os
import re
import shutil
import select
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

from exporters.base import (Artifact, ArtifactLoadError, BaseRunner, ExportError, OpNotImplemented, RuntimeUnavailable,
                            family_of, graph_order, pick_runtime, size_of)
from parity.signature import Signature, TensorSpec

from .tfjs_graph import rank1_fused_biases, sorted_node_attributes, unfused_hard_swish, widened_scalar_biases

FORMAT = "tfjs"
# jax: jax2tf's SavedModel is one XlaCallModule op, which the converter refuses; the ONNX file (jax2onnx)
# goes through onnx2tf to a SavedModel of plain TF ops instead (see _plain_saved_model)
REQUIRES = {"tensorflow": ("saved_model",), "torch": ("saved_model",), "jax": ("onnx",), "keras-jax": ("onnx",),
            "keras-torch": ("saved_model",)}
# Keras on JAX, when onnx2tf refuses its ONNX file: the same model and weights on this lane's TensorFlow backend
LATER_ROUTES_TAKE_MODEL = ("keras-jax",)
# the installed distributions whose versions decide the artifact (per family); the runtime's versions
# are the npm packages' lock file, among RUNTIME_FILES
CONVERTER_PACKAGES = {"tensorflow": ("tensorflowjs", "tensorflow"), "torch": ("tensorflowjs", "tensorflow"),
                      "jax": ("tensorflowjs", "onnx2tf", "tensorflow"),
                      "keras-jax": ("tensorflowjs", "onnx2tf", "tensorflow"), "keras-torch": ("tensorflowjs", "tensorflow")}
RUNTIME_PACKAGES = ()
RUNTIMES = ("tfjs-node-cpu", "tfjs-node-wasm")
LANE = {"tensorflow": "tensorflow", "torch": "tensorflow", "jax": "tensorflow",  # tensorflowjs needs TensorFlow
        "keras-jax": "tensorflow", "keras-torch": "tensorflow"}
RUNTIME_LANE = "any"  # the process that loads the artifact ("any": no framework)
MARKER = "model.json"  # a folder holding it is a TF.js graph model
RUNTIME_FILES = ("exporters/js/runner.js", "exporters/js/package-lock.json")  # what it runs, and the npm versions

JS_DIR = Path(__file__).resolve().parent / "js"
RUNNER_JS = JS_DIR / "runner.js"
NODE_MODULES = JS_DIR / "node_modules"
INSTALL_HINT = "npm ci --prefix exporters/js"

# Seconds to wait on the Node pipe; override with T2E_TFJS_TIMEOUT_S (start/load) and T2E_TFJS_PREDICT_TIMEOUT_S.
START_TIMEOUT_S = float(os.environ.get("T2E_TFJS_TIMEOUT_S", "60"))
LOAD_TIMEOUT_S = START_TIMEOUT_S
PREDICT_TIMEOUT_S = float(os.environ.get("T2E_TFJS_PREDICT_TIMEOUT_S", "60"))

_BACKENDS = {"tfjs-node-cpu": "cpu", "tfjs-node-wasm": "wasm"}
# fault injection for tests (runner.js and edge/web/page.js): "wasm-served-by-cpu" puts TF.js' CPU backend
# under the name 'wasm', the silent fallback that backend_mismatch must catch; never set in a real run
FAULT_ENV = "T2E_TFJS_FAULT"
_OPTIONS = {"signature_def", "weight_shard_size_bytes"}
# details of the SavedModel artifact that say how its inputs/outputs are laid out (e.g. "input_transpose":
# the axes permutation its runner applies to an as-trained batch) are carried over as they are
_LAYOUT_WORDS = ("transpose", "layout", "perm")


# how TF.js' backends say they lack a kernel ("Activation tanh has not been implemented for the CPU
# backend", "tanh activation not yet supported for FusedConv2D in the wasm backend", "Kernel 'X' not registered")
_MISSING_KERNEL = re.compile(r"has not been implemented|not yet supported|not registered|is not implemented", re.I)


class TfjsRunError(RuntimeError):
    """A loaded TF.js model failed to run (wrong input shape, Node died or hung mid-call)."""


def backend_mismatch(asked: str, facts, did: str = "ran the model") -> str | None:
    """Why `facts` (what the backend object says it is: runner.js's and page.js's backendFacts, read after
    the model ran on it) do not show the `asked` backend; None when they do. `did`: what that backend did,
    for the message. The name TF.js registered a backend under proves nothing alone: a CPU backend can sit
    under the name 'wasm'."""
    if not isinstance(facts, dict):
        return f"asked for the {asked} backend, but no facts came back of the backend that {did}"
    kind, cls, registered = facts.get("kind"), facts.get("class"), facts.get("registered")
    if kind != asked:
        return (f"asked for the {asked} backend, but TF.js {did} on {kind!r} (backend class {cls}, registered as "
                f"{registered!r})")
    if asked == "wasm" and not (isinstance(facts.get("threads"), int) and facts["threads"] >= 1):
        return (f"asked for the wasm backend, but the backend that {did} shows no wasm module "
                f"(threads {facts.get('threads')!r})")
    if registered != asked:
        return f"asked for the {asked} backend, but the {kind} backend that {did} is registered as {registered!r}"
    return None


# --------------------------------------------------------------------------------------------------- export

def _import_converter():
    """tensorflowjs.converters, imported with a placeholder for tensorflow_decision_forests.

    tensorflowjs imports tensorflow_decision_forests at import time only "to load saved models that use TFDF";
    no TFDF release loads under TensorFlow 2.21 (each pins an older TensorFlow). The placeholder lives in sys.modules only
    for the duration of the import.
    """
    if "tensorflowjs.converters.tf_saved_model_conversion_v2" in sys.modules:
        import tensorflowjs
        from tensorflowjs import converters
        return tensorflowjs, converters
    name = "tensorflow_decision_forests"
    placeholder = None
    if name not in sys.modules:
        placeholder = types.ModuleType(name)
        placeholder.__doc__ = "placeholder inserted by exporters.tfjs for the tensorflowjs import only"
        sys.modules[name] = placeholder
    try:
        import tensorflowjs
        from tensorflowjs import converters
        from tensorflowjs.converters import tf_saved_model_conversion_v2  # noqa: F401  (the module that needs it)
    except ImportError as e:
        raise ExportError(f"tfjs: cannot import the tensorflowjs converter ({type(e).__name__}: {e}); "
                          f"install it with pip install --no-deps tensorflowjs==4.22.0 (and jax)") from e
    finally:
        if placeholder is not None and sys.modules.get(name) is placeholder:
            del sys.modules[name]
    return tensorflowjs, converters


def _pick_saved_model(upstream: dict, name: str) -> Artifact:
    arts = list((upstream or {}).get("saved_model") or [])
    if not arts:
        raise ExportError(f"tfjs artifact {name}: expected an upstream saved_model artifact to convert, "
                          f"found upstream formats {sorted((upstream or {}).keys())}")
    fp32 = [a for a in arts if a.variant == "fp32"]
    return (fp32 or arts)[0]


_TF_DTYPES = {"DT_FLOAT": "float32", "DT_INT32": "int32", "DT_INT64": "int64", "DT_BOOL": "bool", "DT_HALF": "float16"}


def _tensor_specs(sig: dict) -> list[dict]:
    out = []
    for key, t in sig.items():
        dims = [int(d.get("size", -1)) for d in t.get("tensorShape", {}).get("dim", [])]
        out.append({"key": key, "name": t.get("name", key).split(":")[0], "shape": dims,
                    "dtype": _TF_DTYPES.get(t.get("dtype", ""), t.get("dtype", ""))})
    return out


def _plain_saved_model(name: str, framework: str, upstream: dict, out_dir: Path, example, expected) -> Artifact:
    """A SavedModel of plain TF ops for a jax model, in a work folder the caller removes: the upstream ONNX
    file through onnx2tf (on a copy: it rewrites its input), the input's shape kept as it is (JAX models
    are channels-last already), checked against the model's outputs on the example rows."""
    import contextlib
    import io
    onnx_arts = [a for a in (upstream or {}).get("onnx") or [] if a.variant == "fp32"]
    if not onnx_arts or not Path(onnx_arts[0].path).is_file():
        raise ExportError(f"tfjs artifact {name} (jax): the route converts the ONNX artifact, expected the fp32 "
                          f"onnx file in upstream['onnx'], found {[a.label for a in onnx_arts] or 'none'}")
    onnx_art = onnx_arts[0]
    import onnx2tf
    import tensorflow as tf
    work = out_dir / ".tfjs-saved_model"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    onnx_copy = work / "model.onnx"
    shutil.copyfile(onnx_art.path, onnx_copy)
    staged = work / "saved_model"
    input_name = (onnx_art.details or {}).get("input_name", "x")
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            onnx2tf.convert(input_onnx_file_path=str(onnx_copy), output_folder_path=str(staged),
                            not_use_onnxsim=True, output_signaturedefs=True,
                            keep_shape_absolutely_input_names=[input_name], verbosity="error")
    except (Exception, SystemExit) as e:  # onnx2tf calls sys.exit(1) on some failures
        shutil.rmtree(work, ignore_errors=True)
        raise ExportError(f"tfjs artifact {name} (jax): onnx2tf {onnx2tf.__version__} failed on the ONNX artifact "
                          f"(the TF.js converter refuses jax2tf's XlaCallModule graph, so this route goes through "
                          f"ONNX): {type(e).__name__}: {e}\n{log.getvalue()[-2000:]}") from e
    for p in staged.glob("*.tflite"):
        p.unlink()
    check: float | None = None
    if expected is not None and not isinstance(example, dict):
        fn = tf.saved_model.load(str(staged)).signatures["serving_default"]
        feed_name = next(iter(fn.structured_input_signature[1]))
        got = fn(**{feed_name: tf.constant(np.asarray(example, np.float32))})
        got = np.asarray(got[graph_order(got)[0]])
        ref = np.asarray(expected)
        check = float(np.max(np.abs(got.reshape(ref.shape) - ref))) if got.size == ref.size else float("inf")
        tol = 1e-3 + 1e-3 * float(np.max(np.abs(ref))) if ref.size else 1e-3
        if not check <= tol:
            shutil.rmtree(work, ignore_errors=True)
            raise ExportError(f"tfjs artifact {name} (jax): the onnx2tf SavedModel made from {onnx_art.label} does not "
                              f"reproduce the model (max abs {check:.3g} on the example rows, tolerance {tol:.2g})")
    route = f"{framework} -> onnx ({onnx_art.route}) -> onnx2tf {onnx2tf.__version__} (plain-TF SavedModel, not kept)"
    return Artifact(model=name, format="saved_model", variant="fp32", path=str(staged), framework=framework,
                    route=route, batch_sizes=onnx_art.batch_sizes, input_layout="as-trained",
                    details={"made_for_tfjs": True, "onnx_source": onnx_art.label,
                             "onnx2tf_check_max_abs": check,
                             "why": "the TF.js converter refuses jax2tf's SavedModel (Unsupported Ops: XlaCallModule)"})


def _js_package_versions() -> dict:
    """TF.js' own npm packages and their versions (the folder also holds the browser's other runtimes)."""
    try:
        deps = json.loads((JS_DIR / "package.json").read_text())["dependencies"]
    except (OSError, ValueError, KeyError):
        return {}
    return {k: v for k, v in deps.items() if k.startswith("@tensorflow/")}


def export(model, *, framework: str, name: str, example: np.ndarray, out_dir, upstream: dict,
           options: dict | None = None, expected=None, family: str | None = None) -> list[Artifact]:
    """Convert the upstream SavedModel into a TF.js graph model folder (model.json + weight shards)."""
    options = dict(options or {})
    load_model = options.pop("load_model", None)  # for the later route; the stage passes the trained folder too
    options.pop("trained_dir", None)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ExportError(f"tfjs artifact {name}: unknown option(s) {sorted(unknown)}; expected some of {sorted(_OPTIONS)}")
    out_dir = Path(out_dir)
    family = family_of(framework, family)
    t0 = time.perf_counter()
    from_onnx = REQUIRES.get(family) == ("onnx",)  # JAX: jax2tf's SavedModel is one op TF.js lacks
    left = []
    if from_onnx:
        try:
            sm = _plain_saved_model(name, framework, upstream, out_dir, example, expected)
        except ExportError as first:
            if family != "keras-jax" or load_model is None:
                raise
            sm = _keras_on_tensorflow(load_model, name, framework, out_dir)
            left = [{"route": f"{framework} -> onnx -> onnx2tf (plain-TF SavedModel)",
                     "why": str(first).split(": ", 2)[-1][:600]}]
    else:
        sm = _pick_saved_model(upstream, name)
    before = time.perf_counter() - t0 if from_onnx else 0.0  # onnx2tf's share of the export
    try:
        made = _convert(sm, name, framework, out_dir, options)
        for a in made:
            a.export_s += before
            if left:
                a.route += " (the first route failed)"
                a.details["routes_left"] = left
        return made
    finally:
        if from_onnx:
            shutil.rmtree(Path(sm.path).parent, ignore_errors=True)


def _keras_on_tensorflow(load_model, name: str, framework: str, out_dir: Path) -> Artifact:
    """The Keras model's SavedModel made by Keras itself on this lane's TensorFlow backend, from the same
    model and weights, in a work folder the caller removes."""
    from .saved_model import KERAS_ON_TENSORFLOW, keras_on_tensorflow as export_on_tensorflow
    work = out_dir / ".tfjs-saved_model"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    staged = work / "saved_model"
    export_on_tensorflow(load_model, staged, f"{name} (for tfjs)")
    return Artifact(model=name, format="saved_model", variant="fp32", path=str(staged), framework=framework,
                    route=f"{framework}: {KERAS_ON_TENSORFLOW} (not kept)", batch_sizes=None,
                    input_layout="as-trained", details={"made_for_tfjs": True})


def _convert(sm: Artifact, name: str, framework: str, out_dir: Path, options: dict) -> list[Artifact]:
    sm_path = Path(sm.path)
    made_here = bool((sm.details or {}).get("made_for_tfjs"))  # the jax route's onnx2tf SavedModel
    if not (sm_path / "saved_model.pb").is_file():
        raise ExportError(f"tfjs artifact {name}: expected a SavedModel folder with saved_model.pb at {sm_path}, "
                          f"found {'a folder without it' if sm_path.is_dir() else 'nothing'}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / "tfjs"
    tmp = out_dir / ".tfjs.tmp"
    signature_def = options.get("signature_def", "serving_default")
    kwargs = {}
    if "weight_shard_size_bytes" in options:
        kwargs["weight_shard_size_bytes"] = int(options["weight_shard_size_bytes"])

    t0 = time.perf_counter()
    tensorflowjs, converters = _import_converter()
    route = f"tensorflowjs {tensorflowjs.__version__} convert_tf_saved_model(signature_def={signature_def!r})"
    if made_here:
        route = f"{sm.route} -> {route}"
    shutil.rmtree(tmp, ignore_errors=True)
    route_left = None
    try:
        converters.convert_tf_saved_model(str(sm_path), str(tmp), signature_def=signature_def, **kwargs)
    except Exception as e:  # the converter raises ValueError, KeyError, tf errors...
        shutil.rmtree(tmp, ignore_errors=True)
        first = f"{type(e).__name__}: {e}"
        if not _ONEDNN_OP.search(str(e)):
            raise ExportError(f"tfjs artifact {name} ({framework}): {route} failed on {sm_path}: {first}") from e
        # oneDNN's graph rewrites (on by default on x86) fused ops TF.js does not have; they are decided
        # when TensorFlow starts, so a process of its own converts with them off
        try:
            _convert_without_onednn(sm_path, tmp, signature_def, kwargs)
        except ExportError as second:
            raise ExportError(f"tfjs artifact {name} ({framework}): every route failed. 1) {route} on {sm_path}: "
                              f"{first}\n2) the same in a process with TF_ENABLE_ONEDNN_OPTS=0: {second}") from e
        route_left = {"route": route, "why": first[:600]}
        route = f"{route} in a process with TF_ENABLE_ONEDNN_OPTS=0 (the first route met oneDNN's fused ops)"
    try:
        model_json = json.loads((tmp / "model.json").read_text())
    except (OSError, ValueError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"tfjs artifact {name}: the converter wrote no readable model.json in {tmp}: {e}") from e
    if model_json.get("format") != "graph-model":
        raise ExportError(f"tfjs artifact {name}: expected a graph-model, the converter wrote {model_json.get('format')!r}")
    squeezed = rank1_fused_biases(tmp / "model.json", model_json)
    widened = widened_scalar_biases(tmp, model_json)
    unfused = unfused_hard_swish(tmp, model_json)
    sorted_node_attributes(tmp / "model.json", model_json)  # the repairs above changed it in place
    sig = model_json.get("signature") or {}
    inputs, outputs = _tensor_specs(sig.get("inputs", {})), _tensor_specs(sig.get("outputs", {}))
    if not inputs or not outputs:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"tfjs artifact {name}: expected a signature with inputs and outputs, found inputs "
                          f"{[i['key'] for i in inputs]} and outputs {[o['key'] for o in outputs]}")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    export_s = time.perf_counter() - t0

    # Layout: TF.js runs the SavedModel's graph, so it takes what the SavedModel takes. Carry its layout over.
    layout = {k: v for k, v in (sm.details or {}).items() if any(w in k.lower() for w in _LAYOUT_WORDS)}
    batch0 = inputs[0]["shape"][0] if inputs[0]["shape"] else -1
    batch_sizes = None if batch0 in (-1, None) else [int(batch0)]
    if sm.batch_sizes is not None and batch_sizes is None:
        batch_sizes = list(sm.batch_sizes)
    import tensorflow as tf  # already imported by the converter
    details: dict[str, Any] = {
        "inputs": {i["key"]: i for i in inputs} if len(inputs) > 1 else {"as-trained input": inputs[0]},
        # several outputs: the graph's node names, told by their signature keys (output_0, ...) at run time
        "outputs": {o["key"]: o for o in outputs} if len(outputs) > 1 else {"output": outputs[0]},
        "input_name": inputs[0]["name"],
        "output_name": outputs[0]["name"],
        "signature_def": signature_def,
        "converter": f"tensorflowjs {tensorflowjs.__version__}",
        "converted_by": model_json.get("convertedBy"),
        "generated_by": f"tensorflow {model_json.get('generatedBy')}",
        "tensorflow": tf.__version__,
        "runtime_packages": _js_package_versions(),
        "weight_files": sorted(p.name for p in dest.iterdir() if p.name != "model.json"),
        "upstream": {"format": sm.format, "variant": sm.variant, "route": sm.route, "input_layout": sm.input_layout},
        **({"intermediate_saved_model": {k: v for k, v in sm.details.items() if k != "made_for_tfjs"}}
           if made_here else {}),
        "route_taken": "tensorflowjs without oneDNN" if route_left else "tensorflowjs",
        **({"routes_left": [route_left]} if route_left else {}),
        **({"biases_made_rank_1": squeezed} if squeezed else {}),
        **({"scalar_biases_widened": widened} if widened else {}),
        **({"hard_swish_unfused": unfused} if unfused else {}),
        **layout,
    }
    repairs = [f"{len(done)} {what}" for done, what in ((squeezed, "fused biases of shape [1, ..., n] told as [n]"),
                                                        (widened, "scalar fused biases widened to rank 1"),
                                                        (unfused, "convolutions with hard-swish fused in split"))
               if done]
    if repairs:  # shown beside the verdicts: the graph TF.js runs is not quite the converter's
        details["note"] = "; ".join(filter(None, [details.get("note"), "graph repaired for TF.js: " + ", ".join(repairs)]))
    return [Artifact(model=name, format=FORMAT, variant="fp32", path=str(dest), framework=framework, route=route,
                     batch_sizes=batch_sizes, input_layout=sm.input_layout, size_bytes=size_of(dest),
                     export_s=export_s, details=details)]


_ONEDNN_OP = re.compile(r"\b_Mkl\w+|\b_Fused\w*(Swish|Gelu|Mish)\b")
_CONVERT_IN_CHILD = """
import json, sys
from exporters.tfjs import _import_converter
_, converters = _import_converter()
converters.convert_tf_saved_model(sys.argv[1], sys.argv[2], signature_def=sys.argv[3], **json.loads(sys.argv[4]))
"""


def _convert_without_onednn(sm_path: Path, dest: Path, signature_def: str, kwargs: dict) -> None:
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _CONVERT_IN_CHILD, str(sm_path), str(dest), signature_def,
                           json.dumps(kwargs)], env=env, capture_output=True, text=True)
    if done.returncode != 0 or not (dest / "model.json").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        tail = [ln for ln in (done.stderr or "").strip().splitlines() if ln.strip()][-3:]
        raise ExportError(f"exit code {done.returncode}: {' / '.join(tail) or 'no output'}")


# ----------------------------------------------------------------------------------------- the Node process

def _node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeUnavailable("tfjs: the `node` executable is not on PATH; install Node.js 18+ "
                                f"and then run: {INSTALL_HINT}")
    return node


def _check_node_modules() -> None:
    missing = [p for p in ("@tensorflow/tfjs", "@tensorflow/tfjs-backend-wasm")
               if not (NODE_MODULES / p / "package.json").is_file()]
    if missing:
        raise RuntimeUnavailable(f"tfjs: {', '.join(missing)} not installed in {NODE_MODULES}; run: {INSTALL_HINT}")


class NodeProcess:
    """One `node runner.js` child; thread-safe request/response with a timeout on every wait."""

    def __init__(self, start_timeout: float = START_TIMEOUT_S):
        node = _node_binary()
        _check_node_modules()
        self.owner_pid = os.getpid()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._buf = b""            # bytes read from stdout that do not yet make a whole line
        self._stderr: collections.deque = collections.deque(maxlen=60)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([node, str(RUNNER_JS)], cwd=str(JS_DIR), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        self.pid = self.proc.pid
        threading.Thread(target=self._read_stderr, name=f"tfjs-node-{self.pid}-err", daemon=True).start()
        try:
            self.hello = self.request({"cmd": "hello"}, timeout=start_timeout, what="start")
        except Exception:
            self.close(timeout=1.0)
            raise
        self.start_s = time.perf_counter() - t0

    # pipes
    def _next_message(self, deadline: float) -> dict | None:
        """The next JSON line from stdout, read in the calling thread; None at EOF; TimeoutError at the deadline."""
        fd = self.proc.stdout.fileno()
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line, self._buf = self._buf[:nl], self._buf[nl + 1:]
                if not line.strip():
                    continue
                try:
                    return json.loads(line)
                except ValueError:
                    self._stderr.append("[stdout, not JSON] " + line.decode("utf-8", "replace"))
                    continue
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            self._buf += chunk

    def _read_stderr(self) -> None:
        for line in iter(self.proc.stderr.readline, b""):
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    def stderr_tail(self, n: int = 8) -> str:
        lines = [ln for ln in list(self._stderr)[-n:] if ln.strip() and not set(ln) <= {"="}]
        return " | ".join(lines)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, msg: dict, timeout: float, what: str) -> dict:
        """Send one request and wait for its response; on a timeout the process is killed (its state is unknown)."""
        with self._lock:
            rid = next(self._ids)
            line = json.dumps(dict(msg, id=rid), separators=(",", ":")).encode() + b"\n"
            try:
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError) as e:
                raise self._died(what, f"writing the request failed ({e})")
            deadline = time.monotonic() + timeout
            while True:
                try:
                    res = self._next_message(deadline)
                except TimeoutError:
                    self.kill()
                    raise TimeoutError(f"tfjs node runner (pid {self.pid}) gave no answer to {what} within "
                                       f"{timeout:.0f} s; killed it. stderr: {self.stderr_tail()}") from None
                if res is None:
                    raise self._died(what, "it closed its stdout")
                if res.get("id") == rid:
                    return res
                if res.get("id") == 0 and not res.get("ok", True):  # startup failure, before any request
                    raise ArtifactLoadError(f"tfjs node runner failed to start: {res.get('error')}")
                # a late answer to a request that timed out earlier: drop it

    def _died(self, what: str, why: str) -> Exception:
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.05)  # let the stderr reader catch the last lines
        try:  # runner.js reports a failed start on stdout (id 0) before it exits
            while (msg := self._next_message(time.monotonic() + 0.2)) is not None:
                if msg.get("id") == 0 and not msg.get("ok", True):
                    return ArtifactLoadError(f"tfjs node runner failed to start: {msg.get('error')}")
        except (TimeoutError, OSError, ValueError):
            pass
        return TfjsRunError(f"tfjs node runner (pid {self.pid}) died during {what}: {why}; exit code "
                            f"{self.proc.returncode}; stderr: {self.stderr_tail()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass

    def close(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # runner.js exits when stdin ends
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


_POOL_LOCK = threading.Lock()
_PROCESS: NodeProcess | None = None
_STARTS = 0


def node_process() -> NodeProcess:
    """The shared warm Node process, started (or restarted, if it died) on demand."""
    global _PROCESS, _STARTS
    with _POOL_LOCK:
        p = _PROCESS
        if p is not None and p.alive and p.owner_pid == os.getpid():
            return p
        if p is not None and p.owner_pid == os.getpid():
            p.close(timeout=1.0)
        _PROCESS = NodeProcess()
        _STARTS += 1
        return _PROCESS


def node_process_info() -> dict:
    """pid, whether it is alive, and how many Node processes this Python process has started so far."""
    p = _PROCESS
    return {"pid": p.pid if p else None, "alive": bool(p and p.alive), "starts": _STARTS,
            "start_s": p.start_s if p else None, "tfjs": p.hello.get("tfjs") if p else None,
            "node": p.hello.get("node") if p else None}


def shutdown_node() -> None:
    """Close the shared Node process (also registered atexit)."""
    global _PROCESS
    with _POOL_LOCK:
        p, _PROCESS = _PROCESS, None
    if p is not None and p.owner_pid == os.getpid():
        p.close()


atexit.register(shutdown_node)


# ---------------------------------------------------------------------------------------------- the runner

_WIRE = {"float32": "<f4", "int32": "<i4"}  # the dtypes runner.js sends and receives


def _b64(x: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(x, dtype=_WIRE[dtype]).tobytes()).decode("ascii")


def _from_b64(d: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=_WIRE[d["dtype"]]).reshape(d["shape"])


def _js_spec(t: dict, perm=None) -> TensorSpec:
    shape = [None if d is None or d < 0 else int(d) for d in (t.get("shape") or [None])]
    if perm is not None and len(perm) == len(shape):
        shape = [shape[i] for i in np.argsort(perm)]
    dtype = t.get("dtype") or "float32"
    if dtype not in _WIRE:
        raise ArtifactLoadError(f"tfjs: tensor {t.get('name')!r} has dtype {dtype}, which the runner does not feed")
    return TensorSpec(t["name"], dtype, tuple(shape))


class TfjsRunner(BaseRunner):
    """TF.js in the shared Node process, on the backend the runtime names. What the backend that loaded
    and ran the model says of itself (its class, the wasm module's facts; `backend_facts`) is checked
    against the one asked for: a silent fallback would verify the wrong runtime. Callers feed the
    as-trained layout (details['input_transpose'])."""

    def __init__(self, artifact: Artifact, runtime: str):
        self.runtime = runtime
        self.backend = _BACKENDS[runtime]
        self.path = str(Path(artifact.path).resolve())
        d = artifact.details or {}
        self.input_transpose = d.get("input_transpose")
        self.output_transpose = d.get("output_transpose")
        self._node: NodeProcess | None = None
        self._handle: str | None = None
        self.info: dict = {}
        self.ran_on: str | None = None  # the backend that ran the last prediction, by its own facts
        self.backend_facts: dict | None = None  # those facts (kind, class, registered name, wasm threads/SIMD)
        self.artifact = artifact
        res = self._load()
        perm = self.input_transpose if len(res["inputs"]) == 1 else None
        recorded = d.get("outputs") or {}
        # several outputs go by their signature keys, in the graph's order, not by node names (Identity_1)
        self._keys = {o["name"]: k for k, o in recorded.items()} if len(recorded) > 1 else {}
        outs = [dict(t, name=self._keys.get(t["name"].split(":")[0], t["name"])) for t in res["outputs"]]
        order = graph_order([t["name"] for t in outs])
        signature = Signature(tuple(_js_spec(t, perm) for t in res["inputs"]),
                              tuple(_js_spec(t) for t in sorted(outs, key=lambda t: order.index(t["name"]))))
        super().__init__(artifact, signature)

    def _load(self) -> dict:
        try:
            node = node_process()
            res = node.request({"cmd": "load", "path": self.path, "backend": self.backend},
                               timeout=LOAD_TIMEOUT_S, what=f"load of {self.path}")
        except (TimeoutError, TfjsRunError) as e:
            raise ArtifactLoadError(f"tfjs artifact {self.artifact.label} ({self.runtime}): {e}") from e
        if not res.get("ok"):
            raise ArtifactLoadError(f"tfjs artifact {self.artifact.label} ({self.runtime}) at {self.path} did not "
                                    f"load: {res.get('error')}")
        why = backend_mismatch(self.backend, res.get("backend_facts"), did="loaded the model")
        if why:
            try:  # the weights on the wrong backend are of no use to anyone
                node.request({"cmd": "close", "handle": res["handle"]}, timeout=10.0, what="close")
            except (TimeoutError, TfjsRunError):
                pass
            raise ArtifactLoadError(f"tfjs artifact {self.artifact.label} ({self.runtime}): {why}")
        self._node, self._handle = node, res["handle"]
        self.info = {k: res.get(k) for k in ("inputs", "outputs", "load_ms", "backend", "backend_facts")}
        self.info["pid"] = node.pid
        return res

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._node is not node_process():   # the shared process died and was restarted: load again
            self._load()
        inputs = []
        for spec in self.signature.inputs:
            x = feed[spec.name]
            if self.input_transpose is not None and len(feed) == 1:
                x = np.transpose(x, self.input_transpose)
            inputs.append({"name": spec.name, "shape": list(x.shape), "dtype": spec.dtype, "b64": _b64(x, spec.dtype)})
        msg = {"cmd": "predict", "handle": self._handle, "inputs": inputs}
        try:
            res = self._node.request(msg, timeout=PREDICT_TIMEOUT_S, what=f"predict on {self.artifact.label}")
        except TimeoutError as e:
            raise TfjsRunError(f"tfjs artifact {self.artifact.label} ({self.runtime}): {e}") from e
        if not res.get("ok"):
            error = str(res.get("error"))
            kind = OpNotImplemented if _MISSING_KERNEL.search(error) else TfjsRunError
            raise kind(f"tfjs artifact {self.artifact.label} ({self.runtime}) failed on inputs of shape "
                       f"{[i['shape'] for i in inputs]}: {error}")
        self.backend_facts = res.get("backend_facts")
        self.ran_on = (self.backend_facts or {}).get("kind")
        why = backend_mismatch(self.backend, self.backend_facts)
        if why:  # a silent fallback would verify the wrong runtime
            raise TfjsRunError(f"tfjs artifact {self.artifact.label} ({self.runtime}): {why}")
        out = {}
        for o in res["outputs"]:
            y = _from_b64(o)
            if self.output_transpose is not None:
                y = np.transpose(y, self.output_transpose)
            out[self._keys.get(o["name"].split(":")[0], o["name"])] = y
        return out

    def close(self) -> None:
        super().close()
        node, handle = self._node, self._handle
        self._node = self._handle = None
        if node is not None and handle is not None and node.alive:
            try:
                node.request({"cmd": "close", "handle": handle}, timeout=10.0, what="close")
            except (TimeoutError, TfjsRunError):
                pass


def load(artifact: Artifact, runtime: str | None = None) -> TfjsRunner:
    runtime = pick_runtime(FORMAT, artifact, runtime, RUNTIMES)
    if artifact.format != FORMAT:
        raise ArtifactLoadError(f"tfjs: expected a {FORMAT} artifact, got {artifact.label} ({artifact.format})")
    return TfjsRunner(artifact, runtime)
