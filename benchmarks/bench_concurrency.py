"""Concurrent mixed-task forwards on one RecastModel: throughput of 4 threads against 1.

The mixed forward is re-entrant (the routing travels in a context-local, ``recast.mixed``), so
threads that share one model may run their forwards at once. A model (timm, ``pretrained=False``,
``recast_att_mlp``, 8 tasks) answers ``--calls`` mixed batches of ``--rows`` rows (tasks drawn per
row), first from one thread, then split over ``--threads`` threads released together. Each
forward runs on ``--torch-threads`` intra-op threads (1: the Python threads are what overlaps).
Every concurrent output is compared with the same call run alone (bit-identical, or the script
fails). Reports calls/s and rows/s of both, and their ratio, with the machine load.

Usage: ``python -m benchmarks.bench_concurrency [--model vit_small_patch16_224] [--threads 4]``.
Writes ``benchmarks/results/bench_concurrency.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# isort: split
import recast  # noqa: E402
from benchmarks.concurrent import released_together  # noqa: E402
from benchmarks.environment import environment  # noqa: E402
from recast import preset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_concurrency.json"


def build(name: str, image: int, tasks: int) -> recast.RecastModel:
    model = timm.create_model(name, pretrained=False, num_classes=10, img_size=image).eval()
    rc = recast.apply(model, preset("recast_att_mlp", groups=math.gcd(len(model.blocks), 6)), inplace=True).eval()
    rc.drop_reference()
    g = torch.Generator().manual_seed(0)
    for i in range(tasks):
        rc.add_task(f"t{i}", num_classes=10 + i, init="random", generator=g)
    return rc


def requests(calls: int, rows: int, tasks: int, image: int) -> list[tuple[torch.Tensor, list[str]]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(rows, 3, image, image, generator=g),
             [f"t{int(i)}" for i in torch.randint(0, tasks, (rows,), generator=g)]) for _ in range(calls)]


def run(rc, reqs, threads: int) -> tuple[float, list[torch.Tensor]]:
    """Seconds to answer ``reqs`` split round-robin over ``threads`` threads; outputs in order."""
    out: list[torch.Tensor | None] = [None] * len(reqs)

    def work(k):
        with torch.no_grad():
            for i in range(k, len(reqs), threads):
                out[i] = rc(reqs[i][0], tasks=reqs[i][1])

    return released_together([lambda k=k: work(k) for k in range(threads)]), out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_small_patch16_224")
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--calls", type=int, default=24)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--json-out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    rc = build(args.model, args.image, args.tasks)
    reqs = requests(args.calls, args.rows, args.tasks, args.image)
    run(rc, reqs[:2], 1)  # warm-up
    env = environment()
    one, alone = run(rc, reqs, 1)
    many, together = run(rc, reqs, args.threads)
    wrong = sum(not torch.equal(a, b) for a, b in zip(alone, together))
    result = {
        "model": args.model, "image": args.image, "tasks": args.tasks, "rows": args.rows, "calls": args.calls,
        "threads": args.threads, "torch_threads": args.torch_threads,
        "one_thread": {"seconds": round(one, 3), "calls_per_s": args.calls / one, "rows_per_s": args.calls * args.rows / one},
        "concurrent": {"seconds": round(many, 3), "calls_per_s": args.calls / many,
                       "rows_per_s": args.calls * args.rows / many},
        "speedup": one / many, "wrong_calls": wrong, "environment": env,
        "load_after": environment()["load_avg_1_5_15"],
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| threads | calls/s | rows/s |\n|---|---|---|\n| 1 | {result['one_thread']['calls_per_s']:.2f} | "
          f"{result['one_thread']['rows_per_s']:.1f} |\n| {args.threads} | {result['concurrent']['calls_per_s']:.2f} | "
          f"{result['concurrent']['rows_per_s']:.1f} |\nspeedup {result['speedup']:.2f}x, wrong calls {wrong}, "
          f"load {env['load_avg_1_5_15']}")
    if wrong:
        raise SystemExit(f"{wrong} of {args.calls} concurrent calls differ from the same call alone")
    return result


if __name__ == "__main__":
    main()
