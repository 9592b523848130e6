"""Where InfLoRA's forgetting comes from (issue 22, item 2), measured on the default tasks.

Runs InfLoRA sequentially over ``params.yaml``'s tasks with the tune stage's recipe (the
equal budget: ``tune.train`` at ``tune.lr_by_method``), and after each task measures, for each
earlier task j and each target layer:

- ``outside``: the fraction of task j's input energy (trace of its input covariance C_j, taken
  when task j started) that lies outside the feature memory, ``tr((I - M M^T) C_j) / tr(C_j)``;
- ``leak``: how much the merged updates since task j moved that layer's output on task j's
  inputs, ``tr(D C_j D^T) / tr(W_j C_j W_j^T)`` with D the weight change since task j ended;

plus the accuracy matrix. ``--variants`` reruns with other settings (``threshold=0.99``,
``energy=linear``, ``lr=0.001``, ...) so a cause can be confirmed by removing it. Needs the
prepare and pretrain stages' outputs:

    python -m benchmarks.bench_inflora_forgetting --root . [--variants "lr=0.00814" ...]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.environment import environment
from recast.baselines import TaskSpec, make_method, run_sequential
from recast.baselines.inflora import InfLoRA
from stages.config.params import TrainParams
from stages.jobs.inputs import InputStore, backbone_bundle, task_bundle


class Probe:
    """Wraps an InfLoRA method's hooks to record each task's input covariances and the weights."""

    def __init__(self, method: InfLoRA) -> None:
        self.method, self.cov, self.after, self.rows = method, [], [], []
        before, after = method.before_task, method.after_task

        def before_task(task):
            self.cov.append({n: c.clone() for n, c in method.input_covariances(task.train).items()})
            before(task)

        def after_task(task, train):
            after(task, train)
            self.after.append(self.weights())
            self.measure()

        method.before_task, method.after_task = before_task, after_task

    def weights(self) -> dict[str, torch.Tensor]:
        bb = self.method.net.backbone
        return {n: bb.get_submodule(n).weight.detach().double().clone() for n in self.method.target_names}

    def measure(self) -> None:
        now, t = self.weights(), len(self.after) - 1
        for j in range(t):
            outside, leak = [], []
            for name in self.method.target_names:
                c, mem = self.cov[j][name], self.method.memory[name]
                outside.append(float(torch.trace(c - mem @ (mem.T @ c)) / torch.trace(c)))
                d, w = now[name] - self.after[j][name], self.after[j][name]
                leak.append(float(torch.trace(d @ c @ d.T) / torch.trace(w @ c @ w.T)))
            self.rows.append({"after_task": t, "task": j, "outside_mean": float(np.mean(outside)),
                              "outside_max": float(np.max(outside)), "leak_mean": float(np.mean(leak)),
                              "leak_max": float(np.max(leak)),
                              "memory_dims": [int(self.method.memory[n].shape[1]) for n in self.method.target_names]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("."))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--variants", nargs="*", default=[""], help="'' (as params) or comma-separated key=value: "
                    "lr, epochs, or an InfLoRAConfig field (threshold, threshold_end, rank, energy)")
    args = ap.parse_args()
    params = yaml.safe_load((args.root / args.params).read_text())
    tune = params["tune"]
    suite = json.loads((args.root / "data/prepared/offline/suite.json").read_text())["tasks"]
    tasks = list(tune.get("tasks") or suite)
    tr = TrainParams(**tune["train"])
    lr = tune["lr_by_method"]["archs"]["vit"]["inflora"]
    options = dict(tune["continual"]["options"].get("inflora", {}))
    bundles = {"backbone": backbone_bundle(args.root / "outputs/pretrain", "vit"),
               **{f"task/{t}": task_bundle(args.root / "data/prepared/offline" / t) for t in tasks}}
    store = InputStore(None)
    inputs = store.local({role: store.add(bundle) for role, bundle in bundles.items()})
    out = []
    for variant in args.variants:
        kv = dict(item.split("=", 1) for item in variant.split(",") if item)
        run_lr = float(kv.pop("lr", lr))
        cfg = replace(tr.recipe("cpu", run_lr), seed=args.seed, freeze_bn_stats=False)
        if "epochs" in kv:
            cfg = replace(cfg, epochs=int(kv.pop("epochs")))
        opts = {**options, **{k: (v if k == "energy" else float(v) if "." in v else int(v)) for k, v in kv.items()}}
        torch.manual_seed(args.seed)
        backbone = inputs.backbone("backbone").plain()
        backbone.reset_classifier(0)
        method = make_method("inflora", backbone, opts)
        probe = Probe(method)
        specs = []
        for name in tasks:
            data = inputs.task(f"task/{name}")

            def mk(split, train, data=data):
                return data.loader(split, tr.batch_size, tr.image_size, train=train, seed=args.seed)

            specs.append(TaskSpec(name, data.num_classes, mk("train", True), None, mk("test", False)))
        start = time.perf_counter()
        res = run_sequential(method, specs, cfg, progress=False)
        m = res.acc_matrix
        final = [m[-1][j] for j in range(len(tasks))]
        row = {"variant": variant or "as params", "lr": run_lr, "options": opts, "matrix": m,
               "average": float(np.mean(final)), "forgetting": float(np.mean(
                   [max(m[i][j] for i in range(j, len(tasks) - 1)) - m[-1][j] for j in range(len(tasks) - 1)])),
               "probe": probe.rows, "seconds": round(time.perf_counter() - start, 1)}
        out.append(row)
        print(f"{row['variant']:28s} avg {100 * row['average']:5.2f}  forgetting {100 * row['forgetting']:5.2f}  "
              f"task0 {' -> '.join(f'{100 * m[i][0]:.1f}' for i in range(len(tasks)))}", flush=True)
        for p in probe.rows:
            print(f"    after task {p['after_task']} on task {p['task']}: outside memory {p['outside_mean']:.3f} "
                  f"(max {p['outside_max']:.3f}), output change {p['leak_mean']:.4f} (max {p['leak_max']:.4f}), "
                  f"memory dims {p['memory_dims']}", flush=True)
    print(json.dumps({"rows": out, "environment": environment()}, default=str))


if __name__ == "__main__":
    main()
