"""The pretrain stage's job and its publishing: build (and train) one backbone per arch.

``source: train`` (default suite, offline) trains each tiny timm model on the prepared
``source`` set; ``source: timm`` (paper configuration) takes timm's pretrained weights, from
the hub or from a local file (``checkpoint_file``, through ``pretrained_cfg_overlay``).
Either way the result is ``<out_dir>/<arch>.safetensors`` + ``<arch>.json``, plus
``results.parquet`` (one row per arch, with lineage) and ``curves.png``.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import timm

from recast.io import tensors_sha256
from recast.training import TuneConfig, evaluate, fit
from stages.config.common import ParamsError, record_nondeterminism, resolve, seed_everything
from stages.config.params import ArchParams, PretrainParams, RuntimeParams
from stages.jobs.backbones import pretrained_sidecar
from stages.jobs.cache import spec_key, store_tensors
from stages.jobs.driver import FannedOutStage, StageRun, drive
from stages.jobs.inputs import InputStore, JobInputs, file_bundle, task_bundle
from stages.jobs.result import JobResult
from stages.jobs.runtime import job_device
from stages.tracking.lineage import TaskData
from stages.tracking.runlog import log_datasets, log_history


def pretrain_job(spec: dict, inputs: JobInputs) -> JobResult:
    """Ray task: build (and train) one backbone; its metrics and state_dict. Inputs: ``source``
    (the prepared source task) for ``source: train``; ``checkpoint`` when ``checkpoint_file`` is set."""
    arch = ArchParams(**spec["arch"])
    seed_everything(spec["seed"])
    if spec["source"] == "timm":
        with tempfile.TemporaryDirectory() as tmp:
            overlay = None
            if "checkpoint" in spec["inputs"]:  # timm reads the weights from a file on this node
                name, data = inputs.file("checkpoint")
                (Path(tmp) / name).write_bytes(data)
                overlay = {"file": str(Path(tmp) / name)}
            model = timm.create_model(arch.model, pretrained=True, pretrained_cfg_overlay=overlay, **arch.kwargs)
        return JobResult({"model": arch.model, "kwargs": arch.kwargs, "num_classes": model.num_classes, "source": "timm",
                          "timm_tag": model.pretrained_cfg.get("tag")}, model.state_dict())
    src = inputs.task("source")
    manifest = src.manifest
    model = timm.create_model(arch.model, pretrained=False, num_classes=manifest.num_classes, **arch.kwargs)
    def loader(split, train):
        return src.loader(split, spec["batch_size"], spec["image_size"], train=train,
                                                 seed=spec["seed"], limit=spec["limit"])
    epochs, lr = arch.epochs or spec["epochs"], arch.lr or spec["lr"]
    cfg = TuneConfig(epochs=epochs, lr=lr, weight_decay=spec["weight_decay"],
                     step_size=max(1, (2 * epochs) // 3), freeze_bn_stats=False, progress=False,
                     device=spec["device"])
    with record_nondeterminism() as nondeterministic:
        res = fit(model, list(model.parameters()), loader("train", True), loader("val", False), cfg,
                  desc=f"pretrain {spec['id']}")
        test_acc = evaluate(model, loader("test", False), cfg.device)
    metrics = {"model": arch.model, "kwargs": arch.kwargs, "num_classes": manifest.num_classes, "source": "train",
               "val_acc": res.best_val_acc, "test_acc": test_acc, "epochs": epochs,
               "seconds_per_step": res.seconds_per_step, "train_seconds": res.seconds}
    return JobResult(metrics, {k: v.cpu() for k, v in model.state_dict().items()}, history=res.history,
                     nondeterministic=nondeterministic)


def build_specs(p: PretrainParams, device: str, store: InputStore) -> list[dict]:
    """One job per arch; inputs added to ``store`` (``checkpoint_file`` is dropped from the spec:
    its digest names it)."""
    specs = []
    for name, a in p.archs.items():
        roles = {}
        if p.source == "train":
            roles["source"] = store.add(task_bundle(resolve(p.data_dir) / "source"))
        elif a.checkpoint_file:
            roles["checkpoint"] = store.add(file_bundle(resolve(a.checkpoint_file)))
        specs.append({"id": f"pretrain/{name}", "arch": a.model_dump(exclude={"checkpoint_file"}),
                      "source": p.source, "epochs": p.epochs, "lr": p.lr, "weight_decay": p.weight_decay,
                      "batch_size": p.batch_size, "image_size": p.image_size, "limit": p.limit, "seed": p.seed,
                      "device": device, "inputs": roles})
    return specs


def publish_backbone(p: PretrainParams, source: list[TaskData], run: StageRun, spec: dict, result: JobResult,
                     cached: bool) -> dict[str, Any]:
    """Write one backbone (a hard link to its job cache file), log its child run; its row."""
    arch = spec["id"].split("/", 1)[1]
    metrics = result.metrics
    if p.source == "timm":  # the job saw the file's bytes only; record where it came from
        metrics = {**metrics, "checkpoint_file": p.archs[arch].checkpoint_file}
    state = result.tensors
    store_tensors(run.rt, "pretrain", spec, state, pretrained_sidecar(state, metrics), run.out_dir / arch)
    rid = run.tracker.child(spec["id"], {"arch": arch, **spec["arch"]}, metrics,
                            tags={"cached": str(cached), **run.lineage_tags(), **result.determinism_tags()},
                            key=spec_key(spec))
    if rid is not None:  # None: the store is unreachable (the Tracker is offline)
        log_datasets(run.tracker, rid, source)
        if result.history:
            log_history(run.tracker, rid, result.history, "epoch", "epoch")
    return {"arch": arch, **metrics, "run_id": rid or "", "backbone_sha256": tensors_sha256(state),
            "data_sha256": ",".join(t.sha256 for t in source), **run.lineage_columns()}


def run(p: PretrainParams, rt: RuntimeParams) -> dict[str, dict]:
    """The pretrain stage: one job per arch; returns its summary (each arch's metrics)."""
    if p.source == "train" and not (resolve(p.data_dir) / "source").exists():
        raise ParamsError(f"pretrain.data_dir: no 'source' set under {resolve(p.data_dir)}; run the prepare stage")
    source = [TaskData.of("source", resolve(p.data_dir) / "source")] if p.source == "train" else []
    store = InputStore(rt.storage)
    return drive(FannedOutStage(
        stage="pretrain", job=pretrain_job, specs=build_specs(p, job_device(rt), store), store=store,
        params=p.model_dump(), datasets=source,
        out_dir=p.out_dir, default_out_dir=PretrainParams.model_fields["out_dir"].default,
        publish=functools.partial(publish_backbone, p, source),
        summarise=lambda results, rows: {sid.split("/", 1)[1]: r.metrics for sid, r in results.items()},
        order=lambda row: row["arch"]), rt)
