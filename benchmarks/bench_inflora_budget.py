"""InfLoRA against head-only on the first offline task at the two budgets of the default config.

Issue 22, item 2: is InfLoRA's low first-task accuracy a budget effect? Trains ``finetune_head``
and ``inflora`` (rank 4, as ``tune.continual.options``) on one task with ``run_sequential`` at
the continual budget (``tune.continual``: 3 epochs, lr 1e-3, constant) and at the per-task
budget (``tune.train``: 6 epochs, lr 1e-2, StepLR(4, 0.1), wd 1e-6), and prints test accuracies.

Needs the prepare and pretrain stages' outputs (``data/prepared/offline``, ``outputs/pretrain``):

    python benchmarks/bench_inflora_budget.py --root . --task mnist_lo5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.environment import environment
from recast.baselines import TaskSpec, TrainConfig, make_method, run_sequential
from stages.jobs.inputs import JobInputs, backbone_bundle, task_bundle

BUDGETS = {
    "continual (3 ep, lr 1e-3)": dict(epochs=3, lr=1e-3),
    "per-task (6 ep, lr 1e-2, StepLR 4)": dict(epochs=6, lr=1e-2, step_size=4, gamma=0.1, weight_decay=1e-6),
}
METHODS = {"head_only": ("finetune_head", None), "inflora": ("inflora", {"rank": 4})}


def _inputs(root: Path, task: str) -> JobInputs:
    bundles = {"backbone": backbone_bundle(root / "outputs/pretrain", "vit"),
               "task": task_bundle(root / "data/prepared/offline" / task)}
    keys = {role: f"{b.kind}-{b.digest}" for role, b in bundles.items()}
    payloads = {keys[role]: {n: np.frombuffer(p.read_bytes(), dtype=np.uint8) for n, p in b.files.items()}
                for role, b in bundles.items()}
    return JobInputs(keys, payloads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--task", default="mnist_lo5")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    inputs = _inputs(args.root, args.task)
    data = inputs.task("task")

    def loader(split: str, train: bool):
        return data.loader(split, args.batch_size, 32, train=train, seed=args.seed)

    rows = []
    for budget, kw in BUDGETS.items():
        for label, (name, options) in METHODS.items():
            backbone = inputs.backbone("backbone").plain()
            backbone.reset_classifier(0)
            task = TaskSpec(args.task, data.num_classes, loader("train", True), None, loader("test", False))
            start = time.perf_counter()
            res = run_sequential(make_method(name, backbone, options), [task],
                                 TrainConfig(seed=args.seed, grad_clip=1.0, progress=False, **kw))
            rows.append({"budget": budget, "method": label, "test_acc": res.acc_matrix[0][0],
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"{budget:38s} {label:10s} {100 * res.acc_matrix[0][0]:6.1f} %  ({rows[-1]['seconds']} s)", flush=True)
    print(json.dumps({"rows": rows, "environment": environment()}, indent=1, default=str))


if __name__ == "__main__":
    main()
