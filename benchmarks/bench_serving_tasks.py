"""Thousands of served tasks (issue 31, item 3): register ``max(--tasks) + 1`` synthetic task
payloads of the default suite's ViT (right shapes, against the real banks: random coefficients and
heads of 10 classes) in an embedded sqlite store, then for each T build the served model over the
first T tasks (``stages.serving.build``) and load it in a fresh process
(``mlflow.pyfunc.load_model``), with an empty payload cache; last, the version with one more task,
loaded on the cache of the largest T (what a replica that served it does).

Per build: seconds and store round trips (the build fetches each payload that no pack of the
previous version holds: one artifact download each). Per load: seconds, store round trips (``benchmarks.store_calls``: registry and tracking queries,
artifact calls and files), payload packs fetched and found in the cache, and the memory check:

- ``model_bytes``: the loading process's resident memory after the load minus before it, both
  after ``gc.collect()`` and glibc's ``malloc_trim(0)`` (freed heap given back). The process
  first loads the T = ``min(--tasks)`` version and KEEPS it: the imports, code paths and store
  connection of a load (~15 MB, the same for every T) are then in place, and nothing of that
  warm-up is freed for the measured load to reuse unseen (a dropped warm-up model hid ~1 MB);
- ``bound_bytes``: 1.10 x ``budget_bytes``, the budget ``base_bytes`` + T x ``payload_bytes`` in
  files, as registered and stored: the pretrain stage's backbone file plus the mimic stage's
  banks and base files (what the base run holds), and one task's payload file (its
  ``.safetensors``: coefficients, head and the file's header);
- ``ratio`` = model_bytes / budget_bytes, asserted <= 1.10; ``ratio_numbers`` the same against
  ``base_bytes`` + T x ``payload_numbers_bytes`` (a payload's tensors alone, its sidecar's
  ``bytes``), reported, not asserted. The bench fails (exit 1, after writing its JSON) when a ratio
  exceeds 1.10, a 1,000-task load takes a minute or more, or the version with one more task
  fetches anything but one pack of that task.

    python -m benchmarks.bench_serving_tasks [--tasks 10,100,1000]

Prints one JSON line per load; writes ``benchmarks/results/bench_serving_tasks.json``.
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

import torch

from benchmarks.bench_serving import _uptime, build_store
from benchmarks.environment import environment
from benchmarks.store_calls import count_store_calls
from stages.config.common import REPO_ROOT

BOUND = 1.10  # resident memory over backbone + banks + T x payload bytes
LOAD_LIMIT_S = 60.0  # loading 1,000 tasks
LOAD = """
import ctypes, gc, json, os, sys, time
import psutil
import mlflow
from benchmarks.store_calls import count_store_calls

trim = ctypes.CDLL("libc.so.6").malloc_trim


def settled():
    gc.collect()
    trim(0)
    return psutil.Process().memory_info().rss


target, warm, warm_cache = sys.argv[1:4]
cache = os.environ["RECAST_PAYLOAD_CACHE"]
# warm-up: the smallest version loaded first and KEPT (every import, code path and store
# connection of a load taken once; nothing freed for the measured load to reuse unseen)
os.environ["RECAST_PAYLOAD_CACHE"] = warm_cache
kept = mlflow.pyfunc.load_model(warm)
os.environ["RECAST_PAYLOAD_CACHE"] = cache
before = settled()
with count_store_calls() as calls:
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(target)
    seconds = time.perf_counter() - start
after = settled()
served = model.unwrap_python_model()
storages = {}
for t in [*served.rc.parameters(), *served.rc.buffers()]:
    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
print(json.dumps({"load_s": round(seconds, 2), "model_bytes": after - before, "tensor_bytes": sum(storages.values()),
                  "served_tasks": len(served.tasks), "packed_tasks": len(served.rc.packed or []),
                  "store_calls": dict(calls), "packs_fetched": served.payload_cache.fetches,
                  "packs_cached": served.payload_cache.hits, "cache_corrupt": served.payload_cache.corrupt}))
"""


def _load(uri: str, version: str, warm: str, cache: Path) -> dict:
    with tempfile.TemporaryDirectory() as warm_cache:
        proc = subprocess.run([sys.executable, "-c", LOAD, f"models:/recast-serve.vit.recast/{version}",
                               f"models:/recast-serve.vit.recast/{warm}", warm_cache],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=3600,
                              env={**os.environ, "MLFLOW_TRACKING_URI": uri, "RECAST_PAYLOAD_CACHE": str(cache)})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="10,100,1000")
    ap.add_argument("--json-out", default=str(REPO_ROOT / "benchmarks" / "results" / "bench_serving_tasks.json"))
    args = ap.parse_args(argv)
    from stages.serving.build import build

    counts = sorted(int(t) for t in args.tasks.split(","))
    names = [f"t{i}" for i in range(max(counts) + 1)]  # the last one: the version with one more task
    results = {"args": vars(args), "environment": environment(), "uptime_before": _uptime(), "runs": []}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["RECAST_PAYLOAD_CACHE"] = str(root / "build-cache")
        start = time.perf_counter()
        build_store(root, {t: 10 for t in names}, build_model=False)
        results["register_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({"registered": len(names), "seconds": results["register_s"]}), flush=True)
        payload = json.loads(next((root / "payloads" / "t0").glob("*.json")).read_text())["bytes"]
        payload_file = sum(f.stat().st_size for f in (root / "payloads" / "t0").rglob("*.safetensors"))
        base = (sum(f.stat().st_size for f in (root / "pretrain").glob("*.safetensors"))
                + sum(f.stat().st_size for f in (root / "mimic").rglob("*.safetensors")))
        previous: list[dict] = []
        warm = None
        steps = [(n, f"cache{n}") for n in counts] + [(max(counts) + 1, f"cache{max(counts)}")]
        for n, cache in steps:
            with count_store_calls() as build_calls:
                start = time.perf_counter()
                out = build("vit", "recast", root / "pretrain", root / "mimic", 32, tasks=names[:n],
                            data_dir=root / "prepared")
                build_s = time.perf_counter() - start
            warm = warm or out["version"]
            loaded = _load(uri, out["version"], warm, root / cache)
            budget = base + n * payload_file
            packs = out["config"]["packs"]
            row = {"tasks": n, "build_s": round(build_s, 2), "build_store_calls": dict(build_calls), **loaded,
                   "packs": len(packs),
                   "payload_bytes": payload_file, "payload_numbers_bytes": payload, "base_bytes": base,
                   "budget_bytes": budget, "bound_bytes": int(BOUND * budget),
                   "ratio": round(loaded["model_bytes"] / budget, 3),
                   "ratio_numbers": round(loaded["model_bytes"] / (base + n * payload), 3),
                   "tensor_ratio": round(loaded["tensor_bytes"] / budget, 3), "uptime": _uptime()}
            row["within_bound"] = row["ratio"] <= BOUND
            if not row["within_bound"]:
                failures.append(f"T={n}: resident memory {row['model_bytes']:,} B = {row['ratio']} x the budget "
                                f"{budget:,} B (bound {BOUND})")
            if n == max(counts) and max(counts) >= 1000 and row["load_s"] >= LOAD_LIMIT_S:
                failures.append(f"T={n}: load {row['load_s']} s >= {LOAD_LIMIT_S} s")
            if n == max(counts) + 1:
                row["added_one_to"] = max(counts)
                new = [p["tasks"] for p in packs if p["sha256"] not in {q["sha256"] for q in previous}]
                if (row["packs_fetched"], new) != (1, [[names[-1]]]):
                    failures.append(f"one more task: fetched {row['packs_fetched']} packs, new packs {new}")
            previous = packs
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    results["failures"] = failures
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    if failures:
        print("FAILED: " + "; ".join(failures), file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
