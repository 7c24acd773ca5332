"""Test helpers: network namespaces as separate edge hosts.

    if not can_make_namespaces(): pytest.skip(why_not())
    ns = Namespace.create()          # edge-<hex>, veth veA<hex> (host, 10.77.X.1/30) <-> veB<hex> (ns, 10.77.X.2/30)
    proc = ns.popen([...])           # `ip netns exec edge-<hex> ...`
    ns.stop(proc); ns.destroy()      # stop every process started through it, delete the veth and namespace

Every namespace and process goes through a `Namespace` so that `destroy()` (call it from a fixture
finalizer) leaves nothing behind, even when a test fails. Processes are always waited for (PID 1 here does
not reap orphans).
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import threading
import uuid

PREFIX = "edge-"
SUBNET = "10.77"

_lock = threading.Lock()
_octets = itertools.count(10)   # X in 10.77.X.0/30 (each namespace its own /30 by its third octet)
_checked: tuple[bool, str] | None = None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def _used_octets() -> set[int]:
    r = _ip("-4", "-o", "addr", "show", check=False)
    used = set()
    for line in r.stdout.splitlines():
        for part in line.split():
            if part.startswith(SUBNET + "."):
                try:
                    used.add(int(part.split(".")[2]))
                except (IndexError, ValueError):
                    pass
    return used


def why_not() -> str:
    """'' when namespaces can be made here; otherwise the reason."""
    global _checked
    if _checked is None:
        _checked = _probe()
    return _checked[1]


def can_make_namespaces() -> bool:
    return why_not() == ""


def _probe() -> tuple[bool, str]:
    if os.name != "posix" or os.geteuid() != 0:
        return False, "network namespaces need root (tests are not running as root)"
    if shutil.which("ip") is None:
        return False, "the `ip` command (iproute2) is not installed"
    name = f"{PREFIX}probe-{uuid.uuid4().hex[:6]}"
    try:
        r = _ip("netns", "add", name, check=False)
        if r.returncode != 0:
            return False, f"`ip netns add` failed: {r.stderr.strip()}"
        r = subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                           capture_output=True, text=True, timeout=20)
        if r.returncode != 0:
            return False, f"`ip netns exec` failed: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", name, check=False)
    return True, ""


class Namespace:
    """One namespace with a veth pair to the host. `address` is the namespace side, `host_address` ours."""

    def __init__(self, name: str, octet: int, host_if: str, ns_if: str):
        self.name, self.octet, self.host_if, self.ns_if = name, octet, host_if, ns_if
        self.host_address = f"{SUBNET}.{octet}.1"
        self.address = f"{SUBNET}.{octet}.2"
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []   # what to undo: "netns", "veth"

    @classmethod
    def create(cls) -> "Namespace":
        tag = uuid.uuid4().hex[:8]
        with _lock:
            used = _used_octets()
            octet = next(o for o in _octets if o not in used and o < 250)
        ns = cls(PREFIX + tag, octet, "veA" + tag, "veB" + tag)
        try:
            _ip("netns", "add", ns.name)
            ns._made.append("netns")
            _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if)
            ns._made.append("veth")
            _ip("link", "set", ns.ns_if, "netns", ns.name)
            _ip("addr", "add", f"{ns.host_address}/30", "dev", ns.host_if)
            _ip("link", "set", ns.host_if, "up")
            ns.exec_ok("ip", "addr", "add", f"{ns.address}/30", "dev", ns.ns_if)
            ns.exec_ok("ip", "link", "set", ns.ns_if, "up")
            ns.exec_ok("ip", "link", "set", "lo", "up")
        except BaseException:
            ns.destroy()
            raise
        return ns

    def argv(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def exec_ok(self, *cmd: str) -> subprocess.CompletedProcess:
        r = subprocess.run(self.argv(list(cmd)), capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"in {self.name}: {' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv(cmd), **kw)
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)

    def pids(self) -> list[int]:
        """Whatever still runs in the namespace (`ip netns pids`)."""
        r = _ip("netns", "pids", self.name, check=False)
        return [int(p) for p in r.stdout.split() if p.isdigit()]

    def destroy(self) -> None:
        """Stop (and wait for) every process started here, then delete the veth and the namespace."""
        for proc in self.procs:
            try:
                self.stop(proc)
            except Exception:  # noqa: BLE001 - keep tearing down
                pass
        for pid in self.pids() if "netns" in self._made else []:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        if "veth" in self._made:
            _ip("link", "del", self.host_if, check=False)   # deletes the peer too
        if "netns" in self._made:
            _ip("netns", "del", self.name, check=False)
        self._made.clear()

    def exists(self) -> bool:
        return self.name in _ip("netns", "list", check=False).stdout.split()
