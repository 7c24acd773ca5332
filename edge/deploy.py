"""The edge deploy target: from model bundles to signed packages pushed to devices, and the TF.js web
bundle proven in a real browser.

The spec's `[deploy.edge]` table is validated here (`settings`):

    [deploy.edge]
    devices = "devices.toml"           # the devices file (edge/devices.py), relative to the spec
    targets = ["dev-a", "dev-b"]       # which of its devices (default: all)
    variants = ["fp32", "int8"]         # which LiteRT variants to ship (default: every one)
    browser = true                     # the web bundle in headless Chromium (edge/web.py)

Each device's on-device report (parity per variant, latency p50/p99, bundle size) comes back as
ParityRecords of format `edge` (runtime `edge:<device>`), and the browser's as formats `tfjs_web` (TF.js,
runtime `chromium-<backend>` for cpu, wasm and webgl), `onnx_web` (onnxruntime-web, wasm and webgpu) and
`litert_web` (LiteRT.js, wasm and webgpu), with a screenshot per cell; an artifact its browser runtime
cannot run (LiteRT.js and a dynamic batch) is a skipped cell naming why.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

KEYS = {"devices", "targets", "variants", "browser"}


class TargetError(ValueError):
    """A bad `[deploy.edge]` value: `key`, what was expected, what was found."""

    def __init__(self, key: str, expected: str, found: Any):
        super().__init__(f"{key}: expected {expected}, found {found!r}")
        self.key, self.expected, self.found = key, expected, found


@dataclass(frozen=True)
class EdgeSettings:
    devices: str | None          # the devices file (absolute once the spec resolved it), None: browser only
    targets: tuple[str, ...]     # empty: every device in the file
    variants: tuple[str, ...]
    browser: bool


def settings(table: dict, base: Path | None = None, where: str = "deploy.edge") -> EdgeSettings:
    """The `[deploy.edge]` table checked (and its devices file read, so a bad one fails at load)."""
    if not isinstance(table, dict):
        raise TargetError(where, "a table", table)
    for key in table:
        if key not in KEYS:
            raise TargetError(f"{where}.{key}", f"one of the keys {', '.join(sorted(KEYS))}", key)
    devices = table.get("devices")
    if devices is not None and (not isinstance(devices, str) or not devices):
        raise TargetError(f"{where}.devices", "the path of a devices file", devices)
    path = str((base / devices).resolve()) if devices and base is not None else devices
    targets = table.get("targets", [])
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise TargetError(f"{where}.targets", "a list of device names", targets)
    if targets and not devices:
        raise TargetError(f"{where}.devices", "a devices file naming the targets", None)
    if path is not None:
        from .devices import DevicesError, load_devices
        try:
            known = load_devices(path)
        except DevicesError as e:
            raise TargetError(f"{where}.devices", "a readable devices file", str(e)) from None
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise TargetError(f"{where}.targets", f"devices of {path} ({', '.join(known)})", unknown)
    from exporters import variants as variants_of
    known = variants_of("litert")
    variants = table.get("variants", list(known))
    if not isinstance(variants, list) or not variants or not set(variants) <= set(known):
        raise TargetError(f"{where}.variants", f"a non-empty list among {', '.join(known)}", variants)
    browser = table.get("browser", False)
    if not isinstance(browser, bool):
        raise TargetError(f"{where}.browser", "true or false", browser)
    if path is None and not browser:
        raise TargetError(where, "devices to deploy to, or browser = true", table)
    return EdgeSettings(path, tuple(targets), tuple(dict.fromkeys(variants)), browser)


def deploy(bundles: list, s: EdgeSettings, out: Path, private_key: Path | None,
           log: Callable[[str], None] = print) -> dict:
    """Package each bundle, push it to every target device, verify its web bundle in the browser.
    Returns {"devices": {device: {model: report}}, "browser": {model: [results]}, "records": [...]}."""
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    result: dict = {"devices": {}, "browser": {}}
    if s.devices:
        from .devices import load_devices
        from .package import build_package
        from .transports import TransportError, deploy_to
        if private_key is None or not Path(private_key).is_file():
            raise TargetError("deploy.edge", "a signing key (python -m pipeline keys init)", str(private_key))
        devices = load_devices(s.devices)
        targets = s.targets or tuple(devices)
        version = int(time.time())  # later than any earlier push of this model: the agents refuse older ones
        for b in bundles:
            package = build_package(b, out / f"{b.model}-v{version}.tar.gz", Path(private_key),
                                    variants=s.variants, version=version)
            for name in targets:
                try:
                    report = deploy_to(devices[name], package)
                except TransportError as e:
                    log(f"edge:{name}: {b.model} v{version} refused: {e}")
                    # the agent's on-device report when it got that far (a 422 says which variants failed)
                    report = {**(e.body.get("report") or {}), "passed": False, "activated": False, "error": str(e)}
                    report.setdefault("variants", {})
                result["devices"].setdefault(name, {})[b.model] = report
                records += _device_records(b.model, name, s.variants, report)
    if s.browser:
        from parity.compare import ParityRecord
        from .web import browser_record, unsupported_cells, verify_in_browser, web_targets, write_web_bundle
        for b in bundles:
            web = write_web_bundle(b, out / "web" / b.model)
            results = verify_in_browser(web, web_targets(web), screenshot_dir=out / "screenshots")
            records += [browser_record(b, r) for r in results]
            # an artifact the bundle carries that its browser runtime cannot run: said, not run
            records += [ParityRecord.skipped(b.model, fmt, "fp32", why, skip="not-produced").to_json()
                        for fmt, why in unsupported_cells(web).items()]
            for r in results:  # the values are in the records; keep the summaries small
                (r.get("page") or {}).pop("outputs", None)
            result["browser"][b.model] = results
    result["records"] = records
    return result


def _device_records(model: str, device: str, variants, report: dict) -> list[dict]:
    """One record per variant: the agent's own ParityRecord (from check_artifact on the device), told
    apart by format and runtime, with the latency and size beside it. A refused push fails each variant:
    one the device found out of parity with its own record, the others naming the variants that kept the
    version from being activated (or the agent's error, when it never checked parity)."""
    out = []
    refused = report.get("activated") is False
    bad = [v for v, r in report.get("variants", {}).items() if not r.get("passed")]
    for v in variants:
        r = report.get("variants", {}).get(v)
        if r is None or (refused and r.get("passed")):
            if r is not None and bad:
                why = (f"passed on the device, but the version was not activated: on-device parity failed for "
                       f"{', '.join(bad)}")
            else:
                why = report.get("error") or f"the device reported no {v} variant"
            out.append({"model": model, "format": "edge", "variant": v, "runtime": f"edge:{device}", "status": "failed",
                        "error": why, "message": f"FAIL {model}/edge-{v} on edge:{device}: {why}"})
            continue
        rec = dict(r["record"], format="edge", runtime=f"edge:{device}")
        rec["details"] = {**rec.get("details", {}), "latency": r.get("latency"), "size_bytes": r.get("size_bytes"),
                          "device": report.get("device")}
        out.append(rec)
    return out
