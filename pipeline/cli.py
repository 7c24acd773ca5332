"""Command line: `python -m pipeline COMMAND`. Each command is a thin shell over pipeline.api."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Train in Keras and PyTorch, export to every format, verify parity, record in MLflow.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tracked = argparse.ArgumentParser(add_help=False)  # the commands that read or write MLflow
    tracked.add_argument("--tracking-uri", metavar="URI", default=None,
                         help="the MLflow tracking server (http://host:port) for this command; default "
                              "MLFLOW_TRACKING_URI, else the spec's [tracking] uri, else ./mlruns")

    r = sub.add_parser("run", parents=[tracked],
                       help="run a pipeline: a built-in spec name (see `list`) or a spec.toml")
    r.add_argument("spec", help="built-in spec name or path to a .toml spec")
    r.add_argument("--force", action="store_true", help="rerun every stage, ignoring the cache")
    r.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="rerun from this stage on (data, parity_set, train, reference, export, verify, report)")
    r.add_argument("--sequential", action="store_true", help="run the models one after another in-process "
                                                             "(the same as --executor inprocess)")
    r.add_argument("--executor", default=None, metavar="NAME",
                   help="where stages run: local (a process per framework, the default), inprocess or ray")
    r.add_argument("--address", default=None, metavar="ADDR",
                   help="the Ray cluster to run on (host:port; default RAY_ADDRESS, else a local one for the run)")
    r.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")

    ve = sub.add_parser("verify", parents=[tracked],
                        help="re-verify a past run's artifacts in every runtime (no retraining)")
    ve.add_argument("run", nargs="?", help="pipeline run id or MLflow run id (default: the latest)")
    ve.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")

    c = sub.add_parser("check", parents=[tracked],
                       help="release gate: exit 0 only if every artifact passes parity in every runtime")
    c.add_argument("target", help="spec name or .toml, a registered model version NAME[@ALIAS|/VERSION], "
                                  "or a bundle folder")
    c.add_argument("--out", default=None, help="folder for parity.json, junit.xml, summary.md (default: reports/)")
    c.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")
    c.add_argument("--against", metavar="ALIAS", help="also compare the version (for a spec: each model's new "
                                                      "candidate) with the model's version under ALIAS (e.g. "
                                                      "production): task metric, latency and size of every "
                                                      "artifact; for a spec, instead of its [gate] baseline")
    c.add_argument("--max-metric-drop", type=float, help="with --against: how much worse the task metric may be "
                                                          "(accuracy down, mse up; default 0.01)")
    c.add_argument("--max-latency-ratio", type=float, help="with --against: candidate / baseline latency p50 "
                                                            "(default 1.5)")
    c.add_argument("--max-size-ratio", type=float, help="with --against: candidate / baseline size (default 1.25)")

    pr = sub.add_parser("promote", parents=[tracked],
                        help="move the 'production' alias to a version whose parity passed")
    pr.add_argument("model", help="NAME, NAME@ALIAS or NAME/VERSION (default alias: candidate)")
    pr.add_argument("--alias", default="production")
    pr.add_argument("--force", action="store_true", help="promote although its gate against the alias failed")
    pr.add_argument("--reason", help="with --force: why (kept as the version's promote.forced tag)")

    d = sub.add_parser("diff", help="changes in metrics and parity between two runs")
    d.add_argument("run_a")
    d.add_argument("run_b")

    ex = sub.add_parser("export", parents=[tracked],
                        help="a model file in (.keras, .h5, .pt, .pth, .pt2), every format out, each verified")
    ex.add_argument("model", help="the trained model's file")
    ex.add_argument("--example", metavar="INPUTS.npz", help="real inputs: an array x (and y, to score the model)")
    ex.add_argument("--formats", help="comma-separated formats (default: all five)")
    ex.add_argument("--task", choices=("regression", "classification"), default="regression",
                    help="classification judges artifacts by top-1 agreement too")
    ex.add_argument("--factory", help="module:function that builds the module, for a torch state dict")
    ex.add_argument("--tolerance", action="append", default=[], metavar="KEY=FIELD:VALUE[,FIELD:VALUE]",
                    help="a tolerance override, as [parity.tolerances] in a spec: KEY is a variant (fp32), a "
                         "format (litert) or both (litert-int8); e.g. fp32=atol:1e-4 (repeatable)")
    ex.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")

    sub.add_parser("list", help="list the built-in specs")

    s = sub.add_parser("show", help="print a run's stages, timings and metrics (default: the latest)")
    s.add_argument("run", nargs="?", help="pipeline run id or MLflow run id")

    u = sub.add_parser("ui", parents=[tracked], help="start the MLflow UI on 127.0.0.1 against this store, or "
                                                     "print the tracking server's address")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--host", default="127.0.0.1")

    tb = sub.add_parser("tensorboard", help="start TensorBoard on 127.0.0.1 against a run's training event files")
    tb.add_argument("run", nargs="?", help="pipeline run id or MLflow run id (default: the latest)")
    tb.add_argument("--port", type=int, default=6006, help="0: any free one")
    tb.add_argument("--host", default="127.0.0.1")

    sv = sub.add_parser("serve", parents=[tracked],
                        help="serve a run's TF Serving deployment locally (TF Serving's gRPC and REST API) "
                             "until interrupted")
    sv.add_argument("target", nargs="?", help="a spec (run first; cached runs cost nothing), a run id (default: "
                                             "the latest run), or a registered version (models:/NAME@ALIAS, NAME/VERSION)")
    sv.add_argument("--port", type=int, default=8500, help="gRPC port (0: any free one)")
    sv.add_argument("--rest_api_port", type=int, default=8501, help="REST port (0: any free one)")
    sv.add_argument("--host", default="127.0.0.1")

    k = sub.add_parser("keys", help="the key edge packages are signed with")
    k.add_argument("action", choices=["init", "show"], help="init: write the key pair; show: print the public key")

    dp = sub.add_parser("deploy", help="push a run's models to an edge device (signed package, on-device parity)")
    dp.add_argument("run", nargs="?", help="pipeline run id (default: the latest)")
    dp.add_argument("--to", required=True, action="append", help="device name in the devices file (repeatable)")
    dp.add_argument("--devices", required=True, help="the devices file (TOML)")
    dp.add_argument("--variants", default=None, help="the LiteRT variants to ship, comma-separated (default: all)")

    st = sub.add_parser("stage", help="run one stage of a spec (its inputs from the cache or PIPELINE_STORE): "
                                      "what a Kubeflow component runs")
    st.add_argument("spec")
    st.add_argument("name", help="the stage, as a run lists it (data, train:keras, verify:torch:onnx, report)")

    co = sub.add_parser("compile", help="write the spec's stage graph for another engine: a Kubeflow Pipelines "
                                        "v2 pipeline (one component per stage)")
    co.add_argument("spec")
    co.add_argument("--to", required=True, choices=["kfp"], help="the engine")
    co.add_argument("out", help="the pipeline YAML to write")
    co.add_argument("--image", default=None, help="the toolkit's image the components run (default "
                                                  "train-to-edge:latest, as the Dockerfile builds it)")
    co.add_argument("--store", default=None, help="the shared store every task reaches (s3://BUCKET/PREFIX; "
                                                  "default PIPELINE_STORE)")

    rc = sub.add_parser("run-compiled", help="run a compiled Kubeflow pipeline's tasks on this machine, in "
                                             "graph order, each one's command and environment as the YAML says")
    rc.add_argument("yaml")

    xp = sub.add_parser("explain", help="where an artifact first disagrees with its original: a run's failed "
                                        "cells, or --file ARTIFACT --model ORIGINAL --example INPUTS.npz "
                                        "(a per-layer table, a plot and a minimal repro)")
    xp.add_argument("run", nargs="?", help="a run id (default: the latest run)")
    xp.add_argument("--artifact", metavar="LABEL", help="one artifact of the run, e.g. keras/litert-fp16")
    xp.add_argument("--file", metavar="ARTIFACT", help="an artifact made anywhere: .onnx, .tflite, TorchScript .pt, "
                                                      "a SavedModel or a TF.js folder")
    xp.add_argument("--model", metavar="ORIGINAL", help="with --file: the model it was converted from (.keras, .h5, .pt, .pt2)")
    xp.add_argument("--example", metavar="INPUTS.npz", help="with --file: inputs to run both on (an array x)")
    xp.add_argument("--variant", default="fp32", help="whose tolerance applies: a precision parity has one for "
                                                      "(fp32 and the quantized variants)")
    xp.add_argument("--tolerance", action="append", default=[], metavar="KEY=FIELD:VALUE[,FIELD:VALUE]",
                    help="a tolerance override, as for `export`")
    xp.add_argument("--out", metavar="DIR", help="with --file: where the table, plot and repro go "
                                                 "(default: explain-<artifact name>)")

    ts = sub.add_parser("tracking-server", help="start a team's MLflow tracking server: PostgreSQL as its store "
                                                "(the cluster kept in --store), artifacts served through it")
    ts.add_argument("--store", default="tracking-server", help="the folder of the PostgreSQL cluster, the logs and "
                                                               "(without --artifacts) the artifacts; made on first start")
    ts.add_argument("--artifacts", default="", metavar="URI", help="where artifacts go: s3://BUCKET/PREFIX (the "
                                                                   "server's AWS_* / MLFLOW_S3_ENDPOINT_URL settings) "
                                                                   "or a shared folder (default: STORE/artifacts)")
    ts.add_argument("--host", default="127.0.0.1", help="the interface to listen on (default: loopback only)")
    ts.add_argument("--port", type=int, default=5000)
    ts.add_argument("--workers", type=int, default=2, help="the server's worker processes")

    v = sub.add_parser("validate", help="check a spec, its data and its model factories without running it")
    v.add_argument("spec")
    v.add_argument("--quick", action="store_true", help="skip building the models (no framework import)")
    return p


def main(argv: list[str] | None = None) -> int:
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... | head` ends the output quietly
    args = build_parser().parse_args(argv)
    from .cache import CacheError
    from .gate import GateError
    from .spec import SpecError
    from .tracking import TrackingUnreachable
    if getattr(args, "tracking_uri", None):  # this process's and every worker's, as MLflow reads it
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    try:
        return COMMANDS[args.command](args)
    except (SpecError, CacheError, TrackingUnreachable) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except GateError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return EXIT_FAILED
    except LookupError as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def exit_code(record: dict) -> int:
    if record["status"] == "passed":
        return EXIT_OK
    return EXIT_USAGE if record.get("error_kind") == "usage" else EXIT_FAILED


def cmd_run(args) -> int:
    from . import api
    record = api.run(args.spec, force=args.force, from_stage=args.from_stage, parallel=not args.sequential,
                     track=not args.no_track, executor=args.executor, address=args.address)
    print_summary(record)
    return exit_code(record)


def cmd_stage(args) -> int:
    from .api import home_dir
    from .one_stage import run_one
    from .verdict import verdict_error
    result = run_one(args.spec, args.name, home_dir())
    if result.error:
        print(f"error: stage {result.name}: {result.error}", file=sys.stderr)
        return EXIT_USAGE if result.error_kind == "usage" else EXIT_FAILED
    failed = verdict_error(result.facts) if result.kind == "report" else None
    if failed:  # the report stage is the run's verdict: a pipeline of stages fails where a run would
        print(f"error: {failed}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_compile(args) -> int:
    from . import kubeflow
    out = Path(args.out)
    the_plan = kubeflow.compile_to(args.spec, out, image=args.image or kubeflow.DEFAULT_IMAGE, store=args.store)
    print(f"{out}: Kubeflow Pipelines v2 pipeline {the_plan['name']!r}, {len(the_plan['stages'])} components "
          f"(image {the_plan['image']}, store {the_plan['env']['PIPELINE_STORE']})")
    return EXIT_OK


def cmd_run_compiled(args) -> int:
    from . import kubeflow
    from .api import home_dir
    rows = kubeflow.run_compiled(Path(args.yaml), home_dir())
    for row in rows:
        print(f"  {row['stage']:<30} exit {row['exit_code']}  {row['seconds']:7.2f} s")
    failed = next((r for r in rows if r["exit_code"] != 0), None)
    if failed:
        print(f"error: task {failed['task']} (stage {failed['stage']}) exited {failed['exit_code']}; the tasks "
              f"after it did not run", file=sys.stderr)
        return EXIT_FAILED
    print(f"{len(rows)} tasks ran")
    return EXIT_OK


def cmd_verify(args) -> int:
    from . import api
    record = api.verify(args.run, track=not args.no_track)
    print_summary(record)
    return exit_code(record)


def cmd_export(args) -> int:
    from . import api
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    record = api.export(args.model, example=args.example, formats=formats, task=args.task, factory=args.factory,
                        tolerances=parse_tolerances(args.tolerance), track=not args.no_track)
    print_summary(record)
    return exit_code(record)


def parse_tolerances(items: list[str]) -> dict[str, dict[str, float]]:
    """["fp32=atol:1e-4", "litert-int8=atol:0.2,min_top1_agreement:0.9"] -> {"fp32": {"atol": 1e-4}, ...}"""
    from .spec import SpecError
    out: dict[str, dict[str, float]] = {}
    for item in items:
        key, sep, fields = item.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            out.setdefault(key, {}).update({f: float(v) for f, v in (p.split(":", 1) for p in fields.split(","))})
        except ValueError:
            raise SpecError(f"--tolerance {item}: expected KEY=FIELD:VALUE[,FIELD:VALUE], e.g. fp32=atol:1e-4") from None
    return out


def cmd_explain(args) -> int:
    from parity.localize import one_line
    from . import api, explain
    if args.file:
        if not (args.model and args.example):
            print("error: explain --file needs --model ORIGINAL and --example INPUTS.npz too", file=sys.stderr)
            return EXIT_USAGE
        out = Path(args.out or f"explain-{Path(args.file).name}")
        loc = explain.explain_file(args.file, args.model, args.example, out=out, variant=args.variant,
                                   tolerances=parse_tolerances(args.tolerance))
        print(one_line(loc, loc["format"]))
        print_layers(loc)
        print(f"table: {out / 'localization.json'}  plot: {out / 'layers.png'}"
              + (f"  repro: {loc['repro']} (python repro.py there)" if loc.get("repro") else ""))
        return EXIT_FAILED if loc.get("layer") else EXIT_OK
    failed = explain.explain_run(api.load_record(args.run), args.artifact)
    if not failed:
        print("no failed artifact in this run" + (f" for {args.artifact}" if args.artifact else ""))
        return EXIT_OK
    for r in failed:
        loc = (r.get("details") or {}).get("localization") or {"note": "not localised (it failed to load or run)"}
        print(f"{r['label']} on {r.get('runtime') or '-'}: {one_line(loc, r['format'])}")
        print_layers(loc)
    return EXIT_FAILED


def print_layers(loc: dict) -> None:
    """The per-layer table of a localization: the original's layers in order, each with its pair."""
    rows = loc.get("layers") or []
    if not rows:
        return
    width = max(len(p["layer"]) for p in rows)
    print(f"  {'layer':<{width}}  {'max abs':>9}  {'allowed':>9}  {'cosine':>9}  matched by  artifact tensor")
    for p in rows:
        mark = "  <- first diverges" if p["layer"] == loc.get("layer") else ""
        if p["matched_by"] == "unmatched":
            print(f"  {p['layer']:<{width}}  {'-':>9}  {'-':>9}  {'-':>9}  unmatched")
            continue
        print(f"  {p['layer']:<{width}}  {p['max_abs']:9.2e}  {p['allowed']:9.2e}  {p['cosine']:9.6f}  "
              f"{p['matched_by'] + (' ' + p['layout'] if p.get('layout') else ''):<10}  {p['node']}{mark}")


def cmd_check(args) -> int:
    from pathlib import Path
    from . import api
    thresholds = {k: v for k in ("max_metric_drop", "max_latency_ratio", "max_size_ratio")
                  if (v := getattr(args, k)) is not None}
    record = api.check(args.target, out_dir=Path(args.out) if args.out else None, track=not args.no_track,
                       against=args.against, thresholds=thresholds)
    print_summary(record)
    print(f"gate reports: {record['reports']}/parity.json, junit.xml, summary.md")
    return exit_code(record)


def cmd_promote(args) -> int:
    from . import api, tracking
    if args.force and not args.reason:
        print("error: --force needs --reason \"...\" (kept with the version)", file=sys.stderr)
        return EXIT_USAGE
    try:
        done = tracking.promote(api.home_dir(), args.model, args.alias, args.reason if args.force else None)
    except tracking.PromotionRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{done['name']} version {done['version']} is now '{done['alias']}' (parity: {done['summary']})")
    return EXIT_OK


def cmd_diff(args) -> int:
    from . import api
    rows = api.diff(args.run_a, args.run_b)
    if not rows:
        print(f"no changes in metrics or parity between {args.run_a} and {args.run_b}")
        return EXIT_OK
    width = max(len(r[1]) for r in rows)
    print(f"{'':8} {'what':<{width}}  {'A':<28}  B")
    for section, what, va, vb in rows:
        fa = f"{va:.6g}" if isinstance(va, float) else str(va)
        fb = f"{vb:.6g}" if isinstance(vb, float) else str(vb)
        delta = f"  ({vb - va:+.3g})" if isinstance(va, float) and isinstance(vb, float) else ""
        print(f"{section:8} {what:<{width}}  {fa:<28}  {fb}{delta}")
    return EXIT_OK


def print_summary(record: dict) -> None:
    print()
    for name, info in record["models"].items():
        if "metrics" in info:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in info["metrics"].items())
            print(f"{name:>8} ({info['framework']}): {shown}")
    cached = sum(1 for s in record["stages"] if s["cached"])
    print(f"{record['status'].upper()}: {len(record['stages'])} stages ({cached} cached) in "
          f"{record['elapsed_s']:.1f} s; run {record['run_id']}"
          + (f", MLflow run {record['mlflow']['parent_run_id']}" if record.get("mlflow") else ""))
    if record.get("error"):
        print(f"error: {record['error']}", file=sys.stderr)


def cmd_list(args) -> int:
    from .spec import builtin_specs, load
    for name, path in builtin_specs().items():
        spec = load(str(path))
        desc = spec.raw.get("pipeline", {}).get("description", "")
        models = ", ".join(f"{m.name} ({m.framework})" for m in spec.models)
        print(f"{name:<10} {desc}\n{'':<10} models: {models}; formats: {', '.join(spec.formats)}")
    return EXIT_OK


def cmd_show(args) -> int:
    from . import api
    rec = api.load_record(args.run)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["started"]))
    print(f"run {rec['run_id']}  spec {rec['spec']}  {rec['status'].upper()}  started {started}  "
          f"{rec['elapsed_s']:.1f} s")
    if rec.get("mlflow"):
        print(f"MLflow parent run {rec['mlflow']['parent_run_id']} (experiment {rec['mlflow']['experiment_id']})")
    print(f"\n{'stage':<26} {'process':<11} {'status':<8} {'seconds':>8}  summary")
    for s in rec["stages"]:
        status = "FAILED" if s["error"] else ("cached" if s["cached"] else "ran")
        print(f"{s['name']:<26} {s['lane'] or 'main':<11} {status:<8} {s['elapsed_s']:8.2f}  "
              f"{s['facts'].get('summary', s['error'] or '')}")
    print()
    for name, info in rec["models"].items():
        shown = "  ".join(f"{k}={v:.4f}" for k, v in info.get("metrics", {}).items())
        print(f"model {name} ({info['framework']}): {shown or info.get('error', '')}")
    if rec.get("error"):
        print(f"\nerror: {rec['error']}")
    return EXIT_OK


def cmd_serve(args) -> int:
    """`python -m serving` on the deployment's config, in the foreground: the same server the blessing
    used, with TF Serving's own flags."""
    import json
    import os
    import subprocess
    import tempfile
    from serving.deploy import local_config
    from . import api
    folder = api.deployment_of(args.target)
    examples = json.loads((folder / "examples.json").read_text()) if (folder / "examples.json").is_file() else {}
    config = local_config(folder, Path(tempfile.mkdtemp(prefix="serve-")) / "models.local.config")
    argv = [sys.executable, "-m", "serving", f"--port={args.port}", f"--rest_api_port={args.rest_api_port}",
            f"--host={args.host}", f"--model_config_file={config}"]
    print(f"serving {folder}", flush=True)
    for model, body in examples.items():
        port = args.rest_api_port or "<rest port>"
        print(f"  try: curl -s -X POST -d '{json.dumps(body)}' http://{args.host}:{port}/v1/models/{model}:predict",
              flush=True)
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(argv, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        return 130


def cmd_keys(args) -> int:
    from . import keys
    if args.action == "init":
        try:
            private, public = keys.init()
        except FileExistsError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"signing key: {private}\npublic key (give it to each device agent): {public}")
        return EXIT_OK
    public = keys.public_key_path()
    if not public.is_file():
        print(f"error: no key yet at {public}: run `python -m pipeline keys init`", file=sys.stderr)
        return EXIT_USAGE
    print(public.read_text(), end="")
    return EXIT_OK


def cmd_deploy(args) -> int:
    """The run's bundles to each device named: signed packages, the device's own parity check, its report."""
    import json
    from edge.deploy import TargetError, deploy, settings
    from exporters.bundle import read_bundle
    from . import api, keys
    record = api.load_record(args.run)
    bundles = [read_bundle(Path(s["path"]) / "bundle") for s in record["stages"] if s["name"].startswith("bundle:")]
    if not bundles:
        raise LookupError(f"run {record['run_id']} has no bundles (it failed before its bundle stages?)")
    try:
        s = settings({"devices": str(Path(args.devices).resolve()), "targets": args.to,
                      **({"variants": args.variants.split(",")} if args.variants else {})})
        out = api.work_dir(api.home_dir()) / "deploys" / f"{record['run_id']}-{int(time.time())}"
        result = deploy(bundles, s, out, keys.private_key_path())
    except TargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    failed = [r for r in result["records"] if r.get("status") != "passed"]
    for r in result["records"]:
        lat = (r.get("details") or {}).get("latency") or {}
        p50 = f"  p50 {lat['p50_ms']:.3f} ms p99 {lat['p99_ms']:.3f} ms" if "p50_ms" in lat else ""
        why = "" if r.get("status") == "passed" else f"  {r.get('message') or r.get('error') or ''}"  # which, and why
        print(f"{r['runtime']:<16} {r['model']}/{r['variant']:<5} {r['status'].upper()}{p50}{why}")
    (out / "deploy.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"report: {out / 'deploy.json'}")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_tracking_server(args) -> int:
    from .tracking_server import Settings, TrackingServerError, serve
    try:
        return serve(Settings(store=Path(args.store).resolve(), host=args.host, port=args.port,
                              artifacts=args.artifacts, workers=args.workers))
    except TrackingServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def cmd_ui(args) -> int:
    import signal
    import subprocess
    from . import api, tracking
    home = api.home_dir()
    uri = tracking.configure(home)
    if tracking.is_server(uri):  # the tracking server is the UI: nothing to start
        url = tracking.latest_run_url(home, uri)
        print(f"MLflow UI: {uri}  (the tracking server)")
        print(f"latest run: {url}" if url else "no runs yet: `python -m pipeline run toy`")
        return EXIT_OK
    artifacts = tracking.store_dir(home) / "artifacts"
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--default-artifact-root", artifacts.resolve().as_uri()]
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, **tracking.OFFLINE_ENV})

    def stop(*_):  # the UI's workers live in its process group: end the group, on Ctrl-C or SIGTERM
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        sys.exit(EXIT_OK)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        print(f"starting the MLflow UI on http://{args.host}:{args.port} (store {uri}) ...", flush=True)
        url = tracking.latest_run_url(home, f"http://{args.host}:{args.port}")
        if not _wait_for_health(f"http://{args.host}:{args.port}/health", proc, timeout=180):
            print(f"error: the MLflow UI exited with code {proc.returncode} before it answered", file=sys.stderr)
            return EXIT_FAILED
        print(f"MLflow UI: http://{args.host}:{args.port}  (store {uri})")
        print(f"latest run: {url}" if url else "no runs yet: `python -m pipeline run toy`")
        print("Ctrl-C to stop", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        stop()
    return EXIT_OK


def cmd_tensorboard(args) -> int:
    """TensorBoard on the run's event files, one run group per model, until Ctrl-C, SIGTERM or SIGHUP."""
    import signal
    from . import api, tensorboard
    record = api.load_record(args.run)
    try:
        dirs = tensorboard.event_dirs(record)
    except tensorboard.NoEventFiles as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    def leave(*_):  # unwinds through start() or the finally below, which end TensorBoard's process group
        raise SystemExit(EXIT_OK)
    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGHUP, leave)
    print(f"starting TensorBoard on {args.host}:{args.port} ...", flush=True)
    try:
        board = tensorboard.start(dirs, host=args.host, port=args.port)
    except tensorboard.TensorBoardFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    try:
        print(f"TensorBoard: {board.url.rstrip('/')} (run {record['run_id']}, models {', '.join(dirs)})")
        print("Ctrl-C to stop", flush=True)
        code = board.proc.wait()
        print(f"error: TensorBoard exited with code {code}:\n{board.log_tail()}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        board.stop()


def _wait_for_health(url: str, proc, timeout: float) -> bool:
    """Poll the server until it answers (True), it exits (False) or `timeout` passes (False)."""
    import urllib.request
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            time.sleep(0.3)
    return False


def cmd_validate(args) -> int:
    from . import api
    if not args.quick:
        print("checking the spec, its data and each model factory (imports each model's framework) ...",
              flush=True)
    facts = api.validate(args.spec, models=not args.quick)
    spec = facts["spec"]
    print(f"{spec.path}: ok ({len(spec.models)} models, formats {', '.join(spec.formats)}; data: "
          f"{facts['rows']} training rows, input {facts['input_shape'] if isinstance(facts['input_shape'], dict) else tuple(facts['input_shape'])}, "
          f"{facts['n_outputs']} output(s))")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "export": cmd_export, "verify": cmd_verify, "check": cmd_check, "promote": cmd_promote, "diff": cmd_diff, "list": cmd_list, "show": cmd_show, "ui": cmd_ui, "tensorboard": cmd_tensorboard, "serve": cmd_serve, "keys": cmd_keys, "deploy": cmd_deploy, "validate": cmd_validate, "stage": cmd_stage, "compile": cmd_compile, "run-compiled": cmd_run_compiled,
            "explain": cmd_explain, "tracking-server": cmd_tracking_server}
