"""TF Serving's two text-proto files: the model config (`--model_config_file`) and the batching
parameters (`--batching_parameters_file`).

The model config is built through tensorflow_serving's own ModelServerConfig proto and
google.protobuf.text_format, then parsed back and compared, so what is written is what the server will
read. tensorflow_serving does not ship the BatchingParameters proto (it lives in the server's
session_bundle_config.proto), so the batching file is written by hand in its documented form, each
field an Int64Value wrapper:

    max_batch_size { value: 32 }
    batch_timeout_micros { value: 1000 }
    max_enqueued_batches { value: 100 }
    num_batch_threads { value: 4 }

and read back through a message of those four fields built here from google.protobuf's own
wrappers, so a typo in a field name fails to parse here rather than in the server.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

POLICIES = ("latest", "all", "specific")
BATCHING_FIELDS = ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads")
_LABEL = re.compile(r"^[A-Za-z0-9_-]+$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://")


class ConfigError(ValueError):
    """A config value (or file) TF Serving would refuse or misread: names the model or file, the field,
    and what was expected."""


@dataclass
class ModelEntry:
    name: str
    base_path: str                       # absolute path (inside the container: /models/<name>) or a URL
    policy: str = "latest"               # latest | all | specific
    num_versions: int = 1                # latest: how many of the newest versions to serve
    versions: list[int] = field(default_factory=list)        # specific: which ones
    labels: dict[str, int] = field(default_factory=dict)     # e.g. {"stable": 1, "canary": 2}


# ---------------------------------------------------------------------------------------- model config

def model_config(models: list[ModelEntry]):
    """The ModelServerConfig message for these models, every value checked first."""
    from tensorflow_serving.config import model_server_config_pb2 as msc

    if not models:
        raise ConfigError("model config: expected at least one model, found none")
    seen = set()
    config = msc.ModelServerConfig()
    for m in models:
        _check_entry(m)
        if m.name in seen:
            raise ConfigError(f"model {m.name!r}: name: expected each model once, found it twice")
        seen.add(m.name)
        c = config.model_config_list.config.add()
        c.name = m.name
        c.base_path = str(m.base_path)
        c.model_platform = "tensorflow"
        policy = c.model_version_policy
        if m.policy == "latest":
            policy.latest.num_versions = m.num_versions
        elif m.policy == "all":
            policy.all.SetInParent()
        else:
            policy.specific.versions.extend(m.versions)
        for label, version in sorted(m.labels.items()):
            c.version_labels[label] = version
    return config


def model_config_text(models: list[ModelEntry]) -> str:
    """The model config as a text proto, checked by parsing it back into the same message."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2 as msc

    config = model_config(models)
    text = text_format.MessageToString(config)
    back = text_format.Parse(text, msc.ModelServerConfig())
    if back != config:  # pragma: no cover - text_format round trip; a guard, not a branch a test reaches
        raise ConfigError("model config: the text written does not parse back to the same config")
    return text


def write_model_config(path: Path, models: list[ModelEntry]) -> Path:
    path = Path(path)
    text = model_config_text(models)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, text)
    return path


def read_model_config(path: Path):
    """The ModelServerConfig of a file; a parse failure names the file and the line."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2 as msc

    path = Path(path)
    text = _read_text(path, "a TF Serving model config")
    try:
        return text_format.Parse(text, msc.ModelServerConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"{path}: expected a ModelServerConfig text proto, found a parse error: {e}") from None


def _check_entry(m: ModelEntry) -> None:
    who = f"model {m.name!r}"
    if not isinstance(m.name, str) or not m.name.strip():
        raise ConfigError(f"model {m.name!r}: name: expected a non-empty string")
    base = str(m.base_path)
    if not (base.startswith("/") or _URL.match(base)):
        raise ConfigError(f"{who}: base_path {base!r}: expected an absolute path (in the container, e.g. "
                          f"/models/{m.name}) or a URL such as gs://...")
    if m.policy not in POLICIES:
        raise ConfigError(f"{who}: policy {m.policy!r}: expected one of {', '.join(POLICIES)}")
    if m.policy == "latest" and not _whole(m.num_versions, 1):
        raise ConfigError(f"{who}: num_versions {m.num_versions!r}: expected a whole number >= 1 for the "
                          f"'latest' policy")
    if m.policy == "specific":
        if not m.versions:
            raise ConfigError(f"{who}: versions: expected at least one version for the 'specific' policy, found none")
        bad = [v for v in m.versions if not _whole(v, 1)]
        if bad:
            raise ConfigError(f"{who}: versions {list(m.versions)!r}: expected whole numbers >= 1, found {bad!r}")
        if len(set(m.versions)) != len(m.versions):
            raise ConfigError(f"{who}: versions {list(m.versions)!r}: expected each version once")
    elif m.versions:
        raise ConfigError(f"{who}: versions {list(m.versions)!r}: only the 'specific' policy takes versions; "
                          f"policy is {m.policy!r}")
    for label, version in (m.labels or {}).items():
        if not isinstance(label, str) or not _LABEL.match(label):
            raise ConfigError(f"{who}: version_labels key {label!r}: expected letters, digits, '_' or '-'")
        if not _whole(version, 1):
            raise ConfigError(f"{who}: version_labels[{label!r}] = {version!r}: expected a version number >= 1")
        if m.policy == "specific" and version not in m.versions:
            raise ConfigError(f"{who}: version_labels[{label!r}] = {version}: expected one of the served "
                              f"versions {sorted(m.versions)} (policy 'specific')")


# ------------------------------------------------------------------------------------------- batching

def batching_text(*, max_batch_size: int, batch_timeout_micros: int, max_enqueued_batches: int,
                  num_batch_threads: int) -> str:
    values = {"max_batch_size": max_batch_size, "batch_timeout_micros": batch_timeout_micros,
              "max_enqueued_batches": max_enqueued_batches, "num_batch_threads": num_batch_threads}
    _check_batching(values, "batching parameters")
    text = "".join(f"{k} {{ value: {values[k]} }}\n" for k in BATCHING_FIELDS)
    if _parse_batching(text, "batching parameters") != values:  # pragma: no cover - a guard
        raise ConfigError("batching parameters: the text written does not parse back to the same values")
    return text


def write_batching_parameters(path: Path, *, max_batch_size: int, batch_timeout_micros: int,
                              max_enqueued_batches: int, num_batch_threads: int) -> Path:
    """The `--batching_parameters_file` for `--enable_batching`."""
    path = Path(path)
    text = batching_text(max_batch_size=max_batch_size, batch_timeout_micros=batch_timeout_micros,
                         max_enqueued_batches=max_enqueued_batches, num_batch_threads=num_batch_threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, text)
    return path


def read_batching_parameters(path: Path) -> dict[str, int]:
    """{field: value} of a batching parameters file: all four fields, each valid."""
    path = Path(path)
    values = _parse_batching(_read_text(path, "a TF Serving batching parameters file"), str(path))
    missing = [k for k in BATCHING_FIELDS if k not in values]
    if missing:
        raise ConfigError(f"{path}: expected the fields {', '.join(BATCHING_FIELDS)}; missing {', '.join(missing)}")
    _check_batching(values, str(path))
    return values


def _check_batching(values: dict, where: str) -> None:
    lows = {"max_batch_size": 1, "batch_timeout_micros": 0, "max_enqueued_batches": 1, "num_batch_threads": 1}
    for k, low in lows.items():
        v = values[k]
        if not _whole(v, low):
            raise ConfigError(f"{where}: {k} {v!r}: expected a whole number >= {low}")


_BATCHING_CLASS = None


def _batching_message():
    """A BatchingParameters message of the four documented fields, each a google.protobuf.Int64Value,
    in a pool of its own (so it cannot clash with a real definition loaded elsewhere)."""
    global _BATCHING_CLASS
    if _BATCHING_CLASS is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

        pool = descriptor_pool.DescriptorPool()
        wrappers = descriptor_pb2.FileDescriptorProto()
        wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
        pool.Add(wrappers)
        f = descriptor_pb2.FileDescriptorProto(name="serving_batching_parameters.proto",
                                               package="tensorflow.serving",
                                               dependency=["google/protobuf/wrappers.proto"], syntax="proto3")
        msg = f.message_type.add(name="BatchingParameters")
        for number, name in enumerate(BATCHING_FIELDS, start=1):
            msg.field.add(name=name, number=number, label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                          type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                          type_name=".google.protobuf.Int64Value")
        pool.Add(f)
        _BATCHING_CLASS = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))
    return _BATCHING_CLASS


def _parse_batching(text: str, where: str) -> dict[str, int]:
    from google.protobuf import text_format
    try:
        msg = text_format.Parse(text, _batching_message()())
    except text_format.ParseError as e:
        raise ConfigError(f"{where}: expected a BatchingParameters text proto with the fields "
                          f"{', '.join(BATCHING_FIELDS)} (each as `name {{ value: N }}`), found a parse error: {e}") from None
    return {k: getattr(msg, k).value for k in BATCHING_FIELDS if msg.HasField(k)}


# ------------------------------------------------------------------------------------------- helpers

def _whole(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{path}: expected {what}, found {'a folder' if path.exists() else 'nothing'}")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: expected {what} in UTF-8 text, found an unreadable file ({e})") from None
