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
    # lr 0.003: task a is learned (at 0.05 full fine-tuning diverges to chance on AMD EPYC's kernels,
    # and a column stuck at chance cannot show forgetting); task b's training then costs it > 20 points
    result = run_sequential(make_method("ewc", vit, {"lam": 0.0}), tasks, TrainConfig(epochs=2, lr=0.003, seed=0),
                            progress=False)
    m = result.acc_matrix
    assert m[0][0] > 0.9, m  # learned (2 classes, chance 0.5)
    assert m[1][0] < m[0][0] - 0.2, m  # and forgotten: 1.0 -> 0.60 on AVX512 and on AVX2 kernels


def test_recast_method_refuses_a_plain_backbone(vit):
    with pytest.raises(TypeError, match="needs a RecastModel"):
        make_method("recast", vit)


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_accuracy_matrix_rows_come_from_mixed_batches(arch, vit, make_task):
    """Each row of the matrix is one mixed-task forward per batch (every seen task's rows at
    once), and equals the task-by-task evaluation (set_task + forward) exactly, row by row."""
    from recast.training import evaluate, evaluate_mixed

    if arch == "vit":
        rc = _rc(vit, "recast_mlp", groups=3)
    else:
        torch.manual_seed(0)
        rc = _rc(timm.create_model("test_resnet", pretrained=False, num_classes=0, layers=[3, 3, 3, 3]),
                 "recast_resnet", bn_stats="per_task")
    method = make_method("recast", rc)
    tasks = [make_task("a", 2, seed=1), make_task("b", 3, seed=2), make_task("c", 4, seed=3, n_test=80)]
    calls = []
    rc.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs.get("tasks")), with_kwargs=True)
    result = run_sequential(method, tasks, TrainConfig(epochs=1, lr=0.05, seed=0), progress=False)
    full = [i for i, c in enumerate(calls) if c is not None and len(set(c)) == 3]
    assert len(full) == 1 and len(calls[full[0]]) == 48 + 48 + 64, [None if c is None else len(c) for c in calls]
    assert calls[full[0] + 1] == ["c"] * 16  # c's second test batch alone
    mixed = evaluate_mixed(rc, {t.name: t.test for t in tasks})
    assert [mixed[t.name] for t in tasks] == result.acc_matrix[2]
    for t in tasks:  # the same numbers task by task, and the same argmax on every row
        rc.set_task(t.name)
        assert evaluate(rc, t.test) == mixed[t.name]
        rc.eval()
        with torch.no_grad():
            for x, _ in t.test:
                own = rc(x)
                rows = rc(torch.cat([x, tasks[0].test.images[:5]]), tasks=[t.name] * len(x) + ["a"] * 5)[:len(x)]
                assert torch.equal(own.argmax(1), rows[:, :own.shape[1]].argmax(1))
                assert (rows[:, :own.shape[1]] - own).abs().max() <= 1e-5
