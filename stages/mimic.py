"""Stage ``mimic``: Neural Mimicry per architecture -> banks + base coefficients + report.

Outputs ``outputs/mimic/<arch>/{banks,base}.safetensors`` (+ JSON sidecars), ``recast.json``
(config) and ``report.json``: per-module weight cosine, layer-wise feature cosine on a batch of
source images (Gaussian noise when there is no source set), source-task accuracy of the
reconstructed model vs the original (when there is a source set), and, on each prepared task's
own test images, the top-1 agreement of the two models' source-class predictions and the cosine
of their penultimate features; gradient mimicry's loss every ``eval_every`` steps. Also
``results.parquet`` (one row per arch, with lineage). Jobs run on ``runtime.device``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import recast
from recast.config import MimicryConfig
from recast.data import BatchLoader
from recast.io import tensors_sha256
from recast.training import evaluate
from stages.jobs.backbones import pretrained_meta, save_mimicked
from stages.config.cli import entry, stage_params
from stages.config.common import (ParamsError, determinism_tags, metrics_path, record_nondeterminism, resolve,
                           seed_everything, validate_section, write_json_atomic)
from stages.jobs.fanout import job_file, run_jobs, spec_key, stage_lock
from stages.jobs.inputs import InputStore, JobInputs, backbone_bundle, task_bundle
from stages.tracking.lineage import StageLineage, TaskData, stage_lineage
from stages.config.params import MimicParams, RuntimeParams
from stages.tracking.runlog import log_datasets, log_history
from stages.jobs.runtime import job_device
from stages.report.tables import write_results
from stages.tracking.runs import Tracker


def mimic_job(spec: dict, inputs: JobInputs) -> tuple[dict, dict]:
    """Ray task: apply + mimic one backbone (input ``backbone``; ``source``, the prepared source
    task, when there is one); returns (report, tensors)."""
    p = MimicParams(**spec["params"])
    seed_everything(p.seed)
    arch, device = spec["arch"], spec["device"]
    a = p.archs[arch]
    bb = inputs.backbone("backbone")
    plain = bb.plain().eval().to(device)
    cfg = a.recast_config()
    rc = recast.apply(plain, cfg, seed=p.seed)
    rc.reference_weights = {k: v.to(device) for k, v in rc.reference_weights.items()}
    loader = None
    if "source" in spec["inputs"]:
        src = inputs.task("source")
        loader = src.loader("test", 256, p.image_size, train=False, seed=p.seed, limit=p.eval_limit, device=device)
        batch = next(iter(src.loader("val", p.feature_batch, p.image_size, train=False, seed=p.seed)))[0]
    else:
        batch = torch.randn(p.feature_batch, 3, p.image_size, p.image_size, generator=torch.Generator().manual_seed(p.seed))
    mcfg = MimicryConfig(**{"seed": p.seed, "progress": False, **a.mimicry})
    with record_nondeterminism() as nondeterministic:
        report = recast.mimic(rc, mcfg, batch=batch.to(device))
    out: dict[str, Any] = {"arch": arch, "device": device, **report.as_dict(),
                           "counts": recast.count_parameters(rc).as_dict(), "_nondeterministic": nondeterministic}
    rc.set_task(cfg.base_task, freeze=False)
    if loader is not None:
        out["acc_original"] = evaluate(plain, loader, device)
        out["acc_reconstructed"] = evaluate(rc, loader, device)
    tasks = [role[len("task/"):] for role in spec["inputs"] if role.startswith("task/")]
    if tasks:  # the reconstruction judged where it matters: on each task's own images
        reference = rc.reference_model().eval()
        out["task_agreement"] = {t: agreement(reference, rc.model, inputs.task(f"task/{t}").loader(
            "test", 64, p.image_size, train=False, seed=p.seed, limit=p.eval_limit, device=device), device)
            for t in tasks}
        out["top1_agreement"] = min(v["top1_agreement"] for v in out["task_agreement"].values())
        out["penultimate_cosine"] = min(v["penultimate_cosine"] for v in out["task_agreement"].values())
    out["template_diversity"] = recast.template_diversity(rc)
    out["ablations"] = {name: _ablation(bb, cfg, p.seed, {**a.mimicry, **m}, batch, loader, device)
                        for name, m in a.ablations.items()}
    tensors = {f"banks.{k}": b.templates.detach() for k, b in rc.banks.items()}
    tensors.update({f"base.{k}": v for k, v in rc.task_tensors(cfg.base_task).items()})
    return out, tensors


def _ablation(bb, cfg, seed: int, mimicry: dict[str, Any], batch, loader, device: str) -> dict[str, Any]:
    """Another reconstruction of the same backbone (e.g. the paper's gradient mimicry or the VAE
    reconstructor) from a fresh ``recast.apply``, reported beside the main one; tuning never
    uses it. Its template diversity is the paper's Fig. 8/9 analysis."""
    rc = recast.apply(bb.plain().eval().to(device), cfg, seed=seed)
    rc.reference_weights = {k: v.to(device) for k, v in rc.reference_weights.items()}
    report = recast.mimic(rc, MimicryConfig(**{"seed": seed, "progress": False, **mimicry}), batch=batch.to(device))
    out: dict[str, Any] = {**report.as_dict(), "mimicry": mimicry, "template_diversity": recast.template_diversity(rc)}
    if loader is not None:
        rc.set_task(cfg.base_task, freeze=False)
        out["acc_reconstructed"] = evaluate(rc, loader, device)
    return out


@torch.no_grad()
def agreement(original: nn.Module, reconstructed: nn.Module, loader: BatchLoader, device: str) -> dict[str, float]:
    """Top-1 agreement of two timm models' predictions and the mean cosine of their penultimate
    features (``forward_head(pre_logits=True)``) over ``loader``'s images."""
    original.eval()
    reconstructed.eval()
    same = total = 0
    cosines = []
    for x, _ in loader:
        x = x.to(device)
        f_orig = original.forward_head(original.forward_features(x), pre_logits=True)  # (B, D)
        f_rec = reconstructed.forward_head(reconstructed.forward_features(x), pre_logits=True)  # (B, D)
        logits_orig, logits_rec = original.get_classifier()(f_orig), reconstructed.get_classifier()(f_rec)
        same += int((logits_orig.argmax(1) == logits_rec.argmax(1)).sum())
        total += x.shape[0]
        cosines.append(F.cosine_similarity(f_orig.double(), f_rec.double(), dim=1))
    return {"top1_agreement": same / total, "penultimate_cosine": float(torch.cat(cosines).mean()), "images": total}


def build_specs(p: MimicParams, device: str, store: InputStore) -> list[dict]:
    """One job per arch; its inputs (backbone, the source set, every task) are added to ``store``
    and named in the spec by content digest, so the cache key follows content, not paths."""
    data = resolve(p.data_dir)
    src = data / "source"
    roles = {"source": store.add(task_bundle(src))} if src.exists() else {}
    roles.update({f"task/{t}": store.add(task_bundle(data / t)) for t in _suite_tasks(data)})
    params = p.model_dump(exclude={"pretrain_dir", "data_dir", "out_dir"})
    return [{"id": f"mimic/{arch}", "arch": arch, "params": params, "device": device,
             "inputs": {"backbone": store.add(backbone_bundle(resolve(p.pretrain_dir), arch)), **roles}}
            for arch in p.archs]


def run(p: MimicParams, rt: RuntimeParams) -> dict[str, dict]:
    for arch in p.archs:
        if not (resolve(p.pretrain_dir) / f"{arch}.json").exists():
            raise ParamsError(f"mimic.archs.{arch}: no pretrained backbone at {resolve(p.pretrain_dir)}/{arch}.json")
    store = InputStore(rt.storage)
    src = resolve(p.data_dir) / "source"
    source = [TaskData.of("source", src)] if src.exists() else []
    specs = build_specs(p, job_device(rt), store)
    with stage_lock("mimic", rt):
        lineage = stage_lineage("mimic")  # before any output is written: what dvc.lock will record
        with Tracker("mimic", rt.experiment, p.model_dump(), tags=lineage.tags()) as tracker:
            log_datasets(tracker, tracker.parent_id, source, context="eval")
            summary = _run(p, rt, specs, tracker, store, lineage, source)
            write_json_atomic(metrics_path("mimic", p.out_dir, MimicParams.model_fields["out_dir"].default), summary)
    return summary


def _run(p: MimicParams, rt: RuntimeParams, specs: list[dict], tracker: Tracker, store: InputStore,
         lineage: StageLineage, source: list[TaskData]) -> dict[str, dict]:
    rows = []
    summary = {}

    def on_result(spec, result, cached):
        meta, tensors = result
        arch = spec["arch"]
        d = resolve(p.out_dir) / arch
        banks = {k[len("banks."):]: v for k, v in tensors.items() if k.startswith("banks.")}
        base = {k[len("base."):]: v for k, v in tensors.items() if k.startswith("base.")}
        save_mimicked(resolve(p.out_dir), arch, p.archs[arch].recast_config(), p.seed, banks, base)
        clean = {k: v for k, v in meta.items() if not k.startswith("_")}
        write_json_atomic(d / "report.json", clean)
        summary[arch] = {k: clean[k] for k in ("min_weight_cosine", "mean_weight_cosine", "min_feature_cosine",
                                               "seconds", "acc_original", "acc_reconstructed", "top1_agreement",
                                               "penultimate_cosine", "device") if k in clean}
        summary[arch].update(templates=clean["counts"]["templates"], coefficients_per_task=clean["counts"]["coefficients"])
        for name, ab in clean.get("ablations", {}).items():
            summary[arch][f"ablation.{name}"] = {k: ab[k] for k in ("min_weight_cosine", "mean_weight_cosine",
                                                                   "min_feature_cosine", "seconds", "acc_reconstructed")
                                                 if k in ab}
        bank_sha = tensors_sha256(banks)
        backbone_sha = str(pretrained_meta(resolve(p.pretrain_dir), arch).get("sha256", ""))
        rid = tracker.child(spec["id"], {"arch": arch, **p.archs[arch].model_dump()}, summary[arch],
                            artifacts=[d / "report.json", d / "recast.json"],
                            tags={"cached": str(cached), **lineage.tags(), **determinism_tags(meta),
                                  "backbone_sha256": backbone_sha, "bank_sha256": bank_sha},
                            key=spec_key(spec), logged_at=job_file(rt, "mimic", spec, ".mlflow.json"))
        if rid is not None:  # None: the store is unreachable (the Tracker is offline)
            log_datasets(tracker, rid, source, context="eval")
            if clean.get("loss_history"):  # gradient mimicry: the noise-free loss every eval_every steps
                log_history(tracker, rid, clean["loss_history"], "step", "mimicry")
        rows.append({"arch": arch, **summary[arch], "final_loss": clean.get("final_loss"), "steps": clean.get("steps"),
                     "run_id": rid or "", "backbone_sha256": backbone_sha, "bank_sha256": bank_sha,
                     "data_sha256": ",".join(t.sha256 for t in source), **lineage.columns()})

    run_jobs("mimic", mimic_job, specs, rt, on_result, inputs=store)
    write_results(sorted(rows, key=lambda r: r["arch"]), resolve(p.out_dir))
    return summary


def _suite_tasks(data_dir: Path) -> list[str]:
    """The prepared tasks of the suite (``suite.json``), in their configured order."""
    suite = data_dir / "suite.json"
    return list(json.loads(suite.read_text())["tasks"]) if suite.exists() else []


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("mimic", MimicParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    print(run(p, rt))


entry(__name__, __spec__)
