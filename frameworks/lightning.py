"""PyTorch Lightning: a LightningModule (its own training_step, validation_step and, when it has one,
configure_optimizers) trained by lightning.Trainer on the CPU, with Lightning's own EarlyStopping and
ModelCheckpoint; its TensorBoard scalars are the History's, in Keras' layout as every style writes them
(Lightning's TensorBoardLogger would name them as the module logs them, in one folder). To every exporter
it is a torch module."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .base import History, RankRun, callbacks_of, check_kind, tensorboard_without_tensorflow, torch_summaries
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
PRECISIONS = ("fp32", "bf16")  # the Trainer's own precision= ("bf16-mixed")
DISTRIBUTION = "lightning-ddp"  # workers > 1: Trainer(strategy="ddp"), ranks started by Lightning's launcher


class Adapter(TorchAdapter):
    def check(self, model, where: str) -> None:
        import lightning
        check_kind(model, isinstance(model, lightning.LightningModule), NAME, "a lightning.LightningModule", where)

    def train(self, model, t, x, y: np.ndarray, seed: int, on_epoch=None, val=None, logdir=None) -> History:
        return self._fit(model, t, x, y, seed, on_epoch, val, logdir)[0]

    def train_rank(self, make, t, x, y: np.ndarray, seed: int, *, workers: int, on_epoch=None, val=None,
                   logdir=None) -> RankRun:
        """One rank of Trainer(strategy="ddp", accelerator="cpu", devices=workers). In the process started
        for rank 0, Lightning's ddp launcher starts ranks 1.. as copies of its command (LOCAL_RANK set);
        each builds the model with the same seed, Lightning deals the rows out with a DistributedSampler
        and gloo averages the gradients. Rank 0 waits for the ranks it started before it reports."""
        model = self.build(make, seed=seed, threads=t.threads)
        self.launched_exit_codes, self.trainer, fitted = {}, None, False
        try:
            history, trainer = self._fit(model, t, x, y, seed, on_epoch, val, logdir, workers=workers)
            fitted = True
        finally:  # how the ranks started from here ended: rank 0 fails when one of them does
            self.launched_exit_codes = {r: p.wait() if fitted else _ended(p)
                                        for r, p in _launched(self.trainer).items()}
        failed = {r: c for r, c in self.launched_exit_codes.items() if c != 0}
        if failed:
            raise RuntimeError(f"rank(s) {', '.join(map(str, failed))} started by Lightning's launcher ended "
                               f"with exit code(s) {', '.join(map(str, failed.values()))}")
        sampler = trainer.train_dataloader.sampler
        sampler.set_epoch(0)
        return RankRun(model, history, trainer.global_rank, trainer.world_size, [int(i) for i in sampler])

    def _fit(self, model, t, x, y: np.ndarray, seed: int, on_epoch, val, logdir, workers: int = 1):
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
            model.training_step = _step(model, loss_fn, "loss", workers > 1)
            model.validation_step = _step(model, loss_fn, "val_loss", workers > 1)
        if not is_overridden("configure_optimizers", model):  # the spec's optimizer and lr
            model.configure_optimizers = lambda: _optimizers(self, t, model, cb["reduce_lr"])
        n = len(xs[0])
        rows = TensorDataset(*xs, torch.from_numpy(y))
        if workers > 1:
            import os
            from torch.utils.data.distributed import DistributedSampler
            from .distributed import per_worker_batch
            # the rows dealt out as the spec says (Lightning's own sampler would always shuffle them); one
            # node, so the rank is the LOCAL_RANK Lightning's launcher gives the ranks it starts
            sampler = DistributedSampler(rows, num_replicas=workers, rank=int(os.environ.get("LOCAL_RANK", "0")),
                                         shuffle=t.shuffle, seed=seed)
            train = DataLoader(rows, batch_size=per_worker_batch(t.batch_size, n, workers), sampler=sampler)
            spread = {"strategy": "ddp", "devices": workers, "use_distributed_sampler": False}
        else:
            train = DataLoader(rows, batch_size=min(t.batch_size or n, n), shuffle=t.shuffle,
                               generator=torch.Generator().manual_seed(seed))
            spread = {"devices": 1}
        val_loader = None if val is None else DataLoader(
            TensorDataset(*torch_inputs(model, val[0]), torch.from_numpy(val[1])), batch_size=len(val[1]))
        history = History()
        callbacks = [_Recorder(history, on_epoch, synced=workers > 1)]
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
            trainer = lightning.Trainer(
                max_epochs=t.epochs, accelerator="cpu", **spread, logger=False, callbacks=callbacks,
                precision={"fp32": "32-true", "bf16": "bf16-mixed"}[t.precision],
                enable_checkpointing=bool(keep), enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0, log_every_n_steps=1, deterministic=True, default_root_dir=tmp)
            if workers > 1:
                self.trainer = trainer  # its launcher knows the ranks it started, even when fit raises
            trainer.fit(model, train, val_loader)
            # rank 0 writes the checkpoint (into its own folder): the model that is kept is rank 0's
            if keep and keep.best_model_path and trainer.is_global_zero:
                state = torch.load(keep.best_model_path, map_location="cpu", weights_only=False)
                model.load_state_dict(state["state_dict"])
                history.best_epoch = int(state["epoch"]) + 1
        if stop and stop.stopped_epoch:
            history.stopped_epoch = int(stop.stopped_epoch) + 1
        if t.precision != "fp32":
            history.compute_dtype = f"{trainer.precision} (Lightning's precision plugin)"
        if logdir and trainer.is_global_zero:  # on several ranks, rank 0's History holds the averaged values
            torch_summaries(logdir, history)
        model.eval()
        return history, trainer

    def pip_requirements(self) -> list[str]:
        import lightning
        return super().pip_requirements() + [f"lightning=={lightning.__version__}"]


def _step(model, loss_fn, name: str, synced: bool = False):
    def step(batch, batch_idx):
        *inputs, target = batch
        loss = loss_fn(model(*inputs), target)
        model.log(name, loss, on_step=False, on_epoch=True, prog_bar=False,
                  **({"sync_dist": True} if synced else {}))
        return loss
    return step


def _launched(trainer) -> dict:
    """The ranks Lightning's ddp launcher started from this process (none in those ranks themselves)."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return {rank: p for rank, p in enumerate(getattr(launcher, "procs", None) or [], start=1)}


def _ended(proc, wait_s: float = 5.0):
    """A started rank's exit code once it has ended (it fails soon after its peer), else None."""
    import subprocess
    try:
        return proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        return None


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
    made on first use so that naming this module imports nothing). `synced`: on several ranks, each
    value is averaged over them (a module's own `log` keeps its rank's), and rank 0 alone reports."""

    def __new__(cls, history: History, on_epoch, synced: bool = False):
        def value(trainer, logged):
            return float(trainer.strategy.reduce(logged.detach().clone(), reduce_op="mean") if synced else logged)

        class Recorder(_recorder_base()):
            def on_train_epoch_end(self, trainer, pl_module):
                logged = trainer.callback_metrics
                history.loss.append(value(trainer, logged["loss"]))
                if "val_loss" in logged:
                    history.val_loss.append(value(trainer, logged["val_loss"]))
                history.lr.append(float(trainer.optimizers[0].param_groups[0]["lr"]))
                if on_epoch and trainer.is_global_zero:
                    on_epoch(trainer.current_epoch + 1, history.loss[-1])
        return Recorder()
