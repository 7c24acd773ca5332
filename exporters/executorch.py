"""ExecuTorch: `.pte` programs lowered from the `torch.export` program, run by ExecuTorch's own runtime.

Route (torch family; keras-torch: the keras.Model on Keras' torch backend, an nn.Module, one input):
  torch.export.export(model, args, dynamic_shapes={0: Dim("batch", max=max_batch)})
    -> executorch.exir.to_edge_transform_and_lower(partitioner=...) -> .to_executorch() -> model.<variant>.pte
  variants: "portable" (no delegate: ExecuTorch's own kernels) and "xnnpack" (XnnpackPartitioner: the
  supported subgraphs delegated to XNNPACK, the rest on ExecuTorch's kernels).

Beside each `.pte` a BundledProgram (`model.<variant>.bpte`, executorch.devtools.bundled_program) carries the
program, the example inputs and the reference outputs, so a device can check itself with ExecuTorch's own
API (`check_bundle` here: `_load_bundled_program_from_buffer` + `verify_result_with_bundled_expected_output`).

The batch dimension is dynamic up to `max_batch` (options["max_batch"], default MAX_BATCH): ExecuTorch plans
its memory for the upper bound. The runner feeds more rows in chunks. Where torch.export cannot keep the
batch symbolic, the program is exported at the example's batch and says so in `batch_sizes`.

Checked here (see ENVIRONMENT-style facts in the module constants): executorch 1.5.1 (cp311 x86_64 wheel)
with torch 2.13.0+cpu and torchao 0.18.0, installed with `--no-deps` plus ruamel.yaml; the runtime
(executorch.runtime / the portable_lib pybindings) imports torch, so artifacts load in the torch lane.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporters.base import (Artifact, ArtifactLoadError, BaseRunner, ExportError, RuntimeUnavailable, check_file,
                             example_batch, family_of, forward_order, keyword_call, package_version, pick_runtime,
                             size_of)
from parity.feeds import flatten_outputs
from parity.signature import Signature, TensorSpec

FORMAT = "executorch"
NAME = FORMAT
VARIANTS = ("portable", "xnnpack")
PRECISION = {"portable": "fp32", "xnnpack": "fp32"}  # the numeric precision of each variant (its parity tolerance)
# keras-torch: the keras.Model on Keras' torch backend is an nn.Module; the other families have no route (NO_ROUTE)
REQUIRES = {"torch": (), "keras-torch": (), "tensorflow": (), "jax": (), "keras-jax": ()}
# the installed distributions whose versions decide the artifact (per family) and its runtime's answers
CONVERTER_PACKAGES = {"torch": ("torch", "executorch"), "keras-torch": ("keras", "torch", "executorch")}
RUNTIME_PACKAGES = ("executorch", "torch")
OPTIONS = ("max_batch",)          # [export.executorch]: the dynamic batch's upper bound (default MAX_BATCH)
SUFFIXES = (".pte",)              # the bundled program beside it is .bpte (not an artifact of its own)
RUNTIMES = ("executorch",)        # ExecuTorch's Python runtime (executorch.runtime, the portable_lib pybindings)
LANE = {"torch": "torch", "keras-torch": "keras-torch", "tensorflow": "torch", "jax": "torch", "keras-jax": "torch"}
RUNTIME_LANE = "torch"            # executorch.runtime imports torch (its pybindings take and return torch tensors)
# why the other families have no route (each tried here on the digits MLP)
NO_ROUTE = {
    "tensorflow": "ExecuTorch lowers only a torch.export program; the toolkit's one Keras -> torch route, the ONNX "
                  "artifact through onnx2fx, does not export: torch.export.export of the onnx2fx GraphModule fails "
                  "with GuardOnDataDependentSymNode in onnx2fx.ops.tensor._reshape (its target shape is a "
                  "runtime tensor), with a dynamic batch and with a fixed one",
    "jax": "ExecuTorch lowers only a torch.export program; JAX's only route to torch here is ONNX -> onnx2fx, "
           "whose GraphModule torch.export refuses (GuardOnDataDependentSymNode in onnx2fx's reshape)",
    "keras-jax": "ExecuTorch lowers only a torch.export program; Keras on JAX has no torch module, and its ONNX "
                 "-> onnx2fx GraphModule does not torch.export (GuardOnDataDependentSymNode)",
}
INSTALL = "pip install --no-deps executorch==1.5.1 ruamel.yaml==0.19.1"

MAX_BATCH = 256          # the dynamic batch's upper bound (ExecuTorch plans memory for it)
BUNDLE_RTOL = 1e-5       # the bundled self-check's tolerances (ExecuTorch's allclose: |a-b| <= atol + rtol*|b|)
BUNDLE_ATOL = 1e-5
METHOD = "forward"


def file_names(variant: str) -> tuple[str, str]:
    """The program and its bundled program, per variant."""
    return f"model.{variant}.pte", f"model.{variant}.bpte"


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:400]}" if lines else type(e).__name__


def _import_exir(name: str, framework: str):
    try:
        from executorch.exir import to_edge_transform_and_lower  # noqa: F401
    except ImportError as e:
        raise ExportError(f"{FORMAT} export of {name} ({framework}): executorch is not installed or does not "
                          f"import ({_one_line(e)}); install it with `{INSTALL}`") from e


# --------------------------------------------------------------------------- export

def export(model, *, framework: str, name: str, example, out_dir, upstream=None, options=None,
           expected=None, family: str | None = None) -> list[Artifact]:
    """Write `out_dir/model.<variant>.pte` and `.bpte` per variant (options["variants"], default both) and
    return one Artifact per variant."""
    family = family_of(framework, family)
    if family in NO_ROUTE or family not in REQUIRES:
        why = NO_ROUTE.get(family, "no route for this family")
        raise ExportError(f"{FORMAT} export of {name}: no route for models of the {family!r} family: {why}")
    options = dict(options or {})
    variants = tuple(options.get("variants") or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ExportError(f"{FORMAT} export of {name}: unknown variant(s) {unknown}; expected some of {list(VARIANTS)}")
    max_batch = int(options.get("max_batch") or MAX_BATCH)
    example = example_batch(example, FORMAT, name, framework, several=family == "torch")
    _import_exir(name, framework)
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = forward_order(model, example) if isinstance(example, dict) else ["x"]
    arrays = [example[n] for n in names] if isinstance(example, dict) else [example]
    module = keyword_call(model, names) if isinstance(example, dict) else model
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        program, batch_sizes, export_details = _torch_export(module, name, framework, arrays, max_batch)
        if family == "keras-torch":
            export_details["versions"]["keras"] = package_version("keras")
            export_details["source"] = "the keras.Model on Keras' torch backend (an nn.Module)"
        with torch.no_grad():
            eager = _flat(module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)))
    finally:
        model.train(was_training)
    export_s = time.perf_counter() - t0
    out_names = list(eager)
    reference, expected_from = _reference(eager, expected)
    dynamic = batch_sizes is None
    signature = Signature(tuple(TensorSpec.of(n, a, dynamic_batch=dynamic) for n, a in zip(names, arrays)),
                          tuple(TensorSpec.of(k, v, dynamic_batch=dynamic) for k, v in reference.items()))
    artifacts = []
    for variant in variants:
        t1 = time.perf_counter()
        artifacts.append(_lower(program, variant, name=name, framework=framework, out_dir=out_dir,
                                arrays=arrays, names=names, out_names=out_names, reference=reference,
                                expected_from=expected_from, eager=eager, signature=signature,
                                batch_sizes=batch_sizes, max_batch=max_batch,
                                details=dict(export_details), export_s=export_s + time.perf_counter() - t1))
    return artifacts


def _torch_export(module, name: str, framework: str, arrays: list[np.ndarray], max_batch: int):
    """torch.export with a dynamic batch (1..max_batch); else at the example's batch."""
    import torch

    n = arrays[0].shape[0]
    # an example of one row would pin the batch to 1 (0/1 specialisation): export on two
    rows = [np.ascontiguousarray(np.concatenate([a, a]) if n == 1 else a[:max_batch]) for a in arrays]
    args = tuple(torch.from_numpy(a) for a in rows)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    details: dict[str, Any] = {"versions": {"torch": package_version("torch"),
                                            "executorch": package_version("executorch"),
                                            "torchao": package_version("torchao")}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shapes = tuple({0: batch} for _ in args)
        # a forward(self, *args) (a keras.Model on the torch backend) takes the dynamic shapes of its args as one tuple
        varargs = _takes_varargs(module)
        try:
            program = torch.export.export(module, args, dynamic_shapes=(shapes,) if varargs else shapes)
            details["dynamic_shapes"] = f"batch dimension 0 of every input, 1..{max_batch}"
            details["max_batch"] = max_batch
            return program, None, details
        except Exception as e:  # noqa: BLE001 - recorded; the static export below is the second route
            details["dynamic_batch_problem"] = _one_line(e)[:600]
        fixed = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        try:
            program = torch.export.export(module, fixed)
        except Exception as e:
            raise ExportError(f"{FORMAT} export of {name} ({framework}): torch.export.export failed with a dynamic "
                              f"batch ({details['dynamic_batch_problem']}) and at the example's batch of {n}: "
                              f"{_one_line(e)}") from e
    details["batch_note"] = (f"torch.export could not keep the batch symbolic; the program runs at the example's "
                             f"batch of {n} and the runner feeds other sizes in padded chunks of it")
    return program, [int(n)], details


def _takes_varargs(module) -> bool:
    import inspect
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].kind == params[0].VAR_POSITIONAL


def _flat(out) -> dict[str, np.ndarray]:
    """The forward's outputs in ExecuTorch's order (the pytree leaves), named as the other formats name them."""
    return flatten_outputs(out, lambda t: t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t))


def _reference(eager: dict[str, np.ndarray], expected) -> tuple[dict[str, np.ndarray], str]:
    """The outputs the bundle carries: the stored reference (`expected`) where it is one array of the model's
    one output's shape, else the torch module's own outputs on the example. One output is named "y"."""
    if len(eager) == 1:
        only = next(iter(eager.values()))
        if expected is not None and not isinstance(expected, dict) and np.shape(expected) == only.shape:
            return {"y": np.ascontiguousarray(expected, dtype=only.dtype)}, "expected (the stored reference outputs)"
        return {"y": only}, "the torch module's outputs on the example"
    if isinstance(expected, dict) and list(expected) == list(eager) and \
            all(np.shape(expected[k]) == eager[k].shape for k in eager):
        return {k: np.ascontiguousarray(expected[k], dtype=eager[k].dtype) for k in eager}, \
            "expected (the stored reference outputs)"
    return eager, "the torch module's outputs on the example"


def _lower(program, variant: str, *, name, framework, out_dir: Path, arrays, names, out_names, reference,
           expected_from, eager, signature: Signature, batch_sizes, max_batch, details, export_s) -> Artifact:
    from executorch.exir import to_edge_transform_and_lower

    pte_name, bpte_name = file_names(variant)
    path, bpte = out_dir / pte_name, out_dir / bpte_name
    if variant == "xnnpack":
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        partitioner, route = [XnnpackPartitioner()], "torch.export -> to_edge_transform_and_lower(XnnpackPartitioner) -> to_executorch"
    else:
        partitioner, route = [], "torch.export -> to_edge_transform_and_lower (portable kernels, no delegate) -> to_executorch"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            manager = to_edge_transform_and_lower(program, partitioner=partitioner).to_executorch()
    except Exception as e:
        raise ExportError(f"{FORMAT} export of {name} ({framework}), variant {variant}: lowering the torch.export "
                          f"program failed: {_one_line(e)}") from e
    path.write_bytes(manager.buffer)
    details.update(converter=route, variant=variant, **_plan_facts(manager))
    if variant == "xnnpack" and not details.get("delegates"):
        details["note"] = "XnnpackPartitioner delegated nothing: every op runs on ExecuTorch's portable kernels"
    details["bundle"] = _write_bundle(manager, bpte, arrays, reference, batch_sizes, max_batch, expected_from)
    details["companions"] = [bpte.name]  # shipped beside the program (exporters/bundle.py): its self-check
    details["input_mapping"] = "the forward's arguments, by position" + (f" ({', '.join(names)})" if len(names) > 1 else "")
    details["output_mapping"] = ("the forward's return value" if len(out_names) == 1 else
                                 f"the forward's {len(out_names)} outputs, flattened in order ({', '.join(out_names)})")
    details["signature"] = signature.to_json()
    details["export_check_max_abs_vs_torch"] = _export_check(path, arrays, eager, batch_sizes, max_batch)
    return Artifact(model=name, format=FORMAT, variant=variant, path=str(path), framework=framework,
                    route=route, batch_sizes=batch_sizes, size_bytes=size_of(path), export_s=export_s,
                    details=details)


def bundle_path(artifact: Artifact) -> Path:
    """The bundled program beside an artifact's .pte."""
    recorded = ((artifact.details or {}).get("bundle") or {}).get("path")
    return Path(artifact.path).with_name(recorded or file_names(artifact.variant)[1])


def _plan_facts(manager) -> dict[str, Any]:
    plan = manager.executorch_program.execution_plan[0]
    delegates = [d.id for d in plan.delegates]
    return {"delegates": delegates, "operators": sorted({op.name for op in plan.operators})}


def _chunks(n: int, batch_sizes, max_batch: int) -> list[tuple[int, int]]:
    size = batch_sizes[0] if batch_sizes else max_batch
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _write_bundle(manager, path: Path, arrays, reference: dict[str, np.ndarray], batch_sizes, max_batch,
                  expected_from: str) -> dict[str, Any]:
    """The program with the example rows and their reference outputs as test cases (one per chunk of rows
    the program takes), serialized as ExecuTorch's BundledProgram."""
    import torch
    from executorch.devtools.bundled_program.config import MethodTestCase, MethodTestSuite
    from executorch.devtools.bundled_program.core import BundledProgram
    from executorch.devtools.bundled_program.serialize import serialize_from_bundled_program_to_flatbuffer

    n = arrays[0].shape[0]
    cases = []
    for a, b in _chunks(n, batch_sizes, max_batch):
        if batch_sizes and b - a != batch_sizes[0]:
            continue  # a fixed-batch program takes only full chunks
        cases.append(MethodTestCase(
            inputs=[torch.from_numpy(np.ascontiguousarray(x[a:b])) for x in arrays],
            expected_outputs=[torch.from_numpy(np.ascontiguousarray(y[a:b])) for y in reference.values()]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundled = BundledProgram(manager, [MethodTestSuite(method_name=METHOD, test_cases=cases)])
        path.write_bytes(serialize_from_bundled_program_to_flatbuffer(bundled))
    return {"path": path.name, "method": METHOD, "test_cases": len(cases), "rows": sum(
        c.inputs[0].shape[0] for c in cases), "expected_from": expected_from, "rtol": BUNDLE_RTOL,
        "atol": BUNDLE_ATOL, "size_bytes": path.stat().st_size,
        "check": "exporters.executorch.check_bundle (ExecuTorch's verify_result_with_bundled_expected_output)"}


def _export_check(path: Path, arrays, eager: dict[str, np.ndarray], batch_sizes, max_batch: int) -> float:
    """A sanity number for the report (the verify stage does the real comparison)."""
    import torch
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(path).load_method(METHOD)
    rows = batch_sizes[0] if batch_sizes else min(arrays[0].shape[0], max_batch)
    outs = method.execute([torch.from_numpy(np.ascontiguousarray(a[:rows])) for a in arrays])
    errs = [float(np.max(np.abs(o.numpy() - e[:rows]))) if e.size else 0.0 for o, e in zip(outs, eager.values())]
    return max(errs) if errs else 0.0


# --------------------------------------------------------------------------- the bundled self-check

@dataclass
class BundleCheck:
    passed: bool
    max_abs: float                      # over every test case and output
    message: str
    cases: list[dict] = field(default_factory=list)   # per test case: index, rows, passed, max_abs, error


_NP_OF_SCALAR = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 5: np.float16, 6: np.float32,
                 7: np.float64, 11: np.bool_}


def _tensor_array(value) -> np.ndarray | None:
    t = getattr(value.val, "__dict__", {})
    if not {"scalar_type", "sizes", "data"} <= set(t):
        return None
    dtype = _NP_OF_SCALAR.get(int(value.val.scalar_type))
    if dtype is None:
        return None
    return np.frombuffer(bytes(value.val.data), dtype=dtype).reshape(list(value.val.sizes))


def check_bundle(path, *, method: str = METHOD, rtol: float = BUNDLE_RTOL, atol: float = BUNDLE_ATOL) -> BundleCheck:
    """Run a .bpte's own test cases in ExecuTorch's runtime and judge them with ExecuTorch's own check
    (`BundledModule.verify_result_with_bundled_expected_output`, allclose with rtol/atol). Where ExecuTorch
    says a case mismatched, the case is run again through the program loaded from the bundle to report by
    how much."""
    path = Path(path)
    try:
        from executorch.devtools.bundled_program.serialize import deserialize_from_flatbuffer_to_bundled_program
        from executorch.extension.pybindings import portable_lib
    except ImportError as e:
        raise RuntimeUnavailable(f"{FORMAT}: ExecuTorch's runtime is not installed ({_one_line(e)}); "
                                 f"install it with `{INSTALL}`") from e
    if not path.is_file():
        raise ArtifactLoadError(f"{FORMAT}: expected a bundled program at {path}, found nothing")
    buf = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            schema = deserialize_from_flatbuffer_to_bundled_program(buf)
        bundle = portable_lib._load_bundled_program_from_buffer(buf)
    except Exception as e:
        raise ArtifactLoadError(f"{FORMAT}: ExecuTorch could not load the bundled program {path} ({len(buf)} bytes): "
                                f"{_one_line(e)}") from None
    suites = [s for s in schema.method_test_suites if s.method_name == method]
    if not suites or not suites[0].test_cases:
        return BundleCheck(False, float("nan"), f"{path.name}: no test cases for method {method!r}")
    module = None
    cases, worst = [], 0.0
    for i, case in enumerate(suites[0].test_cases):
        want = [_tensor_array(v) for v in case.expected_outputs]
        entry: dict[str, Any] = {"index": i}
        try:
            got = bundle.verify_result_with_bundled_expected_output(method, i, rtol, atol)
            entry["passed"] = True
        except RuntimeError as e:
            entry.update(passed=False, error=str(e))
            if module is None:
                module = portable_lib._load_for_executorch_from_bundled_program(bundle)
            inputs = [_torch_of(_tensor_array(v)) for v in case.inputs]
            got = module.run_method(method, inputs)
        got = [g.numpy() if hasattr(g, "numpy") else np.asarray(g) for g in got]
        errs = [float(np.max(np.abs(g.astype(np.float64) - w))) if w is not None and w.size and g.shape == w.shape
                else (0.0 if w is not None and g.shape == w.shape else float("inf")) for g, w in zip(got, want)]
        entry["max_abs"] = max(errs) if errs else 0.0
        entry["rows"] = int(want[0].shape[0]) if want and want[0] is not None and want[0].ndim else None
        worst = max(worst, entry["max_abs"])
        cases.append(entry)
    passed = all(c["passed"] for c in cases)
    failed = [c["index"] for c in cases if not c["passed"]]
    message = (f"{path.name}: {len(cases)} bundled test case(s) " +
               ("pass" if passed else f"FAIL ({failed})") +
               f" ExecuTorch's check (rtol {rtol:g}, atol {atol:g}); max abs {worst:.3g}")
    return BundleCheck(passed, worst, message, cases)


def _torch_of(a: np.ndarray):
    import torch
    return torch.from_numpy(np.array(a))  # a writable copy: the bundle's bytes are read-only


# --------------------------------------------------------------------------- the runner

class ExecuTorchRunner(BaseRunner):
    """ExecuTorch's Python runtime (`executorch.runtime.Runtime`): the program loaded once, its `forward`
    method called with torch tensors. The signature is the one the exporter recorded; a dynamic-batch
    program takes up to `max_batch` rows per call (more go in chunks), a fixed-batch one padded chunks."""

    runtime = "executorch"

    def __init__(self, program, method, artifact: Artifact):
        recorded = (artifact.details or {}).get("signature")
        if not recorded:
            raise ArtifactLoadError(f"{FORMAT} artifact {artifact.label}: records no signature; expected "
                                    f"details['signature']: export again")
        super().__init__(artifact, Signature.from_json(recorded), static_batches=artifact.batch_sizes or None)
        self._program, self._method = program, method
        self.max_batch = int((artifact.details or {}).get("max_batch") or MAX_BATCH)
        self.delegates = list((artifact.details or {}).get("delegates") or [])

    def feed_sizes(self, n_rows: int):
        if self.static_batches is not None:
            return self.static_batches
        return None if n_rows <= self.max_batch else tuple(range(1, self.max_batch + 1))

    def describe_call(self, n_rows: int) -> str:
        return "dynamic batch" if self.static_batches is None else f"static batch {n_rows}"

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        outs = self._method.execute([torch.from_numpy(np.require(feed[n], requirements=["C", "W"]))
                                     for n in self.signature.input_names])
        return {k: o.numpy() if hasattr(o, "numpy") else np.asarray(o)
                for k, o in zip(self.signature.output_names, outs)}

    def close(self) -> None:
        super().close()
        self._method = self._program = None


def load(artifact: Artifact, runtime: str | None = None) -> ExecuTorchRunner:
    pick_runtime(FORMAT, artifact, runtime, RUNTIMES)
    path = check_file(FORMAT, artifact, "a .pte program")
    try:
        from executorch.runtime import Runtime
    except ImportError as e:
        raise RuntimeUnavailable(f"{FORMAT} artifact {artifact.label}: ExecuTorch's runtime is not installed "
                                 f"({_one_line(e)}); install it with `{INSTALL}`") from e
    try:
        program = Runtime.get().load_program(path)
        method = program.load_method(METHOD)
    except Exception as e:
        raise ArtifactLoadError(f"{FORMAT} artifact {artifact.label}: ExecuTorch could not load {path} "
                                f"({path.stat().st_size} bytes); expected a complete .pte program, the file is corrupt "
                                f"or truncated: {_one_line(e)}") from None
    return ExecuTorchRunner(program, method, artifact)
