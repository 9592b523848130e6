import pytest
import timm
import torch

import recast


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32).eval()


@pytest.fixture
def resnet():
    """test_resnet with pretrained-like BatchNorms: timm zero-initialises the last BN of every
    block, which would leave every residual-branch conv without a gradient."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10, layers=(2, 2, 2, 2))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def make_recast(model, preset_name: str, **overrides) -> recast.RecastModel:
    """The brief's RECAST model: mimicked backbone, task 't' active (only its coefficients and head trainable)."""
    rc = recast.apply(model, recast.preset(preset_name, **overrides))
    recast.mimic(rc)
    rc.add_task("t", num_classes=10)
    rc.set_task("t")
    return rc


@pytest.fixture
def rc_vit(vit):
    return make_recast(vit, "recast_att_mlp", groups=3)


@pytest.fixture
def rc_resnet(resnet):
    return make_recast(resnet, "recast_resnet")
