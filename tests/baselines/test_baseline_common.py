import pytest
import torch
from torch import nn

from recast.baselines import ContinualMethod, MultiHeadNet, TaskSpec, TensorBatches, TrainConfig
from recast.baselines.common import config_from_mapping, state_bytes
from recast.baselines.ewc import EWCConfig
from recast.baselines.method import train_epochs
from recast.training import TuneConfig, evaluate


def test_train_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="'adam'"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="TrainConfig.step_size"):
        TrainConfig(step_size=0)
    assert TrainConfig(grad_clip=None).grad_clip is None


def test_config_from_mapping_names_unknown_keys():
    assert config_from_mapping(EWCConfig, {"lam": 3.0}).lam == 3.0
    with pytest.raises(ValueError, match=r"\['lamda'\]"):
        config_from_mapping(EWCConfig, {"lamda": 3.0})


def test_task_spec_validates_name_and_classes():
    with pytest.raises(ValueError, match="'a.b'"):
        TaskSpec("a.b", 2, [], None, [])
    with pytest.raises(ValueError, match="num_classes"):
        TaskSpec("a", 0, [], None, [])


def test_tensor_batches_cover_all_samples_and_reshuffle_per_epoch():
    images, labels = torch.arange(10.0).view(10, 1, 1, 1), torch.arange(10)
    batches = TensorBatches(images, labels, batch_size=4, shuffle=True, seed=3)
    assert len(batches) == 3
    first = torch.cat([y for _, y in batches])
    assert sorted(first.tolist()) == list(range(10))
    assert torch.equal(first, torch.cat([y for _, y in batches]))  # same epoch, same order
    batches.set_epoch(1)
    assert not torch.equal(first, torch.cat([y for _, y in batches]))
    for x, y in batches:  # images follow their labels
        assert torch.equal(x.view(-1).long(), y)


def test_multi_head_net(vit):
    net = MultiHeadNet(vit)
    head = net.add_head("a", 5)
    assert (head.in_features, head.out_features) == (64, 5)
    assert net(torch.randn(2, 3, 32, 32), "a").shape == (2, 5)
    with pytest.raises(ValueError, match="already"):
        net.add_head("a", 3)
    with pytest.raises(ValueError, match="'zz'"):
        net(torch.randn(1, 3, 32, 32), "zz")


def test_multi_head_net_needs_headless_backbone():
    class WithHead(nn.Linear):
        num_features, num_classes = 4, 10
    with pytest.raises(ValueError, match="num_classes=10"):
        MultiHeadNet(WithHead(4, 4))
    with pytest.raises(TypeError, match="num_features"):
        MultiHeadNet(nn.Linear(4, 4))


def test_evaluate_exact_accuracy_and_restores_mode():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, task):
            return torch.stack([x[:, 0, 0, 0], -x[:, 0, 0, 0]], dim=1)  # class 0 iff x > 0

    x = torch.tensor([1.0, 1.0, -1.0, -1.0]).view(4, 1, 1, 1)
    y = torch.tensor([0, 1, 1, 1])
    model = Fixed().train()
    assert evaluate(model, [(x[:2], y[:2]), (x[2:], y[2:])], task="t") == 0.75
    assert model.training
    # any callable (images, task) -> logits, on the CPU by default
    assert evaluate(lambda images, task: model(images, task), [(x, 1 - y)], task="t") == 0.25
    with pytest.raises(ValueError, match="task 't'"):
        evaluate(model, [], task="t")


class _Features(nn.Module):
    """A headless backbone: BatchNorm over 2 features and a weight ``w`` whose loss gradient is 1."""

    num_features, num_classes = 2, 0

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.w = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.bn(x) + self.w


def _train(cfg):
    """Three epochs of one batch with loss = sum(w) + 0 * features: SGD moves w by -lr per step."""
    method = ContinualMethod(_Features())
    w = method.net.backbone.w
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)) + 3.0
    train_epochs(method, [(x, torch.zeros(8, dtype=torch.long))],
                 lambda b: w.sum() + 0.0 * method.net.features(b[0]).sum(), [w], cfg)
    return method.net.backbone


def test_train_config_is_the_tune_recipe_with_the_baselines_defaults():
    cfg = TrainConfig(epochs=3, lr=0.1, seed=3, device="cpu", grad_clip=None)  # the stage's call form
    assert isinstance(cfg, TuneConfig) and cfg.seed == 3
    sgd = dict(optimizer="sgd", momentum=0.0)
    # default: constant learning rate, BatchNorm statistics updated
    net = _train(TrainConfig(epochs=3, lr=0.1, grad_clip=None, **sgd))
    torch.testing.assert_close(net.w.detach(), torch.full((2,), -0.3))
    assert net.bn.running_mean.min() > 0.5  # moved toward the batch mean (about 3)
    # the shared recipe's StepLR and BatchNorm freezing apply in the baselines' loop too
    net = _train(TrainConfig(epochs=3, lr=0.1, grad_clip=None, step_size=1, gamma=0.5, freeze_bn_stats=True, **sgd))
    torch.testing.assert_close(net.w.detach(), torch.full((2,), -0.1 * (1 + 0.5 + 0.25)))
    assert torch.equal(net.bn.running_mean, torch.zeros(2))


def test_state_bytes_counts_shared_storage_once():
    a = torch.zeros(10)
    b = torch.zeros(3, dtype=torch.float64)
    assert state_bytes({"a": a, "alias": a, "b": b}) == 10 * 4 + 3 * 8
    assert state_bytes({"a": a, "half": a[:5]}) == 40 + 20
