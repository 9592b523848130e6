"""Class-balanced and reservoir memories, ER-ACE, DER++ and GDumb."""

import pytest
import torch
import torch.nn.functional as F

from recast.baselines import ClassBalancedBuffer, DERPPConfig, ReplayConfig, make_method
from recast.baselines.buffer import replay_cross_entropy

VIT_PARAMS = 300_096


def stream(buffer, task_id, labels, start=0.0):
    labels = torch.as_tensor(labels)
    images = (start + torch.arange(len(labels), dtype=torch.float32)).view(-1, 1, 1, 1)
    buffer.add(images.expand(-1, 3, 2, 2), labels, task_id)


def test_buffer_is_class_balanced_and_full():
    buffer = ClassBalancedBuffer(10, torch.Generator().manual_seed(0))
    stream(buffer, 0, [0, 1] * 20)
    assert len(buffer) == 10 and buffer.class_counts() == {(0, 0): 5, (0, 1): 5}
    stream(buffer, 1, [0, 1, 2] * 20, start=100.0)  # same labels, new task: new classes
    counts = buffer.class_counts()
    assert len(buffer) == 10 and sum(counts.values()) == 10
    assert set(counts) == {(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)}
    assert set(counts.values()) == {2}
    stored = buffer.tensors()
    assert stored["images"].shape == (10, 3, 2, 2) and stored["task_ids"].tolist().count(1) == 6
    # every stored image carries its own label: images of task 1 were 100 + position
    t1 = stored["task_ids"] == 1
    assert torch.equal((stored["images"][t1, 0, 0, 0] - 100).long() % 3, stored["labels"][t1])


def test_buffer_uneven_capacity_and_determinism():
    runs = []
    for _ in range(2):
        buffer = ClassBalancedBuffer(7, torch.Generator().manual_seed(5))
        stream(buffer, 0, [0, 1, 2] * 10)
        runs.append(buffer.tensors()["images"].clone())
        assert sorted(buffer.class_counts().values()) == [2, 2, 3]
    assert torch.equal(runs[0], runs[1])


def test_buffer_pads_logits_of_smaller_heads():
    buffer = ClassBalancedBuffer(4)
    buffer.add(torch.zeros(2, 3, 2, 2), torch.tensor([0, 1]), 0, logits=torch.ones(2, 2))
    buffer.add(torch.zeros(2, 3, 2, 2), torch.tensor([0, 1]), 1, logits=2 * torch.ones(2, 3))
    logits = buffer.tensors()["logits"]
    assert logits.tolist() == [[1, 1, 0], [1, 1, 0], [2, 2, 2], [2, 2, 2]]
    with pytest.raises(ValueError, match="capacity"):
        ClassBalancedBuffer(0)


def test_er_ace_replays_old_tasks_through_their_heads(vit, tasks, fit_one_batch, snapshot, changed):
    m = make_method("er_ace", vit, ReplayConfig(memory_size=12, replay_batch_size=8))
    fit_one_batch(m, tasks[0])
    assert len(m.buffer) == 12 and m.buffer.seen == 16  # a reservoir over the stream
    before = snapshot(m)
    fit_one_batch(m, tasks[1])
    assert "net.heads.a.weight" in changed(before, m)  # replayed samples train head a
    assert len(m.buffer) == 12 and m.buffer.seen == 32
    assert sum(p.numel() for p in m.trainable_parameters()) == VIT_PARAMS + 130 + 195
    assert m.training_state()["images"].shape == (12, 3, 32, 32)


def test_replay_cross_entropy_matches_per_sample_heads(vit, tasks):
    m = make_method("er_ace", vit)
    m.before_task(tasks[0])
    m.before_task(tasks[1])
    m.eval()
    images, labels = torch.randn(5, 3, 32, 32), torch.tensor([1, 0, 2, 1, 0])
    task_ids = torch.tensor([0, 1, 1, 0, 1])
    batch = {"images": images, "labels": labels, "task_ids": task_ids}
    with torch.no_grad():
        expected = sum(float(F.cross_entropy(m(images[i:i + 1], "ab"[int(t)]), labels[i:i + 1]))
                       for i, t in enumerate(task_ids)) / 5
    assert float(replay_cross_entropy(m.net, batch, m.tasks).detach()) == pytest.approx(expected, rel=1e-5)


def test_derpp_logit_loss_zero_for_unchanged_model(vit, tasks, fit_one_batch):
    m = make_method("derpp", vit, DERPPConfig(memory_size=16, replay_batch_size=16))
    m.before_task(tasks[0])
    x, y = next(iter(tasks[0].train))
    m.train()
    with torch.no_grad():
        m.training_loss(x, y, tasks[0])  # fills the memory with the current logits
    batch = m.buffer.sample(16)
    assert batch["logits"].shape == (len(m.buffer), 2) and len(m.buffer) >= 12
    assert float(m.logit_replay_loss(batch).detach()) == pytest.approx(0.0, abs=1e-10)
    fit_one_batch(m, tasks[0], lr=0.5, start=False)
    assert float(m.logit_replay_loss(m.buffer.sample(16)).detach()) > 1e-6


def test_derpp_stores_each_task_logits_at_its_head_width(vit, tasks, fit_one_batch):
    m = make_method("derpp", vit, {"memory_size": 20, "alpha": 0.5, "beta": 0.0})
    fit_one_batch(m, tasks[0])
    fit_one_batch(m, tasks[1])
    state = m.training_state()
    assert state["logits"].shape == (20, 3)
    old = state["task_ids"] == 0
    assert torch.all(state["logits"][old, 2] == 0) and torch.all(state["logits"][~old, 2] != 0)


def test_gdumb_retrains_from_initial_backbone_on_memory(vit, tasks):
    m = make_method("gdumb", vit, {"memory_size": 10, "batch_size": 5})
    initial = {k: v.clone() for k, v in vit.state_dict().items()}
    m.before_task(tasks[0])
    m.fill_memory(tasks[0].train)
    assert m.buffer.class_counts() == {(0, 0): 5, (0, 1): 5}
    with torch.no_grad():
        next(vit.parameters()).add_(1.0)  # pretend the backbone was trained
    m.reset()
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in initial.items())
    m.before_task(tasks[1])
    m.fill_memory(tasks[1].train)
    assert sorted(m.buffer.class_counts().values()) == [2, 2, 2, 2, 2]
    assert sum(p.numel() for p in m.trainable_parameters()) == VIT_PARAMS + 130 + 195
    state = m.training_state()
    assert state["memory.images"].shape == (10, 3, 32, 32)
    assert state["initial_backbone.pos_embed"].shape == vit.pos_embed.shape


def test_gdumb_cutmix_pairs_inside_tasks_and_mixes_the_loss(vit, tasks):
    from recast.baselines.gdumb import cutmix_within_tasks

    gen = torch.Generator().manual_seed(3)
    images = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 32, 32).contiguous()
    task_ids = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    for _ in range(20):
        mixed, partner, lam = cutmix_within_tasks(images, task_ids, 1.0, gen)
        assert torch.equal(task_ids[partner], task_ids)  # both labels live in one head
        assert sorted(partner.tolist()) == list(range(8))  # a permutation
        for i in range(8):  # each image is itself outside the box and its partner inside it
            own = (mixed[i] == images[i, 0, 0, 0]).float().mean().item()
            if partner[i] != i:
                assert own == pytest.approx(lam, abs=1e-6)
                assert torch.all((mixed[i] == images[i, 0, 0, 0]) | (mixed[i] == images[partner[i], 0, 0, 0]))
        assert 0.0 <= lam <= 1.0
    m = make_method("gdumb", vit, {"memory_size": 10, "batch_size": 5, "cutmix_prob": 0.0})
    m.before_task(tasks[0])
    m.fill_memory(tasks[0].train)
    batch = next(iter(m.buffer.batches(10)))
    m.train()
    plain = m.memory_loss((batch["images"], batch["labels"], batch["task_ids"]))
    m.cfg = type(m.cfg)(memory_size=10, batch_size=5, cutmix_prob=1.0)
    mixed_loss = m.memory_loss((batch["images"], batch["labels"], batch["task_ids"]))
    assert torch.isfinite(mixed_loss) and float(mixed_loss.detach()) != pytest.approx(float(plain.detach()))
    with pytest.raises(ValueError, match="cutmix_prob"):
        make_method("gdumb", vit, {"cutmix_prob": 1.5})
