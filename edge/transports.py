"""Getting a package to a device (edge.devices.Device) and talking to its agent, per transport.

    deploy_to(device, "torch-v3.tar.gz") -> the agent's on-device report + "transport": {kind, timings}
    status_of(device), rollback(device)

http   EdgeClient(f"http://{device.address}", token) straight to the agent.
ssh    `scp` the package into the device's remote_dir (BatchMode, no known-hosts file, the device's key
       and port), then `ssh` runs a small Python program on the device (the device's `python`, with
       `pythonpath`) that pushes the copied file to the local agent (agent_url) with edge.client and
       prints the answer as JSON; the token travels on ssh's stdin, never on a command line. The copied
       file is removed on the device afterwards, whatever the outcome.

Every failure is a TransportError saying which device, which step (copy / install / status / rollback /
push) and why: the agent's status and message when it answered, the remote stderr when a command failed.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import time
import uuid
from pathlib import Path

from .client import EdgeClient, EdgeError
from .devices import Device

SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=15")

# Runs on the device: {"op", "url", "token", "path"?, "allow_downgrade"?} on stdin -> one JSON line on stdout.
REMOTE_PROGRAM = r"""
import json, os, sys
req = json.loads(sys.stdin.read())
from edge.client import EdgeClient, EdgeError
c = EdgeClient(req["url"], req["token"], timeout=req.get("timeout", 300))
try:
    try:
        if req["op"] == "push":
            r = c.push(req["path"], allow_downgrade=req.get("allow_downgrade", False))
        else:
            r = getattr(c, req["op"])()
        out = {"ok": True, "result": r}
    except EdgeError as e:
        out = {"ok": False, "status": e.status, "message": e.message, "body": e.body}
finally:
    if req.get("path"):
        try:
            os.remove(req["path"])
        except OSError:
            pass
sys.stdout.write(json.dumps(out) + "\n")
"""


class TransportError(RuntimeError):
    """`device` (name), `step`, `status` (the agent's HTTP status, 0 unreachable, None when it never got
    that far), `stderr` (the remote command's), `body` (the agent's JSON error body)."""

    def __init__(self, device: str, step: str, message: str, *, status: int | None = None, stderr: str = "",
                 body: dict | None = None):
        text = f"device {device!r}: {step}: {message}"
        if stderr.strip():
            text += f"\nremote stderr: {stderr.strip()[-2000:]}"
        super().__init__(text)
        self.device, self.step, self.message, self.status = device, step, message, status
        self.stderr, self.body = stderr, body or {}


# --------------------------------------------------------------------------------------------- api

def deploy_to(device: Device, package_path: Path | str, *, allow_downgrade: bool = False) -> dict:
    """Push a package; the agent's on-device report (201) plus "transport": {"kind", "device",
    "package_bytes", per-step seconds and "total_s"}."""
    package = Path(package_path)
    if not package.is_file():
        raise TransportError(device.name, "copy", f"no such package: {package}")
    if device.transport == "http":
        return _http_deploy(device, package, allow_downgrade)
    if device.transport == "ssh":
        return _ssh_deploy(device, package, allow_downgrade)
    raise TransportError(device.name, "deploy", f"unknown transport {device.transport!r}")


def status_of(device: Device) -> dict:
    return _call(device, "status")


def rollback(device: Device) -> dict:
    return _call(device, "rollback")


def health(device: Device) -> dict:
    return _call(device, "health")


# --------------------------------------------------------------------------------------------- http

def _client(device: Device) -> EdgeClient:
    return EdgeClient(device.url, device.token, timeout=device.timeout)


def _edge_error(device: Device, step: str, e: EdgeError) -> TransportError:
    return TransportError(device.name, step, f"the agent answered {e.status}: {e.message}" if e.status
                          else e.message, status=e.status, body=e.body)


def _http_deploy(device: Device, package: Path, allow_downgrade: bool) -> dict:
    t0 = time.monotonic()
    try:
        report = _client(device).push(package, allow_downgrade=allow_downgrade)
    except EdgeError as e:
        raise _edge_error(device, "push", e) from None
    total = time.monotonic() - t0
    report["transport"] = {"kind": "http", "device": device.name, "url": device.url,
                           "package_bytes": package.stat().st_size, "push_s": round(total, 4),
                           "total_s": round(total, 4)}
    return report


def _call(device: Device, op: str) -> dict:
    if device.transport == "http":
        try:
            return getattr(_client(device), op)()
        except EdgeError as e:
            raise _edge_error(device, op, e) from None
    if device.transport == "ssh":
        return _remote(device, op, op)
    raise TransportError(device.name, op, f"unknown transport {device.transport!r}")


# --------------------------------------------------------------------------------------------- ssh

def _target(device: Device) -> str:
    host = device.host
    return f"{device.ssh_user}@{'[' + host + ']' if ':' in host else host}"


def ssh_argv(device: Device, remote_command: str) -> list[str]:
    return ["ssh", *SSH_OPTIONS, "-i", str(device.ssh_key), "-p", str(device.ssh_port), _target(device),
            remote_command]


def scp_argv(device: Device, local: Path, remote_path: str) -> list[str]:
    return ["scp", "-q", *SSH_OPTIONS, "-i", str(device.ssh_key), "-P", str(device.ssh_port), str(local),
            f"{_target(device)}:{remote_path}"]


def _run(device: Device, step: str, argv: list[str], *, stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=device.timeout)
    except FileNotFoundError:
        raise TransportError(device.name, step, f"{argv[0]!r} is not installed on this host") from None
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        raise TransportError(device.name, step, f"{argv[0]} took longer than {device.timeout:g} s",
                             stderr=err) from None
    if r.returncode != 0:
        raise TransportError(device.name, step, f"{argv[0]} exited {r.returncode}", stderr=r.stderr)
    return r


def _remote_python(device: Device) -> str:
    cmd = [device.python, "-c", REMOTE_PROGRAM]
    if device.pythonpath:
        cmd = ["env", f"PYTHONPATH={device.pythonpath}", *cmd]
    return " ".join(shlex.quote(c) for c in cmd)


def _remote(device: Device, step: str, op: str, **extra) -> dict:
    req = {"op": op, "url": device.agent_url, "token": device.token, "timeout": device.timeout, **extra}
    r = _run(device, step, ssh_argv(device, _remote_python(device)), stdin=json.dumps(req))
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    try:
        out = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise TransportError(device.name, step, f"the remote program printed no JSON answer "
                             f"(stdout: {r.stdout.strip()[-500:]!r})", stderr=r.stderr) from None
    if not out.get("ok"):
        status = out.get("status")
        msg = (f"the agent at {device.agent_url} answered {status}: {out.get('message')}" if status
               else str(out.get("message")))
        raise TransportError(device.name, step, msg, status=status, stderr=r.stderr, body=out.get("body"))
    return out["result"]


def _ssh_deploy(device: Device, package: Path, allow_downgrade: bool) -> dict:
    remote_dir = device.remote_dir.rstrip("/") or "/"
    remote_path = f"{remote_dir}/{uuid.uuid4().hex[:8]}-{package.name}"
    t0 = time.monotonic()
    _run(device, "copy", ssh_argv(device, f"mkdir -p {shlex.quote(remote_dir)}"))
    _run(device, "copy", scp_argv(device, package, remote_path))
    t1 = time.monotonic()
    try:
        report = _remote(device, "install", "push", path=remote_path, allow_downgrade=allow_downgrade)
    except TransportError:
        # the remote program removes the copy itself; if it never ran (a wrong `python`), remove it here
        try:
            subprocess.run(ssh_argv(device, f"rm -f {shlex.quote(remote_path)}"), capture_output=True,
                           timeout=min(device.timeout, 30))
        except (OSError, subprocess.TimeoutExpired):
            pass
        raise
    t2 = time.monotonic()
    report["transport"] = {"kind": "ssh", "device": device.name, "host": device.host, "ssh_port": device.ssh_port,
                           "remote_path": remote_path, "agent_url": device.agent_url,
                           "package_bytes": package.stat().st_size, "copy_s": round(t1 - t0, 4),
                           "install_s": round(t2 - t1, 4), "total_s": round(t2 - t0, 4)}
    return report
