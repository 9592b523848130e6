import pytest

from recast.adapters import ADAPTER_PRESETS, AdapterConfig, adapter_preset, add_adapters


def test_presets_exist_and_override():
    assert set(ADAPTER_PRESETS) == {"lora", "lora_tiny", "melo", "dora", "adaptformer", "rosa", "rosa_spa_mlp",
                                    "piggyback", "clr"}
    cfg = adapter_preset("adaptformer", bottleneck=64)
    assert (cfg.kind, cfg.bottleneck, cfg.scale, cfg.targets) == ("adaptformer", 64, 0.1, ("mlp",))
    assert adapter_preset("melo").rank == 1
    assert adapter_preset("rosa_spa_mlp").num_sparse == 144 and adapter_preset("rosa_spa_mlp").rank == 0
    assert AdapterConfig("lora", "attn.qkv").targets == ("attn.qkv",)  # a single string becomes a tuple
    assert AdapterConfig("lora", ("q",), rank=4, alpha=8).lora_scale == 2.0
    assert AdapterConfig("lora", ("q",), rank=4).lora_scale == 1.0


@pytest.mark.parametrize("kwargs, field", [
    (dict(kind="lorax"), "kind"),
    (dict(targets=()), "targets"),
    (dict(rank=0), "rank"),
    (dict(rank=2.5), "rank"),
    (dict(alpha=-1.0), "alpha"),
    (dict(bottleneck=0), "bottleneck"),
    (dict(kind="rosa", rank=0), "num_sparse"),
    (dict(kind="rosa", num_sparse=10, sparsity=0.1), "not both"),
    (dict(sparsity=1.5), "sparsity"),
    (dict(threshold=0.02), "threshold"),
    (dict(seed=-1), "seed"),
])
def test_config_validation_names_the_field(kwargs, field):
    base = dict(kind="lora", targets=("attn.qkv",))
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**{**base, **kwargs})


def test_unknown_preset():
    with pytest.raises(ValueError, match="lora_tiny"):
        adapter_preset("loRA")


def test_matching_errors(vit, resnet):
    with pytest.raises(ValueError, match=r"no module .* matches targets=\['nope'\]"):
        add_adapters(vit, AdapterConfig("lora", ("nope",)))
    with pytest.raises(ValueError, match="is a LayerNorm; 'lora' wraps Linear-like"):
        add_adapters(vit, AdapterConfig("lora", ("norm1",)))
    with pytest.raises(ValueError, match="is a Linear; 'adaptformer' wraps an MLP"):
        add_adapters(vit, AdapterConfig("adaptformer", ("mlp.fc1",)))
    with pytest.raises(ValueError, match="divisible by 3"):
        add_adapters(vit, AdapterConfig("melo", ("attn.proj",)))
    with pytest.raises(ValueError, match="match both"):
        add_adapters(vit, AdapterConfig("adaptformer", (r"blocks\.0(\.mlp)?",), regex=True))
    # without skip_unsupported the pool of a downsample is an error, not silently skipped
    with pytest.raises(ValueError, match="AvgPool2d; .clr. wraps Conv2d-like"):
        add_adapters(resnet, AdapterConfig("clr", (r"layer2\.0\.downsample\.\d",), regex=True))
