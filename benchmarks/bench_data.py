"""Prepared data format: bytes per image and loader images/s vs a ViT-S training step, in one run.

Builds three prepared tasks with ``recast.data.storage.TaskWriter`` from crops of the two
photographs shipped with scikit-learn (``load_sample_images``, 427x640; random boxes of 30-100%
of the short side, so every image differs): ``raw224`` (uint8 pixels at 224, the old format),
``jpeg224`` (JPEG quality 95 at 224, the format of the paper's non-CIFAR tasks) and ``cifar32``
(raw uint8 at 32x32, CIFAR's source resolution). It reports the Parquet bytes per image of
each, then the images/s of ``BatchLoader`` (train split, random resized crop + flip, batch
``--batch``) on the JPEG task at 224 and on the CIFAR task resized to 224, against the images/s
of a ViT-S/16 training step at 224 (forward, backward, AdamW; batch ``--step-batch``) on the
same device. ``--device cuda`` decodes on the GPU (nvjpeg) and trains there. Machine load
(``os.getloadavg``) is recorded before and after. Writes ``benchmarks/results/bench_data.json``.

Usage: ``python -m benchmarks.bench_data [--device cpu] [--images 512] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from recast.data import AugmentPolicy, BatchLoader
from recast.data.storage import TaskWriter, write_task_arrays

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def photo_crops(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, 3, size, size): random square boxes of the sample photographs, resized (bilinear)."""
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(im) for im in load_sample_images().images]
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.uniform(0.3, 1.0) * min(photo.size))
        left, top = rng.integers(0, photo.size[0] - side + 1), rng.integers(0, photo.size[1] - side + 1)
        box = photo.crop((int(left), int(top), int(left) + side, int(top) + side))
        out[i] = np.asarray(box.resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    return out


def build(root: Path, name: str, images: np.ndarray, encoding: str, policy: AugmentPolicy) -> Path:
    n = len(images)
    labels = np.arange(n) % 10
    cut = [0, n - 2 * (n // 10), n - n // 10, n]
    splits = {s: (images[a:b], labels[a:b], [f"{s}:{i}" for i in range(a, b)])
              for s, a, b in zip(("train", "val", "test"), cut[:-1], cut[1:])}
    writer = TaskWriter(root, name, [str(c) for c in range(10)], images.shape[-1], description=name, augment=policy,
                        origin="sklearn sample images", seed=0, val_fraction=0.1, encoding=encoding)
    with writer:
        write_task_arrays(writer, splits)
    return root / name


def bytes_per_image(task_dir: Path) -> float:
    files = [task_dir / f"{s}.parquet" for s in ("train", "val", "test")]
    manifest = json.loads((task_dir / "manifest.json").read_text())
    return sum(f.stat().st_size for f in files) / sum(manifest["counts"].values())


def loader_rate(task_dir: Path, batch: int, size: int, device: str, epochs: int, workers: int) -> float:
    """Images/s of BatchLoader over the train split (augmented), batches on ``device``."""
    loader = BatchLoader(task_dir, "train", batch, size, train=True, seed=0, device=device, workers=workers)
    for _ in loader:  # warm-up (and CUDA context)
        break
    _sync(device)
    n, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, _ in loader:
            n += x.shape[0]
    _sync(device)
    return n / (time.perf_counter() - start)


def step_rate(batch: int, size: int, device: str, steps: int) -> float:
    """Images/s of a ViT-S/16 training step (forward, backward, AdamW) at ``size``."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", num_classes=100, img_size=size).train().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--images", type=int, default=512, help="images per task (80%% train)")
    p.add_argument("--batch", type=int, default=128, help="loader batch")
    p.add_argument("--step-batch", type=int, default=0, help="training batch (default: 16 on CPU, 128 on cuda)")
    p.add_argument("--steps", type=int, default=0, help="timed training steps (default: 3 on CPU, 20 on cuda)")
    p.add_argument("--epochs", type=int, default=2, help="loader epochs timed")
    p.add_argument("--threads", type=int, default=2, help="torch threads and JPEG decoding threads on CPU")
    p.add_argument("--json-out", type=Path, default=RESULTS_DIR / "bench_data.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    step_batch = args.step_batch or (128 if args.device == "cuda" else 16)
    steps = args.steps or (20 if args.device == "cuda" else 3)
    load_before = os.getloadavg()
    photos = photo_crops(args.images, 224, seed=0)
    small = photo_crops(args.images, 32, seed=1)
    resized = AugmentPolicy("resized", 0, True, scale_min=0.25)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tasks = {"raw224": build(root, "raw224", photos, "raw", resized),
                 "jpeg224": build(root, "jpeg224", photos, "jpeg", resized),
                 "cifar32": build(root, "cifar32", small, "raw", AugmentPolicy("pad", 4, True))}
        sizes = {name: bytes_per_image(d) for name, d in tasks.items()}
        loaders = {name: loader_rate(tasks[name], args.batch, 224, args.device, args.epochs, args.threads)
                   for name in ("jpeg224", "cifar32")}
    step = step_rate(step_batch, 224, args.device, steps)
    env = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(), "threads": args.threads,
           "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
           "loadavg_before": [round(v, 2) for v in load_before],
           "loadavg_after": [round(v, 2) for v in os.getloadavg()]}
    results = {"benchmark": "bench_data", "environment": env, "images": args.images, "loader_batch": args.batch,
               "step_batch": step_batch, "bytes_per_image": {k: round(v, 1) for k, v in sizes.items()},
               "raw_uint8_224_bytes": 3 * 224 * 224,
               "loader_images_per_s": {k: round(v, 1) for k, v in loaders.items()},
               "vit_s_step_images_per_s": round(step, 2),
               "loader_over_step": {k: round(v / step, 2) for k, v in loaders.items()}}
    print(f"\nData format, {env['device']}, {args.threads} threads, load average {env['loadavg_before']} -> "
          f"{env['loadavg_after']} ({env['cpus']} CPUs)\n")
    print("| stored form | bytes/image |\n|---|---|")
    for k, v in sizes.items():
        print(f"| {k} | {v:,.0f} |")
    print("\n| loader (train, 224, augmented) | images/s | ViT-S step images/s | loader / step |\n|---|---|---|---|")
    for k, v in loaders.items():
        print(f"| {k} | {v:,.1f} | {step:,.2f} | {v / step:,.1f} |")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
