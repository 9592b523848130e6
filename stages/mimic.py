"""Stage ``mimic``: Neural Mimicry per architecture -> banks + base coefficients + report.

Outputs ``outputs/mimic/<arch>/{banks,base}.safetensors`` (+ JSON sidecars), ``recast.json``
(config) and ``report.json`` (per-module weight cosine, layer-wise feature cosine on a batch of
real source images, accuracy of the reconstructed model vs the original, time; gradient mimicry's
loss every ``eval_every`` steps), and ``results.parquet`` (one row per arch, with lineage).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import recast
from recast.config import MimicryConfig
from recast.data import BatchLoader
from recast.io import tensors_sha256
from recast.training import evaluate
from stages.backbones import load_backbone, save_mimicked
from stages.cli import entry, stage_params
from stages.common import (ParamsError, determinism_tags, record_nondeterminism, resolve, seed_everything,
                           validate_section, write_json_atomic)
from stages.fanout import run_jobs
from stages.lineage import TaskData, stage_lineage
from stages.params import MimicParams, RuntimeParams
from stages.runlog import log_datasets, log_history
from stages.tables import write_results
from stages.tracking import Tracker


def mimic_job(spec: dict) -> tuple[dict, dict]:
    """Ray task: apply + mimic one backbone; returns (report, tensors)."""
    p = MimicParams(**spec["params"])
    seed_everything(p.seed)
    arch = spec["arch"]
    a = p.archs[arch]
    bb = load_backbone(arch, resolve(p.pretrain_dir))
    plain = bb.plain().eval()
    cfg = a.recast_config()
    rc = recast.apply(plain, cfg, seed=p.seed)
    src = resolve(p.data_dir) / "source"
    batch, loader = None, None
    if src.exists():
        loader = BatchLoader(src, "test", 256, p.image_size, train=False, seed=p.seed, limit=p.eval_limit)
        batch = next(iter(BatchLoader(src, "val", p.feature_batch, p.image_size, train=False, seed=p.seed)))[0]
    else:
        batch = torch.randn(p.feature_batch, 3, p.image_size, p.image_size, generator=torch.Generator().manual_seed(p.seed))
    mcfg = MimicryConfig(**{"seed": p.seed, "progress": False, **a.mimicry})
    with record_nondeterminism() as nondeterministic:
        report = recast.mimic(rc, mcfg, batch=batch)
    out: dict[str, Any] = {"arch": arch, **report.as_dict(), "counts": recast.count_parameters(rc).as_dict(),
                           "_nondeterministic": nondeterministic}
    if loader is not None:
        rc.set_task(cfg.base_task, freeze=False)
        out["acc_original"] = evaluate(plain, loader)
        out["acc_reconstructed"] = evaluate(rc, loader)
    out["template_diversity"] = recast.template_diversity(rc)
    out["ablations"] = {name: _ablation(bb, cfg, p.seed, {**a.mimicry, **m}, batch, loader)
                        for name, m in a.ablations.items()}
    tensors = {f"banks.{k}": b.templates.detach() for k, b in rc.banks.items()}
    tensors.update({f"base.{k}": v for k, v in rc.task_tensors(cfg.base_task).items()})
    return out, tensors


def _ablation(bb, cfg, seed: int, mimicry: dict[str, Any], batch, loader) -> dict[str, Any]:
    """Another reconstruction of the same backbone (e.g. the paper's gradient mimicry or the VAE
    reconstructor) from a fresh ``recast.apply``, reported beside the main one; tuning never
    uses it. Its template diversity is the paper's Fig. 8/9 analysis."""
    plain = bb.plain().eval()
    rc = recast.apply(plain, cfg, seed=seed)
    report = recast.mimic(rc, MimicryConfig(**{"seed": seed, "progress": False, **mimicry}), batch=batch)
    out: dict[str, Any] = {**report.as_dict(), "mimicry": mimicry, "template_diversity": recast.template_diversity(rc)}
    if loader is not None:
        rc.set_task(cfg.base_task, freeze=False)
        out["acc_reconstructed"] = evaluate(rc, loader)
    return out


def run(p: MimicParams, rt: RuntimeParams) -> dict[str, dict]:
    for arch in p.archs:
        if not (resolve(p.pretrain_dir) / f"{arch}.json").exists():
            raise ParamsError(f"mimic.archs.{arch}: no pretrained backbone at {resolve(p.pretrain_dir)}/{arch}.json")
    lineage = stage_lineage("mimic")
    tracker = Tracker("mimic", rt.experiment, p.model_dump(), tags=lineage.tags())
    source = [TaskData.of("source", resolve(p.data_dir) / "source")] if (resolve(p.data_dir) / "source").exists() else []
    log_datasets(tracker, tracker.parent_id, source, context="eval")
    rows = []
    specs = [{"id": f"mimic/{arch}", "arch": arch, "params": p.model_dump(),
              "backbone_sha": _sha(resolve(p.pretrain_dir) / f"{arch}.json")} for arch in p.archs]
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
                                               "seconds", "acc_original", "acc_reconstructed") if k in clean}
        summary[arch].update(templates=clean["counts"]["templates"], coefficients_per_task=clean["counts"]["coefficients"])
        for name, ab in clean.get("ablations", {}).items():
            summary[arch][f"ablation.{name}"] = {k: ab[k] for k in ("min_weight_cosine", "mean_weight_cosine",
                                                                   "min_feature_cosine", "seconds", "acc_reconstructed")
                                                 if k in ab}
        bank_sha = tensors_sha256(banks)
        rid = tracker.child(spec["id"], {"arch": arch, **p.archs[arch].model_dump()}, summary[arch],
                            artifacts=[d / "report.json", d / "recast.json"],
                            tags={"cached": str(cached), **lineage.tags(), **determinism_tags(meta),
                                  "backbone_sha256": spec["backbone_sha"], "bank_sha256": bank_sha})
        log_datasets(tracker, rid, source, context="eval")
        if clean.get("loss_history"):  # gradient mimicry: the noise-free loss every eval_every steps
            log_history(tracker, rid, clean["loss_history"], "step", "mimicry")
        rows.append({"arch": arch, **summary[arch], "final_loss": clean.get("final_loss"), "steps": clean.get("steps"),
                     "run_id": rid, "backbone_sha256": spec["backbone_sha"], "bank_sha256": bank_sha,
                     "data_sha256": ",".join(t.sha256 for t in source), **lineage.columns()})

    run_jobs("mimic", mimic_job, specs, rt, on_result)
    write_results(sorted(rows, key=lambda r: r["arch"]), resolve(p.out_dir))
    write_json_atomic(resolve("metrics/mimic.json"), summary)
    tracker.finish()
    return summary


def _sha(path: Path) -> str:
    return json.loads(path.read_text()).get("sha256", "")


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("mimic", MimicParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    print(run(p, rt))


entry(__name__, __spec__)
