"""Keras on its three backends and mixed-precision training, as a spec states them: which module and lane
a backend names, what each lane's process starts with, and every refusal (all without a framework
import); the ONNX repair that lets JAX's pooling run in onnxruntime."""
import numpy as np
import pytest

import frameworks
from frameworks.precision import refusal
from pipeline import lanes
from pipeline.spec import SpecError, load

from .test_frameworks import spec

KERAS = 'factory = "pipeline.zoo:linear_keras"\n'


@pytest.mark.parametrize("backend, module, lane", [("tensorflow", "keras", "tensorflow"),
                                                   ("jax", "keras_jax", "keras-jax"),
                                                   ("torch", "keras_torch", "keras-torch")])
def test_a_keras_backend_names_its_module_lane_and_model_family(tmp_path, backend, module, lane):
    m = load(spec(tmp_path, f'framework = "keras"\nbackend = "{backend}"\n{KERAS}')).models[0]
    assert m.framework == module and frameworks.lane(module) == lane
    assert frameworks.family(module) == ("tensorflow" if backend == "tensorflow" else f"keras-{backend}")
    want_env = {} if backend == "tensorflow" else {"KERAS_BACKEND": backend}
    assert lanes.environment(lane) == want_env


def test_the_backend_lanes_import_their_backend_before_keras():
    assert lanes.warm_imports("keras-jax") == ("jax", "keras")
    assert lanes.warm_imports("keras-torch") == ("torch", "keras")
    assert lanes.warm_imports("tensorflow") == ("tensorflow", "keras")


@pytest.mark.parametrize("model, expected", [
    ('framework = "keras"\nbackend = "mxnet"\n' + KERAS, "model[0].backend: expected one of tensorflow, jax, torch"),
    ('framework = "torch"\nbackend = "jax"\nfactory = "pipeline.zoo:linear_torch"\n',
     "model[0].backend: expected no backend for a torch model"),
])
def test_a_backend_keras_does_not_have_or_on_another_framework_is_refused(tmp_path, model, expected):
    with pytest.raises(SpecError) as e:
        load(spec(tmp_path, model))
    assert expected in str(e.value), str(e.value)


def test_the_in_process_executor_refuses_a_lane_that_needs_its_own_process(tmp_path, monkeypatch):
    from pipeline.executors.inprocess import InProcess
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    with pytest.raises(SpecError) as e:
        InProcess({"tensorflow", "keras-jax"}, tmp_path / "cache", tmp_path / "logs")
    assert "keras-jax lane needs a process of its own (KERAS_BACKEND=jax" in str(e.value)
    InProcess({"tensorflow", "torch"}, tmp_path / "cache", tmp_path / "logs")  # the usual lanes run here


# --------------------------------------------------------------------------------------- precision

def test_bf16_is_refused_on_a_cpu_without_bfloat16_instructions_and_fp16_on_any_cpu():
    assert refusal("bf16", flags={"avx2", "avx512f"}).startswith("this CPU computes no bfloat16 natively")
    assert refusal("bf16", flags={"avx2", "avx512_bf16"}) is None
    assert refusal("bf16", flags={"amx_bf16"}) is None
    assert refusal("bf16", flags=None) is None  # a system that lists no flags: not refused on a guess
    assert "150x slower" in refusal("fp16") and refusal("fp32") is None


@pytest.mark.parametrize("model, train, expected", [
    ('framework = "keras"\n' + KERAS, 'precision = "fp16"', "train.precision: expected a precision this machine trains in: "
                                                   "fp16 mixed precision pays on a GPU"),
    ('framework = "keras"\n' + KERAS, 'precision = "int4"', "train.precision: expected one of fp32, bf16, fp16"),
    ('framework = "jax"\nfactory = "pipeline.zoo:linear_jax"\n', 'precision = "bf16"',
     "train.precision: expected fp32 for a jax model: the factory's function computes in its parameters' dtype"),
    ('framework = "torch"\nfactory = "pipeline.zoo:linear_torch"\n', 'precision = "bf16"\nworkers = 2',
     "expected fp32 when several workers train the model"),
])
def test_a_precision_the_style_or_machine_cannot_train_in_is_refused_with_why(tmp_path, monkeypatch, model, train,
                                                                             expected):
    monkeypatch.setattr("frameworks.precision.cpu_flags", lambda *a: {"avx512_bf16"})
    with pytest.raises(SpecError) as e:
        load(spec(tmp_path, model, train))
    assert expected in str(e.value), str(e.value)


def test_bf16_is_accepted_for_keras_torch_and_lightning(tmp_path, monkeypatch):
    monkeypatch.setattr("frameworks.precision.cpu_flags", lambda *a: {"avx512_bf16"})
    for model in ('framework = "keras"\nbackend = "jax"\n' + KERAS, 'framework = "keras"\nbackend = "torch"\n' + KERAS,
                  'framework = "torch"\nfactory = "pipeline.zoo:linear_torch"\n',
                  'framework = "lightning"\nfactory = "pipeline.zoo:linear_lightning"\n'):
        assert load(spec(tmp_path, model, 'precision = "bf16"')).models[0].train.precision == "bf16"


# ----------------------------------------------------------------------------- ONNX pooling repair

def _jax2onnx_style_pool(path, kernel=(1, 2, 2, 1)):
    """What jax2onnx writes for a max pooling over NHWC: Unsqueeze, Unsqueeze, a 4-D MaxPool, Squeeze."""
    import onnx
    from onnx import TensorProto, helper
    nodes = [helper.make_node("Unsqueeze", ["x", "a0"], ["u0"]), helper.make_node("Unsqueeze", ["u0", "a1"], ["u1"]),
             helper.make_node("MaxPool", ["u1"], ["p"], kernel_shape=list(kernel), strides=list(kernel)),
             helper.make_node("Squeeze", ["p", "a01"], ["y"])]
    inits = [helper.make_tensor("a0", TensorProto.INT64, [1], [0]), helper.make_tensor("a1", TensorProto.INT64, [1], [1]),
             helper.make_tensor("a01", TensorProto.INT64, [2], [0, 1])]
    graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 2, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # one every onnxruntime here reads
    onnx.save(model, str(path))


def test_jax2onnx_pooling_over_n_and_c_is_rewritten_as_a_2d_pool_onnxruntime_runs(tmp_path):
    import onnxruntime as ort

    from exporters.onnx_graph import spatial_pools
    path = tmp_path / "pool.onnx"
    _jax2onnx_style_pool(path)
    x = np.random.default_rng(0).normal(size=(5, 4, 4, 3)).astype(np.float32)
    with pytest.raises(Exception, match="Unsupported pooling size"):  # the file as jax2onnx writes it
        ort.InferenceSession(str(path)).run(None, {"x": x})
    assert spatial_pools(path) == 1
    got = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    want = x.reshape(5, 2, 2, 2, 2, 3).max(axis=(2, 4))  # 2x2 windows over H and W, per channel
    np.testing.assert_array_equal(got, want)
    assert spatial_pools(path) == 0  # nothing left to rewrite


def test_a_pool_that_reaches_across_channels_is_left_as_it_is(tmp_path):
    from exporters.onnx_graph import spatial_pools
    path = tmp_path / "pool.onnx"
    _jax2onnx_style_pool(path, kernel=(1, 2, 2, 3))  # pools over C too: not a spatial pool, not rewritten
    before = path.read_bytes()
    assert spatial_pools(path) == 0 and path.read_bytes() == before
