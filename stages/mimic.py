"""Stage ``mimic``: Neural Mimicry per architecture -> banks + base coefficients + report.

Outputs ``outputs/mimic/<arch>/{banks,base}.safetensors`` (+ JSON sidecars), ``recast.json``
(config) and ``report.json`` (per-module weight cosine, layer-wise feature cosine on a batch of
real source images, accuracy of the reconstructed model vs the original, time).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import recast
from recast.config import MimicryConfig
from recast.data import BatchLoader
from recast.training import evaluate
from stages.backbones import load_backbone, save_mimicked
from stages.cli import entry, stage_params
from stages.common import ParamsError, manifest_sha, metrics_path, resolve, validate_section, write_json_atomic
from stages.fanout import run_jobs, spec_key, stage_lock
from stages.params import MimicParams, RuntimeParams
from stages.tracking import Tracker


def mimic_job(spec: dict) -> tuple[dict, dict]:
    """Ray task: apply + mimic one backbone; returns (report, tensors)."""
    p = MimicParams(**spec["params"])
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
    report = recast.mimic(rc, mcfg, batch=batch)
    out: dict[str, Any] = {"arch": arch, **report.as_dict(), "counts": recast.count_parameters(rc).as_dict()}
    if loader is not None:
        rc.set_task(cfg.base_task, freeze=False)
        out["acc_original"] = evaluate(plain, loader)
        out["acc_reconstructed"] = evaluate(rc, loader)
    out["template_diversity"] = recast.template_diversity(rc)
    tensors = {f"banks.{k}": b.templates.detach() for k, b in rc.banks.items()}
    tensors.update({f"base.{k}": v for k, v in rc.task_tensors(cfg.base_task).items()})
    return out, tensors


def build_specs(p: MimicParams) -> list[dict]:
    """One job per arch; its inputs enter the cache key through their digests."""
    return [{"id": f"mimic/{arch}", "arch": arch, "params": p.model_dump(),
             "backbone_sha": _sha(resolve(p.pretrain_dir) / f"{arch}.json"),
             "source_sha": manifest_sha(resolve(p.data_dir) / "source")} for arch in p.archs]


def run(p: MimicParams, rt: RuntimeParams) -> dict[str, dict]:
    for arch in p.archs:
        if not (resolve(p.pretrain_dir) / f"{arch}.json").exists():
            raise ParamsError(f"mimic.archs.{arch}: no pretrained backbone at {resolve(p.pretrain_dir)}/{arch}.json")
    specs = build_specs(p)
    with stage_lock("mimic", rt), Tracker("mimic", rt.experiment, p.model_dump()) as tracker:
        summary = _run(p, rt, specs, tracker)
        write_json_atomic(metrics_path("mimic", p.out_dir, MimicParams.model_fields["out_dir"].default), summary)
    return summary


def _run(p: MimicParams, rt: RuntimeParams, specs: list[dict], tracker: Tracker) -> dict[str, dict]:
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
        tracker.child(spec["id"], {"arch": arch, **p.archs[arch].model_dump()}, summary[arch],
                      artifacts=[d / "report.json", d / "recast.json"], tags={"cached": str(cached)},
                      key=spec_key(spec))

    run_jobs("mimic", mimic_job, specs, rt, on_result)
    return summary


def _sha(path: Path) -> str:
    return json.loads(path.read_text()).get("sha256", "")


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("mimic", MimicParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    print(run(p, rt))


entry(__name__, __spec__)
