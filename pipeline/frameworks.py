"""Per-framework training, saving, loading and prediction behind one small interface.

Everything here imports its framework inside the function that needs it.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np

from exporters.base import forward_order
from parity.feeds import flatten_outputs, n_rows, one_or_named
from parity.signature import Signature, TensorSpec

from .spec import ModelSpec, Spec
from .training import build_model, output_kind

# Keras trains its epochs in compiled chunks of this many, reporting progress between chunks
EPOCH_CHUNKS = 20
PRETRAINED = "pretrained"  # a pretrained model's file, copied into its train stage's folder under this stem


class PretrainedLoadError(ValueError):
    """A pretrained model file that does not load: says which file and what it was expected to be."""
    user_error = True


def adapter(framework: str) -> "KerasAdapter | TorchAdapter":
    return {"keras": KerasAdapter, "torch": TorchAdapter}[framework]()


class KerasAdapter:
    weights_file = "model.weights.h5"
    output_kind = "values"  # set by train for classifiers: "probabilities" (softmax head) or "logits"

    def __init__(self):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    def build(self, spec: Spec, m: ModelSpec, input_shape, n_outputs):
        import keras
        keras.utils.set_random_seed(spec.seed)
        return build_model(spec, m, input_shape, n_outputs)

    def train(self, model, m: ModelSpec, x: np.ndarray, y: np.ndarray, seed: int, on_epoch=None) -> list[float]:
        """The epochs in a few compiled chunks: the same updates as `fit` (one optimizer step per batch,
        in order, or in a seeded per-epoch shuffle), without a Python round trip per epoch."""
        import keras
        import tensorflow as tf
        t = m.train
        xs, ys = _tf_inputs(x), tf.constant(y)
        multi = isinstance(xs, dict)
        if t.loss == "mse":
            loss_fn = keras.losses.MeanSquaredError()
        else:
            self.output_kind = output_kind(np.asarray(model({k: v[:8] for k, v in xs.items()} if multi else xs[:8])))
            loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=self.output_kind == "logits")
        opt = {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}[t.optimizer](learning_rate=t.lr)
        n = n_rows(x)
        bs = min(t.batch_size or n, n)
        n_batches = math.ceil(n / bs)
        model({k: v[:1] for k, v in xs.items()} if multi else xs[:1])
        opt.build(model.trainable_variables)
        shuffle = t.shuffle

        @tf.function(reduce_retracing=True)
        def run_epochs(start, stop):
            losses = tf.TensorArray(tf.float32, size=stop - start)
            for epoch in tf.range(start, stop):
                if shuffle:
                    order = tf.argsort(tf.random.stateless_uniform([n], seed=[seed, epoch]))
                else:
                    order = tf.range(n)
                total = tf.constant(0.0)
                for b in tf.range(n_batches):
                    idx = order[b * bs: tf.minimum((b + 1) * bs, n)]
                    xb = {k: tf.gather(v, idx) for k, v in xs.items()} if multi else tf.gather(xs, idx)
                    yb = tf.gather(ys, idx)
                    with tf.GradientTape() as tape:
                        loss = loss_fn(yb, model(xb, training=True))
                    grads = tape.gradient(loss, model.trainable_variables)
                    opt.apply_gradients(zip(grads, model.trainable_variables))
                    total += loss * tf.cast(tf.shape(idx)[0], tf.float32)
                losses = losses.write(epoch - start, total / n)
            return losses.stack()

        losses: list[float] = []
        step = max(1, math.ceil(t.epochs / EPOCH_CHUNKS))
        for start in range(0, t.epochs, step):
            stop = min(start + step, t.epochs)
            losses += [float(v) for v in run_epochs(tf.constant(start), tf.constant(stop)).numpy()]
            if on_epoch:
                on_epoch(stop, losses[-1])
        return losses

    def signature(self, model, x, y: np.ndarray) -> Signature:
        """The model's own names (Keras inputs, output layers) with the dtypes and shapes of real rows."""
        outs = list(getattr(model, "output_names", None) or []) or ["output"]
        outputs = _output_specs(y, outs[0])
        if isinstance(x, dict):  # a functional model takes a dict keyed by its inputs' names
            return Signature(tuple(TensorSpec.of(k, v) for k, v in x.items()), outputs)
        ins = [t.name for t in getattr(model, "inputs", None) or []] or ["x"]
        return Signature((TensorSpec.of(ins[0], x),), outputs)

    def predict(self, model, x):
        """One array, or {name: array} for a model of several outputs (a list is named by output_names)."""
        names = list(getattr(model, "output_names", None) or []) or None
        return one_or_named(flatten_outputs(model(_tf_inputs(x), training=False), np.asarray, names=names))

    def load_pretrained(self, spec: Spec, m: ModelSpec, path: Path, input_shape=None, n_outputs=None):
        import keras
        try:
            return keras.models.load_model(str(path), compile=False)
        except Exception as e:
            raise PretrainedLoadError(f"model {m.name} (keras): {path}: keras.models.load_model failed "
                                      f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); expected a model "
                                      f"saved with model.save(...) as .keras or .h5") from None

    def save_pretrained(self, model, m: ModelSpec, out: Path, path: Path) -> None:
        shutil.copy2(path, out / (PRETRAINED + path.suffix))

    def save(self, model, out: Path) -> None:
        model.save_weights(str(out / self.weights_file))

    def load(self, spec: Spec, m: ModelSpec, src: Path, input_shape, n_outputs):
        if m.pretrained:
            return self.load_pretrained(spec, m, kept_pretrained(src))
        model = self.build(spec, m, input_shape, n_outputs)
        if not isinstance(input_shape, dict):  # a Sequential without an Input layer builds on its first call
            model(np.zeros((1, *input_shape), np.float32))
        model.load_weights(str(src / self.weights_file))
        return model

    def perturbed(self, model, scale: float, seed: int):
        """A copy of the model with every weight nudged by `scale` relative noise."""
        import keras
        clone = keras.models.clone_model(model)
        clone.set_weights([w * (1 + scale * np.random.default_rng(seed + i).standard_normal(w.shape))
                           .astype(w.dtype) for i, w in enumerate(model.get_weights())])
        return clone

    def save_mlflow_model(self, model, path: Path, x_example: np.ndarray, y_example: np.ndarray) -> None:
        from . import tracking
        tracking.save_native_model("keras", model, path, x_example, y_example)


class TorchAdapter:
    weights_file = "model.state_dict.pt"
    output_kind = "values"  # set by train for classifiers: "probabilities" (softmax head) or "logits"

    def build(self, spec: Spec, m: ModelSpec, input_shape, n_outputs):
        import torch
        if m.train is not None:  # a pretrained model's factory has no [train] table
            torch.set_num_threads(m.train.threads)
        torch.manual_seed(spec.seed)
        return build_model(spec, m, input_shape, n_outputs)

    def train(self, model, m: ModelSpec, x: np.ndarray, y: np.ndarray, seed: int, on_epoch=None) -> list[float]:
        import torch
        import torch.nn.functional as F
        t = m.train
        opt = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[t.optimizer](model.parameters(), lr=t.lr)
        xs, ys = _torch_inputs(model, x), torch.from_numpy(y)
        if t.loss == "mse":
            loss_fn = F.mse_loss
        else:
            with torch.no_grad():
                self.output_kind = output_kind(model(*(a[:8] for a in xs)).numpy())
            if self.output_kind == "logits":
                loss_fn = F.cross_entropy
            else:  # a softmax head, as the Keras digits model has
                def loss_fn(prob, target):
                    return F.nll_loss(torch.log(prob.clamp_min(1e-12)), target)
        n = n_rows(x)
        bs = min(t.batch_size or n, n)
        gen = torch.Generator().manual_seed(seed)
        losses = []
        model.train()
        for _ in range(t.epochs):
            order = torch.randperm(n, generator=gen) if t.shuffle else torch.arange(n)
            total = 0.0
            for start in range(0, n, bs):
                idx = order[start:start + bs]
                opt.zero_grad()
                loss = loss_fn(model(*(a[idx] for a in xs)), ys[idx])
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            losses.append(total / n)
            if on_epoch:
                on_epoch(len(losses), losses[-1])
        model.eval()
        return losses

    def signature(self, model, x: np.ndarray, y: np.ndarray) -> Signature:
        """The forward's argument name (nn.Sequential calls it `input`) with real rows' dtype and shape."""
        import inspect
        try:
            params = [p for p in inspect.signature(model.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):  # a ScriptModule's forward has no Python signature
            params = []
        if isinstance(x, dict):
            names = forward_order(model, list(x))
            return Signature(tuple(TensorSpec.of(k, x[k]) for k in names), _output_specs(y, "output"))
        return Signature((TensorSpec.of(params[0].name if params else "x", x),), _output_specs(y, "output"))

    def predict(self, model, x):
        """One array, or {name: array} for a model returning a dict, a tuple or a ModelOutput."""
        import torch
        model.eval()
        with torch.no_grad():
            return one_or_named(flatten_outputs(model(*_torch_inputs(model, x)), lambda t: t.detach().cpu().numpy()))

    def load_pretrained(self, spec: Spec, m: ModelSpec, path: Path, input_shape=None, n_outputs=None):
        """A TorchScript archive, a torch.export program (.pt2), a pickled nn.Module or a state dict (with
        the spec's factory to build the module it fits)."""
        import torch
        from .training import load_factory
        if m.factory:
            load_factory(spec, m)  # puts the spec's folder on sys.path: a pickled module's class lives there
        where = f"model {m.name} (torch): {path}"
        if path.is_dir():
            return _hugging_face(path, where)
        try:
            if path.suffix == ".pt2":
                module = _graph_module(torch.export.load(str(path)).module())
            else:
                try:
                    module = torch.jit.load(str(path), map_location="cpu")
                except RuntimeError:  # not a TorchScript archive: a pickle
                    module = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e:
            raise PretrainedLoadError(f"{where}: could not be loaded ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                                      f"expected a TorchScript archive, a torch.export .pt2, a pickled nn.Module "
                                      f"(its class importable beside the spec) or a state dict") from None
        if isinstance(module, dict):
            if not m.factory:
                raise PretrainedLoadError(f"{where}: holds a state dict ({len(module)} tensors), not a module; "
                                          f"expected `factory = \"module:function\"` in the spec to build the "
                                          f"module it fits")
            state = module
            module = self.build(spec, m, tuple(input_shape or ()), n_outputs)
            try:
                module.load_state_dict(state)
            except Exception as e:
                raise PretrainedLoadError(f"{where}: the state dict does not fit the module the factory "
                                          f"'{m.factory}' builds: {str(e).splitlines()[0][:300]}") from None
        if not isinstance(module, torch.nn.Module):
            raise PretrainedLoadError(f"{where}: holds a {type(module).__name__}, expected a torch module")
        torch.set_num_threads(1)
        module.eval()
        if isinstance(module, torch.jit.ScriptModule) and input_shape:
            module = _script_to_graph(module, tuple(input_shape))
        return module

    def save_pretrained(self, model, m: ModelSpec, out: Path, path: Path) -> None:
        if path.is_dir():  # a save_pretrained folder, kept whole
            shutil.copytree(path, out / PRETRAINED)
        else:
            shutil.copy2(path, out / (PRETRAINED + path.suffix))

    def save(self, model, out: Path) -> None:
        import torch
        torch.save(model.state_dict(), out / self.weights_file)

    def load(self, spec: Spec, m: ModelSpec, src: Path, input_shape, n_outputs):
        import torch
        if m.pretrained:
            return self.load_pretrained(spec, m, kept_pretrained(src), input_shape, n_outputs)
        model = self.build(spec, m, input_shape, n_outputs)
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

    def save_mlflow_model(self, model, path: Path, x_example, y_example: np.ndarray) -> None:
        from . import tracking
        if isinstance(x_example, dict):  # MLflow traces forward with positional examples, in its order
            x_example = tuple(x_example[k] for k in forward_order(model, list(x_example)))
        tracking.save_native_model("torch", model, path, x_example, y_example)


def _script_to_graph(module, input_shape: tuple):
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
    return _graph_module(graph)


def _graph_module(graph):
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


def kept_pretrained(src: Path) -> Path:
    """The pretrained model's copy in a train stage's folder (a file, or a save_pretrained folder)."""
    found = sorted(src.glob(PRETRAINED + "*"))
    if not found:
        raise PretrainedLoadError(f"{src}: expected the pretrained model's copy ({PRETRAINED}.*), found none")
    return found[0]


def from_registry(spec: Spec, m: ModelSpec, dest: Path) -> Path:
    """A registered version's model file, downloaded into `dest`; checks the version's framework tag
    agrees with the spec's."""
    from . import registry_ref
    from .tracking import tracking_uri
    home = Path(os.environ.get("PIPELINE_HOME", ".")).resolve()
    try:
        ref = registry_ref.resolve(m.source, home / "mlruns" / "mlflow.db")
    except LookupError as e:
        raise PretrainedLoadError(f"model {m.name} ({m.framework}): source {e}") from None
    if ref.framework and ref.framework != m.framework:
        raise PretrainedLoadError(f"model {m.name}: {m.source} is version {ref.version} of {ref.name}, a "
                                  f"{ref.framework} model; expected framework = \"{ref.framework}\" in the spec, "
                                  f"found {m.framework!r}")
    from .spec import PRETRAINED_SUFFIXES
    try:
        return registry_ref.download_model_file(ref, tracking_uri(home), dest, PRETRAINED_SUFFIXES[m.framework])
    except LookupError as e:
        raise PretrainedLoadError(f"model {m.name} ({m.framework}): {e}") from None


def _hugging_face(path: Path, where: str):
    """A transformers model from its save_pretrained folder, in eval mode, returning its ModelOutput (a dict)."""
    try:
        import transformers
    except ImportError as e:
        raise PretrainedLoadError(f"{where}: a Hugging Face folder needs the transformers package: {e}") from None
    try:
        module = transformers.AutoModel.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - a bad config, missing weights, an unknown architecture
        raise PretrainedLoadError(f"{where}: transformers.AutoModel.from_pretrained failed ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300]}); expected a folder written by "
                                  f"model.save_pretrained(...) (config.json and the weights)") from None
    import torch
    torch.set_num_threads(1)
    return module.eval()


def _output_specs(y, single_name: str) -> tuple[TensorSpec, ...]:
    if isinstance(y, dict):
        return tuple(TensorSpec.of(k, v) for k, v in y.items())
    return (TensorSpec.of(single_name, y),)


def _tf_inputs(x):
    """One float32 tensor, or {name: tensor} keeping each input's dtype (ids stay integers)."""
    import tensorflow as tf
    if isinstance(x, dict):
        return {k: tf.constant(v) for k, v in x.items()}
    return tf.constant(x, dtype=tf.float32)


def _torch_inputs(model, x) -> tuple:
    """The positional tensors for forward: one float32 tensor, or each named input in forward's order."""
    import torch
    if isinstance(x, dict):
        return tuple(torch.from_numpy(np.ascontiguousarray(x[k])) for k in forward_order(model, list(x)))
    return (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),)
