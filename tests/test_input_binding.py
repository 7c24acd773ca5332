"""Inputs named as the model names them: the data's arrays meet a model's inputs by name, then, for a
model of one input, by position (as `model(x)` does), and anything else is refused naming both lists.
Each model here is saved by its library's own save call and loaded back, as a user hands it over."""
import numpy as np
import pytest

from parity.feeds import InputBindingError, bind_inputs, describe_binding

from .zoo import keras_application

X = np.zeros((2, 3), np.float32)


@pytest.mark.parametrize("x, names, optional, form, mapping", [
    (X, ["input_layer"], (), "array", {}),                                      # one array, one input
    ({"images": X}, ["input_layer"], (), "array", {"images": "input_layer (by position)"}),
    ({"a": X, "b": X}, ["b", "a"], (), "dict", {"b": "b", "a": "a"}),           # by name, in the model's order
    ({"ids": X, "types": X}, ["ids", "mask", "types"], ("mask", "types"), "dict", {"ids": "ids", "types": "types"}),
    ({"images": X}, None, (), "array", {"images": "its one input (by position)"}),
    ({"a": X, "b": X}, None, (), "dict", {}),
])
def test_arrays_bind_by_name_then_one_by_position(x, names, optional, form, mapping):
    bound, used = bind_inputs(x, names, optional)
    assert isinstance(bound, dict) == (form == "dict")
    assert used == mapping
    if form == "dict":
        assert list(bound) == [n for n in (names or x) if n in x]


@pytest.mark.parametrize("x, names, words", [
    (X, ["a", "b"], "the data has one input array; the model takes 2 (a, b)"),
    ({"a": X, "c": X}, ["a", "b"], "missing b; the model takes no c"),
    ({"a": X, "b": X, "c": X}, ["a", "b"], "the model takes no c"),
])
def test_arrays_that_cannot_bind_are_refused_naming_both_lists(x, names, words):
    with pytest.raises(InputBindingError) as e:
        bind_inputs(x, names)
    assert words in str(e.value)


def test_the_mapping_is_shown_only_when_a_name_changes():
    assert describe_binding({"a": "a"}) == ""
    assert describe_binding({"x": "input_layer (by position)"}) == "x -> input_layer (by position)"


@pytest.fixture(scope="module")
def keras_adapter():
    from frameworks import adapter
    return adapter("keras")


@pytest.mark.parametrize("application, kwargs", [("MobileNetV3Small", {}), ("EfficientNetB0", {})])
def test_a_keras_application_takes_an_array_named_anything(application, kwargs, keras_adapter, tmp_path):
    """Saved by model.save, its input is named after the symbolic tensor (keras_tensor) before loading and
    after the input layer (input_layer) once loaded; a user's npz may use either name, or its own."""
    path, example = keras_application(tmp_path, application, array="keras_tensor", **kwargs)
    model = keras_adapter.load_pretrained(path, where="test")
    x = np.load(example)["keras_tensor"][:2]
    want = np.asarray(model(x))
    for name in ("keras_tensor", "images"):
        assert keras_adapter.bind(model, {name: x}) == {name: f"{model.inputs[0].name} (by position)"}
        np.testing.assert_allclose(keras_adapter.predict(model, {name: x}), want, rtol=1e-6, atol=1e-6)
    assert want.std() > 0  # calibrated statistics: the outputs vary with the input


def test_a_functional_model_with_unnamed_inputs_binds_by_its_own_names(keras_adapter, tmp_path):
    import keras
    a, b = keras.Input((3,)), keras.Input((2,))
    model = keras.Model([a, b], keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))
    model.save(tmp_path / "unnamed.keras")
    loaded = keras_adapter.load_pretrained(tmp_path / "unnamed.keras", where="test")
    names = [t.name for t in loaded.inputs]
    rows = {names[1]: np.ones((2, 2), np.float32), names[0]: np.ones((2, 3), np.float32)}
    assert keras_adapter.bind(loaded, rows) == {n: n for n in names}
    np.testing.assert_allclose(keras_adapter.predict(loaded, rows),
                               np.asarray(loaded([rows[names[0]], rows[names[1]]])), rtol=1e-6)
    with pytest.raises(InputBindingError) as e:
        keras_adapter.bind(loaded, {names[0]: rows[names[0]], "extra": rows[names[1]]})
    assert f"missing {names[1]}; the model takes no extra" in str(e.value)


@pytest.fixture
def subclassed_keras():
    import keras

    @keras.saving.register_keras_serializable(package="binding_test")
    class Scaled(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x) * 2.0
    return Scaled


def test_a_subclassed_keras_model_is_called_positionally(subclassed_keras, keras_adapter, tmp_path):
    model = subclassed_keras()
    model(X)
    model.save(tmp_path / "sub.keras")
    loaded = keras_adapter.load_pretrained(tmp_path / "sub.keras", where="test")
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert keras_adapter.bind(loaded, {"features": rows}) == {"features": "its one input (by position)"}
    np.testing.assert_allclose(keras_adapter.predict(loaded, {"features": rows}), np.asarray(loaded(rows)), rtol=1e-6)


class _Typed:
    """Modules whose forward a positional call would feed wrongly: Hugging Face's order (a skipped
    parameter between two given ones) and keyword-only inputs."""

    @staticmethod
    def skipping():
        import torch

        class Encoder(torch.nn.Module):
            def forward(self, input_ids, attention_mask=None, token_type_ids=None):
                out = input_ids * 1.0
                if attention_mask is not None:
                    out = out * attention_mask
                return out + 10.0 * (token_type_ids if token_type_ids is not None else 0)
        return Encoder()

    @staticmethod
    def keyword_only():
        import torch

        class Scaled(torch.nn.Module):
            def forward(self, *, features, scale):
                return features * scale
        return Scaled()


def test_a_torch_forward_with_keyword_inputs_gets_each_array_in_its_own_slot(tmp_path):
    import torch

    from exporters.base import forward_order
    from frameworks import adapter
    fw = adapter("torch")
    ids = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    types = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    model = _Typed.skipping()
    x = {"token_type_ids": types, "input_ids": ids}
    assert fw.bind(model, x) == {"input_ids": "input_ids", "token_type_ids": "token_type_ids"}
    np.testing.assert_allclose(fw.predict(model, x), ids + 10.0 * types)  # not ids * types
    call = fw.for_inputs(model, x)
    assert call is not model and forward_order(call, x) == ["input_ids", "token_type_ids"]
    traced = torch.jit.trace(call, (torch.from_numpy(ids), torch.from_numpy(types)))  # as the converters do
    np.testing.assert_allclose(traced(torch.from_numpy(ids), torch.from_numpy(types)).numpy(), ids + 10.0 * types)

    kw = _Typed.keyword_only()
    rows = {"scale": np.full((2, 1), 3.0, np.float32), "features": ids}
    np.testing.assert_allclose(fw.predict(kw, rows), ids * 3.0)
    with pytest.raises(InputBindingError, match="missing scale; the model takes no bias"):
        fw.bind(kw, {"features": ids, "bias": ids})
    positional = torch.nn.Linear(2, 1)
    assert fw.for_inputs(positional, {"input": ids}) is positional  # nothing to fix: no wrapper
