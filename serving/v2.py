"""The Open Inference Protocol (KServe v2) over REST, served next to TF Serving's API by the same server.

Same port, same models, same Core as serving/server.py's TF Serving REST API; a v2 model is the
Servable's default serving signature (`serving_default`), its inputs and outputs named as in the
SignatureDef, TF dtypes shown as v2 datatypes.

  GET  /v2/health/live                                -> 200 {"live": true}
  GET  /v2/health/ready                               -> 200 {"ready": true}; 400 {"ready": false, "error"} while
                                                         a configured model has no AVAILABLE version
  GET  /v2                                            -> {"name", "version", "extensions": []}
  GET  /v2/models/{m}[/versions/{v}]                  -> {"name", "versions", "platform", "inputs", "outputs"}
  GET  /v2/models/{m}[/versions/{v}]/ready            -> 200 {"name", "ready": true}; 400 ... "ready": false
  POST /v2/models/{m}[/versions/{v}]/infer            {"id"?, "parameters"?, "inputs": [...], "outputs"?: [...]}
                                                      -> {"model_name", "model_version", "id"?, "outputs": [...]}

The protocol says a health answer is 200 for true and 4xx for false, so "not ready" is 400 (a
Kubernetes probe fails on it). Errors are {"error": "..."}: 400 for a bad request, 404 for an unknown
model, version or URL, 413 for a body over the server's limit. Tensor data is JSON only (flat row-major
or nested); the binary-data extension is not served. Without a version the newest AVAILABLE one answers,
as TF Serving's latest policy. A signature input of unknown rank is shown with shape [-1].
"""
from __future__ import annotations

import json
import math
import re
from typing import Callable

import numpy as np

from serving.models import DEFAULT_SIGNATURE, RequestError, Servable, Signature

SERVER_NAME = "serving (local TF Serving stand-in)"
SERVER_VERSION = "1"
PLATFORM = "tensorflow_savedmodel"  # Triton's platform name for a TF SavedModel

# numpy dtype name -> v2 datatype (TF's "string" is v2's BYTES)
_TO_V2 = {"bool": "BOOL", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
          "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "float16": "FP16",
          "float32": "FP32", "float64": "FP64", "string": "BYTES", "bfloat16": "BF16"}
DATATYPES = frozenset(_TO_V2.values())

_MODEL_URL = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<tail>/ready|/infer)?/?$")


def v2_datatype(tf_dtype_name: str) -> str:
    return _TO_V2.get(tf_dtype_name, tf_dtype_name.upper())


def _bad(message: str) -> RequestError:
    return RequestError("INVALID_ARGUMENT", message)


def _signature_tensors(servable: Servable, sig: Signature, which: str) -> list[dict]:
    """The SignatureDef's inputs or outputs as v2 $metadata_tensor objects, sorted by name."""
    import tensorflow as tf
    sd = servable.signature_defs.get(sig.name)
    out = []
    for name, info in sorted((getattr(sd, which) if sd is not None else {}).items()):
        shape = info.tensor_shape
        dims = [-1] if shape.unknown_rank else [-1 if d.size < 0 else int(d.size) for d in shape.dim]
        out.append({"name": name, "datatype": v2_datatype(tf.dtypes.as_dtype(info.dtype).name), "shape": dims})
    return out


def _parse_version(model: str, version: str | None) -> int | None:
    if version is None:
        return None
    if not version.isdigit():
        # v2 versions are strings; this server's are TF Serving's integers, so anything else is not there
        raise RequestError("NOT_FOUND", f"model {model!r} has no version {version!r}: versions are integers")
    return int(version)


def _to_array(inp, sig: Signature, model: str) -> tuple[str, np.ndarray]:
    """One $request_input -> (name, array of the signature's dtype, in the given shape). Shape against the
    signature is checked later by Signature.check_array, with TF Serving's message."""
    if not isinstance(inp, dict):
        raise _bad("each of 'inputs' must be a JSON object with name, shape, datatype and data")
    name = inp.get("name")
    if not isinstance(name, str):
        raise _bad("an input has no 'name' string")
    if name not in sig.inputs:
        raise _bad(f"unknown input {name!r} for model {model!r}: signature {sig.name!r} expects {sig.expected()}")
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise _bad(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
    spec = sig.inputs[name]
    want = v2_datatype(spec.dtype.name)
    got = inp.get("datatype")
    if got != want:
        what = f"datatype {got}" if isinstance(got, str) else f"no valid 'datatype' ({got!r})"
        raise _bad(f"input {name!r} has {what} but model {model!r} expects {want} (signature {sig.name!r}: "
                   f"{sig.describe_input(name)})")
    params = inp.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise _bad(f"input {name!r}: 'parameters' must be a JSON object")
    if params and "binary_data_size" in params:
        raise _bad(f"input {name!r}: the binary tensor data extension is not served; send 'data' as JSON")
    if "data" not in inp:
        raise _bad(f"input {name!r} has no 'data'")
    try:
        arr = np.asarray(inp["data"])
    except ValueError as e:  # ragged nesting
        raise _bad(f"input {name!r}: 'data' is not a rectangular array ({e})") from None
    n = math.prod(shape)  # Python ints: a huge shape is a clear 400, not an overflow
    if arr.size != n:
        raise _bad(f"input {name!r}: shape {shape} needs {n} values, 'data' holds {arr.size}")
    kind = arr.dtype.kind if arr.size else None  # empty data has no element type to judge
    if want == "BYTES":
        if kind not in (None, "U"):
            raise _bad(f"input {name!r} is BYTES but 'data' holds {arr.dtype.name} values, not strings")
        # the JSON form of BYTES is text; UTF-8 is what the model gets
        arr = np.char.encode(arr.astype(str), "utf-8").astype(object)
    else:
        np_want = sig.input_np[name]
        wkind = np.dtype(np_want).kind
        ok = (kind is None or (kind == "b" if wkind == "b" else kind in "iu" if wkind in "iu" else kind in "iuf"))
        if not ok:
            what = {"U": "strings", "O": "nulls or mixed values", "f": "non-integer numbers", "b": "booleans"}
            raise _bad(f"input {name!r} is {want} but 'data' holds {what.get(kind, arr.dtype.name)}")
        if wkind in "iu" and arr.size:
            info = np.iinfo(np_want)
            if arr.min() < info.min or arr.max() > info.max:
                raise _bad(f"input {name!r}: values out of range for {want}")
        arr = arr.astype(np_want, copy=False)
    return name, arr.reshape(shape)  # flat or nested, the data is row-major


def _to_output(name: str, arr: np.ndarray) -> dict:
    """One output array -> a $response_output (data flat, row-major)."""
    if arr.dtype.kind in "OS":
        try:
            data = np.char.decode(arr.astype(bytes), "utf-8").ravel().tolist()
        except UnicodeDecodeError:
            raise RequestError("INTERNAL", f"output {name!r} holds bytes that are not UTF-8: the JSON form of "
                               f"BYTES carries text only") from None
        datatype = "BYTES"
    elif arr.dtype.kind == "U":
        data, datatype = arr.ravel().tolist(), "BYTES"
    else:
        datatype = _TO_V2.get(arr.dtype.name)
        if datatype is None:
            raise RequestError("INTERNAL", f"output {name!r} has dtype {arr.dtype.name}, which has no v2 datatype")
        data = arr.ravel().tolist()
    return {"name": name, "datatype": datatype, "shape": list(arr.shape), "data": data}


class V2:
    """The v2 answers over a Core (serving.server.Core): plain functions returning JSON-able objects or
    raising RequestError, so the aiohttp handlers below only move bytes."""

    def __init__(self, core):
        self.core = core

    def server_ready(self) -> dict:
        # copies: the poller (and a config reload) change these dicts from other threads
        for name, model in list(self.core.manager.models.items()):
            if not any(st.state == "AVAILABLE" for st in list(model.statuses.values())):
                return {"ready": False, "error": f"model {name!r} has no AVAILABLE version"}
        return {"ready": True}

    def model_ready(self, name: str, version: str | None) -> dict:
        model = self.core.manager.get(name)  # NOT_FOUND for an unknown model
        v = _parse_version(name, version)
        if v is None:
            ready = any(st.state == "AVAILABLE" for st in list(model.statuses.values()))
        else:
            st = model.statuses.get(v)
            if st is None:
                raise RequestError("NOT_FOUND", f"model {name!r} has no version {v}; versions known: "
                                   f"{sorted(model.statuses)}")
            ready = st.state == "AVAILABLE" and v in model.snapshot.servables
        return {"name": name, "ready": ready}

    def server_metadata(self) -> dict:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": []}

    def model_metadata(self, name: str, version: str | None) -> dict:
        model = self.core.manager.get(name)
        servable = model.resolve(_parse_version(name, version))
        sig = servable.signature(DEFAULT_SIGNATURE)
        return {"name": name, "versions": [str(v) for v in sorted(model.snapshot.servables)],
                "platform": PLATFORM, "inputs": _signature_tensors(servable, sig, "inputs"),
                "outputs": _signature_tensors(servable, sig, "outputs")}

    def infer(self, name: str, version: str | None, body) -> dict:
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object with 'inputs'")
        servable = self.core.manager.resolve(name, _parse_version(name, version))
        sig = servable.signature(DEFAULT_SIGNATURE)
        req_id = body.get("id")
        if req_id is not None and not isinstance(req_id, str):
            raise _bad(f"'id' must be a string, got {type(req_id).__name__}")
        if body.get("parameters") is not None and not isinstance(body["parameters"], dict):
            raise _bad("'parameters' must be a JSON object")
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise _bad("'inputs' must be a non-empty JSON list of input tensors")
        arrays: dict[str, np.ndarray] = {}
        for inp in inputs:
            k, arr = _to_array(inp, sig, name)
            if k in arrays:
                raise _bad(f"input {k!r} is given more than once")
            arrays[k] = arr
        sig.check_names(arrays)  # a missing input, named with what the signature expects
        wanted = body.get("outputs")
        names: list[str] = []
        if wanted is not None:
            if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                       for o in wanted):
                raise _bad("'outputs' must be a JSON list of objects with a 'name'")
            names = list(dict.fromkeys(o["name"] for o in wanted))
            unknown = [o for o in names if o not in sig.outputs]
            if unknown:
                raise _bad(f"unknown output(s) {unknown} for model {name!r}; outputs: {sig.outputs}")
        out = self.core.predict(servable, sig, arrays, names)
        resp = {"model_name": name, "model_version": str(servable.version)}
        if req_id is not None:
            resp["id"] = req_id
        resp["outputs"] = [_to_output(k, out[k]) for k in (names or sorted(out))]
        return resp


_STATUS_CODES = {200: "OK", 400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED"}


def add_v2_routes(app, core, max_request_bytes: int, run_blocking: Callable) -> None:
    """Register the v2 REST routes on the aiohttp `app` (before its catch-all route)."""
    from aiohttp import web
    v2 = V2(core)

    def respond(status: int, obj) -> web.Response:
        return web.Response(status=status, text=json.dumps(obj), content_type="application/json")

    def answer(fn, *args) -> tuple[int, dict]:
        try:
            return 200, fn(*args)
        except RequestError as e:
            return e.http_status, {"error": e.message}
        except RecursionError:  # JSON nested deeper than the decoding of it can follow
            return 400, {"error": "JSON parse error: the request is nested too deeply"}
        except Exception as e:  # noqa: BLE001 - an answer, never a dropped connection
            return 500, {"error": f"{type(e).__name__}: {e}"}

    metrics = core.metrics  # serving/monitoring.py, or None: an infer is counted like any request

    def metered_infer(name: str, version: str | None, body) -> tuple[int, dict]:
        t0 = metrics.begin() if metrics is not None else 0.0
        status, obj = answer(v2.infer, name, version, body)
        if metrics is not None:
            metrics.finish("V2_REST", "infer", name, version, "", _STATUS_CODES.get(status, "INTERNAL"), t0)
        return status, obj

    def match(request: web.Request):
        m = _MODEL_URL.match(request.path)
        if m is None:
            return None
        return m.group("name"), m.group("version"), (m.group("tail") or "").lstrip("/")

    async def live(request: web.Request):
        return respond(200, {"live": True})

    async def ready(request: web.Request):
        status, obj = answer(v2.server_ready)
        if status == 200 and not obj["ready"]:
            status = 400  # the protocol: 4xx means false
        return respond(status, obj)

    async def server_metadata(request: web.Request):
        return respond(200, v2.server_metadata())

    async def model_get(request: web.Request):
        m = match(request)
        if m is None:
            return respond(404, {"error": f"Malformed request: GET {request.path}"})
        name, version, tail = m
        if tail == "infer":
            return respond(405, {"error": f"GET {request.path}: infer needs POST"})
        if tail == "ready":
            status, obj = answer(v2.model_ready, name, version)
            if status == 200 and not obj["ready"]:
                status = 400  # the protocol: 4xx means false
            return respond(status, obj)
        return respond(*answer(v2.model_metadata, name, version))

    async def model_post(request: web.Request):
        m = match(request)
        if m is None or m[2] != "infer":
            return respond(404, {"error": f"Malformed request: POST {request.path} (expected "
                                          f"/v2/models/<name>[/versions/<version>]/infer)"})
        if request.content_length is not None and request.content_length > max_request_bytes:
            return respond(413, {"error": f"request body of {request.content_length} bytes is over the limit of "
                                          f"{max_request_bytes} bytes"})
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return respond(413, {"error": f"request body is over the limit of {max_request_bytes} bytes"})
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
            return respond(400, {"error": f"JSON parse error: {e}"})
        name, version, _ = m
        return respond(*await run_blocking(metered_infer, name, version, body))

    app.router.add_route("GET", "/v2/health/live", live)
    app.router.add_route("GET", "/v2/health/ready", ready)
    app.router.add_route("GET", "/v2", server_metadata)
    app.router.add_route("GET", "/v2/", server_metadata)
    app.router.add_route("GET", "/v2/models/{tail:.*}", model_get)
    app.router.add_route("POST", "/v2/models/{tail:.*}", model_post)
