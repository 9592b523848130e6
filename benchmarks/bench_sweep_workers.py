"""Sweep wall time with 1 and with N local Ray workers (issue: scale sweeps).

Runs one shipped sweep (default ``gn``: 6 trials) twice through ``pipelines.sweep.main``, with
``--num-cpus 1`` and then ``--num-cpus N`` (one CPU per trial), each time with empty Tune storage,
its own output folder and its own sqlite MLflow store, so nothing is reused between the two
runs, each in a fresh process. Both wall times include the imports, Ray's start, MLflow logging
and the report: what a user waits for; the fan-out time is the trials alone.
Needs the outputs of the prepare, pretrain and mimic stages (``dvc repro mimic``).

    python -m benchmarks.bench_sweep_workers [--sweep gn] [--workers 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent


def run_once(sweep: str, config: dict, workers: int, scratch: Path) -> dict:
    """One sweep in a fresh Python process (both runs pay the same imports and Ray start)."""
    cfg = {**config, "out_dir": str(scratch / f"out{workers}"),
           "runtime": {"cache_dir": str(scratch / f"cache{workers}"), "experiment": f"bench-sweep-{workers}",
                       "progress": False, "cpus_per_task": 1}}
    path = scratch / f"{sweep}-{workers}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{scratch / f'mlflow{workers}.db'}", TQDM_DISABLE="1")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipelines.sweep", "--sweep", sweep, "--config", str(path),
                    "--num-cpus", str(workers)], cwd=BENCH_DIR.parent, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((scratch / f"out{workers}" / sweep / "summary.json").read_text())
    return {"wall_s": wall, "fanout_s": summary["wall_s"], "trials": summary["trials"],
            "computed": summary["logged_here"], "trial_seconds_total": summary["trial_seconds_total"]}


def main(argv: list[str] | None = None) -> dict:
    from pipelines.config import SWEEP_NAMES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default="gn", choices=SWEEP_NAMES)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None, help="override the config's train.epochs")
    ap.add_argument("--limit-train", type=int, default=None, help="override the config's train.limit_train")
    ap.add_argument("--json-out", default=str(BENCH_DIR / "results" / "sweep_workers.json"))
    args = ap.parse_args(argv)
    if args.workers < 2:
        ap.error("--workers must be at least 2 (it is compared with 1)")
    config = yaml.safe_load((BENCH_DIR.parent / "pipelines" / "configs" / f"{args.sweep}.yaml").read_text())
    overrides = {k: v for k, v in (("epochs", args.epochs), ("limit_train", args.limit_train)) if v}
    config["train"] = {**config.get("train", {}), **overrides}
    scratch = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    try:
        one = run_once(args.sweep, config, 1, scratch)
        many = run_once(args.sweep, config, args.workers, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if one["computed"] != one["trials"] or many["computed"] != many["trials"]:
        raise RuntimeError(f"a run reused cached trials: {one}, {many}")
    out = {"sweep": args.sweep, "trials": one["trials"], "train": config["train"], "cpu_count": os.cpu_count(),
           "workers": args.workers,
           "load_avg_1m_at_end": os.getloadavg()[0], "one_worker": one, "n_workers": many,
           "speedup_wall": one["wall_s"] / many["wall_s"], "speedup_fanout": one["fanout_s"] / many["fanout_s"]}
    print(f"| sweep | trials | 1 worker (s) | {args.workers} workers (s) | speedup (wall) | speedup (fan-out) |\n"
          f"|---|---|---|---|---|---|\n"
          f"| {args.sweep} | {one['trials']} | {one['wall_s']:.1f} | {many['wall_s']:.1f} | "
          f"{out['speedup_wall']:.2f}x | {out['speedup_fanout']:.2f}x |")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
