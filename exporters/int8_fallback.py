"""LiteRT int8 that keeps its worst layers in float: `[export.litert] int8_fallback = "auto"`.

The SavedModel is quantized to int8 with calibration rows (full-integer kernels, float32 inputs and
outputs), and TFLite's QuantizationDebugger measures each layer's quantization error (its NumericVerify
ops: the quantized tensor against the float one, per layer). While the int8 model misses the cell's
tolerance on the parity rows, one more layer is left in float through the converter's own denylist:
of the layers with the largest error for their quantization step, the one whose release brings the
outputs closest to the float model's. It stops when the tolerance is met or at the limit of float
layers, and says which layers stayed float, what they cost in bytes, and, when the limit was
reached first, why it did not pass.
"""
from __future__ import annotations

import numpy as np

from parity.compare import Tolerance, compare

CANDIDATES = 6  # layers tried at each step: the worst by error per quantization step


def quantize_with_fallback(sm_path: str, calibration: np.ndarray, example: np.ndarray, expected: np.ndarray, *,
                           tolerance: dict, task: str, max_float_layers: int, log=lambda line: None
                           ) -> tuple[bytes, dict]:
    """The int8 model's bytes and what was done: {"float_layers", "met_tolerance", "size_bytes_all_int8",
    "size_cost_bytes", "steps", "layer_errors", "why_not"}."""
    import tensorflow as tf

    rows = np.asarray(calibration, np.float32)

    def dataset():
        for r in rows[:64]:
            yield [r[None]]
    converter = tf.lite.TFLiteConverter.from_saved_model(str(sm_path))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=dataset)
    debugger.run()
    ranked = _ranked_layers(debugger)
    tol = Tolerance.from_json(tolerance)

    def build(denylist: list[str]) -> tuple[bytes, float, bool]:
        # set without the options setter: that rebuilds the debug model, which has nothing left to verify
        # once every layer is denylisted; the plain model reads the denylist from here
        debugger._debug_options = tf.lite.experimental.QuantizationDebugOptions(  # noqa: SLF001
            denylisted_nodes=list(denylist) or None)
        data = debugger.get_nondebug_quantized_model()
        got = _run(data, example).reshape(expected.shape)
        passed = compare(expected, got, tolerance=tol, task=task).passed
        return data, float(np.mean(np.abs(got.astype(np.float64) - expected))), passed

    data, error, passed = build([])
    all_int8 = len(data)
    steps = [{"float_layers": 0, "mean_abs_error": error, "passed": passed}]
    floats: list[str] = []
    while not passed and len(floats) < max_float_layers:
        tried = [(name, *build(floats + [name])) for name in [n for n, _ in ranked if n not in floats][:CANDIDATES]]
        if not tried:
            break
        name, data, error, passed = min(tried, key=lambda t: (not t[3], t[2]))
        floats.append(name)
        steps.append({"float_layers": len(floats), "layer": name, "mean_abs_error": error, "passed": passed})
        log(f"int8 fallback: {name} left in float; mean abs error {error:.3g}{' (passes)' if passed else ''}")
    data = build(floats)[0] if floats else data
    why_not = None if passed else f"still outside the int8 tolerance ({tol.describe()}) " + (
        f"with {len(floats)} layer(s) left in float, the "
        f"limit int8_max_float_layers = {max_float_layers}" if len(floats) >= max_float_layers else
        f"with every layer the debugger measured ({len(floats)}) left in float") + \
        f"; mean abs error {steps[0]['mean_abs_error']:.3g} all int8, {steps[-1]['mean_abs_error']:.3g} now"
    return data, {"float_layers": floats, "met_tolerance": passed, "size_bytes_all_int8": all_int8,
                  "size_cost_bytes": len(data) - all_int8, "steps": steps, "why_not": why_not,
                  "layer_errors": [{"layer": n, "rmse_per_step": e} for n, e in ranked[:10]],
                  "calibration_rows": min(len(rows), 64)}


def _ranked_layers(debugger) -> list[tuple[str, float]]:
    """(the layer's tensor name, its RMSE in units of its quantization step), worst first. The
    debugger keys its statistics by NumericVerify tensor; the denylist takes the name of the quantized
    tensor that op checks (the op's output in the model; its float twin carries a suffix)."""
    from ai_edge_litert.interpreter import Interpreter
    interp = debugger._quant_interpreter  # noqa: SLF001 - the debugger's own model, as it reads it itself
    # the debug model suffixes the names it copies ('dense/MatMul' -> 'dense/MatMul1'); the denylist
    # takes the calibrated model's own names
    original = sorted((t["name"] for t in Interpreter(model_content=debugger.calibrated_model).get_tensor_details()),
                      key=len, reverse=True)
    ranked = []
    for detail in debugger._get_numeric_verify_tensor_details():  # noqa: SLF001
        stats = debugger.layer_statistics.get(detail["name"])
        if not stats:
            continue
        quantized, _ = interp._get_op_details(debugger._defining_op[detail["index"]])["inputs"]  # noqa: SLF001
        tensor = interp._get_tensor_details(quantized, subgraph_index=0)  # noqa: SLF001
        scales = tensor["quantization_parameters"]["scales"]
        name = next((o for o in original if tensor["name"].startswith(o) and tensor["name"][len(o):].isdigit()),
                    tensor["name"])
        step = float(scales[0]) if len(scales) else 1.0
        ranked.append((name, float(np.sqrt(stats["mean_squared_error"])) / (step or 1.0)))
    return sorted(ranked, key=lambda t: -t[1])


def _run(data: bytes, rows: np.ndarray) -> np.ndarray:
    """The model's first output on each row, one at a time (float32 in and out)."""
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=data, num_threads=1)
    detail = interp.get_input_details()[0]
    interp.resize_tensor_input(detail["index"], [1, *rows.shape[1:]])
    interp.allocate_tensors()
    out = interp.get_output_details()[0]["index"]
    got = []
    for r in rows:
        interp.set_tensor(detail["index"], r[None].astype(detail["dtype"]))
        interp.invoke()
        got.append(interp.get_tensor(out).copy())
    return np.concatenate(got)
