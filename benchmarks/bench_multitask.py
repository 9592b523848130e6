"""Mixed-task batches: one RECAST forward over rows of T tasks vs the alternatives (issue 21).

For each model (timm, ``pretrained=False``, ``recast_att_mlp``) and T registered tasks, a batch
whose row i belongs to task ``t{i mod T}`` (so min(T, batch) distinct tasks per batch) is run:

- ``mixed``: ``rc(x, tasks=rows)``, the strategy picked by the cost models (``recast.mixed``:
  per layer, or ``loop`` for the whole forward); ``shared``, ``grouped``, ``batched`` and
  ``loop`` (one ordinary forward per task inside the mixed call): the same with the strategy
  forced, to check the pick (auto must be within 5 % of the fastest forced one);
- ``single``: the whole batch as one task (``set_task`` + forward): the throughput target's base;
- (a) ``task_by_task``: the same rows run task by task with ``set_task``;
- (b) ``peft``: PEFT LoRA rank 1 on ``qkv`` with T adapters and mixed ``adapter_names``;
- (c) T materialized plain models: memory only (bytes computed, nothing allocated).

Memory: the RecastModel's tensor bytes with T tasks (and the process RSS growth while adding
them) against ``backbone + banks + T x payload bytes`` (target: within 10 % at T = 512).
Throughput ratios are measured in one run (interleaved repeats, median); the machine load is
recorded (``benchmarks/environment.py``). Auto vs the fastest forced strategy is given three ways:
ratio of the medians, of the fastest repeats (least disturbed by other processes), and the median
of the per-repeat ratios (each pair run back to back).

Usage: ``python -m benchmarks.bench_multitask [--quick] [--models vit_small_patch16_224,test_vit]``.
Prints Markdown tables, writes ``benchmarks/results/bench_multitask.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import psutil
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# isort: split
import recast  # noqa: E402
from benchmarks.environment import environment  # noqa: E402
from recast import preset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_multitask.json"
CLASSES = 10
FORCED = ("shared", "grouped", "batched", "loop")  # the strategies auto chooses from
PICK_TOLERANCE = 1.05  # auto within 5 % of the fastest forced strategy (issue 31)


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages of ``module``'s parameters and buffers."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def make_model(name: str, image: int | None) -> tuple[torch.nn.Module, int]:
    kw = {"img_size": image} if image else {}
    model = timm.create_model(name, pretrained=False, num_classes=CLASSES, **kw).eval()
    return model, image or model.pretrained_cfg["input_size"][-1]


def build_recast(name: str, image: int | None, tasks: int) -> tuple[recast.RecastModel, dict]:
    model, _ = make_model(name, image)
    groups = math.gcd(len(model.blocks), 6)
    rc = recast.apply(model, preset("recast_att_mlp", groups=groups), inplace=True).eval()
    rc.drop_reference()
    base = tensor_bytes(rc)
    rss0 = rss_bytes()
    g = torch.Generator().manual_seed(0)
    for i in range(tasks):
        rc.add_task(f"t{i}", num_classes=CLASSES, init="random", generator=g)
    rc.set_task("t0")
    payload = sum(t.numel() * t.element_size() for t in rc.task_tensors("t0").values())
    banks = sum(b.templates.numel() * b.templates.element_size() for b in rc.banks.values())
    plain = tensor_bytes(rc.materialize("t0"))
    measured = tensor_bytes(rc)
    bound = base + tasks * payload  # backbone + banks (+ the base task) + T payloads
    return rc, {
        "T": tasks, "payload_bytes": payload, "banks_bytes": banks, "base_bytes": base,
        "tensor_bytes": measured, "rss_growth_bytes": rss_bytes() - rss0, "bound_bytes": bound,
        "tensor_ratio_to_bound": measured / bound, "rss_ratio_to_payloads": (rss_bytes() - rss0) / max(1, tasks * payload),
        "plain_models_bytes": tasks * plain, "plain_model_bytes": plain,
    }


def build_peft(name: str, image: int | None, tasks: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model, _ = make_model(name, image)
    cfg = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=["qkv"], init_lora_weights=False)
    peft_model = get_peft_model(model, cfg, adapter_name="t0")
    for i in range(1, tasks):
        peft_model.add_adapter(f"t{i}", cfg)
    return peft_model.eval()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, image: int | None, task_counts: list[int], batch: int, repeats: int,
                peft_max: int, time_tasks: set[int], warmup: bool) -> list[dict]:
    _, size = make_model(name, image)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    rows_out = []
    for tasks in task_counts:
        rc, mem = build_recast(name, image, tasks)
        if tasks not in time_tasks:
            rows_out.append({"model": name, "T": tasks, "batch": batch, "memory": mem})
            print(json.dumps({"model": name, "T": tasks, "memory_ratio": mem["tensor_ratio_to_bound"]}), flush=True)
            continue
        rows = [f"t{i % tasks}" for i in range(batch)]
        distinct = list(dict.fromkeys(rows))
        index = {t: torch.tensor([i for i, r in enumerate(rows) if r == t]) for t in distinct}

        def single():  # t0 is active (task_by_task restores it)
            rc(x)

        def mixed(strategy):
            def run():
                rc.mixed_strategy = strategy
                rc(x, tasks=rows)
            return run

        def task_by_task():
            outs = []
            for t in distinct:
                rc.set_task(t)
                outs.append(rc(x[index[t]]))
            rc.set_task("t0")

        cases = {"single": single, "mixed": mixed("auto"), "shared": mixed("shared"),
                 "grouped": mixed("grouped"), "batched": mixed("batched"), "loop": mixed("loop"),
                 "task_by_task": task_by_task}
        peft_model = None
        if tasks <= peft_max:
            peft_model = build_peft(name, image, tasks)
            cases["peft"] = lambda: peft_model(x, adapter_names=rows)
        with torch.no_grad():
            for fn in cases.values() if warmup else ():
                fn()
            rc.mixed_strategy = "auto"
            rc(x, tasks=rows)
            picks = dict(rc.last_routing.picks) if rc.last_routing is not None else {}
            times = {k: [] for k in cases}
            names = list(cases)
            for rep in range(repeats):  # interleaved: load changes hit every case alike; the order is
                for k in names[rep % len(names):] + names[: rep % len(names)]:  # rotated: no case always
                    times[k].append(timed(cases[k], 1))  # runs right after the same one
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        fastest = min(FORCED, key=med.get)
        row = {"model": name, "T": tasks, "batch": batch, "distinct_per_batch": len(distinct),
               "seconds": med, "picks": sorted(set(picks.values())),
               "mixed_vs_single": med["single"] / med["mixed"],
               "mixed_vs_task_by_task": med["task_by_task"] / med["mixed"],
               "mixed_vs_peft": med["peft"] / med["mixed"] if "peft" in med else None,
               "fastest_forced": fastest, "auto_vs_fastest": med[fastest] / med["mixed"],
               "auto_vs_fastest_min": min(best[k] for k in FORCED) / best["mixed"], "min_seconds": best,
               "auto_vs_fastest_paired": statistics.median(f / m for f, m in zip(times[fastest], times["mixed"])),
               "pick_vs_fastest_min": pick_vs_fastest(picks, best),
               "pick_ok": med["mixed"] <= PICK_TOLERANCE * med[fastest], "memory": mem}
        rows_out.append(row)
        print(json.dumps({k: row[k] for k in ("model", "T", "mixed_vs_single", "mixed_vs_task_by_task",
                                               "mixed_vs_peft", "fastest_forced", "auto_vs_fastest",
                                               "auto_vs_fastest_min", "auto_vs_fastest_paired", "pick_vs_fastest_min", "pick_ok",
                                               "picks")}), flush=True)
        rc = peft_model = None  # freed before the next model
    return rows_out


def pick_vs_fastest(picks: dict[str, str], best: dict[str, float]) -> float | None:
    """The fastest forced strategy's time over that of the strategy auto picked (fastest repeats):
    whether the pick is right, apart from the noise of timing the auto run itself. None where
    auto ran the ordinary forward (one task) or mixed strategies across layers."""
    chosen = set(picks.values())
    if len(chosen) != 1 or not chosen <= set(FORCED):
        return None
    return min(best[k] for k in FORCED) / best[chosen.pop()]


def markdown(rows: list[dict]) -> str:
    lines = ["| model | T | single s | mixed (auto) s | shared s | grouped s | batched s | loop s | (a) task-by-task s | "
             "(b) PEFT s | mixed/single thr. | vs (a) | vs (b) | pick | fastest forced | auto vs fastest (median; min; paired) | "
             "pick forced vs fastest (min) | auto pick ok |", "|---" * 18 + "|"]
    for r in rows:
        if "seconds" not in r:
            continue
        s = r["seconds"]
        peft = f"{s['peft']:.3f}" if "peft" in s else "-"
        vs_b = f"{r['mixed_vs_peft']:.2f}x" if r["mixed_vs_peft"] else "-"
        pick = f"{r['pick_vs_fastest_min']:.2f}x" if r["pick_vs_fastest_min"] is not None else "-"
        lines.append(f"| {r['model']} | {r['T']} | {s['single']:.3f} | {s['mixed']:.3f} | {s['shared']:.3f} | "
                     f"{s['grouped']:.3f} | {s['batched']:.3f} | {s['loop']:.3f} | {s['task_by_task']:.3f} | {peft} | "
                     f"{r['mixed_vs_single']:.2f}x | {r['mixed_vs_task_by_task']:.2f}x | {vs_b} | "
                     f"{'/'.join(r['picks']) or '(ordinary forward)'} | {r['fastest_forced']} | "
                     f"{r['auto_vs_fastest']:.2f}x; {r['auto_vs_fastest_min']:.2f}x; {r['auto_vs_fastest_paired']:.2f}x | "
                     f"{pick} | {r['pick_ok']} |")
    lines += ["", "| model | T | payload B | banks B | RECAST tensors MB | bound MB | ratio | RSS growth / T payloads | "
              "(c) T plain models MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["memory"]
        lines.append(f"| {r['model']} | {r['T']} | {m['payload_bytes']} | {m['banks_bytes']} | "
                     f"{m['tensor_bytes'] / 1e6:.1f} | {m['bound_bytes'] / 1e6:.1f} | {m['tensor_ratio_to_bound']:.3f} | "
                     f"{m['rss_ratio_to_payloads']:.2f} | {m['plain_models_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)


def checks(rows: list[dict]) -> dict[str, str]:
    out = {}
    for r in rows:
        tag = f"{r['model']} T={r['T']}"
        if "seconds" in r:
            out[f"{tag} auto within 5% of the fastest strategy"] = "PASS" if r["pick_ok"] else "FAIL"
        if r["T"] == 64 and "seconds" in r:
            out[f"{tag} mixed>=0.8x single"] = "PASS" if r["mixed_vs_single"] >= 0.8 else "FAIL"
            if r["mixed_vs_peft"] is not None:
                out[f"{tag} mixed>=3x peft"] = "PASS" if r["mixed_vs_peft"] >= 3.0 else "FAIL"
        if r["T"] == 512:
            out[f"{tag} memory<=1.1x bound"] = "PASS" if r["memory"]["tensor_ratio_to_bound"] <= 1.1 else "FAIL"
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="vit_small_patch16_224,test_vit")
    p.add_argument("--tasks", default="1,8,64,512")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=None, help="default: the model's own (224 for ViT-S)")
    p.add_argument("--peft-max", type=int, default=512, help="largest T run through PEFT (adapter creation is slow)")
    p.add_argument("--time-tasks", default="1,8,64", help="T values timed (T=512 has the same 64 distinct tasks "
                   "per batch of 64 as T=64, so by default it is measured for memory only)")
    p.add_argument("--no-warmup", action="store_true", help="skip the warm-up pass (large models)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="test_vit only, 2 repeats")
    p.add_argument("--json-out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.repeats = "test_vit", min(args.repeats, 2)
    torch.set_num_threads(args.threads)
    task_counts = [int(t) for t in args.tasks.split(",")]
    env_before = environment()
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args.image_size, task_counts, args.batch, args.repeats, args.peft_max,
                            {int(t) for t in args.time_tasks.split(",")}, not args.no_warmup)
    result = {"environment": env_before, "environment_after": environment(), "rows": rows, "checks": checks(rows)}
    print(markdown(rows))
    print(json.dumps(result["checks"], indent=1))
    Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json_out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
