"""Framework-free output comparison: tolerances, metrics, verdicts, parity records, discrimination.

This module imports only the Python standard library and numpy. The edge agent carries it to a device
that has numpy and the LiteRT interpreter and nothing else, so it must never import a framework, the
pipeline, the exporters or MLflow (tests/test_parity_compare.py checks that in a fresh interpreter).

The element check follows numpy.isclose and Polygraphy's "elemwise" check: with both `atol` and `rtol`
set, an output value is out of tolerance only when its absolute error exceeds `atol` AND its relative
error exceeds `rtol`. So values near zero are judged by `atol` (where relative error means nothing) and
large values by `rtol` (where float32 rounding alone exceeds a small `atol`). With only one of them set,
that one decides alone. `max_abs` and `max_rel` are always reported over all values.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Iterable, Mapping

import numpy as np

VARIANTS = ("fp32", "fp16", "int8")  # the precisions an artifact may compute in, each with a default tolerance
TASKS = ("regression", "classification")
# The parity set stores a `kind` per row (pipeline/data.py): 0 held-out, 1 random, 2 extreme.
KIND_NAMES = {0: "held-out", 1: "random", 2: "extreme"}
STATUSES = ("passed", "failed", "skipped")
SKIPS = ("excluded", "not-produced")
# A parity set is called discriminative only if at least this share of rows differs from row 0 by > atol.
MIN_DIFFERING_FRACTION = 0.5


# --------------------------------------------------------------------------- tolerances

@dataclass(frozen=True)
class Tolerance:
    """Bounds an artifact's outputs must meet. Any field set to None is not checked.

    atol                max absolute error |got - exp|
    rtol                max relative error |got - exp| / max(|exp|, rel_floor)
    rel_floor           denominator floor of the relative error (keeps it finite near zero)
    min_cosine          min cosine similarity of the flattened outputs
    min_top1_agreement  classifiers: min share of rows whose argmax equals the reference's
    max_accuracy_drop   classifiers with labels: accuracy(reference) - accuracy(artifact) may not exceed this
    """
    atol: float | None = None
    rtol: float | None = None
    rel_floor: float | None = 1e-3
    min_cosine: float | None = None
    min_top1_agreement: float | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise ValueError(f"tolerance {f.name}: expected a number or None, found {v!r}")
            v = float(v)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"tolerance {f.name}: expected a finite number >= 0, found {v!r}")
            if f.name in ("min_cosine", "min_top1_agreement") and v > 1:
                raise ValueError(f"tolerance {f.name}: expected a value in [0, 1], found {v!r}")
            object.__setattr__(self, f.name, v)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def merged(self, changes: Mapping[str, Any], where: str = "overrides") -> "Tolerance":
        """A copy with `changes` applied; None (or false) switches a check off; unknown names raise."""
        known = self.field_names()
        unknown = [k for k in changes if k not in known]
        if unknown:
            raise ValueError(f"{where}: unknown tolerance field {unknown[0]!r} (known: {', '.join(known)})")
        clean = {k: (None if v is False else v) for k, v in changes.items()}
        try:
            return replace(self, **clean)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> "Tolerance":
        return cls().merged(d or {}, "tolerance")

    def describe(self) -> str:
        """Short human form, e.g. 'atol 1e-05 or rtol 1e-04, cosine >= 0.99999, top-1 >= 1'."""
        parts = []
        elem = [f"atol {_g(self.atol)}" if self.atol is not None else None,
                f"rtol {_g(self.rtol)}" if self.rtol is not None else None]
        elem = [e for e in elem if e]
        if elem:
            parts.append(" or ".join(elem))
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        if self.min_top1_agreement is not None:
            parts.append(f"top-1 >= {self.min_top1_agreement:g}")
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {self.max_accuracy_drop:g}")
        return ", ".join(parts) or "no checks"


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    # Measured here: fp32 artifacts 0 to 1e-5 max abs.
    "fp32": Tolerance(atol=1e-5, rtol=1e-4, rel_floor=1e-3, min_cosine=0.99999, min_top1_agreement=1.0),
    # LiteRT float16 weights: 1e-3 to 1e-2 max abs.
    "fp16": Tolerance(atol=2e-2, rtol=5e-2, rel_floor=1e-3, min_cosine=0.999, min_top1_agreement=0.99),
    # Dynamic-range int8: about 2e-2 max abs, 99.5% argmax agreement; judged by a task budget.
    "int8": Tolerance(atol=1e-1, rtol=None, rel_floor=1e-3, min_cosine=0.99, min_top1_agreement=0.98,
                      max_accuracy_drop=0.01),
}


def tolerance_for(variant: str, fmt: str, overrides: Mapping[str, Any] | None = None, *,
                  formats: Iterable[str] | None = None) -> Tolerance:
    """The tolerance for one artifact: the variant's default, then overrides, most specific last.

    `overrides` maps keys to partial tolerances (dicts of Tolerance fields, or Tolerance objects):
    "<variant>" (e.g. "fp32"), "<format>" (e.g. "litert") and "<format>-<variant>" (e.g. "litert-int8").
    Precedence: "<format>-<variant>" > "<format>" > "<variant>" > defaults; fields merge one by one.
    With `formats` (every format there is: the caller's registry), a key naming anything else raises
    ValueError naming it; without, keys for other formats are passed over (checked where they were read),
    but a '<format>-<variant>' key of an unknown variant still raises.
    """
    if variant not in DEFAULT_TOLERANCES:
        raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    overrides = dict(overrides or {})
    known_formats = {fmt} | set(formats or ())
    valid = set(VARIANTS) | known_formats | {f"{f}-{v}" for f in known_formats for v in VARIANTS}
    for key, value in overrides.items():
        _, dash, tail = key.rpartition("-")
        if key not in valid and (formats is not None or (dash and tail not in VARIANTS)):
            raise ValueError(
                f"tolerance overrides: unknown key {key!r}; expected a variant ({', '.join(VARIANTS)}), "
                f"a format ({', '.join(sorted(known_formats))}) or '<format>-<variant>' such as 'litert-int8'")
        if not isinstance(value, (Mapping, Tolerance)):
            raise ValueError(f"tolerance overrides[{key!r}]: expected a table of tolerance fields, "
                             f"found {type(value).__name__} {value!r}")
    tol = DEFAULT_TOLERANCES[variant]
    for key in (variant, fmt, f"{fmt}-{variant}"):
        if key in overrides:
            value = overrides[key]
            tol = tol.merged(value.to_json() if isinstance(value, Tolerance) else value,
                             f"tolerance overrides[{key!r}]")
    return tol


# --------------------------------------------------------------------------- comparison

@dataclass
class Comparison:
    """The outcome of comparing one artifact's outputs with the reference: plain data."""
    metrics: dict[str, float]
    passed: bool
    failures: list[str]
    tolerance: Tolerance
    task: str = "regression"

    def to_json(self) -> dict:
        return {"passed": bool(self.passed), "task": self.task, "metrics": _json_metrics(self.metrics),
                "tolerance": self.tolerance.to_json(), "failures": list(self.failures)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Comparison":
        metrics = {k: (float("nan") if v is None else v) for k, v in dict(d.get("metrics") or {}).items()}
        return cls(metrics=metrics, passed=bool(d["passed"]), failures=list(d.get("failures") or []),
                   tolerance=Tolerance.from_json(d.get("tolerance")), task=d.get("task", "regression"))


def compare(expected, got, *, tolerance: Tolerance | None = None, task: str = "regression",
            labels=None, kinds=None) -> Comparison:
    """Compare an artifact's outputs `got` with the reference outputs `expected` (row i = input i).

    Never raises on bad data: a shape mismatch, non-finite values or an empty batch are failures.
    `labels` (classification): class ids for the first len(labels) rows; negative ids mean "no label".
    `kinds`: one entry per row (0/1/2 or a name, see KIND_NAMES); messages and per-kind metrics use it.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCES["fp32"]
    failures: list[str] = []
    metrics: dict[str, float] = {}

    def done() -> Comparison:
        return Comparison(metrics, not failures, failures, tol, task)

    try:
        exp = np.asarray(expected)
        out = np.asarray(got)
    except Exception as e:  # ragged lists and the like
        failures.append(f"outputs could not be read as arrays: {type(e).__name__}: {e}")
        return done()
    for what, arr in (("reference", exp), ("artifact", out)):
        if arr.dtype.kind not in "biuf":
            failures.append(f"{what} outputs are not numeric: dtype {arr.dtype}")
    if failures:
        return done()
    if exp.shape != out.shape:
        failures.append(f"shape mismatch: expected {_shape(exp.shape)}, got {_shape(out.shape)}")
        return done()
    if exp.ndim == 0:
        exp, out = exp.reshape(1), out.reshape(1)
    n_rows = exp.shape[0]
    if exp.size == 0:
        failures.append(f"no values to compare: outputs have shape {_shape(exp.shape)}")
        return done()
    kind_names = _kind_names(kinds, n_rows)

    e = exp.astype(np.float64).reshape(n_rows, -1)
    g = out.astype(np.float64).reshape(n_rows, -1)
    per_row = e.shape[1]
    metrics["n_rows"] = n_rows
    metrics["n_values"] = e.size

    def where(flat: int) -> str:
        row, col = divmod(int(flat), per_row)
        s = f"input {row}"
        if kind_names is not None:
            s += f" ({kind_names[row]})"
        if per_row > 1:
            s += f", output {col}"
        return s

    bad_exp = ~np.isfinite(e)
    if bad_exp.any():
        first = int(np.flatnonzero(bad_exp)[0])
        failures.append(f"reference outputs contain {int(bad_exp.sum())} non-finite value(s), first on "
                        f"{where(first)} ({e.flat[first]}): the reference itself is broken")
    bad_got = ~np.isfinite(g)
    metrics["n_nonfinite"] = int(bad_got.sum())
    if bad_got.any():
        first = int(np.flatnonzero(bad_got)[0])
        failures.append(f"{int(bad_got.sum())} non-finite output value(s) (NaN or inf), first on {where(first)} "
                        f"(expected {_v(e.flat[first])}, got {g.flat[first]})")
    ok = ~(bad_exp | bad_got)

    all_ok = not (bad_exp.any() or bad_got.any())  # the usual case: skip the masking passes
    diff = np.abs(g - e) if all_ok else np.where(ok, np.abs(g - e), 0.0)
    floor = tol.rel_floor if tol.rel_floor else np.finfo(np.float64).tiny
    rel = diff / np.maximum(np.abs(e), floor)
    if not all_ok:
        rel = np.where(ok, rel, 0.0)
    worst = int(np.argmax(diff))
    worst_row = worst // per_row
    metrics.update(
        max_abs=float(diff.flat[worst]),
        max_rel=float(rel.max()),
        mean_abs=float(diff.mean() if all_ok else diff[ok].mean()) if ok.any() else float("nan"),
        cosine=_cosine(e.ravel(), g.ravel()) if all_ok else
        _cosine(np.where(ok, e, 0.0).ravel(), np.where(ok, g, 0.0).ravel()),
        worst_index=worst_row,
        worst_output=worst % per_row,
        worst_expected=float(e.flat[worst]),
        worst_got=float(g.flat[worst]),
    )
    if kind_names is not None:
        row_max = diff.max(axis=1)
        for name in dict.fromkeys(kind_names.tolist()):
            metrics[f"max_abs_{_key(name)}"] = float(row_max[kind_names == name].max())

    # element check (see module docstring: out of tolerance = beyond atol AND beyond rtol)
    if tol.atol is not None or tol.rtol is not None:
        beyond = ok.copy() if not all_ok else None
        for active, values, limit in ((tol.atol is not None, diff, tol.atol), (tol.rtol is not None, rel, tol.rtol)):
            if active:
                over = values > limit
                beyond = over if beyond is None else beyond & over
        n_out = int(beyond.sum())
        metrics["n_out_of_tolerance"] = n_out
        if n_out:
            idx = int(np.argmax(np.where(beyond, diff, -1.0)))
            d, r = diff.flat[idx], rel.flat[idx]
            head = "max abs error" if d >= diff.flat[worst] else "abs error"
            bits = []
            if tol.atol is not None:
                bits.append(f"{head} {_e(d)} > atol {_g(tol.atol)}")
            if tol.rtol is not None:
                bits.append(f"relative error {_e(r)} > rtol {_g(tol.rtol)}" if bits
                            else f"max relative error {_e(r)} > rtol {_g(tol.rtol)}")
            msg = bits[0] + (f" (and {bits[1]})" if len(bits) > 1 else "")
            msg += f" on {where(idx)} (expected {_v(e.flat[idx])}, got {_v(g.flat[idx])})"
            if n_out > 1:
                msg += f"; {n_out} of {e.size} values out of tolerance"
            failures.append(msg)

    if tol.min_cosine is not None and metrics["cosine"] < tol.min_cosine:
        failures.append(f"cosine similarity {metrics['cosine']:.8g} < min {tol.min_cosine:g} "
                        f"(worst on {where(worst)}: expected {_v(e.flat[worst])}, got {_v(g.flat[worst])})")

    if task == "classification":
        ref_cls, got_cls = _top1(exp, out)
        agree = ref_cls == got_cls
        metrics["top1_agreement"] = float(agree.mean())
        if tol.min_top1_agreement is not None and metrics["top1_agreement"] < tol.min_top1_agreement:
            first = int(np.flatnonzero(~agree)[0])
            row_of = first // (ref_cls.size // n_rows)
            failures.append(
                f"top-1 agreement {metrics['top1_agreement']:.4f} < min {tol.min_top1_agreement:g} "
                f"({int((~agree).sum())} of {agree.size} rows disagree; first on input {row_of}"
                f"{f' ({kind_names[row_of]})' if kind_names is not None else ''}: "
                f"expected class {int(ref_cls.flat[first])}, got {int(got_cls.flat[first])})")
        if labels is not None:
            _accuracy(labels, ref_cls, got_cls, n_rows, tol, metrics, failures)

    return done()


def _accuracy(labels, ref_cls, got_cls, n_rows, tol, metrics, failures) -> None:
    lab = np.asarray(labels).reshape(-1)
    if ref_cls.ndim != 1:
        failures.append(f"labels given but outputs have one class per position, shape {_shape(ref_cls.shape)}; "
                        f"expected one class per row")
        return
    if lab.size > n_rows:
        failures.append(f"{lab.size} labels for {n_rows} output rows: expected at most one label per row")
        return
    if lab.dtype.kind not in "biuf":
        failures.append(f"labels are not numeric: dtype {lab.dtype}")
        return
    valid = lab >= 0
    metrics["n_labeled"] = int(valid.sum())
    if not valid.any():
        return
    y = lab[valid].astype(np.int64)
    acc_ref = float((ref_cls[: lab.size][valid] == y).mean())
    acc_got = float((got_cls[: lab.size][valid] == y).mean())
    metrics.update(accuracy_ref=acc_ref, accuracy_got=acc_got, accuracy_delta=acc_got - acc_ref)
    drop = acc_ref - acc_got
    if tol.max_accuracy_drop is not None and drop > tol.max_accuracy_drop + 1e-12:
        failures.append(f"accuracy {acc_got:.4f} vs reference {acc_ref:.4f} on {int(valid.sum())} labeled rows: "
                        f"drop {drop:.4f} > max {tol.max_accuracy_drop:g}")


def _top1(exp: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes: argmax over the last axis; one score per row: threshold 0.5 for values in
    [0, 1] (probabilities), else 0 (logits). Non-finite artifact values count as a different class."""
    if exp.ndim >= 2 and exp.shape[-1] > 1:
        finite_out = np.isfinite(out)
        if finite_out.all() and np.isfinite(exp).all():  # the usual case: argmax as it is
            return exp.argmax(-1), out.argmax(-1)
        e = np.nan_to_num(exp.astype(np.float64), nan=-np.inf)
        g = np.where(finite_out, out.astype(np.float64), -np.inf)
        ref, got = e.argmax(-1), g.argmax(-1)
        got = np.where(finite_out.all(-1), got, -1)
        return ref, got
    e = exp.reshape(exp.shape[0], -1)[:, 0].astype(np.float64)
    g = out.reshape(out.shape[0], -1)[:, 0].astype(np.float64)
    finite = e[np.isfinite(e)]
    thr = 0.5 if finite.size and finite.min() >= 0 and finite.max() <= 1 else 0.0
    return (e > thr).astype(np.int64), np.where(np.isfinite(g), (g > thr).astype(np.int64), -1)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def _kind_names(kinds, n_rows: int) -> np.ndarray | None:
    """One name per row, as an array (mapped per distinct value: parity sets have 10,000s of rows)."""
    if kinds is None:
        return None
    k = np.asarray(kinds).reshape(-1)
    if k.size != n_rows:
        raise ValueError(f"kinds: expected one entry per output row ({n_rows}), found {k.size}")
    values, inverse = np.unique(k, return_inverse=True)
    if k.dtype.kind in "biuf":
        names = [KIND_NAMES.get(int(v), f"kind {int(v)}") for v in values]
    else:
        names = [str(v) for v in values]
    return np.asarray(names, dtype=object)[inverse.reshape(-1)]


# --------------------------------------------------------------------------- records

def artifact_label(model: str, fmt: str, variant: str) -> str:
    """Same convention as exporters.base.Artifact.label: 'keras/onnx', 'keras/litert-int8'."""
    return f"{model}/{fmt}" + ("" if variant == "fp32" else f"-{variant}")


@dataclass
class ParityRecord:
    """One cell of the parity matrix: one model's artifact (format, variant) in one runtime.

    status "passed" / "failed": the artifact was checked; `comparison` holds the numbers, or `error`
    says why the artifact could not be loaded or run (a failed record, never a skipped one).
    status "skipped": no artifact exists for this cell on purpose; `reason` says why and `skip` says
    which case: "excluded" (the spec excluded the cell) or "not-produced" (the cell cannot be produced:
    no route from this framework to the format, or no such variant for it). An export that was asked
    for but whose converter raised is "failed" with error "UNSUPPORTED: ..." and details["outcome"]
    "unsupported" (skipped, not-produced, only where the spec allows that cell), never silently skipped.
    """
    model: str
    format: str
    variant: str
    runtime: str | None = None
    artifact: str | None = None
    n_rows: int = 0
    comparison: Comparison | None = None
    message: str = ""
    error: str | None = None
    status: str | None = None
    reason: str | None = None
    skip: str | None = None
    elapsed_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.status is None:
            if self.error is not None:
                self.status = "failed"
            elif self.comparison is not None:
                self.status = "passed" if self.comparison.passed else "failed"
            elif self.reason is not None:
                self.status = "skipped"
            else:
                raise ValueError(f"parity record {self.label}: needs a comparison, an error or a skip reason")
        if self.status not in STATUSES:
            raise ValueError(f"parity record {self.label}: status {self.status!r}, expected one of {STATUSES}")
        if self.status == "skipped":
            if not self.reason:
                raise ValueError(f"parity record {self.label}: a skipped record must carry a reason")
            if self.comparison is not None or self.error is not None:
                raise ValueError(f"parity record {self.label}: a skipped record has no comparison and no error")
            self.skip = self.skip or "excluded"
            if self.skip not in SKIPS:
                raise ValueError(f"parity record {self.label}: skip {self.skip!r}, expected one of {SKIPS}")
        else:
            if self.error is None and self.comparison is None:
                raise ValueError(f"parity record {self.label}: status {self.status} needs a comparison or an error")
            if self.error is not None and self.status != "failed":
                raise ValueError(f"parity record {self.label}: a record with an error is failed, not {self.status}")
            if self.error is None and self.status != ("passed" if self.comparison.passed else "failed"):
                raise ValueError(f"parity record {self.label}: status {self.status} contradicts the comparison")
        if self.comparison is not None and not self.n_rows:
            self.n_rows = int(self.comparison.metrics.get("n_rows", 0))
        if not self.message:
            self.message = self._message()

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def checked(cls, model: str, format: str, variant: str, runtime: str, artifact: str | None,
                comparison: Comparison, **kw) -> "ParityRecord":
        return cls(model, format, variant, runtime, None if artifact is None else str(artifact),
                   comparison=comparison, **kw)

    @classmethod
    def failed_to_load(cls, model: str, format: str, variant: str, runtime: str | None,
                       artifact: str | None, error: BaseException | str, **kw) -> "ParityRecord":
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        return cls(model, format, variant, runtime, None if artifact is None else str(artifact),
                   error=str(error), **kw)

    @classmethod
    def skipped(cls, model: str, format: str, variant: str, reason: str, *, skip: str = "excluded",
                **kw) -> "ParityRecord":
        return cls(model, format, variant, reason=reason, skip=skip, **kw)

    # -- views ------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return artifact_label(self.model, self.format, self.variant)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def _message(self) -> str:
        where = self.label + (f" on {self.runtime}" if self.runtime else "")
        if self.status == "skipped":
            return f"SKIPPED {self.label}: {self.reason}"
        if self.error is not None:
            return f"FAIL {where}: {self.error}"
        c, m = self.comparison, self.comparison.metrics
        if c.passed:
            extra = f", top-1 {m['top1_agreement']:.4f}" if "top1_agreement" in m else ""
            return (f"PASS {where}: max abs {_e(m.get('max_abs'))}, cosine {_f6(m.get('cosine'))}{extra} "
                    f"over {self.n_rows} rows (worst input {_i(m.get('worst_index'))}); "
                    f"tolerance {c.tolerance.describe()}")
        first = c.failures[0] if c.failures else "failed"
        more = f" (+{len(c.failures) - 1} more)" if len(c.failures) > 1 else ""
        worst = ""
        if "on input" not in first and "worst_index" in m:
            worst = (f"; worst input {_i(m['worst_index'])} (expected {_v(m.get('worst_expected'))}, "
                     f"got {_v(m.get('worst_got'))})")
        return f"FAIL {where}: {first}{more}{worst}; tolerance {c.tolerance.describe()}"

    def to_json(self) -> dict:
        return {
            "model": self.model, "format": self.format, "variant": self.variant, "label": self.label,
            "runtime": self.runtime, "artifact": self.artifact, "status": self.status,
            "n_rows": int(self.n_rows), "elapsed_s": float(self.elapsed_s),
            "comparison": None if self.comparison is None else self.comparison.to_json(),
            "message": self.message, "error": self.error, "reason": self.reason, "skip": self.skip,
            "details": _jsonable(self.details),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ParityRecord":
        comp = d.get("comparison")
        return cls(model=d["model"], format=d["format"], variant=d["variant"], runtime=d.get("runtime"),
                   artifact=d.get("artifact"), n_rows=int(d.get("n_rows") or 0),
                   comparison=None if comp is None else Comparison.from_json(comp),
                   message=d.get("message") or "", error=d.get("error"), status=d.get("status"),
                   reason=d.get("reason"), skip=d.get("skip"), elapsed_s=float(d.get("elapsed_s") or 0.0),
                   details=dict(d.get("details") or {}))


# --------------------------------------------------------------------------- discrimination

def discrimination(reference_outputs, perturbed_outputs=None, tolerance: Tolerance | None = None, *,
                   task: str = "regression", perturbation: str | None = None) -> dict:
    """How well the parity set can tell a right artifact from a wrong one.

    Measures the spread of the reference outputs (std per output dim over rows, mean over dims), the
    share of rows whose outputs differ from row 0 by more than atol, for classifiers the number of
    distinct top-1 classes, and, given the outputs of a slightly perturbed model on the same inputs,
    whether `tolerance` (default: fp32) catches the perturbation. Returns a JSON-able dict whose
    `discriminative` is False with a `reason` when the parity set proves little.
    """
    tol = tolerance if tolerance is not None else DEFAULT_TOLERANCES["fp32"]
    atol = tol.atol if tol.atol is not None else DEFAULT_TOLERANCES["fp32"].atol
    ref = np.asarray(reference_outputs, dtype=np.float64)
    if ref.ndim == 0:
        ref = ref.reshape(1)
    n = int(ref.shape[0])
    r = ref.reshape(n, -1) if n else ref.reshape(0, 1)
    out: dict[str, Any] = {"n_rows": n, "task": task, "atol": atol, "output_std": None,
                           "output_range": None, "rows_differing_fraction": None, "distinct_top1": None,
                           "perturbation": perturbation, "perturbation_caught": None,
                           "perturbation_max_abs": None, "perturbation_failures": None}
    reasons: list[str] = []
    if n < 2 or r.shape[1] == 0:
        reasons.append(f"only {n} row(s) with {r.shape[1]} output value(s) each: nothing can vary")
    elif not np.isfinite(r).all():
        reasons.append(f"reference outputs contain {int((~np.isfinite(r)).sum())} non-finite value(s)")
    else:
        std = float(r.std(axis=0).mean())
        out["output_std"] = std
        out["output_range"] = [float(r.min()), float(r.max())]
        differing = float((np.abs(r - r[0]).max(axis=1) > atol)[1:].mean())
        out["rows_differing_fraction"] = differing
        if std < atol:
            reasons.append(f"reference outputs barely vary: std {_e(std)} < atol {_g(atol)}")
        if differing < MIN_DIFFERING_FRACTION:
            reasons.append(f"only {differing:.0%} of rows differ from row 0 by more than atol {_g(atol)}")
        if task == "classification":
            ref_cls, _ = _top1(ref, ref)
            classes = np.unique(ref_cls)
            out["distinct_top1"] = int(classes.size)
            if classes.size < 2:
                reasons.append(f"every row has the same top-1 class ({int(classes[0])}): "
                               f"top-1 agreement cannot catch a wrong artifact")
    if perturbed_outputs is not None:
        pert = np.asarray(perturbed_outputs)
        if pert.shape != np.asarray(reference_outputs).shape:
            raise ValueError(f"discrimination: perturbed outputs have shape {_shape(pert.shape)}, expected the "
                             f"reference's {_shape(np.asarray(reference_outputs).shape)}")
        c = compare(ref, pert, tolerance=tol, task=task)
        out["perturbation_caught"] = not c.passed
        out["perturbation_max_abs"] = c.metrics.get("max_abs")
        out["perturbation_failures"] = list(c.failures)
        if c.passed:
            reasons.append(f"a perturbed model{f' ({perturbation})' if perturbation else ''} passes the "
                           f"tolerance: max abs {_e(c.metrics.get('max_abs'))} within {tol.describe()}")
    out["discriminative"] = not reasons
    out["reasons"] = reasons
    out["reason"] = "; ".join(reasons) if reasons else None
    return _jsonable(out)


def describe_discrimination(model: str, d: Mapping[str, Any]) -> str:
    """One line for reports: '<model>: discriminative (std 0.21, ...)' or '<model>: NOT discriminative: ...'."""
    bits = []
    if d.get("output_std") is not None:
        bits.append(f"output std {_e(d['output_std'])}")
    if d.get("rows_differing_fraction") is not None:
        bits.append(f"{d['rows_differing_fraction']:.0%} of rows differ from row 0")
    if d.get("distinct_top1") is not None:
        k = d["distinct_top1"]
        bits.append(f"{k} distinct top-1 class{'' if k == 1 else 'es'}")
    if d.get("perturbation_caught") is not None:
        what = f" ({d['perturbation']})" if d.get("perturbation") else ""
        bits.append(f"perturbed model{what} {'caught' if d['perturbation_caught'] else 'NOT caught'}: "
                    f"max abs {_e(d.get('perturbation_max_abs'))}")
    facts = ", ".join(bits)
    n = d.get("n_rows")
    facts = f"{n} rows" + (f", {facts}" if facts else "")
    hint = f"; {d['task_hint']}" if d.get("task_hint") else ""
    if d.get("discriminative"):
        return f"{model}: discriminative ({facts}){hint}"
    return f"{model}: NOT discriminative: {d.get('reason') or 'unknown'} ({facts}){hint}"


def probability_outputs(outputs: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the outputs whose rows are class probabilities (a softmax head: two or more values per
    row, each >= 0, summing to 1): judged as regression, such an output gets no top-1 check."""
    found = []
    for name, y in outputs.items():
        rows = np.asarray(y, dtype=np.float64)
        if rows.ndim < 2 or rows.shape[-1] < 2 or not rows.size:
            continue
        if (rows >= 0).all() and np.allclose(rows.sum(axis=-1), 1.0, atol=1e-4):
            found.append(name)
    return found


def task_hint(task: str, outputs: Mapping[str, np.ndarray]) -> str | None:
    """What to tell a user whose run judged probability outputs as regression; None otherwise."""
    names = probability_outputs(outputs) if task == "regression" else []
    if not names:
        return None
    return (f"output{'s' if len(names) > 1 else ''} {', '.join(names)} look{'' if len(names) > 1 else 's'} like "
            f"class probabilities (rows >= 0 summing to 1) but the run judged {'them' if len(names) > 1 else 'it'} "
            f"as regression (task = \"regression\"), without a top-1 check: for a classifier set [data] task = "
            f"\"classification\" (pipeline export --task classification)")


# --------------------------------------------------------------------------- formatting helpers

def _e(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def _g(x) -> str:
    """A tolerance for people: 1e-05, 2.5e-04, 0.02, 0.99999."""
    if x is None:
        return "-"
    x = float(x)
    if x != 0 and abs(x) < 1e-3:
        mant, exp = f"{x:.3e}".split("e")
        return f"{mant.rstrip('0').rstrip('.')}e{exp}"
    return f"{x:g}"


def _f6(x) -> str:
    """A cosine for tables: 7 decimals, enough to show 0.9999899 < 0.99999."""
    return "-" if x is None or not math.isfinite(float(x)) else f"{float(x):.7f}"


def _v(x) -> str:
    return "-" if x is None else f"{float(x):.6g}"


def _i(x) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else str(int(x))


def _shape(s) -> str:
    return "(" + ", ".join(str(int(v)) for v in s) + ("," if len(s) == 1 else "") + ")"


def _key(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower())


def _json_metrics(m: Mapping[str, Any]) -> dict:
    return {k: _jsonable(v) for k, v in m.items()}


def _jsonable(v):
    """Plain JSON types: numpy scalars to Python, non-finite floats to None (JSON has no NaN)."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, str):
        return v
    return str(v)


def dumps(obj) -> str:
    """JSON text with the same sanitising as to_json (used by report writers)."""
    return json.dumps(_jsonable(obj), indent=2, allow_nan=False)
