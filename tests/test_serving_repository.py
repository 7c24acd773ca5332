"""A TF Serving deployment from a model bundle: the repository layout and its warmup records, the model
config and batching files, and the Dockerfile, all checked without a server or a container engine."""
import time

import numpy as np
import pytest

from exporters.base import Artifact
from exporters.bundle import read_bundle, write_bundle
from parity.feeds import pack
from serving.config import (ConfigError, ModelEntry, model_config_text, read_batching_parameters,
                            read_model_config, write_batching_parameters, write_model_config)
from serving.container import ContainerError, check_dockerfile, docker_available, write_container
from serving.repository import WARMUP_DIR, WARMUP_FILE, RepositoryError, read_warmup, warmup_inputs, write_repository

tf = pytest.importorskip("tensorflow")

W = np.arange(6, dtype=np.float32).reshape(3, 2) / 10
B = np.array([0.5, -0.25], np.float32)


def _one_input_saved_model(path):
    class M(tf.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = tf.Variable(W), tf.Variable(B)

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="input_1")])
        def serve(self, input_1):
            return {"output_0": tf.matmul(input_1, self.w) + self.b}

    m = M()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.serve})
    return path


def _two_input_saved_model(path):
    class M(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(W)

        @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="input_1"),
                                      tf.TensorSpec([None, 2], tf.int32, name="input_2")])
        def serve(self, input_1, input_2):
            ids = tf.reduce_sum(tf.cast(input_2, tf.float32), axis=1, keepdims=True)
            return {"output_0": tf.matmul(input_1, self.w) + ids}

    m = M()
    tf.saved_model.save(m, str(path), signatures={"serving_default": m.serve})
    return path


def _bundle(root, *, x, y, signature, saved_model=None, verdict="passed", name="m"):
    src = root / "src"
    src.mkdir(parents=True)
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    np.savez(src / "reference.npz", **pack("x", x), y=y, kind=np.zeros(n, np.int8))
    arts = {}
    verdicts = {}
    if saved_model is not None:
        arts["saved_model"] = [Artifact(name, "saved_model", "fp32", str(saved_model), "keras", "test")]
        verdicts[f"{name}/saved_model@tensorflow"] = verdict
    else:
        (src / "model.onnx").write_bytes(b"onnx")
        arts["onnx"] = [Artifact(name, "onnx", "fp32", str(src / "model.onnx"), "keras", "test")]
        verdicts[f"{name}/onnx@onnxruntime-cpu"] = "passed"
    write_bundle(root / "bundle", model=name, framework="keras", task="regression", signature=signature,
                 reference=src / "reference.npz", artifacts=arts, verdicts=verdicts, tolerances={}, max_batch=16,
                 source={"spec": "test"})
    return read_bundle(root / "bundle")


SIG_ONE = {"inputs": [{"name": "x", "dtype": "float32", "shape": [None, 3], "layout": None}],
           "outputs": [{"name": "output_0", "dtype": "float32", "shape": [None, 2], "layout": None}]}
SIG_TWO = {"inputs": [{"name": "features", "dtype": "float32", "shape": [None, 3], "layout": None},
                      {"name": "ids", "dtype": "int64", "shape": [None, 2], "layout": None}],
           "outputs": [{"name": "output_0", "dtype": "float32", "shape": [None, 2], "layout": None}]}
X = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def saved_one(tmp_path_factory):
    return _one_input_saved_model(tmp_path_factory.mktemp("sm1") / "saved_model")


@pytest.fixture
def bundle(tmp_path, saved_one):
    return _bundle(tmp_path, x=X, y=X @ W + B, signature=SIG_ONE, saved_model=saved_one)


@pytest.fixture(scope="module")
def written(tmp_path_factory, saved_one):
    root = tmp_path_factory.mktemp("repo")
    b = _bundle(root, x=X, y=X @ W + B, signature=SIG_ONE, saved_model=saved_one)
    return b, write_repository(b, root / "models", version=3, model_name="clf", warmup_rows=4)


# ----------------------------------------------------------------------------------------- repository

def test_the_version_folder_holds_the_saved_model_and_its_warmup(written):
    _, version_dir = written
    assert version_dir.parent.name == "clf" and version_dir.name == "3"
    assert (version_dir / "saved_model.pb").is_file()
    assert any((version_dir / "variables").iterdir())
    assert (version_dir / WARMUP_DIR / WARMUP_FILE).is_file()
    # nothing half-written is left beside it
    assert [p.name for p in version_dir.parent.iterdir()] == ["3"]


def test_warmup_records_are_the_stored_parity_inputs_keyed_by_the_saved_models_names(written):
    _, version_dir = written
    logs = read_warmup(version_dir)
    assert len(logs) == 3  # 10 rows, 4 per request
    for log in logs:
        req = log.predict_log.request
        assert req.model_spec.name == "clf" and req.model_spec.signature_name == "serving_default"
        assert set(req.inputs) == {"input_1"}
    rows = np.concatenate([warmup_inputs(log)["input_1"] for log in logs])
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, X)


def test_the_written_saved_model_gives_the_reference_outputs_on_the_warmup_inputs(written):
    bundle, version_dir = written
    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    got = np.concatenate([fn(**{k: tf.constant(v) for k, v in warmup_inputs(log).items()})["output_0"].numpy()
                          for log in read_warmup(version_dir)])
    np.testing.assert_allclose(got, bundle.reference()["y"], rtol=1e-6, atol=1e-6)


def test_the_same_version_again_is_left_as_is_other_bytes_are_refused(written, tmp_path):
    bundle, version_dir = written
    before = {p: p.stat().st_mtime_ns for p in version_dir.rglob("*")}
    assert write_repository(bundle, version_dir.parent.parent, version=3, model_name="clf", warmup_rows=4) == version_dir
    assert {p: p.stat().st_mtime_ns for p in version_dir.rglob("*")} == before
    with pytest.raises(RepositoryError, match=r"'clf': version 3 already exists .*tf_serving_warmup_requests differs"):
        write_repository(bundle, version_dir.parent.parent, version=3, model_name="clf", warmup_rows=2)
    assert len(read_warmup(version_dir)) == 3  # untouched
    assert sorted(p.name for p in version_dir.parent.iterdir()) == ["3"]
    write_repository(bundle, version_dir.parent.parent, version=3, model_name="clf", warmup_rows=2, overwrite=True)
    assert len(read_warmup(version_dir)) == 5
    write_repository(bundle, version_dir.parent.parent, version=3, model_name="clf", warmup_rows=4, overwrite=True)


def test_a_bundle_without_a_saved_model_is_refused(tmp_path):
    b = _bundle(tmp_path, x=X, y=X @ W + B, signature=SIG_ONE)
    with pytest.raises(RepositoryError, match=r"model 'm': expected a SavedModel artifact .*found only onnx"):
        write_repository(b, tmp_path / "models", version=1)
    assert not (tmp_path / "models").exists()


def test_a_saved_model_that_failed_parity_is_refused(tmp_path, saved_one):
    b = _bundle(tmp_path, x=X, y=X @ W + B, signature=SIG_ONE, saved_model=saved_one, verdict="failed")
    with pytest.raises(RepositoryError, match=r"model 'm': expected the SavedModel's parity verdict to be passed, "
                                              r"found m/saved_model@tensorflow: failed"):
        write_repository(b, tmp_path / "models", version=1)


def test_a_saved_model_changed_after_bundling_is_refused(bundle, tmp_path):
    (next(bundle.root.glob("saved_model/*")) / "saved_model.pb").write_bytes(b"other")
    with pytest.raises(RepositoryError, match="differ from the bundle's manifest"):
        write_repository(bundle, tmp_path / "models", version=1)


@pytest.mark.parametrize("kwargs, match", [({"version": 0}, "version 0: expected a whole number >= 1"),
                                           ({"version": 1, "model_name": "a b"}, "expected a served model name"),
                                           ({"version": 1, "warmup_rows": 0}, "warmup_rows 0")])
def test_bad_arguments_are_refused(bundle, tmp_path, kwargs, match):
    with pytest.raises(RepositoryError, match=match):
        write_repository(bundle, tmp_path / "models", **kwargs)


def test_two_named_inputs_are_keyed_by_the_saved_models_own_names_and_dtypes(tmp_path):
    sm = _two_input_saved_model(tmp_path / "sm2")
    rng = np.random.default_rng(1)
    x = {"features": rng.normal(size=(6, 3)).astype(np.float32), "ids": rng.integers(0, 50, (6, 2)).astype(np.int64)}
    y = x["features"] @ W + x["ids"].sum(axis=1, keepdims=True).astype(np.float32)
    b = _bundle(tmp_path / "b", x=x, y=y, signature=SIG_TWO, saved_model=sm, name="two")
    version_dir = write_repository(b, tmp_path / "models", version=1, warmup_rows=4)
    logs = read_warmup(version_dir)
    assert len(logs) == 2
    feeds = [warmup_inputs(log) for log in logs]
    assert all(set(f) == {"input_1", "input_2"} for f in feeds)
    assert logs[0].predict_log.request.inputs["input_2"].dtype == tf.int32.as_datatype_enum
    np.testing.assert_array_equal(np.concatenate([f["input_1"] for f in feeds]), x["features"])
    np.testing.assert_array_equal(np.concatenate([f["input_2"] for f in feeds]), x["ids"].astype(np.int32))
    fn = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    got = np.concatenate([fn(**{k: tf.constant(v) for k, v in f.items()})["output_0"].numpy() for f in feeds])
    np.testing.assert_allclose(got, y, rtol=1e-6)


def test_a_truncated_or_empty_warmup_file_is_named(written, tmp_path):
    _, version_dir = written
    data = (version_dir / WARMUP_DIR / WARMUP_FILE).read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(data[:-7])
    with pytest.raises(RepositoryError, match=r"expected TFRecords of PredictionLog, found a bad record after 2 "
                                              r"good ones \(DataLossError"):
        read_warmup(cut)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(RepositoryError, match="found no records"):
        read_warmup(empty)


# --------------------------------------------------------------------------------------------- config

def test_the_model_config_parses_back_with_its_policies_and_labels(tmp_path):
    path = write_model_config(tmp_path / "models.config", [
        ModelEntry("clf", "/models/clf", "specific", versions=[1, 2], labels={"stable": 1, "canary": 2}),
        ModelEntry("reg", "/models/reg", "latest", num_versions=2),
        ModelEntry("emb", "/models/emb", "all", labels={"stable": 4})])
    cfg = read_model_config(path)
    clf, reg, emb = cfg.model_config_list.config
    assert (clf.name, clf.base_path, clf.model_platform) == ("clf", "/models/clf", "tensorflow")
    assert list(clf.model_version_policy.specific.versions) == [1, 2]
    assert dict(clf.version_labels) == {"stable": 1, "canary": 2}
    assert reg.model_version_policy.latest.num_versions == 2
    assert emb.model_version_policy.WhichOneof("policy_choice") == "all" and dict(emb.version_labels) == {"stable": 4}


@pytest.mark.parametrize("entry, match", [
    (ModelEntry("m", "/models/m", "newest"), r"model 'm': policy 'newest': expected one of latest, all, specific"),
    (ModelEntry("m", "/models/m", "latest", num_versions=0), r"model 'm': num_versions 0: expected a whole number >= 1"),
    (ModelEntry("m", "/models/m", "specific"), r"model 'm': versions: expected at least one version"),
    (ModelEntry("m", "/models/m", "specific", versions=[1, 2], labels={"stable": 3}),
     r"model 'm': version_labels\['stable'\] = 3: expected one of the served versions \[1, 2\]"),
    (ModelEntry("m", "/models/m", "all", labels={"stable": 0}), r"version_labels\['stable'\] = 0"),
    (ModelEntry("m", "models/m"), r"model 'm': base_path 'models/m': expected an absolute path"),
    (ModelEntry("m", "/models/m", "latest", versions=[1]), r"only the 'specific' policy takes versions"),
])
def test_bad_config_values_are_refused_with_the_model_and_field(entry, match):
    with pytest.raises(ConfigError, match=match):
        model_config_text([entry])


def test_a_model_twice_and_an_unparsable_config_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="found it twice"):
        model_config_text([ModelEntry("m", "/models/m"), ModelEntry("m", "/models/n")])
    bad = tmp_path / "models.config"
    bad.write_text("model_config_list { config { nam: 'm' } }")
    with pytest.raises(ConfigError, match=rf"{bad}: expected a ModelServerConfig text proto.*nam"):
        read_model_config(bad)


def test_batching_parameters_round_trip(tmp_path):
    path = write_batching_parameters(tmp_path / "batching.config", max_batch_size=32, batch_timeout_micros=0,
                                     max_enqueued_batches=100, num_batch_threads=4)
    assert "max_batch_size { value: 32 }" in path.read_text()
    assert read_batching_parameters(path) == {"max_batch_size": 32, "batch_timeout_micros": 0,
                                              "max_enqueued_batches": 100, "num_batch_threads": 4}


@pytest.mark.parametrize("kwargs, match", [({"max_batch_size": 0}, "max_batch_size 0: expected a whole number >= 1"),
                                           ({"batch_timeout_micros": -1}, "batch_timeout_micros -1: expected a whole number >= 0"),
                                           ({"num_batch_threads": 2.5}, "num_batch_threads 2.5"),
                                           ({"max_enqueued_batches": True}, "max_enqueued_batches True")])
def test_bad_batching_values_are_refused(tmp_path, kwargs, match):
    args = {"max_batch_size": 8, "batch_timeout_micros": 100, "max_enqueued_batches": 10, "num_batch_threads": 2, **kwargs}
    with pytest.raises(ConfigError, match=match):
        write_batching_parameters(tmp_path / "b", **args)


@pytest.mark.parametrize("text, match", [("max_batch_sise { value: 8 }", "has no field named \"max_batch_sise\""),
                                         ("max_batch_size { value: 8 }", "missing batch_timeout_micros"),
                                         ("max_batch_size { value: 0 } batch_timeout_micros { value: 1 } "
                                          "max_enqueued_batches { value: 1 } num_batch_threads { value: 1 }",
                                          "max_batch_size 0")])
def test_a_bad_batching_file_is_named(tmp_path, text, match):
    path = tmp_path / "batching.config"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_batching_parameters(path)


# ------------------------------------------------------------------------------------------ container

@pytest.fixture
def plan(tmp_path):
    deploy = tmp_path / "deploy"
    (deploy / "models" / "clf" / "1").mkdir(parents=True)
    (deploy / "models" / "clf" / "1" / "saved_model.pb").write_bytes(b"pb")
    write_model_config(deploy / "models.config", [ModelEntry("clf", "/models/clf", labels={"stable": 1})])
    write_batching_parameters(deploy / "batching.config", max_batch_size=8, batch_timeout_micros=500,
                              max_enqueued_batches=10, num_batch_threads=2)
    return write_container(deploy, repository_dir=deploy / "models", config_path=deploy / "models.config",
                           batching_path=deploy / "batching.config", tf_version="2.21.0")


def test_the_dockerfile_and_the_commands(plan):
    text = plan.dockerfile.read_text()
    assert "FROM tensorflow/serving:2.21.0\n" in text
    assert "COPY models /models\n" in text and "COPY models.config /models/models.config\n" in text
    assert "EXPOSE 8500 8501\n" in text
    assert ('ENTRYPOINT ["tensorflow_model_server", "--port=8500", "--rest_api_port=8501", '
            '"--model_config_file=/models/models.config", "--enable_batching", '
            '"--batching_parameters_file=/models/batching.config"]') in text
    assert plan.tag == "tfserving-clf:latest"
    assert plan.commands == [f"docker build -t tfserving-clf:latest {plan.deploy_dir}",
                             "docker run --rm -p 8500:8500 -p 8501:8501 tfserving-clf:latest"]
    lines = plan.commands_file.read_text().splitlines()
    assert lines[1:] == [plan.build_command.rsplit(" ", 1)[0] + " .", plan.run_command]  # context: the folder itself
    assert check_dockerfile(plan.dockerfile, tf_version="2.21.0") == []


def test_the_default_image_follows_the_installed_tensorflow(tmp_path, plan):
    again = write_container(plan.deploy_dir, repository_dir=plan.deploy_dir / "models",
                            config_path=plan.deploy_dir / "models.config")
    assert again.image == "tensorflow/serving:" + tf.__version__.split("rc")[0].split("-")[0]
    assert "--enable_batching" not in again.dockerfile.read_text()
    assert check_dockerfile(again.dockerfile) == []


@pytest.mark.parametrize("old, new, match", [
    ("FROM tensorflow/serving:2.21.0", "FROM tensorflow/serving:latest", "expected tensorflow/serving:<version>"),
    ("FROM tensorflow/serving:2.21.0", "FROM tensorflow/serving:2.15.0", "expected tensorflow/serving:2.21.0"),
    ("COPY models /models", "COPY modelz /models", "COPY modelz: the source does not exist"),
    ("COPY models /models", "COPY ../outside /models", "expected a source inside the build context"),
    ("--model_config_file=/models/models.config", "--model_config_file=/models/other.config",
     "--model_config_file=/models/other.config: no COPY puts a file there"),
    ("EXPOSE 8500 8501", "EXPOSE 8500", "listens on 8501 \\(--rest_api_port\\), which is not exposed"),
    ('"--enable_batching", ', "", "without --enable_batching"),
])
def test_each_kind_of_problem_is_reported_on_a_tampered_dockerfile(plan, old, new, match):
    text = plan.dockerfile.read_text()
    assert old in text
    plan.dockerfile.write_text(text.replace(old, new))
    problems = check_dockerfile(plan.dockerfile, tf_version="2.21.0")
    assert any(__import__("re").search(match, p) for p in problems), problems


def test_a_config_naming_a_model_the_image_lacks_is_reported(plan):
    write_model_config(plan.deploy_dir / "models.config", [ModelEntry("other", "/models/other")])
    [problem] = check_dockerfile(plan.dockerfile, tf_version="2.21.0")
    assert "model 'other': base_path /models/other: expected a copied folder" in problem


def test_files_outside_the_build_context_are_refused(plan, tmp_path):
    outside = tmp_path / "elsewhere.config"
    outside.write_text("")
    with pytest.raises(ContainerError, match="expected it inside the build context"):
        write_container(plan.deploy_dir, repository_dir=plan.deploy_dir / "models", config_path=outside,
                        tf_version="2.21.0")


def test_no_engine_answers_here_and_the_check_says_so_quickly():
    started = time.monotonic()
    assert docker_available(timeout=3) is False
    assert time.monotonic() - started < 5


def test_a_static_batch_saved_model_gets_requests_of_that_batch_padded(tmp_path):
    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([2, 3], tf.float32, name="input_1")])
        def serve(self, input_1):
            return {"output_0": input_1 * 2.0}

    m = M()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures={"serving_default": m.serve})
    b = _bundle(tmp_path / "b", x=X[:5], y=X[:5] * 2, signature=SIG_ONE, saved_model=tmp_path / "sm")
    logs = read_warmup(write_repository(b, tmp_path / "models", version=1, warmup_rows=4))
    rows = [warmup_inputs(log)["input_1"] for log in logs]
    assert [len(r) for r in rows] == [2, 2, 2]
    np.testing.assert_array_equal(np.concatenate(rows)[:5], X[:5])
    np.testing.assert_array_equal(rows[-1][1], X[4])  # the last request padded with its own last row
