"""Fixtures of the baseline tests: tiny timm backbones and Gaussian-blob image tasks."""

import pytest
import timm
import torch

from recast.baselines import TaskSpec, TensorBatches


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread: tiny models gain nothing from more, and a shared machine loses a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blob_task(name: str, num_classes: int, seed: int, n_train: int = 64, n_test: int = 48,
              noise: float = 0.5, batch_size: int = 16) -> TaskSpec:
    """A task whose class c is a fixed random 3x32x32 pattern plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, 3, 32, 32, generator=gen)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(n) % num_classes
        return means[labels] + noise * torch.randn(n, 3, 32, 32, generator=gen), labels

    train, val, test = split(n_train), split(n_test), split(n_test)
    return TaskSpec(name, num_classes, TensorBatches(*train, batch_size, shuffle=True, seed=seed),
                    TensorBatches(*val, 64), TensorBatches(*test, 64))


@pytest.fixture
def make_task():
    return blob_task


@pytest.fixture
def tasks():
    return [blob_task("a", 2, seed=1), blob_task("b", 3, seed=2)]


def _vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)


def _resnet():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, num_classes=0)


@pytest.fixture
def vit():
    return _vit()


@pytest.fixture
def resnet():
    return _resnet()


@pytest.fixture
def make_backbone():
    return {"vit": _vit, "resnet": _resnet}


def _fit_one_batch(method, task: TaskSpec, lr: float = 0.05, optimizer: str = "sgd",
                   weight_decay: float = 0.0, start: bool = True) -> None:
    """``before_task`` (if ``start``) + the real training loop for one step on one batch."""
    from recast.baselines import TrainConfig

    first = next(iter(task.train))
    one = TaskSpec(task.name, task.num_classes, [first], None, task.test)
    if start:
        method.before_task(one)
    method.fit_task(one, TrainConfig(epochs=1, lr=lr, optimizer=optimizer, momentum=0.0,
                                     weight_decay=weight_decay, grad_clip=None))


def _snapshot(module) -> dict:
    return {n: t.detach().clone() for n, t in module.state_dict().items()}


def _changed(before: dict, module) -> set:
    """Names of state entries that differ from ``before`` or are new."""
    after = module.state_dict()
    return {n for n, t in after.items() if n not in before or not torch.equal(t, before[n])}


@pytest.fixture
def fit_one_batch():
    return _fit_one_batch


@pytest.fixture
def snapshot():
    return _snapshot


@pytest.fixture
def changed():
    return _changed
