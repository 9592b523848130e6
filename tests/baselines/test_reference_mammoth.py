"""EWC, LwF, ER-ACE, DER++ and GDumb against independent re-implementations of their reference
code's computation, on the same tiny model, batch, buffer and hyperparameters.

Read from (and written here from the maths, not copied):
- aimagelab/mammoth @ e75a491c69fd729edeb01431afb753d9157d9a81: models/ewc_on.py,
  models/lwf.py, models/er_ace.py, models/derpp.py, models/gdumb.py, utils/buffer.py;
- drimpossible/GDumb @ 4f412d7fcb138d27718f1cb79524898b30ace0ad: src/dataloader.py (the
  class-balanced memory; Mammoth's gdumb.py fills a reservoir ``Buffer`` instead).
Mammoth is class-incremental (one classifier over all classes); with one old task, or one task,
its outputs are the task's own head here, which is where the comparisons are made.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from recast.baselines import TaskSpec, make_method
from recast.baselines.buffer import ClassBalancedBuffer, ReservoirBuffer
from recast.baselines.method import ContinualMethod

TOL = 1e-5


def flat(tensors):
    return torch.cat([t.flatten() for t in tensors])


# ---- EWC: Mammoth models/ewc_on.py -------------------------------------------------------
def mammoth_fisher(net, head, batches, batch_size):
    """ewc_on.end_task: per sample, g = grad of log p(y|x); fish += p(y|x) * g^2; then
    fish /= len(train_loader) * batch_size."""
    params = [p for p in net.parameters()]
    fish = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        for ex, lab in zip(x, y):
            log_p = -F.nll_loss(F.log_softmax(head(net(ex[None])), dim=1), lab[None])
            grads = torch.autograd.grad(log_p, params)
            for f, g in zip(fish, grads):
                f += torch.exp(log_p.detach()) * g ** 2
    return [f / (len(batches) * batch_size) for f in fish]


def test_ewc_fisher_online_gamma_and_penalty_match_mammoth(vit, tasks, fit_one_batch):
    lam, gamma = 7.0, 0.5
    m = make_method("ewc", vit, {"lam": lam, "gamma": gamma})
    fit_one_batch(m, tasks[0])
    m.eval()
    batches = list(tasks[0].train)  # 64 samples in 4 batches of 16
    ref = mammoth_fisher(m.net.backbone, m.net.head("a"), batches, 16)
    m.after_task(tasks[0], tasks[0].train)
    ours = [m.fisher[n] for n, _ in m.net.backbone.named_parameters()]
    assert torch.allclose(flat(ours), flat(ref), rtol=TOL, atol=1e-9)
    assert float(flat(ref).sum()) > 0

    fit_one_batch(m, tasks[1])
    m.eval()
    ref2 = mammoth_fisher(m.net.backbone, m.net.head("b"), list(tasks[1].train), 16)
    online = [gamma * r1 + r2 for r1, r2 in zip(ref, ref2)]  # fish *= gamma; fish += new
    m.after_task(tasks[1], tasks[1].train)
    assert torch.allclose(flat([m.fisher[n] for n, _ in m.net.backbone.named_parameters()]),
                          flat(online), rtol=TOL, atol=1e-9)

    # penalty = e_lambda * sum fish * (theta - checkpoint)^2; its gradient get_penalty_grads =
    # e_lambda * 2 * fish * (theta - checkpoint)
    with torch.no_grad():
        for p in m.net.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    theta = flat(m.net.backbone.parameters()).detach()
    anchor = flat([m.anchor[n] for n, _ in m.net.backbone.named_parameters()])
    fish = flat(online)
    penalty = m.penalty()
    assert float(penalty) == pytest.approx(float(lam * (fish * (theta - anchor) ** 2).sum()), rel=TOL)
    grads = flat(torch.autograd.grad(penalty, list(m.net.backbone.parameters())))
    assert torch.allclose(grads, lam * 2 * fish * (theta - anchor), rtol=TOL, atol=1e-12)


# ---- LwF: Mammoth models/lwf.py ----------------------------------------------------------
def mammoth_lwf_term(new_logits, old_logits, temperature):
    """smooth(p, T) = p^(1/T) / sum p^(1/T) of the softmaxes; modified_kl_div(old, new) =
    -mean(sum(old * log(new)))."""
    def smooth(p):
        p = p ** (1 / temperature)
        return p / p.sum(1, keepdim=True)
    old, new = smooth(torch.softmax(old_logits, 1)), smooth(torch.softmax(new_logits, 1))
    return -torch.mean(torch.sum(old * torch.log(new), 1))


def test_lwf_distillation_term_matches_mammoth(vit, tasks, fit_one_batch):
    alpha, temperature = 0.5, 2.0
    m = make_method("lwf", vit, {"lam": alpha, "temperature": temperature, "warmup_epochs": 0})
    fit_one_batch(m, tasks[0])
    fit_one_batch(m, tasks[1], lr=0.2)  # the student moves away from the teacher
    m.eval()
    x, y = next(iter(tasks[1].train))
    with torch.no_grad():
        old_logits = m.teacher(x, "a")  # the old model's outputs on the old classes
    new_logits = m(x, "a")
    ref = mammoth_lwf_term(new_logits, old_logits, temperature)
    assert float(m.distillation_loss(x)) == pytest.approx(float(ref), rel=TOL)
    # the whole loss: CE of the current task + alpha * the term
    expected = F.cross_entropy(m(x, "b"), y) + alpha * ref
    assert float(m.training_loss(x, y, tasks[1])) == pytest.approx(float(expected), rel=TOL)
    # the gradients agree too (the T^2 factor would scale them by 4)
    g_ours = torch.autograd.grad(m.distillation_loss(x), m.net.head("a").weight)[0]
    g_ref = torch.autograd.grad(mammoth_lwf_term(m(x, "a"), old_logits, temperature),
                                m.net.head("a").weight)[0]
    assert torch.allclose(g_ours, g_ref, rtol=TOL, atol=1e-9)


def test_lwf_warms_up_the_new_head_as_mammoth(vit, tasks, fit_one_batch, monkeypatch):
    """lwf.begin_task: SGD(classifier, lr) for n_epochs on frozen features, eval mode, CE of
    the new classes; nothing else changes."""
    m = make_method("lwf", vit, {"warmup_epochs": 2})
    fit_one_batch(m, tasks[0])
    m.before_task(tasks[1])
    ref = copy.deepcopy(m)
    monkeypatch.setattr(ContinualMethod, "fit_task", lambda self, task, cfg, progress=False: None)
    from recast.baselines import TrainConfig
    cfg = TrainConfig(epochs=2, lr=0.1, optimizer="sgd", momentum=0.0, grad_clip=None)
    backbone = {k: v.clone() for k, v in m.net.backbone.state_dict().items()}
    m.fit_task(tasks[1], cfg)
    opt = torch.optim.SGD(ref.net.head("b").parameters(), lr=0.1)
    ref.eval()
    for epoch in range(2):
        tasks[1].train.set_epoch(epoch)
        for x, y in tasks[1].train:
            opt.zero_grad()
            with torch.no_grad():
                feats = ref.net.features(x)
            F.cross_entropy(ref.net.head("b")(feats), y).backward()
            opt.step()
    assert torch.allclose(m.net.head("b").weight, ref.net.head("b").weight, rtol=TOL, atol=1e-7)
    assert not torch.allclose(m.net.head("b").weight, m.teacher.heads["a"].weight[:1].expand(3, -1))
    assert all(torch.equal(v, m.net.backbone.state_dict()[k]) for k, v in backbone.items())


# ---- ER-ACE: Mammoth models/er_ace.py ----------------------------------------------------
class MammothACE:
    """er_ace.observe's loss on the incoming batch, class-incremental: seen_so_far grows with
    every batch's labels; from the second task, logits outside (present classes) U
    [seen_so_far.max(), end) are filled with -1e9 before the cross-entropy."""

    def __init__(self):
        self.seen = torch.tensor([], dtype=torch.long)

    def loss(self, logits, labels, current_task):
        present = labels.unique()
        self.seen = torch.cat([self.seen, present]).unique()
        mask = torch.zeros_like(logits)
        mask[:, present] = 1
        mask[:, self.seen.max():] = 1
        if current_task > 0:
            logits = logits.masked_fill(mask == 0, -1e9)
        return F.cross_entropy(logits, labels)


def test_er_ace_masked_cross_entropy_matches_mammoth(vit, tasks):
    m = make_method("er_ace", vit, {"memory_size": 8})
    ref = MammothACE()
    gen = torch.Generator().manual_seed(3)
    m.train()
    stream = [(0, [1, 1, 1, 1]), (0, [0, 0, 0, 0]),  # task a: classes 0-1 (global 0-1)
              (1, [1, 1, 0, 1]), (1, [2, 2, 0, 2]), (1, [0, 0, 0, 0]), (1, [1, 0, 1, 0])]
    losses = []
    for task_id, labels in stream:
        task = tasks[task_id]
        if task.name not in m.tasks:
            m.before_task(task)
        x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.tensor(labels)
        m.buffer = ReservoirBuffer(8)  # empty: the loss is the incoming batch's term only
        ours = m.training_loss(x, y, task)
        with torch.no_grad():
            if task_id == 0:  # Mammoth does not mask the first task: CE over its classes
                ref.loss(m(x, "a"), y, 0)
                expected = F.cross_entropy(m(x, "a"), y)
            else:  # global logits [head a | head b] and global labels (task b = classes 2-4)
                logits = torch.cat([m(x, "a"), m(x, "b")], dim=1)
                expected = ref.loss(logits, y + 2, 1)
        losses.append(float(ours))
        assert float(ours) == pytest.approx(float(expected), rel=TOL), (task_id, labels)
    assert len(set(round(v, 6) for v in losses)) == len(losses)


# ---- DER++: Mammoth models/derpp.py ------------------------------------------------------
def test_derpp_alpha_and_beta_terms_match_mammoth(vit, tasks, fit_one_batch):
    alpha, beta = 0.3, 0.7
    m = make_method("derpp", vit, {"memory_size": 24, "replay_batch_size": 8, "alpha": alpha, "beta": beta})
    m.before_task(tasks[0])
    m.train()
    batches = list(tasks[0].train)
    def augment(x):
        return x.flip(-1)  # the training view; the memory keeps the raw one
    with torch.no_grad():
        m.training_loss(augment(batches[0][0]), batches[0][1], tasks[0], raw=batches[0][0])
    # Mammoth stores not_aug_inputs with the logits of the augmented inputs (outputs.data)
    held = m.buffer.tensors()
    assert torch.equal(held["images"], batches[0][0][:16])
    with torch.no_grad():
        assert torch.allclose(held["logits"], m(augment(batches[0][0]), "a"), atol=1e-6)
    fit_one_batch(m, TaskSpec("a", 2, [batches[1]], None, []), lr=0.3, start=False)
    drawn = []
    sample = m.buffer.sample
    m.buffer.sample = lambda n: drawn.append(sample(n)) or drawn[-1]
    x, y = batches[2]
    ours = m.training_loss(x, y, tasks[0], raw=x)
    assert len(drawn) == 2  # two independent draws
    b1, b2 = drawn
    expected = (F.cross_entropy(m(x, "a"), y)
                + alpha * F.mse_loss(m(b1["images"], "a"), b1["logits"])
                + beta * F.cross_entropy(m(b2["images"], "a"), b2["labels"]))
    assert float(ours) == pytest.approx(float(expected), rel=TOL)
    assert float(F.mse_loss(m(b1["images"], "a"), b1["logits"])) > 1e-4


# ---- the memories: Mammoth utils/buffer.py, GDumb src/dataloader.py ------------------------
def mammoth_reservoir(capacity, labels, draws):
    """ReservoirSampling: sample n (from 0) goes to slot n while n < M, else to r = draw in
    [0, n] if r < M. ``draws`` yields the r of each sample past the first M."""
    slots = [None] * capacity
    for n, label in enumerate(labels):
        if n < capacity:
            slots[n] = (n, label)
        else:
            r = next(draws)(n + 1)
            if r < capacity:
                slots[r] = (n, label)
    return slots


@pytest.mark.parametrize("through", ["buffer", "er_ace"])
def test_reservoir_memory_matches_mammoth(vit, tasks, through):
    """ER-ACE's (and DER++'s) memory against utils/buffer.py's reservoir, the same draws."""
    labels = [i % 2 for i in range(60)]
    if through == "buffer":
        ours = ReservoirBuffer(10, torch.Generator().manual_seed(7))
        def offer(images, y):
            return ours.add(images, y, 0)
    else:  # the method's own memory, filled by its training loss on task a (no replay draws)
        m = make_method("er_ace", vit, {"memory_size": 10})
        m.before_task(tasks[0])
        ours = m.buffer
        ours.generator = torch.Generator().manual_seed(7)
        def offer(images, y):
            with torch.no_grad():
                m.training_loss(torch.randn(len(y), 3, 32, 32), y, tasks[0], raw=images)
    for start in range(0, 60, 12):  # five batches of 12, the stream's order kept
        idx = torch.arange(start, start + 12)
        offer(idx.float().view(-1, 1, 1, 1).expand(-1, 3, 32, 32), torch.tensor(labels[start:start + 12]))
    gen = torch.Generator().manual_seed(7)
    draws = iter(lambda: (lambda high: int(torch.randint(high, (1,), generator=gen))), None)
    ref = mammoth_reservoir(10, labels, draws)
    held = ours.tensors()
    assert [int(v) for v in held["images"][:, 0, 0, 0]] == [n for n, _ in ref]
    assert held["labels"].tolist() == [label for _, label in ref]
    assert len(ours) == 10


def greedy_class_balanced_counts(capacity, stream):
    """GDumb, Algorithm 1 (Prabhu et al., 2020): a sample of class c is stored when c holds
    fewer than capacity / |classes seen|; a full memory first drops one sample of its largest
    class. Only counts are tracked (they do not depend on which sample is dropped); ties of
    the largest class go to the class seen first."""
    counts, order = {}, []
    trajectory = []
    for cls in stream:
        if cls not in counts:
            counts[cls] = 0
            order.append(cls)
        if counts[cls] < capacity / len(order):
            if sum(counts.values()) >= capacity:
                largest = max(order, key=lambda c: (counts[c], -order.index(c)))
                counts[largest] -= 1
            counts[cls] += 1
        trajectory.append({c: n for c, n in counts.items() if n > 0})
    return trajectory


def test_gdumb_class_balanced_sampler_matches_the_reference():
    # three tasks with 2, 3 and 5 classes, imbalanced within tasks; M = 20
    stream = ([(0, i % 2) for i in range(30)] + [(1, min(i % 4, 2)) for i in range(40)]
              + [(2, i % 5) for i in range(25)])
    ours = ClassBalancedBuffer(20, torch.Generator().manual_seed(0))
    got = []
    for task_id, label in stream:
        ours.add(torch.zeros(1, 3, 2, 2), torch.tensor([label]), task_id)
        got.append(ours.class_counts())
    assert got == greedy_class_balanced_counts(20, stream)  # exact, after every sample
    # GDumb's released code (dataloader.py): memory_size // classes per class, all known
    # upfront; the online sampler ends at the same counts when M divides evenly
    assert got[-1] == {c: 20 // 10 for c in set(stream)}


def test_gdumb_memory_holds_the_raw_view(vit, tasks):
    m = make_method("gdumb", vit, {"memory_size": 10})
    m.before_task(tasks[0])
    x, y = next(iter(tasks[0].train))
    m.fill_memory([(x.flip(-1), y, x)])  # (augmented, labels, raw)
    held = m.buffer.tensors()
    assert len(m.buffer) == 10
    assert all(any(torch.equal(h, r) for r in x) for h in held["images"])
