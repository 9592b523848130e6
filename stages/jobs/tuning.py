"""The tune and combine stages' shared driver: build the job list, fan it out, publish every
result, write ``<out_dir>/results.{json,parquet}``, ``<out_dir>/curves.png`` and the stage's
metrics (``metrics/<stage>.json``, or ``<out_dir>/metrics.json`` for a side run with another
``out_dir``). One run of a stage at a time (``stage_lock``); its MLflow parent run always ends
(``Tracker`` is a context manager)."""

from __future__ import annotations

from typing import Any

from stages.config.common import metrics_path, resolve, write_json_atomic
from stages.report.curves import plot_curves
from stages.jobs.fanout import run_jobs, stage_lock
from stages.jobs.inputs import InputStore
from stages.jobs.train import dispatch
from stages.tracking.lineage import TaskData, stage_lineage
from stages.config.params import CombineParams, MethodParams, RuntimeParams, TuneParams
from stages.jobs.results import Publisher, summarise
from stages.tracking.runlog import log_datasets, log_file
from stages.jobs.runtime import job_device
from stages.jobs.sequential import continual_specs
from stages.jobs.specs import method_specs, task_names
from stages.report.tables import write_results
from stages.tracking.runs import Tracker


def run_tuning(stage: str, p: TuneParams, methods: dict[str, MethodParams], rt: RuntimeParams, out_dir: str,
               continual: bool) -> dict[str, Any]:
    """Run the stage's jobs (per-task methods, plus the sequential baselines when ``continual``)."""
    device = job_device(rt)
    store = InputStore(rt.storage)
    # the sequential baselines first: each is several per-task jobs long, and Ray starts tasks in
    # submission order, so the short jobs fill the other workers instead of idling at the end
    specs = continual_specs(stage, p, device, store) if continual else []
    specs += method_specs(stage, p, methods, device, store)
    if rt.precision != "fp32":  # fp32 specs (and so their job-cache keys) stay as they were
        specs = [{**spec, "precision": rt.precision} for spec in specs]
    default_out = (TuneParams if stage == "tune" else CombineParams).model_fields["out_dir"].default
    params = {"methods": {k: v.model_dump() for k, v in methods.items()}, "train": p.train.model_dump(),
              "archs": p.archs, "seeds": p.seeds,
              "lr_by_method": p.lr_by_method.model_dump() if p.lr_by_method is not None else None}
    data = resolve(p.data_dir)
    with stage_lock(stage, rt):
        lineage = stage_lineage(stage)  # before any output is written: what dvc.lock will record
        with Tracker(stage, rt.experiment, params, tags=lineage.tags()) as tracker:
            log_datasets(tracker, tracker.parent_id, [TaskData.of(t, data / t) for t in task_names(p)])
            publish = Publisher(tracker, resolve(out_dir), stage, rt, store, lineage)
            run_jobs(stage, dispatch, specs, rt, publish, inputs=store)
            rows = publish.sorted_rows(task_names(p))
            write_json_atomic(resolve(out_dir) / "results.json", rows)
            write_results(rows, resolve(out_dir))
            if publish.histories:
                png = plot_curves(publish.histories, resolve(out_dir) / "curves.png", title=f"{stage}: per-epoch curves")
                log_file(tracker, tracker.parent_id, png)
            summary = summarise(rows)
            write_json_atomic(metrics_path(stage, out_dir, default_out), summary)
            tracker.finish({f"{k.replace('/', '.')}.avg_test_acc": v["avg_test_acc"] for k, v in summary.items()
                            if "avg_test_acc" in v})
    return summary
