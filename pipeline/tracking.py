"""Every MLflow call of the toolkit lives here. Stages report facts; this module records them.

The store is `<home>/mlruns/`: a SQLite database (`mlflow.db`) with the artifacts beside it
(`mlruns/artifacts/`), unless a tracking server is named (`--tracking-uri`, MLFLOW_TRACKING_URI, or
`[tracking] uri` in a spec, in that order): then runs, models and the registry live there, and every
read goes through MLflow's client. One experiment per pipeline, one parent run per pipeline run, one
child run per model. Telemetry is off: the toolkit runs offline.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any


OFFLINE_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "GIT_PYTHON_REFRESH": "quiet"}


def model_saving():
    """Settings for saving a native model in MLflow's format in a worker. The requirements it is given are
    the running interpreter's own versions, so MLflow's check that they match the environment (a scan of
    every installed distribution's files, over a second per save) can only agree: skipped."""
    @contextlib.contextmanager
    def saving():
        for k, v in OFFLINE_ENV.items():
            os.environ.setdefault(k, v)
        import mlflow.utils.environment as environment
        check = environment.warn_dependency_requirement_mismatches
        environment.warn_dependency_requirement_mismatches = lambda requirements: None
        try:
            yield
        finally:
            environment.warn_dependency_requirement_mismatches = check
    return saving()


# A tracking server that went away should fail a run in seconds, not after MLflow's default seven
# retries with doubling waits (minutes); a user's own settings win.
REMOTE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


class TrackingUnreachable(RuntimeError):
    """The tracking server named does not answer: nothing was run."""
    user_error = True


def save_native_model(form: dict, path: Path, y_example) -> None:
    """The trained model in MLflow's format, as its framework module describes it (`Adapter.mlflow_form`:
    the flavor, the model, an example input, the pip requirements): MLflow's own flavor for each
    framework, and a python_function model for a jax function and its parameters."""
    import numpy as np
    from mlflow.models import infer_signature
    signature = infer_signature(form["example"], np.asarray(y_example) if form["flavor"] == "python_function"
                                else y_example)
    common = {"signature": signature, "pip_requirements": form["pip_requirements"],
              **({"input_example": form["example"]} if form["input_example"] else {}), **form.get("options", {})}
    if form["flavor"] == "keras":
        import mlflow.keras
        path.mkdir(parents=True)  # mlflow.keras writes its input example before it makes the folder
        mlflow.keras.save_model(form["model"], str(path), **common)
    elif form["flavor"] == "tensorflow":
        import mlflow.tensorflow
        mlflow.tensorflow.save_model(form["model"], str(path), **common)
    elif form["flavor"] == "pytorch":
        _mlflow_pytorch().save_model(form["model"], str(path), **common)
    elif form["flavor"] == "python_function":
        _save_function(form, path, common)
    else:
        raise ValueError(f"MLflow model flavor {form['flavor']!r}: expected keras, tensorflow, pytorch or "
                         f"python_function")


def _save_function(form: dict, path: Path, common: dict) -> None:
    """A function of a parameter pytree as a python_function model, its leaves in an .npz artifact."""
    import tempfile
    import mlflow.pyfunc
    import numpy as np

    class FunctionOfParameters(mlflow.pyfunc.PythonModel):  # local: cloudpickle keeps it by value, not by import
        def __init__(self, apply, restore, structure):
            self.apply, self.restore, self.structure, self.params = apply, restore, structure, None

        def load_context(self, context):
            import numpy as _np
            with _np.load(context.artifacts["params"]) as f:
                arrays = {int(k.split("_")[1]): f[k] for k in f.files}
            self.params = self.restore(self.structure, arrays)

        def predict(self, context, model_input, params=None):
            return self.apply(self.params, model_input)

    with tempfile.TemporaryDirectory() as tmp:
        params_file = Path(tmp) / form["params_file"]
        np.savez(params_file, **{f"leaf_{i}": v for i, v in enumerate(form["leaves"])})
        mlflow.pyfunc.save_model(str(path), python_model=FunctionOfParameters(form["apply"], form["restore"],
                                                                               form["structure"]),
                                 artifacts={"params": str(params_file)}, **common)


def _mlflow_pytorch():
    """mlflow.pytorch without its Lightning autologging: its import ends by trying pytorch_lightning,
    which costs seconds (most of the flavor's import time) and serves only autolog, never used here. A
    process that already has Lightning (the lightning style) keeps it."""
    import sys
    blocked = "pytorch_lightning" not in sys.modules and "mlflow.pytorch" not in sys.modules
    if blocked:  # a None entry makes that one import fail, and mlflow.pytorch swallows the ImportError
        sys.modules["mlflow.pytorch._lightning_autolog"] = None
    try:
        import mlflow.pytorch
    finally:
        if blocked:
            del sys.modules["mlflow.pytorch._lightning_autolog"]
    return mlflow.pytorch


def store_dir(home: Path) -> Path:
    return home / "mlruns"


def tracking_uri(home: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_dir(home) / 'mlflow.db'}"


def store_identity(home: Path) -> str:
    """Which tracking store a run is recorded in, as its record keeps it: the URI that was named, or
    the home's own mlruns/ (which moves with the home)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@contextlib.contextmanager
def pointed_at(uri: str | None):
    """A spec's `[tracking] uri` for the length of its run (workers inherit it), unless the user named
    one already (MLFLOW_TRACKING_URI, which --tracking-uri sets)."""
    if not uri or os.environ.get("MLFLOW_TRACKING_URI"):
        yield
        return
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)


def check_reachable(home: Path) -> str:
    """The tracking URI, after a tracking server named by it answered its /health (a local store always
    does); TrackingUnreachable, naming it, when it does not."""
    import urllib.error
    import urllib.request
    uri = tracking_uri(home)
    if not is_server(uri):
        return uri
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as r:
            if r.status == 200:
                return uri
            why = f"HTTP {r.status}"
    except urllib.error.HTTPError as e:
        why = f"HTTP {e.code} from its /health"
    except OSError as e:
        why = str(getattr(e, "reason", e))
    raise TrackingUnreachable(f"the MLflow tracking server {uri} does not answer ({why}): start it "
                              f"(python -m pipeline tracking-server), or name another with --tracking-uri or "
                              f"MLFLOW_TRACKING_URI; nothing was run and the local cache is as it was")


def configure(home: Path) -> str:
    import logging
    for k, v in {**OFFLINE_ENV, **REMOTE_ENV}.items():
        os.environ.setdefault(k, v)
    uri = check_reachable(home)  # a server that does not answer: said at once, not after MLflow's retries
    if not is_server(uri):
        store_dir(home).mkdir(parents=True, exist_ok=True)
    import mlflow
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Created version '1' of model ...": the run says it
    users = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # MLflow also writes these URIs into the environment, where tracking_uri() reads the user's choice:
    # left there, the first home configured in a process would be every later home's store too (and every
    # child process's). Put back what the user had.
    for k, v in users.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return uri


EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def registered_name(spec_name: str, model_name: str) -> str:
    """`<spec>-<model>`; a spec already named after its model (`export` names its spec export-<model>)
    keeps its own name rather than doubling the model's (export-net, not export-net-net)."""
    if spec_name == model_name or spec_name.endswith(f"-{model_name}"):
        return spec_name
    return f"{spec_name}-{model_name}"


# --------------------------------------------------------------------------- in the parent: the record

class Recorder:
    """Records one pipeline run. `prepare()` (import, store and experiment) can overlap the lanes."""

    def __init__(self, home: Path, experiment: str):
        self.home, self.experiment = home, experiment
        self.experiment_id: str | None = None

    def prepare(self) -> None:
        configure(self.home)
        import mlflow
        exp = mlflow.get_experiment_by_name(self.experiment)
        if exp is None:
            # a tracking server keeps the artifacts where it was told to (served through it); a local
            # store beside its database
            artifacts = None if is_server(tracking_uri(self.home)) else \
                (store_dir(self.home) / "artifacts" / self.experiment).resolve().as_uri()
            # the UI opens a "custom model development" experiment on its training-runs view, not GenAI's
            self.experiment_id = mlflow.create_experiment(self.experiment, artifact_location=artifacts,
                                                          tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            self.experiment_id = exp.experiment_id
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                mlflow.MlflowClient().set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self.stale = self._fail_interrupted_runs()

    def _fail_interrupted_runs(self) -> list[str]:
        """Runs of this home left RUNNING by a run that was killed while it logged: mark them FAILED.
        The caller holds the home's run lock, so no run of this home is logging now."""
        from mlflow import MlflowClient
        client = MlflowClient()
        stale = client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=200)
        ids = []
        for r in stale:
            if r.data.tags.get("pipeline.home") == str(self.home):
                client.set_tag(r.info.run_id, "pipeline.error", "interrupted: the run that logged it was killed "
                                                                 "before it finished")
                client.set_terminated(r.info.run_id, status="FAILED")
                ids.append(r.info.run_id)
        return ids

    def record(self, run: dict) -> dict:
        """Log a finished (or failed) pipeline run; returns the MLflow ids for the run record."""
        if self.experiment_id is None:
            self.prepare()
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param
        client = MlflowClient()
        now = int(time.time() * 1000)
        status = "FINISHED" if run["status"] == "passed" else "FAILED"
        cached = [s["name"] for s in run["stages"] if s["cached"]]
        tags = {"pipeline.spec": run["spec"], "pipeline.spec_hash": run["spec_hash"],
                "pipeline.code_version": run["code_version"], "pipeline.run_id": run["run_id"],
                "pipeline.home": str(self.home),
                "pipeline.cached_stages": ",".join(cached) or "none",
                "pipeline.status": run["status"]}
        if run.get("error"):
            tags["pipeline.error"] = run["error"][:5000]
        parent = client.create_run(self.experiment_id, run_name=f"{run['spec']}-{run['run_id']}",
                                   tags={**tags, "mlflow.note.content": _description(run)},
                                   start_time=int(run["started"] * 1000))
        pid = parent.info.run_id
        client.log_batch(pid, params=[Param(k, str(v)[:6000]) for k, v in run["params"].items()],
                         metrics=[Metric(f"time_{s['name'].replace(':', '_')}_s", s["elapsed_s"], now, 0)
                                  for s in run["stages"]] +
                         [Metric("time_total_s", run["elapsed_s"], now, 0)])
        client.log_dict(pid, run, "run_record.json")
        parity = _load_parity(run)
        if parity is not None:
            self._record_parity(client, pid, run, parity)
        ids = {"experiment_id": self.experiment_id, "parent_run_id": pid, "models": {},
               "tracking_store": store_identity(self.home)}
        for name, info in run["models"].items():
            ids["models"][name] = self._record_model(client, pid, run, name, info, tags)
        client.set_terminated(pid, status=status, end_time=int(time.time() * 1000))
        return ids

    def _record_model(self, client, parent_id: str, run: dict, name: str, info: dict, parent_tags: dict) -> dict:
        import mlflow
        from mlflow.entities import LoggedModelOutput, Metric, Param
        child_status = "FAILED" if info.get("error") else "FINISHED"
        tags = {**parent_tags, "mlflow.parentRunId": parent_id, "model.framework": info["framework"],
                "pipeline.status": "failed" if info.get("error") else run["status"]}
        if info.get("error"):
            tags["pipeline.error"] = info["error"][:5000]
        child = client.create_run(self.experiment_id, run_name=name, tags=tags,
                                  start_time=int(run["started"] * 1000))
        cid = child.info.run_id
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, 0) for k, v in info.get("metrics", {}).items()]
        metrics += [Metric("loss", float(v), now, step) for step, v in enumerate(info.get("loss_history", []))]
        params = [Param(k, str(v)[:6000]) for k, v in info["params"].items()]
        for start in range(0, max(len(metrics), 1), 1000):
            client.log_batch(cid, metrics=metrics[start:start + 1000], params=params if start == 0 else [])
        result: dict[str, Any] = {"run_id": cid}
        if info.get("tensorboard_dir"):  # the training's event files: `tensorboard --logdir` on a download
            client.log_artifacts(cid, info["tensorboard_dir"], "tensorboard")
        bundle = self._log_bundle(client, cid, info.get("bundle_dir"))
        if bundle:
            result["bundle"] = bundle
        parity = _load_parity(run)
        rows = [] if parity is None else \
            [r for r in parity["records"] if r["model"] == name and r["status"] != "skipped"]
        verdict = "passed" if rows and all(r["status"] == "passed" for r in rows) else "failed"
        if verdict == "passed" and not (parity or {}).get("discrimination", {}).get(name, {}).get("discriminative", True):
            verdict = "inconclusive"
        if parity is not None:
            client.log_batch(cid, metrics=[Metric(_metric_key(r, k), float(v), now, 0) for r in rows
                                           for k, v in (r.get("comparison") or {}).get("metrics", {}).items()
                                           if k in ("max_abs", "max_rel", "cosine", "top1_agreement")
                                           and isinstance(v, (int, float))][:1000])
            client.set_tag(cid, "parity.verdict", verdict)
            if verdict != "passed":
                child_status = "FAILED"
        model_dir = info.get("mlflow_model_dir")
        version = None
        if model_dir and Path(model_dir).is_dir():
            version, model_id = self._known_version(client, registered_name(run["spec"], name),
                                                    info.get("train_key"))
            if version is not None:  # the same trained model: link it, do not register a copy
                client.log_outputs(cid, models=[LoggedModelOutput(model_id, step=0)])
            else:
                logged = mlflow.initialize_logged_model(
                    name="model", source_run_id=cid, experiment_id=self.experiment_id,
                    model_type=info["framework"], tags={"framework": info["framework"]})
                client.log_outputs(cid, models=[LoggedModelOutput(logged.model_id, step=0)])
                client.log_model_artifacts(logged.model_id, model_dir)
                mlflow.finalize_logged_model(logged.model_id, "READY")
                model_id = logged.model_id
                if run["status"] == "passed":  # a failed run never registers a model version
                    version = mlflow.register_model(f"models:/{logged.model_id}",
                                                    registered_name(run["spec"], name))
        if version is not None:
            self._tag_version(client, version, run, info, rows, verdict, bundle)
            result.update(model_id=model_id, registered_model=version.name, version=version.version)
        client.set_terminated(cid, status=child_status, end_time=int(time.time() * 1000))
        return result


    @staticmethod
    def _tag_version(client, version, run: dict, info: dict, rows: list[dict], verdict: str,
                     bundle: dict | None) -> None:
        """The version's verdict follows the latest run of its trained model; the bundle it ships
        (what the gate checks and a deploy takes) changes only with a run that passed."""
        failed = sum(r["status"] == "failed" for r in rows)
        tags = {"pipeline.train_key": info.get("train_key", ""),
                "parity.verdict": verdict if run["status"] == "passed" or failed else "failed",
                "parity.summary": f"{len(rows) - failed} passed, {failed} failed"}
        served = [r for r in rows if r.get("format") == "tf_serving"]
        if served:  # blessed for TF Serving: the served answers matched over every transport
            tags["serving.blessed"] = "true" if all(r["status"] == "passed" for r in served) else "false"
        known = getattr(version, "tags", None) or {}
        registered = known.get("bundle.sha256")
        if run["status"] == "passed" and bundle and registered and registered != bundle["sha256"]:
            # what was verified and registered stays what the version ships: a rerun of the same trained
            # model whose converters made other bytes is noted, and changes nothing the gate reads
            differs = _rerun_differences(client, known.get("bundle.run_id"), info.get("bundle_dir"))
            tags = {"bundle.rerun_sha256": bundle["sha256"], "bundle.rerun_run_id": run["run_id"],
                    "bundle.rerun_differs": "\n".join(f"{f}: {why}" for f, why in differs.items())[:5000]}
            print(f"{version.name} version {version.version} keeps the bundle it was registered with "
                  f"({registered[:12]}); this run's bundle of the same model differs ({bundle['sha256'][:12]}) in "
                  + (", ".join(f"{f} ({why})" for f, why in differs.items()) or "its manifest"), flush=True)
        elif run["status"] == "passed" and bundle:
            tags.update({"bundle.run_id": bundle["run_id"], "bundle.sha256": bundle["sha256"],
                         "formats": ",".join(sorted(info.get("exports", {}))), "pipeline.run_id": run["run_id"],
                         "pipeline.spec_path": run["spec_path"], "framework": info["framework"]})
        for k, v in tags.items():
            client.set_model_version_tag(version.name, version.version, k, v)
        if "parity.verdict" in tags:
            client.update_model_version(version.name, version.version,
                                        description=_version_description(version.name, run, rows, tags["parity.verdict"]))
        client.set_registered_model_alias(version.name, "candidate", version.version)

    # A bundle (identified by the digest of its manifest) is logged once, in the child run that first
    # made it (tagged bundle.logged_sha256); later runs that made the same bytes point at that run. The
    # store itself is the index, so everyone who shares a tracking server shares it.
    def _log_bundle(self, client, child_id: str, bundle_dir: str | None) -> dict | None:
        if not bundle_dir or not Path(bundle_dir, "manifest.json").is_file():
            return None
        from exporters.bundle import manifest_digest
        sha = manifest_digest(Path(bundle_dir))
        holders = client.search_runs([self.experiment_id], f"tags.`bundle.logged_sha256` = '{sha}'",
                                     max_results=1, order_by=["attributes.start_time ASC"])
        if holders:
            holder = holders[0].info.run_id
            client.set_tag(child_id, "bundle.logged_in", holder)
            return {"run_id": holder, "sha256": sha, "reused": True}
        client.log_artifacts(child_id, bundle_dir, "bundle")
        client.set_tag(child_id, "bundle.logged_in", child_id)
        client.set_tag(child_id, "bundle.logged_sha256", sha)  # last: a run is a holder once its bundle is whole
        return {"run_id": child_id, "sha256": sha, "reused": False}

    # A trained model (identified by its train stage's cache key, the version's pipeline.train_key tag)
    # is registered once; later runs that reuse it from the cache, here or on a teammate's machine
    # sharing the tracking server, link to that version.
    @staticmethod
    def _known_version(client, registered: str, train_key: str | None):
        if not train_key:
            return None, None
        found = client.search_model_versions(f"name = '{registered}' and tags.`pipeline.train_key` = '{train_key}'",
                                             max_results=10)
        if not found:
            return None, None
        version = min(found, key=lambda v: int(v.version))
        # the store's search leaves model_id out; a version registered from a logged model has it as source
        model_id = version.model_id or (version.source.removeprefix("models:/")
                                        if (version.source or "").startswith("models:/m-") else None)
        return (version, model_id) if model_id else (None, None)

    def _record_parity(self, client, pid: str, run: dict, parity: dict) -> None:
        report_dir = Path(run["report_dir"])
        for name in ("parity.json", "parity.md", "junit.xml"):
            client.log_artifact(pid, str(report_dir / name), "parity")
        for png in sorted(report_dir.glob("*.png")):
            client.log_artifact(pid, str(png), "plots")
        table = {"model": [], "format": [], "variant": [], "runtime": [], "max_abs": [], "cosine": [],
                 "verdict": []}
        for r in parity["records"]:
            m = (r.get("comparison") or {}).get("metrics", {})
            for k, v in (("model", r["model"]), ("format", r["format"]), ("variant", r["variant"]),
                         ("runtime", r.get("runtime") or "-"), ("max_abs", m.get("max_abs")),
                         ("cosine", m.get("cosine")), ("verdict", r["status"].upper())):
                table[k].append(v)
        client.log_table(pid, data=table, artifact_file="parity/parity_table.json")
        client.set_tag(pid, "parity.verdict", parity.get("verdict") or ("passed" if parity["passed"] else "failed"))


def _load_parity(run: dict) -> dict | None:
    if not run.get("report_dir"):
        return None
    return json.loads((Path(run["report_dir"]) / "parity.json").read_text())


def _metric_key(record: dict, metric: str) -> str:
    runtime = (record.get("runtime") or "none").replace("-", "_")
    return f"parity.{record['format']}.{record['variant']}.{runtime}.{metric}"


def _description(run: dict) -> str:
    lines = [f"**Pipeline `{run['spec']}`**: {run['status'].upper()}", ""]
    for name, info in run["models"].items():
        shown = ", ".join(f"{k} = {v:.4f}" for k, v in info.get("metrics", {}).items())
        lines.append(f"- **{name}** ({info['framework']}): {shown or info.get('error', 'not trained')}")
    parity = _load_parity(run)
    if parity is not None:
        lines += ["", "**Parity** (every artifact in its own runtime vs the trained model):", "",
                  "| model | format | variant | runtime | max abs | verdict |", "|---|---|---|---|---|---|"]
        for r in parity["records"]:
            m = (r.get("comparison") or {}).get("metrics", {})
            shown = f"{m['max_abs']:.2e}" if isinstance(m.get("max_abs"), (int, float)) else "-"
            verdict = r["status"].upper() + (f" ({r.get('reason')})" if r["status"] == "skipped" else "")
            lines.append(f"| {r['model']} | {r['format']} | {r['variant']} | {r.get('runtime') or '-'} | "
                         f"{shown} | {verdict} |")
    if run.get("error"):
        lines += ["", f"Error: `{run['error'][:500]}`"]
    return "\n".join(lines)


def _version_description(name: str, run: dict, rows: list[dict], verdict: str) -> str:
    """What a reviewer reads first on the version's page: the verdict, every artifact's parity and
    profile, and where the plots are."""
    lines = [f"**Parity: {verdict.upper()}** ({sum(r['status'] == 'passed' for r in rows)} of {len(rows)} checks "
             f"passed) · pipeline run `{run['run_id']}` of spec `{run['spec']}`", "",
             "| format | variant | runtime | max abs | p50 ms at batch N | size KiB | verdict |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        m = (r.get("comparison") or {}).get("metrics", {})
        p = (r.get("details") or {}).get("profile") or {}
        latency = f"{p['max_batch']['p50_ms']:.3f} (N={p['max_batch']['rows']})" if "max_batch" in p else "-"
        size = f"{p['size_bytes'] / 1024:.1f}" if p.get("size_bytes") else "-"
        shown = f"{m['max_abs']:.2e}" if isinstance(m.get("max_abs"), (int, float)) else "-"
        lines.append(f"| {r['format']} | {r['variant']} | {r.get('runtime') or '-'} | {shown} | {latency} | {size} | "
                     f"{r['status'].upper()} |")
    lines += ["", f"Plots: `plots/parity_{name.rsplit('-', 1)[-1]}.png`, `plots/layers_*.png` (failed cells) and "
                  f"the training curves in the artifacts of the pipeline's MLflow run; `report.html` beside "
                  f"`parity.md` in the run's report folder."]
    return "\n".join(lines)


def _rerun_differences(client, registered_run: str | None, bundle_dir: str | None) -> dict[str, str]:
    """Which files of a rerun's bundle differ from the registered bundle's, and why."""
    import tempfile
    from mlflow.exceptions import MlflowException
    from exporters.bundle import MANIFEST, reproduction_differences
    if not registered_run or not bundle_dir:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(registered_run, f"bundle/{MANIFEST}", tmp)
        except (MlflowException, OSError):
            return {}
        registered = json.loads(Path(path).read_text())
    return reproduction_differences(registered, json.loads((Path(bundle_dir) / MANIFEST).read_text()))


class PromotionRefused(RuntimeError):
    """A model version whose parity verdict did not pass (or that does not exist)."""


def resolve_version(home: Path, ref: str):
    """NAME, NAME@ALIAS or NAME/VERSION (default alias: candidate) -> MLflow ModelVersion."""
    configure(home)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    client = MlflowClient()
    try:
        if "/" in ref:
            name, version = ref.split("/", 1)
            return client.get_model_version(name, version)
        name, _, alias = ref.partition("@")
        return client.get_model_version_by_alias(name, alias or "candidate")
    except MlflowException as e:
        raise LookupError(f"no registered model version '{ref}': {e.message.splitlines()[0]}") from None


def resolve_ref(home: Path, text: str):
    """The registry_ref.RegisteredVersion a `models:/NAME@ALIAS` or `models:/NAME/VERSION` reference
    names now; LookupError (with what is there) when there is none."""
    from . import registry_ref
    name, alias, number = registry_ref.parse(text)
    configure(home)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        names = [m.name for m in client.search_registered_models(max_results=50)]
        raise LookupError(f"{text}: no registered model {name!r} in {tracking_uri(home)} "
                          f"(registered: {', '.join(names) or 'none'})") from None
    if alias is not None:
        if alias not in (model.aliases or {}):
            raise LookupError(f"{text}: no alias {alias!r} on registered model {name!r} "
                              f"(aliases: {', '.join(model.aliases or {}) or 'none'})")
        number = int(model.aliases[alias])
    try:
        mv = client.get_model_version(name, str(number))
    except MlflowException:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'", max_results=200))
        raise LookupError(f"{text}: no version {number} of registered model {name!r} "
                          f"(versions: {', '.join(map(str, known)) or 'none'})") from None
    return registry_ref.RegisteredVersion(name, int(mv.version), mv.source, (mv.tags or {}).get("framework"))


def download_model_file(home: Path, ref, dest: Path, suffixes: tuple[str, ...]) -> Path:
    """The version's MLflow model folder downloaded into `dest`, and the model file in it that the
    framework's loader takes (a .keras file, a torch .pt2 or pickled .pth)."""
    configure(home)
    import mlflow
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{ref.name}/{ref.version}",
                                                     dst_path=str(dest)))
    found = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in suffixes)
    if not found:
        raise LookupError(f"models:/{ref.name}/{ref.version}: the MLflow model at {local} holds no "
                          f"{' or '.join(suffixes)} file (found {sorted(p.name for p in local.rglob('*'))[:10]})")
    return found[0]


def download_bundle(home: Path, run_id: str, dest: Path) -> Path:
    """The bundle logged in `run_id`, copied into `dest`; LookupError when the store has none."""
    configure(home)
    import mlflow
    from mlflow.exceptions import MlflowException
    dest.mkdir(parents=True, exist_ok=True)
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="bundle", dst_path=str(dest))
    except (MlflowException, OSError) as e:
        raise LookupError(f"the bundle of MLflow run {run_id} is missing from the store "
                          f"({str(e).splitlines()[0][:300]})") from None
    return Path(path)


def tag_gate_result(home: Path, version, status: str, gate_id: str, summary: str,
                    against: tuple[str, str, str] | None = None) -> None:
    """What the gate found about the version's own bundle becomes its verdict, both ways; with
    `against` (alias, verdict, what was compared), its comparison with that version too."""
    configure(home)
    from mlflow import MlflowClient
    client = MlflowClient()
    tags = {"gate.verdict": status, "gate.id": gate_id, "parity.summary": f"gate {gate_id}: {summary}"[:5000],
            "parity.verdict": status}
    if against:
        alias, verdict, note = against
        tags.update({"gate.against": alias, "gate.against.verdict": verdict,
                     "gate.against.summary": f"gate {gate_id}: {note}"[:5000]})
    for k, v in tags.items():
        client.set_model_version_tag(version.name, version.version, k, v)
    if against:  # the reviewer's page says what the last gate found, above the table
        described = client.get_model_version(version.name, version.version).description or ""
        kept = described.split("\n\n**Gate", 1)[0]
        client.update_model_version(version.name, version.version, description=(
            f"{kept}\n\n**Gate {gate_id} against {against[0]}: {against[1].upper()}** ({against[2]}): {summary}"))


def promote(home: Path, ref: str, alias: str = "production", force_reason: str | None = None) -> dict:
    """Move `alias` to the version `ref` names, only if its parity verdict passed and no gate against
    that alias failed (a failed comparison may be overridden with a reason, kept as a tag)."""
    from mlflow import MlflowClient
    mv = resolve_version(home, ref)
    verdict = mv.tags.get("parity.verdict", "missing")
    if verdict != "passed":
        raise PromotionRefused(f"{mv.name} version {mv.version}: parity verdict is '{verdict}' "
                               f"({mv.tags.get('parity.summary', 'no parity summary')}); "
                               f"only a version whose artifacts all passed parity can become '{alias}'")
    client = MlflowClient()
    if mv.tags.get("gate.against") == alias and mv.tags.get("gate.against.verdict") == "failed":
        if not force_reason:
            raise PromotionRefused(f"{mv.name} version {mv.version}: its gate against '{alias}' failed "
                                   f"({mv.tags.get('gate.against.summary', '')}); promote with --force --reason "
                                   f"\"...\" to override, the reason is kept with the version")
        client.set_model_version_tag(mv.name, mv.version, "promote.forced", force_reason[:5000])
    client.set_registered_model_alias(mv.name, alias, mv.version)
    return {"name": mv.name, "version": mv.version, "alias": alias, "summary": mv.tags.get("parity.summary")}


def latest_run_url(home: Path, base: str) -> str | None:
    """URL of the most recent pipeline run in the UI, or None when the store is empty."""
    configure(home)
    import mlflow
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`pipeline.run_id` != ''",
                              order_by=["start_time DESC"], max_results=50, output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        return None
    r = parents[0]
    # the machine-learning view of the run (MLflow 3 otherwise opens on its GenAI views)
    return (f"{base.rstrip('/')}/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}"
            f"?workflowType=machine_learning")


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
