"""What the framework modules share: errors, the pretrained copy's name, output specs, output kinds."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from parity.signature import TensorSpec

PRETRAINED = "pretrained"  # a pretrained model's file, copied into its train stage's folder under this stem


class PretrainedLoadError(ValueError):
    """A pretrained model file that does not load: says which file and what it was expected to be."""
    user_error = True


class WrongModelKind(TypeError):
    """A factory (or file) that gave the wrong kind of object for its framework."""
    user_error = True


def check_kind(model, ok: bool, framework: str, expected: str, where: str) -> None:
    """Refuse a model that is not what `framework` trains, naming what was expected and what came."""
    if not ok:
        kind = f"{type(model).__module__}.{type(model).__qualname__}"
        raise WrongModelKind(f"{where}: framework {framework!r} expected {expected}, the factory returned "
                             f"{'None' if model is None else 'a ' + kind}")


def kept_pretrained(src: Path) -> Path:
    """The pretrained model's copy in a train stage's folder (a file, or a save_pretrained folder)."""
    found = sorted(Path(src).glob(PRETRAINED + "*"))
    if not found:
        raise PretrainedLoadError(f"{src}: expected the pretrained model's copy ({PRETRAINED}.*), found none")
    return found[0]


def output_specs(y, single_name: str) -> tuple[TensorSpec, ...]:
    if isinstance(y, dict):
        return tuple(TensorSpec.of(k, v) for k, v in y.items())
    return (TensorSpec.of(single_name, y),)


def output_kind(outputs: np.ndarray) -> str:
    """"probabilities" when every row is non-negative and sums to 1 (a softmax head), else "logits"."""
    out = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    if out.size and (out >= 0).all() and np.allclose(out.sum(axis=1), 1.0, atol=1e-4):
        return "probabilities"
    return "logits"


def first_line(e: BaseException, limit: int = 300) -> str:
    return (str(e).splitlines() or [""])[0][:limit]


# --------------------------------------------------------------------------- training: history and callbacks

@dataclass
class History:
    """What a training run did, epoch by epoch (1-based epochs)."""
    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    best_epoch: int | None = None     # the epoch whose weights were kept (a checkpoint callback)
    stopped_epoch: int | None = None  # the epoch early stopping ended training after
    compute_dtype: str | None = None  # mixed precision: the dtype a training forward was seen computing in

    def to_json(self) -> dict:
        return {"loss": [float(v) for v in self.loss], "val_loss": [float(v) for v in self.val_loss],
                "lr": [float(v) for v in self.lr], "best_epoch": self.best_epoch, "stopped_epoch": self.stopped_epoch}

    def describe(self) -> str:
        parts = []
        if self.stopped_epoch:
            parts.append(f"stopped early after epoch {self.stopped_epoch}")
        if self.best_epoch:
            parts.append(f"kept epoch {self.best_epoch}")
        if len(set(self.lr)) > 1:
            parts.append(f"lr {self.lr[0]:.3g} -> {self.lr[-1]:.3g}")
        return ", ".join(parts)


@dataclass
class RankRun:
    """What one rank of a training on several worker processes gives back (frameworks/dist_worker.py):
    its trained model, its History (rank 0's is the training's), its rank, the number of ranks its
    framework counted in the group, and the training rows it was dealt in the first epoch (its shard)."""
    model: object
    history: History
    rank: int
    world_size: int
    rows: list[int]


def callbacks_of(t) -> dict:
    """The spec's callbacks (each None when not asked for), for a framework to map onto its own."""
    return {"early_stopping": getattr(t, "early_stopping", None), "checkpoint": getattr(t, "checkpoint", None),
            "reduce_lr": getattr(t, "reduce_lr", None)}


class Monitor:
    """Improvement on one logged value (mode "min" for losses), as Keras' callbacks judge it."""

    def __init__(self, name: str, min_delta: float = 0.0):
        self.name, self.min_delta = name, min_delta
        self.best: float | None = None
        self.wait = 0

    def improved(self, logs: dict) -> bool:
        value = logs[self.name]
        if self.best is None or value < self.best - self.min_delta:
            self.best, self.wait = value, 0
            return True
        self.wait += 1
        return False


class PlainCallbacks:
    """Early stopping, the best checkpoint (restored when training ends) and reduce-on-plateau for a
    plain training loop, with Keras' meanings. The loop calls `epoch_end(epoch, logs)` and stops when it
    returns True, then calls `train_end()`."""

    def __init__(self, t, history: History, *, get_weights, set_weights, get_lr, set_lr):
        cb = callbacks_of(t)
        self.history, self.get_weights, self.set_weights = history, get_weights, set_weights
        self.get_lr, self.set_lr = get_lr, set_lr
        self.stop = cb["early_stopping"] and (Monitor(cb["early_stopping"]["monitor"], cb["early_stopping"]["min_delta"]),
                                              cb["early_stopping"]["patience"])
        self.keep = cb["checkpoint"] and Monitor(cb["checkpoint"]["monitor"])
        self.plateau = cb["reduce_lr"] and (Monitor(cb["reduce_lr"]["monitor"], cb["reduce_lr"]["min_delta"]),
                                            cb["reduce_lr"])
        self.best_weights = None

    def epoch_end(self, epoch: int, logs: dict) -> bool:
        self.history.lr.append(float(self.get_lr()))
        if self.keep and self.keep.improved(logs):
            self.best_weights, self.history.best_epoch = self.get_weights(), epoch
        if self.plateau:
            monitor, settings = self.plateau
            if not monitor.improved(logs) and monitor.wait >= settings["patience"]:
                self.set_lr(max(self.get_lr() * settings["factor"], settings["min_lr"]))
                monitor.wait = 0
        if self.stop:
            monitor, patience = self.stop
            if not monitor.improved(logs) and monitor.wait >= patience:
                self.history.stopped_epoch = epoch
                return True
        return False

    def train_end(self) -> None:
        if self.best_weights is not None:
            self.set_weights(self.best_weights)


def shuffled_rows(n: int, shuffle: bool, seed: int):
    """`rows(epoch)` for epoch_loop: a seeded permutation each epoch, or the rows in order."""
    rng = np.random.default_rng(seed)
    return lambda epoch: rng.permutation(n) if shuffle else np.arange(n)


def epoch_loop(t, history: History, callbacks: PlainCallbacks, *, rows, batch: int, step, evaluate=None,
               on_epoch=None, summed=lambda total, count: (total, count)) -> None:
    """The epochs of every hand-written training loop (tensorflow, torch, jax): `rows(epoch)` this process's
    rows in order, `step(idx) -> loss` one update on each batch of `batch` rows, the epoch's loss the
    row-weighted mean (`summed` adds it up over processes), `evaluate() -> loss` on the validation rows
    when given, then the callbacks (which may stop training) and the progress report."""
    for epoch in range(1, t.epochs + 1):
        order = rows(epoch)
        total = 0.0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            total += float(step(idx)) * len(idx)
        total, count = summed(total, len(order))
        history.loss.append(total / count)
        if evaluate is not None:
            history.val_loss.append(float(evaluate()))
        stop = callbacks.epoch_end(epoch, epoch_logs(history))
        if on_epoch:
            on_epoch(epoch, history.loss[-1])
        if stop:
            break
    callbacks.train_end()


def epoch_logs(history: History) -> dict:
    """The latest epoch's values by Keras' names."""
    logs = {"loss": history.loss[-1]}
    if history.val_loss:
        logs["val_loss"] = history.val_loss[-1]
    return logs


def tensorboard_without_tensorflow() -> None:
    """TensorBoard's writers import TensorFlow when it is installed, unless `tensorboard.compat.notf`
    exists (its own switch for TensorFlow-free installs): a torch process must not load TensorFlow."""
    import sys
    import types
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


def epoch_series(history: "History") -> dict[str, dict[str, list[float]]]:
    """A History in Keras' TensorBoard layout, which every style writes so that one chart overlays them
    all: run folder (train/, validation/) -> tag (epoch_<name>) -> one value per epoch, step = the
    0-based epoch, as Keras' TensorBoard callback writes them."""
    series = {"train": {"epoch_loss": history.loss, "epoch_learning_rate": history.lr},
              "validation": {"epoch_loss": history.val_loss}}
    return {run: {tag: [float(v) for v in values] for tag, values in tags.items() if values}
            for run, tags in series.items() if tags["epoch_loss"]}


def torch_summaries(logdir: Path, history: "History", graph=None) -> None:
    """`epoch_series` through torch.utils.tensorboard (no TensorFlow in a torch process), and the module's
    graph when `graph` is (module, example inputs)."""
    tensorboard_without_tensorflow()
    from torch.utils.tensorboard import SummaryWriter
    for run, tags in epoch_series(history).items():
        writer = SummaryWriter(str(Path(logdir) / run))
        for tag, values in tags.items():
            for epoch, value in enumerate(values):
                writer.add_scalar(tag, value, epoch)
        if run == "train" and graph is not None:
            try:
                writer.add_graph(*graph)
            except Exception:  # noqa: BLE001 - a graph is a nicety; some modules do not trace
                pass
        writer.close()


def tf_summaries(logdir: Path, history: "History", graph_fn=None) -> None:
    """`epoch_series` through tf.summary, and the model's graph when there is a tf.function to trace; for
    TensorFlow-side loops that are not Keras' fit."""
    import tensorflow as tf
    for run, tags in epoch_series(history).items():
        writer = tf.summary.create_file_writer(str(Path(logdir) / run))
        with writer.as_default():
            for tag, values in tags.items():
                for epoch, value in enumerate(values):
                    tf.summary.scalar(tag, value, step=epoch)
            if run == "train" and graph_fn is not None:
                tf.summary.graph(graph_fn.graph)
        writer.close()
