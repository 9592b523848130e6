"""The paper's RECAST variants as RecastConfig presets.

- ``recast_mlp``: mlp.fc1 + mlp.fc2 of every ViT block (RECAST-MLP).
- ``recast_att``: the fused attn.qkv (RECAST-Att); ``recast_att_proj`` adds attn.proj, which
  the paper's code does not template.
- ``recast_att_mlp``: qkv + fc1 + fc2 (RECAST-Att+MLP).
- ``recast_resnet``: per stage, one bank for each of conv1/conv2 (and conv3 of Bottlenecks) of
  blocks 1..B-1, n = B-1 templates (block 0, with its stride and downsample, stays ordinary).

The ViT presets match timm's VisionTransformer naming (``blocks.N.attn.qkv``, ``blocks.N.mlp.fc1``)
and so apply to ViT, DeiT and DINO checkpoints alike; G=6, n=2, K=2 as in the paper
(ViT-L: ``groups=12``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, get_args

from recast.config import RecastConfig

PresetName = Literal["recast_mlp", "recast_att", "recast_att_proj", "recast_att_mlp", "recast_resnet"]
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)

_PRESETS: dict[str, RecastConfig] = {
    "recast_mlp": RecastConfig(targets=("mlp.fc1", "mlp.fc2"), groups=6, templates=2, coef_sets=2),
    "recast_att": RecastConfig(targets=("attn.qkv",), groups=6, templates=2, coef_sets=2),
    "recast_att_proj": RecastConfig(targets=("attn.qkv", "attn.proj"), groups=6, templates=2, coef_sets=2),
    "recast_att_mlp": RecastConfig(targets=("attn.qkv", "mlp.fc1", "mlp.fc2"), groups=6, templates=2, coef_sets=2),
    "recast_resnet": RecastConfig(
        targets=(r"layer\d+\.\d+\.conv[123]",), regex=True, groups=1, templates="group_size",
        coef_sets=2, min_layer=1,
    ),
}

assert tuple(_PRESETS) == PRESET_NAMES, "PresetName and _PRESETS disagree"


def preset(name: PresetName, **overrides) -> RecastConfig:
    """The RecastConfig of a paper variant, with field overrides (e.g. ``groups=12``)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {PRESET_NAMES}")
    return replace(_PRESETS[name], **overrides)
