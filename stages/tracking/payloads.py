"""The payload registry (MLflow model registry): one registered model per arch, method and task,
one version per payload, aliases ``current`` and ``best``. ``stages.registry`` is its
command line."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.config.common import experiment_tags
from stages.tracking.store import make_client, retry, tracking_uri

import mlflow  # noqa: E402 - after stages.tracking.store, which sets MLflow's environment defaults


PAGE_SIZE = 1000  # results per registry search call; every page is read (MLflow's limit for models is 1,000)


def search_all(search: Callable[..., Any], page_size: int = PAGE_SIZE, **kwargs: Any) -> list[Any]:
    """Every result of an MLflow client search (``search_registered_models``,
    ``search_model_versions``), page after page until no page token is left: nothing is cut
    off at one call's ``max_results``."""
    out, token = [], None
    while True:
        page = search(max_results=page_size, page_token=token, **kwargs)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return out


def registry_name(arch: str, task: str, method: str) -> str:
    """Registered-model name of one task's payload: ``recast.<arch>.<method>.<task>``."""
    return f"recast.{arch}.{method}.{task}"


def register_payload(run_id: str, arch: str, task: str, method: str, tags: dict[str, str],
                     accuracy: float | None = None, page_size: int = PAGE_SIZE) -> str:
    """Register the payload logged under ``run_id`` as a new version; alias it ``current``
    (and ``best`` when it beats the current best test accuracy). Returns the version.

    Idempotent: a payload whose run already has a version is not registered again (its aliases
    are set again when it is the latest version), so a resumed stage can register every job."""
    uri = tracking_uri()
    client = make_client(uri)
    name = registry_name(arch, task, method)

    def create() -> str:
        try:
            client.create_registered_model(name, tags={"arch": arch, "task": task, "method": method})
        except Exception as err:  # noqa: BLE001
            if "already exists" not in str(err).lower() and "resource_already_exists" not in str(err).lower():
                raise
        versions = search_all(client.search_model_versions, page_size, filter_string=f"name = '{name}'")
        mine = [v for v in versions if v.run_id == run_id]
        if mine:
            mv = mine[0]
            if int(mv.version) != max(int(v.version) for v in versions):
                return str(mv.version)  # a later payload is current now
        else:
            run = client.get_run(run_id)
            mv = client.create_model_version(name, f"{run.info.artifact_uri}/payload", run_id=run_id,
                                             tags={**experiment_tags(), **tags})
        client.set_registered_model_alias(name, "current", mv.version)
        best = None
        try:
            best = client.get_model_version_by_alias(name, "best")
        except Exception:  # noqa: BLE001 - no best yet
            best = None
        prev = float(best.tags.get("test_acc", "-1")) if best is not None else -1.0
        if accuracy is not None and accuracy >= prev:
            client.set_registered_model_alias(name, "best", mv.version)
        return str(mv.version)

    return retry(create, uri=uri, what=f"registration of {name}")


def list_registered(prefix: str = "recast.", page_size: int = PAGE_SIZE) -> list[dict[str, Any]]:
    """Registered payloads (every page of the registry): name, arch, task, method, aliases."""
    client = make_client()
    out = []
    for rm in search_all(client.search_registered_models, page_size):
        if not rm.name.startswith(prefix):
            continue
        out.append({"name": rm.name, **rm.tags, "aliases": dict(getattr(rm, "aliases", {}) or {})})
    return sorted(out, key=lambda d: d["name"])


def download_payload(arch: str, task: str, method: str = "recast", alias: str = "current") -> Path:
    """Download a registered payload's files from the current store (MLFLOW_TRACKING_URI or
    the embedded one); returns the local directory."""
    uri = tracking_uri()
    client = make_client(uri)
    mv = client.get_model_version_by_alias(registry_name(arch, task, method), alias)
    dst = Path(tempfile.mkdtemp(prefix="recast-payload-"))
    return Path(mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="payload", dst_path=str(dst),
                                                    tracking_uri=uri, registry_uri=uri))
