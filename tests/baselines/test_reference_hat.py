"""HAT against the authors' code, re-implemented here from its math.

Reference: joansj/hat at commit 6fd0b9d98e089bec1f9da6cc20550916ce196829,
``src/approaches/hat.py`` (``Appr.train_epoch``: the s annealing, the masked gradients
``mask_back``, the embedding-gradient compensation, ``clip_grad_norm(..., clipgrad=10000)``, plain
SGD, the embedding clamp; ``Appr.criterion``: the mask regulariser conditioned on ``mask_pre``;
``Appr.train``: ``mask_pre = max(mask_pre, mask(t, s=smax))``) and ``src/networks/alexnet_hat.py``
(``mask``: ``sigmoid(s * e)``; ``get_view_for``: ``1 - min(post, pre)`` of the units a weight
connects, the gated side alone where the other side is the network input). The reference's
networks gate every layer; on the ViT the gated units are the MLP hidden units, the residual
stream is ungated and counts as used, so parameters outside every gate do not move after the
first task. The step below follows that code on the same tiny ViT, batches and embeddings as
ours and must give the same parameters to 1e-5.
"""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from recast.baselines import HATConfig, TaskSpec, TrainConfig, make_method

SMAX, LAMB, LR, CLIPGRAD, THRES_COSH, THRES_EMB = 400.0, 0.75, 0.05, 10000.0, 50.0, 6.0


def ref_s(i: int, n: int, smax: float = SMAX) -> float:
    """``s=(self.smax-1/self.smax)*i/len(r)+1/self.smax`` with i the batch's first sample."""
    return (smax - 1 / smax) * i / n + 1 / smax


def ref_features(vit, x, gates):
    """timm ViT forward with every block's MLP hidden units multiplied by ``gates[block]``."""
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    for blk, g in zip(vit.blocks, gates):
        h = h + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(h))))
        u = blk.mlp.act(blk.mlp.fc1(blk.norm2(h))) * g.view(1, 1, -1)
        h = h + blk.drop_path2(blk.ls2(blk.mlp.drop2(blk.mlp.fc2(blk.mlp.norm(blk.mlp.drop1(u))))))
    return vit.forward_head(vit.norm(h), pre_logits=True)


def ref_criterion(logits, y, masks, mask_pre):
    reg, count = 0, 0
    for m, mp in zip(masks, mask_pre):
        aux = 1 - mp
        reg = reg + (m * aux).sum()
        count = count + aux.sum()
    return F.cross_entropy(logits, y) + LAMB * reg / count


def ref_train_epoch(vit, head, emb, mask_pre, batches, n):
    """One epoch of ``Appr.train_epoch`` for a task t > 0 (``mask_pre`` from earlier tasks)."""
    mask_back = {}
    for blk, mp in zip(vit.blocks, mask_pre):
        mask_back[blk.mlp.fc1.weight] = 1 - mp.view(-1, 1).expand_as(blk.mlp.fc1.weight)
        mask_back[blk.mlp.fc1.bias] = 1 - mp
        mask_back[blk.mlp.fc2.weight] = 1 - mp.view(1, -1).expand_as(blk.mlp.fc2.weight)
    params = [*mask_back, *emb, *head.parameters()]
    opt = torch.optim.SGD(params, lr=LR)
    i = 0
    for x, y in batches:
        s = ref_s(i, n)
        masks = [torch.sigmoid(s * e) for e in emb]
        loss = ref_criterion(head(ref_features(vit, x, masks)), y, masks, mask_pre)
        opt.zero_grad()
        loss.backward()
        for p, mb in mask_back.items():
            p.grad.data *= mb
        for p in emb:
            num = torch.cosh(torch.clamp(s * p.data, -THRES_COSH, THRES_COSH)) + 1
            den = torch.cosh(p.data) + 1
            p.grad.data *= SMAX / s * num / den
        torch.nn.utils.clip_grad_norm_(params, CLIPGRAD)
        opt.step()
        for p in emb:
            p.data = torch.clamp(p.data, -THRES_EMB, THRES_EMB)
        i += x.shape[0]


@pytest.mark.parametrize("batches", [4, 10])
def test_s_annealing_matches_the_reference(vit, tasks, batches):
    m = make_method("hat", vit, HATConfig(s_max=SMAX))
    m.before_task(tasks[0])
    m.num_batches = batches
    for b in range(batches):
        m.batch_index = b
        assert m.current_scale() == pytest.approx(ref_s(16 * b, 16 * batches), rel=1e-12)
    if batches == 10:
        assert m.current_scale() == pytest.approx(360.0, abs=0.01)  # the reference's last batch


def test_second_task_step_matches_the_reference(vit, tasks):
    m = make_method("hat", vit, HATConfig(s_max=SMAX, reg_lambda=LAMB))
    run = TrainConfig(epochs=1, lr=LR, optimizer="sgd", momentum=0.0, weight_decay=0.0, grad_clip=1.0)
    first = TaskSpec("a", 2, list(tasks[0].train), None, [])
    m.before_task(first)
    m.fit_task(first, run)
    m.after_task(first, first.train)
    # mask conditioning: a^{<2} is the first task's gates at s_max
    mask_pre = [torch.sigmoid(SMAX * e.detach()) for e in m.embeddings["a"]]
    for ours, ref in zip(m.cumulative, mask_pre):
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    second = TaskSpec("b", 3, list(tasks[1].train), None, [])
    m.before_task(second)

    ref_vit = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    ref_vit.load_state_dict(vit.state_dict())
    ref_vit.train()
    ref_head = copy.deepcopy(m.net.head("b"))
    ref_emb = [e.detach().clone().requires_grad_(True) for e in m.embeddings["b"]]
    x0 = second.train[0][0]
    with torch.no_grad():  # the gated forward is the reference's at the same s
        ours_logits, ours_gates = m.gated_forward(x0, "b", 2.5)
        ref_gates = [torch.sigmoid(2.5 * e) for e in ref_emb]
        torch.testing.assert_close(ours_logits, ref_head(ref_features(ref_vit, x0, ref_gates)), atol=1e-5, rtol=0)
    ungated = {n: p.detach().clone() for n, p in vit.named_parameters() if ".mlp." not in n}
    fc1_before = vit.blocks[0].mlp.fc1.weight.detach().clone()

    m.fit_task(second, run)  # the run's clip 1.0 is replaced by HAT's 10000, as the reference's
    ref_train_epoch(ref_vit, ref_head, ref_emb, mask_pre, second.train, n=16 * len(second.train))

    ref_params = dict(ref_vit.named_parameters())
    for name, p in vit.named_parameters():
        if ".mlp." in name:
            torch.testing.assert_close(p.detach(), ref_params[name].detach(), atol=1e-5, rtol=0, msg=name)
        else:
            assert torch.equal(p.detach(), ungated[name]), name
    for ours, ref in zip(m.embeddings["b"], ref_emb):
        torch.testing.assert_close(ours.detach(), ref.detach(), atol=1e-5, rtol=0)
    for ours, ref in zip(m.net.head("b").parameters(), ref_head.parameters()):
        torch.testing.assert_close(ours.detach(), ref.detach(), atol=1e-5, rtol=0)
    assert float((vit.blocks[0].mlp.fc1.weight - fc1_before).abs().max()) > 1e-3  # the step did train
