#!/usr/bin/env python
"""Run the model zoo (tests/zoo.py: architectures from public libraries, random weights with real
BatchNorm statistics) through `export`, and write each cell's outcome into the README between its
zoo markers. The table is generated, never typed.

    .venv/bin/python scripts/zoo_table.py      # a few minutes: every model, every format (again with
                                               # fitted tolerances where the defaults fail)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
README = ROOT / "README.md"
START, END = "<!-- zoo:start -->", "<!-- zoo:end -->"
# what a model this deep needs (the user's call, stated on the command line)
DEEP = ["--tolerance", "fp32=atol:1e-4", "--tolerance", "fp16=atol:0.1,min_top1_agreement:0.95",
        "--tolerance", "int8=atol:0.3,min_top1_agreement:0.9,min_cosine:0.98"]
ZOO = [("MobileNetV2 0.35, 32x32 (keras.applications)", "keras_mobilenet", ["--task", "classification"]),
       ("MobileNetV3Small, 32x32, npz array named keras_tensor (keras.applications)", "keras_mobilenet_v3",
        ["--task", "classification"]),
       ("EfficientNetB0, 32x32, npz array named images (keras.applications)", "keras_efficientnet",
        ["--task", "classification"]),
       ("ResNet-style block, NCHW, BatchNorm (torch, TorchScript file)", "torch_resnet_block", []),
       ("two heads returned as a dict (torch, state dict + factory)", "torch_dict_model",
        ["--factory", "dict_models:two_heads"]),
       ("DistilBERT, tiny config, input_ids + attention_mask (transformers save_pretrained folder)",
        "hf_encoder", []),
       ("BERT, tiny config, input_ids + token_type_ids, no mask (transformers save_pretrained folder)",
        "hf_bert", []),
       ("ViT, tiny config, 16x16 pixel_values NCHW (transformers save_pretrained folder)", "hf_vit", []),
       ("functional model of two integer inputs, ids + mask (keras, .keras file)", "keras_two_inputs", []),
       ("Normalization with a given mean and variance (keras, .keras file)", "keras_normalized", []),
       ("GRU over any sequence length, checked at 10 tokens (keras, .keras file)", "keras_gru_any_length", [])]


def export(model: Path, example: Path, home: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PIPELINE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "pipeline", "export", str(model), "--example", str(example),
                    "--no-track", *extra], cwd=home, env=env, capture_output=True, text=True)
    rec = json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())
    return json.loads((Path(rec["report_dir"]) / "parity.json").read_text())


def cell(r: dict) -> str:
    m = (r.get("comparison") or {}).get("metrics", {})
    worst = f" {m['max_abs']:.1e}" if isinstance(m.get("max_abs"), (int, float)) else ""
    d = r.get("details") or {}
    # a cell made by a later route names it: (nobuco), (onnx2tf, batch 1), (tensorflowjs without oneDNN)
    second = f" ({d['route_taken']})" if d.get("routes_left") and d.get("route_taken") else ""
    if r["status"] == "passed":
        return f"PASS{worst}{second}"
    if (r.get("details") or {}).get("outcome") == "unsupported":
        return "UNSUPPORTED"
    return f"FAIL{worst}"


def table() -> str:
    from tests import zoo
    rows = ["| model | tolerances | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for title, builder, extra in ZOO:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model, example = getattr(zoo, builder)(tmp)
            for label, tol in (("defaults", []), ("fitted", DEEP)):
                parity = export(model, example, tmp, extra + tol)
                cells = {f"{r['format']}-{r['variant']}@{r.get('runtime') or '-'}": cell(r) for r in parity["records"]}
                # a cell refused before any runtime ran (UNSUPPORTED by the converter) fills each runtime's column
                shown = [cells.get(c) or cells.get(c.split("@")[0] + "@-", "-") for c in COLUMN_KEYS]
                rows.append(f"| {title} | {label} | " + " | ".join(shown) + " |")
                if not any(c.startswith("FAIL") for c in shown):
                    break  # the defaults fit: no second row
    return "\n".join(rows)


COLUMN_KEYS = ["saved_model-fp32@tensorflow", "torchscript-fp32@torch-jit", "onnx-fp32@onnxruntime-cpu",
               "litert-fp32@litert-interpreter", "litert-fp16@litert-interpreter", "litert-int8@litert-interpreter",
               "tfjs-fp32@tfjs-node-cpu", "tfjs-fp32@tfjs-node-wasm"]
COLUMNS = ["SavedModel", "TorchScript", "ONNX", "LiteRT fp32", "LiteRT fp16", "LiteRT int8", "TF.js cpu",
           "TF.js wasm"]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README}: expected the markers {START} and {END}")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{table()}\n{END}", text, flags=re.S)
    README.write_text(new)
    print(new[new.index(START):new.index(END) + len(END)])


if __name__ == "__main__":
    main()
