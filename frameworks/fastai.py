"""fastai: the factory's nn.Module in a fastai Learner (the spec's data, loss and optimizer), trained
with fit_one_cycle and fastai's own callbacks (EarlyStoppingCallback, SaveModelCallback, and, as fastai
pairs it, ReduceLROnPlateau with a constant-rate `fit`). To every exporter it is a torch module.

fastai is installed without torchvision (its only wheel here breaks torch-based imports), which its
tabular and basic training paths do not need."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .base import History, callbacks_of, check_kind, torch_summaries
from .torch import Adapter as TorchAdapter
from .torch import torch_inputs

NAME = "fastai"
FAMILY = "torch"
LANE = "torch"
PACKAGES = ("torch", "fastai", "fastcore")
INSTALL = "pip install --no-deps fastai==2.8.12, then its requirements as requirements.txt lists them"
PRETRAINED_SUFFIXES = ()
FLAVOR = "pytorch"
BUILDS_ON = ("torch",)
NOT_MIXED = ("fastai's mixed precision (Learner.to_bf16 / to_fp16) is not wired into this style yet; "
             "framework = \"torch\" or \"lightning\" train the same module in bf16")
DISTRIBUTION = None
NOT_DISTRIBUTED = ("fastai trains on several processes through Hugging Face Accelerate (Learner.distrib_ctx and "
                   "to_distributed wrap accelerate.Accelerator, each process started by `accelerate launch`), and "
                   "accelerate is not among this toolkit's packages: without it fastai.distributed does not even "
                   "import")

MONITORS = {"loss": "train_loss", "val_loss": "valid_loss"}  # the spec's names -> fastai's recorder's


class Adapter(TorchAdapter):
    def check(self, model, where: str) -> None:
        import torch
        check_kind(model, isinstance(model, torch.nn.Module), NAME,
                   "a torch.nn.Module for a fastai Learner to train", where)

    def train(self, model, t, x, y: np.ndarray, seed: int, on_epoch=None, val=None, logdir=None) -> History:
        import torch
        from fastai.callback.schedule import fit_one_cycle  # noqa: F401 - adds Learner.fit_one_cycle
        from fastai.callback.tracker import EarlyStoppingCallback, ReduceLROnPlateau, SaveModelCallback
        from fastai.data.core import DataLoaders
        from fastai.learner import Learner
        from fastai.optimizer import SGD, Adam
        from torch.utils.data import TensorDataset
        torch.manual_seed(seed)
        cb = callbacks_of(t)
        xs = torch_inputs(model, x)
        loss_fn = self.loss_fn(model, t, xs)
        n = len(xs[0])
        train = TensorDataset(*xs, torch.from_numpy(y))
        # fastai always validates; without held-out rows it scores the training rows (not recorded)
        valid = train if val is None else TensorDataset(*torch_inputs(model, val[0]), torch.from_numpy(val[1]))
        dls = DataLoaders.from_dsets(train, valid, bs=min(t.batch_size or n, n), shuffle=t.shuffle, device="cpu",
                                     num_workers=0)  # the lane is a daemon process: no loader workers
        history = History()
        with tempfile.TemporaryDirectory(prefix="fastai-") as tmp:
            learn = Learner(dls, model, loss_func=loss_fn, opt_func={"sgd": SGD, "adam": Adam}[t.optimizer],
                            lr=t.lr, path=Path(tmp), model_dir="models")
            progress = _progress(on_epoch)
            cbs = [progress]
            if cb["early_stopping"]:
                cbs.append(EarlyStoppingCallback(monitor=MONITORS[cb["early_stopping"]["monitor"]],
                                                 min_delta=cb["early_stopping"]["min_delta"],
                                                 patience=cb["early_stopping"]["patience"]))
            if cb["checkpoint"]:
                cbs.append(SaveModelCallback(monitor=MONITORS[cb["checkpoint"]["monitor"]], fname="best"))
            if cb["reduce_lr"]:
                r = cb["reduce_lr"]
                cbs.append(ReduceLROnPlateau(monitor=MONITORS[r["monitor"]], patience=r["patience"],
                                             factor=1 / r["factor"], min_delta=r["min_delta"], min_lr=r["min_lr"]))
            with learn.no_bar(), learn.no_logging():
                if cb["reduce_lr"]:  # the one-cycle schedule would overwrite every rate the callback sets
                    learn.fit(t.epochs, t.lr, cbs=cbs)
                else:
                    learn.fit_one_cycle(t.epochs, t.lr, cbs=cbs)
        values = [list(map(float, v)) for v in learn.recorder.values]
        history.loss = progress.epoch_losses  # the recorder's train_loss is smoothed across epochs
        if val is not None:
            history.val_loss = [v[1] for v in values]
        history.lr = [float(lrs) for lrs in _per_epoch(learn.recorder.lrs, len(values))]
        if len(values) < t.epochs and cb["early_stopping"]:
            history.stopped_epoch = len(values)
        if cb["checkpoint"]:
            series = history.loss if cb["checkpoint"]["monitor"] == "loss" else history.val_loss
            history.best_epoch = int(np.argmin(series)) + 1
        if logdir:  # the History in Keras' layout: fastai's TensorBoardCallback logs per batch, smoothed
            torch_summaries(logdir, history)
        model.eval()
        return history

    def pip_requirements(self) -> list[str]:
        import fastai
        return super().pip_requirements() + [f"fastai=={fastai.__version__}"]


def _per_epoch(lrs: list, epochs: int) -> list:
    """The learning rate at the end of each epoch, from the recorder's per-batch rates."""
    if not lrs or not epochs:
        return []
    per = max(1, len(lrs) // epochs)
    return [lrs[min(len(lrs) - 1, (e + 1) * per - 1)] for e in range(epochs)]


def _progress(on_epoch):
    """A fastai Callback keeping each epoch's mean training loss (as the other styles report it) and
    reporting progress."""
    from fastai.callback.core import Callback

    class Progress(Callback):
        order = 90  # after the recorder has the epoch's losses

        def __init__(self):
            self.epoch_losses: list[float] = []

        def before_epoch(self):
            self.total, self.count = 0.0, 0

        def after_batch(self):
            if self.training:
                n = len(self.yb[0])
                self.total, self.count = self.total + float(self.loss) * n, self.count + n

        def after_train(self):
            self.epoch_losses.append(self.total / max(self.count, 1))

        def after_epoch(self):
            if on_epoch and self.epoch_losses:
                on_epoch(self.epoch + 1, self.epoch_losses[-1])
    return Progress()
