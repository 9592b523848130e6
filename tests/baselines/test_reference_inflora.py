"""InfLoRA against the authors' code, re-implemented here from its math.

Reference: liangyanshuo/InfLoRA at commit e08b00edd54f2f10cf2f9826eae7d44fdcb6354b,
``methods/inflora.py`` (``InfLoRA._train``: the design of ``lora_A_k``/``lora_A_v``;
``update_DualGPM``: the feature memory and the threshold schedule; the ``requires_grad`` loop:
which matrices train) and ``models/vit_inflora.py`` (``Attention_LoRA``: ``cur_matrix``, the mean
of ``x x^T`` over the tokens, and the branches on the k and v rows of qkv). The functions below
follow that code step by step in NumPy; ours is run on the same tiny ViT and tasks and must give
the same A (as the projector ``A^T A``, which is free of the SVD's sign choice), the same memory
(as its projector) and the same thresholds, to 1e-5.
"""

import math

import numpy as np
import pytest
import torch

from recast.baselines import InfLoRALinear, make_method


def ref_threshold(lamb: float, lame: float, cur_task: int, total_sessions: int) -> float:
    """``update_DualGPM``'s first line."""
    return (lame - lamb) * cur_task / total_sessions + lamb


def ref_design_a(cur_matrix: np.ndarray, feature_mat: np.ndarray | None, project_type: str | None,
                 rank: int) -> np.ndarray:
    """``_train``'s A for one Attention_LoRA: ``U[:, :rank].T / sqrt(3)`` of the (projected) covariance."""
    if feature_mat is None:  # first task
        u, _, _ = np.linalg.svd(cur_matrix)
    else:
        if project_type == "remove":
            cur_matrix = cur_matrix - feature_mat @ cur_matrix
        else:
            cur_matrix = feature_mat @ cur_matrix
        u, _, _ = np.linalg.svd(cur_matrix, full_matrices=False)
    return u[:, :rank].T / math.sqrt(3)


def ref_update_dual_gpm(feature_list: list, project_type: list, mat_list: list, threshold: float) -> None:
    """``update_DualGPM`` (in place on ``feature_list`` and ``project_type``)."""
    if not feature_list:
        for activation in mat_list:
            u, s, _ = np.linalg.svd(activation, full_matrices=False)
            ratio = s ** 2 / (s ** 2).sum()
            r = int(np.sum(np.cumsum(ratio) < threshold))
            feature_list.append(u[:, :max(r, 1)])
            project_type.append("remove" if r < activation.shape[0] / 2 else "retain")
    else:
        for i, activation in enumerate(mat_list):
            _, s1, _ = np.linalg.svd(activation, full_matrices=False)
            total = (s1 ** 2).sum()
            f = feature_list[i]
            if project_type[i] == "remove":
                hat = activation - f @ f.T @ activation
                u, s, _ = np.linalg.svd(hat, full_matrices=False)
                ratio = s ** 2 / total
                acc, r = (total - (s ** 2).sum()) / total, 0
                for value in ratio:
                    if acc < threshold:
                        acc, r = acc + value, r + 1
                    else:
                        break
                if r:
                    grown = np.hstack((f, u[:, :r]))
                    feature_list[i] = grown[:, :grown.shape[0]]
            else:
                hat = f @ f.T @ activation
                u, s, _ = np.linalg.svd(hat, full_matrices=False)
                ratio = s ** 2 / total
                acc, r = (s ** 2).sum() / total, 0
                for value in ratio:
                    if acc >= 1 - threshold:
                        acc, r = acc - value, r + 1
                    else:
                        break
                if r:
                    shrunk = f - u[:, :r] @ u[:, :r].T @ f
                    ui, _, _ = np.linalg.svd(shrunk)
                    feature_list[i] = ui[:, :f.shape[1] - r]
    for i, f in enumerate(feature_list):
        if project_type[i] == "remove" and f.shape[1] > f.shape[0] / 2:
            u, _, _ = np.linalg.svd(f)
            feature_list[i] = u[:, f.shape[1]:]
            project_type[i] = "retain"


def ref_memory_projector(f: np.ndarray, kind: str) -> np.ndarray:
    """Projector onto the old tasks' input space as the reference's ``feature_mat`` implies."""
    proj = f @ f.T
    return proj if kind == "remove" else np.eye(f.shape[0]) - proj


def _branches(m):
    return {n: mod for n, mod in m.net.backbone.named_modules() if isinstance(mod, InfLoRALinear)}


def test_a_memory_and_thresholds_match_the_reference_over_three_tasks(vit, make_task, fit_one_batch):
    tasks = [make_task("a", 2, seed=1), make_task("b", 3, seed=2), make_task("c", 2, seed=3)]
    rank, lamb, lame = 4, 0.95, 1.0
    m = make_method("inflora", vit, {"rank": rank, "threshold": lamb, "threshold_end": lame})
    m.num_tasks = len(tasks)  # run_sequential sets it
    feature_list, project_type = [], []
    for t, task in enumerate(tasks):
        covs = {n: c.numpy() for n, c in m.input_covariances(task.train).items()}
        tokens = sum(b[0].shape[0] for b in task.train) * (vit.patch_embed.num_patches + 1)  # cur_matrix is a token mean
        m.before_task(task)
        names = list(m.target_names)
        for i, name in enumerate(names):
            feature_mat = None if t == 0 else feature_list[i] @ feature_list[i].T
            ref = ref_design_a(covs[name] / tokens, feature_mat, project_type[i] if t else None, rank)
            ours = _branches(m)[name].down.double().numpy()
            assert ours.shape == ref.shape
            np.testing.assert_allclose(ours.T @ ours, ref.T @ ref, atol=1e-5, err_msg=f"task {t} {name}")
        # which matrices train: the current task's B on the k and v rows and the current head
        trainable = {id(p) for p in m.trainable_parameters()}
        assert trainable == {id(b.up) for b in _branches(m).values()} | {id(p) for p in m.net.head(task.name).parameters()}
        assert all(b.rows.tolist() == list(range(64, 192)) for b in _branches(m).values())  # k and v of qkv (3 x 64)
        fit_one_batch(m, task, lr=0.05, start=False)
        after = {n: c.numpy() for n, c in m.input_covariances(task.train).items()}
        m.after_task(task, task.train)
        threshold = ref_threshold(lamb, lame, t, len(tasks))
        assert m.threshold_after(t) == pytest.approx(threshold, abs=1e-12)
        ref_update_dual_gpm(feature_list, project_type, [after[n] / tokens for n in names], threshold)
        for i, name in enumerate(names):
            ours = m.memory[name].numpy()
            np.testing.assert_allclose(ours @ ours.T, ref_memory_projector(feature_list[i], project_type[i]),
                                       atol=1e-5, err_msg=f"task {t} {name}")


def test_energy_rule_on_a_one_over_i_spectrum_keeps_what_the_reference_keeps(vit):
    """A covariance with eigenvalues 1/i at dim 384: the reference keeps 11 directions at 0.95
    (an eigenvalue criterion would keep 277)."""
    dim = 384
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    cov = q @ torch.diag(1.0 / torch.arange(1, dim + 1, dtype=torch.float64)) @ q.T
    m = make_method("inflora", vit)
    m.tasks = ["a"]
    feature_list, project_type = [], []
    ref_update_dual_gpm(feature_list, project_type, [cov.numpy()], 0.95)
    ours = m._grown_memory("x", cov)
    assert feature_list[0].shape[1] == ours.shape[1] == 11
    np.testing.assert_allclose((ours @ ours.T).numpy(), feature_list[0] @ feature_list[0].T, atol=1e-5)


def test_linear_energy_on_the_one_over_i_spectrum_keeps_what_gpm_on_the_inputs_keeps(vit):
    """The same spectrum with ``energy="linear"`` (a deliberate difference of the offline
    configs, README): GPM's count on the eigenvalues themselves, ``#{k: H(k) / H(384) < 0.95}``
    with H the harmonic numbers, is 276 directions (H(276) / H(384) = 0.94950, H(277) / H(384) = 0.95005)."""
    dim = 384
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    cov = q @ torch.diag(1.0 / torch.arange(1, dim + 1, dtype=torch.float64)) @ q.T
    harmonic = [sum(1.0 / i for i in range(1, k + 1)) for k in range(1, dim + 1)]
    expected = sum(h / harmonic[-1] < 0.95 for h in harmonic)
    m = make_method("inflora", vit, {"energy": "linear"})
    m.tasks = ["a"]
    ours = m._grown_memory("x", cov)
    assert expected == ours.shape[1] == 276
    np.testing.assert_allclose((ours @ ours.T).numpy(), q[:, :276].numpy() @ q[:, :276].T.numpy(), atol=1e-8)
