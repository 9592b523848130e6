"""Cost of moving job inputs (``stages.jobs.inputs``): object store vs local read, and how the driver
grows with the number of tasks.

1. Per job: one synthetic prepared task (``--images`` 32x32 train images, a tenth as many val and
   test) plus one backbone state dict (``--backbone``, a timm model) reach a Ray job either
   through the object store (``JobInputs.fetch`` of refs put once by the driver) or by reading the
   files on the job's own node (``InputStore.local``); both then decode every split and build the
   Backbone. Timed inside the job, median of ``--repeats`` jobs; the driver's one-off ``put``
   is reported apart.
2. Driver scaling: for 5, 20 and 100 synthetic tasks (``--small-images`` train images each), a
   stage-like run builds one spec per task (input keys), puts every bundle once and runs one
   trivial job per task that fetches and decodes its task. Reports the driver's wall time and the
   growth of its peak resident memory (``stages.jobs.memory``) per task count, and ratios against 5.

    python -m benchmarks.bench_inputs [--images 10000] [--repeats 5] [--counts 5 20 100]

Prints Markdown tables; writes ``benchmarks/results/bench_inputs.json`` (with ``uptime``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import timm

from recast.data import AugmentPolicy
from recast.data.storage import TaskWriter, write_task_arrays
from stages.config.common import REPO_ROOT
from stages.config.params import RuntimeParams
from stages.jobs.backbones import save_pretrained
from stages.jobs.fanout import run_jobs
from stages.jobs.inputs import InputStore, JobInputs, backbone_bundle, task_bundle
from stages.jobs.memory import current_rss_mb, peak_memory, reset_peak_memory
from stages.jobs.result import JobResult


def write_task(out: Path, name: str, n_train: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", max(1, n_train // 10)), ("test", max(1, n_train // 10))):
        labels = np.arange(n) % 10
        splits[split] = (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), labels, [""] * n)
    with TaskWriter(out, name, [str(c) for c in range(10)], 32, description="synthetic", augment=AugmentPolicy(),
                    origin="bench", seed=seed, val_fraction=0.1) as writer:
        write_task_arrays(writer, splits)
    return out / name


def consume(inputs: JobInputs, with_backbone: bool) -> int:
    """Decode every split (and the backbone): what a job does before training."""
    data = inputs.task("task")
    n = sum(len(data.split(s)[1]) for s in ("train", "val", "test"))
    if with_backbone:
        n += len(inputs.backbone("backbone").state)
    return n


def timed_job(spec: dict, inputs: JobInputs):
    """A job that only receives (through run_jobs: object store) and decodes its inputs."""
    start = time.perf_counter()
    n = consume(inputs, spec["backbone"])
    return JobResult({"seconds": time.perf_counter() - start, "items": n})


def local_job(spec: dict, inputs: JobInputs):
    """The same, reading the files on the job's node (what a shared filesystem would give)."""
    start = time.perf_counter()
    store = InputStore()
    store.add(task_bundle(Path(spec["paths"]["task"])))
    if spec["backbone"]:
        store.add(backbone_bundle(Path(spec["paths"]["pretrain"]), "vit"))
    n = consume(store.local(spec["roles"]), spec["backbone"])
    return JobResult({"seconds": time.perf_counter() - start, "items": n})


def per_job(tmp: Path, args, rt: RuntimeParams) -> dict:
    task = write_task(tmp / "data", "big", args.images, 0)
    model = timm.create_model(args.backbone, pretrained=False, num_classes=10)
    save_pretrained(tmp / "pretrain", "vit", model.state_dict(), {"model": args.backbone, "kwargs": {}, "num_classes": 10})
    store = InputStore()
    roles = {"task": store.add(task_bundle(task)), "backbone": store.add(backbone_bundle(tmp / "pretrain", "vit"))}
    size_mb = sum(p.stat().st_size for b in store.bundles.values() for p in b.files.values()) / 2**20
    rows = {}
    for mode, fn in (("object_store", timed_job), ("local_read", local_job)):
        specs = [{"id": f"{mode}/{i}", "backbone": True, "inputs": roles if mode == "object_store" else {},
                  "roles": roles, "paths": {"task": str(task), "pretrain": str(tmp / "pretrain")}}
                 for i in range(args.repeats)]
        rt_mode = rt.model_copy(update={"cache_dir": str(tmp / f"cache-{mode}")})
        start = time.perf_counter()
        store_mode = store if mode == "object_store" else InputStore()
        results = run_jobs(f"bench_{mode}", fn, specs, rt_mode, inputs=store_mode)
        wall = time.perf_counter() - start
        rows[mode] = {"job_median_s": statistics.median(r.metrics["seconds"] for r in results.values()),
                      "driver_wall_s": wall}
    put_start = time.perf_counter()  # the driver's one-off cost: read the files, put them once
    fresh = InputStore()
    fresh.add(task_bundle(task))
    fresh.add(backbone_bundle(tmp / "pretrain", "vit"))
    fresh.refs([{"id": "p", "inputs": roles}])
    put_s = time.perf_counter() - put_start
    ratio = rows["object_store"]["job_median_s"] / rows["local_read"]["job_median_s"]
    return {"input_mb": round(size_mb, 2), "put_once_s": round(put_s, 4), **rows, "object_store_over_local": ratio}


def scaling(tmp: Path, args, rt: RuntimeParams) -> dict:
    out = {}
    for count in args.counts:
        tasks = [write_task(tmp / f"scale{count}", f"t{i}", args.small_images, i) for i in range(count)]
        reset_peak_memory()
        rss0 = current_rss_mb()
        start = time.perf_counter()
        store = InputStore()
        specs = [{"id": f"scale{count}/{i}", "backbone": False, "inputs": {"task": store.add(task_bundle(t))}}
                 for i, t in enumerate(tasks)]
        run_jobs(f"bench_scale{count}", timed_job, specs, rt.model_copy(update={"cache_dir": str(tmp / f"c{count}")}),
                 inputs=store)
        wall = time.perf_counter() - start
        out[count] = {"driver_wall_s": wall, "driver_peak_rss_growth_mb": peak_memory()["peak_rss_mb"] - rss0,
                      "input_mb": sum(p.stat().st_size for b in store.bundles.values()
                                      for p in b.files.values()) / 2**20}
    base = out[args.counts[0]]
    for count, row in out.items():
        row["wall_ratio"] = row["driver_wall_s"] / base["driver_wall_s"]
        row["rss_growth_ratio"] = row["driver_peak_rss_growth_mb"] / max(base["driver_peak_rss_growth_mb"], 1e-6)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000, help="train images of the per-job task")
    ap.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm model of the per-job state dict")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small-images", type=int, default=256, help="train images of each scaling task")
    ap.add_argument("--counts", type=int, nargs="+", default=[5, 20, 100])
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--json-out", default=str(REPO_ROOT / "benchmarks" / "results" / "bench_inputs.json"))
    args = ap.parse_args(argv)
    rt = RuntimeParams(num_cpus=args.num_cpus, cpus_per_task=1, max_retries=0, progress=False)
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-inputs-") as tmp:
        job = per_job(Path(tmp), args, rt)
        scale = scaling(Path(tmp), args, rt)
    load_after = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"\nuptime before: {load}\nuptime after:  {load_after}\n")
    print(f"per job: {job['input_mb']} MiB of inputs (task + {args.backbone}); driver put once: {job['put_once_s']:.3f} s")
    print("| transport | job's input time (median, s) | ratio to local read |\n|---|---|---|")
    for mode in ("object_store", "local_read"):
        print(f"| {mode} | {job[mode]['job_median_s']:.3f} | "
              f"{job[mode]['job_median_s'] / job['local_read']['job_median_s']:.2f}x |")
    print("\n| tasks | inputs (MiB) | driver wall (s) | wall ratio | driver peak RSS growth (MiB) | growth ratio |\n"
          "|---|---|---|---|---|---|")
    for count, row in scale.items():
        print(f"| {count} | {row['input_mb']:.1f} | {row['driver_wall_s']:.2f} | {row['wall_ratio']:.2f}x | "
              f"{row['driver_peak_rss_growth_mb']:.1f} | {row['rss_growth_ratio']:.2f}x |")
    out = {"uptime_before": load, "uptime_after": load_after, "cpus": os.cpu_count(), "per_job": job,
           "scaling": scale, "args": vars(args)}
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    # Run from the importable module, not __main__, so Ray pickles the job functions by reference.
    from benchmarks.bench_inputs import main as _main

    _main()
