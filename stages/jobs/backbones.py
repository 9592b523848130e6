"""Files of the pretrain and mimic stages, and turning them back into a Backbone.

``<pretrain_dir>/<arch>.{safetensors,json}``: the pretrained state dict and its metadata
(model name, kwargs, metrics, sha256). ``<mimic_dir>/<arch>/``: ``banks`` and ``base``
(safetensors + JSON sidecar each), ``recast.json`` (RecastConfig, apply seed, bank sha256).
Every file is written through ``recast.io.save_tensors`` (temp file + rename), and every
tensor file read back is checked against the sha256 recorded beside it (``load_verified``):
a corrupt file is an ``IntegrityError`` naming it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from recast.config import RecastConfig
from recast.io import save_tensors, tensors_sha256
from recast.recipes import Backbone
from stages.config.common import IntegrityError, check_digest, write_json_atomic


def pretrained_sidecar(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON beside a pretrained state dict: the job's metadata plus the tensors' sha256."""
    return {**meta, "sha256": tensors_sha256(state)}


def save_pretrained(out_dir: Path, arch: str, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """``<out_dir>/<arch>.safetensors`` + ``<arch>.json`` outside a stage (tests, benchmarks); the
    pretrain stage publishes the same files from its job cache (``stages.jobs.cache.store_tensors``)."""
    return save_tensors(state, pretrained_sidecar(state, meta), out_dir / arch)


def pretrained_meta(pretrain_dir: Path, arch: str) -> dict[str, Any]:
    path = pretrain_dir / f"{arch}.json"
    if not path.exists():
        raise FileNotFoundError(f"no pretrained backbone for arch '{arch}' at {path}: run the pretrain stage")
    return read_sidecar(path)


def save_mimicked(out_dir: Path, arch: str, config: RecastConfig, apply_seed: int,
                  banks: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> str:
    """Write ``<out_dir>/<arch>/{banks,base}`` and ``recast.json``; returns the bank sha256."""
    d = out_dir / arch
    bank_sha = tensors_sha256(banks)
    save_tensors(banks, {"kind": "recast-banks", "bank_sha256": bank_sha}, d / "banks")
    save_tensors(base, {"kind": "recast-base", "sha256": tensors_sha256(base), "bank_sha256": bank_sha}, d / "base")
    cfg = asdict(config)
    write_json_atomic(d / "recast.json", {"config": {**cfg, "targets": list(cfg["targets"]), "exclude": list(cfg["exclude"])},
                                          "apply_seed": apply_seed, "bank_sha256": bank_sha})
    return bank_sha


def bank_meta(mimic_dir: Path, arch: str) -> dict[str, Any]:
    """``<mimic_dir>/<arch>/recast.json``, or {} when the arch was not mimicked."""
    path = mimic_dir / arch / "recast.json"
    return json.loads(path.read_text()) if path.exists() else {}


def read_sidecar(path: Path) -> dict[str, Any]:
    """A JSON sidecar (metadata + recorded digests); unreadable JSON is an IntegrityError."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{path}: unreadable JSON ({err}); rebuild it with the stage that wrote it") from None


def load_verified(path: Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    """Load a safetensors file and check ``recast.io.tensors_sha256`` of its tensors against the
    recorded digest; a mismatch or an unreadable file is an IntegrityError naming ``path``."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise IntegrityError(f"{path}: unreadable safetensors file ({err}); rebuild it with the stage that wrote it") from None
    check_digest(path, tensors_sha256(tensors), expected_sha256)
    return tensors


def load_backbone(arch: str, pretrain_dir: Path, mimic_dir: Path | None = None) -> Backbone:
    """The Backbone of ``arch`` from the stage outputs (with its RECAST form if ``mimic_dir``)."""
    meta = pretrained_meta(pretrain_dir, arch)
    state = load_verified(pretrain_dir / f"{arch}.safetensors", meta.get("sha256"))
    if mimic_dir is None:
        return backbone_from(meta, state, verified=True)
    rdir = mimic_dir / arch
    rmeta = read_sidecar(rdir / "recast.json")
    return backbone_from(meta, state, rmeta, load_verified(rdir / "banks.safetensors", rmeta.get("bank_sha256")),
                         load_verified(rdir / "base.safetensors", read_sidecar(rdir / "base.json").get("sha256")),
                         verified=True)


def backbone_from(meta: dict[str, Any], state: dict[str, torch.Tensor], recast_meta: dict[str, Any] | None = None,
                  banks: dict[str, torch.Tensor] | None = None, base: dict[str, torch.Tensor] | None = None,
                  verified: bool = False) -> Backbone:
    """A Backbone from in-memory stage outputs: the pretrained ``<arch>.json`` metadata and state
    dict, and for the RECAST form ``recast.json`` with the banks and base coefficients. The
    tensors are checked against the sha256 their metadata records (``IntegrityError``), unless
    the caller already did (``verified``: ``load_backbone`` checks each file as it reads it)."""
    if not verified:
        check_digest("pretrained weights", tensors_sha256(state), meta.get("sha256"))
    bb = Backbone(meta["model"], dict(meta["kwargs"]), state, num_classes=meta.get("num_classes"))
    if recast_meta is not None:
        if banks is None or base is None:
            raise ValueError("backbone_from: recast_meta needs both banks and base")
        if not verified:
            check_digest("banks", tensors_sha256(banks), recast_meta.get("bank_sha256"))
        bb.recast_config = RecastConfig(**recast_meta["config"])
        bb.apply_seed = recast_meta.get("apply_seed", 0)
        bb.banks, bb.base = banks, base
    return bb
