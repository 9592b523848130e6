"""Start-up cost of the stages and the wall time of a clean default pipeline.

    python -m benchmarks.bench_startup [--keep DIR] [--json-out benchmarks/results/startup.json]

In a fresh copy of the source tree (what a clone has, no outputs), it measures, each in its own
process so nothing is warm:

- ``import``: ``import stages.<stage>`` (the stage module and everything it imports);
- ``ray_init``: a local ``ray.init`` with the runtime's CPUs, then shutdown;
- ``mlflow``: opening a fresh sqlite store and creating the stage's parent run (``Tracker``);
- ``stage``: ``python -m stages.<stage>`` on the copy, in pipeline order (a clean run);
- ``floor``: the stage's compute alone, from its jobs' own wall times in the job cache
  (``job_wall_s``): the longer of its longest job and their sum over the runtime's CPUs, a lower
  bound on the stage's wall time however small every start-up cost became;
- ``one_job``: ``python -m stages.tune`` again with one per-task job's cache entry removed (a re-run
  after a one-job change), with ``runtime.inline_jobs`` 1 (that job runs in-process, no Ray
  start) and 0 (through a local Ray); the other jobs come from the cache both times.

It prints a Markdown table and writes JSON. Run it on an idle machine: the figures are seconds.
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

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "pretrain", "mimic", "tune", "combine", "evaluate")
JOB_CACHES = {"pretrain": "pretrain", "mimic": "mimic", "tune": "tune", "combine": "combine", "evaluate": "reload"}


def _copy_tree(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("outputs/", "data/", "metrics/", "reports/", "mlflow", "mlartifacts/")):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def scratch_tree(keep: Path | None, prefix: str) -> tuple[Path, dict[str, str]]:
    """A copy of the source tree to run the pipeline in (``keep``, or a new temp folder), and the
    environment to run it with: its own embedded MLflow store and local Ray, no progress bars."""
    root = keep or Path(tempfile.mkdtemp(prefix=prefix))
    root.mkdir(parents=True, exist_ok=True)
    _copy_tree(root)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RECAST_PARAMS")}
    env.update(TQDM_DISABLE="1", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(root))
    return root, env


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def compute_floor(cache: Path, cpus: int) -> dict[str, float]:
    """Jobs, their summed wall time, the longest, and the floor max(longest, sum / cpus) (seconds)
    of one stage's job cache (``<key>.json`` entries; ``<key>.mlflow.json`` are run records)."""
    walls = [json.loads(p.read_text())["record"]["metrics"]["job_wall_s"] for p in sorted(cache.glob("*.json"))
             if not p.name.endswith(".mlflow.json")]
    longest, total = max(walls, default=0.0), sum(walls)
    return {"jobs": len(walls), "job_sum": total, "longest": longest, "floor": max(longest, total / cpus)}


def one_job_rerun(root: Path, env: dict[str, str]) -> dict[str, float]:
    """Wall time of ``stages.tune`` with one job left to compute, in-process vs through Ray."""
    cache = root / "outputs" / ".jobcache" / "tune"
    entry = next(p for p in sorted(cache.glob("*.json"))  # a per-task job, not a sequential baseline
                 if not p.name.endswith(".mlflow.json")
                 and not json.loads(p.read_text())["record"]["metrics"].get("sequential"))
    saved = {p: p.read_bytes() for p in (entry, entry.with_suffix(".safetensors")) if p.exists()}
    params = root / "params.yaml"
    original = params.read_text()
    out = {}
    try:
        for inline in (1, 0):
            for p in saved:
                p.unlink(missing_ok=True)
            data = yaml.safe_load(original)
            data["runtime"]["inline_jobs"] = inline
            params.write_text(yaml.safe_dump(data, sort_keys=False))
            out[f"inline_jobs_{inline}"] = _timed([sys.executable, "-m", "stages.tune"], root, env)
    finally:
        params.write_text(original)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it")
    ap.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "startup.json")
    args = ap.parse_args(argv)
    root, env = scratch_tree(args.keep, "bench-startup-")
    py = sys.executable
    rows: dict[str, dict[str, float]] = {}
    ray_init = _timed([py, "-c", "import ray; ray.init(num_cpus=2, include_dashboard=False); ray.shutdown()"], root, env)
    mlflow = _timed([py, "-c", "from stages.tracking.runs import Tracker; Tracker('bench', 'bench-startup').finish()"],
                    root, env)
    for stage in STAGES:
        rows[stage] = {"import": _timed([py, "-c", f"import stages.{stage}"], root, env)}
    load = os.getloadavg()[0]
    load_start = os.getloadavg()
    for stage in STAGES:
        rows[stage]["stage"] = _timed([py, "-m", f"stages.{stage}"], root, env)
    load_end = os.getloadavg()  # the 5/15-min figures cover the pipeline: other work on the machine inflates it
    cpus = yaml.safe_load((root / "params.yaml").read_text())["runtime"]["num_cpus"]
    for stage, cache in JOB_CACHES.items():
        rows[stage].update(compute_floor(root / "outputs" / ".jobcache" / cache, cpus))
    one_job = one_job_rerun(root, env)
    total = sum(r["stage"] for r in rows.values())
    floor = sum(r.get("floor", 0.0) for r in rows.values())
    print("| stage | import s | stage wall s | jobs | job wall sum s | compute floor s |\n|---|---|---|---|---|---|")
    for stage, r in rows.items():
        print(f"| {stage} | {r['import']:.1f} | {r['stage']:.1f} | {r.get('jobs', '-')} | "
              f"{r.get('job_sum', 0.0):.1f} | {r.get('floor', 0.0):.1f} |")
    print(f"\nray.init + shutdown {ray_init:.1f} s; MLflow store + parent run {mlflow:.1f} s; "
          f"clean pipeline {total:.0f} s ({total / 60:.1f} min), of which the jobs' compute floor is {floor:.0f} s "
          f"on {cpus} CPUs; load average at start {load:.2f}, after the pipeline (1/5/15 min) "
          f"{' / '.join(f'{v:.2f}' for v in load_end)}")
    print(f"tune re-run with one job to compute: {one_job['inline_jobs_1']:.1f} s in-process, "
          f"{one_job['inline_jobs_0']:.1f} s through a local Ray")
    from recast.machine import machine_record  # torch: imported after the timed subprocesses

    out = {"stages": rows, "ray_init_s": ray_init, "mlflow_s": mlflow, "total_s": total, "floor_s": floor,
           "runtime_cpus": cpus, "one_job_tune_rerun_s": one_job, "loadavg_1min": load, "cpus": os.cpu_count(),
           "loadavg_1_5_15_start": [round(v, 2) for v in load_start], "loadavg_1_5_15_end": [round(v, 2) for v in load_end],
           "machine": machine_record()}  # the pipeline's numbers depend on the CPU type (README, Determinism)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
