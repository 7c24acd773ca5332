"""A model in the MLflow registry as a pretrained source: `models:/NAME@ALIAS` or `models:/NAME/VERSION`.

This module reads the reference (standard library only); pipeline/tracking.py resolves it to the
version it names now, through MLflow's client (a moved alias changes the train stage's key), and
downloads the version's MLflow model folder, whose model file the framework's usual loader takes.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

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
