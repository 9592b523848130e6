"""``stages.serving.build._mlflow_store``, the one place that reads and writes MLflow's private
module globals (``_tracking_uri``, ``_registry_uri``): MLflow's fluent API (``start_run``,
``pyfunc.log_model``, ``register_model``) has no store argument, and its public getters return a
resolved default, not "unset", so the previous state cannot be put back through them. These
tests fail when MLflow renames those globals or changes how ``set_*_uri`` writes them."""

from __future__ import annotations

import os

import mlflow
import pytest
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from stages.serving.build import _mlflow_store

ENVS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _state() -> tuple:
    return tracking_utils._tracking_uri, registry_utils._registry_uri, *(os.environ.get(k) for k in ENVS)


def test_mlflow_still_keeps_its_uris_in_these_globals(tmp_path, monkeypatch):
    for key in ENVS:
        monkeypatch.delenv(key, raising=False)
    saved = _state()
    uri = f"sqlite:///{tmp_path}/a.db"
    try:
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        assert (tracking_utils._tracking_uri, registry_utils._registry_uri) == (uri, uri)
        assert (os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_REGISTRY_URI"]) == (uri, uri)
        mlflow.set_tracking_uri(None)  # unset: the global back to None, the variable removed
        assert tracking_utils._tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved[:2]


@pytest.mark.parametrize("before", ["unset", "stale"])
def test_mlflow_store_sets_both_uris_and_restores_exactly(before, tmp_path, monkeypatch):
    for key in ENVS:
        monkeypatch.delenv(key, raising=False)
    saved = _state()
    uri = f"sqlite:///{tmp_path}/store.db"
    try:
        if before == "stale":
            mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/stale.db")
            mlflow.set_registry_uri(f"sqlite:///{tmp_path}/stale-registry.db")
        else:
            tracking_utils._tracking_uri = registry_utils._registry_uri = None
        start = _state()
        with _mlflow_store(uri):
            assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (uri, uri)
        assert _state() == start
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved[:2]
