"""RECAST: template banks + per-task coefficients for any timm/torch model (ICLR 2025).

Typical use::

    rc = recast.apply(model, recast.preset("recast_mlp"))
    report = recast.mimic(rc, recast.MimicryConfig(method="closed_form"))
    rc.add_task("flowers", num_classes=102); rc.set_task("flowers")
    plain = rc.materialize("flowers")
"""

from recast.accounting import ParameterCount, count_parameters
from recast.analysis import coefficient_similarity, template_diversity
from recast.config import MimicryConfig, RecastConfig
from recast.io import bank_sha256, load_banks, load_payload, read_meta, save_banks, save_payload
from recast.layers import RecastConv2d, RecastLinear, TemplateBank
from recast.mimicry import MimicryReport, mimic
from recast.model import RecastModel, TaskHeads, apply
from recast.presets import PRESET_NAMES, preset
from recast.targets import build_plan, default_layer_key, match_modules

__all__ = [
    "MimicryConfig", "MimicryReport", "PRESET_NAMES", "ParameterCount", "RecastConfig", "RecastConv2d",
    "RecastLinear", "RecastModel", "TaskHeads", "TemplateBank", "apply", "bank_sha256", "build_plan",
    "coefficient_similarity", "count_parameters", "default_layer_key", "load_banks", "load_payload",
    "match_modules", "mimic", "preset", "read_meta", "save_banks", "save_payload", "template_diversity",
]
__version__ = "0.1.0"
