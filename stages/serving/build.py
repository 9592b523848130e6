"""Building and registering the served model of one arch and method (``stages.serving.pyfunc``).

- The base (the pretrain stage's ``<arch>.{json,safetensors}`` and the mimic stage's
  ``<arch>/`` banks, base coefficients and ``recast.json``) is logged ONCE per bank sha256, as
  the artifacts of its own run (experiment ``recast-serving``, tag ``bank_sha256``); a later
  build finds that run by the tag and references it.
- The payloads are the registry's (``stages.tracking.payloads``): per task the version an alias
  (default ``current``) points at, pinned by version in the model config. The versions are
  resolved in pages (a search per 1,000 registered models, one per 100 tasks: ``resolve_versions``), and the
  payloads are packed (``stages.serving.packs``): a few safetensors files, artifacts of the
  version's run, named in the config with their sha256, which a load fetches through the local
  payload cache. A build reuses the previous version's packs whose tasks are unchanged and fetches
  only the payloads of new or changed tasks (one artifact download each).
- The pyfunc model is logged from code (``served.py``: no pickle) with that config (its per-task
  tables, payloads, transforms and packs, as the model's artifact ``tasks.json``, its sha256 in
  the ``model_config``), the code of ``recast`` and ``stages`` and a signature, and registered as
  ``recast-serve.<arch>.<method>``, alias ``current``. The run also logs the whole config as
  ``serving_config.json``, which the next build compares with.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from stages.serving.inputs import TransformTable
from stages.serving.packs import PACK_TASKS, PayloadCache, as_tensors, pack_entry, plan_packs, read_pack, write_pack
from stages.serving.pyfunc import (
    BASE_ARTIFACT,
    DEFAULT_MAX_ROWS,
    TABLES,
    TASKS_ARTIFACT,
    describe,
    payload_files,
    read_payload_files,
)
from stages.tracking.payloads import PAGE_SIZE, list_registered, registry_name, search_all
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


NAMES_PER_SEARCH = 100  # registered-model names in one ``name IN (...)`` version search


def resolve_versions(arch: str, method: str, tasks: list[str], alias: str = "current",
                     page_size: int = PAGE_SIZE) -> dict[str, tuple[str, str]]:
    """Per task (pinned URI ``models:/<name>/<version>`` of its ``alias`` version, that version's
    source) in a few registry calls, not one per task: the payloads' registered models (their
    aliases) in pages, then their versions, ``NAMES_PER_SEARCH`` names per search, in pages.
    A task without the alias is a ServingError naming it."""
    uri = tracking_uri()
    client = make_client(uri)
    prefix = registry_name(arch, "", method)

    def models():
        return search_all(client.search_registered_models, page_size, filter_string=f"name LIKE '{prefix}%'")

    names = {registry_name(arch, t, method): t for t in tasks}
    aliases = {rm.name: dict(getattr(rm, "aliases", {}) or {}) for rm in retry(models, uri=uri, what="the payload registry")
               if rm.name in names}
    missing = [names[n] for n in names if alias not in aliases.get(n, {})]
    if missing:
        raise ServingError(f"no payload {prefix}<task>@{alias} in {uri} for the tasks {missing}: register them "
                           "(the tune stage) or build without them")
    want = {n: str(aliases[n][alias]) for n in names}
    found: dict[str, tuple[str, str]] = {}
    chunks = [list(names)[i:i + NAMES_PER_SEARCH] for i in range(0, len(names), NAMES_PER_SEARCH)]
    for chunk in chunks:
        quoted = ", ".join("'" + n.replace("'", "''") + "'" for n in chunk)
        versions = retry(lambda q=quoted: search_all(client.search_model_versions, page_size,
                                                     filter_string=f"name IN ({q})"), uri=uri, what="payload versions")
        for mv in versions:
            if mv.name in want and str(mv.version) == want[mv.name]:
                found[names[mv.name]] = (f"models:/{mv.name}/{mv.version}", str(mv.source))
    lost = [t for t in tasks if t not in found]
    if lost:
        raise ServingError(f"the {alias} versions of the tasks {lost} were not found in {uri}")
    return {t: found[t] for t in tasks}


def payload_uris(arch: str, method: str, tasks: list[str], alias: str = "current") -> dict[str, str]:
    """Per task the pinned URI ``models:/<name>/<version>`` of its ``alias`` version."""
    return {t: pinned for t, (pinned, _) in resolve_versions(arch, method, tasks, alias).items()}


def _download(artifact_uri: str, uri: str, dst: Path) -> Path:
    """One artifact (file or directory) of the store ``uri`` into ``dst``."""
    with _mlflow_store(uri):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst)))


def gather_payloads(resolved: dict[str, tuple[str, str]], bank_sha: str, previous: dict[str, Any] | None,
                    cache: PayloadCache | None = None) -> tuple[list[dict[str, Any]], dict[str, tuple]]:
    """(the previous version's packs to reference again, task -> pack entry of every other
    served task): read from the previous version's opened packs (through the payload cache) or
    downloaded from its version's source (one download each), every payload checked against
    ``bank_sha`` (``BankMismatchError``) before anything is logged."""
    uri = tracking_uri()
    pinned = {t: p for t, (p, _) in resolved.items()}
    keep, opened, fetch = plan_packs(pinned, previous)
    covered = {t for p in keep for t in p["tasks"]}
    cache = cache or PayloadCache()
    entries: dict[str, tuple] = {}
    for pack in opened:
        data = cache.read(pack["sha256"], lambda d, u=pack["uri"]: _download(u, uri, d), pack["uri"])
        for task, entry in read_pack(data, pack["uri"]).items():
            if task in pinned and task not in covered and entry[1].get("source") == pinned[task]:
                entries[task] = (as_tensors(entry[0]), entry[1])
    for task in fetch:
        source = resolved[task][1]
        with tempfile.TemporaryDirectory() as tmp:
            tensors, meta = read_payload_files(payload_files(_download(source, uri, Path(tmp))))
        entries[task] = pack_entry(task, tensors, meta, pinned[task], bank_sha)
    lost = [t for t in pinned if t not in covered and t not in entries]
    if lost:
        raise ServingError(f"payloads of the tasks {lost} were neither in a pack nor fetched")
    return keep, entries


def _current(client, name: str) -> tuple[Any, dict[str, Any] | None]:
    """(the ``current`` version of ``name``, its logged ``serving_config.json``), (None, None)
    when there is none, or (version, None) for a version logged otherwise."""
    try:
        mv = client.get_model_version_by_alias(name, "current")
    except Exception:  # noqa: BLE001 - MlflowException: no such model or alias yet
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(mv.run_id, "serving_config.json", tmp)
        except Exception:  # noqa: BLE001 - a version logged otherwise: build a new one
            return mv, None
        return mv, json.loads(Path(path).read_text())


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
    resolved = resolve_versions(arch, method, tasks, alias)
    cfg = {"arch": arch, "method": method, "base_uri": base, "bank_sha256": bank_sha,
           "image_shape": [channels, image_size, image_size], "max_rows": int(max_rows),
           "payloads": {t: pinned for t, (pinned, _) in resolved.items()}}
    if data_dir is not None:
        cfg["transforms"] = task_transforms(Path(data_dir), tasks, image_size)
    name = served_name(arch, method)
    uri = tracking_uri()
    client = make_client(uri)
    current, current_cfg = _current(client, name)
    if current_cfg is not None and {k: v for k, v in current_cfg.items() if k != "packs"} == cfg:
        # the same banks and payload versions are served already: no new version
        stage_logger(__name__).info(f"{name} version {current.version} (alias current) already serves this: "
                                    f"{describe(cfg)}")
        return {"name": name, "version": str(current.version), "run_id": current.run_id, "config": current_cfg,
                "model_uri": current.source, "unchanged": True}
    previous = current_cfg if current_cfg and current_cfg.get("bank_sha256") == bank_sha else None
    keep, entries = gather_payloads(resolved, bank_sha, previous)
    exp = retry(lambda: _experiment_id(client, uri), uri=uri, what="the serving experiment")
    with _mlflow_store(uri), tempfile.TemporaryDirectory() as tmp:
        with mlflow.start_run(experiment_id=exp, run_name=f"serve.{arch}.{method}",
                              tags={"bank_sha256": bank_sha, "arch": arch, "method": method}) as run:
            new = [t for t in tasks if t in entries]
            packs = list(keep)
            for i in range(0, len(new), PACK_TASKS):
                chunk = new[i:i + PACK_TASKS]
                path = Path(tmp) / f"pack{i // PACK_TASKS}.safetensors"
                sha, stacked, widths = write_pack({t: entries[t] for t in chunk}, path)
                named = path.rename(path.with_name(f"{sha}.safetensors"))
                mlflow.log_artifact(str(named), "packs")
                # widths and the tasks stored alone: the loader lays out the packed tasks from these
                packs.append({"uri": f"{run.info.artifact_uri}/packs/{named.name}", "sha256": sha,
                              "bytes": named.stat().st_size, "tasks": chunk, "widths": [widths.get(t, 0) for t in chunk],
                              "single": [t for t in chunk if t not in widths]})
            cfg["packs"] = packs
            mlflow.log_dict(cfg, "serving_config.json")
            # the per-task tables go in a JSON artifact of the model, not in its MLmodel's model_config,
            # which MLflow keeps in memory for as long as the model is loaded (a kilobyte per task)
            columns = {"transform_table": TransformTable.columns(cfg["transforms"], tasks)} if "transforms" in cfg else {}
            tables = json.dumps({**{k: cfg[k] for k in TABLES if k in cfg and k != "transforms"}, **columns}).encode()
            (Path(tmp) / TASKS_ARTIFACT).write_bytes(tables)
            small = {**{k: v for k, v in cfg.items() if k not in TABLES}, "tasks": len(tasks),
                     "tasks_sha256": hashlib.sha256(tables).hexdigest()}
            info = mlflow.pyfunc.log_model(name="model", python_model=str(Path(__file__).with_name("served.py")),
                                           model_config=small, artifacts={"tasks": str(Path(tmp) / TASKS_ARTIFACT)},
                                           code_paths=[str(REPO / "recast"), str(REPO / "stages")],
                                           signature=SIGNATURE, pip_requirements=REQUIREMENTS)
        mv = mlflow.register_model(info.model_uri, name)
    client.set_registered_model_alias(name, "current", mv.version)
    client.set_model_version_tag(name, mv.version, "tasks", ",".join(tasks))
    stage_logger(__name__).info(f"registered {name} version {mv.version} (alias current): {describe(cfg)}; "
                                f"{len(entries)} payloads packed anew, {len(keep)} packs of the previous version kept")
    return {"name": name, "version": str(mv.version), "run_id": run.info.run_id, "config": cfg,
            "model_uri": info.model_uri, "unchanged": False}
