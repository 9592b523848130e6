"""MLflow for sweeps: one parent run per sweep, one child run per trial, each logged once.

``SweepTracker`` is ``stages.tracking.Tracker`` (same store, retries, lock) with resume: the
parent run is found again by its ``sweep_key`` tag (a hash of the sweep's trial specs), and a
trial whose ``spec_key`` already has a finished child run is not logged again. Child runs left
unfinished by a killed driver are deleted and logged anew.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from stages.tracking import Tracker, make_client, retry, tracking_uri


class SweepTracker(Tracker):
    """The sweep's parent run (created, or found again on resume) and its child runs.

    Attributes:
        resumed: the parent run existed already.
        logged: ``spec_key -> run id`` of the trials that have a finished child run.
        new_children: child runs logged by this process.
    """

    def __init__(self, sweep: str, experiment: str, params: dict[str, Any], sweep_key: str):
        self.sweep, self.sweep_key, self.new_children = sweep, sweep_key, 0
        uri = tracking_uri()
        client = make_client(uri)
        experiment_id = retry(lambda: self._experiment_id(client, experiment), uri=uri)
        found = retry(lambda: self._find_parent(client, experiment_id), uri=uri) if experiment_id else None
        self.resumed = found is not None
        tags = {"kind": "sweep", "sweep": sweep, "sweep_key": sweep_key}
        super().__init__(f"sweep/{sweep}", experiment, params, tags=tags, run_id=found)
        self.logged = retry(self._finished_children, uri=self.uri)

    @staticmethod
    def _experiment_id(client: MlflowClient, name: str) -> str | None:
        exp = client.get_experiment_by_name(name)
        return exp.experiment_id if exp is not None else None

    def _find_parent(self, client: MlflowClient, experiment_id: str) -> str | None:
        runs = client.search_runs(
            [experiment_id], filter_string=f"tags.kind = 'sweep' and tags.sweep_key = '{self.sweep_key}'",
            run_view_type=ViewType.ACTIVE_ONLY, max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None

    def children(self) -> list:
        """Every active child run of the parent."""
        out, token = [], None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_id}'",
                run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def _finished_children(self) -> dict[str, str]:
        done: dict[str, str] = {}
        for run in self.children():
            key = run.data.tags.get("spec_key")
            if run.info.status == "FINISHED" and key and key not in done:
                done[key] = run.info.run_id
            else:  # half-logged by a killed driver (or a duplicate): drop it, log it again below
                self.client.delete_run(run.info.run_id)
        return done

    def log_trial(self, name: str, spec_key: str, params: dict[str, Any], metrics: dict[str, float],
                  cached: bool) -> str | None:
        """Log one trial as a child run unless it has one already; returns the new run id."""
        if spec_key in self.logged:
            return None
        rid = self.child(name, params, metrics, tags={"spec_key": spec_key, "cached": str(cached), "sweep": self.sweep})
        self.logged[spec_key] = rid
        self.new_children += 1
        return rid

    def close(self, metrics: dict[str, float], artifacts: list[Path]) -> None:
        """Finish the parent; its summary metrics and files are logged only when something is new."""
        fresh = self.new_children > 0 or not self.resumed
        if fresh:
            for path in artifacts:
                retry(lambda p=path: self.client.log_artifact(self.parent_id, str(p), artifact_path="sweep"),
                      uri=self.uri)
        self.finish(metrics if fresh else None)
