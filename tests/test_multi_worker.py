"""`[train] workers = N`: one model trained on several worker processes, each framework through its own
launcher (torchrun for torch's DistributedDataParallel, Lightning's ddp launcher, one TF_CONFIG process
per worker for MultiWorkerMirroredStrategy), all on loopback; a rank that dies fails the training with
its rank and its log, and leaves nothing the cache would take as trained; frameworks without a launcher
are refused when the spec is read."""
import json
import textwrap
from pathlib import Path

import pytest

from frameworks.distributed import per_worker_batch, shard_rows
from pipeline.spec import SpecError, load

from .conftest import run_cli

SPEC = """
[pipeline]
name = "workers"
seed = 0

[data]
source = "linear"
task = "regression"
n_samples = 200

[train]
optimizer = "sgd"
lr = 0.2
epochs = 10
batch_size = 50
loss = "mse"
workers = 2

[accept]
slope = {{ target = 3.0, tolerance = 0.05 }}
intercept = {{ target = 2.0, tolerance = 0.05 }}

{models}

[export]
formats = ["onnx"]
"""

KINDS = {"torch": "ddp-gloo", "lightning": "lightning-ddp", "keras": "multi-worker-mirrored",
         "tensorflow": "multi-worker-mirrored"}
FACTORIES = {"torch": "linear_torch", "lightning": "linear_lightning", "keras": "linear_keras",
             "tensorflow": "linear_tf_module"}


def write_spec(folder: Path, models: str, train: str = "") -> Path:
    text = textwrap.dedent(SPEC).format(models=models)
    if train:
        text = text.replace("workers = 2\n", f"workers = 2\n{train}\n")
    (folder / "spec.toml").write_text(text)
    return folder / "spec.toml"


def latest(home: Path) -> dict:
    return json.loads(sorted((home / ".pipeline" / "runs").glob("*.json"))[-1].read_text())


def stage(record: dict, name: str) -> dict:
    return next(s for s in record["stages"] if s["name"] == name)


@pytest.fixture(scope="module")
def four_styles(tmp_path_factory):
    """One run: the same line learnt by torch, Lightning, Keras and raw TensorFlow, each on two workers,
    with a validation split and the best epoch kept (each style's callbacks on every rank)."""
    home = tmp_path_factory.mktemp("workers")
    models = "\n".join(f'[[model]]\nname = "{fw}"\nframework = "{fw}"\nfactory = "pipeline.zoo:{f}"\n'
                       for fw, f in FACTORIES.items())
    spec = write_spec(home, models, train="validation_split = 0.2\ncheckpoint = true")
    r = run_cli("run", str(spec), "--no-track", home=home, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return home, latest(home)


@pytest.mark.e2e
@pytest.mark.parametrize("framework", list(FACTORIES))
def test_each_style_trains_one_model_on_two_workers_through_its_own_launcher(four_styles, framework):
    home, record = four_styles
    train = stage(record, f"train:{framework}")
    facts = train["facts"]
    metrics = facts["metrics"]
    assert abs(metrics["slope"] - 3.0) < 0.05 and abs(metrics["intercept"] - 2.0) < 0.05, metrics
    dist = facts["distribution"]
    assert dist["workers"] == 2 and dist["kind"] == KINDS[framework], dist
    assert dist["per_worker_batch"] == 25  # a global batch of 50 over two workers
    # each rank's framework counted two in its group, and each was dealt its own half of the 160 rows
    # left for training by the validation split
    ranks = {r["rank"]: r for r in dist["ranks"]}
    assert set(ranks) == {0, 1} and all(r["world_size"] == 2 and r["rows"] == 80 for r in ranks.values()), ranks
    assert not set(ranks[0]["first_rows"]) & set(ranks[1]["first_rows"]), ranks
    assert f"on 2 workers ({KINDS[framework]})" in facts["summary"]
    params = record["models"][framework]["params"]
    assert params["workers"] == 2 and params["distribution"] == KINDS[framework], params
    # the launcher's own traces: torchrun's per-rank logs, Lightning's rank banners, one log per TF worker
    logs = Path(train["path"]) / "workers" / "logs"
    if framework == "torch":
        assert {p.parent.name for p in logs.glob("*/attempt_0/*/stdout.log")} == {"0", "1"}
    elif framework == "lightning":
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in (logs / "rank0.log").read_text()
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (logs / "rank1.log").read_text()
    else:
        assert (logs / "rank0.log").is_file() and (logs / "rank1.log").is_file()
    # rank 0's epochs are the stage's history, validated and with its best epoch kept; the job's copies of
    # the arrays and of the model are gone
    history = json.loads((Path(train["path"]) / "history.json").read_text())
    assert len(history["loss"]) == len(history["val_loss"]) == 10 and history["loss"][-1] < history["loss"][0]
    assert history["val_loss"][history["best_epoch"] - 1] == min(history["val_loss"]), history
    assert not (logs.parent / "arrays.npz").exists() and not (logs.parent / "model").exists()
    # rank 0 alone writes TensorBoard, in the layout of one process (Keras': train/ and validation/)
    board = Path(train["path"]) / "tensorboard"
    assert sorted(p.parent.relative_to(board).as_posix() for p in board.rglob("events.out.tfevents.*")) == \
        ["train", "validation"], framework


DYING = '''
import os

import torch.nn as nn


class Line(nn.Linear):
    """nn.Linear whose forward ends its process on one rank, mid-training, while DIE_ON_PURPOSE is set."""

    def __init__(self, rank):
        super().__init__(1, 1)
        self.rank, self.calls = str(rank), 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("DIE_ON_PURPOSE") and os.environ.get("RANK") == self.rank and self.calls > 4:
            print(f"rank {self.rank} ends itself on purpose", flush=True)
            os._exit(3)
        return super().forward(x)


def dying_line(input_shape, n_outputs, die_on_rank=1, **_):
    return Line(die_on_rank)
'''


@pytest.mark.e2e
def test_a_rank_that_dies_fails_the_training_with_its_rank_and_log_and_nothing_is_cached(tmp_path):
    (tmp_path / "factories.py").write_text(DYING)
    spec = write_spec(tmp_path, '[[model]]\nname = "line"\nframework = "torch"\nfactory = "factories:dying_line"\n'
                                'params = { die_on_rank = 1 }\n')
    r = run_cli("run", str(spec), "--no-track", home=tmp_path, timeout=300, env={"DIE_ON_PURPOSE": "1"})
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    error = latest(tmp_path)["error"]
    assert "model line (torch): training on 2 workers" in error, error
    assert "rank 1 died without reporting an error (exit code 3)" in error, error
    assert "rank 1 ends itself on purpose" in error and "attempt_0/1/stderr.log" in error, error
    assert "then rank 0" in error, error  # how the other rank ended, after it
    train_entries = tmp_path / ".pipeline" / "cache" / "train"
    assert not train_entries.is_dir() or not [p for p in train_entries.iterdir() if (p / "stage.json").is_file()]
    # the same spec again, the rank left alone: the training runs (nothing was kept as trained) and passes
    again = run_cli("run", str(spec), "--no-track", home=tmp_path, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    train = stage(latest(tmp_path), "train:line")
    assert not train["cached"] and train["facts"]["distribution"]["workers"] == 2


def spec_for(tmp_path, model: str, train: str) -> str:
    path = tmp_path / "spec.toml"
    path.write_text(textwrap.dedent(SPEC).format(models=model).replace("workers = 2\n", train + "\n"))
    return str(path)


@pytest.mark.parametrize("workers", ["0", "-1", "true", "1.5", '"2"'])
def test_workers_must_be_a_positive_integer(tmp_path, workers):
    with pytest.raises(SpecError) as e:
        load(spec_for(tmp_path, '[[model]]\nname = "m"\nframework = "torch"\nfactory = "pipeline.zoo:linear_torch"',
                      f"workers = {workers}"))
    assert "model[0].train.workers: expected a positive integer" in str(e.value), str(e.value)


@pytest.mark.parametrize("framework, reason", [
    ("jax", "JAX has no launcher that spreads such a step over processes"),
    ("fastai", "through Hugging Face Accelerate"),
])
def test_workers_above_one_are_refused_for_a_framework_without_a_launcher(tmp_path, framework, reason):
    model = f'[[model]]\nname = "m"\nframework = "{framework}"\nfactory = "pipeline.zoo:linear_{framework}"'
    with pytest.raises(SpecError) as e:
        load(spec_for(tmp_path, model, "workers = 2"))
    assert f"model[0].train.workers: expected 1 for a {framework} model" in str(e.value), str(e.value)
    assert reason in str(e.value) and str(e.value).endswith("found 2")
    assert load(spec_for(tmp_path, model, "workers = 1")).models[0].train.workers == 1


def test_a_pretrained_model_takes_no_workers(tmp_path):
    (tmp_path / "line.keras").write_bytes(b"")  # checked by suffix and presence only at load
    model = '[[model]]\nname = "m"\nframework = "keras"\nsource = "line.keras"\ntrain = { workers = 2 }'
    with pytest.raises(SpecError) as e:
        load(spec_for(tmp_path, model, ""))
    assert "model[0].train: expected false for a pretrained model" in str(e.value), str(e.value)


def test_per_model_workers_override_the_default_and_one_is_the_default(tmp_path):
    models = ('[[model]]\nname = "a"\nframework = "torch"\nfactory = "pipeline.zoo:linear_torch"\n'
              '[[model]]\nname = "b"\nframework = "keras"\nfactory = "pipeline.zoo:linear_keras"\n'
              'train = { workers = 3 }')
    s = load(spec_for(tmp_path, models, ""))
    assert [m.train.workers for m in s.models] == [1, 3]


def test_the_global_batch_is_split_and_every_rank_gets_as_many_rows():
    assert per_worker_batch(50, 200, 2) == 25 and per_worker_batch(33, 200, 2) == 17
    assert per_worker_batch(None, 201, 2) == 101  # full batch: a whole (padded) shard
    assert per_worker_batch(500, 200, 4) == 50    # never more than a shard
    shards = [shard_rows(201, 2, r) for r in (0, 1)]
    assert [len(s) for s in shards] == [101, 101]  # padded round to one size, as DistributedSampler deals
    assert set(shards[0]) | set(shards[1]) == set(range(201)) and list(shards[1][:3]) == [1, 3, 5]
