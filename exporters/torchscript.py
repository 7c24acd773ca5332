"""TorchScript: one fp32 `model.pt` archive, run by torch.jit on the CPU.

Routes:
  torch: torch.jit.trace(model) -> torch.jit.save (torch.jit.script if the trace does not generalise over
         the batch dimension).
  keras, jax: the ONNX artifact made upstream (not re-exported here) -> onnx2fx.convert (ONNX to a torch.fx
         GraphModule) -> torch.jit.trace -> torch.jit.save. Where that fails for a Keras model kept as a
         .keras file: Keras on its torch backend, traced in a process of its own (exporters/keras_torch_route.py). onnx2fx is installed with
         `pip install --no-deps onnx2fx==0.0.1` (its requirements, torch>=2.9 and onnx>=1.19.1, are already
         met; a plain install of onnx2torch/onnx2pytorch would replace the CPU torch with a CUDA build, and
         with --no-deps both import torchvision, which fails beside this torch).

After tracing, the traced module is run on batches of 1 and of (example batch + 1) rows and compared with
the module it was traced from, so `batch_sizes=None` is only claimed when another batch really works.
The example batch is not stored in the archive (`_store_inputs=False`).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from exporters import keras_torch_route
from exporters.base import (Artifact, ArtifactLoadError, BaseRunner, ExportError, check_file,
                             example_batch, family_of, forward_order, keras_feed, package_version, pick_runtime, size_of,
                             unsupported_family)
from parity.signature import Signature, TensorSpec
from parity.feeds import flat_rows, flatten_outputs

FORMAT = "torchscript"
REQUIRES = {"tensorflow": ("onnx",), "torch": (), "jax": ("onnx",), "keras-jax": ("onnx",), "keras-torch": ()}
# the installed distributions whose versions decide the artifact (per family) and its runtime's answers
CONVERTER_PACKAGES = {"tensorflow": ("keras", "onnx", "onnx2fx", "torch"), "torch": ("torch",),
                      "jax": ("onnx", "onnx2fx", "torch"), "keras-jax": ("onnx", "onnx2fx", "torch"),
                      "keras-torch": ("keras", "torch")}
RUNTIME_PACKAGES = ("torch",)
RUNTIMES = ("torch-jit",)
LANE = {"tensorflow": "torch", "torch": "torch", "jax": "torch",  # onnx2fx and tracing need torch only;
        "keras-jax": "torch", "keras-torch": "keras-torch"}  # Keras on torch is traced on its own backend
LATER_ROUTES_TAKE_MODEL = ("tensorflow",)  # Keras on its torch backend reads the kept .keras file
RUNTIME_LANE = "torch"  # the process that loads the artifact ("any": no framework)

FILE_NAME = "model.pt"
SUFFIXES = (".pt", ".ts")
BATCH_PROBE_ATOL = 1e-5   # traced vs source module, same weights, same ops: anything above is a shape bug
ONNX2FX_INSTALL = "pip install --no-deps onnx2fx==0.0.1"


def _one_line(e: BaseException) -> str:
    """The last non-empty line of an error (TorchScript errors carry a whole traceback)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    line = lines[-1] if "Traceback of TorchScript" in str(e) else lines[0]
    return line[:300] if line.startswith(type(e).__name__) else f"{type(e).__name__}: {line[:300]}"


def _outputs(out) -> dict[str, np.ndarray]:
    """Every tensor a traced module returns, named as the model's outputs are (dict keys, tuple positions)."""
    return flatten_outputs(out, lambda t: t.detach().cpu().numpy())


def _first_tensor(out):
    """Traced modules may return a tensor, a tuple/list of them or a dict; the first one is the output."""
    if isinstance(out, dict):
        out = next(iter(out.values()))
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def export(model, *, framework: str, name: str, example: np.ndarray, out_dir, upstream=None,
           options=None, expected=None, family: str | None = None) -> list[Artifact]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / FILE_NAME
    example = example_batch(example, FORMAT, name, framework, several=True)
    family = family_of(framework, family)
    names, arrays = _ordered_inputs(model, example) if family == "torch" else (["x"], [example])
    t0 = time.perf_counter()
    if family == "torch":
        source, route, details = model, "torch.jit.trace", {}
        details["versions"] = {"torch": package_version("torch")}
        was_training = model.training
        model.eval()
        try:
            scripted, batch_sizes, more = _trace(source, name, framework, arrays)
        finally:
            model.train(was_training)
        if more.get("scripted"):
            route = "torch.jit.script"
        details.update(more)
    elif family == "keras-torch":  # on Keras' torch backend the keras.Model is a torch.nn.Module
        if isinstance(example, dict):
            raise ExportError(f"torchscript export of {name} ({framework}): torch.jit.trace passes inputs by "
                              f"position; this Keras model takes {len(example)} by name ({', '.join(example)})")
        route = "torch.jit.trace (the keras.Model on Keras' torch backend)"
        details = {"versions": {"keras": package_version("keras"), "torch": package_version("torch")}}
        scripted, batch_sizes, more = _trace(model, name, framework, arrays)
        details.update(more)
    elif family in REQUIRES:  # converted from the ONNX artifact, or else by Keras on its torch backend
        try:
            scripted, batch_sizes, route, details, names, arrays = _from_onnx(
                model, name, framework, example, upstream, expected)
        except Exception as first:  # noqa: BLE001 - onnx2fx and tracing raise anything; said as the reason
            keras_path = keras_torch_route.keras_file((options or {}).get("trained_dir"))
            if family != "tensorflow" or keras_path is None:
                if isinstance(first, ExportError):
                    raise
                raise ExportError(f"torchscript export of {name} ({framework}) through ONNX and onnx2fx failed: "
                                  f"{_one_line(first)}") from first
            scripted, batch_sizes, details, names, arrays = _from_keras_on_torch(keras_path, example, path, name)
            route = f"{keras_torch_route.ROUTE} (the first route failed)"
            details["route_taken"] = "keras on torch"
            details["routes_left"] = [{"route": f"{framework} -> onnx -> onnx2fx.convert -> torch.jit.trace",
                                       "why": str(first).split(": ", 1)[-1][:600]}]
    else:
        raise unsupported_family(FORMAT, name, family, REQUIRES)
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(scripted, str(path))
    details.setdefault("graph_inputs", [i.debugName() for i in scripted.graph.inputs()][1:])
    details["graph_outputs"] = [o.debugName() for o in scripted.graph.outputs()]
    details["input_mapping"] = "the forward's arguments, by position" + (f" ({', '.join(names)})" if len(names) > 1 else "")
    outs = _outputs(_call(scripted, tuple(torch.from_numpy(a) for a in arrays)))
    details["output_mapping"] = ("the forward's return value" if len(outs) == 1 else
                                 f"the forward's {len(outs)} outputs, named by key or position ({', '.join(outs)})")
    if len(outs) == 1:
        outs = {"y": next(iter(outs.values()))}
    dynamic = batch_sizes is None
    details["signature"] = Signature(tuple(TensorSpec.of(n, a, dynamic_batch=dynamic) for n, a in zip(names, arrays)),
                                     tuple(TensorSpec.of(k, v, dynamic_batch=dynamic) for k, v in outs.items())).to_json()
    return [Artifact(model=name, format=FORMAT, variant="fp32", path=str(path), framework=framework,
                     route=route, batch_sizes=batch_sizes, size_bytes=size_of(path),
                     export_s=time.perf_counter() - t0, details=details)]


def _from_onnx(model, name: str, framework: str, example, upstream, expected):
    """The ONNX artifact -> onnx2fx -> torch.jit.trace."""
    onnx_artifact = _upstream_onnx(name, upstream)
    source, details = _onnx_to_torch(onnx_artifact, name)
    route = f"{framework} -> onnx ({onnx_artifact.route}) -> onnx2fx.convert -> torch.jit.trace"
    names, arrays = ["x"], [example]
    if isinstance(example, dict):  # the graph takes the ONNX inputs by position: match them by meaning
        from parity.signature import map_tensors
        onnx_names = details["onnx_input_names"]
        pairs, _ = map_tensors(tuple(TensorSpec.of(k, v) for k, v in example.items()),
                               tuple(TensorSpec.of(n, example[n]) if n in example else
                                     TensorSpec.of(n, next(iter(example.values()))) for n in onnx_names))
        by_onnx = {v: k for k, v in pairs.items()}
        names = [by_onnx.get(n, n) for n in onnx_names]
        arrays = [example[n] for n in names]
    elif onnx_artifact.batch_sizes:  # a fixed-batch ONNX graph can only be traced at that batch
        reps = -(-onnx_artifact.batch_sizes[0] // example.shape[0])
        example = np.concatenate([example] * reps)[:onnx_artifact.batch_sizes[0]]
        arrays = [example]
    scripted, batch_sizes, more = _trace(source, name, framework, arrays)
    details.update(more)
    if not isinstance(example, dict):
        details["export_check_max_abs_vs_keras"] = _max_abs_vs_keras(model, scripted, example, expected)
    return scripted, batch_sizes, route, details, names, arrays


def _from_keras_on_torch(keras_path: Path, example, path: Path, name: str):
    """The kept .keras file loaded by Keras on its torch backend, traced, in a process of its own."""
    import torch
    facts = keras_torch_route.convert(keras_path, example, path, name)
    details = facts["details"]
    names = details["input_names"]
    arrays = [example[n] for n in names] if isinstance(example, dict) else [example]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(path), map_location="cpu")
    return scripted, facts["batch_sizes"], details, names, arrays


def _upstream_onnx(name: str, upstream) -> Artifact:
    found = list((upstream or {}).get("onnx") or [])
    fp32 = [a for a in found if a.variant == "fp32"]
    if not fp32:
        raise ExportError(f"torchscript export of {name} (keras): the route goes through ONNX, expected the "
                          f"fp32 onnx artifact in upstream['onnx'], found "
                          f"{[a.label for a in found] or 'none'}")
    art = fp32[0]
    if not Path(art.path).is_file():
        raise ExportError(f"torchscript export of {name} (keras): expected the upstream onnx file at "
                          f"{art.path}, found nothing")
    return art


def _onnx_to_torch(onnx_artifact: Artifact, name: str):
    try:
        import onnx2fx
    except ImportError as e:
        raise ExportError(f"torchscript export of {name} (keras): the Keras route converts the ONNX artifact "
                          f"to PyTorch with onnx2fx, which is not installed ({e}); install it with "
                          f"`{ONNX2FX_INSTALL}` (a plain `pip install onnx2torch` replaces the CPU torch "
                          "with a CUDA build)") from e
    import onnx

    try:
        proto = onnx.load(onnx_artifact.path)
        module = onnx2fx.convert(proto)
    except Exception as e:
        raise ExportError(f"torchscript export of {name} (keras): onnx2fx could not convert "
                          f"{onnx_artifact.label} ({onnx_artifact.path}): {_one_line(e)}") from e
    module.eval()
    initializers = {i.name for i in proto.graph.initializer}
    details = {"converter": "onnx2fx.convert (ONNX -> torch.fx.GraphModule), then torch.jit.trace",
               "onnx_source": onnx_artifact.label,
               "onnx_input_name": [i.name for i in proto.graph.input if i.name not in initializers][0],
               "onnx_input_names": [i.name for i in proto.graph.input if i.name not in initializers],
               "onnx_output_names": [o.name for o in proto.graph.output],
               "graph_inputs": [n.name for n in module.graph.nodes if n.op == "placeholder"],
               "versions": {"torch": package_version("torch"), "onnx2fx": package_version("onnx2fx"),
                            "onnx": package_version("onnx")}}
    return module, details


def _ordered_inputs(model, example) -> tuple[list[str], list[np.ndarray]]:
    """Input names and arrays in the order the module's forward takes them (one input: ["x"])."""
    if not isinstance(example, dict):
        return ["x"], [example]
    names = forward_order(model, example)
    return names, [example[n] for n in names]


def _trace(module, name: str, framework: str, arrays: list[np.ndarray]):
    """Trace (falling back to script if the trace is tied to the example's batch); return the scripted
    module, batch_sizes (None when batches of 1 and n+1 also match the source module) and details."""
    import torch

    xs = tuple(torch.from_numpy(a) for a in arrays)
    example = arrays[0]
    details: dict[str, Any] = {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            traced = torch.jit.trace(module, xs, _store_inputs=False)
        except Exception as e:
            if not isinstance(_call(module, xs), (dict, list)):
                raise ExportError(f"torchscript export of {name} ({framework}): torch.jit.trace failed on an "
                                  f"example of shape {[list(a.shape) for a in arrays]}: {_one_line(e)}") from e
            # a dict (or list) output: the strict trace refuses it; the non-strict one records it as it is,
            # which holds because the structure was checked to be the same on every call
            details["trace_retry"] = f"strict trace refused the output container ({_one_line(e)[:160]}); traced with strict=False"
            try:
                traced = torch.jit.trace(module, xs, _store_inputs=False, strict=False)
            except Exception as e2:
                raise ExportError(f"torchscript export of {name} ({framework}): torch.jit.trace failed on an "
                                  f"example of shape {[list(a.shape) for a in arrays]}, strict and with "
                                  f"strict=False: {_one_line(e2)}") from e2
        problem = _batch_problem(module, traced, arrays)
        if problem is None:
            return traced, None, details
        details["trace_batch_problem"] = problem
        try:
            scripted = torch.jit.script(module)
            script_problem = _batch_problem(module, scripted, arrays)
        except Exception as e:
            script_problem = f"torch.jit.script failed: {_one_line(e)}"
        if script_problem is None:
            details["scripted"] = True
            return scripted, None, details
        details["script_problem"] = script_problem
        details["batch_note"] = (f"the traced graph only runs at the example's batch of {example.shape[0]}; "
                                 "the runner feeds other batch sizes in padded chunks of that size")
        return traced, [int(example.shape[0])], details


def _batch_problem(source, traced, arrays: list[np.ndarray]) -> str | None:
    import torch

    n = arrays[0].shape[0]
    for pick in (slice(0, 1), np.r_[np.arange(n), 0]):
        xs = tuple(torch.from_numpy(np.ascontiguousarray(a[pick])) for a in arrays)
        rows = xs[0].shape[0]
        try:
            got = flat_rows(_outputs(traced(*xs)))
        except Exception as e:
            return f"batch {rows} (traced at {n}) fails: {_one_line(e)}"
        want = flat_rows(_outputs(source(*xs)))
        if got.shape != want.shape:
            return f"batch {rows} (traced at {n}): shape {list(got.shape)}, expected {list(want.shape)}"
        err = float(np.max(np.abs(got - want))) if got.size else 0.0
        if err > BATCH_PROBE_ATOL:
            return f"batch {rows} (traced at {n}): max abs {err:.3g} from the source module"
    return None


def _call(module, xs):
    import torch
    with torch.no_grad():
        return module(*xs)


def _max_abs_vs_keras(keras_model, scripted, example: np.ndarray, expected=None) -> float:
    """A sanity number for the report (the verify stage does the real comparison). `expected` (the Keras
    model's stored outputs on `example`) spares importing Keras in a process that has only torch."""
    import torch

    want = np.asarray(expected) if expected is not None else np.asarray(keras_model(keras_feed(keras_model, example)))
    with torch.no_grad():
        got = _first_tensor(scripted(torch.from_numpy(example))).numpy()
    return float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")


class TorchScriptRunner(BaseRunner):
    """torch.jit.load on the CPU. TorchScript carries no signature, so the one the exporter recorded
    (from the example and the traced output) is checked; a graph traced at a fixed batch takes padded
    chunks of it (BaseRunner)."""

    runtime = "torch-jit"

    def __init__(self, module, artifact: Artifact):
        recorded = (artifact.details or {}).get("signature")
        if not recorded:
            raise ArtifactLoadError(f"torchscript artifact {artifact.label}: records no signature (made by an "
                                    f"older version of the exporter); expected details['signature']: export again")
        super().__init__(artifact, Signature.from_json(recorded), static_batches=artifact.batch_sizes or None)
        self._module = module

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        with torch.no_grad():
            out = _outputs(self._module(*(torch.from_numpy(feed[n]) for n in self.signature.input_names)))
        if len(self.signature.outputs) == 1:
            return {self.signature.output_names[0]: next(iter(out.values()))}
        return out

    def close(self) -> None:
        super().close()
        self._module = None


def load(artifact: Artifact, runtime: str | None = None) -> TorchScriptRunner:
    pick_runtime(FORMAT, artifact, runtime, RUNTIMES)
    path = check_file(FORMAT, artifact, "a model.pt archive")
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactLoadError(f"torchscript artifact {artifact.label}: torch.jit.load could not read {path} "
                                f"({path.stat().st_size} bytes); expected a complete TorchScript archive, the file is "
                                f"corrupt or truncated: {first_line}") from None
    module.eval()
    return TorchScriptRunner(module, artifact)
