"""The TF Serving deploy target: from model bundles to a deployment folder, a running server and a
blessing.

    deployment/
      models/<model>/<version>/     the SavedModel and its warmup requests (TF Serving's layout)
      models.config                 ModelServerConfig with the container's paths (/models/<model>);
                                    local_config() gives the same with this machine's paths
      examples.json                 one REST request body per model (the first parity row)
      batching.config               when [deploy.serving] batching = true
      Dockerfile, docker-commands.txt

The spec's `[deploy.serving]` table is validated here (`settings`), so `validate` catches a bad one.
The server is the container when the spec asks for it (`docker = true`) and an engine answers, else
the local one, which speaks the same API.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from exporters.bundle import Bundle

CONTAINER_MODELS = "/models"  # where the Dockerfile copies the repository
KEYS = {"version", "policy", "labels", "batching", "docker", "timeout_s", "transports"}
POLICIES = ("latest", "all", "specific")


class TargetError(ValueError):
    """A bad `[deploy.serving]` value: `key`, what was expected, what was found."""

    def __init__(self, key: str, expected: str, found: Any):
        super().__init__(f"{key}: expected {expected}, found {found!r}")
        self.key, self.expected, self.found = key, expected, found


@dataclass(frozen=True)
class ServingSettings:
    version: int = 1
    policy: str = "latest"
    labels: dict[str, int] = field(default_factory=dict)   # default: {"stable": version}
    batching: bool = False
    docker: bool = False        # run the container when an engine answers (else the local server)
    timeout_s: float = 60.0     # to wait for AVAILABLE
    transports: tuple[str, ...] = ("grpc", "rest")


def settings(table: dict, where: str = "deploy.serving") -> ServingSettings:
    """The `[deploy.serving]` table, checked; raises TargetError naming the key."""
    if not isinstance(table, dict):
        raise TargetError(where, "a table", table)
    for key in table:
        if key not in KEYS:
            raise TargetError(f"{where}.{key}", f"one of the keys {', '.join(sorted(KEYS))}", key)

    def whole(key, default):
        v = table.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TargetError(f"{where}.{key}", "a positive integer", v)
        return v
    version = whole("version", 1)
    policy = table.get("policy", "latest")
    if policy not in POLICIES:
        raise TargetError(f"{where}.policy", f"one of {', '.join(POLICIES)}", policy)
    labels = table.get("labels", {"stable": version})
    if not isinstance(labels, dict) or not all(isinstance(k, str) and k and isinstance(v, int)
                                               and not isinstance(v, bool) for k, v in labels.items()):
        raise TargetError(f"{where}.labels", "a table of label = version (e.g. { stable = 1 })", labels)
    if any(v != version for v in labels.values()):
        raise TargetError(f"{where}.labels", f"labels naming the deployed version {version} (one version is "
                                             f"deployed per run)", labels)
    flags = {}
    for key in ("batching", "docker"):
        flags[key] = table.get(key, False)
        if not isinstance(flags[key], bool):
            raise TargetError(f"{where}.{key}", "true or false", flags[key])
    timeout = table.get("timeout_s", 60.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise TargetError(f"{where}.timeout_s", "a positive number of seconds", timeout)
    transports = table.get("transports", ["grpc", "rest"])
    if not isinstance(transports, list) or not transports or not set(transports) <= {"grpc", "rest", "v2-rest"}:
        raise TargetError(f"{where}.transports", "a non-empty list of \"grpc\", \"rest\" and \"v2-rest\"",
                          transports)
    if flags["docker"] and "v2-rest" in transports:  # TF Serving's own image speaks its API, not the v2 protocol
        raise TargetError(f"{where}.transports", "\"grpc\" and \"rest\" with docker = true (the tensorflow/serving "
                                                 "image has no Open Inference Protocol)", transports)
    return ServingSettings(version, policy, dict(labels), flags["batching"], flags["docker"], float(timeout),
                           tuple(dict.fromkeys(transports)))


def write_deployment(bundles: list[Bundle], out: Path, s: ServingSettings) -> dict:
    """The deployment folder for these bundles; returns what was written (paths relative to `out`)."""
    from .config import ModelEntry, write_batching_parameters, write_model_config
    from .container import write_container
    from .repository import write_repository
    from .repository import passed_saved_model, serving_feed
    out.mkdir(parents=True, exist_ok=True)
    repo = out / "models"
    examples = {}
    for b in bundles:
        write_repository(b, repo, version=s.version)
        first_row = {k: v[:1].tolist() for k, v in serving_feed(b, passed_saved_model(b)).items()}
        examples[b.model] = {"inputs": first_row}  # a REST request body people can paste into curl
    (out / "examples.json").write_text(json.dumps(examples, indent=2))

    def entries(base: Callable[[str], str]) -> list[ModelEntry]:
        return [ModelEntry(b.model, base(b.model), policy=s.policy,
                           versions=[s.version] if s.policy == "specific" else [], labels=dict(s.labels))
                for b in bundles]
    write_model_config(out / "models.config", entries(lambda m: f"{CONTAINER_MODELS}/{m}"))
    batching = None
    if s.batching:
        batching = write_batching_parameters(out / "batching.config", max_batch_size=32, batch_timeout_micros=1000,
                                             max_enqueued_batches=100, num_batch_threads=2)
    plan = write_container(out, repository_dir=repo, config_path=out / "models.config", batching_path=batching)
    return {"plan": plan, "repository": "models", "config": "models.config",
            "batching": "batching.config" if batching else None, "dockerfile": plan.dockerfile.name,
            "docker_build": f"docker build -t {plan.tag} .", "docker_run": plan.run_command}


def local_config(folder: Path, dest: Path) -> Path:
    """The deployment's models.config with this machine's paths (the container's /models/<model> is
    <folder>/models/<model> here), written to `dest`: what the local server loads. The deployment folder
    itself holds no machine path, so it can be moved, copied or built into an image as it is."""
    from google.protobuf import text_format
    from .config import read_model_config
    config = read_model_config(folder / "models.config")
    for c in config.model_config_list.config:
        if c.base_path.startswith(CONTAINER_MODELS + "/"):
            c.base_path = str((folder / "models" / c.base_path[len(CONTAINER_MODELS) + 1:]).resolve())
    dest.write_text(text_format.MessageToString(config))
    return dest


def deploy_and_bless(bundles: list[Bundle], out: Path, s: ServingSettings,
                     log: Callable[[str], None] = print) -> dict:
    """Write the deployment, start the server, wait until every model is AVAILABLE, bless each over
    every transport, stop the server. Returns the written files, the server used, and per model its
    blessing (the ParityRecords as JSON, blessed = every transport passed)."""
    from .client import ServingClient
    from .container import docker_available
    written = write_deployment(bundles, out, s)
    plan = written.pop("plan")
    use_docker = s.docker and docker_available()
    if s.docker and not use_docker:
        log("docker = true, but no container engine answers `docker info`: blessing on the local server, "
            "which speaks the same API (the container's commands are in docker-commands.txt)")
    t0 = time.perf_counter()
    with (_container(plan, log) if use_docker else _local_server(out, s, log)) as (kind, grpc_port, rest_port):
        blessings = {}
        with ServingClient("127.0.0.1", grpc_port=grpc_port, rest_port=rest_port) as client:
            for b in bundles:
                client.wait_until_available(b.model, version=s.version, timeout_s=s.timeout_s)
            ready_s = time.perf_counter() - t0
            from .bless import bless
            for b in bundles:
                records = bless(b, client, version=s.version, transports=s.transports)
                blessings[b.model] = {"blessed": all(r.passed for r in records),
                                      "records": [r.to_json() for r in records]}
    return {"written": written, "server": {"kind": kind, "ready_s": ready_s,
                                           "grpc_port": grpc_port, "rest_port": rest_port},
            "settings": {**asdict(s), "transports": list(s.transports)}, "blessings": blessings,
            "summary": ", ".join(f"{m} {'blessed' if v['blessed'] else 'NOT blessed'}" for m, v in blessings.items())}


@contextlib.contextmanager
def _local_server(out: Path, s: ServingSettings, log):
    """The local server on the deployment, on free ports: ("local", grpc port, rest port)."""
    import tempfile
    from .server import LocalServer
    config = local_config(out, Path(tempfile.mkdtemp(prefix="serving-")) / "models.local.config")
    with LocalServer(model_config_file=str(config), port=0, rest_api_port=0, enable_batching=s.batching,
                     batching_parameters_file=str(out / "batching.config") if s.batching else None,
                     file_system_poll_wait_seconds=0, log=log) as server:
        yield "local", server.grpc_port, server.rest_port


@contextlib.contextmanager
def _container(plan, log):
    """The real TF Serving: the image built and run detached with both ports published on free host
    ports of 127.0.0.1, stopped afterwards: ("docker", grpc port, rest port)."""
    import subprocess
    subprocess.run(plan.build_argv, check=True, stdout=subprocess.DEVNULL)
    run = ["docker", "run", "-d", "--rm", "-p", "127.0.0.1::8500", "-p", "127.0.0.1::8501", plan.tag]
    container = subprocess.run(run, check=True, capture_output=True, text=True).stdout.strip()
    log(f"container {container[:12]} from {plan.tag}")
    try:
        def host_port(port: int) -> int:
            out = subprocess.run(["docker", "port", container, str(port)], check=True, capture_output=True,
                                 text=True).stdout
            return int(out.split()[0].rsplit(":", 1)[1])
        yield "docker", host_port(8500), host_port(8501)
    finally:
        subprocess.run(["docker", "stop", container], check=False, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def dump(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.deploy BUNDLE... --out DIR`: the deployment folder of these bundles."""
    import argparse
    import sys
    from exporters.bundle import BundleError, read_bundle
    from .repository import RepositoryError
    p = argparse.ArgumentParser(prog="python -m serving.deploy", description=main.__doc__)
    p.add_argument("bundles", nargs="+", help="bundle folders (with manifest.json)")
    p.add_argument("--out", required=True, help="the deployment folder to write")
    p.add_argument("--version", type=int, default=1)
    args = p.parse_args(argv)
    try:
        written = write_deployment([read_bundle(Path(b)) for b in args.bundles], Path(args.out),
                                   settings({"version": args.version}))
    except (BundleError, RepositoryError, TargetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in written.items() if k != "plan"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
