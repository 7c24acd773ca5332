"""PyTorch: an nn.Module from a factory, or a TorchScript archive, torch.export program, pickled module,
state dict or Hugging Face folder; trained by a plain loop."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from exporters.base import forward_order, keyword_call
from parity.feeds import flatten_outputs, n_rows, one_or_named
from parity.signature import Signature, TensorSpec

from .base import (PRETRAINED, History, PlainCallbacks, PretrainedLoadError, RankRun, check_kind, epoch_loop,
                   first_line, kept_pretrained, output_kind, output_specs, torch_summaries)

NAME = "torch"
FAMILY = "torch"
LANE = "torch"
PACKAGES = ("torch",)
INSTALL = "pip install torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu"
PRETRAINED_SUFFIXES = (".pt", ".pth", ".pt2")
PRETRAINED_FOLDER = ("config.json", "a Hugging Face save_pretrained folder")
FLAVOR = "pytorch"
PRECISIONS = ("fp32", "bf16")  # torch.autocast around each forward and loss (frameworks/precision.py)
DISTRIBUTION = "ddp-gloo"  # workers > 1: DistributedDataParallel on gloo, started by torchrun


class Adapter:
    weights_file = "model.state_dict.pt"
    output_kind = "values"  # set by train for classifiers: "probabilities" (softmax head) or "logits"

    def check(self, model, where: str) -> None:
        import torch
        check_kind(model, isinstance(model, torch.nn.Module), NAME, "a torch.nn.Module", where)

    def build(self, make, *, seed: int, threads: int | None = None):
        import torch
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        return make()

    def loss_fn(self, model, t, xs):
        """The spec's loss; for a classifier, cross entropy on logits or NLL on a softmax head."""
        import torch
        import torch.nn.functional as F
        if t.loss == "mse":
            return F.mse_loss
        with torch.no_grad():
            self.output_kind = output_kind(model(*(a[:8] for a in xs)).numpy())
        if self.output_kind == "logits":
            return F.cross_entropy

        def nll_of_probabilities(prob, target):  # a softmax head, as the Keras digits model has
            return F.nll_loss(torch.log(prob.clamp_min(1e-12)), target)
        return nll_of_probabilities

    def optimizer(self, t, params):
        import torch
        return {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[t.optimizer](params, lr=t.lr)

    def train(self, model, t, x, y: np.ndarray, seed: int, on_epoch=None, val=None, logdir=None) -> History:
        """A plain loop (seeded shuffle, one optimizer step per batch); the spec's callbacks with Keras'
        meanings; TensorBoard scalars (Keras' layout) and the module's graph through torch.utils.tensorboard."""
        import torch
        xs, ys = torch_inputs(model, x), torch.from_numpy(y)
        loss_fn = self.loss_fn(model, t, xs)
        n = n_rows(x)
        gen = torch.Generator().manual_seed(seed)

        def rows(epoch: int):
            return torch.randperm(n, generator=gen) if t.shuffle else torch.arange(n)
        return self._loop(model, model, t, xs, ys, loss_fn, rows, min(t.batch_size or n, n), on_epoch, val, logdir)

    def train_rank(self, make, t, x, y: np.ndarray, seed: int, *, workers: int, on_epoch=None, val=None,
                   logdir=None) -> RankRun:
        """One rank of DistributedDataParallel on gloo, in a process torchrun started (its RANK, WORLD_SIZE
        and MASTER_ADDR/PORT in the environment): the same seed on every rank, the rows dealt out by
        DistributedSampler, gradients averaged across the ranks at each step, the epoch's loss summed over
        all of them; rank 0 alone reports progress and writes TensorBoard."""
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler
        dist.init_process_group("gloo")
        try:
            rank = dist.get_rank()
            model = self.build(make, seed=seed, threads=t.threads)
            xs, ys = torch_inputs(model, x), torch.from_numpy(y)
            loss_fn = self.loss_fn(model, t, xs)
            n = n_rows(x)
            sampler = DistributedSampler(range(n), num_replicas=workers, rank=rank, shuffle=t.shuffle, seed=seed)

            def rows(epoch: int):
                sampler.set_epoch(epoch)
                return torch.tensor(list(sampler))

            def summed(total: float, count: int) -> tuple[float, int]:
                both = torch.tensor([total, float(count)], dtype=torch.float64)
                dist.all_reduce(both)
                return float(both[0]), int(both[1])
            from .distributed import per_worker_batch
            history = self._loop(model, DistributedDataParallel(model), t, xs, ys, loss_fn, rows,
                                 per_worker_batch(t.batch_size, n, workers), on_epoch if rank == 0 else None, val,
                                 logdir if rank == 0 else None, summed=summed)
            return RankRun(model, history, rank, dist.get_world_size(), rows(1).tolist())
        finally:
            dist.destroy_process_group()

    def _loop(self, model, forward, t, xs, ys, loss_fn, rows, bs: int, on_epoch, val, logdir,
              summed=lambda total, count: (total, count)) -> History:
        """The epochs: `rows(epoch)` the rows in this process's order, `forward` the module whose calls
        train (the model itself, or its DistributedDataParallel wrapper), `summed` the loss and row count
        over every process."""
        import torch
        opt = self.optimizer(t, model.parameters())
        history = History()
        callbacks = PlainCallbacks(
            t, history, get_weights=lambda: {k: v.detach().clone() for k, v in model.state_dict().items()},
            set_weights=model.load_state_dict, get_lr=lambda: opt.param_groups[0]["lr"],
            set_lr=lambda lr: [g.__setitem__("lr", lr) for g in opt.param_groups])

        def step(idx) -> float:
            opt.zero_grad()
            with autocast(t.precision):
                out = forward(*(a[idx] for a in xs))
                loss = loss_fn(out, ys[idx])
            if history.compute_dtype is None and t.precision != "fp32":
                history.compute_dtype = str(next(iter(flatten_outputs(out, lambda v: v.dtype).values())))
            loss.backward()
            opt.step()
            return loss.item()

        def evaluate() -> float:
            model.eval()
            with torch.no_grad():
                loss = float(loss_fn(model(*torch_inputs(model, val[0])), torch.from_numpy(val[1])))
            model.train()
            return loss
        model.train()
        epoch_loop(t, history, callbacks, rows=rows, batch=bs, step=step, evaluate=None if val is None else evaluate,
                   on_epoch=on_epoch, summed=summed)
        model.eval()
        if logdir:
            torch_summaries(logdir, history, graph=(model, tuple(a[:2] for a in xs)))
        return history

    def signature(self, model, x, y: np.ndarray) -> Signature:
        """The forward's argument name (nn.Sequential calls it `input`) with real rows' dtype and shape."""
        import inspect
        try:
            params = [p for p in inspect.signature(model.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):  # a ScriptModule's forward has no Python signature
            params = []
        if isinstance(x, dict):
            names = forward_order(model, list(x))
            return Signature(tuple(TensorSpec.of(k, x[k]) for k in names), output_specs(y, "output"))
        return Signature((TensorSpec.of(params[0].name if params else "x", x),), output_specs(y, "output"))

    def bind(self, model, x) -> dict[str, str]:
        """How `x`'s arrays meet the forward's parameters (by name, then one by position); raises
        InputBindingError when they cannot. A ScriptModule does not say; **kwargs takes any name."""
        import inspect
        from parity.feeds import bind_inputs
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):
            return {}
        named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        names, optional = [p.name for p in named], [p.name for p in named if p.default is not p.empty]
        if any(p.kind == p.VAR_KEYWORD for p in params) and isinstance(x, dict):  # **kwargs may take any name
            names += [k for k in x if k not in names]
        return bind_inputs(x, names, optional=optional)[1]

    def for_inputs(self, model, x):
        """The module to call (and export) positionally with `x`'s arrays in forward's order: itself, or a
        wrapper that passes them by keyword where positions would put one in the wrong slot."""
        return keyword_call(model, list(x)) if isinstance(x, dict) else model

    def predict(self, model, x):
        """One array, or {name: array} for a model returning a dict, a tuple or a ModelOutput."""
        import torch
        model = self.for_inputs(model, x)
        model.eval()
        with torch.no_grad():
            return one_or_named(flatten_outputs(model(*torch_inputs(model, x)), lambda t: t.detach().cpu().numpy()))

    def layer_outputs(self, model, x) -> list[tuple[str, np.ndarray]]:
        """Each leaf module's output on `x` in the order forward calls them, named by its module path
        (what torch.onnx keeps in its nodes' metadata); a module called again is named path#2, #3..."""
        import torch
        called: list[tuple[str, np.ndarray]] = []
        seen: dict[str, int] = {}

        def hook(name):
            def keep(_module, _inputs, output):
                if isinstance(output, torch.Tensor):
                    seen[name] = seen.get(name, 0) + 1
                    called.append((name if seen[name] == 1 else f"{name}#{seen[name]}",
                                   output.detach().cpu().numpy()))
            return keep
        handles = [mod.register_forward_hook(hook(name)) for name, mod in model.named_modules()
                   if name and not list(mod.children())]
        try:
            self.predict(model, x)
        finally:
            for h in handles:
                h.remove()
        return called

    def load_pretrained(self, path: Path, *, where: str, make=None, input_shape=None):
        """A TorchScript archive, a torch.export program (.pt2), a pickled nn.Module or a state dict (with
        the spec's factory, `make`, to build the module it fits)."""
        import torch
        if path.is_dir():
            return hugging_face(path, where)
        try:
            if path.suffix == ".pt2":
                module = graph_module(torch.export.load(str(path)).module())
            else:
                try:
                    module = torch.jit.load(str(path), map_location="cpu")
                except RuntimeError:  # not a TorchScript archive: a pickle
                    module = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e:
            raise PretrainedLoadError(f"{where}: {path}: could not be loaded ({type(e).__name__}: {first_line(e)}); "
                                      f"expected a TorchScript archive, a torch.export .pt2, a pickled nn.Module "
                                      f"(its class importable beside the spec) or a state dict") from None
        if isinstance(module, dict):
            if make is None:
                raise PretrainedLoadError(f"{where}: {path}: holds a state dict ({len(module)} tensors), not a "
                                          f"module; expected `factory = \"module:function\"` in the spec to build "
                                          f"the module it fits")
            state = module
            module = make()
            try:
                module.load_state_dict(state)
            except Exception as e:
                raise PretrainedLoadError(f"{where}: {path}: the state dict does not fit the module the "
                                          f"factory builds: {first_line(e)}") from None
        if not isinstance(module, torch.nn.Module):
            raise PretrainedLoadError(f"{where}: {path}: holds a {type(module).__name__}, expected a torch module")
        torch.set_num_threads(1)
        module.eval()
        if isinstance(module, torch.jit.ScriptModule) and input_shape:
            module = script_to_graph(module, tuple(input_shape))
        return module

    def save_pretrained(self, model, out: Path, path: Path) -> str | None:
        """Keep the file as given, for later stages to load; returns a note when what is kept is not it."""
        fresh = getattr(model, NEWLY_INITIALIZED, None)
        if path.is_dir() and fresh:
            # weights the folder lacks are made up on every load (uninitialised memory, even NaN): every
            # later load would make up others, so the model the reference ran is saved whole instead
            model.save_pretrained(out / PRETRAINED)
            return (f"{len(fresh)} weights the folder lacks ({', '.join(fresh[:4])}{', ...' if len(fresh) > 4 else ''}) "
                    f"were made up by transformers on loading; the outputs they feed mean nothing, and the "
                    f"model is kept with them so that every later stage runs the same weights")
        if path.is_dir():  # a save_pretrained folder, kept whole
            shutil.copytree(path, out / PRETRAINED)
        else:
            shutil.copy2(path, out / (PRETRAINED + path.suffix))
        return None

    def save(self, model, out: Path) -> None:
        import torch
        torch.save(model.state_dict(), out / self.weights_file)

    def load(self, src: Path, *, make, pretrained: bool, input_shape, where: str):
        import torch
        if pretrained:
            return self.load_pretrained(kept_pretrained(src), where=where, make=make, input_shape=input_shape)
        model = make()
        model.load_state_dict(torch.load(src / self.weights_file, map_location="cpu", weights_only=True))
        model.eval()
        return model

    def perturbed(self, model, scale: float, seed: int):
        import copy
        import torch
        clone = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(seed)
        # a converted graph keeps its weights as buffers; integer buffers (counters) are left alone
        weights = list(clone.parameters()) + [b for b in clone.buffers() if b.is_floating_point()]
        with torch.no_grad():
            for p in weights:
                p.mul_(1 + scale * torch.randn(p.shape, generator=gen))
        return clone

    def mlflow_form(self, model, x_example) -> dict:
        """What pipeline/tracking.py saves as the MLflow model: mlflow.pytorch's flavor."""
        import torch
        if isinstance(x_example, dict):  # MLflow traces forward with positional examples, in its order
            x_example = tuple(x_example[k] for k in forward_order(model, list(x_example)))
        # MLflow's pt2 format needs torch.export to take the module; a TorchScript module is pickled,
        # and several positional inputs (a tuple example) are not a pt2 TensorSpec signature either
        scripted = isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)) or isinstance(x_example, tuple)
        return {"flavor": "pytorch", "model": model, "example": x_example, "input_example": True,
                "pip_requirements": self.pip_requirements(),
                "options": {"serialization_format": "pickle"} if scripted else {}}

    def pip_requirements(self) -> list[str]:
        import torch
        return [f"torch=={torch.__version__.split('+')[0]}"]


def script_to_graph(module, input_shape: tuple):
    """A TorchScript module as an eager fx graph (TS2EPConverter, from torch itself): the ONNX and
    LiteRT converters take torch.export programs, not ScriptModules. Kept as TorchScript where the
    conversion fails or changes the outputs."""
    import warnings

    import torch
    rows = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0))
    try:
        from torch._export.converter import TS2EPConverter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = TS2EPConverter(module, (rows,)).convert().module()
        with torch.no_grad():
            for n in (1, 3):
                x = torch.rand(n, *input_shape, generator=torch.Generator().manual_seed(n))
                if not torch.allclose(graph(x), module(x), atol=1e-6):
                    return module
    except Exception:  # noqa: BLE001 - the TorchScript module still serves the routes that take it
        return module
    return graph_module(graph)


def graph_module(graph):
    """An nn.Module around torch.export's graph module, which refuses .eval()/.train() (it has no
    training mode): callers switch modes on every module they are given."""
    import torch

    class ExportedGraph(torch.nn.Module):
        def __init__(self, g):
            super().__init__()
            self.graph_module = g

        def forward(self, x):  # one input, as every pretrained route takes today
            return self.graph_module(x)

        def train(self, mode: bool = True):
            self.training = mode  # not passed down: the graph has no training mode
            return self

    return ExportedGraph(graph)


def hugging_face(path: Path, where: str):
    """A transformers model from its save_pretrained folder, in eval mode, returning its ModelOutput (a dict)."""
    try:
        import transformers
    except ImportError as e:
        raise PretrainedLoadError(f"{where}: {path}: a Hugging Face folder needs the transformers package: {e}") from None
    try:
        module, loading = transformers.AutoModel.from_pretrained(str(path), output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - a bad config, missing weights, an unknown architecture
        raise PretrainedLoadError(f"{where}: {path}: transformers.AutoModel.from_pretrained failed ({type(e).__name__}: "
                                  f"{first_line(e)}); expected a folder written by "
                                  f"model.save_pretrained(...) (config.json and the weights)") from None
    import torch
    torch.set_num_threads(1)
    setattr(module, NEWLY_INITIALIZED, sorted(loading.get("missing_keys") or []))
    return module.eval()


NEWLY_INITIALIZED = "t2e_newly_initialized"  # on a loaded transformers module: weights its folder lacked


def torch_inputs(model, x) -> tuple:
    """The positional tensors for forward: one float32 tensor, or each named input in forward's order."""
    import torch
    if isinstance(x, dict):
        return tuple(torch.from_numpy(np.ascontiguousarray(x[k])) for k in forward_order(model, list(x)))
    return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),)


def autocast(precision: str):
    """torch.autocast on the CPU in bfloat16 for a bf16 spec; nothing for fp32. The parameters and their
    gradients stay float32."""
    import torch
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
