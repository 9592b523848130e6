"""L2P: prompt pool, key selection, parameter count, frozen backbone."""

import pytest
import torch

from recast.baselines import L2PConfig, make_method


def test_l2p_needs_a_vit(resnet):
    with pytest.raises(TypeError, match="ResNet"):
        make_method("l2p", resnet)
    with pytest.raises(ValueError, match="top_k=6"):
        L2PConfig(pool_size=5, top_k=6)


def test_l2p_trainable_parameters_are_prompts_keys_and_head(vit, tasks):
    m = make_method("l2p", vit, L2PConfig(pool_size=10, prompt_length=5, top_k=5))
    m.before_task(tasks[0])
    assert sum(p.numel() for p in m.trainable_parameters()) == 10 * 5 * 64 + 10 * 64 + 64 * 2 + 2
    assert not any(p.requires_grad for p in vit.parameters())


def test_l2p_selects_the_keys_closest_to_the_query(vit):
    m = make_method("l2p", vit, L2PConfig(pool_size=4, prompt_length=2, top_k=1))
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        query = vit(x)  # frozen [CLS] feature
        m.keys[1] = 3.0 * query[0]  # same direction as sample 0's query
        m.keys[3] = query[1]
    idx, key_loss = m.select(x)
    assert idx.squeeze(1).tolist() == [1, 3]
    assert float(key_loss.detach()) == pytest.approx(0.0, abs=1e-6)
    feats, _ = m.prompted_features(x)
    assert feats.shape == (2, 64)


def test_l2p_step_changes_only_prompts_keys_and_head(vit, tasks, fit_one_batch, snapshot, changed):
    m = make_method("l2p", vit)
    before = snapshot(m)
    fit_one_batch(m, tasks[0], lr=0.5)
    # learned: prompts, keys, the head
    assert changed(before, m) == {"prompts", "keys", "net.heads.a.weight", "net.heads.a.bias"}
    shared = m.shared_state()
    assert shared["prompts"].shape == (10, 5, 64) and "backbone.pos_embed" in shared


def test_l2p_diversified_training_uses_the_tasks_own_prompts(vit, make_task):
    """Per-task prompt masks (the authors' use_prompt_mask): task t trains prompts t*k..(t+1)*k-1
    while they exist; inference and later tasks match keys."""
    m = make_method("l2p", vit, L2PConfig(pool_size=5, prompt_length=2, top_k=2, diversify=True))
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        m.keys[4] = vit(x).mean(0)  # prompt 4's key is the closest for every sample
    chosen = []
    for i, name in enumerate("abc"):
        m.before_task(make_task(name, 2, seed=i))
        m.train()
        with torch.no_grad():
            chosen.append(sorted(set(m.select(x)[0].flatten().tolist())))
    assert chosen[0] == [0, 1] and chosen[1] == [2, 3] and 4 in chosen[2]  # task c: 4..5 is past the pool
    m.eval()
    with torch.no_grad():
        assert 4 in m.select(x)[0].flatten().tolist()
