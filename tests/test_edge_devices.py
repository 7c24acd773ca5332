"""Edge devices as separate hosts: each device a network namespace (tests/netns.py) running the real agent
on its own veth address; a devices file (edge.devices); deploys over HTTP to two devices and over SSH
(scp + a remote install through the device's local agent) with status and rollback; refusals (no token,
wrong token, a broken ssh setup) and every kind of devices-file mistake.

Skips, with the reason, when namespaces cannot be made here (not root, no `ip netns`) or sshd is missing."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edge.client import EdgeClient, EdgeError
from edge.devices import Device, DevicesError, load_devices
from edge.keys import init_keys
from edge.package import build_package
from edge.transports import TransportError, deploy_to, rollback, status_of
from exporters.bundle import read_bundle

from . import netns
from .conftest import ROOT

AGENT_PORT = 8750
SFTP_SERVER_CANDIDATES = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server",
                          "/usr/libexec/sftp-server", "/usr/lib/ssh/sftp-server")


# --------------------------------------------------------------------------------------------- helpers

def _toy_bundle(home: Path, model: str = "torch") -> Path:
    run = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    stage = next(s for s in run["stages"] if s["name"] == f"bundle:{model}")
    return Path(stage["path"]) / "bundle"


def _wait(what: str, ok, *, timeout: float = 60, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ok():
                return
        except Exception:  # noqa: BLE001 - not yet
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited {proc.returncode}: "
                                 f"{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not ready after {timeout:g} s: {log.read_text()[-3000:] if log else ''}")
        time.sleep(0.1)


def _port_open(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=1):
        return True


def toml_devices(path: Path, devices: dict[str, dict]) -> Path:
    lines = []
    for name, fields in devices.items():
        lines.append(f"[device.{name}]")
        for k, v in fields.items():
            lines.append(f"{k} = {json.dumps(v) if isinstance(v, str) else v}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def assert_serves_reference(client: EdgeClient, reference, rows: int = 5, atol: float = 1e-5) -> None:
    got = client.predict({"input": reference["x"][:rows]})["output"]
    np.testing.assert_allclose(got, reference["y"][:rows], atol=atol, rtol=0)


class DeviceHost:
    """A namespace running `python -m edge.agent --host <its veth address> --port 8750`."""

    def __init__(self, work: Path, public_key: Path, label: str):
        self.label, self.work = label, work
        self.token = f"{label}-token-{uuid.uuid4().hex[:8]}"
        self.ns = netns.Namespace.create()
        self.root = work / f"{label}-root"
        self.log_path = work / f"{label}-agent.log"
        self._log = open(self.log_path, "w")
        try:
            self._start(public_key)
        except BaseException:
            self.close()      # a device that did not come up leaves no namespace or process behind
            raise

    def _start(self, public_key: Path) -> None:
        work, label = self.work, self.label
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        env.update({"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"})
        self.proc = self.ns.popen(
            [sys.executable, "-m", "edge.agent", "--root", str(self.root), "--public-key", str(public_key),
             "--token", self.token, "--host", self.ns.address, "--port", str(AGENT_PORT),
             "--ready-file", str(work / f"{label}-ready.json")],
            cwd=work, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.address = f"{self.ns.address}:{AGENT_PORT}"
        self.client = EdgeClient(f"http://{self.address}", self.token, timeout=120)
        # from the host, through the veth: the agent is up when /health answers there
        _wait(f"the agent in {self.ns.name}", lambda: self.client.health()["status"] == "ok",
              proc=self.proc, log=self.log_path)

    def close(self) -> None:
        try:
            self.ns.destroy()
        finally:
            self._log.close()


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def namespaces_or_skip():
    if not netns.can_make_namespaces():
        pytest.skip(f"edge devices as network namespaces: {netns.why_not()}")


@pytest.fixture(scope="module")
def edge(toy_run, tmp_path_factory):
    home, _ = toy_run
    tmp = tmp_path_factory.mktemp("edge_devices")
    bundle = read_bundle(_toy_bundle(home))
    priv, pub = init_keys(tmp / "keys")
    built: dict[int, Path] = {}

    def package(version: int) -> Path:
        if version not in built:
            built[version] = build_package(bundle, tmp / f"torch-v{version}.tar.gz", priv, version=version)
        return built[version]

    return {"tmp": tmp, "public": pub, "package": package, "reference": bundle.reference()}


@pytest.fixture(scope="module")
def hosts(namespaces_or_skip, edge, request):
    made: list[DeviceHost] = []

    def teardown():
        for h in made:
            h.close()
        leftover = [h.ns.name for h in made if h.ns.exists()]
        assert not leftover, f"namespaces left behind: {leftover}"

    request.addfinalizer(teardown)
    for label in ("dev-a", "dev-b"):
        made.append(DeviceHost(edge["tmp"], edge["public"], label))
    return {h.label: h for h in made}


def _sftp_server() -> str | None:
    return next((p for p in SFTP_SERVER_CANDIDATES if os.path.isfile(p)), None)


@pytest.fixture(scope="module")
def sshd(hosts, tmp_path_factory, request):
    """sshd inside dev-b's namespace on its veth address, with its own host key and one client key."""
    missing = [c for c in ("sshd", "ssh", "scp", "ssh-keygen") if shutil.which(c) is None]
    if missing:
        pytest.skip(f"the ssh transport needs OpenSSH: {', '.join(missing)} not installed")
    sftp = _sftp_server()
    if sftp is None:
        pytest.skip(f"the ssh transport needs sftp-server (OpenSSH 9 scp uses sftp); none of "
                    f"{', '.join(SFTP_SERVER_CANDIDATES)}")
    host = hosts["dev-b"]
    tmp = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / key)], check=True,
                       capture_output=True, timeout=30)
    (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
    os.chmod(tmp / "authorized_keys", 0o600)
    config = tmp / "sshd_config"
    config.write_text("\n".join([
        "Port 22", f"ListenAddress {host.ns.address}", f"HostKey {tmp / 'host_key'}",
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}", "PermitRootLogin yes", "UsePAM no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "StrictModes no",
        f"PidFile {tmp / 'sshd.pid'}", f"Subsystem sftp {sftp}", "LogLevel ERROR", ""]))
    privsep = Path("/run/sshd")    # sshd refuses to start without its privilege separation folder
    made_privsep = not privsep.exists()
    if made_privsep:
        privsep.mkdir(mode=0o755, parents=True)

    def cleanup():
        if made_privsep:
            shutil.rmtree(privsep, ignore_errors=True)
    request.addfinalizer(cleanup)   # runs after the one below (finalizers run last-in first-out)

    log_path = tmp / "sshd.log"
    log = open(log_path, "w")
    proc = host.ns.popen([shutil.which("sshd"), "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)

    def stop():
        netns.Namespace.stop(proc)
        log.close()
    request.addfinalizer(stop)
    _wait(f"sshd in {host.ns.name}", lambda: _port_open(host.ns.address, 22), proc=proc, log=log_path, timeout=30)
    return {"tmp": tmp, "key": tmp / "client_key", "host": host, "log": log_path}


def _device_file(tmp: Path, hosts, *, ssh=None) -> Path:
    (tmp / "tokens").mkdir(exist_ok=True)
    (tmp / "tokens" / "dev-a").write_text(hosts["dev-a"].token + "\n")
    devices = {"dev-a": {"address": hosts["dev-a"].address, "transport": "http", "token_file": "tokens/dev-a"},
               "dev-b": {"address": hosts["dev-b"].address, "token": hosts["dev-b"].token}}
    if ssh is not None:
        b = hosts["dev-b"]
        devices["dev-b-ssh"] = {
            "address": b.ns.address, "transport": "ssh", "token": b.token, "ssh_user": "root",
            "ssh_key": str(ssh["key"]), "ssh_port": 22, "remote_dir": str(ssh["tmp"] / "incoming"),
            # the agent listens on its veth address only; as seen from inside the device, that is its URL
            "agent_url": f"http://{b.address}", "python": sys.executable, "pythonpath": str(ROOT)}
    return toml_devices(tmp / f"devices-{uuid.uuid4().hex[:6]}.toml", devices)


def _ensure_version(host: DeviceHost, edge, version: int) -> None:
    if host.client.status()["version"] != version:
        host.client.push(edge["package"](version), allow_downgrade=True)


# --------------------------------------------------------------------------------------------- tests

def test_namespace_helpers_leave_nothing_behind(namespaces_or_skip):
    ns = netns.Namespace.create()
    try:
        assert ns.exists() and ns.address.startswith("10.77.") and ns.address.endswith(".2")
        r = ns.exec_ok("ip", "-4", "-o", "addr", "show")
        assert ns.address in r.stdout and "127.0.0.1" in r.stdout    # own loopback, up, and the veth end
        sleeper = ns.popen(["sleep", "30"])
        _wait("sleep inside the namespace", lambda: sleeper.pid in ns.pids(), timeout=10)   # after its setns()
    finally:
        ns.destroy()
    assert sleeper.poll() is not None
    assert not ns.exists()
    assert ns.host_if not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout


@pytest.mark.e2e
def test_one_package_to_two_devices_over_http(hosts, edge):
    devices = load_devices(_device_file(edge["tmp"], hosts))
    assert {d.transport for d in devices.values()} == {"http"}
    pkg = edge["package"](1)
    for name in ("dev-a", "dev-b"):
        report = deploy_to(devices[name], pkg)
        assert report["passed"] is True and report["version"] == 1 and report["model"] == "torch"
        assert set(report["variants"]) == {"fp32", "fp16", "int8"}
        assert all(r["passed"] for r in report["variants"].values())
        t = report["transport"]
        assert t["kind"] == "http" and t["device"] == name and t["package_bytes"] == pkg.stat().st_size
        print(f"http push to {name} ({devices[name].address}): {t['total_s']:.3f} s for {t['package_bytes']} bytes")
    for name in ("dev-a", "dev-b"):
        d = devices[name]
        assert status_of(d)["version"] == 1
        assert_serves_reference(EdgeClient(d.url, d.token), edge["reference"])
    # two hosts, two agents: each has its own root, and each answers only on its own address
    assert hosts["dev-a"].ns.address != hosts["dev-b"].ns.address
    assert (hosts["dev-a"].root / "active.json").is_file() and (hosts["dev-b"].root / "active.json").is_file()


@pytest.mark.e2e
def test_a_push_without_the_token_is_refused_and_the_old_version_answers(hosts, edge):
    host = hosts["dev-a"]
    _ensure_version(host, edge, 1)
    pkg = edge["package"](2)
    with pytest.raises(EdgeError) as e:
        EdgeClient(f"http://{host.address}", None).push(pkg)
    assert e.value.status == 401
    wrong = Device(name="dev-a", address=host.address, transport="http", token="not-the-token")
    with pytest.raises(TransportError) as e:
        deploy_to(wrong, pkg)
    assert e.value.status == 401 and e.value.step == "push" and "dev-a" in str(e.value)
    assert host.client.status()["version"] == 1
    assert_serves_reference(host.client, edge["reference"])


@pytest.mark.e2e
def test_deploy_status_and_rollback_over_ssh(hosts, sshd, edge):
    host = hosts["dev-b"]
    _ensure_version(host, edge, 1)
    device = load_devices(_device_file(edge["tmp"], hosts, ssh=sshd))["dev-b-ssh"]
    assert device.transport == "ssh" and device.agent_url == f"http://{host.address}"

    pkg2 = edge["package"](2)
    report = deploy_to(device, pkg2)
    assert report["passed"] is True and report["version"] == 2
    t = report["transport"]
    assert t["kind"] == "ssh" and t["remote_path"].startswith(device.remote_dir)
    print(f"ssh deploy to {device.name} ({device.host}): copy {t['copy_s']:.3f} s, install {t['install_s']:.3f} s, "
          f"total {t['total_s']:.3f} s for {t['package_bytes']} bytes")
    assert list((sshd["tmp"] / "incoming").iterdir()) == []          # the copy is removed after the install

    status = status_of(device)
    assert status["version"] == 2 and status["previous"]["version"] == 1
    assert_serves_reference(host.client, edge["reference"])

    back = rollback(device)
    assert back["version"] == 1 and back["rolled_back_from"].endswith("-v2")
    assert status_of(device)["version"] == 1 and host.client.status()["version"] == 1

    # the agent's refusals come back through ssh with their status
    with pytest.raises(TransportError) as e:
        rollback(device)
    assert e.value.step == "rollback" and e.value.status == 409 and "no previous version" in str(e.value)
    with pytest.raises(TransportError) as e:
        deploy_to(device, edge["package"](1))
    assert e.value.step == "install" and e.value.status == 409


@pytest.mark.e2e
def test_ssh_failures_name_the_device_the_step_and_the_remote_stderr(hosts, sshd, edge):
    device = load_devices(_device_file(edge["tmp"], hosts, ssh=sshd))["dev-b-ssh"]
    pkg = edge["package"](3)
    other_key = sshd["tmp"] / "not_authorized"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True,
                   capture_output=True, timeout=30)
    fields = {k: getattr(device, k) for k in Device.__dataclass_fields__}
    with pytest.raises(TransportError) as e:
        deploy_to(Device(**{**fields, "ssh_key": other_key}), pkg)
    assert e.value.step == "copy" and "dev-b-ssh" in str(e.value) and "Permission denied" in e.value.stderr
    with pytest.raises(TransportError) as e:
        deploy_to(Device(**{**fields, "python": "/nonexistent/python3"}), pkg)
    assert e.value.step == "install" and "/nonexistent/python3" in e.value.stderr
    with pytest.raises(TransportError) as e:
        deploy_to(Device(**{**fields, "token": "wrong"}), pkg)
    assert e.value.step == "install" and e.value.status == 401
    assert hosts["dev-b"].client.status()["version"] == 1
    assert list((sshd["tmp"] / "incoming").iterdir()) == []          # no copy left behind by any failure


_SSH = {"address": "10.77.0.2:8750", "transport": "ssh", "token": "t", "ssh_user": "root", "ssh_key": "k",
        "remote_dir": "/tmp/in"}


@pytest.mark.parametrize("fields, where, message", [
    ({"address": "10.77.0.2:8750", "token": "t", "colour": "red"}, "[device.d] colour", "unknown key"),
    ({"token": "t"}, "[device.d] address", "missing"),
    ({"address": "10.77.0.2", "token": "t"}, "[device.d] address", "expected \"host:port\""),
    ({"address": "10.77.0.2:99999", "token": "t"}, "[device.d] address", "1 to 65535"),
    ({"address": "10.77.0.2:8750", "transport": "ftp", "token": "t"}, "[device.d] transport",
     "expected one of 'http', 'ssh', found str 'ftp'"),
    ({"address": "10.77.0.2:8750"}, "[device.d] token", "missing"),
    ({"address": "10.77.0.2:8750", "token": "t", "token_file": "f"}, "[device.d] token", "found both"),
    ({"address": "10.77.0.2:8750", "token_file": "nope.txt"}, "[device.d] token_file", "could not read"),
    ({"address": "10.77.0.2:8750", "token": "t", "ssh_user": "root"}, "[device.d] ssh_user",
     "only for transport \"ssh\""),
    ({"address": "10.77.0.2:8750", "transport": "ssh", "token": "t"}, "[device.d] ssh_user",
     "missing ssh_user, ssh_key, remote_dir"),
    ({**_SSH, "ssh_port": "22"}, "[device.d] ssh_port", "expected an integer"),
    ({**_SSH, "address": "10.77.0.2"}, "[device.d] agent_url", "missing"),
    ({**_SSH, "remote_dir": "in"}, "[device.d] remote_dir", "absolute path"),
])
def test_a_devices_file_with_a_mistake_is_refused_with_its_message(tmp_path, fields, where, message):
    path = toml_devices(tmp_path / "devices.toml", {"d": fields})
    with pytest.raises(DevicesError) as e:
        load_devices(path)
    text = str(e.value)
    assert text.startswith(str(path)) and where in text and message in text, text


def test_devices_file_level_mistakes_and_a_good_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[device.d\naddress = 1\n")
    with pytest.raises(DevicesError, match="not valid TOML"):
        load_devices(bad)
    bad.write_text("[devices.d]\naddress = \"h:1\"\n")
    with pytest.raises(DevicesError, match="unknown top-level key .*'devices'"):
        load_devices(bad)
    with pytest.raises(DevicesError, match="could not read"):
        load_devices(tmp_path / "missing.toml")
    (tmp_path / "secret").write_text("s3cret\n")
    good = toml_devices(tmp_path / "good.toml", {
        "a": {"address": "10.77.0.2:8750", "token_file": "secret"},
        "b": {**_SSH, "address": "10.77.0.6:8751", "ssh_key": "keys/id"}})
    devices = load_devices(good)
    assert devices["a"].token == "s3cret" and devices["a"].transport == "http" and devices["a"].url == "http://10.77.0.2:8750"
    b = devices["b"]
    assert b.host == "10.77.0.6" and b.ssh_port == 22 and b.agent_url == "http://127.0.0.1:8751"
    assert b.ssh_key == tmp_path / "keys" / "id" and b.python == "python3"
    assert "s3cret" not in repr(devices["a"])


def test_a_spec_with_edge_targets_deploys_to_both_devices_and_proves_tfjs_in_the_browser(hosts, edge, toy_run, tmp_path):
    """`run` with [deploy.edge]: every model packaged, signed with the home's key, pushed to both devices,
    checked there, and its TF.js web bundle run in headless Chromium; all of it in the run's report."""
    from pipeline.keys import keys_dir
    from .conftest import copy_home, run_cli
    if not shutil.which("chromium"):
        pytest.skip("no chromium on PATH (scripts/setup.sh --test installs it)")
    home = copy_home(toy_run[0], tmp_path / "home")
    keys_dir(home).mkdir(parents=True)
    for pem in (edge["tmp"] / "keys").iterdir():  # the key the devices were given
        shutil.copy2(pem, keys_dir(home) / pem.name)
    devices = _device_file(tmp_path, hosts)
    spec = tmp_path / "edge.toml"
    spec.write_text((ROOT / "pipeline" / "specs" / "toy.toml").read_text() +
                    f'\n[deploy.edge]\ndevices = "{devices.name}"\ntargets = ["dev-a", "dev-b"]\nbrowser = true\n')
    r = run_cli("run", str(spec), "--no-track", home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    parity = json.loads((Path(rec["report_dir"]) / "parity.json").read_text())
    on_devices = {(x["model"], x["runtime"], x["variant"]): x["status"] for x in parity["records"] if x["format"] == "edge"}
    assert on_devices == {(m, f"edge:{d}", v): "passed" for m in ("keras", "torch") for d in ("dev-a", "dev-b")
                          for v in ("fp32", "fp16", "int8")}
    lat = next(x for x in parity["records"] if x["format"] == "edge")["details"]["latency"]
    assert lat["p50_ms"] > 0 and lat["p99_ms"] >= lat["p50_ms"]
    browser = {(x["model"], x["runtime"]): x["status"] for x in parity["records"] if x["format"] == "tfjs_web"}
    assert browser == {(m, f"chromium-{b}"): "passed" for m in ("keras", "torch") for b in ("cpu", "wasm", "webgl")}
    # the ONNX and LiteRT fp32 artifacts in the browser too: onnxruntime-web and LiteRT.js, wasm and webgpu;
    # LiteRT.js cannot run the keras model's dynamic-batch signature, which its skipped cell says
    web = {(x["model"], x["format"], x["runtime"]): x["status"] for x in parity["records"]
           if x["format"] in ("onnx_web", "litert_web")}
    assert web == {**{(m, "onnx_web", f"onnxruntime-web-{b}"): "passed" for m in ("keras", "torch")
                      for b in ("wasm", "webgpu")},
                   **{("torch", "litert_web", f"litertjs-{b}"): "passed" for b in ("wasm", "webgpu")},
                   ("keras", "litert_web", None): "skipped"}, web
    skipped = next(x for x in parity["records"] if x["format"] == "litert_web" and x["model"] == "keras")
    assert "dynamic dimension" in skipped["reason"], skipped
    shots = sorted(p.name for p in Path(rec["report_dir"]).glob("browser_*.png"))
    assert len(shots) == 6 + 6 and all((Path(rec["report_dir"]) / s).stat().st_size > 1000 for s in shots), shots
    assert_serves_reference(hosts["dev-a"].client, edge["reference"])  # the device answers with the new version


def test_deploy_to_a_device_that_finds_one_variant_out_of_parity_refuses_it_and_names_it(hosts, edge, toy_run,
                                                                                          tmp_path):
    """`deploy --to`: a run whose int8 LiteRT models alone were changed (the bundles' digests updated, so the
    packages are signed cleanly) is refused by the device; the output names int8 as the variant that failed
    on the device, the command fails, and the device keeps its previous version."""
    from pipeline.keys import keys_dir
    from .conftest import copy_home, run_cli
    from .test_edge import break_variant
    home = copy_home(toy_run[0], tmp_path / "home")
    record = sorted((home / ".pipeline" / "runs").glob("*.json"))[-1]   # its bundles: the copy's, not the original's
    record.write_text(record.read_text().replace(str(toy_run[0]), str(home)))
    for stage in json.loads(record.read_text())["stages"]:
        if stage["name"].startswith("bundle:"):
            assert stage["path"].startswith(str(home))
            break_variant(Path(stage["path"]) / "bundle", "int8")
    keys_dir(home).mkdir(parents=True)
    for pem in (edge["tmp"] / "keys").iterdir():  # signed with the key the devices trust
        shutil.copy2(pem, keys_dir(home) / pem.name)
    device = hosts["dev-a"]
    if device.client.status()["active"] is None:   # alone, this test needs a version to keep
        device.client.push(edge["package"](1))
    before = device.client.status()
    x = edge["reference"]["x"][:5]
    answers = device.client.predict({"input": x})["output"]
    r = run_cli("deploy", "--to", "dev-a", "--devices", str(_device_file(tmp_path, hosts)), home=home)
    assert r.returncode == 1, r.stdout + r.stderr
    refusals = [l for l in r.stdout.splitlines() if " refused: " in l]
    assert len(refusals) == 2 and all("the agent answered 422: on-device parity failed for int8 (" in l
                                      for l in refusals), r.stdout   # one per model, naming int8 alone
    rows = {tuple(l.split()[:2]): l for l in r.stdout.splitlines() if l.startswith("edge:dev-a ")}
    assert len(rows) == 6, r.stdout   # 2 models x 3 variants
    for model in ("keras", "torch"):
        int8 = rows["edge:dev-a", f"{model}/int8"]
        assert "FAILED  FAIL" in int8 and "max abs" in int8, r.stdout   # the device's own finding
        for v in ("fp32", "fp16"):
            assert rows["edge:dev-a", f"{model}/{v}"].endswith(
                "passed on the device, but the version was not activated: on-device parity failed for int8"), r.stdout
    after = device.client.status()
    assert (after["model"], after["version"]) == (before["model"], before["version"]), (before, after)
    assert after["last_push"]["outcome"] == "rejected"
    assert "on-device parity failed for int8" in after["last_push"]["error"], after["last_push"]
    np.testing.assert_array_equal(device.client.predict({"input": x})["output"], answers)  # the old one answers


def test_keys_init_then_deploy_a_run_to_a_device_from_the_command_line(hosts, edge, toy_run, tmp_path):
    from pipeline.keys import keys_dir
    from .conftest import copy_home, run_cli
    home = copy_home(toy_run[0], tmp_path / "home")
    made = run_cli("keys", "init", home=home)
    assert made.returncode == 0 and "public key (give it to each device agent)" in made.stdout, made.stderr
    again = run_cli("keys", "init", home=home)
    assert again.returncode == 2 and "already there" in again.stderr  # a second key would orphan every device
    for pem in (edge["tmp"] / "keys").iterdir():  # sign with the key the running devices trust
        shutil.copy2(pem, keys_dir(home) / pem.name)
    devices = _device_file(tmp_path, hosts)
    r = run_cli("deploy", "--to", "dev-b", "--devices", str(devices), "--variants", "fp32,int8", home=home)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [l for l in r.stdout.splitlines() if l.startswith("edge:dev-b")]
    assert len(rows) == 4 and all("PASSED" in l and "p50" in l for l in rows), r.stdout  # 2 models x 2 variants
    assert_serves_reference(hosts["dev-b"].client, edge["reference"])
