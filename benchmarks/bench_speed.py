"""Speed benchmark: materialized inference and one RECAST-FT step vs the plain timm model.

For each configuration (ViT-S with ``recast_mlp``, ViT-S with fc1+fc2+qkv+proj, ResNet-34 with
``recast_resnet``; timm models with ``pretrained=False``):

(a) inference: ``rc.materialize(task)`` vs the original timm model, same batch, interleaved
    repeats in one process, median; target ratio <= 1.05 (same architecture, so materialize
    must leave nothing slow behind). The RecastModel's own forward (weights generated on every
    call) is reported beside it, without a target.
(b) training: one RECAST-FT step (task coefficients + a new 100-class head trainable, AdamW) vs
    one full fine-tuning step of the plain model (all parameters, AdamW), same batch; forward +
    backward + optimizer step, BatchNorm statistics frozen in both (as ``recast.training.fit``);
    target ratio <= 1.2. Peak memory of each mode is measured in a separate subprocess: on CPU the
    peak RSS increase over the RSS after building model and optimizer (Linux: the peak is reset
    through /proc/self/clear_refs and read from VmHWM; elsewhere ru_maxrss), on CUDA
    ``torch.cuda.max_memory_allocated`` over the allocation after building.
    The cost of generating every templated weight (forward + backward of eq. 1-2 alone) is
    reported as a share of the RECAST-FT step; a failing ratio adds a torch.profiler op table.

Usage: ``python -m benchmarks.bench_speed [--device cpu] [--batch 16] [--repeats 5]``.
Prints a Markdown table with PASS/FAIL per target, writes ``benchmarks/results/bench_speed.json``
and exits 0 unless something crashes.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import recast
from benchmarks.environment import environment
from recast.training import train_mode
from stages.jobs.memory import current_rss_mb, lifetime_peak_mb, peak_memory, reset_peak_memory

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
VIT_TARGETS = ("mlp.fc1", "mlp.fc2", "attn.qkv", "attn.proj")
CONFIGS: dict[str, tuple[str, Callable[[], recast.RecastConfig]]] = {
    "vit_recast_mlp": ("vit", lambda: recast.preset("recast_mlp")),
    "vit_all4": ("vit", lambda: recast.RecastConfig(targets=VIT_TARGETS, groups=6, templates=2, coef_sets=2)),
    "resnet_recast_resnet": ("resnet", lambda: recast.preset("recast_resnet")),
}
INFERENCE_RATIO_TARGET = 1.05
TRAIN_RATIO_TARGET = 1.2
NUM_CLASSES = 100
MODES = ("recast_ft", "full_ft")


# ----------------------------------------------------------------------------- models
def build_original(spec: dict) -> nn.Module:
    """The plain timm model of ``spec`` (random init, seeded), in eval mode on its device."""
    torch.manual_seed(spec["seed"])
    family, _ = CONFIGS[spec["config"]]
    if family == "vit":
        model = timm.create_model(spec["vit_model"], pretrained=False, img_size=spec["image_size"])
    else:
        layers = spec["resnet_layers"]
        kwargs = {"layers": tuple(layers)} if layers else {}
        model = timm.create_model(spec["resnet_model"], pretrained=False, **kwargs)
    return model.eval().to(spec["device"])


def make_batch(spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed random batch (images, labels in [0, NUM_CLASSES)) shared by every mode."""
    gen = torch.Generator().manual_seed(spec["seed"])
    x = torch.randn(spec["batch"], 3, spec["image_size"], spec["image_size"], generator=gen)
    y = torch.randint(0, NUM_CLASSES, (spec["batch"],), generator=gen)
    return x.to(spec["device"]), y.to(spec["device"])


def recast_ft_setup(original: nn.Module, config: recast.RecastConfig) -> recast.RecastModel:
    """RecastModel reconstructed by the closed form, with task "t" (new head) active and frozen."""
    rc = recast.apply(original, config)
    recast.mimic(rc, recast.MimicryConfig(method="closed_form", progress=False))
    rc.add_task("t", num_classes=NUM_CLASSES)
    rc.set_task("t")
    return rc


def full_ft_setup(original: nn.Module) -> nn.Module:
    """A copy of the plain model with a new NUM_CLASSES head, every parameter trainable."""
    model = copy.deepcopy(original)
    model.reset_classifier(NUM_CLASSES)
    model.to(next(original.parameters()).device)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Callable[[], None], int]:
    """One training step (forward, backward, AdamW) over the parameters that require grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-6)  # paper's tuning recipe
    train_mode(model, freeze_bn_stats=True)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step, sum(p.numel() for p in params)


# ----------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(fns: dict[str, Callable[[], object]], warmup: int, repeats: int, device: str,
                        seed: int = 0) -> dict:
    """Median (and min) seconds of each function. Calls are interleaved, in a shuffled order each
    round, so load drifts and order effects hit all of them alike."""
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "all_s": ts} for name, ts in times.items()}


def paired_ratio(timings: dict, num: str, den: str) -> float:
    """Median over rounds of num/den measured in the same round (robust to slow load drifts)."""
    return statistics.median(a / b for a, b in zip(timings[num]["all_s"], timings[den]["all_s"]))


def weight_generation_s(rc: recast.RecastModel, warmup: int, repeats: int, device: str) -> float:
    """Median seconds to generate every templated weight of the active task and backprop into
    its coefficients (eq. 1-2 alone, the work RECAST-FT adds to a plain step)."""
    layers = [layer for _, layer in rc.recast_layers()]
    with torch.no_grad():
        grads = [torch.ones_like(layer.weight) for layer in layers]  # dense, like a real dW

    def generate() -> None:
        torch.autograd.backward([layer.weight for layer in layers], grads)

    out = interleaved_medians({"gen": generate}, warmup, repeats, device)["gen"]["median_s"]
    for layer in layers:
        layer.coefs[layer.task].grad = None
    return out


def profile_step(step: Callable[[], None], rows: int = 12) -> str:
    """torch.profiler table (self CPU time) of one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ----------------------------------------------------------------------------- memory
def measure_memory(spec: dict, mode: str, steps: int = 2) -> dict:
    """Peak memory increase of ``steps`` training steps of ``mode`` over the state after setup."""
    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])
    original = build_original(spec)
    if mode == "recast_ft":
        model = recast_ft_setup(original, CONFIGS[spec["config"]][1]())
        model.drop_reference()  # a tuning run holds no copy of the original weights
    else:
        model = full_ft_setup(original)
    del original
    x, y = make_batch(spec)
    step, trainable = make_step(model, x, y)
    gc.collect()
    mib = 1024 * 1024
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        method = "torch.cuda.max_memory_allocated"
    else:
        if reset_peak_memory():
            base = current_rss_mb() * mib
            method = "VmHWM after clear_refs"
        else:
            base = lifetime_peak_mb() * mib
            method = "ru_maxrss (peak may include setup)"
        for _ in range(steps):
            step()
        peak = peak_memory(start_rss_mb=base / mib)["peak_rss_mb"] * mib
    return {"mode": mode, "trainable": trainable, "base_mib": base / mib, "peak_mib": peak / mib,
            "increase_mib": max(peak - base, 0) / mib, "method": method, "steps": steps}


def memory_in_subprocess(spec: dict, mode: str) -> dict:
    """``measure_memory`` in a fresh interpreter, so the two modes do not share a heap."""
    cmd = [sys.executable, "-m", "benchmarks.bench_speed", "--probe", json.dumps({**spec, "mode": mode})]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- one config
def run_config(spec: dict, warmup: int, repeats: int, memory: str, profile: bool) -> dict:
    """Inference and training timings, memory and verdicts of one configuration."""
    device = spec["device"]
    load_before = [round(v, 2) for v in os.getloadavg()]
    original = build_original(spec)
    config = CONFIGS[spec["config"]][1]()
    x, y = make_batch(spec)

    # (a) inference: materialized vs original (and the RecastModel itself), same batch
    rc = recast.apply(original, config)
    recast.mimic(rc, recast.MimicryConfig(method="closed_form", progress=False))
    base = rc.config.base_task
    rc.set_task(base, freeze=False)
    rc.eval()
    plain = rc.materialize(base).eval()
    with torch.inference_mode():
        ref_out, mat_out = original(x), plain(x)
        output_rel_diff = float((mat_out - ref_out).abs().max() / ref_out.abs().max().clamp_min(1e-12))

        def infer(model: nn.Module) -> Callable[[], object]:
            return lambda: model(x)

        inference = interleaved_medians(
            {"original": infer(original), "materialized": infer(plain), "recast_forward": infer(rc)},
            warmup, repeats, device)
    del plain

    # (b) training step: RECAST-FT vs full fine-tuning, same batch
    rc.add_task("t", num_classes=NUM_CLASSES)
    rc.set_task("t")
    rc.drop_reference()
    recast_step, recast_trainable = make_step(rc, x, y)
    full = full_ft_setup(original)
    full_step, full_trainable = make_step(full, x, y)
    training = interleaved_medians({"recast_ft": recast_step, "full_ft": full_step}, warmup, repeats, device)
    gen_s = weight_generation_s(rc, warmup, repeats, device)

    inf_ratio = inference["materialized"]["median_s"] / inference["original"]["median_s"]
    train_ratio = training["recast_ft"]["median_s"] / training["full_ft"]["median_s"]
    row = {
        "config": spec["config"],
        "model": spec["vit_model"] if CONFIGS[spec["config"]][0] == "vit" else spec["resnet_model"],
        "targets": list(config.targets),
        "parameters": recast.count_parameters(rc, "t").as_dict(),
        "inference": inference,
        "inference_ratio": inf_ratio,
        "inference_ratio_paired": paired_ratio(inference, "materialized", "original"),
        "inference_ratio_of_mins": inference["materialized"]["min_s"] / inference["original"]["min_s"],
        "recast_forward_ratio": inference["recast_forward"]["median_s"] / inference["original"]["median_s"],
        "materialized_output_rel_diff": output_rel_diff,
        "training": training,
        "train_ratio": train_ratio,
        "train_ratio_paired": paired_ratio(training, "recast_ft", "full_ft"),
        "train_ratio_of_mins": training["recast_ft"]["min_s"] / training["full_ft"]["min_s"],
        "trainable": {"recast_ft": recast_trainable, "full_ft": full_trainable},
        "weight_generation_s": gen_s,
        "weight_generation_share": gen_s / training["recast_ft"]["median_s"],
        "load_avg_before_after": [load_before, [round(v, 2) for v in os.getloadavg()]],
        "checks": {
            "inference_ratio<=1.05": "PASS" if inf_ratio <= INFERENCE_RATIO_TARGET else "FAIL",
            "train_ratio<=1.2": "PASS" if train_ratio <= TRAIN_RATIO_TARGET else "FAIL",
        },
    }
    if profile or train_ratio > TRAIN_RATIO_TARGET:
        row["profile_recast_ft"] = profile_step(recast_step)
        row["profile_full_ft"] = profile_step(full_step)
    del rc, full, original
    gc.collect()
    if memory != "off":
        probe = memory_in_subprocess if memory == "subprocess" else measure_memory
        row["memory"] = {mode: probe(spec, mode) for mode in MODES}
        full_mib = max(row["memory"]["full_ft"]["increase_mib"], 1e-9)
        row["memory_ratio"] = row["memory"]["recast_ft"]["increase_mib"] / full_mib
    return row


def markdown_table(rows: list[dict]) -> str:
    """One line per configuration: medians (ms), ratios of medians (targets) with the paired-round
    ratio and the ratio of minima beside them, weight-generation share, peak memory, verdicts."""
    head = ("| config | original ms | materialized ms | ratio (paired, mins) | RecastModel fwd ms "
            "| full FT step ms | RECAST-FT step ms | ratio (paired, mins) | weight gen share "
            "| full FT peak +MiB | RECAST-FT peak +MiB | targets |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        inf, tr = r["inference"], r["training"]
        mem = r.get("memory")
        full_mem = f"{mem['full_ft']['increase_mib']:.0f}" if mem else "-"
        rc_mem = f"{mem['recast_ft']['increase_mib']:.0f}" if mem else "-"
        checks = ", ".join(f"{k} {v}" for k, v in r["checks"].items())
        lines.append(
            f"| {r['config']} ({r['model']}) | {inf['original']['median_s'] * 1e3:.0f} "
            f"| {inf['materialized']['median_s'] * 1e3:.0f} | {r['inference_ratio']:.3f} "
            f"({r['inference_ratio_paired']:.3f}, {r['inference_ratio_of_mins']:.3f}) "
            f"| {inf['recast_forward']['median_s'] * 1e3:.0f} | {tr['full_ft']['median_s'] * 1e3:.0f} "
            f"| {tr['recast_ft']['median_s'] * 1e3:.0f} | {r['train_ratio']:.3f} "
            f"({r['train_ratio_paired']:.3f}, {r['train_ratio_of_mins']:.3f}) "
            f"| {r['weight_generation_share'] * 100:.1f} % | {full_mem} | {rc_mem} | {checks} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per mode (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per mode first")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on CPU")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--vit-model", default="vit_small_patch16_224")
    p.add_argument("--resnet-model", default="resnet34")
    p.add_argument("--resnet-layers", default="", help="blocks per stage, e.g. 2,3,2,2 (default: the model's)")
    p.add_argument("--memory", choices=("subprocess", "inprocess", "off"), default="subprocess",
                   help="peak-memory probe: a fresh process per mode (accurate), this process (quick), or none")
    p.add_argument("--profile", action="store_true", help="add torch.profiler tables even when the ratio passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=RESULTS_DIR / "bench_speed.json")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one memory probe (JSON spec)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run every configuration, print the table, write the JSON; returns the results."""
    args = parse_args(argv)
    if args.probe is not None:
        spec = json.loads(args.probe)
        result = measure_memory(spec, spec["mode"])
        print(json.dumps(result))
        return result
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    names = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    env = environment(args.device)
    rows = []
    for name in names:
        print(f"[bench_speed] {name}", file=sys.stderr, flush=True)
        spec = {
            "config": name, "device": args.device, "threads": args.threads, "batch": args.batch,
            "image_size": args.image_size, "seed": args.seed, "vit_model": args.vit_model,
            "resnet_model": args.resnet_model,
            "resnet_layers": [int(v) for v in args.resnet_layers.split(",")] if args.resnet_layers else None,
        }
        rows.append(run_config(spec, args.warmup, args.repeats, args.memory, args.profile))
    table = markdown_table(rows)
    print(f"\nSpeed, {env['device']}, {env['threads']} threads, batch {args.batch} at {args.image_size}, "
          f"median of {args.repeats}, load {env['load_avg_1_5_15']}, {env['date']}\n")
    print(table)
    for r in rows:
        if "profile_recast_ft" in r:
            print(f"\nprofile of one RECAST-FT step, {r['config']}:\n{r['profile_recast_ft']}")
    results = {"benchmark": "bench_speed", "environment": env,
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "rows": rows, "table": table, "load_avg_after": [round(v, 2) for v in os.getloadavg()]}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[bench_speed] wrote {args.json_out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
