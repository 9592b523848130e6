"""The payload registry (MLflow model registry): one registered model per arch, method and task,
one version per payload, aliases ``current`` (the latest payload) and ``best`` (the version with
the highest VALIDATION accuracy, its tag ``val_acc``; test accuracy never selects a payload).
``stages.registry`` is its command line."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stages.config.common import experiment_tags
from stages.tracking.store import make_client, retry, tracking_uri

# isort: split
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


BEST_BY = "val_acc"  # the version tag (and run metric) that ranks versions for the alias ``best``


def _score(client: Any, mv: Any) -> float | None:
    """A version's validation accuracy: its ``val_acc`` tag, else its run's ``val_acc`` metric
    (a version registered before the rule; the tag is then written, once)."""
    tag = (mv.tags or {}).get(BEST_BY)
    if tag is not None:
        return float(tag) if tag else None  # "": looked up before, nothing to rank by
    try:
        value = client.get_run(mv.run_id).data.metrics.get(BEST_BY)
    except Exception:  # noqa: BLE001 - a deleted run: the version cannot be ranked
        value = None
    client.set_model_version_tag(mv.name, mv.version, BEST_BY, f"{value:.6f}" if value is not None else "")
    return value


def register_payload(run_id: str, arch: str, task: str, method: str, tags: dict[str, str],
                     val_acc: float | None = None, page_size: int = PAGE_SIZE) -> str:
    """Register the payload logged under ``run_id`` as a new version (its ``val_acc`` as the
    version tag ``val_acc``); alias it ``current``, and point ``best`` at the version with the
    highest validation accuracy (ties: the newest). Every call ranks all versions, so a registry
    whose ``best`` was chosen by another rule is re-aliased on its next registration. Returns the version.

    Idempotent: a payload whose run already has a version is not registered again (its aliases
    are set again when it is the latest version), so a resumed stage can register every job."""
    uri = tracking_uri()
    client = make_client(uri)
    name = registry_name(arch, task, method)
    version_tags = {**tags, BEST_BY: f"{val_acc:.6f}" if val_acc is not None else ""}

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
                                             tags={**experiment_tags(), **version_tags})
            versions = [*versions, mv]
        client.set_registered_model_alias(name, "current", mv.version)
        scored = [(score, int(v.version)) for v in versions if (score := _score(client, v)) is not None]
        if scored:
            client.set_registered_model_alias(name, "best", str(max(scored)[1]))
            client.set_registered_model_tag(name, "best_by", BEST_BY)
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
