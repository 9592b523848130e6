"""The coefficient registry from the command line: list the registered task payloads, or fetch
one (safetensors + JSON sidecar) into a folder, e.g. to ship it to a device.

    python -m stages.registry list [--arch vit] [--method recast]
    python -m stages.registry fetch vit mnist_rot [--method recast] [--alias best] [--out payloads/]

The store is MLFLOW_TRACKING_URI, else the embedded ``mlflow.db`` beside the repo.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from stages.tracking import download_payload, list_registered


def list_table(arch: str | None = None, method: str | None = None) -> list[dict]:
    """Registered payloads, filtered by arch and method, one row each."""
    return [r for r in list_registered()
            if (arch is None or r.get("arch") == arch) and (method is None or r.get("method") == method)]


def fetch(arch: str, task: str, method: str, alias: str, out: Path) -> list[Path]:
    """Copy one registered payload's files into ``out``; returns their paths."""
    folder = download_payload(arch, task, method, alias=alias)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for path in sorted(folder.iterdir()):
        target = out / path.name
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)
        copied.append(target)
    shutil.rmtree(folder, ignore_errors=True)
    return copied


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list registered task payloads")
    ls.add_argument("--arch", default=None)
    ls.add_argument("--method", default=None)
    get = sub.add_parser("fetch", help="copy one task's payload files into a folder")
    get.add_argument("arch")
    get.add_argument("task")
    get.add_argument("--method", default="recast")
    get.add_argument("--alias", default="best", choices=("best", "current"))
    get.add_argument("--out", type=Path, default=Path("payloads"))
    args = ap.parse_args(argv)
    if args.command == "list":
        rows = list_table(args.arch, args.method)
        print("| name | arch | method | task | best | current |\n|---|---|---|---|---|---|")
        for r in rows:
            aliases = r.get("aliases", {})
            print(f"| {r['name']} | {r.get('arch', '')} | {r.get('method', '')} | {r.get('task', '')} | "
                  f"{aliases.get('best', '')} | {aliases.get('current', '')} |")
        print(f"{len(rows)} registered payload(s)", file=sys.stderr)
        return 0
    try:
        files = fetch(args.arch, args.task, args.method, args.alias, args.out)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own types; name what was asked
        print(f"error: no payload '{args.alias}' for arch={args.arch} task={args.task} method={args.method}: {err}",
              file=sys.stderr)
        return 1
    for path in files:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
