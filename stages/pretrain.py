"""Stage ``pretrain``: the backbones every later stage starts from.

``source: train`` (default suite, offline) trains each tiny timm model on the prepared
``source`` set; ``source: timm`` (paper configuration) takes timm's pretrained weights, from
the hub or from a local file (``checkpoint_file``, through ``pretrained_cfg_overlay``).
Either way the result is ``outputs/pretrain/<arch>.safetensors`` + ``<arch>.json``, plus
``results.parquet`` (one row per arch, with lineage) and ``curves.png``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import timm

from recast.training import TuneConfig, evaluate, fit
from recast.io import tensors_sha256
from stages.jobs.backbones import pretrained_sidecar
from stages.config.cli import entry, stage_params
from stages.config.common import (ParamsError, determinism_tags, metrics_path, record_nondeterminism, resolve,
                           seed_everything, validate_section, write_json_atomic)
from stages.report.curves import plot_curves
from stages.jobs.fanout import run_jobs, spec_key, stage_lock, store_tensors
from stages.jobs.inputs import InputStore, JobInputs, file_bundle, task_bundle
from stages.tracking.lineage import TaskData, stage_lineage
from stages.config.params import ArchParams, PretrainParams, RuntimeParams
from stages.tracking.runlog import log_datasets, log_file, log_history
from stages.jobs.runtime import job_device
from stages.report.tables import write_results
from stages.tracking.runs import Tracker


def pretrain_job(spec: dict, inputs: JobInputs) -> tuple[dict, dict]:
    """Ray task: build (and train) one backbone; returns (meta, state_dict). Inputs: ``source``
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
        return {"model": arch.model, "kwargs": arch.kwargs, "num_classes": model.num_classes, "source": "timm",
                "timm_tag": model.pretrained_cfg.get("tag")}, model.state_dict()
    src = inputs.task("source")
    manifest = src.manifest
    model = timm.create_model(arch.model, pretrained=False, num_classes=manifest.num_classes, **arch.kwargs)
    loader = lambda split, train: src.loader(split, spec["batch_size"], spec["image_size"], train=train,
                                             seed=spec["seed"], limit=spec["limit"])
    epochs, lr = arch.epochs or spec["epochs"], arch.lr or spec["lr"]
    cfg = TuneConfig(epochs=epochs, lr=lr, weight_decay=spec["weight_decay"],
                     step_size=max(1, (2 * epochs) // 3), freeze_bn_stats=False, progress=False,
                     device=spec["device"])
    with record_nondeterminism() as nondeterministic:
        res = fit(model, list(model.parameters()), loader("train", True), loader("val", False), cfg,
                  desc=f"pretrain {spec['id']}")
        test_acc = evaluate(model, loader("test", False), cfg.device)
    meta = {"model": arch.model, "kwargs": arch.kwargs, "num_classes": manifest.num_classes, "source": "train",
            "val_acc": res.best_val_acc, "test_acc": test_acc, "epochs": epochs,
            "seconds_per_step": res.seconds_per_step, "train_seconds": res.seconds,
            "_history": res.history, "_nondeterministic": nondeterministic}
    return meta, {k: v.cpu() for k, v in model.state_dict().items()}


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


def run(p: PretrainParams, rt: RuntimeParams) -> dict[str, dict]:
    if p.source == "train" and not (resolve(p.data_dir) / "source").exists():
        raise ParamsError(f"pretrain.data_dir: no 'source' set under {resolve(p.data_dir)}; run the prepare stage")
    source = [TaskData.of("source", resolve(p.data_dir) / "source")] if p.source == "train" else []
    store = InputStore(rt.storage)
    specs = build_specs(p, job_device(rt), store)
    out = resolve(p.out_dir)
    rows, histories = [], {}
    with stage_lock("pretrain", rt):
        lineage = stage_lineage("pretrain")  # before any output is written: what dvc.lock will record
        with Tracker("pretrain", rt.experiment, p.model_dump(), tags=lineage.tags()) as tracker:
            log_datasets(tracker, tracker.parent_id, source)

            def on_result(spec, result, cached):
                meta, state = result
                arch = spec["id"].split("/", 1)[1]
                clean = {k: v for k, v in meta.items() if not k.startswith("_")}
                if p.source == "timm":  # the job saw the file's bytes only; record where it came from
                    clean = {**clean, "checkpoint_file": p.archs[arch].checkpoint_file}
                store_tensors(rt, "pretrain", spec, state, pretrained_sidecar(state, clean), out / arch)
                rid = tracker.child(spec["id"], {"arch": arch, **spec["arch"]}, clean,
                                    tags={"cached": str(cached), **lineage.tags(), **determinism_tags(meta)},
                                    key=spec_key(spec))
                if rid is not None:  # None: the store is unreachable (the Tracker is offline)
                    log_datasets(tracker, rid, source)
                    if meta.get("_history"):
                        log_history(tracker, rid, meta["_history"], "epoch", "epoch")
                if meta.get("_history"):
                    histories[spec["id"]] = meta["_history"]
                rows.append({"arch": arch, **clean, "run_id": rid or "", "backbone_sha256": tensors_sha256(state),
                             "data_sha256": ",".join(t.sha256 for t in source), **lineage.columns()})

            results = run_jobs("pretrain", pretrain_job, specs, rt, on_result, inputs=store)
            summary = {sid.split("/", 1)[1]: {k: v for k, v in meta.items() if not k.startswith("_")}
                       for sid, (meta, _) in results.items()}
            write_results(sorted(rows, key=lambda r: r["arch"]), out)
            if histories:
                log_file(tracker, tracker.parent_id,
                         plot_curves(histories, out / "curves.png", title="pretrain: per-epoch curves"))
            write_json_atomic(metrics_path("pretrain", p.out_dir, PretrainParams.model_fields["out_dir"].default),
                              summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("pretrain", PretrainParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    print(run(p, rt))


entry(__name__, __spec__)
