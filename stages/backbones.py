"""Files of the pretrain and mimic stages, and turning them back into a Backbone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from recast.config import RecastConfig
from recast.io import tensors_sha256
from recast.recipes import Backbone
from stages.common import write_json_atomic


def save_pretrained(out_dir: Path, arch: str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """``<out_dir>/<arch>.safetensors`` + ``<arch>.json`` (model name, kwargs, metrics, sha256)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{arch}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)
    write_json_atomic(out_dir / f"{arch}.json", {**meta, "sha256": tensors_sha256(state)})
    return path


def pretrained_meta(pretrain_dir: Path, arch: str) -> dict[str, Any]:
    path = pretrain_dir / f"{arch}.json"
    if not path.exists():
        raise FileNotFoundError(f"no pretrained backbone for arch '{arch}' at {path}: run the pretrain stage")
    return json.loads(path.read_text())


def load_backbone(arch: str, pretrain_dir: Path, mimic_dir: Path | None = None) -> Backbone:
    """The Backbone of ``arch`` from the stage outputs (with its RECAST form if ``mimic_dir``)."""
    meta = pretrained_meta(pretrain_dir, arch)
    state = load_file(str(pretrain_dir / f"{arch}.safetensors"))
    bb = Backbone(meta["model"], dict(meta["kwargs"]), state, num_classes=meta.get("num_classes"))
    if mimic_dir is not None:
        rdir = mimic_dir / arch
        rmeta = json.loads((rdir / "recast.json").read_text())
        bb.recast_config = RecastConfig(**rmeta["config"])
        bb.apply_seed = rmeta.get("apply_seed", 0)
        bb.banks = load_file(str(rdir / "banks.safetensors"))
        bb.base = load_file(str(rdir / "base.safetensors"))
    return bb
