"""L2P: learning to prompt (Wang et al., 2022) on a frozen timm VisionTransformer.

Checked against Mammoth (aimagelab/mammoth at e75a491, ``models/l2p_utils/prompt.py``) and the
authors' code (google-research/l2p at dd8836e, ``models/prompt.py``, ``train_continual.py``); see
tests/baselines/test_reference_l2p.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from recast.baselines.common import TaskSpec
from recast.baselines.method import ContinualMethod
from recast.validation import AtLeast1, NonNegative, Positive, validate_fields


@dataclass(frozen=True)
class L2PConfig:
    """L2P settings (paper defaults).

    Attributes:
        pool_size: prompts in the shared pool (P).
        prompt_length: tokens per prompt (L_p).
        top_k: prompts selected per image (N).
        key_loss_weight: weight lambda of the surrogate key-matching loss.
        init_range: prompts and keys start uniform in ``[-init_range, init_range]``.
        diversify: L2P's diversified selection as the authors' code implements it (their
            ``use_prompt_mask``, "equivalent to diversifying penalty", on in their 5-datasets
            config): while training task t (0-based), the images use prompts
            ``t*top_k .. (t+1)*top_k - 1`` instead of the matched ones, as long as those exist in
            the pool (key matching after that); the pull constraint acts on those prompts' keys.
            Inference always matches keys.
        batchwise: the authors' batch-wise vote (on in their configs, off by default in
            Mammoth): every image of a batch gets the ``top_k`` prompts chosen most often by the
            batch's images, in training and at test time.
    """

    pool_size: AtLeast1 = 10
    prompt_length: AtLeast1 = 5
    top_k: AtLeast1 = 5
    key_loss_weight: NonNegative = 0.1
    init_range: Positive = 1.0
    diversify: bool = False
    batchwise: bool = False

    def __post_init__(self) -> None:
        validate_fields(self, "L2PConfig.")
        if self.top_k > self.pool_size:
            raise ValueError(f"L2PConfig.top_k={self.top_k} exceeds pool_size={self.pool_size}")


class L2P(ContinualMethod):
    """Frozen ViT, a shared pool of prompts with keys, one head per task.

    The query is the frozen model's pooled pre-logits feature ([CLS] after the final norm for
    token pooling). The ``top_k`` prompts whose keys have the highest cosine similarity to it
    are prepended to the token sequence after ``patch_embed`` and ``_pos_embed``; the head reads
    the mean of the prompt tokens after ``blocks`` and ``norm``. Loss: CE + lambda * mean over
    the batch of ``sum_selected (1 - cos(query, key))`` (the references' ``- lambda *
    reduce_sim`` plus the constant ``lambda * top_k``). Trainable per task: prompts
    ``P * L_p * D`` + keys ``P * D`` + the task head. The pool is shared by all tasks, so it
    is where forgetting happens. ``cfg.diversify``: per-task prompt masks while training;
    ``cfg.batchwise``: the batch-wise vote.
    """

    name = "l2p"

    def __init__(self, backbone: nn.Module, cfg: L2PConfig | None = None) -> None:
        if not isinstance(backbone, VisionTransformer):
            raise TypeError(f"L2P needs a timm VisionTransformer backbone, got {type(backbone).__name__}")
        super().__init__(backbone)
        self.cfg = cfg or L2PConfig()
        backbone.requires_grad_(False)
        dim, r = backbone.embed_dim, self.cfg.init_range
        device = next(backbone.parameters()).device
        self.prompts = nn.Parameter(torch.empty(
            self.cfg.pool_size, self.cfg.prompt_length, dim, device=device).uniform_(-r, r))
        self.keys = nn.Parameter(torch.empty(self.cfg.pool_size, dim, device=device).uniform_(-r, r))

    def train(self, mode: bool = True) -> L2P:
        super().train(mode)
        self.net.backbone.eval()
        return self

    def select(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Indices ``(B, top_k)`` of the selected prompts and their key-matching loss."""
        with torch.no_grad():
            query = F.normalize(self.net.backbone(x), dim=1)  # (B, D)
        sim = query @ F.normalize(self.keys, dim=1).T  # (B, P)
        idx = sim.detach().topk(self.cfg.top_k, dim=1).indices  # (B, k)
        if self.cfg.batchwise:
            idx = batch_vote(idx, self.cfg.pool_size)
        mask = self.prompt_mask() if self.training else None
        if mask is not None:
            idx = mask.to(idx.device).expand(x.shape[0], -1)
        key_loss = (1 - sim.gather(1, idx)).sum(dim=1).mean()
        return idx, key_loss

    def prompt_mask(self) -> Tensor | None:
        """The current task's prompts under ``cfg.diversify`` (None: match keys)."""
        if not self.cfg.diversify:
            return None
        k = self.cfg.top_k
        start = (len(self.tasks) - 1) * k
        if start + k > self.cfg.pool_size:
            return None
        return torch.arange(start, start + k)

    def prompted_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean prompt-token feature ``(B, D)`` and the key-matching loss."""
        vit = self.net.backbone
        idx, key_loss = self.select(x)
        batch, k, length = x.shape[0], self.cfg.top_k, self.cfg.prompt_length
        prompts = self.prompts[idx].reshape(batch, k * length, -1)  # (B, k, Lp, D) -> (B, k*Lp, D)
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # (B, T, D)
        tokens = vit.norm(vit.blocks(torch.cat([prompts, tokens], dim=1)))  # (B, k*Lp + T, D)
        return tokens[:, :k * length].mean(dim=1), key_loss

    def forward(self, x: Tensor, task: str) -> Tensor:
        return self.net.head(task)(self.prompted_features(x)[0])

    def training_loss(self, x: Tensor, y: Tensor, task: TaskSpec) -> Tensor:
        feats, key_loss = self.prompted_features(x)
        ce = F.cross_entropy(self.net.head(task.name)(feats), y)
        return ce + self.cfg.key_loss_weight * key_loss

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.prompts, self.keys, *self.net.head(self.current_task).parameters()]

    def shared_state(self) -> dict[str, Tensor]:
        return {**super().shared_state(), "prompts": self.prompts.detach(), "keys": self.keys.detach()}


def batch_vote(idx: Tensor, pool_size: int) -> Tensor:
    """The ``k`` prompt ids chosen most often in ``idx`` (B, k), for every row (the references'
    ``batchwise_prompt``: ``unique`` with counts, padded to the pool size, top-k of the counts)."""
    k = idx.shape[1]
    ids, counts = torch.unique(idx, sorted=True, return_counts=True)
    if ids.numel() < pool_size:
        pad = pool_size - ids.numel()
        ids = torch.cat([ids, ids.new_full((pad,), int(idx.min()))])
        counts = torch.cat([counts, counts.new_zeros(pad)])
    return ids[counts.topk(k).indices].expand(idx.shape[0], -1)
