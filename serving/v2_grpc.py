"""The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService`, on the same port as
TF Serving's PredictionService / ModelService (see LocalServer._start in serving/server.py).

The service is KServe's grpc_predict_v2.proto (serving/proto/, stubs from serving/v2_proto.py) over the
same Core as everything else, answering as the v2 REST routes of serving/v2.py do:

  ServerLive      live = true
  ServerReady     ready = false while a configured model has no AVAILABLE version (V2.server_ready)
  ModelReady      V2.model_ready; an unknown model or version is NOT_FOUND, a known one not loaded is false
  ServerMetadata  V2.server_metadata
  ModelMetadata   V2.model_metadata: the default signature's tensors, v2 datatypes, -1 for a variable dim
  ModelInfer      the default signature, checked input by input with the REST route's checks and messages

Tensor data comes either in each input's `contents` (the typed field of its datatype: fp32_contents,
int_contents for INT8/16/32, int64_contents, uint_contents for UINT8/16/32, uint64_contents, fp64_contents,
bool_contents, bytes_contents) or, for all inputs at once, in `raw_input_contents`: one entry per input in
the order of `inputs`, flat row-major little-endian values; a BYTES tensor in raw form is each element's
4-byte little-endian length then its bytes (the convention of Triton and KServe's clients). FP16 and BF16
have no typed field and must come raw. Outputs come in `contents`, or all in `raw_output_contents` (in the
order of `outputs`, with no `contents`: the protocol forbids mixing) when the request sent raw inputs or
an output is FP16/BF16. BYTES are bytes here, not UTF-8 text as in JSON.

Errors are gRPC statuses with the REST route's messages: INVALID_ARGUMENT where REST answers 400, NOT_FOUND
where it answers 404, INTERNAL for a failure of the server. With metrics enabled each ModelInfer is counted
under entrypoint V2_GRPC, api ModelInfer (serving/monitoring.py).

V2.infer itself is not called for ModelInfer: it takes and gives JSON values, where gRPC carries numpy-able
numbers and arbitrary bytes. Its per-input checks (`_to_array`) are, so the two cannot drift apart there.
"""
from __future__ import annotations

import struct
import sys
from typing import Callable

import numpy as np

from serving.models import DEFAULT_SIGNATURE, RequestError
from serving.v2 import _TO_V2, V2, _bad, _parse_version, _to_array, v2_datatype

# datatype -> the InferTensorContents field that carries it (FP16 / BF16: none, raw only)
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                  "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                  "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                  "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
# the numpy type of each numeric field's values (range checks against the datatype come from _to_array)
_FIELD_NP = {"bool_contents": np.bool_, "int_contents": np.int32, "int64_contents": np.int64,
             "uint_contents": np.uint32, "uint64_contents": np.uint64, "fp32_contents": np.float32,
             "fp64_contents": np.float64}


def _version(v: str) -> str | None:
    return v or None  # proto3: an empty version is "not given", the newest AVAILABLE one answers


def unpack_bytes(name: str, raw: bytes) -> list[bytes]:
    """A raw BYTES tensor (each element: uint32 little-endian length, then its bytes) -> its elements."""
    out, i, n = [], 0, len(raw)
    while i < n:
        if i + 4 > n:
            raise _bad(f"input {name!r}: raw BYTES contents end inside an element's 4-byte length "
                       f"(at byte {i} of {n})")
        (k,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + k > n:
            raise _bad(f"input {name!r}: raw BYTES element {len(out)} says {k} bytes, {n - i} are left")
        out.append(bytes(raw[i:i + k]))
        i += k
    return out


def pack_bytes(values) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


def _little_endian(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr)
    if sys.byteorder == "big" and arr.dtype.itemsize > 1:
        arr = arr.byteswap()
    return arr.tobytes()


def _input_values(inp, raw: bytes | None, sig):
    """One InferInputTensor's values, flat: a numpy array, or a list of bytes for BYTES. None when the input
    is unknown or of the wrong datatype: `_to_array` then refuses it, with REST's message, before it looks
    at the data."""
    spec = sig.inputs.get(inp.name)
    if spec is None or inp.datatype != v2_datatype(spec.dtype.name):
        return None
    dt = inp.datatype
    if raw is not None:
        if dt == "BYTES":
            return unpack_bytes(inp.name, raw)
        np_dt = np.dtype(sig.input_np[inp.name])
        if len(raw) % np_dt.itemsize:
            raise _bad(f"input {inp.name!r}: raw_input_contents holds {len(raw)} bytes, not a whole number of "
                       f"{dt} values ({np_dt.itemsize} bytes each)")
        arr = np.frombuffer(raw, dtype=np_dt)
        return arr.byteswap() if sys.byteorder == "big" and np_dt.itemsize > 1 else arr
    field = CONTENTS_FIELD.get(dt)
    if field is None:
        raise _bad(f"input {inp.name!r} is {dt}, which InferTensorContents has no field for: send it in "
                   f"raw_input_contents")
    other = [f.name for f, _ in inp.contents.ListFields() if f.name != field]
    if other:
        raise _bad(f"input {inp.name!r} is {dt}: its values go in contents.{field}, not {', '.join(other)}")
    values = getattr(inp.contents, field)
    return list(values) if dt == "BYTES" else np.array(values, dtype=_FIELD_NP[field])


def _to_arrays(request, sig, model: str) -> dict[str, np.ndarray]:
    """The request's inputs -> {name: array of the signature's dtype in the given shape}, with the checks
    (and messages) of the REST route."""
    if not request.inputs:
        raise _bad("'inputs' must be a non-empty list of input tensors")
    raw = list(request.raw_input_contents)
    if raw:
        if len(raw) != len(request.inputs):
            raise _bad(f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs: the "
                       f"protocol wants one per input, in the order of 'inputs'")
        given = [i.name for i in request.inputs if i.HasField("contents")]
        if given:
            raise _bad(f"input(s) {given} have 'contents' while the request has raw_input_contents: the protocol "
                       f"allows one or the other")
    arrays: dict[str, np.ndarray] = {}
    for i, inp in enumerate(request.inputs):
        values = _input_values(inp, raw[i] if raw else None, sig)
        is_bytes = isinstance(values, list)
        # BYTES: _to_array judges a placeholder of the same count (it reads JSON text); the bytes go in after
        data = np.full(len(values), "", dtype="U1") if is_bytes else ([] if values is None else values)
        k, arr = _to_array({"name": inp.name, "shape": list(inp.shape), "datatype": inp.datatype, "data": data},
                           sig, model)
        if is_bytes:
            flat = np.empty(len(values), dtype=object)
            flat[:] = values
            arr = flat.reshape(arr.shape)
        if k in arrays:
            raise _bad(f"input {k!r} is given more than once")
        arrays[k] = arr
    sig.check_names(arrays)  # a missing input, named with what the signature expects
    return arrays


def _output(name: str, arr: np.ndarray) -> tuple[str, list | np.ndarray]:
    """An output array -> (v2 datatype, flat values: list of bytes for BYTES, else the array)."""
    if arr.dtype.kind in "OSU":
        vals = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in arr.ravel().tolist()]
        return "BYTES", vals
    datatype = _TO_V2.get(arr.dtype.name)
    if datatype is None:
        raise RequestError("INTERNAL", f"output {name!r} has dtype {arr.dtype.name}, which has no v2 datatype")
    return datatype, arr


class InferenceCalls:
    """The answers of GRPCInferenceService as plain functions of (Core, request message) -> response message,
    raising RequestError: the servicer below only maps them to gRPC."""

    def __init__(self, core, pb2):
        self.core = core
        self.v2 = V2(core)
        self.pb2 = pb2

    def server_live(self, request):
        return self.pb2.ServerLiveResponse(live=True)

    def server_ready(self, request):
        return self.pb2.ServerReadyResponse(ready=self.v2.server_ready()["ready"])

    def model_ready(self, request):
        return self.pb2.ModelReadyResponse(ready=self.v2.model_ready(request.name, _version(request.version))["ready"])

    def server_metadata(self, request):
        m = self.v2.server_metadata()
        return self.pb2.ServerMetadataResponse(name=m["name"], version=m["version"], extensions=m["extensions"])

    def model_metadata(self, request):
        m = self.v2.model_metadata(request.name, _version(request.version))
        resp = self.pb2.ModelMetadataResponse(name=m["name"], versions=m["versions"], platform=m["platform"])
        for which in ("inputs", "outputs"):
            for t in m[which]:
                getattr(resp, which).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    def model_infer(self, request):
        name = request.model_name
        servable = self.core.manager.resolve(name, _parse_version(name, _version(request.model_version)))
        sig = servable.signature(DEFAULT_SIGNATURE)
        arrays = _to_arrays(request, sig, name)
        names = list(dict.fromkeys(o.name for o in request.outputs))
        unknown = [o for o in names if o not in sig.outputs]
        if unknown:
            raise _bad(f"unknown output(s) {unknown} for model {name!r}; outputs: {sig.outputs}")
        out = self.core.predict(servable, sig, arrays, names)
        resp = self.pb2.ModelInferResponse(model_name=name, model_version=str(servable.version), id=request.id)
        converted = [(k, out[k].shape, *_output(k, out[k])) for k in (names or sorted(out))]
        raw = bool(request.raw_input_contents) or any(dt not in CONTENTS_FIELD for _, _, dt, _ in converted)
        for k, shape, datatype, values in converted:
            t = resp.outputs.add(name=k, datatype=datatype, shape=list(shape))
            if raw:
                resp.raw_output_contents.append(pack_bytes(values) if datatype == "BYTES" else _little_endian(values))
            else:
                getattr(t.contents, CONTENTS_FIELD[datatype]).extend(
                    values if datatype == "BYTES" else values.ravel().tolist())
        return resp


def make_servicer(core, pb2, pb2_grpc):
    """A GRPCInferenceServiceServicer over `core` (serving.server.Core)."""
    import grpc
    calls = InferenceCalls(core, pb2)
    metrics = core.metrics  # serving/monitoring.py, or None

    def answer(fn, request, context, metered: bool = False):
        from serving.server import _Undecodable
        if isinstance(request, _Undecodable):  # bytes that are no request message: the caller's error
            if metered:
                metrics.finish("V2_GRPC", "ModelInfer", "", None, "", "INVALID_ARGUMENT", metrics.begin())
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        t0 = metrics.begin() if metered else 0.0
        code = "OK"
        try:
            return fn(request)
        except RequestError as e:
            code = e.code
            context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN), e.message)
        except Exception as e:  # noqa: BLE001 - an answer, never a dead worker
            code = "INTERNAL"
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        finally:  # every infer counted once, errors under their code, as the REST route's
            if metered:
                metrics.finish("V2_GRPC", "ModelInfer", request.model_name, _version(request.model_version), "",
                               code, t0)

    class GRPCInferenceService(pb2_grpc.GRPCInferenceServiceServicer):
        def ServerLive(self, request, context):
            return answer(calls.server_live, request, context)

        def ServerReady(self, request, context):
            return answer(calls.server_ready, request, context)

        def ModelReady(self, request, context):
            return answer(calls.model_ready, request, context)

        def ServerMetadata(self, request, context):
            return answer(calls.server_metadata, request, context)

        def ModelMetadata(self, request, context):
            return answer(calls.model_metadata, request, context)

        def ModelInfer(self, request, context):
            return answer(calls.model_infer, request, context, metered=metrics is not None)

    return GRPCInferenceService()


def add_to_server(server, core, log: Callable[[str], None]) -> bool:
    """Register GRPCInferenceService on a grpc.server. Without grpcio-tools (its stubs cannot be generated)
    the error is logged and TF Serving's own services still serve: False."""
    from serving.v2_proto import StubError, load
    try:
        pb2, pb2_grpc = load()
    except StubError as e:
        log(f"the Open Inference Protocol v2 gRPC service (inference.GRPCInferenceService) is not served: {e}")
        return False
    pb2_grpc.add_GRPCInferenceServiceServicer_to_server(make_servicer(core, pb2, pb2_grpc), server)
    return True
