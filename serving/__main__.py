"""`python -m serving`: the local TF Serving stand-in, with tensorflow_model_server's own flags.

  python -m serving --port=8500 --rest_api_port=8501 --model_name=m --model_base_path=/models/m
  python -m serving --model_config_file=models.config --enable_batching --batching_parameters_file=b.config

--port 0 picks a free gRPC port; --rest_api_port 0 disables REST, as in tensorflow_model_server (the
default here is 8501, the port the tensorflow/serving image uses). The bound addresses are printed on
stdout ("Running gRPC ModelServer at HOST:PORT ...", "Exporting HTTP/REST API at:HOST:PORT ...").
SIGINT / SIGTERM stop the server cleanly (exit 0). A bad flag or config exits 2 with the reason.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


def _bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--port", type=int, default=8500, help="gRPC port (0: pick a free one). Default 8500")
    p.add_argument("--rest_api_port", type=int, default=8501, help="REST port (0: no REST). Default 8501")
    p.add_argument("--host", default="127.0.0.1", help="address both servers bind. Default 127.0.0.1")
    p.add_argument("--model_name", default=None, help="name of the model (with --model_base_path). Default 'default'")
    p.add_argument("--model_base_path", default=None, help="folder holding the model's integer version folders")
    p.add_argument("--model_config_file", default=None, help="ModelServerConfig text proto (several models, "
                   "version policies, version labels)")
    p.add_argument("--enable_batching", nargs="?", const=True, default=False, type=_bool,
                   help="batch concurrent Predict calls on the same version")
    p.add_argument("--batching_parameters_file", default=None, help="BatchingParameters text proto "
                   "(max_batch_size, batch_timeout_micros, num_batch_threads)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                   help="how often to look for new versions (0: only at start). Default 1")
    p.add_argument("--model_config_file_poll_wait_seconds", type=float, default=0,
                   help="how often to re-read --model_config_file and apply it (models added, removed, "
                   "changed); 0: only at start. Default 0")
    p.add_argument("--monitoring_config_file", default=None, help="MonitoringConfig text proto; with "
                   "prometheus_config { enable: true } the REST port serves Prometheus metrics (path default "
                   "/monitoring/prometheus/metrics)")
    p.add_argument("--rest_api_enable_cors_support", nargs="?", const=True, default=False, type=_bool,
                   help="add TF Serving's CORS headers (Access-Control-Allow-Origin: *, -Methods: POST, GET, "
                   "-Headers: Content-Type) to every /v1/ answer. Default false")
    p.add_argument("--max_request_bytes", type=int, default=None,
                   help="largest REST request body; larger ones get HTTP 413. Default 64 MiB")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from serving.models import ConfigError
    from serving.server import DEFAULT_MAX_REQUEST_BYTES, LocalServer

    def out(line: str) -> None:
        print(line, flush=True)

    try:
        server = LocalServer(args.model_name, args.model_base_path, model_config_file=args.model_config_file,
                             port=args.port, rest_api_port=args.rest_api_port or None, host=args.host,
                             enable_batching=args.enable_batching,
                             batching_parameters_file=args.batching_parameters_file,
                             file_system_poll_wait_seconds=args.file_system_poll_wait_seconds,
                             model_config_file_poll_wait_seconds=args.model_config_file_poll_wait_seconds,
                             max_request_bytes=args.max_request_bytes or DEFAULT_MAX_REQUEST_BYTES, log=out,
                             monitoring_config_file=args.monitoring_config_file,
                             rest_api_enable_cors_support=args.rest_api_enable_cors_support)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = threading.Event()

    def on_signal(signum, frame):
        done.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        server.start()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        while not done.wait(0.5):
            pass
    finally:
        out("Shutting down ...")
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
