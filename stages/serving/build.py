"""Building and registering the served model of one arch and method (``stages.serving.pyfunc``).

- The base (the pretrain stage's ``<arch>.{json,safetensors}`` and the mimic stage's
  ``<arch>/`` banks, base coefficients and ``recast.json``) is logged ONCE per bank sha256, as
  the artifacts of its own run (experiment ``recast-serving``, tag ``bank_sha256``); a later
  build finds that run by the tag and references it.
- The payloads are the registry's (``stages.tracking.payloads``): per task the version an alias
  (default ``current``) points at, pinned by version in the model config.
- The pyfunc model is logged from code (``served.py``: no pickle) with that config, the code of
  ``recast`` and ``stages`` and a signature, and registered as ``recast-serve.<arch>.<method>``,
  alias ``current``.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, Array, ColSpec, Schema

from recast.data import read_manifest
from stages.config.common import stage_logger
from stages.jobs.backbones import bank_meta, pretrained_meta
from stages.serving.errors import ServingError
from stages.serving.pyfunc import BASE_ARTIFACT, DEFAULT_MAX_ROWS, check_bank, describe, payload_files
from stages.tracking.payloads import list_registered, registry_name
from stages.tracking.store import artifact_location, make_client, retry, tracking_uri

# isort: split
import mlflow  # noqa: E402 - after stages.tracking.store, which sets MLflow's environment defaults

EXPERIMENT = "recast-serving"
REQUIREMENTS = [f"{p}=={version(p)}" for p in ("mlflow", "torch", "timm", "safetensors", "pandas", "numpy")]
REPO = Path(__file__).resolve().parents[2]
SIGNATURE = ModelSignature(
    # image: AnyType, so MLflow's schema casts nothing (it turned integers and numeric strings into
    # floats); stages.serving.inputs tells its three forms apart and refuses the rest by name
    inputs=Schema([ColSpec("string", "task"), ColSpec(AnyType(), "image")]),
    outputs=Schema([ColSpec("string", "task"), ColSpec("long", "class"), ColSpec(Array("double"), "probabilities")]))


def served_name(arch: str, method: str) -> str:
    """Registered-model name of the served model: ``recast-serve.<arch>.<method>``."""
    return f"recast-serve.{arch}.{method}"


def _experiment_id(client, uri: str) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    return exp.experiment_id if exp is not None else client.create_experiment(
        EXPERIMENT, artifact_location=artifact_location(uri))


@contextlib.contextmanager
def _mlflow_store(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to ``uri`` for the block, and put back
    exactly after it (module globals and the environment variables ``set_*_uri`` writes).

    The one place that touches MLflow's private module globals. The fluent API this build needs
    (``start_run``, ``pyfunc.log_model``, ``register_model``) takes no store argument, and
    ``download_artifacts`` of a ``models:/`` URI resolves the version through the process-wide
    registry even when given ``registry_uri`` (MLflow 3.17: ``ModelsArtifactRepository``; the
    serving tests failed that way). The public getters return a resolved default rather than
    "unset", so the previous state cannot be restored through them (setting the default would
    also export MLFLOW_TRACKING_URI, which ``stages.tracking.store.tracking_uri`` reads).
    Everything else passes the store explicitly (``MlflowClient(uri)``).
    tests/stages/test_serving_mlflow_globals.py fails when MLflow changes these globals."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    tracking, registry = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(tracking)
        registry_utils._registry_uri = registry
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def base_uri(arch: str, pretrain_dir: Path, mimic_dir: Path) -> tuple[str, str]:
    """(artifact URI, bank sha256) of the base of ``arch``: the run that logged these banks, or a
    new run logging them now (the only place the banks are ever written to the store)."""
    bank_sha = bank_meta(mimic_dir, arch).get("bank_sha256")
    if not bank_sha:
        raise FileNotFoundError(f"no banks for arch {arch!r} in {mimic_dir}: run the mimic stage")
    backbone_sha = str(pretrained_meta(pretrain_dir, arch).get("sha256", ""))
    uri = tracking_uri()
    client = make_client(uri)
    exp = retry(lambda: _experiment_id(client, uri), uri=uri, what="the serving experiment")
    found = client.search_runs([exp], f"tags.bank_sha256 = '{bank_sha}' and tags.arch = '{arch}' "
                                      f"and tags.backbone_sha256 = '{backbone_sha}' and attributes.status = 'FINISHED'",
                               max_results=1)
    if found:
        return f"{found[0].info.artifact_uri}/{BASE_ARTIFACT}", bank_sha
    run = client.create_run(exp, tags={"bank_sha256": bank_sha, "backbone_sha256": backbone_sha, "arch": arch,
                                       "mlflow.runName": f"base.{arch}"})
    rid = run.info.run_id
    for name in (f"{arch}.json", f"{arch}.safetensors"):
        client.log_artifact(rid, str(pretrain_dir / name), f"{BASE_ARTIFACT}/pretrain")
    client.log_artifacts(rid, str(mimic_dir / arch), f"{BASE_ARTIFACT}/mimic/{arch}")
    client.set_terminated(rid)
    return f"{run.info.artifact_uri}/{BASE_ARTIFACT}", bank_sha


def registered_tasks(arch: str, method: str) -> list[str]:
    """Tasks with a registered payload of ``arch`` and ``method`` (sorted)."""
    prefix = registry_name(arch, "", method)
    return sorted(r["name"][len(prefix):] for r in list_registered(prefix))


def payload_uris(arch: str, method: str, tasks: list[str], bank_sha: str, alias: str = "current") -> dict[str, str]:
    """Per task the pinned URI ``models:/<name>/<version>`` of its ``alias`` version, each
    checked against ``bank_sha`` (``BankMismatchError``) before anything is logged."""
    uri = tracking_uri()
    client = make_client(uri)
    out = {}
    for task in tasks:
        name = registry_name(arch, task, method)
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except Exception as err:  # noqa: BLE001 - MlflowException: no such model/alias
            raise ServingError(f"no payload {name}@{alias} in {uri}: {err}") from None
        pinned = f"models:/{name}/{mv.version}"
        with tempfile.TemporaryDirectory() as tmp, _mlflow_store(uri):  # the sidecar only: the bank check
            local = mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=tmp)
            check_bank(task, payload_files(local), bank_sha, pinned)
        out[task] = pinned
    return out


def _current_if_same(client, name: str, cfg: dict[str, Any]):
    """The ``current`` version of ``name`` when its logged ``serving_config.json`` equals ``cfg``
    (same arch, method, base and pinned payload versions), else None."""
    try:
        mv = client.get_model_version_by_alias(name, "current")
    except Exception:  # noqa: BLE001 - MlflowException: no such model or alias yet
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(mv.run_id, "serving_config.json", tmp)
        except Exception:  # noqa: BLE001 - a version logged otherwise: build a new one
            return None
        return mv if json.loads(Path(path).read_text()) == cfg else None


def task_transforms(data_dir: Path, tasks: list[str], image_size: int) -> dict[str, dict[str, Any]]:
    """Per task its evaluation transform (``stages.serving.inputs.TaskTransform``), from its
    prepared ``manifest.json`` in ``data_dir``: the mean and std ``recast.data``'s loaders
    normalise with and, for a ``jpeg``-stored task, the side its loader decodes JPEGs at."""
    out = {}
    for task in tasks:
        if not (Path(data_dir) / task / "manifest.json").exists():
            raise ServingError(f"no prepared task {task!r} in {data_dir} (its manifest.json gives the served "
                               "transform): run the prepare stage, or pass the data_dir it wrote")
        manifest = read_manifest(Path(data_dir) / task, verify=False)
        out[task] = {"mean": list(manifest.mean), "std": list(manifest.std)}
        if manifest.encoding == "jpeg":
            out[task]["jpeg_side"] = min(manifest.image_size[0], image_size)  # as BatchLoader._pixels
    return out


def build(arch: str, method: str, pretrain_dir: Path, mimic_dir: Path, image_size: int,
          tasks: list[str] | None = None, alias: str = "current", channels: int = 3, data_dir: Path | None = None,
          max_rows: int = DEFAULT_MAX_ROWS) -> dict[str, Any]:
    """Log and register the served model of ``arch`` and ``method`` over ``tasks`` (default:
    every registered task); alias the new version ``current``. With ``data_dir`` (the prepared
    tasks) it also takes PNG/JPEG images and uint8 pixels, through each task's evaluation
    transform; ``max_rows`` bounds the rows of one request. Returns name, version, config."""
    if max_rows < 1:
        raise ServingError(f"max_rows={max_rows}; must be >= 1")
    base, bank_sha = base_uri(arch, Path(pretrain_dir), Path(mimic_dir))
    tasks = tasks or registered_tasks(arch, method)
    if not tasks:
        raise ServingError(f"no registered payloads recast.{arch}.{method}.* in {tracking_uri()}: run the tune stage")
    cfg = {"arch": arch, "method": method, "base_uri": base, "bank_sha256": bank_sha,
           "image_shape": [channels, image_size, image_size], "max_rows": int(max_rows),
           "payloads": payload_uris(arch, method, tasks, bank_sha, alias)}
    if data_dir is not None:
        cfg["transforms"] = task_transforms(Path(data_dir), tasks, image_size)
    name = served_name(arch, method)
    uri = tracking_uri()
    client = make_client(uri)
    same = _current_if_same(client, name, cfg)
    if same is not None:  # the same banks and payload versions are served already: no new version
        stage_logger(__name__).info(f"{name} version {same.version} (alias current) already serves this: {describe(cfg)}")
        return {"name": name, "version": str(same.version), "run_id": same.run_id, "config": cfg,
                "model_uri": same.source, "unchanged": True}
    exp = retry(lambda: _experiment_id(client, uri), uri=uri, what="the serving experiment")
    with _mlflow_store(uri):
        with mlflow.start_run(experiment_id=exp, run_name=f"serve.{arch}.{method}",
                              tags={"bank_sha256": bank_sha, "arch": arch, "method": method}) as run:
            mlflow.log_dict(cfg, "serving_config.json")
            info = mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).with_name("served.py")),
                                           model_config=cfg, code_paths=[str(REPO / "recast"), str(REPO / "stages")],
                                           signature=SIGNATURE, pip_requirements=REQUIREMENTS)
        mv = mlflow.register_model(info.model_uri, name)
    client.set_registered_model_alias(name, "current", mv.version)
    client.set_model_version_tag(name, mv.version, "tasks", ",".join(tasks))
    stage_logger(__name__).info(f"registered {name} version {mv.version} (alias current): {describe(cfg)}")
    return {"name": name, "version": str(mv.version), "run_id": run.info.run_id, "config": cfg,
            "model_uri": info.model_uri, "unchanged": False}
