"""Stage ``evaluate``: the report.

- Forgetting, measured: for each architecture, every task's RECAST payload is loaded, in task
  order, into ONE RecastModel on the shared banks, and every earlier task is re-evaluated after
  each addition (task identity is known, so this must stay exactly unchanged).
- A task-wise accuracy table per architecture (Tables 1/2 style), built with pandas from the
  tune and combine stages' ``results.parquet``: per task the mean ± std of the test accuracy
  over seeds, the average over tasks (mean ± std over seeds) and the number of seeds; with the
  paper configuration (``prepare.suite: paper``) the paper's published average
  (``recast.paper_results``) and our difference to it; forgetting, trainable parameters and bytes
  per task, and wall time. ``reports/{tasks,methods}.parquet`` hold those two tables.
- ``metrics/report.json`` for ``dvc metrics show``; ``reports/params_vs_acc.png`` for
  ``dvc plots``; ``reports/report.md``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recast.baselines.results import forgetting_per_task  # noqa: E402
from recast.paper_results import PAPER_AVG_ACC  # noqa: E402
from recast.data import BatchLoader  # noqa: E402
from recast.training import evaluate  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from stages.backbones import load_backbone  # noqa: E402
from stages.cli import entry, stage_params  # noqa: E402
from stages.common import resolve, validate_section, write_json_atomic  # noqa: E402
from stages.lineage import TaskData, stage_lineage  # noqa: E402
from stages.params import CombineParams, EvaluateParams, PrepareParams, RuntimeParams, TuneParams  # noqa: E402
from stages.specs import task_names  # noqa: E402
from stages.runlog import log_datasets, log_file  # noqa: E402
from stages.tables import accuracies, method_stats, read_results, task_stats, write_parquet  # noqa: E402
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
    rc = bb.recast()
    tr = p_tune.train
    data = resolve(p_tune.data_dir)
    matrix: list[list[float | None]] = []
    for i, task in enumerate(tasks):
        tensors = load_file(str(tune_dir / "payloads" / arch / method / f"{task}-s{p_tune.seeds[0]}.safetensors"))
        rc.load_task_tensors(task, {k: v for k, v in tensors.items() if not k.startswith("extra.")},
                             num_classes=int(rows[i]["num_classes"]))
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


def _pm(mean: float, std: float) -> str:
    """``mean ± std`` in percent; ``-`` for the std of a single seed."""
    return f"{100 * mean:.2f} ± " + ("-" if pd.isna(std) else f"{100 * std:.2f}")


def markdown(summary: dict[str, dict], tasks: pd.DataFrame, methods: pd.DataFrame, forgetting: dict[str, dict],
             mimic: dict, task_order: list[str] | None = None, lineage: pd.DataFrame | None = None) -> str:
    """The report. ``tasks``/``methods``: ``stages.tables.task_stats``/``method_stats`` frames."""
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
    paper = "paper" in methods.columns
    for arch in archs:
        t_arch = tasks[tasks["arch"] == arch]
        present = [t for t in t_arch["task"].unique()]
        order = [t for t in (task_order or []) if t in present] + sorted(set(present) - set(task_order or []))
        head = ["method", *order, "avg (mean ± std over seeds)", "seeds", *(["paper", "ours - paper"] if paper else []),
                "forgetting", "trainable/task", "bytes/task", "wall s"]
        lines += [f"## {arch}: task-wise test accuracy (%), mean ± std over seeds", "",
                  "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        m_arch = methods[methods["arch"] == arch].set_index("method")
        for key, v in sorted(summary.items(), key=lambda kv: kv[1].get("trainable_params", 0) if not isinstance(kv[1].get("trainable_params"), list) else 0):
            a, method = key.split("/", 1)
            if a != arch or method not in m_arch.index:
                continue
            cells_df = t_arch[t_arch["method"] == method].set_index("task")
            cells = [_pm(cells_df.at[t, "mean"], cells_df.at[t, "std"]) if t in cells_df.index else "-" for t in order]
            m = m_arch.loc[method]
            extra = []
            if paper:
                extra = ["-" if pd.isna(m["paper"]) else f"{m['paper']:.1f}",
                         "-" if pd.isna(m["diff"]) else f"{m['diff']:+.2f}"]
            forg = v.get("avg_forgetting")
            if method == "recast" and arch in forgetting:
                forg = forgetting[arch]["avg_forgetting"]
            tp = v.get("trainable_params", "-")
            tp = int(statistics.mean(tp)) if isinstance(tp, list) else (int(tp) if tp != "-" else tp)
            by = v.get("bytes", v.get("bytes_per_task", "-"))
            by = int(statistics.mean(by)) if isinstance(by, list) else (int(by) if by != "-" else by)
            wall = v.get("train_seconds", v.get("wall_time_s", 0))
            wall = sum(wall) if isinstance(wall, list) else wall
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_pm(m['mean'], m['std'])} | {int(m['n_seeds'])} | "
                         + "".join(f"{x} | " for x in extra)
                         + f"{'-' if forg is None else f'{100 * forg:.2f}'} | {tp} | {by} | {wall:.1f} |")
        lines.append("")
    for arch, f in sorted(forgetting.items()):
        lines += [f"## {arch}: RECAST tasks re-evaluated after each new task (one model, shared banks)", "",
                  "| after \\ on | " + " | ".join(f["tasks"]) + " |", "|---" * (len(f["tasks"]) + 1) + "|"]
        for t, row in zip(f["tasks"], f["acc_matrix"]):
            lines.append(f"| {t} | " + " | ".join("" if a is None else f"{100 * a:.2f}" for a in row) + " |")
        lines.append("")
    if lineage is not None and "git_commit" in lineage.columns:
        lines += ["## Lineage", "",
                  "Every accuracy above is the mean over the jobs of `outputs/{tune,combine}/results.parquet`; each "
                  "row there names its MLflow run (`run_id`), code (`git_commit`), params and data digests.", "",
                  "| git commit | dirty | params sha256 | jobs |", "|---|---|---|---|"]
        groups = lineage.groupby(["git_commit", "git_dirty", "params_sha256"], dropna=False).size()
        for (commit, dirty, params), n in groups.items():
            lines.append(f"| {commit} | {dirty} | {str(params)[:16]} | {n} |")
        lines.append("")
    return "\n".join(lines)


def run(p: EvaluateParams, p_tune: TuneParams, rt: RuntimeParams, combine_dir: str = "outputs/combine",
        suite: str = "offline") -> dict[str, Any]:
    lineage = stage_lineage("evaluate")
    summary = {}
    for stage in ("tune", "combine"):
        mpath = resolve(f"metrics/{stage}.json")
        if mpath.exists():
            summary.update(json.loads(mpath.read_text()))
    frame = read_results([resolve(p_tune.out_dir) / "results.parquet", resolve(combine_dir) / "results.parquet"])
    acc = accuracies(frame)
    tasks = task_stats(acc)
    methods = method_stats(acc, PAPER_AVG_ACC if suite == "paper" else None)
    results = frame.to_dict("records")
    mimic = json.loads(resolve("metrics/mimic.json").read_text()) if resolve("metrics/mimic.json").exists() else {}
    forgetting = {arch: f for arch in p.forgetting_archs
                  if (f := recast_forgetting(arch, resolve(p_tune.out_dir), results, p_tune, p.forgetting_method))}
    report_dir = resolve(p.report_dir)
    plot_params_vs_acc(summary, report_dir / "params_vs_acc.png")
    write_parquet(tasks, report_dir / "tasks.parquet")
    write_parquet(methods, report_dir / "methods.parquet")
    md = markdown(summary, tasks, methods, forgetting, mimic, task_names(p_tune), frame)
    (report_dir / "report.md").write_text(md + "\n")
    metrics = {}
    for key, v in summary.items():
        tp = v.get("trainable_params")
        metrics[key] = {"avg_test_acc": round(v["avg_test_acc"], 6),
                        "trainable_params": tp if not isinstance(tp, list) else statistics.mean(tp),
                        "avg_forgetting": forgetting.get(key.split("/")[0], {}).get("avg_forgetting", 0.0)
                        if key.endswith("/recast") else v.get("avg_forgetting")}
    write_json_atomic(resolve("metrics/report.json"), metrics)
    tracker = Tracker("evaluate", rt.experiment, p.model_dump(), tags=lineage.tags())
    data = resolve(p_tune.data_dir)
    log_datasets(tracker, tracker.parent_id, [TaskData.of(t, data / t) for t in task_names(p_tune)], context="eval")
    for name in ("report.md", "params_vs_acc.png", "tasks.parquet", "methods.parquet"):
        log_file(tracker, tracker.parent_id, report_dir / name)
    tracker.finish({f"{k.replace('/', '.')}.avg_test_acc": v["avg_test_acc"] for k, v in metrics.items()})
    return {"metrics": metrics, "forgetting": forgetting}


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("evaluate", EvaluateParams, data)
    p_tune = validate_section("tune", TuneParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    combine = validate_section("combine", CombineParams, data)
    prepare = validate_section("prepare", PrepareParams, data)
    run(p, p_tune, rt, combine.out_dir, prepare.suite)
    print((resolve(p.report_dir) / "report.md").read_text())


entry(__name__, __spec__)
