"""Framework-neutral parts of training: loading the factory, task metrics, acceptance bounds."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np

from .spec import ModelSpec, Spec


class TrainingRejected(RuntimeError):
    """A trained model that misses its spec's acceptance bounds."""


class FactoryError(RuntimeError):
    """A model factory that could not be imported or raised."""

    def __init__(self, message: str, *, user_error: bool = False):
        super().__init__(message)
        self.user_error = user_error  # a missing function is the spec's fault (exit 2); a raise is a failure


class ModelMismatch(ValueError):
    """The factory's model does not take the data's inputs or gives the wrong number of outputs."""
    user_error = True


def load_factory(spec: Spec, model: ModelSpec):
    module_name, _, func = model.factory.partition(":")
    spec_dir = str(spec.path.parent)
    if spec_dir not in sys.path:
        sys.path.insert(0, spec_dir)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise FactoryError(f"model {model.name}: importing factory module '{module_name}' failed: "
                           f"{type(e).__name__}: {e}") from e
    if not hasattr(module, func):
        raise FactoryError(f"model {model.name}: factory '{model.factory}': expected module '{module_name}' "
                           f"to define '{func}', found no such name", user_error=True)
    return getattr(module, func)


def factory_shape(input_shape):
    """What a factory is given as input_shape: a tuple, or {name: tuple} for a model of several inputs."""
    if isinstance(input_shape, dict):
        return {k: tuple(v) for k, v in input_shape.items()}
    return tuple(input_shape)


def build_model(spec: Spec, model: ModelSpec, input_shape, n_outputs: int | None):
    factory = load_factory(spec, model)
    try:
        return factory(factory_shape(input_shape), None if n_outputs is None else int(n_outputs), **model.params)
    except Exception as e:
        raise FactoryError(f"model {model.name}: factory '{model.factory}' raised "
                           f"{type(e).__name__}: {e}") from e


def probe_model(model: ModelSpec, predict, x_rows: np.ndarray, n_outputs: int) -> None:
    """Call the freshly built model on a few rows of the data, as training will: a model that does
    not take them, or gives the wrong number of outputs, stops here with the shapes named."""
    want = (", ".join(f"{k} of shape (batch, {', '.join(map(str, v.shape[1:]))})" for k, v in x_rows.items())
            if isinstance(x_rows, dict) else f"inputs of shape (batch, {', '.join(map(str, x_rows.shape[1:]))})")
    made = f"file {model.source!r} holds a model" if model.pretrained else f"factory '{model.factory}' made a model"
    rows = len(next(iter(x_rows.values()))) if isinstance(x_rows, dict) else len(x_rows)
    try:
        out = predict(x_rows)
    except Exception as e:
        raise ModelMismatch(f"model {model.name} ({model.framework}): {made} "
                            f"that fails on {rows} rows of the data: expected it to take {want}; "
                            f"it raised {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    if isinstance(out, dict):  # several named outputs: fine to export and verify, not to train on one target
        if not model.pretrained:
            raise ModelMismatch(f"model {model.name} ({model.framework}): {made} of several outputs "
                                f"({', '.join(out)}); training fits one output to the data's target: return one "
                                f"tensor, or train it yourself and bring it with source = FILE, train = false")
        short = {k: np.shape(v) for k, v in out.items() if np.ndim(v) < 1 or len(v) != rows}
        if short:
            raise ModelMismatch(f"model {model.name} ({model.framework}): {made} whose outputs for {rows} rows "
                                f"have shapes {short}; expected every output to have {rows} rows")
        return
    out = np.asarray(out)
    if out.ndim < 1 or len(out) != rows or (n_outputs is not None and int(np.prod(out.shape[1:])) != n_outputs):
        raise ModelMismatch(f"model {model.name} ({model.framework}): {made} "
                            f"whose outputs for {rows} rows have shape {out.shape}; expected "
                            f"({rows}, {n_outputs}) for the data's targets")


def bind_to_model(model: ModelSpec, fw, built, x_rows) -> str:
    """Check the data's arrays bind to the model's inputs (by name, then for one input by position) and
    say how, for the stage's summary ("" when every name is the model's own)."""
    from parity.feeds import InputBindingError, describe_binding
    if not hasattr(fw, "bind"):
        return ""
    try:
        return describe_binding(fw.bind(built, x_rows))
    except InputBindingError as e:
        made = f"file {model.source!r} holds a model" if model.pretrained else f"factory '{model.factory}' made a model"
        raise ModelMismatch(f"model {model.name} ({model.framework}): {made} whose inputs do not match the "
                            f"data: {e}") from None


def task_metrics(task: str, predict, arrays: dict[str, np.ndarray]) -> dict[str, float]:
    """Metrics a person judges the model by, from its predictions (numpy in, numpy out)."""
    has_test = len(next(iter(arrays["x_test"].values()))) if isinstance(arrays["x_test"], dict) else len(arrays["x_test"])
    x_eval, y_eval = (arrays["x_test"], arrays["y_test"]) if has_test else \
        (arrays["x_train"], arrays["y_train"])
    pred = np.asarray(predict(x_eval))
    if task == "classification":
        return {"accuracy": float(np.mean(pred.argmax(-1) == y_eval.reshape(-1)))}
    metrics = {"mse": float(np.mean((pred.reshape(y_eval.shape) - y_eval) ** 2))}
    if not isinstance(x_eval, dict) and x_eval.shape[1:] == (1,) and pred.shape[1:] == (1,):
        # one input, one output: the learned line, read off the model itself
        at = np.array([[0.0], [1.0]], dtype=np.float32)
        f0, f1 = np.asarray(predict(at)).reshape(-1)
        metrics.update(slope=float(f1 - f0), intercept=float(f0))
    return metrics


def check_acceptance(model: ModelSpec, metrics: dict[str, float]) -> None:
    problems = []
    for bound in model.accept:
        if bound.metric not in metrics:
            problems.append(f"{bound.metric}: not measured (measured: {', '.join(sorted(metrics))})")
            continue
        why = bound.check(metrics[bound.metric])
        if why:
            problems.append(why)
    if problems:
        raise TrainingRejected(f"model {model.name} ({model.framework}) missed its acceptance bounds: "
                               + "; ".join(problems))


def n_outputs(task: str, y: np.ndarray) -> int:
    if task == "classification":
        return int(y.max()) + 1
    return int(np.prod(y.shape[1:])) if y.ndim > 1 else 1


def write_history(out: Path, history: dict) -> None:
    """history.json: the per-epoch loss (and val_loss, lr, the kept and the stopping epoch)."""
    import json
    (out / "history.json").write_text(json.dumps(history))
