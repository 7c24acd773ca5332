"""A devices file: the edge hosts a package can go to, and how to reach each one (TOML).

    [device.shelf-1]
    address = "10.77.0.2:8750"          # the agent, as this host reaches it (http)
    transport = "http"                  # default
    token_file = "tokens/shelf-1"       # or token = "..."; relative paths are relative to this file

    [device.shelf-2]
    address = "10.77.0.6"               # ssh: the host (a ":port" here is the agent's port on the device)
    transport = "ssh"
    token = "..."
    ssh_user = "root"
    ssh_key = "keys/id_ed25519"
    ssh_port = 22                       # default 22
    remote_dir = "/var/lib/edge/incoming"   # where packages are copied
    agent_url = "http://127.0.0.1:8750" # the agent as seen on the device (default: 127.0.0.1 and the
                                        # port in address)
    python = "/usr/bin/python3"         # the device's python with this project importable (default python3)
    pythonpath = "/opt/edge"            # optional PYTHONPATH for it
    timeout = 300                       # seconds per step (default 300)

`load_devices(path) -> {name: Device}`; every mistake is a `DevicesError` naming the file, the device
and key, what was expected and what was found. Only the standard library (tomllib).
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRANSPORTS = ("http", "ssh")
COMMON_KEYS = ("address", "transport", "token", "token_file", "timeout")
SSH_KEYS = ("ssh_user", "ssh_key", "ssh_port", "remote_dir", "agent_url", "python", "pythonpath")
SSH_REQUIRED = ("ssh_user", "ssh_key", "remote_dir")
DEFAULT_TIMEOUT = 300.0


class DevicesError(ValueError):
    """A devices file that cannot be used: `file`, `device`, `key` say where."""

    def __init__(self, file: Path, message: str, *, device: str | None = None, key: str | None = None):
        where = str(file)
        if device is not None:
            where += f": [device.{device}]"
        if key is not None:
            where += f" {key}"
        super().__init__(f"{where}: {message}")
        self.file, self.device, self.key, self.reason = file, device, key, message


@dataclass(frozen=True)
class Device:
    name: str
    address: str                       # "host:port" (http) or "host[:agent_port]" (ssh)
    transport: str
    token: str = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT
    ssh_user: str | None = None
    ssh_key: Path | None = None
    ssh_port: int = 22
    remote_dir: str | None = None
    agent_url: str | None = None
    python: str = "python3"
    pythonpath: str | None = None
    source: Path | None = None         # the devices file

    @property
    def host(self) -> str:
        return split_address(self.address)[0]

    @property
    def url(self) -> str:
        """The agent's URL from this host (http)."""
        return f"http://{self.address}"


def split_address(address: str) -> tuple[str, int | None]:
    """'host:port' | 'host' | '[v6]:port' -> (host, port or None); ValueError on a bad port."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{address!r} is not [host]:port")
        port = rest[1:] or None
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, None
    if not host:
        raise ValueError(f"{address!r} has no host")
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: the port {port!r} is not a number from 1 to 65535")
    return host, int(port)


def _found(v: Any) -> str:
    return f"{type(v).__name__} {v!r}"


def load_devices(path: Path | str) -> dict[str, Device]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DevicesError(path, f"could not read the devices file ({e.strerror or e})") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DevicesError(path, f"not valid TOML: {e}") from None
    for key in doc:
        if key != "device":
            raise DevicesError(path, f"unknown top-level key (expected only [device.<name>] tables), found {key!r}",
                               key=key)
    tables = doc.get("device")
    if not isinstance(tables, dict) or not tables:
        raise DevicesError(path, "expected at least one [device.<name>] table, found none", key="device")
    return {name: _device(path, name, table) for name, table in tables.items()}


def _device(path: Path, name: str, t: Any) -> Device:
    def err(key: str | None, message: str) -> DevicesError:
        return DevicesError(path, message, device=name, key=key)

    if not isinstance(t, dict):
        raise err(None, f"expected a table, found {_found(t)}")
    known = COMMON_KEYS + SSH_KEYS
    for key in t:
        if key not in known:
            raise err(key, f"unknown key (expected one of {', '.join(known)}), found {key!r}")

    def string(key: str, required: bool = False) -> str | None:
        v = t.get(key)
        if v is None:
            if required:
                raise err(key, "missing (expected a string)")
            return None
        if not isinstance(v, str) or not v.strip():
            raise err(key, f"expected a non-empty string, found {_found(v)}")
        return v

    transport = t.get("transport", "http")
    if transport not in TRANSPORTS:
        raise err("transport", f"expected one of {', '.join(repr(x) for x in TRANSPORTS)}, found {_found(transport)}")
    if "address" not in t:
        raise err("address", "missing (expected \"host:port\", e.g. \"10.77.0.2:8750\")")
    address = string("address", True)
    try:
        host, port = split_address(address)
    except ValueError as e:
        raise err("address", f"expected \"host:port\", found {address!r} ({e})") from None
    if transport == "http" and port is None:
        raise err("address", f"expected \"host:port\" (the agent's port) for transport http, found {address!r}")

    token, token_file = t.get("token"), t.get("token_file")
    if token is not None and token_file is not None:
        raise err("token", "expected token or token_file, found both")
    if token is None and token_file is None:
        raise err("token", "missing (expected token = \"...\" or token_file = \"path\")")
    if token is not None:
        token = string("token")
    else:
        token_file = string("token_file")
        tf = _relative(path, token_file)
        try:
            token = tf.read_text().strip()
        except OSError as e:
            raise err("token_file", f"could not read {tf} ({e.strerror or e})") from None
        if not token:
            raise err("token_file", f"expected a token in {tf}, found an empty file")

    timeout = t.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise err("timeout", f"expected a positive number of seconds, found {_found(timeout)}")

    if transport == "http":
        extra = [k for k in SSH_KEYS if k in t]
        if extra:
            raise err(extra[0], f"only for transport \"ssh\" (this device's transport is \"http\"), found {extra[0]!r}")
        return Device(name=name, address=address, transport="http", token=token, timeout=float(timeout), source=path)

    missing = [k for k in SSH_REQUIRED if k not in t]
    if missing:
        raise err(missing[0], f"missing for transport \"ssh\" (expected {', '.join(SSH_REQUIRED)}; "
                              f"missing {', '.join(missing)})")
    ssh_port = t.get("ssh_port", 22)
    if isinstance(ssh_port, bool) or not isinstance(ssh_port, int) or not 0 < ssh_port < 65536:
        raise err("ssh_port", f"expected an integer from 1 to 65535, found {_found(ssh_port)}")
    agent_url = string("agent_url")
    if agent_url is None:
        if port is None:
            raise err("agent_url", "missing (expected agent_url, or the agent's port in address as \"host:port\")")
        agent_url = f"http://127.0.0.1:{port}"
    elif not agent_url.startswith(("http://", "https://")):
        raise err("agent_url", f"expected an http:// URL, found {agent_url!r}")
    remote_dir = string("remote_dir")
    if not remote_dir.startswith("/"):
        raise err("remote_dir", f"expected an absolute path on the device, found {remote_dir!r}")
    return Device(name=name, address=address, transport="ssh", token=token, timeout=float(timeout),
                  ssh_user=string("ssh_user"), ssh_key=_relative(path, string("ssh_key")), ssh_port=ssh_port,
                  remote_dir=remote_dir, agent_url=agent_url.rstrip("/"), python=string("python") or "python3",
                  pythonpath=string("pythonpath"), source=path)


def _relative(devices_file: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else (devices_file.parent / q)
