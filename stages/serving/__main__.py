"""Command line of the served model: ``python -m stages.serving build --arch vit --method recast``
builds and registers ``recast-serve.<arch>.<method>`` (alias ``current``) from the stage
outputs named in params.yaml and the registered payloads (``stages.serving.build``); the
store is MLFLOW_TRACKING_URI, else the embedded one. Serve it with ``mlflow models serve -m
models:/recast-serve.vit.recast@current --env-manager local``."""

from __future__ import annotations

import argparse
import json

from stages.config.common import read_params, resolve, validate_section
from stages.config.params import TuneParams
from stages.serving.build import build


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.serving", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="log and register the served model of one arch and method")
    b.add_argument("--arch", required=True)
    b.add_argument("--method", default="recast")
    b.add_argument("--tasks", default=None, help="comma-separated; default: every registered task")
    b.add_argument("--alias", default="current", help="payload alias to serve (current or best)")
    b.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    p = validate_section("tune", TuneParams, read_params(args.params))
    if args.arch not in p.archs:
        ap.error(f"--arch {args.arch!r}: not one of tune.archs {p.archs}")
    out = build(args.arch, args.method, resolve(p.pretrain_dir), resolve(p.mimic_dir), p.train_for(args.arch).image_size,
                args.tasks.split(",") if args.tasks else None, args.alias)
    print(json.dumps({k: out[k] for k in ("name", "version", "model_uri")} | {"tasks": list(out["config"]["payloads"])}))


if __name__ == "__main__":
    main()
