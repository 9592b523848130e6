"""The mimic stage's job and its publishing: Neural Mimicry of one backbone per arch.

A job applies RECAST to a pretrained backbone and mimics it (``recast.mimic``); the driver writes
``<out_dir>/<arch>/{banks,base}.safetensors`` (+ JSON sidecars), ``recast.json`` (config) and
``report.json``: per-module weight cosine, layer-wise feature cosine on a batch of source images
(Gaussian noise when there is no source set), source-task accuracy of the reconstructed model vs
the original (when there is a source set), and, on each prepared task's own test images, the
top-1 agreement of the two models' source-class predictions and the cosine of their penultimate
features; gradient mimicry's loss every ``eval_every`` steps. Also ``results.parquet`` (one row
per arch, with lineage).
"""

from __future__ import annotations

import functools
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
from stages.config.common import ParamsError, record_nondeterminism, resolve, seed_everything, write_json_atomic
from stages.config.params import MimicParams, RuntimeParams
from stages.jobs.backbones import pretrained_meta, save_mimicked
from stages.jobs.cache import job_file, spec_key
from stages.jobs.driver import FannedOutStage, StageRun, drive
from stages.jobs.inputs import InputStore, JobInputs, backbone_bundle, task_bundle
from stages.jobs.result import JobResult
from stages.jobs.runtime import job_device
from stages.tracking.lineage import TaskData
from stages.tracking.runlog import log_datasets, log_history

SUMMARY_KEYS = ("min_weight_cosine", "mean_weight_cosine", "min_feature_cosine", "seconds", "acc_original",
                "acc_reconstructed", "top1_agreement", "penultimate_cosine", "device")
ABLATION_SUMMARY_KEYS = ("min_weight_cosine", "mean_weight_cosine", "min_feature_cosine", "seconds",
                         "acc_reconstructed")


def mimic_job(spec: dict, inputs: JobInputs) -> JobResult:
    """Ray task: apply + mimic one backbone (input ``backbone``; ``source``, the prepared source
    task, when there is one); its report and tensors (banks, base coefficients)."""
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
        batch = torch.randn(p.feature_batch, 3, p.image_size, p.image_size,  # (B, 3, H, W)
                            generator=torch.Generator().manual_seed(p.seed))
    mcfg = MimicryConfig(**{"seed": p.seed, "progress": False, **a.mimicry})
    with record_nondeterminism() as nondeterministic:
        report = recast.mimic(rc, mcfg, batch=batch.to(device))
    out: dict[str, Any] = {"arch": arch, "device": device, **report.as_dict(),
                           "counts": recast.count_parameters(rc).as_dict()}
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
    return JobResult(out, tensors, nondeterministic=nondeterministic)


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


def summary_of(report: dict[str, Any]) -> dict[str, Any]:
    """An arch's entry in ``metrics/mimic.json`` (and its child run's metrics) from its job's report."""
    out = {k: report[k] for k in SUMMARY_KEYS if k in report}
    out.update(templates=report["counts"]["templates"], coefficients_per_task=report["counts"]["coefficients"])
    for name, ab in report.get("ablations", {}).items():
        out[f"ablation.{name}"] = {k: ab[k] for k in ABLATION_SUMMARY_KEYS if k in ab}
    return out


def publish_mimicked(p: MimicParams, source: list[TaskData], run: StageRun, spec: dict, result: JobResult,
                     cached: bool) -> dict[str, Any]:
    """Write one arch's banks, base coefficients and report, log its child run; its row."""
    arch = spec["arch"]
    d = run.out_dir / arch
    banks = {k[len("banks."):]: v for k, v in result.tensors.items() if k.startswith("banks.")}
    base = {k[len("base."):]: v for k, v in result.tensors.items() if k.startswith("base.")}
    save_mimicked(run.out_dir, arch, p.archs[arch].recast_config(), p.seed, banks, base)
    report = result.metrics
    write_json_atomic(d / "report.json", report)
    summary = summary_of(report)
    bank_sha = tensors_sha256(banks)
    backbone_sha = str(pretrained_meta(resolve(p.pretrain_dir), arch).get("sha256", ""))
    rid = run.tracker.child(spec["id"], {"arch": arch, **p.archs[arch].model_dump()}, summary,
                            artifacts=[d / "report.json", d / "recast.json"],
                            tags={"cached": str(cached), **run.lineage_tags(), **result.determinism_tags(),
                                  "backbone_sha256": backbone_sha, "bank_sha256": bank_sha},
                            key=spec_key(spec), logged_at=job_file(run.rt, "mimic", spec, ".mlflow.json"))
    if rid is not None:  # None: the store is unreachable (the Tracker is offline)
        log_datasets(run.tracker, rid, source, context="eval")
        if report.get("loss_history"):  # gradient mimicry: the noise-free loss every eval_every steps
            log_history(run.tracker, rid, report["loss_history"], "step", "mimicry")
    return {"arch": arch, **summary, "final_loss": report.get("final_loss"), "steps": report.get("steps"),
            "run_id": rid or "", "backbone_sha256": backbone_sha, "bank_sha256": bank_sha,
            "data_sha256": ",".join(t.sha256 for t in source), **run.lineage_columns()}


def run(p: MimicParams, rt: RuntimeParams) -> dict[str, dict]:
    """The mimic stage: one job per arch (on ``runtime.device``); returns its summary."""
    for arch in p.archs:
        if not (resolve(p.pretrain_dir) / f"{arch}.json").exists():
            raise ParamsError(f"mimic.archs.{arch}: no pretrained backbone at {resolve(p.pretrain_dir)}/{arch}.json")
    store = InputStore(rt.storage)
    src = resolve(p.data_dir) / "source"
    source = [TaskData.of("source", src)] if src.exists() else []
    return drive(FannedOutStage(
        stage="mimic", job=mimic_job, specs=build_specs(p, job_device(rt), store), store=store,
        params=p.model_dump(), datasets=source, dataset_context="eval",
        out_dir=p.out_dir, default_out_dir=MimicParams.model_fields["out_dir"].default,
        publish=functools.partial(publish_mimicked, p, source),
        summarise=lambda results, rows: {r.metrics["arch"]: summary_of(r.metrics) for r in results.values()},
        order=lambda row: row["arch"]), rt)


def _suite_tasks(data_dir: Path) -> list[str]:
    """The prepared tasks of the suite (``suite.json``), in their configured order."""
    suite = data_dir / "suite.json"
    return list(json.loads(suite.read_text())["tasks"]) if suite.exists() else []
