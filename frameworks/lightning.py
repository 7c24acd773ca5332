"""PyTorch Lightning: a LightningModule (its own training_step, validation_step and, when it has one,
configure_optimizers) trained by lightning.Trainer on the CPU, with Lightning's own EarlyStopping,
ModelCheckpoint and TensorBoardLogger. To every exporter it is a torch module."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .base import History, callbacks_of, check_kind, tensorboard_without_tensorflow
from .torch import Adapter as TorchAdapter
from .torch import torch_inputs

NAME = "lightning"
FAMILY = "torch"
LANE = "torch"
PACKAGES = ("torch", "lightning")
INSTALL = "pip install lightning==2.6.6"
PRETRAINED_SUFFIXES = ()
FLAVOR = "pytorch"
BUILDS_ON = ("torch",)  # frameworks/torch.py: its loading, saving, prediction and loss


class Adapter(TorchAdapter):
    def check(self, model, where: str) -> None:
        import lightning
        check_kind(model, isinstance(model, lightning.LightningModule), NAME, "a lightning.LightningModule", where)

    def train(self, model, t, x, y: np.ndarray, seed: int, on_epoch=None, val=None, logdir=None) -> History:
        import lightning
        import torch
        from lightning.pytorch.utilities.model_helpers import is_overridden
        from torch.utils.data import DataLoader, TensorDataset
        tensorboard_without_tensorflow()
        lightning.seed_everything(seed, workers=True, verbose=False)
        cb = callbacks_of(t)
        xs = torch_inputs(model, x)
        loss_fn = self.loss_fn(model, t, xs)
        if not is_overridden("training_step", model):  # the spec's loss, where the module brings none
            model.training_step = _step(model, loss_fn, "loss")
            model.validation_step = _step(model, loss_fn, "val_loss")
        if not is_overridden("configure_optimizers", model):  # the spec's optimizer and lr
            model.configure_optimizers = lambda: _optimizers(self, t, model, cb["reduce_lr"])
        n = len(xs[0])
        bs = min(t.batch_size or n, n)
        train = DataLoader(TensorDataset(*xs, torch.from_numpy(y)), batch_size=bs, shuffle=t.shuffle,
                           generator=torch.Generator().manual_seed(seed))
        val_loader = None if val is None else DataLoader(
            TensorDataset(*torch_inputs(model, val[0]), torch.from_numpy(val[1])), batch_size=len(val[1]))
        history = History()
        callbacks = [_Recorder(history, on_epoch)]
        stop = cb["early_stopping"] and lightning.pytorch.callbacks.EarlyStopping(
            monitor=cb["early_stopping"]["monitor"], patience=cb["early_stopping"]["patience"],
            min_delta=cb["early_stopping"]["min_delta"], mode="min")
        if stop:
            callbacks.append(stop)
        with tempfile.TemporaryDirectory(prefix="lightning-") as tmp:
            keep = cb["checkpoint"] and lightning.pytorch.callbacks.ModelCheckpoint(
                dirpath=tmp, monitor=cb["checkpoint"]["monitor"], save_top_k=1, mode="min")
            if keep:
                callbacks.append(keep)
            logger = lightning.pytorch.loggers.TensorBoardLogger(str(logdir), name="", version="",
                                                                 log_graph=False) if logdir else False
            trainer = lightning.Trainer(
                max_epochs=t.epochs, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                enable_checkpointing=bool(keep), enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, log_every_n_steps=1, deterministic=True, default_root_dir=tmp)
            trainer.fit(model, train, val_loader)
            if keep and keep.best_model_path:
                state = torch.load(keep.best_model_path, map_location="cpu", weights_only=False)
                model.load_state_dict(state["state_dict"])
                history.best_epoch = int(state["epoch"]) + 1
        if stop and stop.stopped_epoch:
            history.stopped_epoch = int(stop.stopped_epoch) + 1
        model.eval()
        return history

    def pip_requirements(self) -> list[str]:
        import lightning
        return super().pip_requirements() + [f"lightning=={lightning.__version__}"]


def _step(model, loss_fn, name: str):
    def step(batch, batch_idx):
        *inputs, target = batch
        loss = loss_fn(model(*inputs), target)
        model.log(name, loss, on_step=False, on_epoch=True, prog_bar=False)
        return loss
    return step


def _optimizers(adapter, t, model, reduce_lr):
    opt = adapter.optimizer(t, model.parameters())
    if not reduce_lr:
        return opt
    import torch
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=reduce_lr["factor"],
                                                         patience=reduce_lr["patience"], threshold=reduce_lr["min_delta"],
                                                         threshold_mode="abs", min_lr=reduce_lr["min_lr"])
    return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": reduce_lr["monitor"]}}


def _recorder_base():
    import lightning
    return lightning.pytorch.callbacks.Callback


class _Recorder:
    """Reads each epoch's logged loss, val_loss and learning rate into the History (a Lightning Callback,
    made on first use so that naming this module imports nothing)."""

    def __new__(cls, history: History, on_epoch):
        class Recorder(_recorder_base()):
            def on_train_epoch_end(self, trainer, pl_module):
                logged = trainer.callback_metrics
                history.loss.append(float(logged["loss"]))
                if "val_loss" in logged:
                    history.val_loss.append(float(logged["val_loss"]))
                history.lr.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
                if on_epoch:
                    on_epoch(trainer.current_epoch + 1, history.loss[-1])
        return Recorder()
