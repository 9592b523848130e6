from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from recast.adapters import (
    ADAPTER_KINDS,
    ADAPTER_PRESET_NAMES,
    ADAPTERS,
    AdapterConfig,
    AdapterKind,
    AdapterWrapper,
    AdaptFormerConfig,
    AdaptFormerMLP,
    CLRConfig,
    CLRConv2d,
    DoRAConfig,
    DoRALinear,
    LoRAConfig,
    LoRALinear,
    MeLoConfig,
    PiggybackConfig,
    PiggybackConv2d,
    RoSAConfig,
    RoSALinear,
    adapter_config,
    adapter_kind,
    adapter_preset,
    add_adapters,
    count_adapter_parameters,
    register_adapter,
)
from recast.adapters.base import is_linear_like

BUILTIN = ["adaptformer", "clr", "dora", "lora", "melo", "piggyback", "rosa"]
# every known kind, in the order the error messages list them (sorted)
KNOWN = r"known kinds: \['adaptformer', 'clr', 'dora', 'lora', 'melo', 'piggyback', 'rosa'\]"


def test_registry_holds_each_builtin_kind_with_its_config():
    assert sorted(ADAPTER_KINDS) == BUILTIN
    for kind in BUILTIN:
        cls = ADAPTERS[kind]
        assert issubclass(cls, AdapterKind) and cls.config_class.kind == kind
        assert adapter_kind(kind) is cls and isinstance(cls.accepts_description, str)


@pytest.mark.parametrize("name, wrapper, kind", [
    ("lora", LoRALinear, "lora"), ("lora_tiny", LoRALinear, "lora"), ("melo", LoRALinear, "melo"),
    ("dora", DoRALinear, "dora"), ("adaptformer", AdaptFormerMLP, "adaptformer"), ("rosa", RoSALinear, "rosa"),
    ("rosa_spa_mlp", RoSALinear, "rosa"),
])
def test_each_vit_preset_builds_its_kinds_wrapper(vit, name, wrapper, kind):
    cfg = adapter_preset(name)
    assert cfg.kind == kind
    add_adapters(vit, cfg)
    wrappers = [m for m in vit.modules() if isinstance(m, AdapterWrapper)]
    assert wrappers and {type(m) for m in wrappers} == {wrapper}


@pytest.mark.parametrize("name, wrapper", [("piggyback", PiggybackConv2d), ("clr", CLRConv2d)])
def test_each_resnet_preset_builds_its_kinds_wrapper(resnet, name, wrapper):
    add_adapters(resnet, adapter_preset(name))
    assert {type(m) for m in resnet.modules() if isinstance(m, AdapterWrapper)} == {wrapper}


def test_overrides_reach_the_built_modules(vit, resnet):
    add_adapters(vit, adapter_preset("lora", rank=8, alpha=4.0, targets=("attn.proj",)))
    proj = vit.blocks[1].attn.proj
    assert isinstance(proj, LoRALinear) and proj.lora_A[0].shape == (8, 64) and proj.scale == 0.5
    assert isinstance(vit.blocks[1].attn.qkv, nn.Linear)  # the preset's own targets were replaced
    add_adapters(vit, adapter_preset("melo", rank=3))
    qkv = vit.blocks[0].attn.qkv
    assert [tuple(a.shape) for a in qkv.lora_A] == [(3, 64), (3, 64)]
    add_adapters(vit, adapter_preset("adaptformer", bottleneck=16, scale=0.5))
    mlp = vit.blocks[0].mlp
    assert mlp.down.weight.shape == (16, 64) and mlp.up.weight.shape == (64, 16) and mlp.scale == 0.5
    add_adapters(resnet, adapter_preset("piggyback", threshold=1e-3, targets=(r"layer1\.0\.conv1",)))
    conv = resnet.layer1[0].conv1
    assert isinstance(conv, PiggybackConv2d) and conv.threshold == 1e-3 and torch.all(conv.mask == 1e-2)


def test_rosa_budget_override_is_split_over_the_matches(vit):
    add_adapters(vit, adapter_preset("rosa_spa_mlp", num_sparse=30))
    counts = [m.num_sparse for m in vit.modules() if isinstance(m, RoSALinear)]
    assert counts == [3] * 6 + [2] * 6 and count_adapter_parameters(vit) == 30  # remainder to the first ones


def test_preset_override_does_not_change_the_preset():
    assert adapter_preset("dora", rank=2).rank == 2
    assert adapter_preset("dora").rank == 4


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="unknown adapter preset 'loRA'") as err:
        adapter_preset("loRA")
    assert all(repr(name) in str(err.value) for name in ADAPTER_PRESET_NAMES)


@pytest.mark.parametrize("name, field", [
    ("lora", "bottleneck"), ("adaptformer", "rank"), ("clr", "threshold"), ("piggyback", "alpha"),
    ("melo", "num_sparse"), ("rosa", "kind"), ("lora", "rnak"),
])
def test_a_field_of_another_kind_is_an_error_naming_it(name, field):
    with pytest.raises(TypeError, match=rf"adapter preset '{name}' .*has no field\(s\) \['{field}'\]; its fields: \["):
        adapter_preset(name, **{field: 1})


def test_adapter_config_builds_by_kind_and_rejects_unknown_kinds_and_fields(vit):
    cfg = adapter_config("dora", targets="attn.qkv", rank=2)
    assert type(cfg) is DoRAConfig and cfg.targets == ("attn.qkv",)  # a single string becomes a tuple
    add_adapters(vit, cfg)
    assert vit.blocks[0].attn.qkv.lora_A.shape == (2, 64)
    with pytest.raises(ValueError, match=rf"unknown adapter kind 'lorax'; {KNOWN}"):
        adapter_config("lorax", targets="attn.qkv")
    with pytest.raises(TypeError, match=r"adapter_config\('clr'\) .*no field\(s\) \['rank'\]"):
        adapter_config("clr", targets="conv1", rank=2)
    with pytest.raises(TypeError, match="bottleneck"):
        LoRAConfig(("attn.qkv",), bottleneck=8)


def test_an_unregistered_config_is_an_error_listing_the_known_kinds(vit):
    @dataclass(frozen=True)
    class Unregistered(AdapterConfig):
        kind: ClassVar[str] = "mystery"

    with pytest.raises(ValueError, match=rf"unknown adapter kind Unregistered \(kind 'mystery'\); {KNOWN}"):
        add_adapters(vit, Unregistered(("mlp",)))

    @dataclass(frozen=True)
    class Impostor(LoRAConfig):  # claims a known kind with another config class
        pass

    with pytest.raises(ValueError, match="registered with LoRAConfig, got a Impostor"):
        add_adapters(vit, Impostor(("attn.qkv",)))
    assert not any(isinstance(m, AdapterWrapper) for m in vit.modules())
    with pytest.raises(TypeError, match="shared base"):
        AdapterConfig(("attn.qkv",))


class _Scaled(AdapterWrapper):
    """A test adapter: ``factor * base(x)`` with a trainable factor."""

    def __init__(self, base, init):
        super().__init__(base)
        self.factor = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x):
        return self.factor * self.base(x)


def test_registering_a_new_kind_makes_add_adapters_dispatch_to_it(vit, x):
    @dataclass(frozen=True)
    class ScaledConfig(AdapterConfig):
        kind: ClassVar[str] = "scaled_test"
        init: float = 1.0

    @register_adapter
    class Scaled(AdapterKind):
        config_class = ScaledConfig
        accepts_description = "Linear-like"

        @staticmethod
        def accepts(module):
            return is_linear_like(module)

        def wrap(self, target, generator):
            return _Scaled(target.module, self.cfg.init)

    try:
        assert adapter_kind("scaled_test") is Scaled
        with torch.no_grad():
            y0 = vit(x)
            names = add_adapters(vit, adapter_config("scaled_test", targets="head", init=2.0))
            assert names == ["head"] and isinstance(vit.head, _Scaled) and count_adapter_parameters(vit) == 1
            assert (vit(x) - 2.0 * y0).abs().max() < 1e-5
        with pytest.raises(ValueError, match="is a LayerNorm; 'scaled_test' wraps Linear-like"):
            add_adapters(vit, ScaledConfig(("blocks.0.norm1",)))

        class Other(Scaled):
            pass

        with pytest.raises(ValueError, match="'scaled_test' is already registered to Scaled"):
            register_adapter(Other)
    finally:
        ADAPTERS.pop("scaled_test", None)
    with pytest.raises(ValueError, match="unknown adapter kind 'scaled_test'"):
        adapter_kind("scaled_test")


@pytest.mark.parametrize("cls, kwargs, field", [
    (LoRAConfig, dict(targets=()), "targets"),
    (LoRAConfig, dict(rank=0), "LoRAConfig.rank"),
    (DoRAConfig, dict(rank=2.5), "DoRAConfig.rank"),
    (MeLoConfig, dict(alpha=-1.0), "MeLoConfig.alpha"),
    (AdaptFormerConfig, dict(bottleneck=0), "AdaptFormerConfig.bottleneck"),
    (AdaptFormerConfig, dict(branch_input="pre"), "branch_input must be"),
    (AdaptFormerConfig, dict(scale=float("nan")), "AdaptFormerConfig.scale"),
    (RoSAConfig, dict(rank=0), "num_sparse > 0 or sparsity > 0"),
    (RoSAConfig, dict(rank=-1), "RoSAConfig.rank must be an integer >= 0"),
    (RoSAConfig, dict(num_sparse=10, sparsity=0.1), "not both"),
    (RoSAConfig, dict(sparsity=1.5), "RoSAConfig.sparsity"),
    (PiggybackConfig, dict(threshold=0.02), "threshold"),
    (CLRConfig, dict(seed=-1), "CLRConfig.seed"),
])
def test_config_validation_names_the_field(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**{"targets": ("attn.qkv",), **kwargs})


def test_rosa_alone_accepts_rank_zero():
    assert RoSAConfig(("mlp.fc1",), rank=0, num_sparse=4).rank == 0


def test_matching_errors(vit, resnet):
    with pytest.raises(ValueError, match=r"no module .* matches targets=\['nope'\]"):
        add_adapters(vit, LoRAConfig(("nope",)))
    with pytest.raises(ValueError, match="is a LayerNorm; 'lora' wraps Linear-like"):
        add_adapters(vit, LoRAConfig(("norm1",)))
    with pytest.raises(ValueError, match="is a Linear; 'adaptformer' wraps an MLP"):
        add_adapters(vit, AdaptFormerConfig(("mlp.fc1",)))
    with pytest.raises(ValueError, match="'blocks.0.attn.proj' has out_features=64"):
        add_adapters(vit, MeLoConfig(("attn.proj",)))
    with pytest.raises(ValueError, match="match both"):
        add_adapters(vit, AdaptFormerConfig((r"blocks\.0(\.mlp)?",), regex=True))
    # without skip_unsupported the pool of a downsample is an error, not silently skipped
    with pytest.raises(ValueError, match="AvgPool2d; .clr. wraps Conv2d-like"):
        add_adapters(resnet, CLRConfig((r"layer2\.0\.downsample\.\d",), regex=True))
