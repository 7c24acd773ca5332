"""Prometheus metrics for the local server, as tensorflow_model_server exports them with
`--monitoring_config_file`.

The config is TF Serving's MonitoringConfig text proto (tensorflow_serving/config/monitoring_config.proto):

    prometheus_config { enable: true, path: "/monitoring/prometheus/metrics" }

When enabled, the REST port answers GET on that path (PrometheusExporter::kPrometheusPath,
/monitoring/prometheus/metrics, when `path` is empty) with the Prometheus text format; disabled or absent,
the path is an unknown URL (404), as TF Serving. Each server has a registry of its own (never
prometheus_client's global one).

Names: TF Serving's exporter (tensorflow_serving/util/prometheus_exporter.cc) turns a TensorFlow metric
name into a Prometheus one by replacing every character outside [a-zA-Z0-9_] with ':', so
/tensorflow/serving/request_count is `:tensorflow:serving:request_count`; counters carry no `_total`
suffix and no `_created` sample. The page here is written in that form (see `render`). With TF Serving's
names, labels, units and buckets:

  :tensorflow:serving:request_count{model_name,status}            counter (status: the canonical code,
                                                                  OK / INVALID_ARGUMENT ...)
  :tensorflow:serving:request_latency{model_name,API,entrypoint}  histogram in microseconds of requests
                                                                  that succeeded, buckets 10 * 1.8^i,
                                                                  i < 33; entrypoint GRPC | REST
  both for the requests TF Serving records them for: gRPC Predict, Classify and Regress
  (prediction_service_impl.cc), every REST /v1 request (http_server.cc)
  :tensorflow:serving:batching_session:input_batch_size           histograms (no labels) of the rows per
  :tensorflow:serving:batching_session:processed_batch_size       request entering the batcher and per batch
                                                                  run; buckets 2^i, i < 14; only with
                                                                  --enable_batching

TF Serving has no metric for what follows, so it is under our own prefix `local_serving_`:

  local_serving_request_count{model_name,version,signature,API,entrypoint,status}   counter
  local_serving_request_latency_seconds{model_name,version,signature,API,entrypoint}
                                             histogram in seconds of every request, errors included
  local_serving_model_version_state{model_name,version,state}   gauge, 1 for each version's current state
                                                                (START, LOADING, AVAILABLE, UNLOADING, END)
  local_serving_model_load_latency_seconds{model_name,version}  gauge, how long an AVAILABLE version took
                                                                to load (warmup included)

API is the gRPC method (Predict, Classify, Regress, MultiInference, GetModelMetadata, GetModelStatus,
HandleReloadConfigRequest) or the REST verb (predict, classify, regress, metadata, status). version and
signature are what served the request (when it failed before a version was chosen: the version and
signature asked for, if any). A REST body refused before it is read as a request counts as
INVALID_ARGUMENT (not JSON) or RESOURCE_EXHAUSTED (over --max_request_bytes, HTTP 413); a URL that names
no model is not counted, nor are the Open Inference Protocol routes (serving/v2.py). Not exported: TF
Serving's runtime_latency, request_example_counts, model_warmup_latency, queuing_latency and TensorFlow's
own metrics. The hot path per request: a thread-local, one dict lookup, two inc() and one or two observe()
(about 3 us here).
"""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path

from serving.models import ConfigError

DEFAULT_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OWN = "local_serving_"

# TF Serving's buckets: monitoring::Buckets::Exponential(10, 1.8, 33) (util.cc) and (1, 2, 14) (batching_util.h)
LATENCY_US_BUCKETS = tuple(10 * 1.8 ** i for i in range(33))
BATCH_BUCKETS = tuple(float(2 ** i) for i in range(14))
LATENCY_S_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_TF_GRPC_APIS = frozenset({"Predict", "Classify", "Regress"})
_MONITORING_PROTO = None


def _monitoring_config_class():
    """tensorflow_serving's MonitoringConfig message: its own module where the installed package ships it
    (tensorflow-serving-api 2.21 does not), else the same two messages built here in a pool of their own
    (the default pool may get the real ones later)."""
    global _MONITORING_PROTO
    if _MONITORING_PROTO is not None:
        return _MONITORING_PROTO
    try:
        from tensorflow_serving.config import monitoring_config_pb2  # type: ignore[attr-defined]
        _MONITORING_PROTO = monitoring_config_pb2.MonitoringConfig
        return _MONITORING_PROTO
    except ImportError:
        pass
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    f = descriptor_pb2.FileDescriptorProto(name="tensorflow_serving/config/monitoring_config.proto",
                                           package="tensorflow.serving", syntax="proto3")
    p = f.message_type.add(name="PrometheusConfig")
    p.field.add(name="enable", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    p.field.add(name="path", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    m = f.message_type.add(name="MonitoringConfig")
    m.field.add(name="prometheus_config", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                type_name=".tensorflow.serving.PrometheusConfig")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    message = pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")
    _MONITORING_PROTO = message_factory.GetMessageClass(message)
    return _MONITORING_PROTO


def parse_monitoring_config(path) -> str | None:
    """A MonitoringConfig text proto -> the path metrics are served at, or None when Prometheus is not
    enabled. A file that cannot be read or parsed is a ConfigError naming it and the parse error."""
    from google.protobuf import text_format
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read --monitoring_config_file {path}: {e}") from e
    config = _monitoring_config_class()()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise ConfigError(f"--monitoring_config_file {path} is not a MonitoringConfig text proto: {e}") from None
    prom = config.prometheus_config
    if not prom.enable:
        return None
    url = prom.path or DEFAULT_PATH
    if not url.startswith("/"):
        raise ConfigError(f"--monitoring_config_file {path}: prometheus_config.path must start with '/', got {url!r}")
    return url


# ------------------------------------------------------------------------------------------ the metrics

class ServingMetrics:
    """One server's metrics. The front ends call `begin()` then `finish(...)` once per request; Core calls
    `note(servable, sig)` when it knows what serves the request (a thread-local: both front ends run a
    request on one thread from begin to finish)."""

    content_type = CONTENT_TYPE

    def __init__(self, manager_ref, batching: bool, path: str | None = DEFAULT_PATH):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.path = path  # where the REST port serves the page
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self._tf_count = Counter(":tensorflow:serving:request_count", "The total number of requests.",
                                 ("model_name", "status"), registry=r)
        self._tf_latency = Histogram(":tensorflow:serving:request_latency", "Distribution of wall time (in "
                                     "microseconds) for Tensorflow Serving request.",
                                     ("model_name", "API", "entrypoint"), buckets=LATENCY_US_BUCKETS, registry=r)
        self._count = Counter(OWN + "request_count", "Requests by model, version, signature, API, entrypoint "
                              "and canonical status code.",
                              ("model_name", "version", "signature", "API", "entrypoint", "status"), registry=r)
        self._latency = Histogram(OWN + "request_latency_seconds", "Wall time of every request (errors "
                                  "included) by model, version, signature, API and entrypoint.",
                                  ("model_name", "version", "signature", "API", "entrypoint"),
                                  buckets=LATENCY_S_BUCKETS, registry=r)
        self.input_batch_size = self.processed_batch_size = None
        if batching:
            self.input_batch_size = Histogram(":tensorflow:serving:batching_session:input_batch_size",
                                              "Tracks the batch size distribution on the inputs.",
                                              buckets=BATCH_BUCKETS, registry=r).observe
            self.processed_batch_size = Histogram(":tensorflow:serving:batching_session:processed_batch_size",
                                                  "Tracks the batch size distribution on processing.",
                                                  buckets=BATCH_BUCKETS, registry=r).observe
        r.register(_ModelStates(manager_ref))
        self._cells: dict[tuple, tuple] = {}
        self._cells_lock = threading.Lock()
        self._tls = threading.local()

    # -- the hot path: a perf_counter, a thread-local, one dict lookup, two inc() and one or two observe()
    def begin(self) -> float:
        self._tls.served = None
        return time.perf_counter()

    def note(self, servable, sig) -> None:
        self._tls.served = (servable.version, sig.name if sig is not None else "")

    def finish(self, entrypoint: str, api: str, model: str, version, signature: str, code: str, t0: float) -> None:
        dt = time.perf_counter() - t0
        tls = self._tls
        served = getattr(tls, "served", None)
        if served is not None:
            version, signature = served
            tls.served = None
        key = (model, version, signature, api, entrypoint, code)
        cells = self._cells.get(key)
        if cells is None:
            cells = self._new_cells(key)
        if cells[0] is not None:
            cells[0].inc()
        cells[1].inc()
        cells[2].observe(dt)
        if cells[3] is not None:
            cells[3].observe(dt * 1e6)

    def finish_grpc(self, api: str, request, code: str, t0: float) -> None:
        spec = getattr(request, "model_spec", None)
        if spec is None and getattr(request, "tasks", None):  # MultiInference: the first task's model
            spec = request.tasks[0].model_spec
        if spec is None:  # HandleReloadConfigRequest: no model
            self.finish("GRPC", api, "", None, "", code, t0)
        else:
            self.finish("GRPC", api, spec.name, spec.version.value if spec.HasField("version") else None,
                        spec.signature_name, code, t0)

    def _new_cells(self, key: tuple) -> tuple:
        model, version, signature, api, entrypoint, code = key
        version = "" if version is None else str(version)
        # TF Serving's two: what it records (prediction_service_impl.cc: gRPC Predict, Classify, Regress;
        # http_server.cc: every REST request), the latency of successes only
        tf = entrypoint == "REST" or api in _TF_GRPC_APIS
        with self._cells_lock:
            cells = (self._tf_count.labels(model, code) if tf else None,
                     self._count.labels(model, version, signature, api, entrypoint, code),
                     self._latency.labels(model, version, signature, api, entrypoint),
                     self._tf_latency.labels(model, api, entrypoint) if tf and code == "OK" else None)
            self._cells[key] = cells
            return cells

    def page(self) -> bytes:
        return render(self.registry)


class _ModelStates:
    """Read at scrape time from the manager (nothing on the hot path, and models added by a reload are
    seen without a hook)."""

    def __init__(self, manager_ref):
        self._manager_ref = manager_ref

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        state = GaugeMetricFamily(OWN + "model_version_state", "1 for the current state of each model version "
                                  "(START, LOADING, AVAILABLE, UNLOADING, END).",
                                  labels=("model_name", "version", "state"))
        load = GaugeMetricFamily(OWN + "model_load_latency_seconds", "How long each AVAILABLE version took to "
                                 "load, warmup included.", labels=("model_name", "version"))
        manager = self._manager_ref()
        for name, model in sorted((manager.models if manager is not None else {}).items()):
            for v, st in sorted(dict(model.statuses).items()):
                state.add_metric((name, str(v), st.state), 1)
                seconds = getattr(st, "load_seconds", 0.0)
                if st.state == "AVAILABLE" and seconds:
                    load.add_metric((name, str(v)), seconds)
        yield state
        yield load


# ------------------------------------------------------------------------------------------- the page

def _value(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if math.isnan(v):
        return "NaN"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _le(v: str) -> str:
    # absl::StrCat(double), as TF Serving writes bucket limits: 6 significant digits
    f = float(v)
    return "+Inf" if f == math.inf else "%.6g" % f


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, labels: dict, value: float) -> str:
    if labels:
        body = ",".join(f'{k}="{_le(v) if k == "le" else _escape(v)}"' for k, v in labels.items())
        return f"{name}{{{body}}} {_value(value)}"
    return f"{name} {_value(value)}"


def render(registry) -> bytes:
    """The registry in the form TF Serving's PrometheusExporter writes (prometheus_client's own
    generate_latest would add `_total` to every counter and `_created` samples, names TF Serving's page
    does not have): `# TYPE NAME counter` then `NAME{labels} value`."""
    lines: list[str] = []
    for fam in registry.collect():
        name, kind = fam.name, fam.type
        kind = {"unknown": "untyped"}.get(kind, kind)
        doc = fam.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            sname = name if (kind == "counter" and s.name == name + "_total") else s.name
            lines.append(_sample(sname, s.labels, s.value))
    return ("\n".join(lines) + "\n").encode("utf-8")
