"""`python -m pipeline explain`: where an artifact first disagrees with its original model.

Two ways in: a past run (its failed records already name their first diverging layer; this prints
them), or an artifact made anywhere (`--file ARTIFACT --model ORIGINAL --example inputs.npz`): its
layers are compared now, the table and a plot are written, and a minimal repro beside them: the
smallest piece of the artifact that shows the divergence in the bare runtime, its inputs, the
original's expected values, and a script, ready to attach to a converter's bug report.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np

from .spec import SpecError

def artifact_format(path: Path) -> str:
    from exporters import format_of
    from exporters.taps import FORMATS_WITH_TAPS
    fmt = format_of(path)
    if fmt not in FORMATS_WITH_TAPS:
        raise SpecError(f"{path}: expected an artifact whose intermediate tensors can be read: a .onnx, .tflite "
                        f"or TorchScript .pt file, a SavedModel folder or a TF.js folder (model.json); found "
                        f"{'a folder without either' if path.is_dir() else repr(path.suffix or 'no suffix')}")
    return fmt


def read_example(path: Path):
    """The rows to run: the npz's array x, or all its arrays for a model of several inputs."""
    if not path.is_file():
        raise SpecError(f"--example {path}: no such file; expected an .npz of the model's inputs")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    if not arrays:
        raise SpecError(f"--example {path}: the npz holds no arrays; expected the model's inputs (x)")
    return arrays["x"] if "x" in arrays else arrays if len(arrays) > 1 else next(iter(arrays.values()))


def explain_file(artifact: str, model: str, example: str, *, out: Path, variant: str = "fp32",
                 tolerances: dict | None = None) -> dict:
    """Compare the artifact's layers with the original's on the example rows; write localization.json,
    layers.png and repro/ under `out`. Returns the localization."""
    import frameworks
    from frameworks import adapter
    from parity.compare import tolerance_for
    from .localization import rows_to_run
    from parity.compare import VARIANTS
    if variant not in VARIANTS:
        raise SpecError(f"--variant {variant}: expected one of {', '.join(VARIANTS)}")
    art, original = Path(artifact).resolve(), Path(model).resolve()
    if not art.exists():
        raise SpecError(f"--file {artifact}: no such artifact")
    fmt = artifact_format(art)
    framework = frameworks.for_file(original) if original.exists() else None
    if framework is None:
        raise SpecError(f"--model {model}: expected the original model's file (.keras, .h5, .pt, .pth, .pt2), "
                        f"found {'nothing' if not original.exists() else repr(original.suffix)}")
    x = rows_to_run(read_example(Path(example)), None)
    fw = adapter(framework)
    if not hasattr(fw, "layer_outputs"):
        raise SpecError(f"--model {model}: the layer outputs of {framework} models are not read yet; expected "
                        f"a Keras or torch model")
    try:
        loaded = fw.load_pretrained(original, where=f"--model {model}")
    except ValueError as e:  # the framework's loader refused the file: said as a usage error
        raise SpecError(str(e)) from None
    from exporters import FORMATS
    tolerance = tolerance_for(variant, fmt, tolerances or {}, formats=FORMATS)
    from exporters.taps import artifact_taps
    from parity.localize import localize
    layers = fw.layer_outputs(loaded, x)
    if not layers:
        raise SpecError(f"--model {model}: the model exposes no layers to compare (a subclassed Keras model, "
                        f"say); expected a functional or Sequential model, or a torch module")
    found = localize(layers, artifact_taps(fmt, art, x), atol=tolerance.atol, rtol=tolerance.rtol)
    loc = {**found.to_json(), "format": fmt, "variant": variant, "tolerance": tolerance.describe(),
           "artifact": str(art), "model": str(original)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "localization.json").write_text(json.dumps(loc, indent=2))
    from .plots import plot_layer_errors
    plot_layer_errors({f"{art.name} ({fmt})": loc}, out / "layers.png",
                      title=f"{art.name}: error per layer against {original.name}")
    if found.first is not None and fmt in REPRO_RUNS:
        loc["repro"] = str(write_repro(fmt, art, x, found.first.node, found.expected, found.first.allowed,
                                       out / "repro"))
    return loc


def write_repro(fmt: str, artifact: Path, x, node: str, expected: np.ndarray, allowed: float, out: Path) -> Path:
    """The smallest piece of the artifact that shows the divergence, its inputs, the expected values of
    the diverging tensor and repro.py, which runs them in the bare runtime and exits 1 while the
    tensor is off by more than `allowed`."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    feeds = x if isinstance(x, dict) else {"x": x}
    np.savez(out / "inputs.npz", **feeds)
    np.savez(out / "expected.npz", expected=expected.astype(np.float32))
    if fmt == "onnx":
        model_file = _onnx_piece(artifact, node, out)
    elif artifact.is_dir():
        model_file = shutil.copytree(artifact, out / artifact.name)
    else:
        model_file = shutil.copy2(artifact, out / artifact.name)
    run = REPRO_RUNS[fmt]
    script = REPRO.format(node=node, fmt=fmt, model=Path(model_file).name, allowed=repr(float(allowed)),
                          run=textwrap.dedent(run).strip())
    (out / "repro.py").write_text(script)
    return out


def _onnx_piece(artifact: Path, node: str, out: Path) -> Path:
    """The ONNX graph from its inputs up to the diverging tensor, nothing after it."""
    import onnx
    from onnx.utils import Extractor
    model = onnx.shape_inference.infer_shapes(onnx.load(str(artifact)))  # the extractor reads value infos
    if node not in {v.name for v in (*model.graph.value_info, *model.graph.output)}:
        model.graph.value_info.append(onnx.helper.make_empty_tensor_value_info(node))
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    piece = Extractor(model).extract_model(inputs, [node])
    onnx.save(piece, str(out / "repro.onnx"))
    return out / "repro.onnx"


REPRO = '''"""Shows that the {fmt} artifact's tensor {node!r} differs from what the original model computes
on the same inputs (expected.npz, from the original's layer). Runs in the bare runtime:
    python repro.py      # exit 1 while the tensor is off by more than {allowed}
"""
import sys

import numpy as np

NODE, MODEL, ALLOWED = {node!r}, {model!r}, {allowed}
inputs = dict(np.load("inputs.npz"))
expected = np.load("expected.npz")["expected"]

{run}

got = np.asarray(got, dtype=np.float64).reshape(expected.shape)
max_abs = float(np.max(np.abs(got - expected)))
print(f"{{NODE}}: max abs {{max_abs:.3e}} against the original model (allowed {{ALLOWED:.3e}})")
sys.exit(1 if max_abs > ALLOWED else 0)
'''

ONNX_RUN = '''
    import onnxruntime as ort
    session = ort.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {n: inputs[n] for n in names} if set(names) <= set(inputs) else {names[0]: next(iter(inputs.values()))}
    got = session.run([NODE], feed)[0]
'''

LITERT_RUN = '''
    from ai_edge_litert.interpreter import Interpreter
    rows = next(iter(inputs.values()))
    interp = Interpreter(model_path=MODEL, experimental_preserve_all_tensors=True)
    detail = interp.get_input_details()[0]
    if rows.ndim == 4 and list(rows.shape[2:]) != list(detail["shape"][2:]):
        rows = rows.transpose(0, 2, 3, 1)  # the file takes NHWC rows of an NCHW model
    interp.resize_tensor_input(detail["index"], [1, *detail["shape"][1:]])
    interp.allocate_tensors()
    index = next(t["index"] for t in interp.get_tensor_details() if t["name"] == NODE)
    got = []
    for r in range(len(rows)):  # one row at a time, as the file was converted
        interp.set_tensor(detail["index"], rows[r:r + 1].astype(detail["dtype"]))
        interp.invoke()
        got.append(interp.get_tensor(index).copy())
    got = np.concatenate(got)
'''

SAVED_MODEL_RUN = '''
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    loaded = tf.saved_model.load(MODEL)
    frozen = convert_variables_to_constants_v2(loaded.signatures["serving_default"])
    graph = tf.Graph()
    with graph.as_default():
        tf.compat.v1.import_graph_def(frozen.graph.as_graph_def(), name="")
    feed = graph.get_tensor_by_name(frozen.inputs[0].name)
    rows = next(iter(inputs.values()))
    if rows.ndim == 4 and list(rows.shape[2:]) != feed.shape.as_list()[2:]:
        rows = rows.transpose(0, 2, 3, 1)  # the graph takes NHWC rows of an NCHW model
    step = feed.shape[0] or len(rows)  # a graph converted at a fixed batch takes pieces of it
    with tf.compat.v1.Session(graph=graph) as session:
        got = np.concatenate([session.run(graph.get_tensor_by_name(NODE), {feed: rows[i:i + step]})
                              for i in range(0, len(rows), step)])
'''

TORCHSCRIPT_RUN = '''
    import torch
    module = torch.jit.load(MODEL, map_location="cpu").eval()
    graph = module.inlined_graph.copy()  # forward with every call inlined: the tensor is one of its values
    value = next(v for node in graph.nodes() for v in node.outputs() if v.debugName() == NODE)
    graph.eraseOutput(0)
    graph.registerOutput(value)
    tap = torch._C._create_function_from_graph("tap", graph)
    with torch.no_grad():
        got = tap(module._c, *[torch.from_numpy(v) for v in inputs.values()]).numpy()
'''


def explain_run(record: dict, artifact: str | None = None) -> list[dict]:
    """The localised failures a run's report holds: one dict per failed record (of `artifact`, a label
    such as keras/onnx, when given)."""
    report = Path(record.get("report_dir") or "") / "parity.json"
    if not report.is_file():
        raise SpecError(f"run {record['run_id']}: its parity report {report} is gone; expected the run's "
                        f"report folder (rerun the spec to make it again)")
    records = json.loads(report.read_text())["records"]
    failed = [r for r in records if r["status"] == "failed" and (artifact is None or r["label"] == artifact)]
    if artifact is not None and not any(r["label"] == artifact for r in records):
        raise SpecError(f"--artifact {artifact}: run {record['run_id']} has no such artifact; expected one of "
                        f"{', '.join(sorted({r['label'] for r in records}))}")
    return failed


# what a repro script runs, per format whose bare runtime it can drive (TF.js runs in Node: none)
REPRO_RUNS = {"onnx": ONNX_RUN, "litert": LITERT_RUN, "saved_model": SAVED_MODEL_RUN, "torchscript": TORCHSCRIPT_RUN}
