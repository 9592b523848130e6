"""InfLoRA: interference-free low-rank adaptation (Liang & Li, CVPR 2024), task-incremental.

Per task, every target Linear gets a low-rank branch ``W + B A`` (here A = ``down``, the
dimensionality-reduction matrix the InfLoRA paper calls B, and B = ``up``). A is designed
before training and stays fixed: its rows are the top-r left singular vectors of ``P C``, with
C the covariance of the layer's inputs on the current task and P the projector onto the
orthogonal complement of a feature memory M that spans the earlier tasks' inputs, scaled to
norm ``1/sqrt(3)`` (as the authors' code, liangyanshuo/InfLoRA ``methods/inflora.py``). Only B
(zero-initialised) and the task head are trained, so the update B A moves the weight only along
directions orthogonal to the old inputs. After the task the branch is merged into W, and M grows
by GPM's rule on the singular values of C: the top left singular vectors of ``P C`` are added
until M holds a ``threshold`` fraction of ``sum sigma_i(C)^2``; the threshold moves from
``threshold`` towards ``threshold_end`` over the stream as the authors' schedule does.
``energy="linear"`` counts the threshold on the inputs' energy ``tr C`` instead (GPM's rule on
the representation matrix); the offline configs use it (README, deliberate differences).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from recast.baselines.common import TaskSpec
from recast.baselines.method import ContinualMethod, move
from recast.targets import match_modules
from recast.validation import AtLeast1, Fraction, OpenFraction, validate_fields


@dataclass(frozen=True)
class InfLoRAConfig:
    """InfLoRA settings.

    Attributes:
        targets: Linear modules that get a branch, as in ``recast.targets.match_modules``
            (exact name or suffix); default the fused ``attn.qkv`` of every ViT block.
        rows: ``"kv"``: the branch updates only the key and value rows of a fused qkv (as
            InfLoRA does); ``"all"``: every output row.
        rank: r of each branch; per target r * rows parameters are trained per task. When the
            feature memory leaves fewer than r free input directions, the branch gets that many
            (none once the memory spans the whole input space; the task then trains its head only).
        threshold: GPM's epsilon after the first task: the fraction of ``sum sigma_i(C)^2``
            (C the task's input covariance) the memory must capture (the authors' ``lamb``).
        threshold_end: the threshold after task t (0-based) of a stream of T tasks is
            ``threshold + (threshold_end - threshold) * t / T`` (the authors' ``lame``); T is the
            method's ``num_tasks`` (set by ``run_sequential``), the threshold stays constant
            when it is unknown.
        feature_batches: training batches used for the input covariances (None: all).
        energy: what the threshold is a fraction of. ``"squared"`` (the authors' code): of
            ``sum sigma_i(C)^2``, the squared singular values of the covariance, which weights
            the top directions quadratically, so the memory holds much less than ``threshold``
            of the inputs' energy when the spectrum is flat. ``"linear"`` (GPM's rule on the
            representation matrix X, whose squared singular values are C's eigenvalues): of
            ``tr C = sum sigma_i(C)``, the inputs' energy itself.
    """

    targets: tuple[str, ...] = ("attn.qkv",)
    rows: Literal["kv", "all"] = "kv"
    rank: AtLeast1 = 10
    threshold: OpenFraction = 0.95
    threshold_end: Fraction = 1.0
    feature_batches: AtLeast1 | None = None
    energy: Literal["squared", "linear"] = "squared"

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if not self.targets:
            raise ValueError("InfLoRAConfig.targets is empty: give at least one Linear module pattern")
        validate_fields(self, "InfLoRAConfig.")
        if not self.threshold <= self.threshold_end:
            raise ValueError(f"InfLoRAConfig.threshold_end must be in [threshold, 1], got {self.threshold_end!r}")


DOWN_NORM = 1 / math.sqrt(3)  # norm of A's rows in the authors' code (``U[:, :r].T / math.sqrt(3)``)


class InfLoRALinear(nn.Module):
    """``base(x)`` plus ``B A x`` on the rows ``rows``; A (``down``) is a fixed buffer.

    Args:
        base: the frozen nn.Linear.
        down: A, (r, in) with orthogonal rows (of norm ``DOWN_NORM`` in InfLoRA).
        rows: output rows the branch writes (1-D index tensor).
    """

    def __init__(self, base: nn.Linear, down: Tensor, rows: Tensor) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        # contiguous: a transposed A (as designed) and one loaded from a checkpoint run the same kernels
        self.register_buffer("down", down.to(device=w.device, dtype=w.dtype).contiguous())  # (r, in)
        self.register_buffer("rows", rows.to(w.device))  # (R,)
        self.up = nn.Parameter(torch.zeros(rows.numel(), down.shape[0], device=w.device, dtype=w.dtype))  # (R, r)

    def delta_weight(self) -> Tensor:
        """B A placed on ``rows`` of an (out, in) zero matrix."""
        full = self.base.weight.new_zeros(self.base.out_features, self.base.in_features)
        return full.index_add(0, self.rows, self.up @ self.down)  # (R, r) @ (r, in) -> (R, in)

    def forward(self, x: Tensor) -> Tensor:
        branch = nn.functional.linear(nn.functional.linear(x, self.down), self.up)  # (..., in) -> (..., r) -> (..., R)
        return self.base(x).index_add(-1, self.rows, branch)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base Linear with ``W + B A`` written into its weight (in place)."""
        self.base.weight.add_(self.delta_weight())
        return self.base


class InfLoRA(ContinualMethod):
    """Frozen backbone, one InfLoRA branch per target and task, merged after the task.

    Trainable per task: every branch's B (``rank * rows`` per target) and the task head. The
    shared state is the merged backbone; the feature memories are training state.
    """

    name = "inflora"

    def __init__(self, backbone: nn.Module, cfg: InfLoRAConfig | None = None) -> None:
        super().__init__(backbone)
        self.cfg = cfg or InfLoRAConfig()
        backbone.requires_grad_(False)
        self.target_names = match_modules(backbone, self.cfg.targets, types=(nn.Linear,))
        self.memory: dict[str, Tensor] = {}  # name -> (in, k) orthonormal basis of earlier tasks' inputs
        self.branches: dict[str, InfLoRALinear] = {}
        self.ranks: dict[str, int] = {}  # the current task's rank per target (below cfg.rank once the memory fills)

    # ---- features -----------------------------------------------------------------------
    @torch.no_grad()
    def input_covariances(self, train: Iterable[Any]) -> dict[str, Tensor]:
        """Per target, ``sum x x^T`` over every token of the training inputs, (in, in) float64."""
        modules = dict(self.net.backbone.named_modules())
        cov: dict[str, Tensor] = {}

        def hook(name: str):
            def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()  # (..., in) -> (tokens, in)
                cov[name] = cov.get(name, 0) + x.T @ x
            return record

        handles = [modules[n].register_forward_hook(hook(n)) for n in self.target_names]
        was_training = self.training
        self.eval()
        try:
            for index, batch in enumerate(train):
                if self.cfg.feature_batches is not None and index >= self.cfg.feature_batches:
                    break
                self.net.features(move(batch, self.device)[0])
        finally:
            for h in handles:
                h.remove()
            self.train(was_training)
        if len(cov) != len(self.target_names):
            raise ValueError("InfLoRA: no training batches to compute input features from")
        return cov

    def _complement(self, name: str, dim: int, device: torch.device) -> Tensor:
        """Orthonormal basis (in, in - k) of the complement of the memory of ``name``."""
        memory = self.memory.get(name)
        if memory is None or memory.shape[1] == 0:
            return torch.eye(dim, dtype=torch.float64, device=device)
        proj = torch.eye(dim, dtype=torch.float64, device=device) - memory @ memory.T  # (in, in)
        evals, evecs = torch.linalg.eigh(proj)  # eigenvalues 0 (memory) and 1 (complement)
        return evecs[:, evals > 0.5]

    # ---- hooks --------------------------------------------------------------------------
    def before_task(self, task: TaskSpec) -> None:
        """Design every target's A from the task's inputs outside the memory; wrap the target."""
        super().before_task(task)
        covariances = self.input_covariances(task.train)
        for name in self.target_names:
            base = self.net.backbone.get_submodule(name)
            cov = covariances[name]
            free = self._complement(name, cov.shape[0], cov.device)  # (in, f)
            rank = min(self.cfg.rank, free.shape[1])
            self.ranks[name] = rank
            if rank == 0:  # the memory spans every input direction: no interference-free branch
                continue
            down = DOWN_NORM * self._top_directions(free, cov)[:, :rank].T  # (r, in), orthogonal to the memory
            wrapper = InfLoRALinear(base, down, self._rows(name, base))
            self.branches[name] = wrapper
            _set_submodule(self.net.backbone, name, wrapper)

    def rebuild_task(self, task: TaskSpec) -> None:
        """A finished task left its head and merged branches (plain Linears, loaded from the
        state_dict): no branch design from its data."""
        ContinualMethod.before_task(self, task)

    def rebuild_current_task(self, task: TaskSpec, module: dict[str, Tensor], extra: dict[str, Any]) -> None:
        """The task in progress at a mid-task checkpoint: its head and its branches, each A
        (``down``) and its rows taken from the checkpoint (no branch design from the data again);
        B (``up``) is loaded with the rest of the state_dict."""
        ContinualMethod.before_task(self, task)
        for name in extra["branches"]:
            base = self.net.backbone.get_submodule(name)
            prefix = f"net.backbone.{name}."
            wrapper = InfLoRALinear(base, module[prefix + "down"], module[prefix + "rows"])
            self.branches[name] = wrapper
            _set_submodule(self.net.backbone, name, wrapper)

    def extra_checkpoint_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        # mid-task: the unmerged branches (their A, rows and B are in the state_dict)
        return ({f"memory.{k}": v for k, v in self.memory.items()},
                {"ranks": dict(self.ranks), "branches": list(self.branches)})

    def load_extra_checkpoint_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        device = self.device
        self.memory = {k[len("memory."):]: v.to(device) for k, v in tensors.items() if k.startswith("memory.")}
        self.ranks = {k: int(v) for k, v in meta["ranks"].items()}

    def _rows(self, name: str, base: nn.Linear) -> Tensor:
        out = base.out_features
        if self.cfg.rows == "all":
            return torch.arange(out)
        if out % 3:
            raise ValueError(f"InfLoRA rows='kv' needs a fused qkv Linear (out_features divisible by 3); "
                             f"'{name}' has out_features={out}")
        return torch.arange(out // 3, out)  # the k and v row blocks

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [*(b.up for b in self.branches.values()), *self.net.head(self.current_task).parameters()]

    def after_task(self, task: TaskSpec, train: Iterable[Any]) -> None:
        """Merge every branch into its Linear, then add the task's input directions to the memory."""
        for name, wrapper in self.branches.items():
            _set_submodule(self.net.backbone, name, wrapper.merged())
        self.branches = {}
        covariances = self.input_covariances(train)
        for name, cov in covariances.items():
            self.memory[name] = self._grown_memory(name, cov)

    @staticmethod
    def _top_directions(free: Tensor, cov: Tensor) -> Tensor:
        """Left singular vectors of ``P C`` (P the projector ``free free^T``), in (in, f) columns
        by decreasing singular value. Taken as ``free`` times those of ``free^T C`` so that they
        lie in the free space even where the singular values vanish."""
        u, _, _ = torch.linalg.svd(free.T @ cov, full_matrices=False)  # (f, in) -> u (f, f)
        return free @ u

    def threshold_after(self, task_index: int) -> float:
        """GPM threshold after the task ``task_index`` (0-based) of the stream."""
        start, end = self.cfg.threshold, self.cfg.threshold_end
        if self.num_tasks is None:
            return start
        return start + (end - start) * task_index / self.num_tasks

    def _grown_memory(self, name: str, cov: Tensor) -> Tensor:
        """GPM's update on the singular values of the covariance C (as the authors' code).

        First task: the top ``r`` left singular vectors of C with ``r`` the number of prefix
        sums of ``sigma_i^2 / sum sigma^2`` below the threshold (at least 1). Later tasks: the
        top left singular vectors of ``P C`` are added while the energy held,
        ``(||C||^2 - ||P C||^2 + sum of the added sigma_i(P C)^2) / ||C||^2``, is below it.
        """
        threshold = self.threshold_after(len(self.tasks) - 1)
        memory = self.memory.get(name, cov.new_zeros(cov.shape[0], 0))
        free = self._complement(name, cov.shape[0], cov.device)  # (in, f)
        if free.shape[1] == 0:
            return memory
        if self.cfg.energy == "squared":
            values = torch.linalg.svdvals(free.T @ cov) ** 2  # sigma_i(P C)^2, descending
            total = float(torch.linalg.matrix_norm(cov) ** 2)  # ||C||_F^2 = sum sigma_i(C)^2
        else:  # the inputs' energy outside the memory: eigenvalues of free^T C free, summing to tr(P C)
            values = torch.linalg.eigvalsh(free.T @ cov @ free).flip(0).clamp_min(0)
            total = float(torch.trace(cov))
        if memory.shape[1] == 0:
            k = max(int((torch.cumsum(values / total, 0) < threshold).sum()), 1)
        else:
            held, k = (total - float(values.sum())) / total, 0
            for value in (values / total).tolist():
                if held >= threshold:
                    break
                held, k = held + value, k + 1
        k = min(k, free.shape[1])
        if k == 0:
            return memory
        if self.cfg.energy == "squared":
            added = self._top_directions(free, cov)[:, :k]
        else:  # the principal directions of the inputs outside the memory, whose energies were counted
            added = free @ torch.linalg.eigh(free.T @ cov @ free)[1].flip(1)[:, :k]
        return torch.cat([memory, added], dim=1)  # (in, k_old + k)

    def training_state(self) -> dict[str, Tensor]:
        return {f"memory.{n}": m for n, m in self.memory.items()}


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
