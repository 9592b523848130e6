"""MLflow for the Tune sweeps: one parent run per sweep, one child run per finished trial, each once.

``TrialLogger`` is a Ray Tune callback around ``stages.tracking.runs.Tracker``: it finds the sweep's
parent run again by its ``sweep_key`` tag (a rerun that restores the Tune experiment logs under
the same parent), logs a child run as each trial completes, tagged with the trial's key, and
skips a key that has a finished child already. A child left unfinished by a killed driver is
deleted and logged anew. The per-epoch reports a trial sent (``val_acc``, ``train_loss``) go to
its child as metric histories (step: Tune's ``training_iteration``). ``log`` is idempotent, so the
driver also calls it for every result of the finished ``ResultGrid``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from mlflow.entities import Metric, ViewType
from ray import tune

from stages.tracking.runs import Tracker
from stages.tracking.store import make_client, retry, tracking_uri

_LIVE: dict[str, TrialLogger] = {}  # sweep_key -> the driver's logger (Tune pickles its callbacks)


def _live_logger(sweep_key: str) -> TrialLogger:
    """What a pickled ``TrialLogger`` becomes in ``Tuner.restore``: this driver's live logger."""
    return _LIVE.get(sweep_key) or TrialLogger.detached()


class TrialLogger(tune.Callback):
    """The sweep's MLflow parent run and a child run per completed trial.

    Attributes:
        resumed: the parent run existed already (a rerun of the same sweep).
        logged: ``trial key -> run id`` of the trials that have a finished child run.
        new_children: child runs logged by this driver.
    """

    def __init__(self, sweep: str, experiment: str, params: dict[str, Any], sweep_key: str,
                 child_params: Any = None):
        self.sweep, self.sweep_key, self.new_children = sweep, sweep_key, 0
        self.child_params = child_params  # trial config -> (trial key, params); set by the driver
        uri = tracking_uri()
        client = make_client(uri)
        exp = retry(lambda: client.get_experiment_by_name(experiment), uri=uri)
        found = None
        if exp is not None:
            runs = retry(lambda: client.search_runs(
                [exp.experiment_id], filter_string=f"tags.kind = 'sweep' and tags.sweep_key = '{sweep_key}'",
                run_view_type=ViewType.ACTIVE_ONLY, max_results=1, order_by=["attributes.start_time ASC"]), uri=uri)
            found = runs[0].info.run_id if runs else None
        self.resumed = found is not None
        self.tracker = Tracker(f"sweep/{sweep}", experiment, params,
                               tags={"kind": "sweep", "sweep": sweep, "sweep_key": sweep_key}, run_id=found)
        self.parent_id = self.tracker.parent_id
        self.logged = retry(self._finished_children, uri=self.tracker.uri)
        self.epochs: dict[str, list[Metric]] = defaultdict(list)  # trial key -> its per-epoch metrics
        _LIVE[sweep_key] = self

    @classmethod
    def detached(cls) -> TrialLogger:
        """A logger that logs nothing (a restored experiment with no driver logger)."""
        obj = cls.__new__(cls)
        obj.tracker = None
        return obj

    def __reduce__(self):
        return _live_logger, (getattr(self, "sweep_key", ""),)

    def _children(self) -> list:
        client, out, token = self.tracker.client, [], None
        while True:
            page = client.search_runs(
                [self.tracker.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def _finished_children(self) -> dict[str, str]:
        done: dict[str, str] = {}
        for run in self._children():
            key = run.data.tags.get("trial_key")
            if run.info.status == "FINISHED" and key and key not in done:
                done[key] = run.info.run_id
            else:  # half-logged by a killed driver (or a duplicate): drop it, log it again
                self.tracker.client.delete_run(run.info.run_id)
        return done

    def log(self, config: dict[str, Any], result: dict[str, Any]) -> str | None:
        """Log one finished trial as a child run unless it has one; returns the new run id."""
        if self.tracker is None or not result:
            return None
        key, params = self.child_params(config)
        if key in self.logged:
            return None
        final = bool(result.get("final"))
        metrics = {k: v for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "final"}
        tags = {"trial_key": key, "sweep": self.sweep, "stopped_early": str(not final),
                "tune_trial_id": str(result.get("trial_id", ""))}
        rid = self.tracker.child(key, params, metrics, tags=tags)
        if rid is None:  # MLflow unreachable (the Tracker went offline): a rerun logs this trial
            return None
        history = self.epochs.pop(key, [])
        for i in range(0, len(history), 500):
            retry(lambda chunk=history[i:i + 500]: self.tracker.client.log_batch(rid, metrics=chunk),
                  uri=self.tracker.uri)
        self.logged[key] = rid
        self.new_children += 1
        return rid

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if self.tracker is None or result.get("final", True):
            return
        ts, step = int(time.time() * 1000), int(result.get("training_iteration", 0))
        unit = "tasks" if "tasks_done" in result else "epoch"  # hpo reports once per task (mean over tasks so far)
        self.epochs[result["trial_key"]] += [Metric(f"{unit}_{k}", float(result[k]), ts, step)
                                             for k in ("val_acc", "train_loss") if k in result]

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        if self.tracker is not None:  # the retried trial starts again from epoch 0
            self.epochs.pop(self.child_params(trial.config)[0], None)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.log(trial.config, trial.last_result)

    def close(self, metrics: dict[str, float] | None, artifacts: list, status: str = "FINISHED") -> None:
        """Finish the parent; files and summary metrics only when this run added children."""
        _LIVE.pop(self.sweep_key, None)
        fresh = self.new_children > 0 or not self.resumed
        if fresh and status == "FINISHED":
            for path in artifacts:
                retry(lambda p=path: self.tracker.client.log_artifact(self.parent_id, str(p), artifact_path="sweep"),
                      uri=self.tracker.uri)
        self.tracker.finish(metrics if fresh else None, status=status)
