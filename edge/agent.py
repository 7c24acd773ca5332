"""The device agent: takes signed edge packages over HTTP, proves parity on the device, serves the
active version, switches atomically and rolls back.

    python -m edge.agent --root DIR --public-key edge_ed25519.pub.pem --token TOKEN [--host 127.0.0.1] [--port N]

Endpoints (a bearer token on every one but /health):

    POST /bundles     the package (.tar.gz) as the body, streamed to disk under a size limit. Verified
                      (edge.package.verify_package: safe members, signature, sha256 of every file), then
                      every LiteRT variant is run on this device against the stored reference outputs
                      (exporters.verify.check_artifact); only if all pass is the version activated.
                      201 + the on-device report; 400 bad package or upload, 401 token, 409 conflict
                      (already installed, a downgrade without ?allow_downgrade=1), 413 too large,
                      422 on-device parity failed. The old version keeps answering throughout.
    GET  /status      active model and version, the versions kept for rollback, the active version's
                      on-device report (parity and latency per variant), the last push's outcome
    GET  /health      {"status": "ok"}
    POST /predict     {"inputs": {name: nested lists}} | {"inputs": nested list} | {"instances": [...]}
                      -> {"outputs": {name: nested lists}}; ?variant=fp16|int8 (default fp32)
    POST /rollback    re-activate the previous version; 409 when none is kept
    GET  /metrics     Prometheus text: predicts and their latency per variant, on-device parity outcomes,
                      pushes, activations, rollbacks, the active version (edge/metrics.py)

On disk (DIR):

    active.json               {"active": name, "history": [older names, newest first]}: the one pointer,
                              replaced by write-temp + fsync + rename + fsync of DIR, so a crash at any
                              moment leaves either the old or the new pointer
    versions/<model>-v<N>/    package/ (the verified package as unpacked) and report.json
    staging/, incoming/       work in progress; anything left there (a crash) is removed on start,
                              as is any version the pointer does not name

On start the agent re-verifies (signature and hashes) and loads what active.json names. The process
imports numpy, ai_edge_litert, cryptography, aiohttp, prometheus_client, the parity package and
exporters.base/litert/verify only: no TensorFlow, torch or MLflow.
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import platform
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporters import litert
from exporters.base import ArtifactLoadError, package_version
from exporters.verify import check_artifact
from parity.compare import tolerance_for
from parity.feeds import is_multi, n_rows, take
from parity.signature import InputMismatch, Signature, TensorSpec, map_tensors

from .keys import as_public, key_id
from .metrics import AgentMetrics
from .package import PackageError, Package, read_installed, verify_package
from .serving_path import ClosedRunner, VariantServer

AGENT_VERSION = "1"
POINTER = "active.json"
DEFAULT_MAX_UPLOAD = 1 << 30
DEFAULT_KEEP = 3          # the active version and two to roll back to
LATENCY_CALLS = 50
PAUSE_ENV = "EDGE_AGENT_PAUSE_BEFORE_SWITCH"   # test hook: a version number (or "*"): sleep before the switch
PAUSE_SECONDS_ENV = "EDGE_AGENT_PAUSE_SECONDS"
# A predict runs on the event loop, skipping the hop to the predict thread (about 0.1 ms on a 2-CPU box: twice
# a small model's whole predict), when its body is at most INLINE_MAX_BYTES (JSON parse + arrays cost about
# 0.02 ms per KB: 8 KB is about 0.17 ms) and its rows times the variant's on-device batch-1 p50 (the push's
# latency report) is at most INLINE_BUDGET_MS: the loop, which every other request waits on, is then held no
# longer than a few hops. Bigger requests, or a variant whose lock is busy, go to the predict thread, JSON
# parse included. benchmarks/bench_edge.py prints these costs per batch size.
INLINE_MAX_BYTES = 8 << 10
INLINE_BUDGET_MS = 0.25


class AgentError(Exception):
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra

    def body(self) -> dict:
        return {"error": self.message, **self.extra}


def version_name(model: str, version: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', model)[:80] or 'model'}-v{int(version)}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """temp file + fsync + rename + fsync of the folder: the file is the old one or the new one, whole."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ------------------------------------------------------------------------------- feeds and outputs

def to_feed(model_sig: Signature | None, runner, x) -> dict[str, np.ndarray]:
    """The model's inputs (one array, or {model input name: array}) as a feed of the artifact's tensors."""
    names = runner.signature.input_names
    if not is_multi(x):
        if len(names) != 1:
            raise InputMismatch(f"the model takes inputs {', '.join(map(repr, names))}; expected named inputs, "
                                f"found one array")
        return {names[0]: x}
    if set(x) <= set(names):
        return dict(x)
    model_inputs = model_sig.inputs if model_sig is not None and model_sig.inputs else \
        tuple(TensorSpec.of(k, v) for k, v in x.items())
    pairs, _ = map_tensors(model_inputs, runner.signature.inputs)
    unknown = [k for k in x if k not in pairs]
    if unknown:
        raise InputMismatch(f"unknown input(s) {', '.join(map(repr, unknown))}; the model takes "
                            f"{', '.join(repr(t.name) for t in model_inputs)}")
    return {pairs[k]: v for k, v in x.items()}


def parse_inputs(body) -> Any:
    """A predict body as the model's inputs: one array, or {name: array}."""
    if not isinstance(body, dict):
        raise InputMismatch("expected a JSON object with 'inputs' or 'instances'")
    if ("inputs" in body) == ("instances" in body):
        raise InputMismatch("expected exactly one of 'inputs' (columns) or 'instances' (rows)")
    try:
        if "instances" in body:
            rows = body["instances"]
            if not isinstance(rows, list) or not rows:
                raise InputMismatch("'instances': expected a non-empty list of rows")
            if all(isinstance(r, dict) for r in rows):
                keys = list(rows[0])
                if any(set(r) != set(keys) for r in rows):
                    raise InputMismatch("'instances': every row must name the same inputs")
                return {k: np.asarray([r[k] for r in rows]) for k in keys}
            if any(isinstance(r, dict) for r in rows):
                raise InputMismatch("'instances': expected all rows as objects or all as arrays")
            return np.asarray(rows)
        value = body["inputs"]
        if isinstance(value, dict):
            if not value:
                raise InputMismatch("'inputs': expected at least one named input")
            return {k: np.asarray(v) for k, v in value.items()}
        return np.asarray(value)
    except ValueError as e:  # ragged lists
        raise InputMismatch(f"inputs are not rectangular arrays ({e})") from None


# ----------------------------------------------------------------------------------------- the agent

@dataclass
class Loaded:
    name: str
    package: Package
    runners: dict
    report: dict
    signature: Signature | None
    activated_at: str = field(default_factory=_now)
    servers: dict = field(default_factory=dict)   # variant -> VariantServer (its lock and direct call)

    def __post_init__(self):
        if not self.servers:
            self.servers = {v: VariantServer(r, self.signature) for v, r in self.runners.items()}

    @property
    def model(self) -> str:
        return self.package.model

    @property
    def version(self) -> int:
        return self.package.version


class Agent:
    """The agent's state and its blocking operations (run them off the event loop)."""

    def __init__(self, root: Path, public_key, *, keep: int = DEFAULT_KEEP, max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
                 latency_calls: int = LATENCY_CALLS, log=None):
        self.root = Path(root).resolve()
        self.public_key = as_public(public_key)
        self.key_id = key_id(self.public_key)
        self.keep = max(1, int(keep))
        self.max_upload_bytes = int(max_upload_bytes)
        self.latency_calls = int(latency_calls)
        self.versions, self.staging, self.incoming = (self.root / d for d in ("versions", "staging", "incoming"))
        self.log = log or (lambda msg: print(f"edge-agent: {msg}", file=sys.stderr, flush=True))
        self.active: Loaded | None = None
        self.pointer: dict | None = None
        self.load_error: str | None = None
        self.last_push: dict | None = None
        self.started_at = _now()
        # big predicts run on this one thread, small ones on the event loop (INLINE_MAX_BYTES); each variant's
        # lock (edge.serving_path.VariantServer) keeps its interpreter, which is not thread-safe, to one call
        self.predict_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")
        self.mutate = threading.Lock()   # pushes and rollbacks, one at a time
        self.metrics = AgentMetrics(self)

    # -- start ---------------------------------------------------------------------------------------
    def start(self) -> None:
        for d in (self.root, self.versions, self.staging, self.incoming):
            d.mkdir(parents=True, exist_ok=True)
        self.pointer = self._read_pointer()
        self._clean()
        if self.pointer:
            try:
                self.active = self._load(self.pointer["active"])
                self.active.activated_at = self.pointer.get("switched_at") or self.active.activated_at
                self.log(f"serving {self.active.name} (from {POINTER})")
            except (PackageError, ArtifactLoadError, OSError, KeyError, ValueError) as e:
                self.load_error = f"{self.pointer.get('active')}: {e}"
                self.log(f"could not load the active version {self.load_error}")
        else:
            self.log("no active version yet")

    def _read_pointer(self) -> dict | None:
        path = self.root / POINTER
        if not path.exists():
            return None
        try:
            pointer = json.loads(path.read_text())
            if not isinstance(pointer, dict) or not isinstance(pointer.get("active"), str):
                raise ValueError("expected {active: name, history: [...]}")
        except ValueError as e:
            self.load_error = f"{path}: unreadable pointer ({e})"
            self.log(self.load_error)
            return None
        pointer.setdefault("history", [])
        return pointer

    def _kept(self) -> set[str]:
        return set() if not self.pointer else {self.pointer["active"], *self.pointer.get("history", [])}

    def _clean(self) -> None:
        """On start: remove what a crash or an abandoned push left (staging, uploads, a pointer's temp file)
        and every version the pointer does not name."""
        for d in (self.staging, self.incoming):
            for p in d.iterdir():
                _remove(p)
        for p in self.root.glob(f".{POINTER}.*.tmp"):
            p.unlink(missing_ok=True)
        self._prune()

    def _prune(self) -> None:
        """Remove the versions active.json does not name (never uploads in flight: they live in incoming/)."""
        kept = self._kept()
        for p in self.versions.iterdir():
            if p.name not in kept:
                self.log(f"removing {p.name}: {POINTER} does not name it (an unfinished activation, a version "
                         f"rolled back from, or one past --keep)")
                _remove(p)

    def _load(self, name: str) -> Loaded:
        folder = self.versions / name
        pkg = read_installed(folder / "package", self.public_key)
        runners = {}
        try:
            for a in pkg.artifacts():
                runners[a.variant] = litert.load(a)
        except BaseException:
            for r in runners.values():
                r.close()
            raise
        report_path = folder / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        return Loaded(name, pkg, runners, report, pkg.signature())

    # -- push ------------------------------------------------------------------------------------------
    def install(self, upload: Path, *, allow_downgrade: bool = False, upload_bytes: int = 0) -> tuple[int, dict]:
        with self.mutate:
            t0 = time.perf_counter()
            try:
                status, body = self._install(upload, allow_downgrade=allow_downgrade, upload_bytes=upload_bytes)
            except AgentError as e:
                status, body = e.status, e.body()
            self.last_push = {"at": _now(), "status": status, "elapsed_s": round(time.perf_counter() - t0, 3),
                              "outcome": "activated" if status == 201 else "rejected",
                              **({"error": body["error"]} if "error" in body else {}),
                              **({"version": body.get("version"), "model": body.get("model")} if status == 201 else {})}
            self.log(f"push -> {status}: {body.get('error') or body.get('name')}")
            self.metrics.pushed(status, body)
            return status, body

    def _install(self, upload: Path, *, allow_downgrade: bool, upload_bytes: int) -> tuple[int, dict]:
        stage = self.staging / uuid.uuid4().hex
        stage.mkdir(parents=True)
        try:
            try:
                pkg = verify_package(upload, self.public_key, stage / "package")
            except PackageError as e:
                raise AgentError(400, f"package rejected: {e}", reason=e.reason, member=e.member) from None
            name = version_name(pkg.model, pkg.version)
            self._check_policy(pkg, name, allow_downgrade)
            report = self._prove(pkg)
            report.update(name=name, package_bytes=upload_bytes or upload.stat().st_size,
                          bundle_bytes=pkg.size_bytes())
            if not report["passed"]:
                failed = [v for v, r in report["variants"].items() if not r["passed"]]
                first = report["variants"][failed[0]]["message"]
                raise AgentError(422, f"on-device parity failed for {', '.join(failed)} "
                                      f"(the active version is unchanged): {first}", report=report)
            target = self.versions / name
            if target.exists():  # a leftover no pointer names (kept versions were refused above)
                shutil.rmtree(target)
            os.rename(stage, target)
            _fsync_dir(self.versions)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        # from here the version is in place but not active: a crash leaves the old pointer, and the start cleans up
        try:
            loaded = self._load(name)
            for variant, runner in loaded.runners.items():
                report["variants"][variant]["latency"] = self._latency(loaded, runner)
            loaded.report = report
            write_json_atomic(target / "report.json", report)
        except (PackageError, ArtifactLoadError, OSError) as e:
            shutil.rmtree(target, ignore_errors=True)
            raise AgentError(422, f"{name}: could not be loaded for serving after it passed: {e}") from None
        self._test_pause(pkg.version, name)
        self._switch(loaded)
        return 201, report

    def _check_policy(self, pkg: Package, name: str, allow_downgrade: bool) -> None:
        if self.pointer and name == self.pointer["active"]:
            raise AgentError(409, f"{name} is already the active version")
        if self.pointer and name in self.pointer.get("history", []):
            raise AgentError(409, f"{name} is already installed (kept for rollback); POST /rollback to return to it")
        a = self.active
        if a is not None and a.model == pkg.model and pkg.version < a.version and not allow_downgrade:
            raise AgentError(409, f"{pkg.model} v{pkg.version} is older than the active v{a.version}: a downgrade "
                                  f"(push with ?allow_downgrade=1, or POST /rollback)")

    def _prove(self, pkg: Package) -> dict:
        """On-device parity: every variant on the stored parity inputs against the reference outputs."""
        t0 = time.perf_counter()
        reference = pkg.reference()
        manifest = pkg.manifest
        sig = pkg.signature()
        variants = {}
        for artifact in pkg.artifacts():
            try:
                tol = tolerance_for(artifact.variant, "litert", manifest.get("tolerances") or {})
            except ValueError as e:
                raise AgentError(400, f"package rejected: {e}") from None
            rec, _, env = check_artifact(litert, artifact, litert.RUNTIMES[0], reference, tol,
                                         task=manifest.get("task", "regression"),
                                         max_batch=int(manifest.get("max_batch") or 1), model=pkg.model,
                                         model_signature=sig)
            record = rec.to_json()
            record["artifact"] = Path(artifact.path).relative_to(pkg.root).as_posix()
            metrics = (rec.comparison.metrics if rec.comparison is not None else {})
            variants[artifact.variant] = {
                "passed": rec.passed, "status": rec.status, "message": rec.message,
                "max_abs": _num(metrics.get("max_abs")), "cosine": _num(metrics.get("cosine")),
                "n_rows": rec.n_rows, "size_bytes": Path(artifact.path).stat().st_size,
                "tolerance": tol.to_json(), "failures": list(rec.comparison.failures) if rec.comparison else [],
                "environment_problem": env, "record": record}
        return {"model": pkg.model, "version": pkg.version, "key_id": pkg.key_id, "checked_at": _now(),
                "passed": bool(variants) and all(v["passed"] for v in variants.values()),
                "variants": variants, "parity_rows": n_rows(reference["x"]),
                "elapsed_s": round(time.perf_counter() - t0, 3), "device": _device()}

    def _latency(self, loaded: Loaded, runner) -> dict:
        x1 = take(loaded.package.reference()["x"], slice(0, 1))
        feed = to_feed(loaded.signature, runner, x1)
        for _ in range(5):
            runner.infer(feed)
        times = []
        for _ in range(self.latency_calls):
            t = time.perf_counter()
            runner.infer(feed)
            times.append((time.perf_counter() - t) * 1e3)
        return {"batch": 1, "calls": len(times), "p50_ms": round(float(np.percentile(times, 50)), 4),
                "p99_ms": round(float(np.percentile(times, 99)), 4), "mean_ms": round(float(np.mean(times)), 4)}

    def _test_pause(self, version: int, name: str) -> None:
        want = os.environ.get(PAUSE_ENV)
        if want and (want == "*" or want == str(version)):
            self.log(f"TEST HOOK: paused before switching to {name}")
            time.sleep(float(os.environ.get(PAUSE_SECONDS_ENV, "60")))

    def _switch(self, loaded: Loaded, *, history: list[str] | None = None, extra: dict | None = None) -> None:
        if history is None:
            old = self.pointer or {}
            history = ([old["active"]] if old.get("active") else []) + list(old.get("history", []))
        history = [h for h in history if h != loaded.name][: self.keep - 1]
        pointer = {"active": loaded.name, "history": history, "switched_at": _now(), **(extra or {})}
        write_json_atomic(self.root / POINTER, pointer)
        loaded.activated_at = pointer["switched_at"]
        previous, self.active, self.pointer, self.load_error = self.active, loaded, pointer, None
        if previous is not None:   # closed on the predict thread, each under its lock: after any call running on it
            self.predict_pool.submit(_close_servers, previous)
        self._prune()
        self.log(f"active: {loaded.name}" + (f" (previous: {history[0]})" if history else ""))

    # -- rollback ------------------------------------------------------------------------------------
    def rollback(self) -> tuple[int, dict]:
        with self.mutate:
            if not self.pointer or not self.pointer.get("history"):
                return 409, {"error": "no previous version to roll back to"}
            current, target = self.pointer["active"], self.pointer["history"][0]
            try:
                loaded = self._load(target)
            except (PackageError, ArtifactLoadError, OSError) as e:
                return 500, {"error": f"the previous version {target} could not be loaded: {e}"}
            self._switch(loaded, history=self.pointer["history"][1:], extra={"rolled_back_from": current})
            self.metrics.rolled_back()
            return 200, {"active": target, "model": loaded.model, "version": loaded.version,
                         "rolled_back_from": current}

    # -- read ----------------------------------------------------------------------------------------
    def predict(self, body, variant: str | None) -> dict:
        """A predict body -> the answer, blocking (the predict thread's path; waits for the variant's lock)."""
        self._pick(variant)   # 503 / 404 before any complaint about the body, as always
        return self._run(self._inputs(body), variant, wait=True)

    def predict_json(self, raw: bytes, charset: str | None, variant: str | None) -> dict:
        """The predict thread's path for a big request: the JSON body (bytes) -> the answer."""
        return self.predict(decode_json(raw, charset), variant)

    def predict_inline(self, body, variant: str | None) -> tuple[dict | None, Any]:
        """On the event loop, for a small body: (the answer, inputs) when the variant's cost fits
        INLINE_BUDGET_MS and its lock is free right now, else (None, the parsed inputs) for the caller to
        hand to `predict_parsed` on the predict thread."""
        loaded, _ = self._pick(variant)
        x = self._inputs(body)
        p50 = (((loaded.report or {}).get("variants") or {}).get(variant or "fp32") or {}).get("latency") or {}
        if _rows_of(x) * float(p50.get("p50_ms") or 0.0) > INLINE_BUDGET_MS:
            return None, x
        return self._run(x, variant, wait=False), x

    def predict_parsed(self, x, variant: str | None) -> dict:
        return self._run(x, variant, wait=True)

    def _pick(self, variant: str | None) -> tuple[Loaded, VariantServer]:
        loaded = self.active
        if loaded is None:
            raise AgentError(503, "no active model" + (f" ({self.load_error})" if self.load_error else ""))
        server = loaded.servers.get(variant or "fp32")
        if server is None:
            raise AgentError(404, f"variant {variant or 'fp32'!r} is not in {loaded.name}; it has "
                                  f"{', '.join(sorted(loaded.servers))}")
        return loaded, server

    @staticmethod
    def _inputs(body):
        try:
            return parse_inputs(body)
        except InputMismatch as e:
            raise AgentError(400, str(e)) from None

    def _run(self, x, variant: str | None, *, wait: bool) -> dict | None:
        """Run the active version's variant under its lock; None when not `wait` and the lock is busy. A
        runner closed by a switch since it was picked is picked again (the new version answers)."""
        for _ in range(3):
            loaded, server = self._pick(variant)
            if not server.lock.acquire(blocking=wait):
                return None
            try:
                outputs = server.predict(x)
                # to lists under the lock: cheap at the sizes that run inline, and no array outlives the call
                answer = {k: v.tolist() for k, v in outputs.items()}
            except ClosedRunner:
                continue
            except InputMismatch as e:
                raise AgentError(400, str(e)) from None
            finally:
                server.lock.release()
            return {"model": loaded.model, "version": loaded.version, "variant": variant or "fp32",
                    "outputs": answer}
        raise AgentError(503, "the active version changed during the call three times; try again")

    def status(self) -> dict:
        a, p = self.active, self.pointer or {}
        history = list(p.get("history", [])) if a is not None else []
        active = None if a is None else {
            "name": a.name, "model": a.model, "version": a.version, "variants": sorted(a.runners),
            "framework": a.package.manifest.get("framework"), "task": a.package.manifest.get("task"),
            "signature": a.package.manifest.get("signature"), "activated_at": a.activated_at,
            "key_id": a.package.key_id}
        report = a.report if a is not None else None
        return {"agent": {"version": AGENT_VERSION, "pid": os.getpid(), "root": str(self.root),
                          "key_id": self.key_id, "started_at": self.started_at},
                "active": active, "model": a.model if a else None, "version": a.version if a else None,
                "previous": ({"name": history[0], "version": _version_of(history[0])} if history else None),
                "history": history, "report": report,
                "latency": ({v: r.get("latency") for v, r in (report or {}).get("variants", {}).items()}
                            if report else None),
                "last_push": self.last_push, "load_error": self.load_error}


def _rows_of(x) -> int:
    """Rows of parsed inputs, for the inline budget only: a scalar counts as one (the runner refuses it)."""
    a = next(iter(x.values()), None) if is_multi(x) else x
    return a.shape[0] if getattr(a, "ndim", 0) else 1


def decode_json(raw: bytes, charset: str | None):
    """A request body as JSON, as aiohttp's request.json() reads it; a 400 naming the problem."""
    try:
        return json.loads(raw.decode(charset or "utf-8"))
    except ValueError as e:
        raise AgentError(400, f"expected a JSON body ({e})") from None


def _close_servers(loaded: Loaded) -> None:
    for server in loaded.servers.values():
        server.close()


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _version_of(name: str) -> int | None:
    m = re.search(r"-v(\d+)$", name)
    return int(m.group(1)) if m else None


def _num(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if np.isfinite(v) else None


def _device() -> dict:
    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "ai_edge_litert": package_version("ai-edge-litert"), "cpus": os.cpu_count()}


# ------------------------------------------------------------------------------------------------ HTTP

def make_app(agent: Agent, token: str, *, debug: bool = False):
    from aiohttp import web

    want = f"Bearer {token}".encode()

    def error(status: int, message: str, **extra):
        return web.json_response({"error": message, **extra}, status=status)

    @web.middleware
    async def auth(request, handler):
        if request.path != "/health":
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, want):
                return error(401, "missing or wrong bearer token" if got else "missing bearer token "
                             "(Authorization: Bearer <token>)")
        try:
            return await handler(request)
        except AgentError as e:
            return web.json_response(e.body(), status=e.status)

    async def health(request):
        return web.json_response({"status": "ok"})

    async def status(request):
        return web.json_response(agent.status())

    async def push(request):
        length = request.content_length
        if length is not None and length > agent.max_upload_bytes:
            return error(413, f"the package is {length} bytes, over this agent's limit of {agent.max_upload_bytes}")
        upload = agent.incoming / f"upload-{uuid.uuid4().hex}.tar.gz"
        received = 0
        try:
            try:
                with open(upload, "wb") as f:
                    while True:
                        chunk = await request.content.read(1 << 16)
                        if not chunk:
                            break
                        received += len(chunk)
                        if received > agent.max_upload_bytes:
                            return error(413, f"the upload passed this agent's limit of {agent.max_upload_bytes} bytes")
                        f.write(chunk)
            except Exception as e:  # noqa: BLE001 - the client went away or sent a broken body
                agent.log(f"upload cut off after {received} bytes"
                          + (f" of {length}" if length is not None else "") + f" ({type(e).__name__}: {e})")
                return error(400, f"upload cut off after {received} bytes"
                             + (f" of {length}" if length is not None else ""))
            if length is not None and received != length:
                return error(400, f"upload cut off after {received} of {length} bytes")
            if received == 0:
                return error(400, "expected the package (.tar.gz) as the request body, found an empty body")
            allow = request.query.get("allow_downgrade", "").lower() in ("1", "true", "yes")
            status_code, body = await asyncio.get_running_loop().run_in_executor(
                None, lambda: agent.install(upload, allow_downgrade=allow, upload_bytes=received))
            return web.json_response(body, status=status_code)
        finally:
            upload.unlink(missing_ok=True)

    async def predict(request):
        t0, code = time.perf_counter(), 500
        try:
            raw = await request.read()
            variant = request.query.get("variant")
            loop = asyncio.get_running_loop()
            try:
                if len(raw) > INLINE_MAX_BYTES:   # big: even its JSON parse runs on the predict thread
                    result = await loop.run_in_executor(agent.predict_pool, agent.predict_json, raw,
                                                        request.charset, variant)
                else:
                    result, x = agent.predict_inline(decode_json(raw, request.charset), variant)
                    if result is None:   # over the budget, or the variant busy: on the predict thread
                        result = await loop.run_in_executor(agent.predict_pool, agent.predict_parsed, x, variant)
            except AgentError as e:
                code = e.status
                raise
            code = 200
            return web.json_response(result)
        finally:  # every call counted once, errors under their HTTP status
            agent.metrics.predict(request.query.get("variant"), code, time.perf_counter() - t0)

    async def rollback(request):
        status_code, body = await asyncio.get_running_loop().run_in_executor(None, agent.rollback)
        return web.json_response(body, status=status_code)

    async def metrics(request):
        page, content_type = agent.metrics.page()
        return web.Response(body=page, headers={"Content-Type": content_type})

    async def modules(request):
        return web.json_response({"pid": os.getpid(), "modules": sorted({m.split(".")[0] for m in list(sys.modules)})})

    app = web.Application(middlewares=[auth], client_max_size=64 << 20)
    app.router.add_get("/health", health)
    app.router.add_get("/status", status)
    app.router.add_post("/bundles", push)
    app.router.add_post("/predict", predict)
    app.router.add_post("/rollback", rollback)
    app.router.add_get("/metrics", metrics)
    if debug:
        app.router.add_get("/debug/modules", modules)
    return app


async def serve(agent: Agent, token: str, host: str, port: int, *, ready_file: Path | None = None,
                debug: bool = False) -> None:
    import socket

    from aiohttp import web

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    runner = web.AppRunner(make_app(agent, token, debug=debug), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    agent.log(f"listening on {url}")
    if ready_file is not None:
        write_json_atomic(Path(ready_file), {"url": url, "port": port, "pid": os.getpid()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        agent.log("stopping")
        await runner.cleanup()
        agent.predict_pool.shutdown(wait=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge.agent", description="The edge device agent.")
    ap.add_argument("--root", required=True, type=Path, help="the agent's folder (versions, pointer)")
    ap.add_argument("--public-key", required=True, type=Path, help="the Ed25519 public key (PEM) packages are signed for")
    ap.add_argument("--token", help="the bearer token clients must send (or --token-file, or $EDGE_AGENT_TOKEN)")
    ap.add_argument("--token-file", type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8470, help="0: any free port (see --ready-file)")
    ap.add_argument("--ready-file", type=Path, help="written as {url, port, pid} once the agent listens")
    ap.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD)
    ap.add_argument("--keep", type=int, default=DEFAULT_KEEP, help="versions kept on disk (active included)")
    ap.add_argument("--debug-modules", action="store_true", help="add GET /debug/modules (the imported modules)")
    args = ap.parse_args(argv)
    token = args.token or (args.token_file.read_text().strip() if args.token_file else None) \
        or os.environ.get("EDGE_AGENT_TOKEN")
    if not token:
        ap.error("a token is required: --token, --token-file or $EDGE_AGENT_TOKEN")
    try:
        agent = Agent(args.root, args.public_key, keep=args.keep, max_upload_bytes=args.max_upload_bytes)
    except (ValueError, OSError) as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return 2
    agent.start()
    try:
        asyncio.run(serve(agent, token, args.host, args.port, ready_file=args.ready_file, debug=args.debug_modules))
    except OSError as e:
        print(f"edge-agent: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
