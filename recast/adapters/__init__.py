"""Adapters on plain and RECAST models, alone or combined by paper eq. 6.

Every adapter wraps a module with the nn.Linear/nn.Conv2d protocol: a plain layer, a
RecastLinear/RecastConv2d (whose ``weight`` is the active task's generated weight) or another
adapter. A weight delta added to ``base.weight`` is eq. 6 (W = W_RECAST + delta) by
construction, and gradients reach both the adapter and the task's coefficients::

    rc = recast.apply(model, recast.preset("recast_att_mlp"))
    rc.add_task("t", num_classes=10); rc.set_task("t")          # freezes all but t
    add_adapters(rc.model, adapter_preset("melo"))               # new params are trainable
    ...train...
    plain = merge_adapters(rc.materialize("t"))                  # LoRA/MeLo/DoRA/RoSA/Piggyback folded

Adapter tensors are per task: store ``adapter_state(rc.model)`` beside the task's payload
(safetensors) and ``load_adapter_state`` it back. A later ``rc.set_task(..., freeze=True)``
freezes adapters too; re-enable them with ``for p in adapter_parameters(m): p.requires_grad_()``.

Each kind has its own config (``LoRAConfig``, ``MeLoConfig``, ``DoRAConfig``, ``RoSAConfig``,
``AdaptFormerConfig``, ``PiggybackConfig``, ``CLRConfig``; shared fields in ``AdapterConfig``)
and a registered ``AdapterKind`` class (``recast.adapters.kinds``) saying which modules it
accepts and how it wraps one; ``add_adapters`` dispatches on the config's kind through
``ADAPTERS``. To add a kind: a config dataclass, a wrapper module and an ``@register_adapter``
class (see ``recast.adapters.registry``).
"""

from recast.adapters.base import AdapterWrapper
from recast.adapters.branches import AdaptFormerMLP, CLRConv2d
from recast.adapters.config import (
    ADAPTER_PRESET_NAMES,
    AdapterConfig,
    AdapterPresetName,
    AdaptFormerConfig,
    CLRConfig,
    DoRAConfig,
    LoRAConfig,
    LowRankConfig,
    MeLoConfig,
    PiggybackConfig,
    RoSAConfig,
    adapter_preset,
)
from recast.adapters.inject import (
    adapter_counts,
    adapter_modules,
    adapter_parameters,
    adapter_payload_bytes,
    adapter_state,
    add_adapters,
    count_adapter_parameters,
    load_adapter_state,
    logical_modules,
    merge_adapters,
    select_rosa_support,
)
from recast.adapters.kinds import ADAPTER_KINDS
from recast.adapters.lowrank import DoRALinear, LoRALinear, RoSALinear
from recast.adapters.masks import PiggybackConv2d, PiggybackLinear
from recast.adapters.peft_baseline import peft_lora
from recast.adapters.registry import ADAPTERS, AdapterKind, Target, adapter_config, adapter_kind, register_adapter

__all__ = [
    "ADAPTERS", "ADAPTER_KINDS", "ADAPTER_PRESET_NAMES", "AdaptFormerConfig", "AdaptFormerMLP", "AdapterConfig",
    "AdapterKind", "AdapterPresetName", "AdapterWrapper", "CLRConfig", "CLRConv2d", "DoRAConfig", "DoRALinear",
    "LoRAConfig", "LoRALinear", "LowRankConfig", "MeLoConfig", "PiggybackConfig", "PiggybackConv2d",
    "PiggybackLinear", "RoSAConfig", "RoSALinear", "Target", "adapter_config", "adapter_counts", "adapter_kind",
    "adapter_modules", "adapter_parameters", "adapter_payload_bytes", "adapter_preset", "adapter_state",
    "add_adapters", "count_adapter_parameters", "load_adapter_state", "logical_modules", "merge_adapters",
    "peft_lora", "register_adapter", "select_rosa_support",
]
