import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import recast
from recast import preset


@pytest.fixture
def rc(tiny_vit):
    rc = recast.apply(tiny_vit, preset("recast_mlp", groups=3))
    recast.mimic(rc)
    rc.add_task("digits", num_classes=10)
    with torch.no_grad():
        for _, layer in rc.recast_layers():
            layer.coefs["digits"].mul_(1.5)
    return rc


def test_payload_roundtrip(rc, tiny_vit, tmp_path):
    recast.save_banks(rc, tmp_path / "banks")
    path = recast.save_payload(rc, "digits", tmp_path / "digits")
    meta = json.loads((tmp_path / "digits.json").read_text())
    assert meta["numel"] == 48 + 650 and meta["bytes"] == 4 * (48 + 650)
    assert path.stat().st_size < 4 * (48 + 650) + 4096

    fresh = recast.apply(tiny_vit, preset("recast_mlp", groups=3), seed=123)
    recast.load_banks(fresh, tmp_path / "banks")
    recast.load_payload(fresh, tmp_path / "digits")
    x = torch.randn(2, 3, 32, 32)
    rc.set_task("digits")
    fresh.set_task("digits")
    with torch.no_grad():
        assert torch.equal(rc.eval()(x), fresh.eval()(x))


def test_payload_against_other_banks_is_an_error(rc, tiny_vit, tmp_path):
    recast.save_payload(rc, "digits", tmp_path / "digits")
    other = recast.apply(tiny_vit, preset("recast_mlp", groups=3), seed=5)
    with pytest.raises(ValueError, match="banks"):
        recast.load_payload(other, tmp_path / "digits")


def test_corrupt_files_detected(rc, tmp_path):
    recast.save_banks(rc, tmp_path / "banks")
    recast.save_payload(rc, "digits", tmp_path / "digits")
    meta = json.loads((tmp_path / "banks.json").read_text())
    meta["bank_sha256"] = "0" * 64
    (tmp_path / "banks.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256"):
        recast.load_banks(rc, tmp_path / "banks")
    edited = load_file(str(tmp_path / "digits.safetensors"))
    edited["head.bias"] = edited["head.bias"] + 1.0  # a valid file whose content is not the saved one
    save_file(edited, str(tmp_path / "digits.safetensors"))
    with pytest.raises(ValueError, match=r"digits\.safetensors: content does not match the sha256"):
        recast.load_payload(rc, tmp_path / "digits")
    (tmp_path / "digits.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"digits\.safetensors: not a readable safetensors file"):
        recast.load_payload(rc, tmp_path / "digits")
    (tmp_path / "digits.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing metadata sidecar .*digits\.json"):
        recast.load_payload(rc, tmp_path / "digits")
    assert not list(tmp_path.glob("*.tmp"))


# The config block of a payload's JSON sidecar as written before the configs were validated by
# pydantic (recast.validation): the bytes a registered payload carries must not change.
PAYLOAD_CONFIG_JSON = (
    '"config": {\n    "base_task": "pretrained",\n    "bn_stats": "frozen",\n    "coef_sets": 2,\n'
    '    "exclude": [],\n    "fan_out_roles": [\n      "attn.qkv"\n    ],\n    "groups": 3,\n    "min_layer": 0,\n'
    '    "regex": false,\n    "targets": [\n      "mlp.fc1",\n      "mlp.fc2"\n    ],\n    "templates": 2\n  }')


def test_payload_config_json_bytes_are_unchanged(rc, tmp_path):
    recast.save_payload(rc, "digits", tmp_path / "digits")
    recast.save_banks(rc, tmp_path / "banks")
    assert PAYLOAD_CONFIG_JSON in (tmp_path / "digits.json").read_text()
    assert PAYLOAD_CONFIG_JSON in (tmp_path / "banks.json").read_text()
    # a validated config is still a plain frozen dataclass: equal, hashable, replaceable
    cfg = rc.config
    assert cfg == dataclasses.replace(cfg) and hash(cfg) == hash(dataclasses.replace(cfg))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.groups = 4
