"""What ASHA saves in the ``hpo`` sweep: the same random search with and without early stopping.

Runs ``pipelines.sweep`` on the ``hpo`` config twice, each in a fresh process with its own Tune
storage, output folder and sqlite MLflow store: once with ASHA, once with ``--no-asha`` (FIFO).
The search seed is the same, so both runs draw the same configurations (checked). Reports each
run's wall time (imports, Ray start, trials, MLflow, report), the trials' own seconds, the tasks
trained (ASHA's resource: a trial reports after each task of the config), the trials ASHA stopped,
and the best validation accuracy with its test accuracy per method. Needs the outputs of the
config's prepare, pretrain and mimic stages (``dvc repro mimic``).

    python -m benchmarks.bench_asha [--config pipelines/configs/hpo.yaml] [--num-samples 8] [--methods a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def run_once(config: dict, asha: bool, scratch: Path, num_cpus: int) -> dict:
    """One hpo sweep in a fresh Python process."""
    tag = "asha" if asha else "fifo"
    cfg = {**config, "out_dir": str(scratch / f"out-{tag}"),
           "runtime": {**config.get("runtime", {}), "cache_dir": str(scratch / f"cache-{tag}"), "storage": None,
                       "experiment": f"bench-asha-{tag}", "progress": False, "cpus_per_task": 1}}
    path = scratch / f"hpo-{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{scratch / f'mlflow-{tag}.db'}", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "pipelines.sweep", "--sweep", "hpo", "--config", str(path), "--num-cpus",
           str(num_cpus)] + ([] if asha else ["--no-asha"])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"the {tag} sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    summary = json.loads((scratch / f"out-{tag}" / "hpo" / "summary.json").read_text())
    rows = pq.read_table(scratch / f"out-{tag}" / "hpo" / "results.parquet").to_pylist()
    tasks = sum(r["training_iteration"] - (1 if r["final"] else 0) for r in rows)  # the final report is no task
    return {"asha": asha, "wall_s": wall, "tune_s": summary["wall_s"], "trials": summary["trials"],
            "stopped_early": summary["stopped_early"], "tasks_trained": tasks,
            "trial_seconds_total": summary["trial_seconds_total"], "best": summary["best"],
            "configs": sorted((r["name"], r["lr"]) for r in rows)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "pipelines" / "configs" / "hpo.yaml"))
    ap.add_argument("--num-samples", type=int, default=None, help="override the config's num_samples")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the pipeline config's methods")
    ap.add_argument("--num-cpus", type=int, default=2, help="local Ray CPUs (one per trial)")
    ap.add_argument("--json-out", default=str(BENCH_DIR / "results" / "bench_asha.json"))
    args = ap.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    if args.num_samples is not None:
        config["num_samples"] = args.num_samples
    if args.methods:
        config["methods"] = args.methods.split(",")
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-asha-") as tmp:
        runs = [run_once(config, asha, Path(tmp), args.num_cpus) for asha in (True, False)]
    if runs[0]["configs"] != runs[1]["configs"]:
        raise RuntimeError("the two runs drew different configurations; the comparison is void")
    asha, fifo = runs
    out = {"environment": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_1_5_15": load,
                           "load_avg_after": os.getloadavg(), "cpus": os.cpu_count(), "num_cpus": args.num_cpus},
           "config": {k: config.get(k) for k in ("params", "arch", "methods", "lr", "num_samples", "grace_period",
                                                 "reduction_factor", "search_seed")},
           "runs": [{k: v for k, v in r.items() if k != "configs"} for r in runs],
           "wall_ratio_fifo_over_asha": fifo["wall_s"] / asha["wall_s"],
           "trial_seconds_ratio_fifo_over_asha": fifo["trial_seconds_total"] / max(asha["trial_seconds_total"], 1e-9),
           "tasks_ratio_fifo_over_asha": fifo["tasks_trained"] / max(asha["tasks_trained"], 1)}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    for r in runs:
        print(f"{'ASHA' if r['asha'] else 'FIFO'}: wall {r['wall_s']:.1f} s (tune {r['tune_s']:.1f} s), "
              f"{r['trials']} trials, {r['stopped_early']} stopped early, {r['tasks_trained']} tasks trained, "
              f"trial seconds {r['trial_seconds_total']:.1f}")
        for group, b in r["best"].items():
            print(f"    best {group}: val {b['val_acc']:.4f} test {b['test_acc']:.4f} (lr {b['lr']:.4g})")
    print(f"FIFO / ASHA: wall x{out['wall_ratio_fifo_over_asha']:.2f}, "
          f"tasks x{out['tasks_ratio_fifo_over_asha']:.2f}; load {load[0]:.2f} at start")
    return out


if __name__ == "__main__":
    main()
