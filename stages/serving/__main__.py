"""Command line of the served model: ``python -m stages.serving build --arch vit --method recast``
builds and registers ``recast-serve.<arch>.<method>`` (alias ``current``) from the stage
outputs named in params.yaml and the registered payloads (``stages.serving.build``); the
store is MLFLOW_TRACKING_URI, else the embedded one. Serve it with ``mlflow models serve -m
models:/recast-serve.vit.recast@current --env-manager local``, or on Ray Serve with ``serve run
infra/serve/recast-serve.yaml`` (``stages.serving.ray_app``). ``python -m stages.serving example
--tasks a,b`` writes ``request.json``: test images of the prepared tasks as base64 PNG
(``stages.serving.example``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages.config.common import read_params, resolve, validate_section
from stages.config.params import TuneParams
from stages.serving.build import build
from stages.serving.example import example_request
from stages.serving.pyfunc import DEFAULT_MAX_ROWS


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.serving", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="log and register the served model of one arch and method")
    b.add_argument("--arch", required=True)
    b.add_argument("--method", default="recast")
    b.add_argument("--tasks", default=None, help="comma-separated; default: every registered task")
    b.add_argument("--alias", default="current", help="payload alias to serve (current or best)")
    b.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                   help=f"most rows one request may hold (default {DEFAULT_MAX_ROWS})")
    b.add_argument("--params", default="params.yaml")
    e = sub.add_parser("example", help="write an example request (base64 PNG images of prepared test rows)")
    e.add_argument("--tasks", required=True, help="comma-separated prepared tasks")
    e.add_argument("--rows", type=int, default=2, help="rows per task (default 2)")
    e.add_argument("--out", default="request.json")
    e.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    p = validate_section("tune", TuneParams, read_params(args.params))
    if args.command == "example":
        body = example_request(resolve(p.data_dir), args.tasks.split(","), args.rows)
        Path(args.out).write_text(json.dumps(body))
        print(f"wrote {args.out}: {len(body['dataframe_records'])} rows of {args.tasks} from {resolve(p.data_dir)}")
        return
    if args.arch not in p.archs:
        ap.error(f"--arch {args.arch!r}: not one of tune.archs {p.archs}")
    out = build(args.arch, args.method, resolve(p.pretrain_dir), resolve(p.mimic_dir), p.train_for(args.arch).image_size,
                args.tasks.split(",") if args.tasks else None, args.alias, data_dir=resolve(p.data_dir),
                max_rows=args.max_rows)
    print(json.dumps({k: out[k] for k in ("name", "version", "model_uri")} | {"tasks": list(out["config"]["payloads"])}))


if __name__ == "__main__":
    main()
