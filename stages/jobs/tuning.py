"""The tune and combine stages: their job list (the per-task methods, plus the sequential
baselines for tune) through the stages' driver loop (``stages.jobs.driver.drive``), which also
writes ``<out_dir>/results.json``, and the stage's mean test accuracy per arch/method on its
MLflow parent run."""

from __future__ import annotations

from typing import Any

from stages.config.common import resolve
from stages.config.params import CombineParams, MethodParams, RuntimeParams, TuneParams
from stages.jobs.driver import FannedOutStage, drive
from stages.jobs.inputs import InputStore
from stages.jobs.results import publish_job, row_order, summarise
from stages.jobs.runtime import job_device
from stages.jobs.sequential import continual_specs
from stages.jobs.specs import method_specs, task_names
from stages.jobs.train import dispatch
from stages.tracking.lineage import TaskData


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
    return drive(FannedOutStage(
        stage=stage, job=dispatch, specs=specs, store=store, params=params,
        datasets=[TaskData.of(t, data / t) for t in task_names(p)], out_dir=out_dir, default_out_dir=default_out,
        publish=publish_job, summarise=lambda results, rows: summarise(rows), order=row_order(task_names(p)),
        results_json=True, finish=lambda summary: {f"{k.replace('/', '.')}.avg_test_acc": v["avg_test_acc"]
                                                   for k, v in summary.items() if "avg_test_acc" in v}), rt)
