"""Exact or refused, over every timm model: the check of tests/test_zoo.py (``recast.coverage``)
on all ``timm.list_models()`` that fit memory.

Each model: random init (``pretrained=False``, 10 classes), a 64 px input where the model takes
one (``img_size=64`` where it has the option), else its default input size; constant parameters
re-drawn and BatchNorm statistics calibrated (``prepare_random``); every Linear/Conv2d outside
the classifier templated with templates = layers per bank; closed-form mimicry; outputs compared
(relative 1e-4). Models over ``--max-params`` (counted on the meta device, nothing allocated)
are skipped as not fitting memory.

Outcomes: exact (in float32) / exact_float64 (float32 off by more than 1e-4 from rounding that
the randomly initialised network amplifies, exact in float64) / refused (a named error) / other
(a wrong output or a crash: a defect) /
inconclusive (the original output is not finite, or hardly depends on the templated layers) /
skipped (too large, or timm cannot build it at any tried input size). The models run in a worker
process that appends one JSON line per model to ``--out``; a rerun resumes after the last line,
and a worker that dies (out of memory, segfault) is restarted after recording the model it was
on as ``other``.

Usage: ``python -m benchmarks.bench_zoo [--limit N] [--filter 'vit_*'] [--max-params 1e8]``.
Prints the counts and writes ``benchmarks/results/bench_zoo.jsonl`` (+ ``bench_zoo.json``, the summary).
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
SIZE = 64


def check_one(name: str, max_params: float) -> dict:
    """The exactness record of one timm model."""
    import timm  # noqa: PLC0415 - the driver process stays light; the worker imports torch/timm
    import torch  # noqa: PLC0415

    from recast.coverage import exactness, prepare_random  # noqa: PLC0415

    start = time.perf_counter()
    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in timm.create_model(name, pretrained=False, num_classes=10).parameters())
    except Exception as e:  # noqa: BLE001 - a model timm cannot build is recorded, not fatal
        return {"model": name, "outcome": "skipped", "detail": f"cannot build: {type(e).__name__}: {e}"[:300]}
    if params > max_params:
        return {"model": name, "outcome": "skipped", "params": params, "detail": f"over {max_params:.3g} parameters"}
    for kwargs, size in (({"img_size": SIZE}, SIZE), ({}, SIZE), ({}, None)):
        try:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
            side = size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
            chans = model.pretrained_cfg.get("input_size", (3,))[0]

            def batch(i, side=side, chans=chans):
                return torch.randn(2, chans, side, side, generator=torch.Generator().manual_seed(i))

            with torch.no_grad():
                model(batch(0))
        except Exception:  # noqa: BLE001 - try the next input size
            continue
        prepare_random(model, batch)
        r = exactness(model, batch(99))
        return {"model": name, "outcome": r.outcome, "dtype": r.dtype, "rel_error": r.rel_error, "sensitivity": r.sensitivity,
                "templated": r.templated, "params": params, "input": side, "kwargs": kwargs,
                "seconds": round(time.perf_counter() - start, 2), "detail": r.detail[:300]}
    return {"model": name, "outcome": "skipped", "params": params, "detail": "forward fails at every tried input size"}


def worker(names: list[str], out: Path, max_params: float) -> None:
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)
    with out.open("a") as f:
        for name in names:
            print(json.dumps({"model": name, "outcome": "started"}), file=f, flush=True)
            print(json.dumps(check_one(name, max_params)), file=f, flush=True)


def read(out: Path) -> dict[str, dict]:
    """Last record per model (a lone 'started' means the worker died on it)."""
    records: dict[str, dict] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                records[rec["model"]] = rec
    return records


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--filter", default="*", help="fnmatch pattern of timm model names")
    ap.add_argument("--limit", type=int, default=0, help="first N matching models only (0: all)")
    ap.add_argument("--max-params", type=float, default=1e8)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_zoo.jsonl")
    ap.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.out, args.max_params)
        return {}
    import timm  # noqa: PLC0415

    from benchmarks.environment import environment  # noqa: PLC0415

    names = [n for n in timm.list_models() if fnmatch.fnmatch(n, args.filter)]
    names = names[: args.limit] if args.limit else names
    args.out.parent.mkdir(parents=True, exist_ok=True)
    env, start = environment(), time.perf_counter()
    while True:
        records = read(args.out)
        for name, rec in records.items():
            if rec["outcome"] == "started":  # the worker died on this model
                with args.out.open("a") as f:
                    print(json.dumps({"model": name, "outcome": "other", "detail": "the worker process died"}),
                          file=f, flush=True)
        records = read(args.out)
        todo = [n for n in names if n not in records]
        if not todo:
            break
        print(f"{len(names) - len(todo)}/{len(names)} done; checking {len(todo)} more", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "benchmarks.bench_zoo", "--out", str(args.out),
                        "--max-params", str(args.max_params), "--worker", *todo],
                       cwd=Path(__file__).resolve().parents[1], check=False)
    records = read(args.out)
    counts = collections.Counter(records[n]["outcome"] + ("_float64" if records[n].get("dtype") == "float64" else "")
                                 for n in names)
    summary = {"models": len(names), "counts": dict(counts), "max_params": args.max_params,
               "seconds": round(time.perf_counter() - start, 1), "environment": env,
               "other": sorted(n for n in names if records[n]["outcome"] == "other"),
               "refused": {n: records[n]["detail"][:120] for n in names if records[n]["outcome"] == "refused"}}
    (args.out.with_suffix(".json")).write_text(json.dumps(summary, indent=2) + "\n")
    print("| outcome | models |\n|---|---|")
    for k in ("exact", "exact_float64", "refused", "other", "inconclusive", "skipped"):
        print(f"| {k} | {counts.get(k, 0)} |")
    return summary


if __name__ == "__main__":
    main()
