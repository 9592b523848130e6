"""ViT-S training throughput at fp32 and under bf16 autocast (issue 28), and peak memory.

    python -m benchmarks.bench_amp [--device cuda] [--batch 128] [--json-out benchmarks/results/gpu/bench_amp.json]

One training step = ``recast.training``'s recipe on synthetic 224 px images: forward and
cross-entropy under ``recast.training.autocast(device, precision)``, backward, grad-norm clipping
at 1.0, AdamW step (full fine-tuning of ``vit_small_patch16_224``, random init: no download).
Per precision: ``--warmup`` untimed steps, then ``--steps`` timed ones (CUDA synchronised);
images/s = batch x steps / seconds. Peak memory: ``torch.cuda.max_memory_allocated`` since that
precision's first step (CPU: not measured). Prints the bf16 / fp32 ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from recast.training import autocast, make_grad_scaler

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--model", default="vit_small_patch16_224", help="timm model name")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--precisions", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    p.add_argument("--json-out", type=Path, default=REPO / "benchmarks" / "results" / "gpu" / "bench_amp.json")
    return p.parse_args(argv)


def measure(args: argparse.Namespace, precision: str) -> dict:
    """Images/s and peak memory of ``args.steps`` training steps at ``precision``."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=100, img_size=args.image_size).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = make_grad_scaler(device, precision)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)

    def step() -> float:
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    model = opt = None  # freed before the next precision's run
    return {"images_per_s": args.batch * args.steps / seconds, "seconds": seconds, "steps": args.steps,
            "peak_mib": peak, "final_loss": loss, "param_dtypes": dtypes}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    rows = {p: measure(args, p) for p in args.precisions.split(",")}
    out = {"model": args.model, "batch": args.batch, "image_size": args.image_size, "device": args.device,
           "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "torch": torch.__version__, "rows": rows}
    if "fp32" in rows and "bf16" in rows:
        out["bf16_over_fp32"] = rows["bf16"]["images_per_s"] / rows["fp32"]["images_per_s"]
    print("| precision | images/s | peak MiB | param dtypes |\n|---|---|---|---|")
    for p, r in rows.items():
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"| {p} | {r['images_per_s']:.1f} | {peak} | {','.join(r['param_dtypes'])} |")
    if "bf16_over_fp32" in out:
        print(f"bf16 / fp32 throughput: {out['bf16_over_fp32']:.2f}x ({args.model}, batch {args.batch}, {out['device_name']})")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
