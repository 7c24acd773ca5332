"""python -m edge: keys, packages and the agent's client from a shell (see edge/__init__.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agent"]:
        from .agent import main as agent_main
        return agent_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m edge")
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("init-keys", help="write an Ed25519 key pair into a folder")
    k.add_argument("folder", type=Path)
    p = sub.add_parser("package", help="build a signed edge package from a model bundle")
    p.add_argument("bundle", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--key", required=True, type=Path, help="the private key (PEM)")
    p.add_argument("--version", required=True, type=int)
    p.add_argument("--variants", default="fp32,fp16,int8")
    for name in ("push", "status", "rollback"):
        c = sub.add_parser(name)
        c.add_argument("url")
        if name == "push":
            c.add_argument("package", type=Path)
        c.add_argument("--token", default=os.environ.get("EDGE_AGENT_TOKEN"))
    sub.add_parser("agent", help="run the device agent (python -m edge agent --help)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "init-keys":
            from .keys import init_keys
            priv, pub = init_keys(args.folder)
            print(f"private key: {priv}\npublic key:  {pub}")
        elif args.cmd == "package":
            from .package import build_package
            out = build_package(args.bundle, args.out, args.key, version=args.version,
                                variants=[v for v in args.variants.split(",") if v])
            print(out)
        else:
            from .client import EdgeClient
            c = EdgeClient(args.url, args.token)
            result = c.push(args.package) if args.cmd == "push" else getattr(c, args.cmd)()
            print(json.dumps(result, indent=2))
    except Exception as e:  # noqa: BLE001 - one line for a person, exit 1
        print(f"edge: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
