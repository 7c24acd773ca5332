"""The Python stubs of the Open Inference Protocol (KServe v2) gRPC API, generated from the vendored proto.

serving/proto/grpc_predict_v2.proto is KServe's file (its origin is noted at its top). Its stubs are not
committed: `load()` runs grpc_tools.protoc once into serving/proto/_generated/<key>/ (git-ignored), where
the key is the proto's sha256 and the grpcio-tools version, so an edited proto or a new protoc regenerates.
Two processes generating at once each write a private temp folder and rename it into place; the loser
keeps the winner's. Where the source tree is read-only the stubs go to the user's cache folder instead.

  pb2, pb2_grpc = load()   # grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

PROTO = Path(__file__).resolve().parent / "proto" / "grpc_predict_v2.proto"
GENERATED = PROTO.parent / "_generated"
TOOLS_PIN = "grpcio-tools==1.85.1"  # as constraints.txt
_STEM = "grpc_predict_v2"
_MODULE_PREFIX = "serving._v2_stubs"  # the generated modules' names in sys.modules: not importable top-level

_lock = threading.Lock()
_loaded: dict[str, tuple] = {}


class StubError(RuntimeError):
    """The v2 gRPC stubs cannot be generated or imported; the message says why and what to install."""


def _tools_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        version("grpcio-tools")
        import grpc_tools.protoc  # noqa: F401 - the generator itself must import, not only its metadata
    except (PackageNotFoundError, ImportError) as e:
        raise StubError(f"the Open Inference Protocol v2 gRPC stubs are generated with the grpcio-tools package, "
                        f"which is not installed ({e}): pip install {TOOLS_PIN}") from None
    return version("grpcio-tools")


def _protoc(proto: Path, out: Path) -> None:
    # a child process: grpc_tools' protoc, run inside a process that has loaded TensorFlow (which brings its
    # own protobuf C++ library), crashes it with a segmentation fault
    import subprocess
    r = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{proto.parent}", f"--python_out={out}",
                        f"--grpc_python_out={out}", proto.name], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise StubError(f"grpc_tools.protoc failed (exit {r.returncode}) on {proto.name}: "
                        f"{(r.stderr or r.stdout).strip()[-2000:]}")


def generate(proto: Path = PROTO, cache: Path = GENERATED) -> Path:
    """The folder holding `<stem>_pb2.py` and `<stem>_pb2_grpc.py` for `proto`, generating them if needed."""
    data = proto.read_bytes()
    key = f"{hashlib.sha256(data).hexdigest()[:16]}-grpcio-tools-{_tools_version()}"
    for root in (cache, _user_cache()):
        final = root / key
        if (final / f"{proto.stem}_pb2_grpc.py").is_file():
            return final
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        except OSError:
            continue  # a read-only tree: the next root
        try:
            # protoc reads the proto by its name under -I: copy the exact bytes hashed above
            (tmp / proto.name).write_bytes(data)
            _protoc(tmp / proto.name, tmp)
            (tmp / proto.name).unlink()
            try:
                os.rename(tmp, final)  # atomic; fails if another process renamed its copy in first
            except OSError:
                if not (final / f"{proto.stem}_pb2_grpc.py").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final
    raise StubError(f"nowhere to write the v2 gRPC stubs: neither {cache} nor {_user_cache()} is writable")


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "train-to-edge" / "v2_stubs"


def import_stubs(folder: Path, stem: str, prefix: str):
    """Import `<stem>_pb2` and `<stem>_pb2_grpc` from `folder` as `<prefix>.<module>`, without putting the
    folder on sys.path (another copy of the same stubs, e.g. a test client's, keeps its own modules)."""
    mods = {}
    plain = f"{stem}_pb2"
    for mod in (plain, f"{stem}_pb2_grpc"):
        spec = importlib.util.spec_from_file_location(f"{prefix}.{mod}", folder / f"{mod}.py")
        m = importlib.util.module_from_spec(spec)
        if mod == plain:
            spec.loader.exec_module(m)
        else:  # the generated _pb2_grpc does `import <stem>_pb2`: give it ours for the length of its import
            saved = sys.modules.get(plain)
            sys.modules[plain] = mods[plain]
            try:
                spec.loader.exec_module(m)
            finally:
                if saved is None:
                    sys.modules.pop(plain, None)
                else:
                    sys.modules[plain] = saved
        sys.modules[spec.name] = m
        mods[mod] = m
    return mods[plain], mods[f"{stem}_pb2_grpc"]


def load():
    """(grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc) for serving/proto/grpc_predict_v2.proto."""
    with _lock:  # one generation and one import per process
        if "stubs" not in _loaded:
            try:
                folder = generate()
                _loaded["stubs"] = import_stubs(folder, _STEM, _MODULE_PREFIX)
            except StubError:
                raise
            except Exception as e:  # noqa: BLE001 - e.g. generated code that does not fit the protobuf runtime
                raise StubError(f"cannot generate or import the v2 gRPC stubs from {PROTO.name}: "
                                f"{type(e).__name__}: {e}") from e
        return _loaded["stubs"]
