"""int8 that keeps its worst layers in float: the zoo's MobileNetV2 (random weights, calibrated
BatchNorm) quantized to int8 with [export.litert] int8_fallback = "auto": the layers left in float are
named, their size cost is counted, and the cell passes or the record says why not."""
from __future__ import annotations

import numpy as np
import pytest

from parity.compare import tolerance_for


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    import keras
    from exporters import saved_model
    from tests.zoo import keras_mobilenet
    out = tmp_path_factory.mktemp("int8")
    model_file, images = keras_mobilenet(out)
    model = keras.models.load_model(model_file)
    x = np.load(images)["x"]
    sm = saved_model.export(model, framework="keras", name="mobilenet", example=x[:4], out_dir=out / "sm", upstream={})
    return out, model, x, sm


def export_int8(mobilenet, tmp_path, **fallback):
    from exporters import litert
    out, model, x, sm = mobilenet
    expected = np.asarray(model(x[:16]))
    options = {"calibration": x, "batch_sizes": [1, 16],
               "int8_fallback": {"task": "classification", **fallback}}
    arts = litert.export(None, framework="keras", name="mobilenet", example=x[:16], out_dir=tmp_path,
                         upstream={"saved_model": sm}, options=options, expected=expected)
    return next(a for a in arts if a.variant == "int8"), expected


def test_auto_fallback_leaves_the_worst_layers_in_float_until_the_cell_passes_or_says_why_not(mobilenet, tmp_path):
    tolerance = tolerance_for("int8", "litert", {"litert-int8": {"atol": 0.1, "min_top1_agreement": 0.9}})
    art, expected = export_int8(mobilenet, tmp_path, max_float_layers=4, tolerance=tolerance.to_json())
    found = art.details["int8_fallback"]
    steps = found["steps"]
    assert len(found["float_layers"]) == len(steps) - 1 <= 4
    assert found["layer_errors"] and all(e["rmse_per_step"] >= 0 for e in found["layer_errors"])
    if found["met_tolerance"]:
        assert steps[-1]["passed"] and found["why_not"] is None
    else:  # the limit came first: said, with the numbers
        assert len(found["float_layers"]) == 4 and "int8_max_float_layers = 4" in found["why_not"]
    assert found["size_cost_bytes"] == art.size_bytes - found["size_bytes_all_int8"]
    if found["float_layers"]:
        assert found["size_cost_bytes"] > 0 and steps[-1]["mean_abs_error"] < steps[0]["mean_abs_error"]
    assert "int8_fallback" in art.route and "left in float" in art.route


def test_a_tolerance_the_all_int8_model_meets_leaves_every_layer_int8(mobilenet, tmp_path):
    loose = tolerance_for("int8", "litert", {"litert-int8": {"atol": 10.0, "min_cosine": 0.0,
                                                             "min_top1_agreement": 0.0}})
    art, _ = export_int8(mobilenet, tmp_path, max_float_layers=4, tolerance=loose.to_json())
    found = art.details["int8_fallback"]
    assert found["float_layers"] == [] and found["met_tolerance"] and found["size_cost_bytes"] == 0


def test_the_spec_s_int8_fallback_reaches_the_keras_litert_export_and_its_record(tmp_path):
    import json
    from tests.conftest import ROOT, run_cli
    text = (ROOT / "pipeline" / "specs" / "toy.toml").read_text()
    text = text.replace('formats = ["saved_model", "torchscript", "onnx", "litert", "tfjs"]',
                        'formats = ["saved_model", "onnx", "litert"]')
    text = text.replace("litert_batch_sizes = [1, 16]", 'litert_batch_sizes = [1, 16]\n[export.litert]\nint8_fallback = "auto"')
    text = text[:text.index("[deploy.serving]")]
    (tmp_path / "toy8.toml").write_text(text)
    r = run_cli("run", str(tmp_path / "toy8.toml"), "--no-track", home=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    records = json.loads(next((tmp_path / ".pipeline" / "runs").glob("*/parity.json")).read_text())["records"]
    int8 = {x["model"]: x for x in records if x["label"].endswith("litert-int8")}
    # all int8, the one Dense misses atol on the extreme rows (beyond the calibration range); left in
    # float, the cell passes
    found = int8["keras"]["details"]["int8_fallback"]
    assert not found["steps"][0]["passed"] and found["met_tolerance"] and len(found["float_layers"]) == 1
    assert int8["keras"]["status"] == "passed" and found["calibration_rows"] == 64
    assert "int8_fallback" not in int8["torch"]["details"]  # litert-torch's route has no such denylist
