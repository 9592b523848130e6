"""Stage ``mimic``: Neural Mimicry per architecture -> banks + base coefficients + report.

Outputs ``outputs/mimic/<arch>/{banks,base}.safetensors`` (+ JSON sidecars), ``recast.json``
(config) and ``report.json`` (per-module weight cosine, layer-wise feature cosine on a batch of
real source images, accuracy of the reconstructed model vs the original, time).
"""

from __future__ import annotations

from typing import Any

import torch

import recast
from recast.config import MimicryConfig
from recast.training import evaluate
from stages.backbones import save_mimicked
from stages.cli import entry, stage_params
from stages.common import ParamsError, resolve, validate_section, write_json_atomic
from stages.fanout import run_jobs
from stages.inputs import InputStore, JobInputs, backbone_bundle, task_bundle
from stages.params import MimicParams, RuntimeParams
from stages.tracking import Tracker


def mimic_job(spec: dict, inputs: JobInputs) -> tuple[dict, dict]:
    """Ray task: apply + mimic one backbone (input ``backbone``; ``source``, the prepared source
    task, when there is one); returns (report, tensors)."""
    p = MimicParams(**spec["params"])
    arch = spec["arch"]
    a = p.archs[arch]
    bb = inputs.backbone("backbone")
    plain = bb.plain().eval()
    cfg = a.recast_config()
    rc = recast.apply(plain, cfg, seed=p.seed)
    batch, loader = None, None
    if "source" in spec["inputs"]:
        src = inputs.task("source")
        loader = src.loader("test", 256, p.image_size, train=False, seed=p.seed, limit=p.eval_limit)
        batch = next(iter(src.loader("val", p.feature_batch, p.image_size, train=False, seed=p.seed)))[0]
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


def run(p: MimicParams, rt: RuntimeParams) -> dict[str, dict]:
    for arch in p.archs:
        if not (resolve(p.pretrain_dir) / f"{arch}.json").exists():
            raise ParamsError(f"mimic.archs.{arch}: no pretrained backbone at {resolve(p.pretrain_dir)}/{arch}.json")
    tracker = Tracker("mimic", rt.experiment, p.model_dump())
    store = InputStore(rt.storage)
    src = resolve(p.data_dir) / "source"
    source = {"source": store.add(task_bundle(src))} if src.exists() else {}
    params = p.model_dump(exclude={"pretrain_dir", "data_dir", "out_dir"})  # inputs are named by digest
    specs = [{"id": f"mimic/{arch}", "arch": arch, "params": params,
              "inputs": {"backbone": store.add(backbone_bundle(resolve(p.pretrain_dir), arch)), **source}}
             for arch in p.archs]
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
                      artifacts=[d / "report.json", d / "recast.json"], tags={"cached": str(cached)})

    run_jobs("mimic", mimic_job, specs, rt, on_result, inputs=store)
    write_json_atomic(resolve("metrics/mimic.json"), summary)
    tracker.finish()
    return summary


def main(argv: list[str] | None = None) -> None:
    data = stage_params(argv, __doc__)
    p = validate_section("mimic", MimicParams, data)
    rt = validate_section("runtime", RuntimeParams, data)
    print(run(p, rt))


entry(__name__, __spec__)
