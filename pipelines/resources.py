"""Resource report (paper Table 5): peak memory, time per step and wall time of Neural Mimicry and
of tuning, per architecture.

    python -m pipelines.resources [--config pipelines/configs/resources.yaml] [--paper-archs]

Each architecture is measured in a fresh process (spawned one after another, never in parallel,
so timings do not compete for cores and peaks do not carry over). Phases, in that process:

- ``mimicry_gradient``: the paper's gradient procedure (its settings from the config), timed for
  ``mimic_steps`` steps; ``projected_wall_s`` scales that to the paper's step count.
- ``mimicry_closed_form``: the SVD reconstruction the pipeline uses (wall time only: no steps).
- ``tune_recast``: RECAST-FT (one task's coefficients + head) for ``tune_steps`` steps of
  ``recast.training.fit`` on a random batch, after ``warmup_steps`` untimed ones.
- ``tune_full``: full fine-tuning of the plain model, the reference for memory and time.

Memory: the resident-set high-water mark is reset before each phase (``peak_rss_mb``; ``rss_start_mb``
is the resident size when the phase starts); on GPU ``torch.cuda.max_memory_allocated``. The
pipeline's archs (``archs``) use its backbones and its mimic stage's RECAST config; ``--paper-archs``
adds timm's ViT-S and ResNet-34 (``pretrained=False``, a tiny batch at 224 px) with the paper's
configurations. Results: ``<out_dir>/resources.{md,json}`` and an MLflow parent run with a child
run per architecture and phase.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from stages.config.common import Section, read_params, resolve, validate_section, write_json_atomic
from stages.config.params import MimicArch, RuntimeParams

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "resources.yaml"


class ResourceArch(Section):
    """One architecture to measure.

    Attributes:
        model: a timm model name, built with ``pretrained=False``; None: the pipeline's backbone
            of this entry's name (``outputs/pretrain/<name>``).
        recast: the RECAST variant; None: the mimic stage's (``outputs/mimic/<name>/recast.json``).
        gradient_mimicry: ``MimicryConfig`` fields of the paper's gradient procedure (its
            ``steps`` is the count ``projected_wall_s`` scales to).
    """

    model: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    recast: MimicArch | None = None
    gradient_mimicry: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(32, ge=1)
    image_size: int = Field(32, ge=8)
    num_classes: int = Field(10, ge=1)


class ResourcesConfig(Section):
    """What to measure and how long.

    Attributes:
        archs: the pipeline's architectures; paper_archs: added by ``--paper-archs``.
        tune_steps, warmup_steps: timed and untimed (first) tuning steps per phase.
        mimic_steps: timed gradient-mimicry steps (projected to the paper's count).
        threads: torch threads of each measuring process (None: torch's default).
        runtime: overrides of params.yaml's ``runtime`` section (``device``, ``experiment``).
    """

    archs: dict[str, ResourceArch] = Field(min_length=1)
    paper_archs: dict[str, ResourceArch] = Field(default_factory=dict)
    tune_steps: int = Field(8, ge=1)
    warmup_steps: int = Field(1, ge=0)
    mimic_steps: int = Field(20, ge=1)
    lr: float = Field(0.01, gt=0)
    threads: int | None = Field(None, ge=1)
    seed: int = 0
    pretrain_dir: str = "outputs/pretrain"
    mimic_dir: str = "outputs/mimic"
    out_dir: str = "outputs/sweeps/resources"
    runtime: dict[str, Any] = Field(default_factory=dict)

    @field_validator("runtime")
    @classmethod
    def _runtime_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        RuntimeParams.model_validate(v)  # unknown or ill-typed keys fail here, named
        return v


# ----------------------------------------------------------------------------- measuring (child process)
def _phase(device: str, fn) -> dict[str, Any]:
    """Run ``fn() -> dict`` with memory peaks reset; add wall time and memory."""
    import torch

    from stages.jobs.memory import current_rss_mb, peak_memory, reset_peak_memory

    reset_peak_memory(device)
    start_rss = current_rss_mb()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    out.update(wall_s=time.perf_counter() - start, rss_start_mb=start_rss, **peak_memory(device, start_rss))
    out["rss_delta_mb"] = max(0.0, out["peak_rss_mb"] - start_rss)  # the peak may be the start itself
    return out


def _build(name: str, arch: ResourceArch, pretrain_dir: Path, mimic_dir: Path):
    """(plain model, timm model name, RecastConfig) of one entry."""
    import timm

    from recast.config import RecastConfig
    from stages.jobs.backbones import load_backbone

    if arch.model is None:
        backbone = load_backbone(name, pretrain_dir)
        if arch.recast is not None:
            return backbone.plain(), backbone.model_name, arch.recast.recast_config()
        meta = json.loads((mimic_dir / name / "recast.json").read_text())
        return backbone.plain(), backbone.model_name, RecastConfig(**meta["config"])
    if arch.recast is None:
        raise ValueError(f"paper arch '{name}' ({arch.model}) needs a 'recast' variant")
    model = timm.create_model(arch.model, pretrained=False, num_classes=arch.num_classes, **arch.kwargs)
    return model, arch.model, arch.recast.recast_config()


def measure_arch(name: str, arch_dump: dict, cfg_dump: dict, device: str) -> list[dict[str, Any]]:
    """Every phase of one architecture (runs in its own process); one dict per phase."""
    from dataclasses import replace

    import torch

    import recast
    from recast.config import MimicryConfig
    from recast.training import TuneConfig, fit

    arch, cfg = ResourceArch(**arch_dump), ResourcesConfig(**cfg_dump)
    torch.manual_seed(cfg.seed)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    plain, model_name, rcfg = _build(name, arch, resolve(cfg.pretrain_dir), resolve(cfg.mimic_dir))
    plain = plain.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    size = (arch.batch_size, 3, arch.image_size, arch.image_size)
    batch = [(torch.randn(size, generator=gen), torch.randint(0, arch.num_classes, (arch.batch_size,), generator=gen))]
    train = batch * cfg.tune_steps
    tune_cfg = TuneConfig(epochs=1, lr=cfg.lr, device=device, progress=False)
    rc = recast.apply(plain, rcfg, seed=cfg.seed).to(device)
    counts = recast.count_parameters(rc)
    common = {"arch": name, "model": model_name, "device": device,
              "params": sum(p.numel() for p in plain.parameters()), "templates": counts.templates,
              "coefficients_per_task": counts.coefficients, "replaced": counts.replaced,
              "batch_size": arch.batch_size, "image_size": arch.image_size, "threads": torch.get_num_threads()}
    rows = []

    paper = MimicryConfig(**{"seed": cfg.seed, **arch.gradient_mimicry, "method": "gradient", "progress": False})
    timed = replace(paper, steps=cfg.mimic_steps)

    def gradient() -> dict:
        report = recast.mimic(rc, timed)
        per_step = report.seconds / max(report.steps, 1)
        return {"steps": report.steps, "seconds_per_step": per_step, "projected_steps": paper.steps,
                "projected_wall_s": per_step * paper.steps, "mean_weight_cosine": report.mean_weight_cosine}

    def closed_form() -> dict:
        report = recast.mimic(rc, MimicryConfig(method="closed_form", seed=cfg.seed, progress=False))
        return {"steps": 0, "mean_weight_cosine": report.mean_weight_cosine,
                "min_weight_cosine": report.min_weight_cosine}

    def tune(model, params) -> dict:
        if cfg.warmup_steps:  # first steps pay for lazy allocations; keep them out of the timing
            fit(model, params, batch * cfg.warmup_steps, batch, tune_cfg, desc="warmup")
        res = fit(model, params, train, batch, tune_cfg, desc="resources")
        return {"steps": res.steps, "seconds_per_step": res.seconds_per_step,
                "trainable_params": sum(p.numel() for p in params)}

    def tune_recast() -> dict:
        rc.drop_reference()
        rc.add_task("measure", num_classes=arch.num_classes)
        rc.set_task("measure")
        return tune(rc, [p for p in rc.parameters() if p.requires_grad])

    def tune_full() -> dict:
        plain.reset_classifier(arch.num_classes)
        for p in plain.parameters():
            p.requires_grad_(True)
        return tune(plain, list(plain.parameters()))

    for phase, fn in (("mimicry_gradient", gradient), ("mimicry_closed_form", closed_form),
                      ("tune_recast", tune_recast), ("tune_full", tune_full)):
        rows.append({**common, "phase": phase, **_phase(device, fn)})
    return rows


# ----------------------------------------------------------------------------- driver
COLUMNS = ("arch", "model", "phase", "params", "templates", "coefficients_per_task", "trainable_params", "batch_size",
           "image_size", "steps", "seconds_per_step", "wall_s", "projected_wall_s", "peak_rss_mb", "rss_delta_mb",
           "peak_gpu_mb", "mean_weight_cosine")


def measure_all(cfg: ResourcesConfig, device: str, paper_archs: bool) -> list[dict[str, Any]]:
    """Measure every arch, each in a fresh spawned process, one after another."""
    from tqdm.auto import tqdm

    entries = list(cfg.archs.items()) + (list(cfg.paper_archs.items()) if paper_archs else [])
    ctx = multiprocessing.get_context("spawn")
    rows: list[dict[str, Any]] = []
    for name, arch in tqdm(entries, desc="resources"):
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            rows += pool.submit(measure_arch, name, arch.model_dump(), cfg.model_dump(), device).result()
    return rows


def write_tables(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    from pipelines.report import markdown_table

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "resources.json", rows)
    columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    text = ["# Resources (paper Table 5)", "",
            "Peak memory is the resident-set high-water mark of the phase (rss_delta_mb: above the",
            "process's size when the phase starts; peak_gpu_mb on GPU). projected_wall_s: seconds per",
            "step x the paper's step count. Timings on this machine; other work may share its cores.", "",
            markdown_table(rows, columns), ""]
    (out_dir / "resources.md").write_text("\n".join(text))
    return [out_dir / "resources.md", out_dir / "resources.json"]


def run(cfg: ResourcesConfig, rt: RuntimeParams, paper_archs: bool) -> list[dict[str, Any]]:
    from stages.jobs.runtime import pick_device
    from stages.tracking.runs import Tracker

    device = pick_device(rt.device)
    tracker = Tracker("resources", rt.experiment, {**cfg.model_dump(exclude={"runtime"}), "paper_archs": paper_archs,
                                                  "device": device})
    try:
        rows = measure_all(cfg, device, paper_archs)
    except BaseException:
        tracker.finish(status="FAILED")
        raise
    paths = write_tables(rows, resolve(cfg.out_dir))
    for r in rows:
        metrics = {k: v for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        tracker.child(f"resources/{r['arch']}/{r['phase']}", {k: r[k] for k in ("arch", "model", "phase", "device")},
                      metrics, artifacts=[], tags={"kind": "resources"})
    for path in paths:
        tracker.client.log_artifact(tracker.parent_id, str(path), artifact_path="resources")
    tracker.finish()
    return rows


def load_config(path: str | os.PathLike | None = None) -> ResourcesConfig:
    import yaml

    path = Path(path) if path is not None else DEFAULT_CONFIG
    return validate_section("resources", ResourcesConfig, {"resources": yaml.safe_load(path.read_text()) or {}})


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="resources YAML (default pipelines/configs/resources.yaml)")
    ap.add_argument("--params", default=None, help="params.yaml whose runtime section is the base")
    ap.add_argument("--paper-archs", action="store_true", help="also timm ViT-S and ResNet-34 (pretrained=False)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    base = dict(read_params(args.params).get("runtime") or {})
    rt = validate_section("runtime", RuntimeParams, {"runtime": {**base, **cfg.runtime}})
    rows = run(cfg, rt, args.paper_archs)
    for r in rows:
        step = f"{r['seconds_per_step']:.4f} s/step" if r.get("seconds_per_step") else "no steps"
        print(f"{r['arch']:24s} {r['phase']:20s} {step:18s} wall {r['wall_s']:8.3f} s  "
              f"peak {r['peak_rss_mb']:8.1f} MiB")
    return rows


if __name__ == "__main__":
    # Run from the importable module so spawned processes import measure_arch by reference.
    from pipelines.resources import main as _main

    _main()
