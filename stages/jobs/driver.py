"""The one driver loop of every fanned-out stage (pretrain, mimic, tune, combine).

``drive`` holds the stage lock (one run of a stage at a time: a second one waits, then finds the
first one's jobs in the job cache), computes the stage's lineage before any output is written
(what dvc.lock will record), opens its MLflow parent run (``Tracker``, a context manager: the run
always ends) with the stage's dataset inputs, fans the jobs out (``run_jobs``) and hands each
result to the stage's ``publish``, which returns the job's row. It then writes
``<out_dir>/results.parquet`` (and ``results.json`` where the stage asks), ``<out_dir>/curves.png``
from the jobs' histories and the stage's metrics (``metrics/<stage>.json``, or
``<out_dir>/metrics.json`` for a side run with another ``out_dir``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.config.common import file_lock, metrics_path, resolve, resolve_shared, write_json_atomic
from stages.config.params import RuntimeParams
from stages.jobs.fanout import JobFn, run_jobs
from stages.jobs.inputs import InputStore
from stages.jobs.result import JobResult
from stages.report.curves import plot_curves
from stages.report.tables import write_results
from stages.tracking.lineage import StageLineage, TaskData, stage_lineage
from stages.tracking.runlog import log_datasets, log_file
from stages.tracking.runs import Tracker


@dataclass
class StageRun:
    """What publishing a job needs: the stage, its runtime, its parent run, the inputs of its
    jobs, its output folder and its lineage (None outside a stage run)."""

    stage: str
    rt: RuntimeParams
    tracker: Tracker
    store: InputStore
    out_dir: Path
    lineage: StageLineage | None = None

    def lineage_tags(self) -> dict[str, str]:
        return self.lineage.tags() if self.lineage is not None else {}

    def lineage_columns(self) -> dict[str, Any]:
        return self.lineage.columns() if self.lineage is not None else {}


Publish = Callable[[StageRun, dict, JobResult, bool], dict[str, Any]]  # (run, spec, result, cached) -> the job's row


@dataclass
class FannedOutStage:
    """What sets one fanned-out stage apart from another; ``drive`` does the rest.

    Attributes:
        stage: its name (lock, job cache folder, MLflow parent run, metrics file).
        job: the job function (a Ray task).
        specs: one per job; their inputs added to ``store``.
        params: the parent run's params.
        datasets: the parent run's dataset inputs, logged with ``dataset_context``.
        out_dir, default_out_dir: the stage's output folder as configured, and its default
            (another one is a side run: its metrics go to ``<out_dir>/metrics.json``).
        publish: writes, logs and registers one finished job; returns its row.
        summarise: (results by job id, sorted rows) -> the stage's metrics.
        order: the sort key of the rows.
        results_json: also write the rows as ``<out_dir>/results.json``.
        finish: the summary -> the parent run's metrics (none by default).
    """

    stage: str
    job: JobFn
    specs: list[dict]
    store: InputStore
    params: dict[str, Any]
    datasets: list[TaskData]
    out_dir: str
    default_out_dir: str
    publish: Publish
    summarise: Callable[[dict[str, JobResult], list[dict]], dict[str, Any]]
    order: Callable[[dict], Any]
    dataset_context: str = "train"
    results_json: bool = False
    finish: Callable[[dict[str, Any]], dict[str, float]] | None = None


@contextlib.contextmanager
def stage_lock(stage: str, rt: RuntimeParams) -> Iterator[None]:
    """Hold ``<cache_dir>/<stage>.lock`` for a whole stage run: a second run of the same stage
    waits, then finds the first one's jobs in the cache."""
    with file_lock(resolve_shared(rt.cache_dir) / f"{stage}.lock", waiting=f"{stage}: another run of this stage is in progress"):
        yield


def drive(s: FannedOutStage, rt: RuntimeParams) -> dict[str, Any]:
    """Run the stage ``s`` (see the module docstring); returns its summary."""
    out = resolve(s.out_dir)
    with stage_lock(s.stage, rt):
        lineage = stage_lineage(s.stage)  # before any output is written: what dvc.lock will record
        with Tracker(s.stage, rt.experiment, s.params, tags=lineage.tags()) as tracker:
            log_datasets(tracker, tracker.parent_id, s.datasets, context=s.dataset_context)
            run = StageRun(s.stage, rt, tracker, s.store, out, lineage)
            rows: list[dict] = []
            histories: dict[str, list[dict]] = {}

            def on_result(spec: dict, result: JobResult, cached: bool) -> None:
                rows.append(s.publish(run, spec, result, cached))
                if result.history:
                    histories[spec["id"]] = result.history

            results = run_jobs(s.stage, s.job, s.specs, rt, on_result, inputs=s.store)
            rows.sort(key=s.order)
            if s.results_json:
                write_json_atomic(out / "results.json", rows)
            write_results(rows, out)
            if histories:
                png = plot_curves(histories, out / "curves.png", title=f"{s.stage}: per-epoch curves")
                log_file(tracker, tracker.parent_id, png)
            summary = s.summarise(results, rows)
            write_json_atomic(metrics_path(s.stage, s.out_dir, s.default_out_dir), summary)
            if s.finish is not None:
                tracker.finish(s.finish(summary))
    return summary
