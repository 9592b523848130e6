"""Stage ``evaluate``: the report.

- Forgetting, measured: for each architecture, every task's RECAST payload is loaded, in task
  order, into ONE RecastModel on the shared banks, and every earlier task is re-evaluated after
  each addition (task identity is known, so this must stay exactly unchanged).
- A task-wise accuracy table per architecture (Tables 1/2 style) with average accuracy,
  forgetting, trainable parameters and bytes per task, and wall time.
- ``metrics/report.json`` for ``dvc metrics show``; ``reports/params_vs_acc.png`` for
  ``dvc plots``; ``reports/report.md``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recast.baselines.results import forgetting_per_task  # noqa: E402
from recast.data import BatchLoader  # noqa: E402
from recast.training import evaluate  # noqa: E402
from stages.backbones import bank_meta, load_backbone, load_verified, read_sidecar  # noqa: E402
from stages.cli import entry, stage_params  # noqa: E402
from stages.common import IntegrityError, metrics_path, resolve, validate_section, write_json_atomic  # noqa: E402
from stages.params import CombineParams, EvaluateParams, MimicParams, RuntimeParams, TuneParams  # noqa: E402
from stages.specs import task_names  # noqa: E402
from stages.tracking import Tracker  # noqa: E402


def recast_forgetting(arch: str, tune_dir: Path, results: list[dict], p_tune: TuneParams,
                      method: str = "recast") -> dict[str, Any]:
    """Sequentially load every task's RECAST payload into one model; re-evaluate earlier tasks."""
    order = {t: i for i, t in enumerate(task_names(p_tune))}
    rows = sorted((r for r in results if r["arch"] == arch and r["method"] == method and r["seed"] == p_tune.seeds[0]),
                  key=lambda r: order.get(r["task"], len(order)))
    tasks = [r["task"] for r in rows]
    if not tasks:
        return {}
    bb = load_backbone(arch, resolve(p_tune.pretrain_dir), resolve(p_tune.mimic_dir))
    banks_sha = bank_meta(resolve(p_tune.mimic_dir), arch)["bank_sha256"]
    rc = bb.recast()
    tr = p_tune.train
    data = resolve(p_tune.data_dir)
    matrix: list[list[float | None]] = []
    for i, task in enumerate(tasks):
        stem = tune_dir / "payloads" / arch / method / f"{task}-s{p_tune.seeds[0]}"
        side = read_sidecar(stem.with_name(stem.name + ".json"))
        if side.get("bank_sha256") != banks_sha:
            raise IntegrityError(f"{stem}.safetensors: payload trained against banks {str(side.get('bank_sha256'))[:12]}, "
                                 f"the mimic stage's banks are {banks_sha[:12]}; re-run the tune stage")
        tensors = load_verified(stem.with_name(stem.name + ".safetensors"), side.get("payload_sha256"))
        rc.load_task_tensors(task, {k: v for k, v in tensors.items() if not k.startswith("extra.")},
                             num_classes=rows[i]["num_classes"])
        row: list[float | None] = []
        for j, prev in enumerate(tasks):
            if j > i:
                row.append(None)
                continue
            rc.set_task(prev, freeze=False)
            row.append(evaluate(rc, BatchLoader(data / prev, "test", 256, tr.image_size, train=False, seed=0,
                                                limit=tr.limit_eval)))
        matrix.append(row)
    final = matrix[-1]
    forgetting = [f for f in forgetting_per_task(matrix) if f is not None]
    standalone = {r["task"]: r["test_acc"] for r in rows}
    return {"tasks": tasks, "acc_matrix": matrix, "avg_forgetting": statistics.mean(forgetting) if forgetting else 0.0,
            "max_abs_diff_vs_standalone": max(abs(final[j] - standalone[t]) for j, t in enumerate(tasks))}


def plot_params_vs_acc(summary: dict[str, dict], path: Path) -> None:
    archs = sorted({k.split("/")[0] for k in summary})
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for key, v in sorted(summary.items()):
            a, method = key.split("/", 1)
            if a != arch or "avg_test_acc" not in v:
                continue
            x = v.get("trainable_params") or v.get("trainable_params_per_task") or 1
            x = statistics.mean(x) if isinstance(x, list) else x
            ax.scatter([x], [100 * v["avg_test_acc"]], s=40)
            ax.annotate(method, (x, 100 * v["avg_test_acc"]), fontsize=8, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters per task (log)")
        ax.set_ylabel("average test accuracy (%)")
        ax.set_title(arch)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def markdown(summary: dict[str, dict], results: list[dict], forgetting: dict[str, dict], mimic: dict,
             task_order: list[str] | None = None) -> str:
    lines = ["# RECAST report", ""]
    if mimic:
        lines += ["## Neural Mimicry", "", "| arch | min weight cos | min feature cos | acc original | acc reconstructed | templates | coefs/task | seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for arch, m in sorted(mimic.items()):
            lines.append(f"| {arch} | {m.get('min_weight_cosine', float('nan')):.6f} | {m.get('min_feature_cosine', float('nan')):.6f} | "
                         f"{100 * m.get('acc_original', float('nan')):.2f} | {100 * m.get('acc_reconstructed', float('nan')):.2f} | "
                         f"{m.get('templates', '')} | {m.get('coefficients_per_task', '')} | {m.get('seconds', 0):.2f} |")
        lines.append("")
    archs = sorted({k.split("/")[0] for k in summary})
    for arch in archs:
        present = {r["task"] for r in results if r["arch"] == arch and not r.get("sequential")}
        tasks = [t for t in (task_order or []) if t in present] + sorted(present - set(task_order or []))
        lines += [f"## {arch}: task-wise test accuracy (%)", "",
                  "| method | " + " | ".join(tasks) + " | avg | forgetting | trainable/task | bytes/task | wall s |",
                  "|---" * (len(tasks) + 6) + "|"]
        for key, v in sorted(summary.items(), key=lambda kv: kv[1].get("trainable_params", 0) if not isinstance(kv[1].get("trainable_params"), list) else 0):
            a, method = key.split("/", 1)
            if a != arch:
                continue
            accs = v.get("test_acc") or dict(zip(v.get("tasks", tasks), v.get("final_acc", [])))
            cells = [f"{100 * accs[t]:.2f}" if t in accs else "-" for t in tasks]
            forg = v.get("avg_forgetting")
            if method == "recast" and arch in forgetting:
                forg = forgetting[arch]["avg_forgetting"]
            tp = v.get("trainable_params", "-")
            tp = int(statistics.mean(tp)) if isinstance(tp, list) else (int(tp) if tp != "-" else tp)
            by = v.get("bytes", v.get("bytes_per_task", "-"))
            by = int(statistics.mean(by)) if isinstance(by, list) else (int(by) if by != "-" else by)
            wall = v.get("train_seconds", v.get("wall_time_s", 0))
            wall = sum(wall) if isinstance(wall, list) else wall
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {100 * v['avg_test_acc']:.2f} | "
                         f"{'-' if forg is None else f'{100 * forg:.2f}'} | {tp} | {by} | {wall:.1f} |")
        lines.append("")
    for arch, f in sorted(forgetting.items()):
        lines += [f"## {arch}: RECAST tasks re-evaluated after each new task (one model, shared banks)", "",
                  "| after \\ on | " + " | ".join(f["tasks"]) + " |", "|---" * (len(f["tasks"]) + 1) + "|"]
        for t, row in zip(f["tasks"], f["acc_matrix"]):
            lines.append(f"| {t} | " + " | ".join("" if a is None else f"{100 * a:.2f}" for a in row) + " |")
        lines.append("")
    return "\n".join(lines)


def run(p: EvaluateParams, p_tune: TuneParams, rt: RuntimeParams, combine_dir: str = "outputs/combine") -> dict[str, Any]:
    results, summary = [], {}
    for stage, out_dir, model in (("tune", p_tune.out_dir, TuneParams), ("combine", combine_dir, CombineParams)):
        path = resolve(out_dir) / "results.json"
        if path.exists():
            results += json.loads(path.read_text())
        mpath = metrics_path(stage, out_dir, model.model_fields["out_dir"].default)
        if mpath.exists():
            summary.update(json.loads(mpath.read_text()))
    mimic_metrics = metrics_path("mimic", p_tune.mimic_dir, MimicParams.model_fields["out_dir"].default)
    mimic = json.loads(mimic_metrics.read_text()) if mimic_metrics.exists() else {}
    forgetting = {arch: f for arch in p.forgetting_archs
                  if (f := recast_forgetting(arch, resolve(p_tune.out_dir), results, p_tune, p.forgetting_method))}
    report_dir = resolve(p.report_dir)
    plot_params_vs_acc(summary, report_dir / "params_vs_acc.png")
    md = markdown(summary, results, forgetting, mimic, task_names(p_tune))
    (report_dir / "report.md").write_text(md + "\n")
    metrics = {}
    for key, v in summary.items():
        tp = v.get("trainable_params")
        metrics[key] = {"avg_test_acc": round(v["avg_test_acc"], 6),
                        "trainable_params": tp if not isinstance(tp, list) else statistics.mean(tp),
                        "avg_forgetting": forgetting.get(key.split("/")[0], {}).get("avg_forgetting", 0.0)
                        if key.endswith("/recast") else v.get("avg_forgetting")}
    write_json_atomic(metrics_path("report", p.report_dir, EvaluateParams.model_fields["report_dir"].default), metrics)
    with Tracker("evaluate", rt.experiment, p.model_dump()) as tracker:
        tracker.log_artifacts(tracker.parent_id, [report_dir / "report.md", report_dir / "params_vs_acc.png"])
        tracker.finish({f"{k.replace('/', '.')}.avg_test_acc": v["avg_test_acc"] for k, v in metrics.items()})
    return {"metrics": metrics, "forgetting": forgetting}


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("evaluate", EvaluateParams, data)
    p_tune = validate_section("tune", TuneParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    combine = validate_section("combine", CombineParams, data)
    run(p, p_tune, rt, combine.out_dir)
    print((resolve(p.report_dir) / "report.md").read_text())


entry(__name__, __spec__)
