"""Models no one on this project wrote, built from public libraries' own code with random weights
(nothing is downloaded). BatchNorm statistics get real values, measured on the example inputs, so
the outputs vary with the input: a random deep net with untouched statistics gives every input the
same output, and every artifact of it would "pass"."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def calibrate_batchnorm(model, x: np.ndarray) -> None:
    """Give each BatchNormalization layer the statistics of its real input on `x`, upstream first: a
    random deep net with untouched statistics gives every input the same output."""
    import keras
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            h = np.asarray(keras.Model(model.inputs, layer.input)(x))
            gamma, beta, _, _ = layer.get_weights()
            axes = tuple(range(h.ndim - 1))
            layer.set_weights([gamma, beta, h.mean(axes), h.var(axes) + 1e-3])


def keras_application(out: Path, name: str, *, size: int = 32, classes: int = 5, array: str = "x",
                      **kwargs) -> tuple[Path, Path]:
    """keras.applications.<name> (random weights, calibrated BatchNorm) saved by model.save as .keras,
    and NHWC example images in 0..255 (the applications that rescale inside expect those), stored in
    the npz under `array`."""
    import keras
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(input_shape=(size, size, 3), weights=None, classes=classes, **kwargs)
    x = (np.random.default_rng(1).random((48, size, size, 3), dtype=np.float32) * 255).astype(np.float32)
    calibrate_batchnorm(model, x)
    model.save(out / f"{name.lower()}.keras")
    np.savez(out / f"{name.lower()}_images.npz", **{array: x})
    return out / f"{name.lower()}.keras", out / f"{name.lower()}_images.npz"


def keras_mobilenet_v3(out: Path) -> tuple[Path, Path]:
    """MobileNetV3Small at 32x32 (hard-swish, squeeze-excite, its own rescaling), its images stored under
    the name Keras gives the input before saving (keras_tensor)."""
    return keras_application(out, "MobileNetV3Small", array="keras_tensor")


def keras_efficientnet(out: Path) -> tuple[Path, Path]:
    """EfficientNetB0 at 32x32 (swish, squeeze-excite, its own rescaling and normalisation), images as `images`."""
    return keras_application(out, "EfficientNetB0", array="images")


def keras_mobilenet(out: Path) -> tuple[Path, Path]:
    """keras.applications.MobileNetV2 at 32x32 (alpha 0.35, 5 classes) as .keras, and NHWC example images."""
    import keras
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=5, alpha=0.35)
    x = np.random.default_rng(1).random((48, 32, 32, 3), dtype=np.float32)
    calibrate_batchnorm(model, x)
    model.save(out / "mobilenet.keras")
    np.savez(out / "images_nhwc.npz", x=x)
    return out / "mobilenet.keras", out / "images_nhwc.npz"


def torch_resnet_block(out: Path) -> tuple[Path, Path]:
    """A ResNet-style NCHW block (conv, BatchNorm, ReLU, a skip connection, pooling) saved as TorchScript,
    and NCHW example images."""
    import torch
    import torch.nn as nn
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

        def forward(self, x):
            h = self.stem(x)
            return self.head(torch.relu(h + self.body(h)))

    model = Block()
    x = np.random.default_rng(2).random((48, 3, 16, 16), dtype=np.float32)
    model.train()
    with torch.no_grad():  # running statistics from the example images (momentum None: a plain average)
        for bn in (model.stem[1], model.body[1]):
            bn.momentum = None
            bn.reset_running_stats()
        model(torch.from_numpy(x))
    model.eval()
    path = out / "resnet_block.pt"
    torch.jit.save(torch.jit.trace(model, torch.from_numpy(x[:2])), str(path))
    np.savez(out / "images_nchw.npz", x=x)
    return path, out / "images_nchw.npz"


DICT_MODEL = '''
import torch
import torch.nn as nn


class TwoHeads(nn.Module):
    """One trunk, three heads returned as a dict: class logits, an embedding and a softmax over 5 scores."""
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.classes = nn.Linear(16, 3)
        self.embed = nn.Linear(16, 4)
        self.scores = nn.Linear(16, 5)

    def forward(self, x):
        h = self.trunk(x)
        return {"logits": self.classes(h), "embedding": self.embed(h), "probs": torch.softmax(self.scores(h), dim=-1)}


def two_heads(input_shape=None, n_outputs=None, **_):
    return TwoHeads()
'''


DICT_FACTORY = "dict_models:two_heads"  # what `export --factory` is told for torch_dict_model's state dict


def torch_dict_model(out: Path) -> tuple[Path, Path]:
    """A torch model returning a dict of two heads, as a state dict with its factory module beside it
    (DICT_FACTORY), and example rows."""
    import importlib
    import sys

    import torch
    (out / "dict_models.py").write_text(DICT_MODEL)
    sys.path.insert(0, str(out))
    try:
        module = importlib.import_module("dict_models")
        torch.manual_seed(0)
        model = module.two_heads()
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("dict_models", None)
    torch.save(model.state_dict(), out / "two_heads.pt")
    np.savez(out / "rows.npz", x=np.random.default_rng(3).standard_normal((40, 6)).astype(np.float32))
    return out / "two_heads.pt", out / "rows.npz"


def hf_encoder(out: Path) -> tuple[Path, Path]:
    """A transformers DistilBERT encoder from a tiny config (random weights; LayerNorm, not BatchNorm, so
    the outputs vary with the input as they are), saved with save_pretrained, and token ids with real
    padding masks."""
    import torch
    from transformers import DistilBertConfig, DistilBertModel
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=32)
    DistilBertModel(config).eval().save_pretrained(out / "tiny_distilbert")
    rng = np.random.default_rng(4)
    ids = rng.integers(1, 100, size=(48, 12)).astype(np.int64)
    mask = (np.arange(12) < rng.integers(4, 13, size=(48, 1))).astype(np.int64)
    np.savez(out / "tokens.npz", input_ids=np.where(mask == 1, ids, 0), attention_mask=mask)
    return out / "tiny_distilbert", out / "tokens.npz"


def hf_bert(out: Path) -> tuple[Path, Path]:
    """A transformers BERT encoder from a tiny config (random weights, LayerNorm), saved with
    save_pretrained, and token ids with segment ids but no attention mask: BERT's forward takes
    (input_ids, attention_mask, token_type_ids, ...), so a positional call would feed the segment ids as
    the mask. Returns the folder and the npz."""
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, type_vocab_size=2)
    BertModel(config).eval().save_pretrained(out / "tiny_bert")
    rng = np.random.default_rng(6)
    ids = rng.integers(1, 100, size=(48, 12)).astype(np.int64)
    segments = (np.arange(12) >= rng.integers(3, 10, size=(48, 1))).astype(np.int64)  # sentence A, then B
    np.savez(out / "segments.npz", input_ids=ids, token_type_ids=segments)
    return out / "tiny_bert", out / "segments.npz"


def hf_vit(out: Path) -> tuple[Path, Path]:
    """A transformers ViT image encoder from a tiny config (16x16 images in 4x4 patches, random weights),
    saved with save_pretrained, and NCHW images as `pixel_values`."""
    import torch
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(out / "tiny_vit")
    images = np.random.default_rng(7).random((48, 3, 16, 16), dtype=np.float32)
    np.savez(out / "pixels.npz", pixel_values=images)
    return out / "tiny_vit", out / "pixels.npz"


def keras_two_inputs(out: Path) -> tuple[Path, Path]:
    """A Keras functional model of two named inputs (integer token ids and a padding mask: embedding,
    masked mean, dense), saved as .keras, and token rows with real padding."""
    import keras
    from keras import layers, ops
    keras.utils.set_random_seed(0)
    ids = keras.Input((12,), dtype="int64", name="input_ids")
    mask = keras.Input((12,), dtype="int64", name="attention_mask")
    m = ops.expand_dims(ops.cast(mask, "float32"), -1)
    pooled = ops.sum(layers.Embedding(100, 16)(ids) * m, axis=1) / ops.maximum(ops.sum(m, axis=1), 1.0)
    model = keras.Model({"input_ids": ids, "attention_mask": mask}, layers.Dense(3)(layers.Dense(16, "relu")(pooled)))
    model.save(out / "two_inputs.keras")
    rng = np.random.default_rng(5)
    mask_rows = (np.arange(12) < rng.integers(3, 13, size=(48, 1))).astype(np.int64)
    np.savez(out / "keras_tokens.npz", input_ids=rng.integers(0, 100, size=(48, 12)).astype(np.int64) * mask_rows,
             attention_mask=mask_rows)
    return out / "two_inputs.keras", out / "keras_tokens.npz"


def keras_gru_any_length(out: Path) -> tuple[Path, Path]:
    """A Keras GRU over token embeddings whose sequence length is not fixed (Input((None,))), saved as
    .keras, and rows of 10 tokens: each converter meets a recurrent loop over a dynamic length."""
    import keras
    keras.utils.set_random_seed(0)
    ids = keras.Input((None,), dtype="int64", name="tokens")
    h = keras.layers.GRU(8)(keras.layers.Embedding(50, 8)(ids))
    keras.Model(ids, keras.layers.Dense(3)(h)).save(out / "gru.keras")
    np.savez(out / "gru_tokens.npz", tokens=np.random.default_rng(6).integers(0, 50, size=(48, 10)).astype(np.int64))
    return out / "gru.keras", out / "gru_tokens.npz"


def keras_normalized(out: Path) -> tuple[Path, Path]:
    """A Keras model whose Normalization layer is given its mean and variance (constants the model's
    function captures), saved as .keras, with feature rows."""
    import keras
    keras.utils.set_random_seed(0)
    x = keras.Input((6,), name="features")
    y = keras.layers.Dense(3)(keras.layers.Normalization(mean=[1.0] * 6, variance=[4.0] * 6)(x))
    keras.Model(x, y).save(out / "normalized.keras")
    np.savez(out / "features.npz", features=np.random.default_rng(7).normal(size=(48, 6)).astype(np.float32))
    return out / "normalized.keras", out / "features.npz"
