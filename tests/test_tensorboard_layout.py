"""Every training style writes its TensorBoard scalars in one layout, Keras' own: train/ and validation/
run folders, tags epoch_loss and epoch_learning_rate, step = the 0-based epoch, the History's values. So
one chart overlays the losses of every style. Each style trains 3 epochs on 40 rows with held-out rows,
in a process of its lane (the pytest process imports no framework), and its event files are read back."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

EPOCHS = 3
LANES = {"tensorflow": ("tensorflow", "keras", "jax", "flax"), "torch": ("torch", "lightning", "fastai")}
LAYOUT = {("train", "epoch_loss"), ("train", "epoch_learning_rate"), ("validation", "epoch_loss")}

TRAIN_AND_READ = r"""
import json, sys
from pathlib import Path
import numpy as np
import frameworks
from frameworks.base import tensorboard_without_tensorflow
from pipeline import zoo
from pipeline.spec import TrainSettings
FACTORIES = {"tensorflow": zoo.linear_tf_module, "keras": zoo.linear_keras, "torch": zoo.linear_torch,
             "lightning": zoo.linear_lightning, "fastai": zoo.linear_fastai, "jax": zoo.linear_jax,
             "flax": zoo.linear_flax}
root, styles = Path(sys.argv[1]), sys.argv[2].split(",")
if "tensorflow" not in styles:
    tensorboard_without_tensorflow()  # the torch lane reads without TensorFlow, as it writes
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray
x = np.random.default_rng(0).uniform(-1, 1, (40, 1)).astype(np.float32)
y = 3 * x + 2
out = {}
for style in styles:
    fw = frameworks.adapter(style)
    t = TrainSettings(optimizer="sgd", lr=0.1, epochs=%(epochs)d, batch_size=None, loss="mse", shuffle=False,
                      threads=1, validation_split=0.25)
    model = fw.build(lambda: FACTORIES[style]((1,), 1), seed=0, threads=1)
    history = fw.train(model, t, x[:30], y[:30], 0, val=(x[30:], y[30:]), logdir=root / style)
    scalars = {}
    for run in sorted({f.parent for f in (root / style).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        name = run.relative_to(root / style).as_posix()
        for tag in acc.Tags()["scalars"]:  # simple values (torch.utils.tensorboard)
            scalars[f"{name}|{tag}"] = [(e.step, e.value) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["tensors"]:  # tf.summary's scalars are tensors; other tensors are not scalars
            events = [e for e in acc.Tensors(tag) if e.tensor_proto.tensor_shape.dim == []
                      and e.tensor_proto.dtype in (1, 2)]  # DT_FLOAT, DT_DOUBLE
            if events:
                scalars[f"{name}|{tag}"] = [(e.step, float(make_ndarray(e.tensor_proto))) for e in events]
    out[style] = {"history": history.to_json(), "scalars": scalars}
print(json.dumps(out))
""" % {"epochs": EPOCHS}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{style: {"history": History.to_json(), "scalars": {"run|tag": [(step, value), ...]}}}, the two
    lanes trained side by side."""
    root = tmp_path_factory.mktemp("tblayout")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = {lane: subprocess.Popen([sys.executable, "-c", TRAIN_AND_READ, str(root), ",".join(styles)], cwd=ROOT,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for lane, styles in LANES.items()}
    found = {}
    for lane, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{lane} lane: {stderr[-3000:]}"
        found.update(json.loads(stdout.splitlines()[-1]))
    return found


def test_every_style_writes_the_same_runs_and_tags(written):
    pairs = {style: {tuple(key.split("|")) for key in w["scalars"]} for style, w in written.items()}
    assert pairs == {style: LAYOUT for style in pairs}


@pytest.mark.parametrize("style", [s for styles in LANES.values() for s in styles])
def test_one_scalar_per_epoch_stepped_from_0_with_the_historys_values(written, style):
    history, scalars = written[style]["history"], written[style]["scalars"]
    for key, expected in (("train|epoch_loss", history["loss"]), ("validation|epoch_loss", history["val_loss"])):
        assert len(expected) == EPOCHS, (style, history)
        points = scalars[key]
        assert [step for step, _ in points] == list(range(EPOCHS)), (style, key, points)
        assert [value for _, value in points] == pytest.approx(expected, rel=1e-6), (style, key)
    assert [step for step, _ in scalars["train|epoch_learning_rate"]] == list(range(EPOCHS)), style
