"""The key the toolkit signs edge packages with, kept in the home: `python -m pipeline keys init`
writes it once; devices are given the public half."""
from __future__ import annotations

import os
from pathlib import Path


def keys_dir(home: Path | None = None) -> Path:
    home = home or Path(os.environ.get("PIPELINE_HOME", ".")).resolve()
    return home / ".pipeline" / "keys"


def private_key_path(home: Path | None = None) -> Path:
    from edge.keys import PRIVATE_NAME
    return keys_dir(home) / PRIVATE_NAME


def public_key_path(home: Path | None = None) -> Path:
    from edge.keys import PUBLIC_NAME
    return keys_dir(home) / PUBLIC_NAME


def init(home: Path | None = None) -> tuple[Path, Path]:
    """Write the key pair (refused if one exists: a new key would orphan every device that trusts the old)."""
    from edge.keys import init_keys
    return init_keys(keys_dir(home))
