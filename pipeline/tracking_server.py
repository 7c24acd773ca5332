"""A team's MLflow tracking server: `mlflow server` on a PostgreSQL backend store, with its artifacts
served through the server (`--artifacts-destination`: a shared folder or an object store), so clients
need nothing but its URL.

The PostgreSQL cluster lives in a folder the user names (`<store>/postgres`), made by `initdb` on the
first start and reused after. It listens on a Unix socket in that folder only (no TCP port), so only
this server, and whoever can read the folder, reaches it. PostgreSQL refuses to run as root: as root,
the cluster runs as the unprivileged `postgres` user (Debian's package creates it; `useradd --system
postgres` where there is none). Both servers run in process groups of their own and stop together.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

DATABASE, DB_USER = "mlflow", "mlflow"
PG_PORT = 5432  # names the socket file (.s.PGSQL.5432); nothing listens on TCP
SOCKET_PATH_LIMIT = 100  # a Unix socket's path is at most ~107 bytes


class TrackingServerError(RuntimeError):
    """The server could not be set up or started: says what was missing and what to do."""
    user_error = True


@dataclass(frozen=True)
class Settings:
    store: Path          # the PostgreSQL cluster, the logs and (by default) the artifacts
    host: str = "127.0.0.1"
    port: int = 5000
    artifacts: str = ""  # s3://bucket/prefix or a folder; default <store>/artifacts
    workers: int = 2

    @property
    def artifact_destination(self) -> str:
        if self.artifacts.startswith(("s3://", "gs://", "wasbs://", "hdfs://")):
            return self.artifacts
        return str(Path(self.artifacts or self.store / "artifacts").resolve())

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs (Debian keeps them off PATH, per major version)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    initdb = found[-1] if found else (Path(shutil.which("initdb")) if shutil.which("initdb") else None)
    if initdb is None:
        raise TrackingServerError("PostgreSQL is not installed: expected initdb under /usr/lib/postgresql/*/bin or "
                                  "on PATH; install Debian's package (apt-get install postgresql, or "
                                  "scripts/setup.sh --test)")
    return initdb.parent


def cluster_user() -> str | None:
    """Who runs PostgreSQL: this user, or `postgres` when this is root (initdb refuses root)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise TrackingServerError("PostgreSQL cannot run as root and this machine has no 'postgres' user: "
                                  "create one (useradd --system --home-dir /var/lib/postgresql postgres) "
                                  "or start the server as an unprivileged user") from None
    return "postgres"


def _as(user: str | None, cmd: list[str]) -> list[str]:
    return cmd if user is None else ["runuser", "-u", user, "--"] + cmd


def _own(path: Path, user: str | None) -> None:
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


def ensure_cluster(store: Path, user: str | None) -> tuple[Path, Path]:
    """The cluster's data folder and socket folder, made (initdb, trust on the socket only) on first use."""
    bin_dir = postgres_bin()
    data, sockets = store / "postgres", store / "socket"
    if len(str(sockets / f".s.PGSQL.{PG_PORT}")) > SOCKET_PATH_LIMIT:
        raise TrackingServerError(f"--store {store}: the socket path inside it would be longer than "
                                  f"{SOCKET_PATH_LIMIT} bytes, which Unix sockets do not allow; choose a shorter path")
    store.mkdir(parents=True, exist_ok=True)
    for folder in (data, sockets):
        folder.mkdir(mode=0o700, exist_ok=True)
        _own(folder, user)
    if user is not None and subprocess.run(_as(user, ["test", "-w", str(data)])).returncode != 0:
        raise TrackingServerError(f"--store {store}: the '{user}' user that runs PostgreSQL cannot reach "
                                  f"{data}: every folder above it must be searchable by that user (chmod o+x), "
                                  f"or choose a store elsewhere")
    if not (data / "PG_VERSION").is_file():
        print(f"tracking-server: creating the PostgreSQL cluster in {data}", flush=True)
        made = subprocess.run(_as(user, [str(bin_dir / "initdb"), "-D", str(data), "-U", DB_USER, "-E", "UTF8",
                                         "--auth-local=trust", "--auth-host=reject", "--no-instructions"]),
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise TrackingServerError(f"initdb {data} failed: {(made.stderr or made.stdout).strip()[-800:]}")
    return data, sockets


def start_postgres(data: Path, sockets: Path, user: str | None, log: Path) -> subprocess.Popen:
    """postgres in a process group of its own, on the socket only; returns once it accepts connections."""
    bin_dir = postgres_bin()
    out = open(log, "ab")
    _own(log, user)
    proc = subprocess.Popen(_as(user, [str(bin_dir / "postgres"), "-D", str(data), "-p", str(PG_PORT),
                                       "-k", str(sockets), "-c", "listen_addresses="]),
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrackingServerError(f"PostgreSQL stopped at start (exit {proc.returncode}): {_tail(log)}")
        ready = subprocess.run([str(bin_dir / "pg_isready"), "-h", str(sockets), "-p", str(PG_PORT), "-q"])
        if ready.returncode == 0:
            break
        time.sleep(0.2)
    else:
        stop(proc, signal.SIGINT)
        raise TrackingServerError(f"PostgreSQL did not accept connections within 60 s: {_tail(log)}")
    _create_database(bin_dir, sockets)
    return proc


def _create_database(bin_dir: Path, sockets: Path) -> None:
    made = subprocess.run([str(bin_dir / "createdb"), "-h", str(sockets), "-p", str(PG_PORT), "-U", DB_USER,
                           DATABASE], capture_output=True, text=True)
    if made.returncode != 0 and "already exists" not in made.stderr:
        raise TrackingServerError(f"createdb {DATABASE} failed: {made.stderr.strip()[-500:]}")


def backend_uri(sockets: Path) -> str:
    """SQLAlchemy's URI of the database over the cluster's socket, through psycopg2 (host=<socket folder>)."""
    return f"postgresql+psycopg2://{DB_USER}@/{DATABASE}?host={sockets}&port={PG_PORT}"


def start_mlflow(s: Settings, sockets: Path, log: Path) -> subprocess.Popen:
    """`mlflow server` in a process group of its own; returns once /health answers."""
    from .tracking import OFFLINE_ENV
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri(sockets),
           "--serve-artifacts", "--artifacts-destination", s.artifact_destination,
           "--host", s.host, "--port", str(s.port), "--workers", str(s.workers)]
    if not s.artifact_destination.startswith(("s3://", "gs://", "wasbs://", "hdfs://")):
        Path(s.artifact_destination).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **OFFLINE_ENV})
    deadline = time.monotonic() + 180  # the first start creates every table of MLflow's schema
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TrackingServerError(f"mlflow server stopped at start (exit {proc.returncode}): {_tail(log)}")
        if healthy(s.url, timeout=1.0):
            return proc
        time.sleep(0.5)
    stop(proc, signal.SIGTERM)
    raise TrackingServerError(f"mlflow server did not answer {s.url}/health within 180 s: {_tail(log)}")


def healthy(url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def stop(proc: subprocess.Popen, sig: int, wait_s: float = 30) -> None:
    """Signal the process's group (SIGINT is PostgreSQL's fast shutdown); kill what is left after `wait_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _tail(log: Path, n: int = 800) -> str:
    try:
        return log.read_text(errors="replace").strip()[-n:] or "(empty log)"
    except OSError:
        return "(no log)"


def serve(s: Settings) -> int:
    """Start PostgreSQL and the tracking server, wait until told to stop (Ctrl-C, SIGTERM), stop both."""
    user = cluster_user()
    data, sockets = ensure_cluster(s.store, user)
    logs = s.store / "logs"
    logs.mkdir(exist_ok=True)
    _own(logs, user)
    pg = server = None
    stopping = []
    previous = {sig: signal.signal(sig, lambda n, f: stopping.append(n)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        pg = start_postgres(data, sockets, user, logs / "postgres.log")
        server = start_mlflow(s, sockets, logs / "mlflow.log")
        print(f"tracking server: {s.url} (backend store: PostgreSQL in {data}; artifacts: "
              f"{s.artifact_destination}, served through the server)\n"
              f"  export MLFLOW_TRACKING_URI={s.url}    # or --tracking-uri, or [tracking] uri in a spec\n"
              f"  logs in {logs}; Ctrl-C stops both servers", flush=True)
        while not stopping and server.poll() is None and pg.poll() is None:
            time.sleep(0.5)
        if not stopping:
            which = "mlflow server" if server.poll() is not None else "PostgreSQL"
            print(f"tracking-server: {which} stopped by itself; see {logs}", file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        for proc, sig in ((server, signal.SIGTERM), (pg, signal.SIGINT)):
            if proc is not None:
                stop(proc, sig)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("tracking-server: stopped", flush=True)
