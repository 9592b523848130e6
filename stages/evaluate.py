"""Stage ``evaluate``: the report.

- Forgetting, measured: for each architecture, every task's RECAST payload is loaded, in task
  order, into ONE RecastModel on the shared banks, and every earlier task is re-evaluated after
  each addition (task identity is known, so this must stay exactly unchanged). One Ray job per
  architecture (``stages.jobs.fanout.run_jobs``), on ``runtime.device``.
- A task-wise accuracy table per architecture (Tables 1/2 style), built with pandas from the
  tune and combine stages' ``results.parquet``: per task the mean ± std of the test accuracy
  over seeds, the average over tasks (mean ± std over seeds) and the number of seeds; with the
  paper configuration (``prepare.suite: paper``) the paper's published average
  (``recast.paper_results``) and our difference to it; forgetting, method and head parameters
  and bytes per task, and wall time. ``reports/{tasks,methods}.parquet`` hold those two tables.
- ``metrics/report.json`` for ``dvc metrics show``; ``reports/params_vs_acc.png`` for
  ``dvc plots``; ``reports/report.md``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recast.io import load_payload  # noqa: E402
from recast.paper_results import PAPER_AVG_ACC  # noqa: E402
from recast.training import evaluate  # noqa: E402
from stages.jobs.backbones import bank_meta, load_verified, read_sidecar  # noqa: E402
from stages.config.cli import entry, stage_params  # noqa: E402
from stages.config.common import (  # noqa: E402
    IntegrityError,
    metrics_path,
    resolve,
    validate_section,
    write_json_atomic,
)
from stages.report.curves import save_figure  # noqa: E402
from stages.jobs.fanout import run_jobs  # noqa: E402
from stages.jobs.inputs import (  # noqa: E402
    InputStore,
    JobInputs,
    backbone_bundle,
    banks_bundle,
    file_bundle,
    task_bundle,
)
from stages.tracking.lineage import TaskData, stage_lineage  # noqa: E402
from stages.config.params import (  # noqa: E402
    CombineParams,
    EvaluateParams,
    MimicParams,
    PrepareParams,
    RuntimeParams,
    TuneParams,
)
from stages.tracking.runlog import log_datasets  # noqa: E402
from stages.jobs.runtime import job_device  # noqa: E402
from stages.jobs.specs import task_names  # noqa: E402
from stages.report.tables import (  # noqa: E402
    accuracies,
    method_stats,
    read_results,
    task_stats,
    write_parquet,
)
from stages.tracking.runs import Tracker  # noqa: E402


def reload_spec(arch: str, tune_dir: Path, results: list[dict], p_tune: TuneParams, device: str,
                store: InputStore, method: str = "recast") -> dict[str, Any] | None:
    """The job spec of ``reload_job`` for ``arch`` (None when it has no ``method`` payloads); the
    payloads, tasks, backbone and banks are added to ``store``."""
    order = {t: i for i, t in enumerate(task_names(p_tune))}
    seed = p_tune.seeds[0]
    rows = sorted((r for r in results if r["arch"] == arch and r["method"] == method and r["seed"] == seed
                   and not r.get("sequential")), key=lambda r: order.get(r["task"], len(order)))
    if not rows:
        return None
    data = resolve(p_tune.data_dir)
    roles = {"backbone": store.add(backbone_bundle(resolve(p_tune.pretrain_dir), arch)),
             "banks": store.add(banks_bundle(resolve(p_tune.mimic_dir), arch))}
    banks_sha = bank_meta(resolve(p_tune.mimic_dir), arch)["bank_sha256"]
    for r in rows:
        stem = tune_dir / "payloads" / arch / method / f"{r['task']}-s{seed}"
        side = read_sidecar(stem.with_suffix(".json"))  # checked here, before any job: fail fast, name the file
        if side.get("bank_sha256") != banks_sha:
            raise IntegrityError(f"{stem}.safetensors: payload trained against banks {str(side.get('bank_sha256'))[:12]}, "
                                 f"the mimic stage's banks are {banks_sha[:12]}; re-run the tune stage")
        load_verified(stem.with_suffix(".safetensors"), side.get("payload_sha256"))
        roles[f"payload/{r['task']}"] = store.add(file_bundle(stem.with_suffix(".safetensors")))
        roles[f"sidecar/{r['task']}"] = store.add(file_bundle(stem.with_suffix(".json")))
        roles[f"task/{r['task']}"] = store.add(task_bundle(data / r["task"]))
    return {"id": f"reload/{arch}/{method}", "arch": arch, "device": device, "tasks": [r["task"] for r in rows],
            "standalone": [r["test_acc"] for r in rows], "image_size": p_tune.train_for(arch).image_size,
            "limit_eval": p_tune.train_for(arch).limit_eval, "inputs": roles}


def reload_job(spec: dict, inputs: JobInputs) -> tuple[dict, dict]:
    """Ray task, the payload-loading check: load every task's RECAST payload (sha256 checked by
    ``recast.load_payload``), in task order, into ONE model on the shared banks and re-evaluate
    every earlier task after each addition; the last row must equal the standalone accuracies.
    (Forgetting itself is measured by training in sequence: the tune stage's ``recast``
    continual job.)"""
    device = spec["device"]
    rc = inputs.backbone("backbone", banks="banks").recast().to(device)
    tasks = spec["tasks"]
    matrix: list[list[float | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, task in enumerate(tasks):
            for role, suffix in (("payload", ".safetensors"), ("sidecar", ".json")):
                (Path(tmp) / f"{task}{suffix}").write_bytes(inputs.file(f"{role}/{task}")[1])
            load_payload(rc, Path(tmp) / task, task=task)
            row: list[float | None] = []
            for j, prev in enumerate(tasks):
                if j > i:
                    row.append(None)
                    continue
                rc.set_task(prev, freeze=False)
                row.append(evaluate(rc, inputs.task(f"task/{prev}").loader(
                    "test", 256, spec["image_size"], train=False, seed=0, limit=spec["limit_eval"], device=device),
                    device))
            matrix.append(row)
    final = matrix[-1]
    return {"tasks": tasks, "acc_matrix": matrix, "device": device,
            "max_abs_diff_vs_standalone": max(abs(a - b) for a, b in zip(final, spec["standalone"]))}, {}


def payload_reload(archs: list[str], tune_dir: Path, results: list[dict], p_tune: TuneParams,
                   rt: RuntimeParams, method: str = "recast") -> dict[str, dict[str, Any]]:
    """``reload_job`` for each arch with payloads, as Ray jobs (``stages.jobs.fanout.run_jobs``)."""
    device = job_device(rt)
    store = InputStore(rt.storage)
    specs = [s for arch in archs if (s := reload_spec(arch, tune_dir, results, p_tune, device, store, method))]
    done = run_jobs("reload", reload_job, specs, rt, inputs=store)
    return {s["arch"]: {k: v for k, v in done[s["id"]][0].items() if not k.startswith("_")} for s in specs}


def sequential_forgetting(results: list[dict], method: str = "recast") -> dict[str, dict[str, Any]]:
    """Per arch, the accuracy matrix of ``method`` trained task after task on ONE model (the tune
    stage's continual job of that method, first seed): the report's forgetting."""
    out: dict[str, dict[str, Any]] = {}
    for r in sorted((r for r in results if r.get("sequential") and r["method"] == method), key=lambda r: r["seed"]):
        out.setdefault(r["arch"], {"tasks": r["task_names"], "acc_matrix": r["acc_matrix"],
                                   "avg_forgetting": r["avg_forgetting"]})
    return out


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
    save_figure(fig, path, dpi=110)


def _pm(mean: float, std: float) -> str:
    """``mean ± std`` in percent; ``-`` for the std of a single seed."""
    return f"{100 * mean:.2f} ± " + ("-" if pd.isna(std) else f"{100 * std:.2f}")


def _count(value: float | list | None) -> int | str:
    """A per-task count for the report: the mean of a per-task list, ``-`` when absent."""
    if value is None:
        return "-"
    return int(statistics.mean(value)) if isinstance(value, list) else int(value)


def _cell(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{scale * value:.{digits}f}"


def markdown(summary: dict[str, dict], tasks: pd.DataFrame, methods: pd.DataFrame, forgetting: dict[str, dict],
             mimic: dict, task_order: list[str] | None = None, reload: dict[str, dict] | None = None,
             lineage: pd.DataFrame | None = None) -> str:
    """The report. ``tasks``/``methods``: ``stages.report.tables.task_stats``/``method_stats`` frames;
    ``lineage``: the jobs' results table (its lineage columns)."""
    lines = ["# RECAST report", ""]
    if mimic:
        lines += ["## Neural Mimicry", "",
                  "| arch | min weight cos | min feature cos | acc original | acc reconstructed | top-1 agreement on tasks "
                  "| penultimate cos on tasks | templates | coefs/task | seconds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for arch, m in sorted(mimic.items()):
            lines.append(f"| {arch} | {_cell(m.get('min_weight_cosine'), digits=6)} | "
                         f"{_cell(m.get('min_feature_cosine'), digits=6)} | {_cell(m.get('acc_original'), 100)} | "
                         f"{_cell(m.get('acc_reconstructed'), 100)} | {_cell(m.get('top1_agreement'), 100)} | "
                         f"{_cell(m.get('penultimate_cosine'), digits=6)} | "
                         f"{m.get('templates', '')} | {m.get('coefficients_per_task', '')} | {m.get('seconds', 0):.2f} |")
            for key, ab in sorted(m.items()):  # other reconstructions, never tuned (gradient, VAE ablation)
                if key.startswith("ablation.") and isinstance(ab, dict):
                    lines.append(f"| {arch} ({key[len('ablation.'):]}) | {_cell(ab.get('min_weight_cosine'), digits=6)} | "
                                 f"{_cell(ab.get('min_feature_cosine'), digits=6)} | - | "
                                 f"{_cell(ab.get('acc_reconstructed'), 100)} | - | - | | | {ab.get('seconds', 0):.2f} |")
        lines.append("")
    archs = sorted({k.split("/")[0] for k in summary})
    paper = "paper" in methods.columns
    for arch in archs:
        t_arch = tasks[tasks["arch"] == arch]
        present = [t for t in t_arch["task"].unique()]
        order = [t for t in (task_order or []) if t in present] + sorted(set(present) - set(task_order or []))
        head = ["method", *order, "avg (mean ± std over seeds)", "seeds", *(["paper", "ours - paper"] if paper else []),
                "forgetting", "method params/task", "head params/task", "bytes/task", "wall s"]
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
            tp = _count(v.get("task_params", v.get("trainable_params")))
            hp = _count(v.get("head_params"))
            by = v.get("bytes", v.get("bytes_per_task", "-"))
            by = int(statistics.mean(by)) if isinstance(by, list) else (int(by) if by != "-" else by)
            wall = v.get("train_seconds", v.get("wall_time_s", 0))
            wall = sum(wall) if isinstance(wall, list) else wall
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_pm(m['mean'], m['std'])} | {int(m['n_seeds'])} | "
                         + "".join(f"{x} | " for x in extra)
                         + f"{'-' if forg is None else f'{100 * forg:.2f}'} | {tp} | {hp} | {by} | {wall:.1f} |")
        lines.append("")
    for title, tables in (("RECAST trained task after task on one model: every task re-evaluated after each "
                           "new one (continual protocol; forgetting above comes from this)", forgetting),
                          ("loading check: RECAST payloads loaded into one model, earlier tasks re-evaluated "
                           "after each load", reload or {})):
        for arch, f in sorted(tables.items()):
            lines += [f"## {arch}: {title}", "",
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
    results, summary = [], {}  # results: the rows as the stages wrote them (lists intact)
    for stage, out_dir, model in (("tune", p_tune.out_dir, TuneParams), ("combine", combine_dir, CombineParams)):
        path = resolve(out_dir) / "results.json"
        if path.exists():
            results += json.loads(path.read_text())
        mpath = metrics_path(stage, out_dir, model.model_fields["out_dir"].default)
        if mpath.exists():
            summary.update(json.loads(mpath.read_text()))
    frame = read_results([resolve(p_tune.out_dir) / "results.parquet", resolve(combine_dir) / "results.parquet"])
    acc = accuracies(frame)
    tasks = task_stats(acc)
    methods = method_stats(acc, PAPER_AVG_ACC if suite == "paper" else None)
    mimic_metrics = metrics_path("mimic", p_tune.mimic_dir, MimicParams.model_fields["out_dir"].default)
    mimic = json.loads(mimic_metrics.read_text()) if mimic_metrics.exists() else {}
    forgetting = sequential_forgetting(results, p.forgetting_method)
    reload = payload_reload(p.forgetting_archs, resolve(p_tune.out_dir), results, p_tune, rt, p.forgetting_method)
    report_dir = resolve(p.report_dir)
    plot_params_vs_acc(summary, report_dir / "params_vs_acc.png")
    write_parquet(tasks, report_dir / "tasks.parquet")
    write_parquet(methods, report_dir / "methods.parquet")
    md = markdown(summary, tasks, methods, forgetting, mimic, task_names(p_tune), reload, frame)
    (report_dir / "report.md").write_text(md + "\n")
    metrics = {}
    for key, v in summary.items():
        tp = v.get("trainable_params")
        metrics[key] = {"avg_test_acc": round(v["avg_test_acc"], 6),
                        "trainable_params": tp if not isinstance(tp, list) else statistics.mean(tp),
                        "avg_forgetting": forgetting.get(key.split("/")[0], {}).get("avg_forgetting", 0.0)
                        if key.endswith("/recast") else v.get("avg_forgetting")}
    write_json_atomic(metrics_path("report", p.report_dir, EvaluateParams.model_fields["report_dir"].default), metrics)
    with Tracker("evaluate", rt.experiment, p.model_dump(), tags=lineage.tags()) as tracker:
        data = resolve(p_tune.data_dir)
        log_datasets(tracker, tracker.parent_id, [TaskData.of(t, data / t) for t in task_names(p_tune)], context="eval")
        tracker.log_artifacts(tracker.parent_id, [report_dir / name for name in
                                                  ("report.md", "params_vs_acc.png", "tasks.parquet", "methods.parquet")])
        tracker.finish({f"{k.replace('/', '.')}.avg_test_acc": v["avg_test_acc"] for k, v in metrics.items()})
    return {"metrics": metrics, "forgetting": forgetting, "reload": reload}


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
