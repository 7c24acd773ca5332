"""A TF Serving model repository from a model bundle: `<base>/<model>/<version>/` holding a copy of the
bundle's SavedModel and `assets.extra/tf_serving_warmup_requests`, the bundle's stored parity inputs
as PredictionLog records, so the server runs every signature once before it reports the version ready.

    <base>/<model>/<version>/saved_model.pb
                             variables/...
                             assets.extra/tf_serving_warmup_requests   (TFRecord of PredictionLog)

Only a SavedModel whose parity verdict passed is taken, and only when its files still match the
bundle's digests. A version is written in a hidden folder beside it and renamed into place, so a
server polling `<base>/<model>` never sees half a version; an existing version with the same bytes is
left alone, one with other bytes is refused unless `overwrite=True`.

The warmup requests are keyed by the SavedModel's own input names (`input_1`, not the model's `x`),
matched to the model's inputs by parity.signature.map_tensors, and cast to the SavedModel's dtypes.
TensorFlow and tensorflow_serving are imported inside the functions that need them.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Mapping

import numpy as np

from exporters.base import Artifact
from exporters.bundle import Bundle, BundleError, sha256_file
from parity.feeds import is_multi, n_rows, take
from parity.signature import DTYPES, InputMismatch, Signature, TensorSpec, cast_checked, map_tensors, pad_rows

FORMAT = "saved_model"
SIGNATURE_KEY = "serving_default"
WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 100      # TF Serving reads at most 1000; a hundred is plenty and loads fast
DEFAULT_WARMUP_ROWS = 4       # rows per request
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RepositoryError(RuntimeError):
    """A bundle that cannot become a served version, or a version folder that may not be replaced:
    names the model and says what was expected and what was found."""


# ---------------------------------------------------------------------------------------------- write

def write_repository(bundle: Bundle, base: Path, *, version: int, model_name: str | None = None,
                     warmup_rows: int = DEFAULT_WARMUP_ROWS, max_records: int = MAX_WARMUP_RECORDS,
                     overwrite: bool = False) -> Path:
    """Write `<base>/<model_name>/<version>/` from the bundle's passed SavedModel, with warmup
    requests built from its stored parity inputs. Returns the version folder."""
    name = model_name or bundle.model
    if not isinstance(name, str) or not _NAME.match(name):
        raise RepositoryError(f"model {name!r}: expected a served model name of letters, digits, '.', '_' "
                              f"and '-' (it becomes a folder and the name clients ask for)")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RepositoryError(f"model {name!r}: version {version!r}: expected a whole number >= 1 "
                              f"(TF Serving takes numeric version folders)")
    if isinstance(warmup_rows, bool) or not isinstance(warmup_rows, int) or warmup_rows < 1:
        raise RepositoryError(f"model {name!r}: warmup_rows {warmup_rows!r}: expected a whole number >= 1")
    if isinstance(max_records, bool) or not isinstance(max_records, int) or not 1 <= max_records <= 1000:
        raise RepositoryError(f"model {name!r}: max_records {max_records!r}: expected a whole number 1..1000 "
                              f"(TF Serving reads at most 1000 warmup records)")
    artifact = passed_saved_model(bundle)
    src = Path(artifact.path)

    model_dir = Path(base) / name
    target = model_dir / str(version)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f".{version}.partial-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(src, tmp)
        records = warmup_requests(bundle, artifact, name, rows=warmup_rows, max_records=max_records)
        _write_records(tmp / WARMUP_DIR / WARMUP_FILE, records)
        if target.exists():
            differences = _tree_differences(target, tmp)
            if not differences:
                return target                    # the same version, already in place
            if not overwrite:
                shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
                raise RepositoryError(f"model {name!r}: version {version} already exists at {target} with other "
                                      f"content ({shown}): expected the same bytes, or a new version number "
                                      f"(or overwrite=True)")
            old = model_dir / f".{version}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def passed_saved_model(bundle: Bundle) -> Artifact:
    """The bundle's SavedModel artifact (fp32 first), refused unless its parity verdict passed and its
    files still match the manifest's digests."""
    arts = bundle.artifacts(FORMAT)
    if not arts:
        raise RepositoryError(f"model {bundle.model!r}: expected a SavedModel artifact in the bundle at "
                              f"{bundle.root}, found only {', '.join(bundle.formats) or 'no formats'}")
    artifact = next((a for a in arts if a.variant == "fp32"), arts[0])
    verdicts = {k: v for k, v in (bundle.manifest.get("verdicts") or {}).items()
                if k.split("@", 1)[0] == artifact.label}
    if not verdicts:
        raise RepositoryError(f"model {bundle.model!r}: expected a passed parity verdict for {artifact.label}, "
                              f"found none recorded in the bundle's manifest")
    failed = {k: v for k, v in verdicts.items() if v != "passed"}
    if failed:
        raise RepositoryError(f"model {bundle.model!r}: expected the SavedModel's parity verdict to be passed, "
                              f"found {', '.join(f'{k}: {v}' for k, v in sorted(failed.items()))}")
    problems = bundle.file_problems(bundle.relative(artifact))
    if problems:
        shown = "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())[:5])
        raise RepositoryError(f"model {bundle.model!r}: the SavedModel's files differ from the bundle's "
                              f"manifest ({shown}): expected the verified bytes")
    if not (Path(artifact.path) / "saved_model.pb").is_file():
        raise RepositoryError(f"model {bundle.model!r}: expected a SavedModel folder with saved_model.pb at "
                              f"{artifact.path}")
    return artifact


# --------------------------------------------------------------------------------------------- warmup

def saved_model_inputs(path: Path) -> dict[str, "object"]:
    """The `serving_default` signature's inputs: {name: tf.TensorSpec}, as the server will see them."""
    import tensorflow as tf
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # noqa: BLE001 - corrupt protobuf, variables, ...
        raise RepositoryError(f"{path}: tf.saved_model.load failed: {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e
    sigs = loaded.signatures
    if SIGNATURE_KEY not in sigs:
        raise RepositoryError(f"{path}: expected the signature {SIGNATURE_KEY!r}, found "
                              f"{sorted(sigs) or 'no signatures'}")
    fn = sigs[SIGNATURE_KEY]
    if fn.structured_input_signature[0] or not fn.structured_input_signature[1]:
        raise RepositoryError(f"{path}: expected named inputs in {SIGNATURE_KEY}, found "
                              f"{fn.structured_input_signature}")
    return dict(fn.structured_input_signature[1])


def serving_feed(bundle: Bundle, artifact: Artifact, inputs: Mapping[str, object] | None = None) -> dict[str, np.ndarray]:
    """The bundle's stored parity inputs as the SavedModel takes them: keyed by its input names, in its
    layout (details['input_transpose']) and cast to its dtypes."""
    inputs = dict(inputs if inputs is not None else saved_model_inputs(Path(artifact.path)))
    try:
        x = bundle.reference()["x"]
    except BundleError as e:
        raise RepositoryError(f"model {bundle.model!r}: {e}") from None
    sig = Signature.from_json(bundle.manifest["signature"])
    feed = dict(x) if is_multi(x) else {(sig.input_names[0] if sig.inputs else "x"): x}
    model_specs = sig.inputs or tuple(TensorSpec.of(k, v) for k, v in feed.items())
    if set(feed) != {t.name for t in model_specs}:
        raise RepositoryError(f"model {bundle.model!r}: the stored parity inputs {sorted(feed)} do not match the "
                              f"model signature's inputs {[t.name for t in model_specs]}")
    perm = (artifact.details or {}).get("input_transpose")
    perm = tuple(perm) if perm and len(inputs) == 1 else None
    art_specs = tuple(_parity_spec(k, v, perm, bundle.model) for k, v in inputs.items())
    pairs, _how = map_tensors(model_specs, art_specs)
    unmatched = [t.name for t in model_specs if t.name not in pairs]
    uncovered = sorted(set(inputs) - set(pairs.values()))
    if unmatched or uncovered:
        raise RepositoryError(f"model {bundle.model!r}: cannot match the model's inputs "
                              f"{[t.name for t in model_specs]} to the SavedModel's {sorted(inputs)} "
                              f"(unmatched model inputs {unmatched}, SavedModel inputs left without a feed {uncovered})")
    out = {}
    for model_name, art_name in pairs.items():
        a = np.asarray(feed[model_name])
        if perm is not None:
            a = np.transpose(a, perm)
        want = inputs[art_name].dtype
        where = f"model {bundle.model!r}: warmup input {art_name!r} (model input {model_name!r})"
        try:
            a = cast_checked(a, _dtype_name(want), where) if _dtype_name(want) in DTYPES else a.astype(want.as_numpy_dtype)
        except InputMismatch as e:
            raise RepositoryError(str(e)) from None
        out[art_name] = np.ascontiguousarray(a)
    return out


def warmup_requests(bundle: Bundle, artifact: Artifact, model_name: str, *, rows: int = DEFAULT_WARMUP_ROWS,
                    max_records: int = MAX_WARMUP_RECORDS) -> list:
    """PredictionLog records of `rows` stored parity rows each (the static batch, padded, where the
    SavedModel has one), at most `max_records` of them, in the stored order."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    inputs = saved_model_inputs(Path(artifact.path))
    feed = serving_feed(bundle, artifact, inputs)
    batches = {(v.shape.as_list()[0] if v.shape.rank else None) for v in inputs.values()}
    static = next(iter(batches)) if len(batches) == 1 else None
    per = int(static) if static else rows
    total = n_rows(feed)
    records = []
    for i in range(min(max_records, math.ceil(total / per))):
        chunk = take(feed, slice(i * per, (i + 1) * per))
        if static:
            chunk = {k: pad_rows(v, per) for k, v in chunk.items()}
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE_KEY))
        for k in sorted(chunk):
            request.inputs[k].CopyFrom(tf.make_tensor_proto(chunk[k]))
        records.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return records


def read_warmup(path: Path) -> list:
    """The PredictionLog records of a warmup file (or of a version folder's assets.extra)."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = Path(path)
    if path.is_dir():
        path = path / WARMUP_DIR / WARMUP_FILE
    if not path.is_file():
        raise RepositoryError(f"{path}: expected a TF Serving warmup file, found "
                              f"{'a folder' if path.exists() else 'nothing'}")
    logs = []
    try:
        for i, raw in enumerate(tf.data.TFRecordDataset(str(path)).as_numpy_iterator()):
            log = prediction_log_pb2.PredictionLog()
            log.ParseFromString(raw)
            logs.append(log)
    except Exception as e:  # noqa: BLE001 - a truncated record (DataLossError), a bad message (DecodeError)
        text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", str(getattr(e, "message", e))).strip()
        raise RepositoryError(f"{path}: expected TFRecords of PredictionLog, found a bad record after "
                              f"{len(logs)} good ones ({type(e).__name__}: {text.splitlines()[0][:200] if text else ''})") from None
    if not logs:
        raise RepositoryError(f"{path}: expected TFRecords of PredictionLog, found no records")
    return logs


def warmup_inputs(log) -> dict[str, np.ndarray]:
    """The named arrays of one PredictionLog's predict request."""
    import tensorflow as tf
    return {k: tf.make_ndarray(v) for k, v in log.predict_log.request.inputs.items()}


# ---------------------------------------------------------------------------------------------- helpers

def _write_records(path: Path, records: list) -> None:
    import tensorflow as tf
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as w:
        for r in records:
            w.write(r.SerializeToString(deterministic=True))


def _dtype_name(dtype) -> str:
    name = dtype.name
    return "float16" if name == "half" else name


def _parity_spec(name: str, spec, perm: tuple[int, ...] | None, model: str) -> TensorSpec:
    shape = spec.shape.as_list() if spec.shape.rank is not None else [None]
    if perm is not None:  # the SavedModel's layout, told in the as-trained order the model's signature uses
        inverse = np.argsort(perm)
        shape = [shape[i] for i in inverse]
    dtype = _dtype_name(spec.dtype)
    if dtype not in DTYPES:
        raise RepositoryError(f"model {model!r}: SavedModel input {name!r} takes {dtype}: expected one of "
                              f"{', '.join(DTYPES)} (the stored parity inputs are numeric)")
    return TensorSpec(name, dtype, tuple(shape) if shape else (None,))


def _tree_differences(a: Path, b: Path) -> list[str]:
    """What differs between two folders' files, by relative path and sha256."""
    def files(root: Path) -> dict[str, Path]:
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
    fa, fb = files(a), files(b)
    out = [f"{k} only in the existing version" for k in sorted(set(fa) - set(fb))]
    out += [f"{k} only in the new one" for k in sorted(set(fb) - set(fa))]
    out += [f"{k} differs" for k in sorted(set(fa) & set(fb))
            if fa[k].stat().st_size != fb[k].stat().st_size or sha256_file(fa[k]) != sha256_file(fb[k])]
    return out
