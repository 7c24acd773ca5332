"""The blessing: a model is blessed for serving when what the server answers equals what the original
model computes, on the bundle's stored parity inputs, over every transport. TFX's InfraValidator stops
at "the server loaded it and answered"; this compares the served values.

The served model is wrapped as a runner (`ServedRunner`) so the verify path does the rest: rows fed
as batch 1, the largest batch, then the rest; model inputs and outputs matched to the served
signature by meaning; the comparison under the bundle's tolerances, as a ParityRecord.
Works against any server speaking TF Serving's API (ours, or the real one in a container). The
"v2-rest" transport (runtime "tf-serving-v2-rest") replays the same inputs over the Open Inference
Protocol (KServe v2) REST API, which only the local server (`python -m serving`) speaks: ask for it in
`transports`; the default stays what the real server answers.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from exporters.base import Artifact, ArtifactLoadError, BaseRunner
from exporters.bundle import Bundle
from exporters.verify import check_artifact
from parity.compare import ParityRecord, tolerance_for
from parity.signature import Signature, TensorSpec

from .client import ServingClient, ServingError

FORMAT = "tf_serving"  # the records' format: kept apart from the SavedModel's own verify records
TRANSPORTS = ("grpc", "rest")  # the default: both speak TF Serving's API, so a container blesses too
ALL_TRANSPORTS = TRANSPORTS + ("v2-rest",)


class ServedRunner(BaseRunner):
    """One served model version, as a runner: its signature from the server's metadata, its inputs in
    the as-trained layout (an input the converter transposed, details['input_transpose'], is transposed
    here as the SavedModel runner does), each call one Predict over `transport`."""

    def __init__(self, client: ServingClient, artifact: Artifact, model_name: str, version: int | None,
                 transport: str):
        self.client, self.model_name, self.version, self.transport = client, model_name, version, transport
        self.runtime = f"tf-serving-{transport}"
        try:
            meta = client.metadata(model_name, version=version, transport=transport)["serving_default"]
        except (ServingError, KeyError) as e:
            raise ArtifactLoadError(f"served model {model_name} (version {version}) over {transport}: no "
                                    f"serving_default signature in its metadata: {e}") from e
        perm = (artifact.details or {}).get("input_transpose")
        self._perm = tuple(perm) if perm and len(meta["inputs"]) == 1 else None

        def spec(name: str, t: dict, perm=None) -> TensorSpec:
            shape = [None if d is None or d < 0 else int(d) for d in (t.get("shape") or [None])]
            if perm is not None:  # told back in the as-trained order its callers feed
                shape = [shape[i] for i in np.argsort(perm)]
            return TensorSpec(name, t["dtype"], tuple(shape))
        signature = Signature(tuple(spec(k, t, self._perm) for k, t in meta["inputs"].items()),
                              tuple(spec(k, t) for k, t in sorted(meta["outputs"].items())))
        super().__init__(artifact, signature)

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._perm is not None:
            feed = {k: np.ascontiguousarray(np.transpose(v, self._perm)) for k, v in feed.items()}
        return self.client.predict(self.model_name, feed, version=self.version, transport=self.transport)


class _Served:
    """What check_artifact loads a runtime from: the server, over the transport the runtime names."""

    def __init__(self, client: ServingClient, model_name: str, version: int | None):
        self.client, self.model_name, self.version = client, model_name, version

    def load(self, artifact: Artifact, runtime: str) -> ServedRunner:
        return ServedRunner(self.client, artifact, self.model_name, self.version, runtime.removeprefix("tf-serving-"))


def bless(bundle: Bundle, client: ServingClient, *, model_name: str | None = None, version: int | None = None,
          transports: Iterable[str] = TRANSPORTS) -> list[ParityRecord]:
    """One record per transport: the served answers on the stored parity inputs against the reference
    outputs, under the bundle's SavedModel tolerance. A transport that fails to answer is a failed record."""
    from parity.signature import Signature as ModelSignature
    artifact = next((a for a in bundle.artifacts("saved_model") if a.variant == "fp32"), None)
    if artifact is None:
        raise ArtifactLoadError(f"model {bundle.model}: the bundle holds no SavedModel to serve")
    served = _Served(client, model_name or bundle.model, version)
    record_as = dataclasses.replace(artifact, format=FORMAT)
    tol = tolerance_for("fp32", "saved_model", bundle.manifest.get("tolerances") or {})
    records = []
    for transport in transports:
        rec, _, _ = check_artifact(served, record_as, f"tf-serving-{transport}", bundle.reference(), tol,
                                   task=bundle.manifest["task"], max_batch=int(bundle.manifest.get("max_batch", 16)),
                                   model=bundle.model, model_signature=ModelSignature.from_json(bundle.manifest["signature"]))
        records.append(rec)
    return records
