"""`run digits` (Keras, PyTorch and Flax MLPs) in one run with more models beside it (tests/conftest.py
digits_run, shared with the browser's tests): a Keras CNN on Keras'
JAX and PyTorch backends, and Keras and PyTorch MLPs trained in bf16 mixed precision. Every model meets
the digits accuracy bound and every artifact of every format is verified in its own runtime."""
import pytest

pytestmark = pytest.mark.slow
FORMATS = {"saved_model", "torchscript", "onnx", "litert", "tfjs"}
def cells_of(records, model: str) -> list[dict]:
    return [x for x in records if x["model"] == model]


def all_verified(records, model: str) -> None:
    """Every format the spec lists verified (the opt-in ones it does not list are reported as skipped)."""
    cells = [x for x in cells_of(records, model) if x.get("skip") != "excluded"]
    assert {x["format"] for x in cells} == FORMATS, (model, cells)
    for x in cells:
        assert x["status"] == "passed", (x["label"], x["status"], x.get("message"), x.get("error"))


def test_every_model_meets_the_accuracy_bound(digits_run):
    rec, _, _ = digits_run
    for name in ("keras", "torch", "flax", "keras-jax-cnn", "keras-torch-cnn", "keras-bf16", "torch-bf16"):
        assert rec["models"][name]["metrics"]["accuracy"] >= 0.95, (name, rec["models"][name]["metrics"])


def test_the_flax_mlp_is_verified_in_every_format(digits_run):
    """An nnx.Module, through the jax family's routes."""
    all_verified(digits_run[1], "flax")


def test_a_keras_cnn_on_jax_and_on_torch_is_verified_in_every_format_by_its_backends_routes(digits_run):
    _, records, _ = digits_run
    for model in ("keras-jax-cnn", "keras-torch-cnn"):
        all_verified(records, model)
    route = {(x["model"], x["format"]): x["details"]["route"] for x in records if x["variant"] == "fp32"}
    # JAX: Keras' export through jax2tf and jax2onnx, the max pooling repaired for onnxruntime (onnx_graph.py)
    assert route["keras-jax-cnn", "saved_model"] == 'keras Model.export(format="tf_saved_model")'
    assert "jax2onnx" in route["keras-jax-cnn", "onnx"]
    assert "onnx2fx" in route["keras-jax-cnn", "torchscript"]
    # torch: the module traced, ONNX through torch.onnx, LiteRT through litert-torch
    assert "torch.onnx" in route["keras-torch-cnn", "onnx"]
    assert route["keras-torch-cnn", "torchscript"].startswith("torch.jit.trace")
    assert route["keras-torch-cnn", "litert"].startswith("litert_torch")


def test_bf16_training_computes_in_bfloat16_and_its_float32_model_is_verified(digits_run):
    rec, records, _ = digits_run
    by_stage = {s["name"]: s["facts"] for s in rec["stages"] if s["kind"] == "train"}
    assert by_stage["train:keras-bf16"]["precision"] == {"trained_in": "bf16", "computed_in": "bfloat16",
                                                         "weights": "float32"}
    assert by_stage["train:torch-bf16"]["precision"]["computed_in"] == "torch.bfloat16"
    assert by_stage["train:keras"]["precision"] is None
    for model in ("keras-bf16", "torch-bf16"):
        all_verified(records, model)
        for x in cells_of(records, model):  # float32 in, float32 out
            if x.get("skip") != "excluded":
                assert "float32" in x["details"]["signature"] and "bfloat16" not in x["details"]["signature"], x
