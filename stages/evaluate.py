"""Stage ``evaluate``: the report.

- Forgetting, measured: per architecture the accuracy matrix of RECAST trained task after task
  on one model (the tune stage's continual job; ``stages.report.tables.sequential_forgetting``),
  and the payload-loading check (``stages.jobs.reload``): every task's payload loaded, in task
  order, into ONE RecastModel on the shared banks, every earlier task re-evaluated after each
  addition. One Ray job per architecture, on ``runtime.device``.
- A task-wise accuracy table per architecture (Tables 1/2 style), built with pandas from the
  tune and combine stages' ``results.parquet`` (``stages.report.tables``): per task the mean ±
  std of the test accuracy over seeds, the average over tasks (mean ± std over seeds) and the
  number of seeds; with the paper configuration (``prepare.suite: paper``) the paper's published
  average (``recast.paper_results``) and our difference to it; forgetting, method and head
  parameters and bytes per task, and wall time. ``reports/{tasks,methods}.parquet`` hold those
  two tables.
- Per architecture and sequential method (``stages.report.tables.continual_stats``): average
  accuracy, forgetting, BWT and FWT (against head-only's per-task accuracy, same budget) from
  ``recast.baselines.results``, and the accuracy matrix: a report table, ``reports/continual.parquet``
  and the evaluate run's metrics ``<arch>.<method>.{avg_acc,forgetting,bwt,fwt}``.
- ``metrics/report.json`` for ``dvc metrics show`` / ``dvc exp show``: the ~20 headline numbers
  (``stages.report.tables.headline_metrics``); ``reports/params_vs_acc.png`` for
  ``dvc plots``; ``reports/report.md`` (``stages.report.markdown``).
"""

from __future__ import annotations

import json
from typing import Any

from recast.paper_results import PAPER_AVG_ACC
from stages.config.cli import run_cli, stage_params
from stages.config.common import metrics_path, read_params, resolve, validate_section, write_json_atomic
from stages.config.params import CombineParams, EvaluateParams, MimicParams, PrepareParams, RuntimeParams, TuneParams
from stages.jobs.reload import payload_reload
from stages.jobs.specs import task_names
from stages.report.curves import plot_params_vs_acc
from stages.report.markdown import markdown, run_info
from stages.report.tables import (
    accuracies,
    continual_metrics,
    continual_run_metrics,
    continual_stats,
    headline_metrics,
    learning_rates,
    method_stats,
    paired_comparisons,
    read_results,
    results_frame,
    sequential_forgetting,
    task_stats,
    write_parquet,
)
from stages.tracking.lineage import TaskData, params_file, stage_lineage
from stages.tracking.runlog import log_datasets
from stages.tracking.runs import Tracker


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
    continual = continual_stats(continual_metrics(results))
    reload = payload_reload(p.forgetting_archs, resolve(p_tune.out_dir), results, p_tune, rt, p.forgetting_method)
    report_dir = resolve(p.report_dir)
    plot_params_vs_acc(summary, report_dir / "params_vs_acc.png", methods)
    write_parquet(tasks, report_dir / "tasks.parquet")
    write_parquet(methods, report_dir / "methods.parquet")
    write_parquet(results_frame(continual.to_dict("records")), report_dir / "continual.parquet")
    comparisons = paired_comparisons(acc)
    write_parquet(comparisons, report_dir / "comparisons.parquet")
    md = markdown(summary, tasks, methods, forgetting, mimic, task_names(p_tune), reload, frame, continual,
                  run_info(frame, results, summary, task_names(p_tune), config_label()), p.forgetting_method,
                  comparisons, learning_rates(frame, lambda arch, method: lr_source(p_tune, arch, method)))
    (report_dir / "report.md").write_text(md + "\n")
    metrics = headline_metrics(summary, mimic)
    write_json_atomic(metrics_path("report", p.report_dir, EvaluateParams.model_fields["report_dir"].default), metrics)
    with Tracker("evaluate", rt.experiment, p.model_dump(), tags=lineage.tags()) as tracker:
        data = resolve(p_tune.data_dir)
        log_datasets(tracker, tracker.parent_id, [TaskData.of(t, data / t) for t in task_names(p_tune)], context="eval")
        tracker.log_artifacts(tracker.parent_id, [report_dir / name for name in
                                                  ("report.md", "params_vs_acc.png", "tasks.parquet", "methods.parquet",
                                                   "continual.parquet")])
        tracker.finish({**{f"{k.replace('/', '.')}.avg_test_acc": v["avg_test_acc"] for k, v in summary.items()},
                        **continual_run_metrics(continual)})
    return {"metrics": metrics, "forgetting": forgetting, "reload": reload, "continual": continual}



def lr_source(p_tune: TuneParams, arch: str, method: str) -> str:
    """Where ``method``'s lr on ``arch`` comes from (``TuneParams.lr_for``; ``-`` if it has none)."""
    try:
        return p_tune.lr_for(arch, method)[1]
    except Exception:  # noqa: BLE001 - a method outside the lr table (e.g. run by another config)
        return "-"


def config_label() -> str:
    """The params file and the configuration DVC composed it from (``config: <name>``)."""
    path = params_file()
    name = read_params(path).get("config")
    return f"{path.name}, config={name}" if name else path.name


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("evaluate", EvaluateParams, data)
    p_tune = validate_section("tune", TuneParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    combine = validate_section("combine", CombineParams, data)
    prepare = validate_section("prepare", PrepareParams, data)
    run(p, p_tune, rt, combine.out_dir, prepare.suite)
    print((resolve(p.report_dir) / "report.md").read_text())


if __name__ == "__main__":
    run_cli(main)
