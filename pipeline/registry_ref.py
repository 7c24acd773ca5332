"""A model in this home's MLflow registry as a pretrained source: `models:/NAME@ALIAS` or `models:/NAME/VERSION`.

Resolving a reference to its version reads the store's SQLite file directly (standard library only),
so building the stage graph stays light and a moved alias changes the train stage's key. Loading the
model (in a worker) downloads the version's MLflow model folder and hands its model file to the
framework's usual loader.
"""
from __future__ import annotations

import hashlib
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

PREFIX = "models:/"
_REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    source: str           # where MLflow keeps the model (models:/m-<id>, or a run's artifact path)
    framework: str | None  # from the version's `framework` tag

    @property
    def digest(self) -> str:
        return hashlib.sha256(f"{self.name}/{self.version}/{self.source}".encode()).hexdigest()


def is_ref(text: str) -> bool:
    return text.startswith(PREFIX)


def parse(text: str) -> tuple[str, str | None, int | None]:
    m = _REF.match(text)
    if not m:
        raise ValueError(f"{text!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return m["name"], m["alias"], int(m["version"]) if m["version"] else None


def resolve(text: str, store_db: Path) -> RegisteredVersion:
    """The version a reference names now; LookupError (with what is there) when there is none."""
    name, alias, version = parse(text)
    if not store_db.is_file():
        raise LookupError(f"{text}: no MLflow store at {store_db}: run a spec with tracking first")
    con = sqlite3.connect(f"file:{store_db}?mode=ro", uri=True)
    try:
        if alias is not None:
            row = con.execute("select version from registered_model_aliases where name=? and alias=?",
                              (name, alias)).fetchone()
            if row is None:
                known = [a for (a,) in con.execute("select alias from registered_model_aliases where name=?", (name,))]
                raise LookupError(f"{text}: no alias {alias!r} on registered model {name!r} "
                                  f"(aliases: {', '.join(known) or 'none'})")
            version = int(row[0])
        row = con.execute("select source from model_versions where name=? and version=?", (name, version)).fetchone()
        if row is None:
            known = [str(v) for (v,) in con.execute("select version from model_versions where name=?", (name,))]
            raise LookupError(f"{text}: no version {version} of registered model {name!r} "
                              f"(versions: {', '.join(known) or 'none; the registered models are ' + _names(con)})")
        tag = con.execute("select value from model_version_tags where name=? and version=? and key='framework'",
                          (name, version)).fetchone()
    finally:
        con.close()
    return RegisteredVersion(name, version, row[0], tag[0] if tag else None)


def _names(con) -> str:
    return ", ".join(n for (n,) in con.execute("select name from registered_models")) or "none"


def download_model_file(ref: RegisteredVersion, tracking_uri: str, dest: Path, suffixes: tuple[str, ...]) -> Path:
    """The version's MLflow model folder downloaded into `dest`, and the model file in it that the
    framework's loader takes (a .keras file, a torch .pt2 or pickled .pth)."""
    import mlflow
    mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{PREFIX}{ref.name}/{ref.version}",
                                                     dst_path=str(dest)))
    found = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not found:
        raise LookupError(f"models:/{ref.name}/{ref.version}: the MLflow model at {local} holds no "
                          f"{' or '.join(suffixes)} file (found {sorted(p.name for p in local.rglob('*'))[:10]})")
    return found[0]
