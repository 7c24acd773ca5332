"""A small client for TF Serving (the real one or `python -m serving`): gRPC through tensorflow-serving-api's
stubs, REST through plain urllib (columnar form). Importing this module is light: gRPC, TensorFlow and
tensorflow-serving-api are imported on first use of the gRPC transport. transport="v2-rest" speaks the
Open Inference Protocol (KServe v2) REST API that `python -m serving` serves on its REST port too (the
default signature only; the real tensorflow_model_server has no v2 API).

    c = ServingClient("127.0.0.1", grpc_port=8500, rest_port=8501)
    y = c.predict("m", {"x": np.ones((2, 3), np.float32)})["y"]
    c.status("m")        # [VersionStatus(version=1, state='AVAILABLE', error_code='OK', error_message='')]
    c.metadata("m")      # {"serving_default": {"method_name": ..., "inputs": {"x": {"dtype": "float32", "shape": [-1, 3]}}, ...}}

Errors raise ServingError with .code (canonical name, e.g. "NOT_FOUND"), .http_status (REST) or
.grpc_code (grpc.StatusCode), and the server's message.
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

_HTTP_TO_CODE = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 409: "ABORTED", 413: "RESOURCE_EXHAUSTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
                 500: "INTERNAL", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_TF_DTYPES = {"DT_FLOAT": "float32", "DT_DOUBLE": "float64", "DT_INT32": "int32", "DT_INT64": "int64",
              "DT_INT16": "int16", "DT_INT8": "int8", "DT_UINT8": "uint8", "DT_UINT16": "uint16",
              "DT_UINT32": "uint32", "DT_UINT64": "uint64", "DT_BOOL": "bool", "DT_STRING": "string",
              "DT_HALF": "float16", "DT_BFLOAT16": "bfloat16", "DT_COMPLEX64": "complex64",
              "DT_COMPLEX128": "complex128"}


class ServingError(Exception):
    """An error answer: `code` is the canonical code name; `http_status` / `grpc_code` say which transport."""

    def __init__(self, code: str, message: str, *, http_status: int | None = None, grpc_code: Any = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status
        self.grpc_code = grpc_code


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""


class ServingClient:
    def __init__(self, host: str = "127.0.0.1", grpc_port: int | None = None, rest_port: int | None = None, *,
                 timeout_s: float = 30.0):
        if grpc_port is None and rest_port is None:
            raise ValueError("give grpc_port, rest_port or both")
        self.host, self.grpc_port, self.rest_port, self.timeout_s = host, grpc_port, rest_port, timeout_s
        self._channel = None
        self._stubs = None
        self._lock = threading.Lock()
        self._rest_dtypes: dict[tuple, dict[str, str]] = {}

    # ------------------------------------------------------------------------------------------ public
    def predict(self, model: str, inputs: Mapping[str, np.ndarray], version: int | None = None,
                label: str | None = None, signature_name: str = "serving_default",
                transport: str = "grpc") -> dict[str, np.ndarray]:
        """Run a signature; inputs and outputs keyed by the signature's names."""
        if transport == "grpc":
            return self._grpc_predict(model, inputs, version, label, signature_name)
        if transport == "rest":
            return self._rest_predict(model, inputs, version, label, signature_name)
        if transport == "v2-rest":
            self._v2_only(label, signature_name)
            return self.v2_infer(model, inputs, version)
        raise ValueError(f"transport must be 'grpc', 'rest' or 'v2-rest', got {transport!r}")

    def status(self, model: str, version: int | None = None, label: str | None = None,
               transport: str | None = None) -> list[VersionStatus]:
        """GetModelStatus: every version the server knows of (or the one asked for)."""
        if self._pick(transport) == "grpc":
            from tensorflow_serving.apis import get_model_status_pb2
            req = get_model_status_pb2.GetModelStatusRequest()
            self._spec(req.model_spec, model, version, label, None)
            resp = self._call("GetModelStatus", req)
            from tensorflow.core.protobuf import error_codes_pb2
            return [VersionStatus(int(s.version), get_model_status_pb2.ModelVersionStatus.State.Name(s.state),
                                  error_codes_pb2.Code.Name(s.status.error_code), s.status.error_message)
                    for s in resp.model_version_status]
        obj = self._rest("GET", self._path(model, version, label))
        return [VersionStatus(int(s["version"]), s["state"], s.get("status", {}).get("error_code", "OK"),
                              s.get("status", {}).get("error_message", "")) for s in obj["model_version_status"]]

    def metadata(self, model: str, version: int | None = None, label: str | None = None,
                 transport: str | None = None) -> dict[str, dict]:
        """Signatures: {name: {"method_name", "inputs": {k: {"dtype", "shape"}}, "outputs": {...}}}."""
        if self._pick(transport) == "grpc":
            from google.protobuf import json_format
            from tensorflow_serving.apis import get_model_metadata_pb2
            req = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
            self._spec(req.model_spec, model, version, label, None)
            resp = self._call("GetModelMetadata", req)
            sdm = get_model_metadata_pb2.SignatureDefMap()
            resp.metadata["signature_def"].Unpack(sdm)
            raw = json_format.MessageToDict(sdm, preserving_proto_field_name=True)
        elif transport == "v2-rest":
            self._v2_only(label, None)
            return {"serving_default": self.v2_signature(model, version)}
        else:
            raw = self._rest("GET", self._path(model, version, label) + "/metadata")["metadata"]["signature_def"]
        return {name: _simplify_signature(sd) for name, sd in raw.get("signature_def", {}).items()}

    def wait_until_available(self, model: str, version: int | None = None, timeout_s: float = 60.0) -> None:
        """Poll GetModelStatus until the version (default: any) is AVAILABLE, not merely until a port is
        open; a TimeoutError names the model and the last state seen."""
        import time
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            try:
                states = self.status(model, version=version)
                if any(s.state == "AVAILABLE" for s in states):
                    return
                last = ", ".join(f"version {s.version}: {s.state}" + (f" ({s.error_message})" if s.error_message else "")
                                 for s in states)
            except ServingError as e:
                last = f"{e.code}: {e.message}"
            except OSError as e:  # nothing listening yet (REST)
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() >= deadline:
                what = f"model {model!r}" + (f" version {version}" if version is not None else "")
                raise TimeoutError(f"{what} is not AVAILABLE after {timeout_s:g} s; last state: {last}")
            time.sleep(0.05)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = self._stubs = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --------------------------------------------------------------------------------------------- gRPC
    def _pick(self, transport):
        if transport is None:
            return "grpc" if self.grpc_port is not None else "rest"
        if transport not in ("grpc", "rest", "v2-rest"):
            raise ValueError(f"transport must be 'grpc', 'rest' or 'v2-rest', got {transport!r}")
        return transport

    def _stub(self):
        if self._stubs is None:
            with self._lock:
                if self._stubs is None:
                    if self.grpc_port is None:
                        raise ValueError("this client has no grpc_port")
                    import grpc
                    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
                    host = f"[{self.host}]" if ":" in self.host else self.host
                    self._channel = grpc.insecure_channel(f"{host}:{self.grpc_port}", options=[
                        ("grpc.max_receive_message_length", 2 ** 31 - 1),
                        ("grpc.max_send_message_length", 2 ** 31 - 1)])
                    self._stubs = (prediction_service_pb2_grpc.PredictionServiceStub(self._channel),
                                   model_service_pb2_grpc.ModelServiceStub(self._channel))
        return self._stubs

    def _call(self, method: str, req):
        import grpc
        pred, models = self._stub()
        stub = models if method == "GetModelStatus" else pred
        try:
            return getattr(stub, method)(req, timeout=self.timeout_s)
        except grpc.RpcError as e:
            raise ServingError(e.code().name, e.details() or "", grpc_code=e.code()) from None

    @staticmethod
    def _spec(spec, model, version, label, signature_name):
        spec.name = model
        if version is not None and label is not None:
            raise ValueError("give version or label, not both")
        if version is not None:
            spec.version.value = int(version)
        if label is not None:
            spec.version_label = label
        if signature_name:
            spec.signature_name = signature_name

    def _grpc_predict(self, model, inputs, version, label, signature_name):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2
        req = predict_pb2.PredictRequest()
        self._spec(req.model_spec, model, version, label, signature_name)
        for k, v in inputs.items():
            req.inputs[k].CopyFrom(tf.make_tensor_proto(v))
        resp = self._call("Predict", req)
        return {k: tf.make_ndarray(v) for k, v in resp.outputs.items()}

    # --------------------------------------------------------------------------------------------- REST
    def _path(self, model, version, label):
        if version is not None and label is not None:
            raise ValueError("give version or label, not both")
        p = f"/v1/models/{urllib.parse.quote(model, safe='')}"
        if version is not None:
            p += f"/versions/{int(version)}"
        elif label is not None:
            p += f"/labels/{urllib.parse.quote(label, safe='')}"
        return p

    def _rest(self, method: str, path: str, body: Any = None):
        if self.rest_port is None:
            raise ValueError("this client has no rest_port")
        host = f"[{self.host}]" if ":" in self.host else self.host
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{host}:{self.rest_port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                msg = json.loads(raw).get("error", "")
            except ValueError:
                msg = raw.decode("utf-8", "replace")
            raise ServingError(_HTTP_TO_CODE.get(e.code, "UNKNOWN"), msg, http_status=e.code) from None

    # ----------------------------------------------------------------------------- Open Inference (v2)
    @staticmethod
    def _v2_only(label, signature_name):
        # a v2 model is the default signature of a version; labels and other signatures have no v2 form
        if label is not None:
            raise ValueError("the v2 API has no version labels; give a version")
        if signature_name not in (None, "", "serving_default"):
            raise ValueError(f"the v2 API serves the default signature only, not {signature_name!r}")

    def _v2_path(self, model, version):
        p = f"/v2/models/{urllib.parse.quote(model, safe='')}"
        return p + (f"/versions/{int(version)}" if version is not None else "")

    def v2_signature(self, model: str, version: int | None = None) -> dict:
        """GET /v2/models/{m}[/versions/{v}], in metadata()'s signature form (dtype names, -1 dims)."""
        obj = self._rest("GET", self._v2_path(model, version))

        def tensors(ts):
            return {t["name"]: {"dtype": _V2_TO_DTYPE.get(t["datatype"], t["datatype"].lower()),
                                "shape": [int(d) for d in t["shape"]], "name": t["name"]} for t in ts}
        return {"method_name": "tensorflow/serving/predict", "inputs": tensors(obj["inputs"]),
                "outputs": tensors(obj["outputs"])}

    def v2_infer(self, model: str, inputs: Mapping[str, np.ndarray], version: int | None = None,
                 outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """POST /v2/models/{m}[/versions/{v}]/infer: numpy in, numpy out (flat JSON data, row-major)."""
        body: dict[str, Any] = {"inputs": [_v2_tensor(k, np.asarray(v)) for k, v in inputs.items()]}
        if outputs is not None:
            body["outputs"] = [{"name": o} for o in outputs]
        obj = self._rest("POST", self._v2_path(model, version) + "/infer", body)
        out = {}
        for o in obj["outputs"]:
            if o["datatype"] == "BYTES":
                arr = np.char.encode(np.asarray(o["data"], dtype=str), "utf-8").astype(object)
            else:
                arr = np.asarray(o["data"], dtype=_V2_TO_DTYPE[o["datatype"]])
            out[o["name"]] = arr.reshape(o["shape"])
        return out

    def _output_dtypes(self, model, version, label, signature_name) -> dict[str, str]:
        key = (model, version, label, signature_name)
        if key not in self._rest_dtypes:
            try:
                sigs = self.metadata(model, version, label, transport="rest")
                outs = sigs.get(signature_name, {}).get("outputs", {})
                self._rest_dtypes[key] = {k: v["dtype"] for k, v in outs.items()}
            except ServingError:
                return {}
        return self._rest_dtypes[key]

    def _rest_predict(self, model, inputs, version, label, signature_name):
        body = {"signature_name": signature_name, "inputs": {k: _to_json(np.asarray(v)) for k, v in inputs.items()}}
        obj = self._rest("POST", self._path(model, version, label) + ":predict", body)
        outs = obj["outputs"]
        dtypes = self._output_dtypes(model, version, label, signature_name)
        if not isinstance(outs, dict) or (len(dtypes) == 1 and set(outs) != set(dtypes)):
            outs = {next(iter(dtypes)) if len(dtypes) == 1 else "output_0": outs}
        return {k: _from_json(v, dtypes.get(k)) for k, v in outs.items()}


_V2_TO_DTYPE = {"BOOL": "bool", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
                "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64", "FP16": "float16",
                "FP32": "float32", "FP64": "float64", "BYTES": "string", "BF16": "bfloat16"}
_DTYPE_TO_V2 = {v: k for k, v in _V2_TO_DTYPE.items()}


def _v2_tensor(name: str, a: np.ndarray) -> dict:
    if a.dtype.kind in "OSU":  # v2's JSON BYTES are text
        text = a if a.dtype.kind == "U" else np.char.decode(a.astype(bytes), "utf-8")
        data, datatype = text.ravel().tolist(), "BYTES"
    else:
        datatype = _DTYPE_TO_V2.get(a.dtype.name)
        if datatype is None:
            raise ValueError(f"input {name!r}: dtype {a.dtype.name} has no v2 datatype")
        data = a.ravel().tolist()
    return {"name": name, "shape": list(a.shape), "datatype": datatype, "data": data}


def _to_json(a: np.ndarray):
    if a.dtype.kind in "OSU":
        return _b64_tree(a.tolist())
    return a.tolist()


def _b64_tree(v):
    import base64
    if isinstance(v, list):
        return [_b64_tree(x) for x in v]
    if isinstance(v, bytes):
        return {"b64": base64.b64encode(v).decode("ascii")}
    return v


def _from_json(v, dtype: str | None) -> np.ndarray:
    import base64

    def unb64(x):
        if isinstance(x, list):
            return [unb64(y) for y in x]
        if isinstance(x, dict) and "b64" in x:
            return base64.b64decode(x["b64"])
        return x.encode() if isinstance(x, str) else x

    if dtype == "string":
        return np.array(unb64(v), dtype=object)
    if dtype and dtype != "bfloat16":
        return np.asarray(v, dtype=dtype)
    return np.asarray(v)


def _simplify_signature(sd: Mapping) -> dict:
    def tensors(d):
        out = {}
        for k, t in (d or {}).items():
            shape = t.get("tensor_shape", {})
            dims = None if shape.get("unknown_rank") else [int(x.get("size", -1)) for x in shape.get("dim", [])]
            out[k] = {"dtype": _TF_DTYPES.get(t.get("dtype", ""), t.get("dtype", "")), "shape": dims,
                      "name": t.get("name", "")}
        return out
    return {"method_name": sd.get("method_name", ""), "inputs": tensors(sd.get("inputs")),
            "outputs": tensors(sd.get("outputs"))}
