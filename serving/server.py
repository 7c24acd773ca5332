"""A local server that speaks TensorFlow Serving's gRPC and REST APIs over a TF Serving model repository.

For machines without Docker or `tensorflow_model_server`: a script written against the real server runs
against this one unchanged (same services, messages, URLs, JSON shapes and status codes).

gRPC (grpc sync server, 8 worker threads): tensorflow.serving.PredictionService/{Predict, Classify, Regress,
GetModelMetadata, MultiInference} and tensorflow.serving.ModelService/{GetModelStatus,
HandleReloadConfigRequest}. MultiInference takes classification and regression tasks on one model and one
input of tf.Examples, with TF Serving's checks; HandleReloadConfigRequest replaces the model list (see
ModelManager.reload in serving/models.py). REST has no MultiInference, as TF Serving.

REST (aiohttp):
  GET  /v1/models/{m}[/versions/{v}|/labels/{l}]            -> {"model_version_status": [...]}
  GET  /v1/models/{m}[/versions/{v}|/labels/{l}]/metadata   -> {"model_spec": ..., "metadata": {"signature_def": ...}}
  POST /v1/models/{m}[/versions/{v}|/labels/{l}]:predict    row {"instances"} -> {"predictions"};
                                                            columnar {"inputs"} -> {"outputs"}
  POST ...:classify / ...:regress                           {"examples": [...], "context"?} -> {"results": ...}
  Errors are {"error": "..."} with TF Serving's HTTP codes: 404 unknown model / version or a URL outside /v1/,
  400 unknown label, bad input, malformed JSON or a /v1/ URL that does not parse ("Malformed request"), 413
  for a body over `max_request_bytes` (default 64 MiB; TF Serving itself has no such limit, a local server
  should), 501 for what is not implemented.
  String tensors take and give {"b64": "..."} for binary data (outputs whose name ends in "_bytes", or that
  are not UTF-8, are sent as b64), as TF Serving. A JSON true / false in a numeric tensor is TF Serving's
  "JSON Value: true Type: True is not of expected type: float" (400).
  OPTIONS on a /v1/ URL is a CORS preflight, as TF Serving: 200 with an http(s) Origin header, else 400, an
  empty body either way; `rest_api_enable_cors_support` adds TF Serving's three CORS headers to every /v1/
  answer.
  Without batching (predict answered on the event loop), the port's connections are _FastV1Protocol's: a
  plain HTTP/1.1 POST /v1/... with a Content-Length body is answered there through the same code as
  aiohttp's handler; anything else hands the connection to aiohttp.

Metrics (`monitoring_config_file`, TF Serving's MonitoringConfig): Prometheus text on the REST port at
prometheus_config.path (default /monitoring/prometheus/metrics); see serving/monitoring.py.

Status codes as TF Serving: a request without a ModelSpec INVALID_ARGUMENT "Missing ModelSpec", an empty model
name INVALID_ARGUMENT "ModelSpec has no name specified."; unknown model/version NOT_FOUND, unknown label
INVALID_ARGUMENT; wrong input name,
dtype or shape INVALID_ARGUMENT (the message names what the signature expects); unknown signature
FAILED_PRECONDITION. GetModelStatus ignores a version label (every version is listed), as TF Serving. A
request message that does not parse is INVALID_ARGUMENT (grpc itself would say INTERNAL).

Python API: `LocalServer(...)` (a context manager) with the options of `python -m serving`; port 0 picks a
free port, `rest_api_port=None` disables REST. See serving/models.py for versions, polling and batching.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import sys
import threading
import urllib.parse
from concurrent import futures
from typing import Callable

import numpy as np

from serving.models import (CLASSIFY_METHOD, DEFAULT_SIGNATURE, PREDICT_METHOD, REGRESS_METHOD,
                            ConfigError, ModelManager, ModelSettings, RequestError, Servable, Signature,
                            parse_batching_parameters, parse_model_config_file,
                            settings_from_reload_config)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
_GRPC_MAX_MESSAGE = 2 ** 31 - 1  # as tensorflow_model_server


def _tf():
    import tensorflow as tf
    return tf


# ------------------------------------------------------------------------------------------- core calls

def _spec_parts(spec) -> tuple[str, int | None, str, str]:
    """ModelSpec -> (name, version or None, label, signature_name)."""
    version = spec.version.value if spec.HasField("version") else None
    return spec.name, version, spec.version_label, spec.signature_name


def _request_spec(request) -> tuple[str, int | None, str, str]:
    """_spec_parts of a Predict / Classify / Regress / GetModelMetadata / GetModelStatus request's ModelSpec;
    a request without one is INVALID_ARGUMENT "Missing ModelSpec", checked first, as TF Serving
    (predict_impl.cc, classification_service.cc, regression_service.cc, get_model_metadata_impl.cc,
    get_model_status_impl.cc)."""
    if not request.HasField("model_spec"):
        raise RequestError("INVALID_ARGUMENT", "Missing ModelSpec")
    return _spec_parts(request.model_spec)


def _fill_spec(out_spec, servable: Servable, signature_name: str | None) -> None:
    out_spec.name = servable.model
    out_spec.version.value = servable.version
    if signature_name is not None:
        out_spec.signature_name = signature_name


def _tensor_to_array(name: str, proto, sig: Signature) -> np.ndarray:
    tf = _tf()
    spec = sig.inputs.get(name)
    if spec is not None and proto.dtype != spec.dtype.as_datatype_enum:
        try:
            got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "DT_INVALID"
        except TypeError:  # no DataType of that number: a garbled request
            got = f"DataType {proto.dtype}"
        raise RequestError("INVALID_ARGUMENT", f"input {name!r} has dtype {got} but signature {sig.name!r} "
                           f"expects {sig.describe_input(name)}")
    if proto.tensor_content and proto.dtype in _ENUM_TO_NP:
        dims = [d.size for d in proto.tensor_shape.dim]
        try:
            return np.frombuffer(proto.tensor_content, dtype=_ENUM_TO_NP[proto.dtype]).reshape(dims)
        except ValueError as e:
            raise RequestError("INVALID_ARGUMENT", f"input {name!r}: tensor_content does not hold shape {dims}: "
                               f"{e}") from None
    # fewer values than the shape holds are repeated to fill it (TensorProto's rule): a tiny request could
    # declare a shape of terabytes, so that expansion is capped
    n = 1
    for d in proto.tensor_shape.dim:
        n *= max(d.size, 0)
    typed = _VALUE_FIELDS.get(proto.dtype)
    if typed is not None and n:  # every value given in its typed field: read as it is (make_ndarray's answer)
        values = getattr(proto, typed[0])
        if len(values) == n:
            return np.array(values, dtype=typed[1]).reshape([d.size for d in proto.tensor_shape.dim])
    if n > _MAX_EXPANDED_ELEMENTS and n > max(len(getattr(proto, f)) for f in _TENSOR_VALUE_FIELDS):
        raise RequestError("RESOURCE_EXHAUSTED", f"input {name!r}: shape {[d.size for d in proto.tensor_shape.dim]} "
                           f"holds {n} values, more than the {_MAX_EXPANDED_ELEMENTS} this server fills from fewer "
                           f"given values")
    try:
        return tf.make_ndarray(proto)
    except Exception as e:  # noqa: BLE001
        raise RequestError("INVALID_ARGUMENT", f"input {name!r}: cannot read the TensorProto: {e}") from None


_MAX_EXPANDED_ELEMENTS = 1 << 25
# DataType -> (its TensorProto value field, numpy dtype), for the dtypes whose field holds the values as they are
# (DT_FLOAT, DT_DOUBLE, DT_INT32, DT_INT64, DT_BOOL)
_VALUE_FIELDS = {1: ("float_val", np.float32), 2: ("double_val", np.float64), 3: ("int_val", np.int32),
                 9: ("int64_val", np.int64), 10: ("bool_val", np.bool_)}
_TENSOR_VALUE_FIELDS = ("half_val", "float_val", "double_val", "int_val", "string_val", "scomplex_val", "int64_val",
                        "bool_val", "dcomplex_val", "uint32_val", "uint64_val")


_FAST_KINDS = "biuf"


def _array_to_tensor(arr: np.ndarray, out, make_tensor_proto) -> None:
    """Fill TensorProto `out` from `arr`: numeric arrays straight into tensor_content (5x cheaper than
    tf.make_tensor_proto, same bytes as it would write), anything else through tf.make_tensor_proto."""
    dt = arr.dtype
    enum = _NP_TO_ENUM.get(dt.str) if dt.kind in _FAST_KINDS else None
    if enum is None:
        out.CopyFrom(make_tensor_proto(arr))
        return
    out.dtype = enum
    dims = out.tensor_shape.dim
    for d in arr.shape:
        dims.add(size=d)
    out.tensor_content = np.ascontiguousarray(arr).tobytes()


_NP_TO_ENUM: dict[str, int] = {}
_ENUM_TO_NP: dict[int, np.dtype] = {}


def _init_enums() -> None:
    if _NP_TO_ENUM:
        return
    tf = _tf()
    for t in (tf.float16, tf.float32, tf.float64, tf.int8, tf.int16, tf.int32, tf.int64, tf.uint8, tf.uint16,
              tf.uint32, tf.uint64, tf.bool):
        _NP_TO_ENUM[np.dtype(t.as_numpy_dtype).str] = t.as_datatype_enum
        _ENUM_TO_NP[t.as_datatype_enum] = np.dtype(t.as_numpy_dtype)


class Core:
    """What both front ends call: resolve a servable, run a signature, describe models."""

    def __init__(self, manager: ModelManager, metrics=None):
        self.manager = manager
        self.metrics = metrics  # serving/monitoring.py's ServingMetrics, or None: told what serves a request

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a ModelSpec names; an empty name is INVALID_ARGUMENT "ModelSpec has no name
        specified." before anything else, as ServerCore::ServableRequestFromModelSpec (server_core.cc)."""
        if not name:
            raise RequestError("INVALID_ARGUMENT", "ModelSpec has no name specified.")
        return self.manager.resolve(name, version, label)

    def predict(self, servable: Servable, sig: Signature, arrays: dict[str, np.ndarray],
                output_filter=(), validate: bool = True) -> dict[str, np.ndarray]:
        """Run `sig` of the already-resolved `servable` (resolved once per request: a version switch in
        between cannot split the request across versions)."""
        if sig.method_name not in (PREDICT_METHOD, CLASSIFY_METHOD, REGRESS_METHOD):
            raise RequestError("INVALID_ARGUMENT", f"signature {sig.name!r} has method_name {sig.method_name!r}")
        if self.metrics is not None:
            self.metrics.note(servable, sig)
        out = sig.run(arrays, validate=validate)
        if output_filter:
            unknown = sorted(set(output_filter) - set(out))
            if unknown:
                raise RequestError("INVALID_ARGUMENT", f"output tensor alias(es) {unknown} not found in signature "
                                   f"{sig.name!r}; outputs: {sorted(out)}")
            out = {k: out[k] for k in output_filter}
        return out

    def examples_call(self, name, version, label, signature_name, serialized: list[bytes], method: str):
        """Classify / Regress: the signature takes serialized tf.Examples under "inputs"."""
        servable = self.resolve(name, version, label)
        sig = servable.signature(signature_name)
        if self.metrics is not None:
            self.metrics.note(servable, sig)
        kind = "classification" if method == CLASSIFY_METHOD else "regression"
        if sig.method_name != method:
            raise RequestError("INVALID_ARGUMENT", f"Expected {kind} signature method_name to be {method}. "
                               f"Was: {sig.method_name}")
        if not serialized:
            raise RequestError("INVALID_ARGUMENT", "Input is empty: no examples given")
        key = "inputs" if "inputs" in sig.inputs else (next(iter(sig.inputs)) if len(sig.inputs) == 1 else None)
        if key is None:
            raise RequestError("INVALID_ARGUMENT", f"{kind} signature {sig.name!r} must have one string input "
                               f"'inputs'; it has {sorted(sig.inputs)}")
        out = sig.run({key: np.array(serialized, dtype=object)})
        n = len(serialized)
        if method == CLASSIFY_METHOD:
            classes, scores = out.get("classes"), out.get("scores")
            if classes is None and scores is None:
                raise RequestError("INVALID_ARGUMENT", f"classification signature {sig.name!r} has neither "
                                   f"'classes' nor 'scores' outputs; outputs: {sorted(out)}")
            rows = []
            for i in range(n):
                c = None if classes is None else np.reshape(classes[i], -1)
                s = None if scores is None else np.reshape(scores[i], -1).astype(float)
                k = len(c) if c is not None else len(s)
                rows.append([(_text(c[j]) if c is not None else "", float(s[j]) if s is not None else 0.0)
                             for j in range(k)])
            return servable, sig, rows
        y = out.get("outputs")
        if y is None:
            if len(out) != 1:
                raise RequestError("INVALID_ARGUMENT", f"regression signature {sig.name!r} has no 'outputs' output")
            y = next(iter(out.values()))
        y = np.reshape(y, (n, -1))
        if y.shape[1] != 1:
            raise RequestError("INVALID_ARGUMENT", f"regression output must hold one value per example, got "
                               f"{y.shape[1]}")
        return servable, sig, [float(v) for v in y[:, 0]]

    def status(self, name, version=None, label=None):
        return self.manager.status(name, version, label)  # a removed model's versions: END

    def metadata_map(self, name, version=None, label=None):
        from tensorflow_serving.apis import get_model_metadata_pb2
        servable = self.resolve(name, version, label)
        if self.metrics is not None:
            self.metrics.note(servable, None)
        sdm = get_model_metadata_pb2.SignatureDefMap()
        # every SignatureDef of the MetaGraphDef, "__saved_model_init_op" included, as TF Serving's
        # SavedModelGetSignatureDef (get_model_metadata_impl.cc) copies them all
        for k, v in servable.signature_defs.items():
            sdm.signature_def[k].CopyFrom(v)
        return servable, sdm


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _examples_from_input(inp) -> list[bytes]:
    """tensorflow.serving.Input -> serialized tf.Examples (the context merged into each, as TF Serving)."""
    which = inp.WhichOneof("kind")
    if which == "example_list":
        return [e.SerializeToString() for e in inp.example_list.examples]
    if which == "example_list_with_context":
        ctx = inp.example_list_with_context.context
        out = []
        for e in inp.example_list_with_context.examples:
            merged = type(e)()
            merged.CopyFrom(ctx)
            merged.MergeFrom(e)
            out.append(merged.SerializeToString())
        return out
    raise RequestError("INVALID_ARGUMENT", "Input is empty: set example_list or example_list_with_context")


def _multi_inference(core: Core, request):
    """MultiInferenceRequest -> MultiInferenceResponse with the checks and messages of TF Serving's
    TensorFlowMultiInferenceRunner::Infer (multi_inference.cc); the servable is that of the first task's
    ModelSpec (multi_inference_helper.cc), and every task runs on it."""
    from tensorflow_serving.apis import inference_pb2, model_pb2
    tasks = list(request.tasks)
    spec0 = tasks[0].model_spec if tasks and tasks[0].HasField("model_spec") else model_pb2.ModelSpec()
    servable = core.resolve(*_spec_parts(spec0)[:3])
    model_name, seen = "", set()
    for task in tasks:
        if not task.model_spec.name:
            raise RequestError("INVALID_ARGUMENT", "Found ModelSpec with an empty model name.")
        if not model_name:
            model_name = task.model_spec.name
        elif model_name != task.model_spec.name:
            raise RequestError("INVALID_ARGUMENT", "All ModelSpecs in a MultiInferenceRequest must access the same "
                               "model name.")
        sig_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
        if sig_name in seen:
            raise RequestError("INVALID_ARGUMENT", f"Duplicate evaluation of signature: {sig_name}")
        seen.add(sig_name)
        if sig_name not in servable.signatures:
            raise RequestError("INVALID_ARGUMENT", f"Requested signature not found in model graph: {sig_name}")
        if task.method_name not in (CLASSIFY_METHOD, REGRESS_METHOD):
            raise RequestError("UNIMPLEMENTED", f"Unsupported signature method_name: {task.method_name}")
        got = servable.signatures[sig_name].method_name
        if got != task.method_name:  # PreProcessClassification / PreProcessRegression, before anything runs
            kind = "classification" if task.method_name == CLASSIFY_METHOD else "regression"
            raise RequestError("INVALID_ARGUMENT", f"Expected {kind} signature method_name to be "
                               f"{task.method_name}. Was: {got}")
    serialized = _examples_from_input(request.input)
    resp = inference_pb2.MultiInferenceResponse()
    for task in tasks:
        # pinned to the version resolved above: a version switch cannot split the tasks across versions
        _, sig, res = core.examples_call(servable.model, servable.version, None, task.model_spec.signature_name,
                                         serialized, task.method_name)
        out = resp.results.add()
        if task.method_name == CLASSIFY_METHOD:
            for row in res:
                c = out.classification_result.classifications.add()
                for lab, score in row:
                    c.classes.add(label=lab, score=score)
        else:
            for v in res:
                out.regression_result.regressions.add(value=v)
        _fill_spec(out.model_spec, servable, sig.name)
    return resp


# ------------------------------------------------------------------------------------------------ gRPC

def _grpc_code(name: str):
    import grpc
    return getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)


def _make_servicers(core: Core):
    import grpc
    from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
                                         regression_pb2)
    from tensorflow_serving.apis import model_management_pb2
    tf = _tf()
    _init_enums()
    make_tensor_proto = tf.make_tensor_proto

    metrics = core.metrics

    def guarded(fn):
        api = fn.__name__

        def call(self, request, context):
            t0 = metrics.begin() if metrics is not None else 0.0
            code = "OK"
            try:
                if isinstance(request, _Undecodable):
                    raise RequestError("INVALID_ARGUMENT", request.message)
                return fn(self, request, context)
            except RequestError as e:
                code = e.code
                context.abort(_grpc_code(e.code), e.message)
            except Exception as e:  # noqa: BLE001 - an answer, never a dead worker
                code = "INTERNAL"
                context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
            finally:  # every gRPC call counted once, errors under their code
                if metrics is not None:
                    metrics.finish_grpc(api, request, code, t0)
        return call

    class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
        @guarded
        def Predict(self, request, context):
            name, version, label, sig_name = _request_spec(request)
            servable = core.resolve(name, version, label)
            sig = servable.signature(sig_name)
            arrays = {k: _tensor_to_array(k, v, sig) for k, v in request.inputs.items()}
            out = core.predict(servable, sig, arrays, list(request.output_filter))
            resp = predict_pb2.PredictResponse()
            _fill_spec(resp.model_spec, servable, sig.name)
            for k, v in out.items():
                _array_to_tensor(v, resp.outputs[k], make_tensor_proto)
            return resp

        @guarded
        def Classify(self, request, context):
            name, version, label, sig_name = _request_spec(request)
            servable, sig, rows = core.examples_call(name, version, label, sig_name,
                                                     _examples_from_input(request.input), CLASSIFY_METHOD)
            resp = classification_pb2.ClassificationResponse()
            _fill_spec(resp.model_spec, servable, sig.name)
            for row in rows:
                c = resp.result.classifications.add()
                for lab, score in row:
                    c.classes.add(label=lab, score=score)
            return resp

        @guarded
        def Regress(self, request, context):
            name, version, label, sig_name = _request_spec(request)
            servable, sig, values = core.examples_call(name, version, label, sig_name,
                                                       _examples_from_input(request.input), REGRESS_METHOD)
            resp = regression_pb2.RegressionResponse()
            _fill_spec(resp.model_spec, servable, sig.name)
            for v in values:
                resp.result.regressions.add(value=v)
            return resp

        @guarded
        def MultiInference(self, request, context):
            return _multi_inference(core, request)

        @guarded
        def GetModelMetadata(self, request, context):
            name, version, label, _ = _request_spec(request)  # before the fields, as get_model_metadata_impl.cc
            fields = list(request.metadata_field)
            if not fields:
                raise RequestError("INVALID_ARGUMENT", "GetModelMetadataRequest must specify at least one "
                                   "metadata_field")
            bad = [f for f in fields if f != "signature_def"]
            if bad:
                raise RequestError("INVALID_ARGUMENT", f"Metadata field {bad[0]} is not supported")
            servable, sdm = core.metadata_map(name, version, label)
            resp = get_model_metadata_pb2.GetModelMetadataResponse()
            _fill_spec(resp.model_spec, servable, None)
            resp.metadata["signature_def"].Pack(sdm)
            return resp

    class ModelService(model_service_pb2_grpc.ModelServiceServicer):
        @guarded
        def GetModelStatus(self, request, context):
            name, version, label, _ = _request_spec(request)
            resp = get_model_status_pb2.GetModelStatusResponse()
            for st in core.status(name, version, label):
                mvs = resp.model_version_status.add(version=st.version)
                mvs.state = get_model_status_pb2.ModelVersionStatus.State.Value(st.state)
                mvs.status.error_code = _error_code_enum(st.error_code)
                mvs.status.error_message = st.error_message
            return resp

        @guarded
        def HandleReloadConfigRequest(self, request, context):
            # a refused config is a gRPC error with TF Serving's code and message (ToGRPCStatus) and the
            # old list keeps serving; success answers status OK
            core.manager.reload(settings_from_reload_config(request.config))
            resp = model_management_pb2.ReloadConfigResponse()
            resp.status.error_code = 0
            for name in request.metric_names:  # TF Serving reports 0 for a metric it does not collect
                resp.metric.add(name=name, int64_value_increase=0)
            return resp

    return PredictionService(), ModelService(), (_LenientRegistrar(prediction_service_pb2_grpc),
                                                 _LenientRegistrar(model_service_pb2_grpc))


class _Undecodable:
    """A request message that did not parse. grpc answers a deserializer's exception with INTERNAL
    ("Exception deserializing request!"); the servicer answers this with INVALID_ARGUMENT instead."""
    model_spec = None  # metrics: no model

    def __init__(self, message: str):
        self.message = message


def _lenient(parse):
    def parse_or_mark(data: bytes):
        try:
            return parse(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, bad UTF-8 in a string field, ...
            return _Undecodable(f"cannot parse the request message ({len(data)} bytes): {type(e).__name__}: {e}")
    return parse_or_mark


class _LenientHandler:
    """A grpc.GenericRpcHandler whose method handlers use _lenient request deserializers."""

    def __init__(self, inner):
        self._inner = inner
        self._cache: dict = {}

    def service(self, details):
        h = self._inner.service(details)
        if h is None or h.request_deserializer is None:
            return h
        got = self._cache.get(details.method)
        if got is None or got[0] is not h:
            got = self._cache[details.method] = (h, h._replace(request_deserializer=_lenient(h.request_deserializer)))
        return got[1]


class _LenientRegistrar:
    """Stands in for a *_pb2_grpc module in LocalServer._start: its add_*_to_server registers the generated
    handlers, wrapped in _LenientHandler."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        fn = getattr(self._module, name)
        if not (name.startswith("add_") and name.endswith("_to_server")):
            return fn
        return lambda servicer, server: fn(servicer, _LenientServer(server))


class _LenientServer:
    def __init__(self, server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers):  # grpc asks a handler for its `service` method only
        self._server.add_generic_rpc_handlers(tuple(_LenientHandler(h) for h in handlers))

    def add_registered_method_handlers(self, service, handlers):  # what newer generated stubs call too
        self._server.add_registered_method_handlers(service, {
            name: h if h.request_deserializer is None else h._replace(request_deserializer=_lenient(h.request_deserializer))
            for name, h in handlers.items()})

    def __getattr__(self, name):
        return getattr(self._server, name)


def _error_code_enum(name: str) -> int:
    from tensorflow.core.protobuf import error_codes_pb2
    return error_codes_pb2.Code.Value(name) if name in error_codes_pb2.Code.keys() else error_codes_pb2.UNKNOWN


# ------------------------------------------------------------------------------------------------ REST

# TF Serving's URL patterns (http_rest_api_util.cc, kPredictionApiGegex / kModelStatusApiRegex), matched in
# full and case-insensitively against the undecoded path: POST for the verbs, GET for status and metadata
_POST_URL = re.compile(r"/v1/models/([^/:]+)(?:(?:/versions/([0-9]+))|(?:/labels/([^/:]+)))?"
                       r":(classify|regress|predict)", re.IGNORECASE)
_GET_URL = re.compile(r"/v1/models(?:/([^/:]+))?(?:(?:/versions/([0-9]+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
                      re.IGNORECASE)
_INT64_MAX = 2 ** 63 - 1


class _Json:
    """JSON <-> numpy, in TF Serving's REST conventions."""

    @staticmethod
    def refuse_bools(value, dtype) -> None:
        """A JSON true / false where a number is expected is TF Serving's TypeError (json_tensor.cc
        AddValueToTensor: DT_FLOAT / DT_DOUBLE take IsNumber(), the integer types IsInt() / IsInt64() /
        IsUint() / IsUint64(), none of which a JSON boolean is), for the first one in document order;
        numpy would read it as 1 or 0."""
        stack = [value]
        while stack:
            v = stack.pop()
            if v is True or v is False:
                from tensorflow.core.framework import types_pb2
                tf_name = types_pb2.DataType.Name(dtype.as_datatype_enum)[3:].lower()  # DataTypeString
                raise RequestError("INVALID_ARGUMENT", f"JSON Value: {'true' if v else 'false'} Type: "
                                   f"{'True' if v else 'False'} is not of expected type: {tf_name}")
            if isinstance(v, list):
                stack.extend(reversed(v))

    @staticmethod
    def to_array(value, sig: Signature, name: str, bools: bool = True) -> np.ndarray:
        """`bools`: the value may hold JSON booleans (False when the request body has no "true" / "false")."""
        spec = sig.inputs[name]
        want = sig.input_np[name]
        if spec.dtype.name == "string":
            return np.array(_Json._bytes_tree(value, name), dtype=object)
        if isinstance(value, dict):
            raise RequestError("INVALID_ARGUMENT", f"input {name!r}: got a JSON object but signature {sig.name!r} "
                               f"expects {sig.describe_input(name)}")
        if bools and np.dtype(want).kind in "iuf":
            _Json.refuse_bools(value, spec.dtype)
        try:
            arr = np.asarray(value)
        except ValueError as e:
            raise RequestError("INVALID_ARGUMENT", f"input {name!r} is not a rectangular array ({e}); signature "
                               f"{sig.name!r} expects {sig.describe_input(name)}") from None
        kind = arr.dtype.kind
        wkind = np.dtype(want).kind
        if kind not in "biuf" or (wkind == "b" and kind != "b") or (wkind in "iu" and kind == "f" and
                                                                   not np.all(np.mod(arr, 1) == 0)):
            what = {"U": "strings", "O": "mixed or ragged values", "f": "non-integer numbers", "b": "booleans"}
            raise RequestError("INVALID_ARGUMENT", f"input {name!r} holds {what.get(kind, arr.dtype.name)} but "
                               f"signature {sig.name!r} expects {sig.describe_input(name)}")
        if wkind in "iu" and kind in "iu" and arr.size:
            info = np.iinfo(want)
            if arr.min() < info.min or arr.max() > info.max:
                raise RequestError("INVALID_ARGUMENT", f"input {name!r} has values out of range for "
                                   f"{np.dtype(want).name}")
        arr = arr.astype(want, copy=False)
        if not sig.shape_fits(name, arr.shape):
            raise RequestError("INVALID_ARGUMENT", f"input {name!r} has shape {list(arr.shape)} but signature "
                               f"{sig.name!r} expects {sig.describe_input(name)}")
        return arr

    @staticmethod
    def _bytes_tree(v, name):
        if isinstance(v, list):
            return [_Json._bytes_tree(x, name) for x in v]
        if isinstance(v, dict) and set(v) == {"b64"}:
            try:
                return base64.b64decode(v["b64"], validate=True)
            except Exception:  # noqa: BLE001
                raise RequestError("INVALID_ARGUMENT", f"input {name!r}: bad base64 in {{\"b64\": ...}}") from None
        if isinstance(v, str):
            return v.encode("utf-8")
        raise RequestError("INVALID_ARGUMENT", f"input {name!r} expects strings (or {{\"b64\": ...}}), got "
                           f"{type(v).__name__}")

    @staticmethod
    def from_array(arr: np.ndarray, name: str):
        if arr.dtype.kind in "OSU":
            b64 = name.endswith("_bytes")
            return _Json._strings(arr.tolist(), b64)
        if arr.dtype.kind == "c":
            raise RequestError("INVALID_ARGUMENT", f"output {name!r}: complex values have no JSON form")
        return arr.tolist()

    @staticmethod
    def _strings(v, b64):
        if isinstance(v, list):
            return [_Json._strings(x, b64) for x in v]
        if isinstance(v, bytes):
            if not b64:
                try:
                    return v.decode("utf-8")
                except UnicodeDecodeError:
                    pass
            return {"b64": base64.b64encode(v).decode("ascii")}
        return v

    @staticmethod
    def feature(v):
        """A JSON value -> tf.train.Feature (ints -> int64_list, numbers -> float_list, strings -> bytes_list)."""
        tf = _tf()
        vals = v if isinstance(v, list) else [v]
        if any(isinstance(x, list) for x in vals):  # a Feature is a flat list
            raise RequestError("INVALID_ARGUMENT", f"example feature value {v!r} is nested: a feature takes a value "
                               f"or a flat list of values")
        try:
            if all(isinstance(x, bool) or isinstance(x, int) for x in vals):
                return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(x) for x in vals]))
            if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
                return tf.train.Feature(float_list=tf.train.FloatList(value=[float(x) for x in vals]))
        except (ValueError, OverflowError) as e:  # an integer beyond int64, a float beyond float
            raise RequestError("INVALID_ARGUMENT", f"example feature value out of range: {e}") from None
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=_Json._bytes_tree(vals, "examples")))

    @staticmethod
    def example(obj: dict, context: dict | None):
        tf = _tf()
        if not isinstance(obj, dict):
            raise RequestError("INVALID_ARGUMENT", "each of 'examples' must be a JSON object of features")
        feats = {**(context or {}), **obj}
        return tf.train.Example(features=tf.train.Features(
            feature={k: _Json.feature(v) for k, v in feats.items()})).SerializeToString()


def _signature_name(body: dict) -> str:
    sig_name = body.get("signature_name", "")
    if not isinstance(sig_name, str):  # json_tensor.cc FillSignature: present, it must be a string
        raise RequestError("INVALID_ARGUMENT", "'signature_name' key must be a string value.")
    return sig_name or DEFAULT_SIGNATURE


def _json_error(status: int, message: str):
    from aiohttp import web
    return web.Response(status=status, text=json.dumps({"error": message}), content_type="application/json")


# TF Serving's CORS headers (http_rest_api_util.cc AddCORSHeaders), on every /v1/ answer with
# --rest_api_enable_cors_support (http_server.cc RestApiRequestDispatcher::ProcessRequest)
_CORS_HEADERS = (("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Methods", "POST, GET"),
                 ("Access-Control-Allow-Headers", "Content-Type"))
_CORS_ORIGIN = re.compile(r"https?://")  # RE2::PartialMatch(origin_header, "https?://")
_PATH_CACHE_MAX = 4096


def _make_rest_app(core: Core, max_request_bytes: int, run_blocking: Callable, cors: bool = False,
                   hooks: dict | None = None):
    """The aiohttp app: TF Serving's /v1/ API, the v2 routes, metrics. `hooks`, when given, gets
    "post_inline": `post_inline(raw_path, body bytes) -> (status, JSON text)`, a /v1/ POST answered
    synchronously (what handle_v1 answers when predict runs on the event loop), and "cors_headers" (a dict,
    or None), for _FastV1Protocol."""
    from aiohttp import web

    path_cache: dict = {}

    def parse_path_cached(method: str, path: str):
        """parse_path, remembered for URLs that parse (a client repeats the same few)."""
        key = (method, path)
        got = path_cache.get(key)
        if got is None:
            got = parse_path(method, path)
            if len(path_cache) >= _PATH_CACHE_MAX:
                path_cache.clear()
            path_cache[key] = got
        return got

    def parse_path(method: str, path: str):
        """As HttpRestApiHandler::ProcessRequest + ParseModelInfo: a /v1/ URL that does not parse is
        INVALID_ARGUMENT (400) "Malformed request: <method> <path>", not 404."""
        malformed = RequestError("INVALID_ARGUMENT", f"Malformed request: {method} {path}")
        rx = _POST_URL if method == "POST" else _GET_URL if method == "GET" else None
        m = rx.fullmatch(path) if rx is not None else None
        if m is None:
            raise malformed
        name, version, label, tail = m.groups()
        name = urllib.parse.unquote(name or "")  # DecodeArg: the name and label are percent-decoded
        label = urllib.parse.unquote(label) if label else None
        if version is not None:
            version = int(version)
            if version > _INT64_MAX:  # absl::SimpleAtoi into an int64
                raise RequestError("INVALID_ARGUMENT", f"Failed to convert version: {m.group(2)} to numeric.")
        if method == "POST":
            if tail not in ("classify", "regress", "predict"):  # matched case-insensitively, dispatched not
                raise malformed
            return name, version, label, False, tail
        if not name:  # GET /v1/models parses, with no model name
            raise RequestError("INVALID_ARGUMENT", "Missing model name in request.")
        return name, version, label, tail == "metadata", None  # "/METADATA" is a status request, as there

    def status_json(name, version, label):
        return {"model_version_status": [
            {"version": str(st.version), "state": st.state,
             "status": {"error_code": st.error_code, "error_message": st.error_message}}
            for st in core.status(name, version, label)]}

    def metadata_json(name, version, label):
        from google.protobuf import json_format
        from tensorflow_serving.apis import model_pb2
        servable, sdm = core.metadata_map(name, version, label)
        spec = model_pb2.ModelSpec()
        _fill_spec(spec, servable, None)
        # ToJsonString(GetModelMetadataResponse) in http_rest_api_util.cc: both parts printed with
        # always_print_fields_with_no_presence and preserve_proto_field_names ("name": "" of each dim,
        # "unknown_rank": false, "defaults": {}, "signature_name": "")
        opts = {"always_print_fields_with_no_presence": True, "preserving_proto_field_name": True}
        return {"model_spec": json_format.MessageToDict(spec, **opts),
                "metadata": {"signature_def": json_format.MessageToDict(sdm, **opts)}}

    def predict_json(name, version, label, body: dict, bools: bool = True):
        """`bools`: the body may hold JSON booleans (_Json.refuse_bools looks for them only then)."""
        sig_name = _signature_name(body)
        servable = core.manager.resolve(name, version, label)
        sig = servable.signature(sig_name)
        row = "instances" in body
        if row == ("inputs" in body):
            raise RequestError("INVALID_ARGUMENT", "JSON object: there must be exactly one of 'instances' (row "
                               "format) or 'inputs' (columnar format)")
        single = len(sig.inputs) == 1
        if row:
            inst = body["instances"]
            if not isinstance(inst, list):
                raise RequestError("INVALID_ARGUMENT", "'instances' must be a JSON list")
            if inst and all(isinstance(i, dict) and not set(i) == {"b64"} for i in inst):
                keys = set(inst[0])
                if any(set(i) != keys for i in inst):
                    raise RequestError("INVALID_ARGUMENT", "all 'instances' must name the same inputs")
                sig.check_names(keys)
                arrays = {k: _Json.to_array([i[k] for i in inst], sig, k, bools) for k in keys}
            elif single:
                (k,) = sig.inputs
                arrays = {k: _Json.to_array(inst, sig, k, bools)}
            else:
                raise RequestError("INVALID_ARGUMENT", f"signature {sig.name!r} has several inputs; each instance "
                                   f"must be a JSON object naming them: {sig.expected()}")
        else:
            inputs = body["inputs"]
            if isinstance(inputs, dict) and not (single and set(inputs) == {"b64"}):
                sig.check_names(inputs)
                arrays = {k: _Json.to_array(v, sig, k, bools) for k, v in inputs.items()}
            elif single:
                (k,) = sig.inputs
                arrays = {k: _Json.to_array(inputs, sig, k, bools)}
            else:
                raise RequestError("INVALID_ARGUMENT", f"signature {sig.name!r} has several inputs; 'inputs' must "
                                   f"be a JSON object naming them: {sig.expected()}")
        # to_array gave each numeric input the signature's dtype and a fitting shape, and the names were
        # checked: run's own checks are needed only where a string input's shape was not looked at
        out = core.predict(servable, sig, arrays,
                           validate=any(a.dtype.kind not in _FAST_KINDS for a in arrays.values()))
        enc = {k: _Json.from_array(v, k) for k, v in out.items()}
        if not row:
            return {"outputs": next(iter(enc.values())) if len(enc) == 1 else enc}
        if len(enc) == 1:
            return {"predictions": next(iter(enc.values()))}
        n = {len(v) if isinstance(v, list) else -1 for v in enc.values()}
        if len(n) != 1 or -1 in n:
            raise RequestError("INVALID_ARGUMENT", "outputs do not share a batch size; use the columnar format "
                               "('inputs') for this signature")
        rows = n.pop()
        return {"predictions": [{k: v[i] for k, v in enc.items()} for i in range(rows)]}

    def examples_json(name, version, label, body: dict, method: str):
        sig_name = _signature_name(body)
        examples = body.get("examples")
        if not isinstance(examples, list):
            raise RequestError("INVALID_ARGUMENT", "'examples' must be a JSON list of objects")
        ctx = body.get("context")
        if ctx is not None and not isinstance(ctx, dict):
            raise RequestError("INVALID_ARGUMENT", "'context' must be a JSON object")
        serialized = [_Json.example(e, ctx) for e in examples]
        _, _, res = core.examples_call(name, version, label, sig_name, serialized, method)
        if method == CLASSIFY_METHOD:
            return {"results": [[[lab, score] for lab, score in row] for row in res]}
        return {"results": res}

    metrics = core.metrics
    rest_api = {predict_json: "predict", status_json: "status", metadata_json: "metadata"}

    def answer(fn, *args):
        t0 = metrics.begin() if metrics is not None else 0.0
        code = "OK"
        try:
            return 200, fn(*args)
        except RequestError as e:
            code = e.code
            return e.http_status, {"error": e.message}
        except RecursionError:  # JSON nested deeper than the decoding of it can follow
            code = "INVALID_ARGUMENT"
            return 400, {"error": "JSON Parse error: the request is nested too deeply"}
        except Exception as e:  # noqa: BLE001
            code = "INTERNAL"
            return 500, {"error": f"{type(e).__name__}: {e}"}
        finally:  # every v1 model request counted once, errors under their code
            if metrics is not None:
                api = rest_api.get(fn) or (("classify" if args[-1] == CLASSIFY_METHOD else "regress")
                                           if fn is examples_json else fn.__name__)
                body = args[3] if len(args) > 3 else None
                sig = body.get("signature_name") if isinstance(body, dict) else None
                metrics.finish("REST", api, args[0], args[1], sig if isinstance(sig, str) else "", code, t0)

    def refused(name, version, verb, status: int, message: str) -> tuple[int, str]:
        """A request refused before it reaches `answer` (body too large, not JSON): counted all the same."""
        if metrics is not None:
            metrics.finish("REST", verb, name, version, "", "RESOURCE_EXHAUSTED" if status == 413 else
                           "INVALID_ARGUMENT", metrics.begin())
        return status, json.dumps({"error": message})

    def encode(status: int, obj) -> tuple[int, str]:
        try:
            return status, json.dumps(obj)
        except (TypeError, ValueError) as e:
            return 500, json.dumps({"error": f"cannot encode the answer as JSON: {e}"})

    cors_headers = dict(_CORS_HEADERS) if cors else None

    def respond(status: int, text: str) -> web.Response:
        return web.Response(status=status, text=text, content_type="application/json", headers=cors_headers)

    def post_call(name, version, label, verb, raw: bytes):
        """A /v1/ POST's body -> the arguments of `answer`, or (status, text) where the body is refused."""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
            return refused(name, version, verb, 400, f"JSON Parse error: {e}")
        if not isinstance(body, dict):
            return refused(name, version, verb, 400, "JSON Parse error: the request body must be a JSON object")
        if verb == "predict":  # no JSON true / false anywhere in the body: no booleans to look for
            return None, (predict_json, name, version, label, body, b"true" in raw or b"false" in raw)
        method = CLASSIFY_METHOD if verb == "classify" else REGRESS_METHOD
        return None, (examples_json, name, version, label, body, method)

    def post_inline(path: str, raw: bytes) -> tuple[int, str]:
        """A /v1/ POST (already read, within max_request_bytes) answered here and now: handle_v1's answer
        when predict runs on the event loop."""
        try:
            name, version, label, _, verb = parse_path_cached("POST", path)
        except RequestError as e:
            return e.http_status, json.dumps({"error": e.message})
        status, call = post_call(name, version, label, verb, raw)
        if status is not None:
            return status, call
        return encode(*answer(*call))

    async def handle_v1(request: web.Request):
        # every /v1/ URL (any method) is TF Serving's: one that does not parse is a 400, not a 404
        if request.method == "OPTIONS":
            # a CORS preflight (http_server.cc ProcessRequest): OK when Origin names an http(s) origin, else
            # FAILED_PRECONDITION "Origin header is missing in CORS preflight"; either way an empty body
            ok = _CORS_ORIGIN.search(request.headers.get("Origin", "")) is not None
            if metrics is not None:  # counted as there: no model name, no API (RecordModelRequestCount)
                metrics.finish("REST", "", "", None, "", "OK" if ok else "FAILED_PRECONDITION", metrics.begin())
            return web.Response(status=200 if ok else 400, headers=cors_headers)
        try:
            name, version, label, meta, verb = parse_path_cached(request.method, request.rel_url.raw_path)
        except RequestError as e:
            return respond(e.http_status, json.dumps({"error": e.message}))
        if request.method == "GET":
            return respond(*encode(*answer(metadata_json if meta else status_json, name, version, label)))
        if request.content_length is not None and request.content_length > max_request_bytes:
            return respond(*refused(name, version, verb, 413, f"request body of {request.content_length} bytes is "
                                    f"over the limit of {max_request_bytes} bytes"))
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return respond(*refused(name, version, verb, 413, f"request body is over the limit of "
                                    f"{max_request_bytes} bytes"))
        status, call = post_call(name, version, label, verb, raw)
        if status is not None:
            return respond(status, call)
        return respond(*encode(*await run_blocking(answer, *call)))

    async def not_found(request: web.Request):
        return _json_error(404, f"Malformed request: {request.method} {request.path}")

    app = web.Application(client_max_size=max_request_bytes)
    app.router.add_route("*", "/{v1:[vV]1}/{tail:.*}", handle_v1)  # "(?i)/v1/.*" (kHTTPRestApiHandlerPathRegex)
    from serving.v2 import add_v2_routes  # the Open Inference Protocol (KServe v2) on the same port
    add_v2_routes(app, core, max_request_bytes, run_blocking)
    if metrics is not None and metrics.path:  # --monitoring_config_file; before the catch-all
        async def prometheus(request: web.Request):
            return web.Response(body=metrics.page(), headers={"Content-Type": metrics.content_type})
        app.router.add_route("GET", metrics.path, prometheus)
    app.router.add_route("*", "/{tail:.*}", not_found)
    if hooks is not None:
        hooks.update(post_inline=post_inline, cors_headers=cors_headers)
    return app


class _FastV1Protocol(asyncio.Protocol):
    """The REST port's connections, answering the common request itself: a `POST /v1/...` over HTTP/1.1 with a
    Content-Length body of at most _FAST_MAX_BODY bytes (and within max_request_bytes), no Transfer-Encoding,
    Expect or Upgrade, is read here and answered through the app's post_inline (the very function aiohttp's
    handle_v1 answers with, metrics included) with the headers aiohttp writes. Anything else (another
    method or path, HTTP/1.0, a chunked or large body, a head that does not parse plainly) hands the
    connection, with the bytes not yet answered, to aiohttp's own protocol for the rest of its life, so
    every other route, error and limit stays aiohttp's. Requests on one connection are answered in order:
    the fast ones synchronously, before anything after them is read. This skips aiohttp's request and
    response objects, its router and its writer: about 0.1 ms a request on a 2-CPU machine (measured when a whole
    predict took 0.4 ms; it now takes about 0.13 ms)."""

    __slots__ = ("_make_fallback", "_post", "_limit", "_extra", "_conns", "_transport", "_buf", "_gone", "_idle",
                 "_heard", "_loop")

    def __init__(self, make_fallback, post_inline, limit: int, extra_headers: bytes, conns: set):
        self._make_fallback = make_fallback  # aiohttp's web_server.Server: called, a RequestHandler
        self._post = post_inline
        self._limit = limit
        self._extra = extra_headers
        self._conns = conns
        self._transport = None
        self._buf = bytearray()
        self._gone = False  # handed to aiohttp, or closed
        self._idle = None   # the timer that closes a connection left idle (aiohttp's keep-alive timeout)
        self._heard = 0.0   # the loop's time of the latest bytes
        self._loop = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._conns.add(transport)
        self._loop = asyncio.get_running_loop()
        self._heard = self._loop.time()
        self._wait_idle(_FAST_KEEPALIVE_S)

    def connection_lost(self, exc) -> None:
        self._gone = True
        self._stop_idle()
        self._conns.discard(self._transport)

    def _wait_idle(self, delay: float) -> None:
        self._idle = self._loop.call_later(delay, self._close_idle)

    def _stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _close_idle(self) -> None:
        """The timer is set once and moved on only when it fires (not on every request): closed when nothing
        was heard for _FAST_KEEPALIVE_S, else waits out the rest from the latest bytes."""
        self._idle = None
        left = self._heard + _FAST_KEEPALIVE_S - self._loop.time()
        if left > 0:
            self._wait_idle(left)
        elif not self._gone:
            self._gone = True
            self._transport.close()

    def eof_received(self):
        return None  # close the transport (aiohttp, on EOF with nothing in flight, does the same)

    def data_received(self, data: bytes) -> None:
        if self._gone:
            return
        self._heard = self._loop.time()  # a client mid-request or between requests: idle from its latest bytes on
        buf = self._buf
        buf += data
        while buf:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 8190:  # a head longer than aiohttp's line limit: its answer
                    self._hand_off()
                return
            head = self._fast_head(bytes(buf[:end]))
            if head is None:
                self._hand_off()
                return
            path, length, close = head
            start = end + 4
            if len(buf) < start + length:
                return  # the rest of the body is on its way
            raw = bytes(buf[start:start + length])
            del buf[:start + length]
            try:
                status, text = self._post(path, raw)
            except Exception as e:  # noqa: BLE001 - post_inline answers errors itself; this is a last resort
                status, text = 500, json.dumps({"error": f"{type(e).__name__}: {e}"})
            self._write(status, text.encode("utf-8"), close)
            if close:
                self._gone = True
                self._transport.close()
                return

    def _fast_head(self, head: bytes):
        """(path, content length, close after) for a request this protocol answers, else None."""
        got = _HEADS.get(head, _UNSEEN)
        if got is _UNSEEN:  # a client sends the same head again and again: parsed once
            got = _parse_head(head)
            if len(_HEADS) >= _HEADS_MAX:
                _HEADS.clear()
            _HEADS[head] = got
        if got is None or got[1] > self._limit:
            return None
        return got

    def _write(self, status: int, body: bytes, close: bool) -> None:
        self._transport.write(b"".join((
            _STATUS_LINES.get(status) or _status_line(status),
            b"Content-Type: application/json; charset=utf-8\r\nContent-Length: ", str(len(body)).encode(),
            b"\r\nDate: ", _http_date(), b"\r\nServer: ", _server_software(),
            b"\r\nConnection: close\r\n" if close else b"\r\n", self._extra, b"\r\n", body)))

    def _hand_off(self) -> None:
        """From here on the connection is aiohttp's, starting with the bytes not answered yet."""
        self._gone = True
        self._stop_idle()
        transport, rest = self._transport, bytes(self._buf)
        self._buf = bytearray()
        self._conns.discard(transport)
        handler = self._make_fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if rest:
            handler.data_received(rest)


def _parse_head(head: bytes):
    """(path, content length, close after) for a plain HTTP/1.1 POST /v1/... head with a Content-Length, else
    None (what _FastV1Protocol hands to aiohttp)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        return None
    target = parts[1]
    # a plain /v1/ path: nothing aiohttp's URL handling (yarl) would decode or normalize first
    if target[:4] not in (b"/v1/", b"/V1/") or _FAST_TARGET.fullmatch(target) is None or b"/." in target:
        return None
    length, close = None, False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
            return None  # not a plain header line (obs-fold, a space before the colon): aiohttp judges
        name = name.lower()
        value = value.strip()
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif name == b"connection":
            tokens = {t.strip() for t in value.lower().split(b",")}
            if b"upgrade" in tokens:
                return None
            close = b"close" in tokens
        elif name in (b"transfer-encoding", b"expect", b"upgrade"):
            return None
    if length is None:
        return None
    return target.decode("ascii"), length, close


_FAST_MAX_BODY = 1 << 20
_HEADS: dict = {}     # request head -> _parse_head's answer, shared by every connection in the process
_HEADS_MAX = 256      # cleared when full (a client varying its head on every request gains nothing here)
_UNSEEN = object()
_FAST_KEEPALIVE_S = 75.0  # aiohttp's keepalive_timeout: a connection silent this long is closed
_FAST_TARGET = re.compile(rb"(?:/[A-Za-z0-9_.:~-]+)+")  # no "%", "?", "#", "//", no trailing "/"
_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    import http
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")
    return line


_DATE = [0, b""]


def _http_date() -> bytes:
    """The Date header's value, made once a second (what aiohttp does too)."""
    import time
    now = int(time.time())
    if now != _DATE[0]:
        from email.utils import formatdate
        _DATE[0], _DATE[1] = now, formatdate(now, usegmt=True).encode("ascii")
    return _DATE[1]


_SERVER = []


def _server_software() -> bytes:
    if not _SERVER:
        from aiohttp.http import SERVER_SOFTWARE
        _SERVER.append(SERVER_SOFTWARE.encode("latin-1"))
    return _SERVER[0]


# ----------------------------------------------------------------------------------------- LocalServer

class LocalServer:
    """TF Serving's API on this machine. Options as `tensorflow_model_server`'s flags:

    LocalServer(model_name="m", model_base_path="/models/m", port=0, rest_api_port=0)
    LocalServer(model_config_file="models.config", enable_batching=True)
    LocalServer(model_config_file="models.config", model_config_file_poll_wait_seconds=60)  # re-read it
    LocalServer(..., monitoring_config_file="monitoring.config")  # Prometheus metrics on the REST port
    LocalServer(..., rest_api_enable_cors_support=True)  # TF Serving's CORS headers on every /v1/ answer

    port / rest_api_port: 0 picks a free port (read `.grpc_port` / `.rest_port` after start);
    rest_api_port=None disables REST. Use as a context manager, or `.start()` / `.stop()`.
    """

    def __init__(self, model_name: str | None = None, model_base_path: str | None = None, *,
                 model_config_file: str | None = None, port: int = 0, rest_api_port: int | None = 0,
                 host: str = "127.0.0.1", enable_batching: bool = False, batching_parameters_file: str | None = None,
                 file_system_poll_wait_seconds: float = 1.0, model_config_file_poll_wait_seconds: float = 0,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 grpc_workers: int = 8, rest_in_thread_pool: bool | None = None,
                 log: Callable[[str], None] | None = None, monitoring_config_file: str | None = None,
                 rest_api_enable_cors_support: bool = False):
        if model_config_file:
            if model_name or model_base_path:
                raise ConfigError("give either --model_config_file or --model_name/--model_base_path, not both")
            self.settings = parse_model_config_file(model_config_file)
        elif model_base_path:
            self.settings = [ModelSettings(name=model_name or "default", base_path=str(model_base_path))]
        else:
            raise ConfigError("no model: give --model_base_path (and --model_name) or --model_config_file")
        if batching_parameters_file and not enable_batching:
            raise ConfigError("--batching_parameters_file needs --enable_batching")
        self.batching = parse_batching_parameters(batching_parameters_file) if enable_batching else None
        # --monitoring_config_file: the path Prometheus metrics are served at, None when not enabled
        self.metrics_path = None
        if monitoring_config_file:
            from serving.monitoring import parse_monitoring_config
            self.metrics_path = parse_monitoring_config(monitoring_config_file)
        self.metrics = None  # serving.monitoring.ServingMetrics once started with metrics enabled
        self.host = host
        self._port = port
        self._rest_port_req = rest_api_port
        self.poll_wait_s = file_system_poll_wait_seconds
        self.model_config_file = model_config_file  # without one the poll flag is ignored, as TF Serving
        self.config_poll_wait_s = model_config_file_poll_wait_seconds
        self.max_request_bytes = int(max_request_bytes)
        self.cors = bool(rest_api_enable_cors_support)  # --rest_api_enable_cors_support
        self.grpc_workers = grpc_workers
        # REST predict runs on a thread pool (needed for batching and for calls that take long); without
        # batching a tiny model is answered faster on the event loop itself. None: pool only when batching.
        self.rest_in_thread_pool = enable_batching if rest_in_thread_pool is None else rest_in_thread_pool
        self._log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.grpc_port: int | None = None
        self.rest_port: int | None = None
        self.manager: ModelManager | None = None
        self._grpc = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rest_thread: threading.Thread | None = None
        self._runner = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._started = False

    # -- lifecycle
    def start(self) -> "LocalServer":
        if self._started:
            return self
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        import grpc
        if self.metrics_path:  # before the first load: batchers are made with the versions
            from serving.monitoring import ServingMetrics
            self.metrics = ServingMetrics(lambda: self.manager, self.batching is not None, self.metrics_path)
            if self.batching is not None:
                self.batching.observer = self.metrics
            if self._rest_port_req is None:
                self._log("--monitoring_config_file: metrics are served on the REST port, which is disabled")
        self.manager = ModelManager(self.settings, self.batching, self.poll_wait_s, self._log)
        self.manager.start()
        if self.config_poll_wait_s and self.config_poll_wait_s > 0:
            self.manager.poll_config_file(self.model_config_file, self.config_poll_wait_s)
        core = Core(self.manager, self.metrics)
        pred, model_svc, (pgrpc, mgrpc) = _make_servicers(core)
        opts = [("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE),
                ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE), ("grpc.so_reuseport", 0)]
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=self.grpc_workers,
                                                            thread_name_prefix="grpc"), options=opts)
        pgrpc.add_PredictionServiceServicer_to_server(pred, self._grpc)
        mgrpc.add_ModelServiceServicer_to_server(model_svc, self._grpc)
        from serving.v2_grpc import add_to_server  # the Open Inference Protocol v2 gRPC API on the same port
        add_to_server(_LenientServer(self._grpc), core, self._log)  # garbage bytes: INVALID_ARGUMENT there too
        try:
            self.grpc_port = self._grpc.add_insecure_port(f"{_host_for_url(self.host)}:{self._port}")
        except RuntimeError as e:
            raise OSError(f"cannot bind gRPC to {self.host}:{self._port}: {e}") from e
        if not self.grpc_port:
            raise OSError(f"cannot bind gRPC to {self.host}:{self._port}")
        self._grpc.start()
        self._log(f"Running gRPC ModelServer at {self.host}:{self.grpc_port} ...")
        if self._rest_port_req is not None:
            self._start_rest(core)
            self._log(f"Exporting HTTP/REST API at:{self.host}:{self.rest_port} ...")

    def _start_rest(self, core: Core) -> None:
        from aiohttp import web
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self._rest_port_req))
        except OSError:
            sock.close()
            raise
        self.rest_port = sock.getsockname()[1]
        if self.rest_in_thread_pool:
            self._pool = futures.ThreadPoolExecutor(max_workers=max(8, self.grpc_workers), thread_name_prefix="rest")

        async def run_blocking(fn, *args):
            if self._pool is None:
                return fn(*args)
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

        hooks: dict = {}
        app = _make_rest_app(core, self.max_request_bytes, run_blocking, cors=self.cors, hooks=hooks)
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()
        self._loop = loop
        # predict answered on the event loop (no pool): the common POST /v1/... is read and answered by
        # _FastV1Protocol, everything else by aiohttp; with a pool, aiohttp takes every connection
        fast = self._pool is None
        fast_conns: set = set()

        def serve():
            asyncio.set_event_loop(loop)
            listener = None
            try:
                runner = web.AppRunner(app, access_log=None, handle_signals=False)
                loop.run_until_complete(runner.setup())
                if fast:
                    extra = b"".join(f"{k}: {v}\r\n".encode("latin-1")
                                     for k, v in (hooks["cors_headers"] or {}).items())
                    limit = min(_FAST_MAX_BODY, self.max_request_bytes)
                    listener = loop.run_until_complete(loop.create_server(
                        lambda: _FastV1Protocol(runner.server, hooks["post_inline"], limit, extra, fast_conns),
                        sock=sock, backlog=1024))
                else:
                    site = web.SockSite(runner, sock, backlog=1024)
                    loop.run_until_complete(site.start())
                self._runner = runner
            except BaseException as e:  # noqa: BLE001 - reported to start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            if listener is not None:
                listener.close()
                for t in list(fast_conns):  # aiohttp closes the connections it holds; these are ours
                    t.close()
            loop.run_until_complete(runner.cleanup())
            # what asyncio.run does before closing: a handler whose connection was lost during the shutdown
            # may still have its task pending (aiohttp forgets it at connection_lost); cancelled and awaited
            # here, it ends now instead of being destroyed pending with the loop
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._rest_thread = threading.Thread(target=serve, name="rest", daemon=True)
        self._rest_thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def stop(self) -> None:
        """Stop both front ends (in-flight calls get a second to finish), the poller and the batchers."""
        if self._loop is not None:
            loop, self._loop = self._loop, None
            if self._rest_thread is not None and self._rest_thread.is_alive():
                loop.call_soon_threadsafe(loop.stop)
                self._rest_thread.join(timeout=10)
            self._rest_thread = None
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait(5)
            self._grpc = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self.manager is not None:
            self.manager.stop()
        self._started = False

    def __enter__(self) -> "LocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- readiness
    def wait_until_available(self, model_name: str, version: int | None = None, timeout_s: float = 60.0) -> None:
        """Poll GetModelStatus over gRPC until the version (default: any) is AVAILABLE; a TimeoutError names
        the model and the last state seen."""
        from .client import ServingClient
        if self.grpc_port is None:
            raise RuntimeError("the server is not started")
        with ServingClient(_host_for_url(self.host), grpc_port=self.grpc_port) as client:
            client.wait_until_available(model_name, version=version, timeout_s=timeout_s)


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
