"""A container for TF Serving: a Dockerfile over the official `tensorflow/serving` image (the version
of the installed TensorFlow) that copies the model repository to /models and the model config to
/models/models.config, plus the exact docker commands to build and run it.

`check_dockerfile` reads a Dockerfile the way a build would, without an engine: the FROM tag, every
COPY source inside the build context, the config (and batching) file the server is told to read being
one the image copies, each model's base_path in that config being a copied folder with a version, and
the server's ports exposed. `run_container` builds and runs only where `docker info` answers.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

IMAGE = "tensorflow/serving"
GRPC_PORT = 8500
REST_PORT = 8501
MODELS_DIR = "/models"
CONFIG_IN_IMAGE = "/models/models.config"
BATCHING_IN_IMAGE = "/models/batching.config"
SERVER = "tensorflow_model_server"
_VERSION = re.compile(r"^\d+\.\d+\.\d+(-[A-Za-z0-9.]+)?$")
_TAG = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$")


class ContainerError(RuntimeError):
    """A deploy folder that cannot become an image: says which path and what was expected."""


@dataclass
class ContainerPlan:
    deploy_dir: Path              # the build context
    dockerfile: Path
    commands_file: Path           # docker-commands.txt
    image: str                    # FROM, e.g. tensorflow/serving:2.21.0
    tag: str                      # what the image is built as
    build_argv: list[str]
    run_argv: list[str]
    server_argv: list[str] = field(default_factory=list)

    @property
    def build_command(self) -> str:
        return shlex.join(self.build_argv)

    @property
    def run_command(self) -> str:
        return shlex.join(self.run_argv)

    @property
    def commands(self) -> list[str]:
        return [self.build_command, self.run_command]


# ---------------------------------------------------------------------------------------------- write

def serving_version(tf_version: str | None = None) -> str:
    """The tensorflow/serving tag for a TensorFlow version (default: the installed one), e.g. 2.21.0."""
    if tf_version is None:
        from importlib import metadata
        for dist in ("tensorflow", "tensorflow-cpu", "tensorflow-intel"):
            try:
                tf_version = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            raise ContainerError("no TensorFlow is installed to take the tensorflow/serving version from: "
                                 "pass tf_version='2.21.0' (say)")
    m = re.match(r"^(\d+)\.(\d+)\.(\d+)(?:-?(rc\d+))?", str(tf_version))
    if not m:
        raise ContainerError(f"tf_version {tf_version!r}: expected a version such as 2.21.0")
    return f"{m[1]}.{m[2]}.{m[3]}" + (f"-{m[4]}" if m[4] else "")


def write_container(deploy_dir: Path, *, repository_dir: Path, config_path: Path, batching_path: Path | None = None,
                    tf_version: str | None = None, tag: str | None = None) -> ContainerPlan:
    """Write `<deploy_dir>/Dockerfile` and `docker-commands.txt`. The repository, the config and the
    batching file must lie inside deploy_dir (the build context). Refuses a plan whose Dockerfile
    check finds a problem."""
    deploy_dir = Path(deploy_dir).resolve()
    if not deploy_dir.is_dir():
        raise ContainerError(f"{deploy_dir}: expected the deploy folder (the build context), found "
                             f"{'a file' if deploy_dir.exists() else 'nothing'}")
    repo_rel = _inside(deploy_dir, repository_dir, "the model repository", want_dir=True)
    config_rel = _inside(deploy_dir, config_path, "the model config", want_dir=False)
    batching_rel = _inside(deploy_dir, batching_path, "the batching parameters", want_dir=False) if batching_path else None
    version = serving_version(tf_version)
    image = f"{IMAGE}:{version}"
    if tag is None:
        tag = _default_tag(deploy_dir / config_rel)
    if not _TAG.match(tag):
        raise ContainerError(f"tag {tag!r}: expected a docker image name such as tfserving-mymodel:latest "
                             f"(lowercase name, optional :tag)")

    server = [SERVER, f"--port={GRPC_PORT}", f"--rest_api_port={REST_PORT}", f"--model_config_file={CONFIG_IN_IMAGE}"]
    if batching_rel:
        server += ["--enable_batching", f"--batching_parameters_file={BATCHING_IN_IMAGE}"]
    lines = [f"# Written by serving/container.py: TF Serving {version} for the models in {config_rel}.",
             f"# Build and run: see docker-commands.txt beside this file.",
             f"FROM {image}",
             f"COPY {_copy_src(repo_rel)} {MODELS_DIR}",
             f"COPY {_copy_src(config_rel)} {CONFIG_IN_IMAGE}"]
    if batching_rel:
        lines.append(f"COPY {_copy_src(batching_rel)} {BATCHING_IN_IMAGE}")
    lines += [f"EXPOSE {GRPC_PORT} {REST_PORT}",
              f"ENTRYPOINT {json.dumps(server)}",
              "CMD []"]
    dockerfile = deploy_dir / "Dockerfile"
    dockerfile.write_text("\n".join(lines) + "\n")

    build = ["docker", "build", "-t", tag, str(deploy_dir)]
    run = ["docker", "run", "--rm", "-p", f"{GRPC_PORT}:{GRPC_PORT}", "-p", f"{REST_PORT}:{REST_PORT}", tag]
    commands = deploy_dir / "docker-commands.txt"
    plan = ContainerPlan(deploy_dir, dockerfile, commands, image, tag, build, run, server)
    # the file names the build context as "." so it holds wherever the folder is moved or copied
    commands.write_text(f"# in this folder ({deploy_dir.name}/):\n" +
                        "\n".join(shlex.join(a) for a in (build[:-1] + ["."], run)) + "\n")
    problems = check_dockerfile(dockerfile, tf_version=version)
    if problems:
        raise ContainerError(f"{dockerfile}: the Dockerfile written does not check: {'; '.join(problems)}")
    return plan


def _inside(root: Path, path: Path, what: str, *, want_dir: bool) -> str:
    p = Path(path)
    p = (p if p.is_absolute() else root / p).resolve()
    try:
        rel = p.relative_to(root)
    except ValueError:
        raise ContainerError(f"{what} {p}: expected it inside the build context {root} (docker COPY cannot "
                             f"reach outside it)") from None
    if want_dir and not p.is_dir() or not want_dir and not p.is_file():
        raise ContainerError(f"{what} {p}: expected a {'folder' if want_dir else 'file'}, found "
                             f"{'nothing' if not p.exists() else ('a file' if p.is_file() else 'a folder')}")
    if rel == Path("."):
        raise ContainerError(f"{what} {p}: expected a folder inside the build context {root}, not the context itself")
    return rel.as_posix()


def _copy_src(rel: str) -> str:
    if any(c.isspace() for c in rel) or '"' in rel:
        raise ContainerError(f"{rel!r}: expected a path without spaces or quotes for COPY")
    return rel


def _default_tag(config: Path) -> str:
    names = []
    try:
        from .config import read_model_config
        names = [c.name for c in read_model_config(config).model_config_list.config]
    except Exception:  # noqa: BLE001 - the check reports a bad config; the tag only needs a name
        pass
    stem = "-".join(re.sub(r"[^a-z0-9]+", "-", n.lower()).strip("-") for n in names) or "models"
    return f"tfserving-{stem[:100].strip('-')}:latest"


# ---------------------------------------------------------------------------------------------- check

def check_dockerfile(path: Path, *, tf_version: str | None = None) -> list[str]:
    """Problems a build or a start would hit, found without an engine (empty: none found). The build
    context is the Dockerfile's folder. `tf_version`: the expected tensorflow/serving version
    (default: the installed TensorFlow's, where one is installed)."""
    path = Path(path)
    if not path.is_file():
        return [f"{path}: expected a Dockerfile, found {'a folder' if path.exists() else 'nothing'}"]
    context = path.parent.resolve()
    instructions = _instructions(path.read_text())
    problems: list[str] = []

    froms = [args for op, args in instructions if op == "FROM"]
    if len(froms) != 1:
        problems.append(f"FROM: expected one FROM {IMAGE}:<version>, found {len(froms)}")
    for args in froms[:1]:
        image = args.split()[0] if args.split() else ""
        name, _, version = image.partition(":")
        if name != IMAGE or not _VERSION.match(version):
            problems.append(f"FROM {image}: expected {IMAGE}:<version> with a version such as 2.21.0")
        else:
            try:
                want = serving_version(tf_version)
            except ContainerError:
                want = None
            if want and version != want:
                problems.append(f"FROM {image}: expected {IMAGE}:{want}, the installed TensorFlow's version")

    copies: list[tuple[str, Path]] = []   # (destination in the image, source on disk)
    for op, args in instructions:
        if op not in ("COPY", "ADD"):
            continue
        words = _words(args)
        words = [w for w in words if not w.startswith("--")]
        if len(words) < 2:
            problems.append(f"{op} {args}: expected a source and a destination")
            continue
        *sources, dest = words
        for src in sources:
            s = PurePosixPath(src)
            where = (context / src).resolve()
            if s.is_absolute() or not _under(where, context):
                problems.append(f"{op} {src}: expected a source inside the build context {context}")
                continue
            if not where.exists():
                problems.append(f"{op} {src}: the source does not exist in the build context {context}")
                continue
            target = dest
            if len(sources) > 1 or dest.endswith("/") and where.is_file():
                target = str(PurePosixPath(dest) / s.name)
            copies.append((str(PurePosixPath(target)), where))

    def in_image(container_path: str) -> Path | None:
        """The file on disk that the image holds at container_path (the last COPY wins)."""
        c = PurePosixPath(container_path)
        for dest, src in reversed(copies):
            d = PurePosixPath(dest)
            if c == d:
                return src
            if src.is_dir() and d in c.parents:
                candidate = src / c.relative_to(d)
                if candidate.exists():
                    return candidate
        return None

    command = [w for op, args in instructions if op in ("ENTRYPOINT", "CMD") for w in _words(args)]
    flags = dict(w[2:].split("=", 1) for w in command if w.startswith("--") and "=" in w)
    if SERVER not in [PurePosixPath(w).name for w in command]:
        problems.append(f"ENTRYPOINT/CMD: expected the server {SERVER}, found {command or 'nothing'}")
    config_in_image = flags.get("model_config_file")
    if not config_in_image:
        problems.append("ENTRYPOINT/CMD: expected --model_config_file=<a copied file>, found none")
    else:
        source = in_image(config_in_image)
        if source is None or not source.is_file():
            problems.append(f"--model_config_file={config_in_image}: no COPY puts a file there")
        else:
            problems += _config_problems(source, config_in_image, in_image)
    if "batching_parameters_file" in flags:
        b = flags["batching_parameters_file"]
        source = in_image(b)
        if source is None or not source.is_file():
            problems.append(f"--batching_parameters_file={b}: no COPY puts a file there")
        else:
            from .config import ConfigError, read_batching_parameters
            try:
                read_batching_parameters(source)
            except ConfigError as e:
                problems.append(f"--batching_parameters_file={b}: {e}")
        if "--enable_batching" not in command and flags.get("enable_batching") != "true":
            problems.append(f"--batching_parameters_file={b} is given without --enable_batching: the server ignores it")

    exposed = {int(p.split("/")[0]) for op, args in instructions if op == "EXPOSE"
               for p in args.split() if p.split("/")[0].isdigit()}
    ports = {"port": flags.get("port", str(GRPC_PORT))}
    if "rest_api_port" in flags:
        ports["rest_api_port"] = flags["rest_api_port"]
    for flag, port in ports.items():
        if not port.isdigit():
            problems.append(f"--{flag}={port}: expected a port number")
        elif int(port) not in exposed:
            problems.append(f"EXPOSE: the server listens on {port} (--{flag}), which is not exposed "
                            f"(exposed: {sorted(exposed) or 'none'})")
    return problems


def _config_problems(source: Path, config_in_image: str, in_image) -> list[str]:
    from .config import ConfigError, read_model_config
    try:
        config = read_model_config(source)
    except ConfigError as e:
        return [f"--model_config_file={config_in_image}: {e}"]
    problems = []
    entries = list(config.model_config_list.config)
    if not entries:
        problems.append(f"--model_config_file={config_in_image}: expected at least one model, found none")
    for c in entries:
        if "://" in c.base_path:
            continue  # a bucket, not the image's files
        folder = in_image(c.base_path)
        versions = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder and folder.is_dir() else []
        if not versions:
            problems.append(f"model {c.name!r}: base_path {c.base_path}: expected a copied folder holding numeric "
                            f"version folders, found {'nothing copied there' if folder is None else 'no versions'}")
            continue
        for v in versions:
            if not (folder / str(v) / "saved_model.pb").is_file():
                problems.append(f"model {c.name!r}: version {v} at {c.base_path}/{v}: expected saved_model.pb")
        policy = c.model_version_policy.WhichOneof("policy_choice")
        wanted = list(c.model_version_policy.specific.versions) if policy == "specific" else []
        for v in wanted:
            if v not in versions:
                problems.append(f"model {c.name!r}: policy specific serves version {v}, which is not among the "
                                f"copied versions {versions}")
    return problems


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        op, _, args = line.partition(" ")
        out.append((op.upper(), args.strip()))
    if pending.strip():
        op, _, args = pending.strip().partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def _words(args: str) -> list[str]:
    if args.startswith("["):
        try:
            value = json.loads(args)
            if isinstance(value, list):
                return [str(v) for v in value]
        except ValueError:
            pass
    try:
        return shlex.split(args)
    except ValueError:
        return args.split()


def _under(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


# ------------------------------------------------------------------------------------------------ run

def docker_available(timeout: float = 5.0) -> bool:
    """Whether a container engine answers `docker info` within `timeout` seconds. Never raises."""
    exe = shutil.which("docker")
    if exe is None:
        return False
    try:
        done = subprocess.run([exe, "info"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def run_container(plan: ContainerPlan) -> int:
    """Build the image and run it in the foreground (Ctrl-C stops it). Returns the run's exit status."""
    if not docker_available():
        raise ContainerError("no container engine answered `docker info`; run these by hand where one does:\n  "
                             + "\n  ".join(plan.commands))
    subprocess.run(plan.build_argv, check=True)
    return subprocess.run(plan.run_argv, check=False).returncode
