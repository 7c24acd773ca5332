"""The model manager behind serving/server.py: a TF Serving model repository, its versions, their signatures.

Layout (as TF Serving): `<base_path>/<version>/saved_model.pb` (+ variables/, assets/, assets.extra/); a
version is a folder whose name is an integer. Each served version is loaded once, as TF Serving loads it:
its serving MetaGraph in a Session of its own; each signature is a callable made once that feeds and fetches
the SignatureDef's tensors by name in one Session run (no Keras, no eager function call).

Version policy (ModelConfig.model_version_policy): latest{num_versions} (default 1), all, specific{versions}.
A version that fails to load is recorded as END with its error and skipped: under `latest` the newest
version that does load is served, so a corrupt drop leaves the previous version serving. A failed version
is retried only when its saved_model.pb changes (size or mtime), so a half-copied folder that is finished
later is picked up. Versions that leave the policy (or the disk) are unloaded (END, OK).

Atomic switch: the served versions of a model are one immutable snapshot object that the poller swaps
in a single assignment once the new version is loaded; a request reads the snapshot once and is served
entirely by the one version it resolved, so a switch never mixes answers and never drops a request.

Batching (enable_batching): concurrent Predict calls on the same version and signature whose inputs all
have a free leading (batch) dimension are concatenated into one call (up to max_batch_size rows, waiting
at most batch_timeout_micros for more) and split back. A single request larger than max_batch_size runs
on its own (TF Serving would split it).

Reload (ModelManager.reload: gRPC HandleReloadConfigRequest, the config-file poller): as TF Serving's
ServerCore::ReloadConfig, the new list replaces the old in one assignment once its new models are loaded;
unchanged models keep their Servables, changed ones (policy, labels) are updated in place, removed ones
are unloaded once their running requests are done and then answer NOT_FOUND. A refused config changes
nothing.

Heavy imports (tensorflow) happen inside functions.
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
DEFAULT_SIGNATURE = "serving_default"

# TF Serving's REST gateway: canonical error code -> HTTP status
HTTP_STATUS = {"OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
               "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
               "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501,
               "INTERNAL": 500, "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401}


def _tf():
    import tensorflow as tf
    return tf


class RequestError(Exception):
    """A request the server answers with an error: `code` is a canonical code name ("NOT_FOUND")."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


class ConfigError(ValueError):
    """A server configuration (flags, config file, batching file) that cannot be used."""


# ---------------------------------------------------------------------------------------------- config

@dataclass
class ModelSettings:
    """One model of the server: where its versions live, which to serve, and its labels."""
    name: str
    base_path: str
    policy: str = "latest"  # "latest" | "all" | "specific"
    num_versions: int = 1
    versions: tuple[int, ...] = ()  # for "specific"
    labels: dict[str, int] = field(default_factory=dict)


def parse_model_config_file(path: str | os.PathLike) -> list[ModelSettings]:
    """A ModelServerConfig text proto -> one ModelSettings per model (a clear ConfigError naming the file)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read --model_config_file {path}: {e}") from e
    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ConfigError(f"--model_config_file {path} is not a ModelServerConfig text proto: {e}") from e
    if config.WhichOneof("config") == "custom_model_config":
        raise ConfigError(f"--model_config_file {path}: custom_model_config is not supported (use model_config_list)")
    out = []
    base_dir = Path(path).resolve().parent
    for c in config.model_config_list.config:
        if not c.name:
            raise ConfigError(f"--model_config_file {path}: a model config has no name")
        if not c.base_path:
            raise ConfigError(f"--model_config_file {path}: model {c.name!r} has no base_path")
        if c.model_platform and c.model_platform != "tensorflow":
            raise ConfigError(f"--model_config_file {path}: model {c.name!r} has model_platform "
                              f"{c.model_platform!r}; only 'tensorflow' is served")
        s = _model_settings(c, base_dir)
        if s.policy == "specific" and not s.versions:
            raise ConfigError(f"--model_config_file {path}: model {c.name!r} has an empty specific policy")
        out.append(s)
    if not out:
        raise ConfigError(f"--model_config_file {path} names no model")
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"--model_config_file {path} names model(s) {dup} more than once")
    return out


def _model_settings(c, base_dir: Path | None) -> ModelSettings:
    """One ModelConfig proto -> ModelSettings (a relative base_path is taken from `base_dir`)."""
    base = Path(c.base_path)
    s = ModelSettings(name=c.name, base_path=str(base if base.is_absolute() or base_dir is None else base_dir / base))
    which = c.model_version_policy.WhichOneof("policy_choice")
    if which == "all":
        s.policy = "all"
    elif which == "specific":
        s.policy, s.versions = "specific", tuple(int(v) for v in c.model_version_policy.specific.versions)
    elif which == "latest":
        s.num_versions = int(c.model_version_policy.latest.num_versions) or 1
    s.labels = {str(k): int(v) for k, v in c.version_labels.items()}
    return s


def settings_from_reload_config(config) -> list[ModelSettings]:
    """ReloadConfigRequest.config -> one ModelSettings per model, refused (RequestError) with the codes and
    messages of TF Serving's HandleReloadConfigRequest / ServerCore::ReloadConfig / ValidateModelConfigList."""
    if config.WhichOneof("config") != "model_config_list":
        raise RequestError("INVALID_ARGUMENT", "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                           "Only ModelConfigList is currently supported")
    seen: set[str] = set()
    for c in config.model_config_list.config:
        if c.name in seen:
            raise RequestError("INVALID_ARGUMENT", f"Illegal to list model {c.name} multiple times in config list")
        seen.add(c.name)
    out = []
    for c in config.model_config_list.config:
        # tensorflow_model_server sets no model_config_list_root_dir: every base path must be absolute
        if "://" not in c.base_path and not os.path.isabs(c.base_path):
            raise RequestError("INVALID_ARGUMENT", f"Expected model {c.name} to have an absolute path or URI; "
                               f"got base_path()={c.base_path}")
        # an empty platform is taken as "tensorflow", as at start-up here (TF Serving would refuse it)
        if c.model_platform and c.model_platform != "tensorflow":
            raise RequestError("INVALID_ARGUMENT", f"Model {c.name} requests unsupported platform "
                               f"{c.model_platform}")
        out.append(_model_settings(c, None))
    return out


@dataclass
class BatchingParameters:
    max_batch_size: int = 32
    batch_timeout_micros: int = 1000
    num_batch_threads: int = 4
    max_enqueued_batches: int = 1000
    # the server's metrics (serving/monitoring.py) when exported: batch sizes go there
    observer: Any = field(default=None, compare=False, repr=False)


_BATCH_INT_FIELDS = {"max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches"}
_BATCH_IGNORED = {"thread_pool_name", "allowed_batch_sizes", "pad_variable_length_inputs",
                  "enable_large_batch_splitting", "max_execution_batch_size", "batch_padding_policy"}


def parse_batching_parameters(path: str | os.PathLike | None) -> BatchingParameters:
    """A BatchingParameters text proto (`max_batch_size { value: 64 }` ...). The proto is not shipped in
    tensorflow-serving-api, so the few fields used are read here; TF Serving's other fields are accepted
    and ignored; anything else is a ConfigError naming the file."""
    params = BatchingParameters()
    if path is None:
        return params
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read --batching_parameters_file {path}: {e}") from e
    text = re.sub(r"#.*", "", text)
    pos = 0
    pattern = re.compile(r"\s*(\w+)\s*(?:\{\s*value\s*:\s*([^}\s]+)\s*\}|:\s*(\S+))\s*[,;]?", re.S)
    while pos < len(text.rstrip()):
        m = pattern.match(text, pos)
        if not m:
            raise ConfigError(f"--batching_parameters_file {path} is not a BatchingParameters text proto "
                              f"(near {text[pos:pos + 40].strip()!r})")
        name, value = m.group(1), (m.group(2) or m.group(3)).strip('"')
        if name in _BATCH_INT_FIELDS:
            try:
                setattr(params, name, int(value))
            except ValueError:
                raise ConfigError(f"--batching_parameters_file {path}: {name} must be an integer, got {value!r}")
        elif name not in _BATCH_IGNORED:
            raise ConfigError(f"--batching_parameters_file {path}: unknown field {name!r}")
        pos = m.end()
    if params.max_batch_size < 1 or params.num_batch_threads < 1 or params.batch_timeout_micros < 0:
        raise ConfigError(f"--batching_parameters_file {path}: max_batch_size and num_batch_threads must be "
                          f">= 1 and batch_timeout_micros >= 0")
    return params


# ------------------------------------------------------------------------------------------ signatures

def _np_dtype_name(dtype) -> str:
    return "string" if dtype.name == "string" else dtype.name


class _Batcher:
    """Concatenates concurrent calls of one signature along axis 0 (see the module docstring)."""

    def __init__(self, run: Callable[[dict], dict], params: BatchingParameters, label: str):
        self._run = run
        self._max = params.max_batch_size
        self._timeout = params.batch_timeout_micros / 1e6
        self._pending: deque = deque()
        self._cv = threading.Condition()
        self._closed = False
        obs = params.observer
        self._on_input = obs.input_batch_size if obs is not None else None
        self._on_batch = obs.processed_batch_size if obs is not None else None
        self._threads = [threading.Thread(target=self._loop, name=f"batch-{label}-{i}", daemon=True)
                         for i in range(params.num_batch_threads)]
        for t in self._threads:
            t.start()

    def submit(self, arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        if self._on_input is not None:
            self._on_input(rows)
        if rows > self._max or rows == 0:
            if self._on_batch is not None:
                self._on_batch(rows)
            return self._run(arrays)
        item = _Item(arrays, rows, tuple((k, a.dtype.str, a.shape[1:]) for k, a in sorted(arrays.items())))
        with self._cv:
            if self._closed:
                item = None
            else:
                self._pending.append(item)
                self._cv.notify()
        if item is None:  # a request that read the snapshot just before this version was unloaded
            return self._run(arrays)
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def _take(self) -> list | None:
        with self._cv:
            while not self._pending:
                if self._closed:
                    return None
                self._cv.wait()
            key = self._pending[0].key
            deadline = time.monotonic() + self._timeout
            while True:
                rows = sum(it.rows for it in self._pending if it.key == key)
                left = deadline - time.monotonic()
                if rows >= self._max or left <= 0 or self._closed:
                    break
                self._cv.wait(left)
            batch, rows, keep = [], 0, deque()
            while self._pending:
                it = self._pending.popleft()
                if it.key == key and rows + it.rows <= self._max:
                    batch.append(it)
                    rows += it.rows
                else:
                    keep.append(it)
            self._pending = keep
            if keep:
                self._cv.notify()
            return batch

    def _loop(self):
        while True:
            batch = self._take()
            if batch is None:
                return
            if self._on_batch is not None:
                self._on_batch(sum(it.rows for it in batch))
            try:
                if len(batch) == 1:
                    batch[0].result = self._run(batch[0].arrays)
                else:
                    joined = {k: np.concatenate([it.arrays[k] for it in batch]) for k in batch[0].arrays}
                    out = self._run(joined)
                    total = sum(it.rows for it in batch)
                    bad = [k for k, v in out.items() if v.ndim == 0 or v.shape[0] != total]
                    if bad:
                        raise RequestError("INTERNAL", f"batching: outputs {bad} do not keep the batch dimension")
                    start = 0
                    for it in batch:
                        it.result = {k: v[start:start + it.rows] for k, v in out.items()}
                        start += it.rows
            except Exception as e:  # noqa: BLE001 - handed to each waiting request
                for it in batch:
                    it.error = e
            for it in batch:
                it.done.set()

    def close(self):
        with self._cv:
            self._closed = True
            self._cv.notify_all()


class _Item:
    __slots__ = ("arrays", "rows", "key", "done", "result", "error")

    def __init__(self, arrays, rows, key):
        self.arrays, self.rows, self.key = arrays, rows, key
        self.done = threading.Event()
        self.result = None
        self.error = None


class Signature:
    """One signature of a loaded version, called as TF Serving calls it: its SignatureDef's input tensors fed and
    its output tensors fetched in one Session run (a callable made once), and what it expects."""

    def __init__(self, name: str, sig_def, session):
        tf = _tf()
        self.name = name
        self.method_name = sig_def.method_name or PREDICT_METHOD
        # name -> tf.TensorSpec, from the SignatureDef (what GetModelMetadata shows too)
        self.inputs: dict[str, Any] = {k: tf.TensorSpec(tf.TensorShape(i.tensor_shape), tf.as_dtype(i.dtype), name=k)
                                       for k, i in sig_def.inputs.items()}
        self.outputs: list[str] = sorted(sig_def.outputs)
        self.input_np = {k: s.dtype.as_numpy_dtype for k, s in self.inputs.items()}
        # plain-Python shape constraints (TensorShape methods cost more than the check itself)
        self._shapes = {k: None if s.shape.rank is None else tuple(s.shape.as_list()) for k, s in self.inputs.items()}
        self.batchable = bool(self.inputs) and all(s.shape.rank is not None and s.shape.rank >= 1 and s.shape[0] is None
                                                   for s in self.inputs.values())
        self.batcher: _Batcher | None = None
        self._feed_order = sorted(self.inputs)
        self._fetch_order = list(sig_def.outputs)  # as stored: the order answers list them in, as before
        # TF Serving feeds and fetches a SignatureDef's tensors by name (predict_util.cc): a sparse or composite
        # encoding has none, and such a signature cannot be called
        self._not_dense = sorted(k for k, i in [*sig_def.inputs.items(), *sig_def.outputs.items()]
                                 if i.WhichOneof("encoding") != "name")
        self._small = self._large = None
        if not self._not_dense:
            self._small, self._large = _session_callables(
                session, [sig_def.inputs[k].name for k in self._feed_order],
                [sig_def.outputs[k].name for k in self._fetch_order])

    def _invoke(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One Session run on `arrays` (already checked against the signature): its outputs by name."""
        if self._not_dense:
            raise RequestError("INVALID_ARGUMENT", f"signature {self.name!r} has tensors that are not dense "
                               f"({', '.join(self._not_dense)}): only dense tensors can be fed and fetched")
        feeds = [arrays[k] for k in self._feed_order]
        small = sum(a.size for a in feeds) <= SMALL_CALL_ELEMENTS
        return dict(zip(self._fetch_order, (self._small if small else self._large)(*feeds)))

    def describe_input(self, name: str) -> str:
        s = self.inputs[name]
        return f"{_np_dtype_name(s.dtype)} {shape_str(s.shape)}"

    def expected(self) -> str:
        return ", ".join(f"{k}: {self.describe_input(k)}" for k in sorted(self.inputs))

    def check_names(self, names) -> None:
        got, want = set(names), set(self.inputs)
        if got != want:
            extra, missing = sorted(got - want), sorted(want - got)
            msg = (f"input size does not match signature {self.name!r}: {len(got)}!={len(want)} "
                   f"len({{{', '.join(sorted(got))}}}) != len({{{', '.join(sorted(want))}}}).")
            if extra:
                msg += f" Sent extra: {{{', '.join(extra)}}}."
            if missing:
                msg += f" Missing but required: {{{', '.join(missing)}}}."
            raise RequestError("INVALID_ARGUMENT", msg + f" Expected inputs: {self.expected()}")

    def shape_fits(self, name: str, shape: tuple) -> bool:
        """TensorShape.is_compatible_with on plain tuples: same rank, and every known dimension equal."""
        want = self._shapes[name]
        return want is None or (len(want) == len(shape) and
                                all(w is None or w == g for w, g in zip(want, shape)))

    def check_array(self, name: str, arr: np.ndarray) -> None:
        spec = self.inputs[name]
        want = self.input_np[name]
        if spec.dtype.name == "string":
            if arr.dtype.kind not in "OSU":
                raise RequestError("INVALID_ARGUMENT", f"input {name!r} has dtype {arr.dtype.name} but signature "
                                   f"{self.name!r} expects string {shape_str(spec.shape)}")
        elif arr.dtype != want:
            raise RequestError("INVALID_ARGUMENT", f"input {name!r} has dtype {arr.dtype.name} but signature "
                               f"{self.name!r} expects {self.describe_input(name)}")
        if not self.shape_fits(name, arr.shape):
            raise RequestError("INVALID_ARGUMENT", f"input {name!r} has shape {list(arr.shape)} but signature "
                               f"{self.name!r} expects {self.describe_input(name)}")

    def _call(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return self._invoke(arrays)
        except RequestError:
            raise
        except Exception as e:  # noqa: BLE001 - a model error is the caller's answer
            tf = _tf()
            code = "INVALID_ARGUMENT"
            if isinstance(e, tf.errors.OpError):  # its canonical code (tf.errors has no public int -> name map)
                from tensorflow.core.protobuf import error_codes_pb2
                code = (error_codes_pb2.Code.Name(e.error_code) if e.error_code in error_codes_pb2.Code.values()
                        else "INVALID_ARGUMENT")
            raise RequestError(code, f"{type(e).__name__}: {getattr(e, 'message', None) or e}") from None

    def run(self, arrays: dict[str, np.ndarray], *, validate: bool = True) -> dict[str, np.ndarray]:
        """Run on numpy inputs keyed by signature input name; returns numpy outputs keyed by output name."""
        if validate:
            self.check_names(arrays)
            for k, a in arrays.items():
                self.check_array(k, a)
        if self.batcher is not None:
            rows = {a.shape[0] for a in arrays.values()}
            if len(rows) == 1:
                return self.batcher.submit(arrays, rows.pop())
        return self._call(arrays)


_OPERROR_CODES = {"InvalidArgumentError": "INVALID_ARGUMENT", "NotFoundError": "NOT_FOUND",
                  "FailedPreconditionError": "FAILED_PRECONDITION", "OutOfRangeError": "OUT_OF_RANGE",
                  "ResourceExhaustedError": "RESOURCE_EXHAUSTED", "UnimplementedError": "UNIMPLEMENTED",
                  "InternalError": "INTERNAL", "UnknownError": "UNKNOWN", "DataLossError": "DATA_LOSS",
                  "AbortedError": "ABORTED", "CancelledError": "CANCELLED", "UnavailableError": "UNAVAILABLE",
                  "DeadlineExceededError": "DEADLINE_EXCEEDED", "PermissionDeniedError": "PERMISSION_DENIED",
                  "UnauthenticatedError": "UNAUTHENTICATED", "AlreadyExistsError": "ALREADY_EXISTS"}


# A call whose inputs hold at most this many elements runs on the calling thread (RunOptions
# inter_op_thread_pool = -1): the graph's ops run one after another there instead of being handed to the
# inter-op pool (each hand-off costs tens of microseconds on a busy 2-CPU machine, more than a small model's
# ops); the kernels, and so the numbers, are the same, and a big op still uses the intra-op pool. Bigger calls
# run on the inter-op pool, which can run independent ops side by side.
SMALL_CALL_ELEMENTS = 1 << 14
_INTER_OP_POOL = "serving-inter-op"  # one pool shared by every version's session, as TF Serving's


def _session_config():
    tf = _tf()
    config = tf.compat.v1.ConfigProto()
    config.session_inter_op_thread_pool.add(num_threads=0, global_name=_INTER_OP_POOL)  # 0: one per core
    return config


def load_session(path: Path, tags: list[str]):
    """The SavedModel's MetaGraph of `tags` in a Session of its own, variables restored and its init op run:
    TF Serving's LoadSavedModel (TF1 and TF2 SavedModels alike)."""
    tf = _tf()
    session = tf.compat.v1.Session(graph=tf.Graph(), config=_session_config())
    try:  # the loader without its deprecation notice (tf.compat.v1.saved_model.load wraps this one)
        from tensorflow.python.saved_model.loader_impl import SavedModelLoader
        load = SavedModelLoader(str(path)).load
    except ImportError:
        load = lambda sess, tags: tf.compat.v1.saved_model.load(sess, tags, str(path))  # noqa: E731
    with session.graph.as_default():
        load(session, tags)
    return session


def _session_callables(session, feeds: list[str], fetches: list[str]) -> tuple[Callable, Callable]:
    """(small, large): `callable(*arrays) -> [output arrays]` for one Session run feeding `feeds` and fetching
    `fetches` by tensor name; small ones on the calling thread, large ones on the inter-op pool. Made from
    CallableOptions (BaseSession._make_callable_from_options: about 8 us for a small model here, where the
    public make_callable's per-call Python costs about 80 us); the public one where that is gone."""
    from tensorflow.core.protobuf import config_pb2
    options = config_pb2.CallableOptions(feed=feeds, fetch=fetches)
    make = getattr(session, "_make_callable_from_options", None)
    if make is None:  # pragma: no cover - a TensorFlow without it
        graph = session.graph
        run = session.make_callable([graph.get_tensor_by_name(n) for n in fetches],
                                    [graph.get_tensor_by_name(n) for n in feeds], accept_options=True)
        inline = config_pb2.RunOptions(inter_op_thread_pool=-1)
        return (lambda *a: run(*a, options=inline)), run
    large = make(options)
    options.run_options.inter_op_thread_pool = -1  # the calling thread
    return make(options), large


def shape_str(shape) -> str:
    if shape.rank is None:
        return "<unknown rank>"
    return "[" + ", ".join("-1" if d is None else str(d) for d in shape.as_list()) + "]"


# --------------------------------------------------------------------------------------------- versions

class Servable:
    """One loaded version of a model."""

    def __init__(self, model: str, version: int, path: Path, batching: BatchingParameters | None):
        from tensorflow.core.protobuf import saved_model_pb2
        self.model, self.version, self.path = model, version, path
        proto = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
        metas = [m for m in proto.meta_graphs if "serve" in m.meta_info_def.tags] or list(proto.meta_graphs)
        if not metas:
            raise ValueError(f"{path / 'saved_model.pb'} holds no MetaGraph")
        self.signature_defs = metas[0].signature_def  # name -> SignatureDef proto (metadata)
        # freed with this object once the last request holding it lets go, not closed here (see Model.unload)
        self.session = load_session(path, list(metas[0].meta_info_def.tags))
        self.signatures: dict[str, Signature] = {}
        for name, sd in self.signature_defs.items():
            if name.startswith("__"):  # "__saved_model_init_op": the loader's, not a signature to serve
                continue
            self.signatures[name] = sig = Signature(name, sd, self.session)
            if batching is not None and sig.batchable:
                sig.batcher = _Batcher(sig._call, batching, f"{model}-{version}-{name}")
        self._warmup()

    def _warmup(self) -> None:
        """Replay assets.extra/tf_serving_warmup_requests (PredictionLog TFRecords) as TF Serving does."""
        warm = self.path / "assets.extra" / "tf_serving_warmup_requests"
        if not warm.is_file():
            return
        tf = _tf()
        from tensorflow_serving.apis import prediction_log_pb2
        for record in tf.data.TFRecordDataset(str(warm)).take(1000):
            log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            if log.WhichOneof("log_type") == "predict_log":
                req = log.predict_log.request
                sig = self.signature(req.model_spec.signature_name)
                sig.run({k: tf.make_ndarray(v) for k, v in req.inputs.items()})

    def signature(self, name: str | None) -> Signature:
        name = name or DEFAULT_SIGNATURE
        sig = self.signatures.get(name)
        if sig is None:
            raise RequestError("FAILED_PRECONDITION", f"Serving signature key \"{name}\" not found. Signatures of "
                               f"model {self.model!r} version {self.version}: {sorted(self.signatures)}")
        return sig

    def close(self) -> None:
        for s in self.signatures.values():
            if s.batcher is not None:
                s.batcher.close()


@dataclass
class VersionStatus:
    version: int
    state: str  # START | LOADING | AVAILABLE | UNLOADING | END
    error_code: str = "OK"
    error_message: str = ""
    stamp: tuple = ()  # saved_model.pb (size, mtime_ns) of a failed load: retried only when it changes
    load_seconds: float = 0.0  # AVAILABLE: how long the load took, warmup included (exported as a metric)


class _Snapshot:
    __slots__ = ("servables", "default")

    def __init__(self, servables: dict[int, Servable]):
        self.servables = servables
        self.default = max(servables) if servables else None


class Model:
    """One model: its settings, the status of every version seen, and the snapshot being served."""

    def __init__(self, settings: ModelSettings, batching: BatchingParameters | None):
        self.settings = settings
        self.batching = batching
        self.statuses: dict[int, VersionStatus] = {}
        self.snapshot = _Snapshot({})
        self._lock = threading.Lock()  # one poll at a time
        self.removed = False  # taken out of the config by a reload: never polled again

    @property
    def name(self) -> str:
        return self.settings.name

    def resolve(self, version: int | None = None, label: str | None = None) -> Servable:
        snap = self.snapshot  # read once: the whole request is served by this snapshot
        if version is not None and label:
            raise RequestError("INVALID_ARGUMENT", "ModelSpec has both version and version_label; pick one")
        if label:
            v = self.settings.labels.get(label)
            if v is None:  # ServerCore::GetModelVersionForLabel: INVALID_ARGUMENT, in these words
                raise RequestError("INVALID_ARGUMENT", f"Unrecognized servable version label: {label}")
            s = snap.servables.get(v)
            if s is None:
                raise RequestError("NOT_FOUND", f"Servable not found for request: label {label!r} of model "
                                   f"{self.name!r} points at version {v}, which is not available")
            return s
        if version is None:
            if snap.default is None:
                raise RequestError("NOT_FOUND", f"Servable not found for request: Latest({self.name}): "
                                   f"no version of model {self.name!r} is available")
            return snap.servables[snap.default]
        s = snap.servables.get(version)
        if s is None:
            raise RequestError("NOT_FOUND", f"Servable not found for request: Specific({self.name}, {version}); "
                               f"available versions: {sorted(snap.servables)}")
        return s

    def status(self, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        # `label` is ignored, as TF Serving's GetModelStatusImpl (it looks at model_spec.version only):
        # a status asked by label, known or not, lists every version of the model
        statuses = dict(self.statuses)
        if version is not None:
            st = statuses.get(version)
            if st is None:
                raise RequestError("NOT_FOUND", f"Could not find version {version} of model {self.name}")
            return [st]
        if not statuses:
            raise RequestError("NOT_FOUND", f"Could not find any versions of model {self.name}")
        return [statuses[v] for v in sorted(statuses, reverse=True)]

    def _on_disk(self) -> dict[int, Path]:
        base = Path(self.settings.base_path)
        try:
            entries = list(os.scandir(base))
        except OSError:
            return {}
        return {int(e.name): Path(e.path) for e in entries if e.name.isdigit() and e.is_dir()}

    def poll(self, log: Callable[[str], None] = lambda s: None) -> None:
        """Bring the served versions in line with the disk and the version policy (see module docstring)."""
        with self._lock:
            if self.removed:
                return
            s = self.settings
            disk = self._on_disk()
            if s.policy == "specific":
                candidates = sorted((v for v in disk if v in s.versions), reverse=True)
            else:
                candidates = sorted(disk, reverse=True)
            current = self.snapshot.servables
            want: dict[int, Servable] = {}
            for v in candidates:
                if s.policy == "latest" and len(want) >= s.num_versions:
                    break
                if v in current:
                    want[v] = current[v]
                    continue
                pb = disk[v] / "saved_model.pb"
                try:
                    st = pb.stat()
                    stamp = (st.st_size, st.st_mtime_ns)
                except OSError:
                    stamp = ()
                old = self.statuses.get(v)
                if old is not None and old.error_code != "OK" and old.stamp == stamp:
                    continue  # failed before and unchanged since: keep serving the others
                self.statuses[v] = VersionStatus(v, "LOADING")
                t_load = time.perf_counter()
                try:
                    if not stamp:
                        raise FileNotFoundError(f"no saved_model.pb in {disk[v]}")
                    want[v] = Servable(s.name, v, disk[v], self.batching)
                except Exception as e:  # noqa: BLE001 - recorded in the status, the others keep serving
                    msg = f"Failed to load version {v} of model {s.name!r} from {disk[v]}: {type(e).__name__}: {e}"
                    self.statuses[v] = VersionStatus(v, "END", _load_error_code(e), msg, stamp)
                    log(msg)
                    continue
                self.statuses[v] = VersionStatus(v, "AVAILABLE", load_seconds=time.perf_counter() - t_load)
                log(f"Successfully loaded servable version {{name: {s.name} version: {v}}}")
            if set(want) != set(current):
                self.snapshot = _Snapshot(want)  # the atomic switch
            for v, old_servable in current.items():
                if v not in want:
                    self.statuses[v] = VersionStatus(v, "END")
                    old_servable.close()
                    log(f"Unloaded servable version {{name: {s.name} version: {v}}}")

    def update_settings(self, settings: ModelSettings, log: Callable[[str], None] = lambda s: None) -> None:
        """A reload changed this model's version policy, labels or base path: apply it in place. Versions
        that stay under the policy keep their Servable (no reload, no gap); the poll loads and unloads the
        others. As TF Serving, a version is known by its number: one already served stays served even if
        the new base path holds another folder of that number."""
        with self._lock:
            self.settings = settings  # one assignment: a request sees the old labels or the new ones
        self.poll(log)

    def unload(self, log: Callable[[str], None] = lambda s: None) -> None:
        """Taken out of the config. Requests already running hold their Servable and finish on it (the
        TensorFlow objects are freed when the last one lets go, as TF Serving unloads a servable once its
        handles are released); a batcher that is closed still answers what it has queued."""
        with self._lock:
            self.removed = True
            snap, self.snapshot = self.snapshot, _Snapshot({})
            for v, sv in snap.servables.items():
                self.statuses[v] = VersionStatus(v, "UNLOADING")
                sv.close()
                self.statuses[v] = VersionStatus(v, "END")
                log(f"Unloaded servable version {{name: {self.name} version: {v}}}")

    def close(self) -> None:
        snap, self.snapshot = self.snapshot, _Snapshot({})
        for sv in snap.servables.values():
            sv.close()


def _load_error_code(e: BaseException) -> str:
    name = type(e).__name__
    if name in _OPERROR_CODES:
        return _OPERROR_CODES[name]
    if isinstance(e, FileNotFoundError):
        return "NOT_FOUND"
    if "DecodeError" in name or "parse" in str(e).lower():
        return "DATA_LOSS"
    return "UNKNOWN"


class ModelManager:
    """All models of a server, and the file-system poller that keeps their versions current."""

    def __init__(self, settings: list[ModelSettings], batching: BatchingParameters | None = None,
                 poll_wait_s: float = 1.0, log: Callable[[str], None] = lambda s: None):
        self.models: dict[str, Model] = {s.name: Model(s, batching) for s in settings}
        self.batching = batching
        self.poll_wait_s = poll_wait_s
        self._log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._config_thread: threading.Thread | None = None
        self._reload_lock = threading.Lock()  # one reload at a time (gRPC and the config-file poller)
        self._removed: dict[str, Model] = {}  # their END states still answer GetModelStatus, as TF Serving

    def get(self, name: str) -> Model:
        m = self.models.get(name)
        if m is None:
            raise RequestError("NOT_FOUND", f"Servable not found for request: model {name!r} is not served; "
                               f"models: {sorted(self.models)}")
        return m

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        m = self.models.get(name)
        if m is None:  # TF Serving's BasicManager words it by its ServableRequest
            if label:  # the label map is looked up first: INVALID_ARGUMENT, as for a known model
                raise RequestError("INVALID_ARGUMENT", f"Unrecognized servable version label: {label}")
            what = f"Specific({name}, {version})" if version is not None else f"Latest({name})"
            raise RequestError("NOT_FOUND", f"Servable not found for request: {what}")
        return m.resolve(version, label)

    def status(self, name: str, version: int | None = None, label: str | None = None) -> list[VersionStatus]:
        m = self.models.get(name) or self._removed.get(name)
        if m is None:  # get_model_status_impl.cc: a version asked for is named, as for a known model
            if version is not None:
                raise RequestError("NOT_FOUND", f"Could not find version {version} of model {name}")
            raise RequestError("NOT_FOUND", f"Could not find any versions of model {name}")
        return m.status(version, label)

    # -- reload (ModelService/HandleReloadConfigRequest, --model_config_file_poll_wait_seconds)
    def reload(self, settings: list[ModelSettings]) -> None:
        """Replace the model list as TF Serving's ServerCore::ReloadConfig: new models are loaded and
        AVAILABLE before this returns, unchanged ones keep their Servables, changed ones are updated in
        place, the others are unloaded. A refused config (RequestError with TF Serving's code and message)
        changes nothing: the old list keeps serving."""
        with self._reload_lock:
            current = self.models
            for s in settings:
                # ServerCore::UpdateModelVersionLabelMap: a label must name a version AVAILABLE now
                # (tensorflow_model_server's default, allow_version_labels_for_unavailable_models=false)
                m = current.get(s.name)
                for label, v in sorted(s.labels.items()):
                    st = None if m is None else m.statuses.get(v)
                    if st is None or st.state != "AVAILABLE":
                        raise RequestError("FAILED_PRECONDITION", f"Request to assign label to version {v} of "
                                           f"model {s.name}, which is not currently available for inference")
            for s in settings:  # FileSystemStoragePathSource's check on every base path
                if not Path(s.base_path).exists():
                    raise RequestError("INVALID_ARGUMENT", f"Could not find base path {s.base_path} for servable "
                                       f"{s.name} with error NOT_FOUND: {s.base_path} not found")
            added = [Model(s, self.batching) for s in settings if s.name not in current]
            failed = []
            for m in added:  # loaded before the switch: the new list is whole the moment it is visible
                m.poll(self._log)
                if m.snapshot.default is None:
                    failed.append(m)
            if failed:
                for m in added:
                    m.close()
                parts = []
                for m in failed:
                    errs = [st for st in m.statuses.values() if st.error_message]
                    if errs:
                        parts += [f"{{{{name: {m.name} version: {st.version}}} due to error: "
                                  f"{st.error_code}: {st.error_message}}}" for st in errs]
                    else:
                        parts.append(f"{{{{name: {m.name}}} due to error: No versions of servable {m.name} found "
                                     f"under base path {m.settings.base_path}. Did you forget to name your leaf "
                                     f"directory as a number (eg. '/1/')?}}")
                # ServerCore::WaitUntilModelsAvailable's error (TF Serving itself would wait on; it is refused
                # here so that the caller hears of it and the old list keeps serving)
                raise RequestError("UNKNOWN", f"{len(failed)} model(s) did not become available: "
                                   f"{{{', '.join(parts)}, }}")
            new_models = {m.name: m for m in added}
            changed = []
            for s in settings:
                m = current.get(s.name)
                if m is not None:
                    new_models[s.name] = m
                    if m.settings != s:
                        changed.append((m, s))
            self.models = {s.name: new_models[s.name] for s in settings}  # the switch: one assignment
            for m in added:
                self._removed.pop(m.name, None)
            for m, s in changed:
                m.update_settings(s, self._log)
            gone = [m for name, m in current.items() if name not in self.models]
            for m in gone:
                m.unload(self._log)
                self._removed[m.name] = m
            self._log(f"Reloaded the model config: {len(added)} added, {len(changed)} updated, {len(gone)} removed")

    def poll_config_file(self, path: str | os.PathLike, wait_s: float) -> None:
        """Re-read `path` every `wait_s` seconds and reload it (TF Serving's PollFilesystemAndReloadConfig):
        a file that does not parse, or a config refused, is logged and the old list keeps serving."""
        def reload_once():
            try:
                settings = parse_model_config_file(path)
            except ConfigError as e:
                self._log(f"Failed to read ModelServerConfig file: {e}")
                return
            if settings == [m.settings for m in self.models.values()]:
                return  # the same config: TF Serving's reload would change nothing either
            try:
                self.reload(settings)
            except RequestError as e:
                self._log(f"PollFilesystemAndReloadConfig failed to ReloadConfig: {e.message}")

        def loop():
            while not self._stop.wait(wait_s):
                try:
                    reload_once()
                except Exception as e:  # noqa: BLE001 - never kill the poller
                    self._log(f"PollFilesystemAndReloadConfig failed: {type(e).__name__}: {e}")

        self._config_thread = threading.Thread(target=loop, name="config-poll", daemon=True)
        self._config_thread.start()

    def poll_all(self) -> None:
        for m in list(self.models.values()):
            try:
                m.poll(self._log)
            except Exception as e:  # noqa: BLE001 - never kill the poller
                self._log(f"polling model {m.name!r} failed: {type(e).__name__}: {e}")

    def start(self) -> None:
        """Load what the disk holds now (before the ports open, as TF Serving), then poll in the background."""
        self.poll_all()
        if self.poll_wait_s and self.poll_wait_s > 0:
            self._thread = threading.Thread(target=self._poll_loop, name="fs-poll", daemon=True)
            self._thread.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_wait_s):
            self.poll_all()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._config_thread is not None:
            self._config_thread.join(timeout=30)
            self._config_thread = None
        for m in self.models.values():
            m.close()

