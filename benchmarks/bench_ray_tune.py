"""Ray speedup of the ``tune`` stage: the same jobs with 1 worker and with N workers.

Runs the stage's job list (from params.yaml, after prepare/pretrain/mimic have run) twice
through ``stages.jobs.fanout.run_jobs`` with an empty job cache each time, ``runtime.num_cpus`` = 1
then N (one CPU per task), and prints wall times and the speedup. MLflow logging is skipped
(the driver's callbacks are not passed), so only the fan-out is measured.

    python -m benchmarks.bench_ray_tune [--workers 2] [--methods head_only recast] [--tasks ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from stages.config.common import REPO_ROOT, read_params, validate_section
from stages.config.params import RuntimeParams, TuneParams
from stages.jobs.inputs import InputStore
from stages.jobs.runtime import job_device
from stages.jobs.specs import method_specs
from stages.jobs.train import dispatch


def measure(workers: int, specs: list[dict], rt: RuntimeParams, store: InputStore) -> float:
    import ray

    from stages.jobs.fanout import run_jobs

    cache = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    try:
        rt_n = rt.model_copy(update={"num_cpus": workers, "cpus_per_task": 1, "cache_dir": str(cache), "progress": False})
        if ray.is_initialized():
            ray.shutdown()
        t0 = time.perf_counter()
        run_jobs(f"bench{workers}", dispatch, specs, rt_n, inputs=store)
        return time.perf_counter() - t0
    finally:
        ray.shutdown()
        shutil.rmtree(cache, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=None, help="subset of tune.methods (default: all)")
    ap.add_argument("--tasks", nargs="*", default=None)
    ap.add_argument("--json-out", default=str(REPO_ROOT / "benchmarks" / "results" / "ray_tune.json"))
    args = ap.parse_args(argv)
    data = read_params(args.params)
    p = validate_section("tune", TuneParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    if args.tasks:
        p = p.model_copy(update={"tasks": args.tasks})
    methods = {k: v for k, v in p.methods.items() if args.methods is None or k in args.methods}
    store = InputStore(rt.storage)
    specs = method_specs("tune", p, methods, job_device(rt), store)
    t1 = measure(1, specs, rt, store)
    tn = measure(args.workers, specs, rt, store)
    out = {"jobs": len(specs), "wall_1_worker_s": t1, f"wall_{args.workers}_workers_s": tn, "speedup": t1 / tn}
    print(f"| jobs | 1 worker (s) | {args.workers} workers (s) | speedup |\n|---|---|---|---|\n"
          f"| {len(specs)} | {t1:.1f} | {tn:.1f} | {t1 / tn:.2f}x |")
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
