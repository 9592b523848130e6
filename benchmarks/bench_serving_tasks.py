"""Thousands of served tasks (issue 31, item 3): register ``max(--tasks)`` synthetic task payloads of
the default suite's ViT (right shapes, against the real banks: random coefficients and heads of
10 classes) in an embedded sqlite store, then for each T build the served model over the first
T tasks (``stages.serving.build``) and load it in a fresh process (``mlflow.pyfunc.load_model``):
build seconds, load seconds and the loading process's resident-memory growth against
``backbone + banks + T x payload bytes``.

    python -m benchmarks.bench_serving_tasks [--tasks 10,100,1000]

Prints one JSON line per T; writes ``benchmarks/results/bench_serving_tasks.json``.
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
from stages.config.common import REPO_ROOT

LOAD = """
import json, sys, time, psutil, torch
import mlflow
before = psutil.Process().memory_info().rss
start = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
seconds = time.perf_counter() - start
served = model.unwrap_python_model()
tensors = sum(t.numel() * t.element_size() for t in served.rc.state_dict().values())
print(json.dumps({"load_s": round(seconds, 2), "rss_growth_bytes": psutil.Process().memory_info().rss - before,
                  "model_tensor_bytes": tensors, "tasks": len(served.tasks)}))
"""


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="10,100,1000")
    ap.add_argument("--json-out", default=str(REPO_ROOT / "benchmarks" / "results" / "bench_serving_tasks.json"))
    args = ap.parse_args(argv)
    from stages.serving.build import build

    counts = [int(t) for t in args.tasks.split(",")]
    names = [f"t{i}" for i in range(max(counts))]
    results = {"args": vars(args), "environment": environment(), "uptime_before": _uptime(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{root / 'mlflow.db'}"
        start = time.perf_counter()
        build_store(root, {t: 10 for t in names}, build_model=False)
        results["register_s"] = round(time.perf_counter() - start, 1)
        print(json.dumps({"registered": len(names), "seconds": results["register_s"]}), flush=True)
        payload = sum(f.stat().st_size for f in (root / "payloads" / "t0").rglob("*.safetensors"))
        base = (sum(f.stat().st_size for f in (root / "pretrain").glob("*.safetensors"))
                + sum(f.stat().st_size for f in (root / "mimic").rglob("*.safetensors")))
        for n in counts:
            start = time.perf_counter()
            out = build("vit", "recast", root / "pretrain", root / "mimic", 32, tasks=names[:n], data_dir=root / "prepared")
            build_s = time.perf_counter() - start
            proc = subprocess.run([sys.executable, "-c", LOAD, f"models:/recast-serve.vit.recast/{out['version']}"],
                                  capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                                  timeout=3600)
            if proc.returncode:
                raise RuntimeError(proc.stderr[-3000:])
            loaded = json.loads(proc.stdout.strip().splitlines()[-1])
            budget = base + n * payload
            row = {"tasks": n, "build_s": round(build_s, 2), **loaded, "payload_bytes": payload, "base_bytes": base,
                   "budget_bytes": budget, "tensor_bytes_vs_budget": round(loaded["model_tensor_bytes"] / budget, 3),
                   "uptime": _uptime()}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
