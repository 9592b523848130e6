"""L2P against Mammoth and the authors' code, re-implemented here from their math.

References: aimagelab/mammoth at commit e75a491c69fd729edeb01431afb753d9157d9a81,
``models/l2p_utils/prompt.py`` (``Prompt.forward``: ``l2_normalize`` of keys and query,
``similarity``, ``topk``, the ``batchwise_prompt`` vote, ``prompt_mask``, ``reduce_sim``),
``models/l2p.py`` (``observe``: ``loss - pull_constraint_coeff * reduce_sim``) and
``models/l2p_utils/l2p_model.py`` (the query is the frozen model's pre-logits); and
google-research/l2p at commit dd8836e6e372df29f03d83bf3dc3a806114e9d8e, ``train_continual.py``
(``use_prompt_mask``: task t trains prompts ``t*top_k .. (t+1)*top_k - 1``, none past the pool).
Ours must select the same prompts and give the pull constraint the same gradient, to 1e-5.
"""

import pytest
import torch

from recast.baselines import L2PConfig, make_method


def ref_l2_normalize(x, dim, epsilon=1e-12):
    square_sum = torch.sum(x ** 2, dim=dim, keepdim=True)
    return x * torch.rsqrt(torch.maximum(square_sum, torch.tensor(epsilon)))


def ref_prompt_select(keys, cls_features, top_k, pool_size, batchwise, prompt_mask=None):
    """``Prompt.forward``'s selection: (idx (B, k), reduce_sim)."""
    prompt_norm = ref_l2_normalize(keys, dim=1)
    x_embed_norm = ref_l2_normalize(cls_features, dim=1)
    similarity = x_embed_norm @ prompt_norm.t()
    if prompt_mask is None:
        _, idx = torch.topk(similarity, k=top_k, dim=1)
        if batchwise:
            prompt_id, id_counts = torch.unique(idx, return_counts=True, sorted=True)
            if prompt_id.shape[0] < pool_size:
                prompt_id = torch.cat([prompt_id, torch.full((pool_size - prompt_id.shape[0],), torch.min(idx.flatten()))])
                id_counts = torch.cat([id_counts, torch.full((pool_size - id_counts.shape[0],), 0)])
            _, major_idx = torch.topk(id_counts, k=top_k)
            idx = prompt_id[major_idx].expand(cls_features.shape[0], -1)
    else:
        idx = prompt_mask
    batched_key_norm = prompt_norm[idx]  # B, top_k, C
    reduce_sim = torch.sum(batched_key_norm * x_embed_norm.unsqueeze(1)) / cls_features.shape[0]
    return idx, reduce_sim


def ref_train_prompt_mask(cur_task_id, top_k, pool_size, batch):
    start, end = cur_task_id * top_k, (cur_task_id + 1) * top_k
    if end > pool_size:
        return None
    return torch.arange(start, end)[None, :].repeat(batch, 1)


def _clustered_batch(vit, m, n=12):
    """Images whose queries fall near a few keys, so that the vote has a clear majority."""
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q = vit(x)
        m.keys[2] = q[: n // 2].mean(0)
        m.keys[7] = q.mean(0)
    return x, q


@pytest.mark.parametrize("batchwise", [False, True])
def test_selection_and_pull_constraint_match_mammoth(vit, tasks, batchwise):
    coeff = 0.1
    m = make_method("l2p", vit, L2PConfig(pool_size=10, top_k=5, key_loss_weight=coeff, batchwise=batchwise))
    m.before_task(tasks[0])
    m.train()
    x, query = _clustered_batch(vit, m)
    idx, key_loss = m.select(x)
    ref_keys = m.keys.detach().clone().requires_grad_(True)
    ref_idx, reduce_sim = ref_prompt_select(ref_keys, query, 5, 10, batchwise)
    assert torch.equal(idx, ref_idx)
    if batchwise:
        assert (idx == idx[0]).all()  # one set of prompts for the whole batch
    # ours is lambda * mean sum (1 - cos) = lambda * (top_k - reduce_sim): the same gradient
    torch.testing.assert_close(key_loss, 5 - reduce_sim, atol=1e-5, rtol=0)
    (coeff * key_loss).backward()
    (-coeff * reduce_sim).backward()
    torch.testing.assert_close(m.keys.grad, ref_keys.grad, atol=1e-5, rtol=0)
    # the selected prompts are the ones prepended: prompt[idx] reshaped to (B, k * L_p, D)
    ref_prompts = m.prompts.detach()[ref_idx].reshape(x.shape[0], 5 * 5, -1)
    assert torch.equal(m.prompts.detach()[idx].reshape(x.shape[0], 25, -1), ref_prompts)


def test_prompt_masks_match_the_authors_training(vit, make_task):
    m = make_method("l2p", vit, L2PConfig(pool_size=10, top_k=4, diversify=True))
    for t, name in enumerate("abcd"):
        m.before_task(make_task(name, 2, seed=t))
        m.train()
        x, query = _clustered_batch(vit, m)
        idx, key_loss = m.select(x)
        mask = ref_train_prompt_mask(t, 4, 10, x.shape[0])
        ref_idx, reduce_sim = ref_prompt_select(m.keys.detach(), query, 4, 10, False, mask)
        assert torch.equal(idx, ref_idx), name
        torch.testing.assert_close(key_loss.detach(), 4 - reduce_sim, atol=1e-5, rtol=0)
        m.eval()  # at test time both match keys
        ref_eval, _ = ref_prompt_select(m.keys.detach(), query, 4, 10, False)
        assert torch.equal(m.select(x)[0], ref_eval)
