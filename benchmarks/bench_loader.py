"""Is data loading a bottleneck? Loader images/s vs one training step of timm ``test_vit``.

Builds the offline suite in a temp dir (unless ``--task-dir`` is given), then times
(1) ``BatchLoader`` over the train split with augmentation and (2) a coefficient-tuning-like
step (forward, backward through every layer, AdamW) of ``test_vit`` at 32x32, both at
batch 128 on CPU. Usage: ``python -m benchmarks.bench_loader [--threads 2]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch

from recast.data import BatchLoader, build_offline_suite


def loader_rate(task_dir: Path, batch_size: int, image_size: int, epochs: int) -> float:
    """Images/s of BatchLoader (train split, augmentation on)."""
    loader = BatchLoader(task_dir, "train", batch_size, image_size, train=True, seed=0)
    for _ in loader:  # warm-up
        pass
    n, start = 0, time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for _, y in loader:
            n += len(y)
    return n / (time.perf_counter() - start)


def train_step_rate(batch_size: int, image_size: int, steps: int) -> float:
    """Images/s of forward + backward + AdamW on timm test_vit."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, img_size=image_size).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch_size,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task-dir", type=Path, default=None, help="a prepared task (default: build mnist_color)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        task_dir = args.task_dir
        if task_dir is None:
            build_offline_suite(Path(tmp), tasks=["mnist_color"], image_size=args.image_size)
            task_dir = Path(tmp) / "mnist_color"
        load = loader_rate(task_dir, args.batch_size, args.image_size, args.epochs)
    train = train_step_rate(args.batch_size, args.image_size, args.steps)
    shape = f"batch {args.batch_size}, {args.image_size}x{args.image_size}"
    print(f"loader     : {load:12,.0f} images/s  ({shape}, augmented)")
    print(f"train step : {train:12,.0f} images/s  (timm test_vit fwd+bwd+AdamW, {args.threads} threads)")
    print(f"ratio      : {load / train:12.1f} x  (loader / training; > 1 means loading is not the bottleneck)")


if __name__ == "__main__":
    main()
