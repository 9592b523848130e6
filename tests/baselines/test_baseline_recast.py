"""RECAST under the continual-learning protocol: one RecastModel trained task after task, every
earlier task re-evaluated on that same model. Forgetting must be exactly zero, by construction."""

import pytest
import timm
import torch

import recast
from recast.baselines import TrainConfig, make_method, run_sequential


def _rc(backbone, preset_name, **overrides):
    rc = recast.apply(backbone, recast.preset(preset_name, **overrides), seed=0)
    recast.mimic(rc, recast.MimicryConfig(method="closed_form"))
    return rc


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_recast_forgets_nothing_when_trained_in_sequence(arch, vit, make_task):
    if arch == "vit":
        rc = _rc(vit, "recast_mlp", groups=3)
    else:  # 3 blocks per stage: blocks 1-2 are templated (n = 2), BatchNorm everywhere
        torch.manual_seed(0)
        rc = _rc(timm.create_model("test_resnet", pretrained=False, num_classes=0, layers=[3, 3, 3, 3]), "recast_resnet")
    method = make_method("recast", rc)
    tasks = [make_task("a", 2, seed=1), make_task("b", 3, seed=2), make_task("c", 2, seed=3)]
    result = run_sequential(method, tasks, TrainConfig(epochs=2, lr=0.05, seed=0), progress=False)
    m = result.acc_matrix
    for j in range(3):  # every later row repeats the column exactly: the model never changed task j
        assert all(m[i][j] == m[j][j] for i in range(j, 3)), m
    assert result.avg_forgetting == 0.0
    assert max(m[0][0], m[1][1], m[2][2]) > 0.6  # it did learn (blob tasks, chance <= 0.5)
    coefs = recast.count_parameters(rc, "b").coefficients
    assert result.trainable_params[1] == coefs + rc.num_features * 3 + 3


def test_full_finetuning_on_one_backbone_does_forget(vit, make_task):
    """The check above can fail: a method that shares trained weights moves earlier columns."""
    tasks = [make_task("a", 2, seed=1, noise=4.0), make_task("b", 3, seed=2, noise=4.0)]
    result = run_sequential(make_method("ewc", vit, {"lam": 0.0}), tasks, TrainConfig(epochs=2, lr=0.05, seed=0),
                            progress=False)
    assert result.acc_matrix[1][0] != result.acc_matrix[0][0]


def test_recast_method_refuses_a_plain_backbone(vit):
    with pytest.raises(TypeError, match="needs a RecastModel"):
        make_method("recast", vit)
