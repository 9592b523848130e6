"""RecastModel: a network whose targeted layers read shared template banks, with per-task
coefficient sets and heads (``apply``, ``add_task``, ``set_task``, ``materialize``).

Isolation: whatever training a task changes belongs to that task. With ``set_task(task)``
only its coefficients and head are trainable; biases (``train_biases``) and norm parameters
(``train_norms``) that a task trains become its own copies; BatchNorm running statistics are
frozen by the model or kept per task (``RecastConfig.bn_stats``). The templates are shared
and frozen; ``recast.mimic`` refuses to rewrite them once other tasks exist.

Mixed-task batches: ``rc(x, tasks=[...])`` runs each row with its own task (``recast.mixed``).
"""

from __future__ import annotations

import contextlib
import copy
import re
import weakref
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from recast.adapters.base import AdapterWrapper
from recast.config import RecastConfig
from recast.layers import (
    RECAST_LAYERS,
    TemplateBank,
    check_templatable,
    freeze_batch_norm_stats,
    make_recast_layer,
    random_unit_coefficients,
    route_norms,
    unfreeze_batch_norm_stats,
    unroute_norms,
)
from recast.mixed import (
    STRATEGIES,
    LayerShape,
    MixedBatchAdapterError,
    MixedBatchError,
    Routing,
    UnknownTaskError,
    pick_model_strategy,
    route_of,
    routed,
    sort_order,
)
from recast.packed import PackedTaskError, PackedTasks
from recast.targets import LayerKeyFn, Plan, build_plan, template_fan_mode
from recast.task_state import KINDS, PREFIX, Kind, Live, TaskState

_TASK_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
_BATCH_NORM = nn.modules.batchnorm._BatchNorm
# (weak reference to the model, routing) of the last mixed forward in this thread / task
_LAST_ROUTING: ContextVar[tuple[weakref.ref, Routing] | None] = ContextVar("recast_last_routing", default=None)


def _gather_rows(outs: list, routing: Routing):
    """Per-task outputs of the ``"loop"`` strategy (pytrees alike, in ``routing.tasks`` order)
    as one output in row order; tensors that differ in their last dimension only (heads of
    different widths) are padded with -inf."""
    flat = [torch.utils._pytree.tree_flatten(o) for o in outs]
    spec = flat[0][1]
    leaves = []
    for i in range(len(flat[0][0])):
        group = [f[0][i] if f[1] == spec else None for f in flat]
        if not all(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == len(r) for t, r in zip(group, routing.rows)):
            raise MixedBatchError("mixed_strategy='loop' needs outputs with one row per input row (a tensor, or "
                                  "tensors in one structure); this model's are not: use another strategy")
        width = max(t.shape[-1] for t in group)
        if any(t.shape[1:-1] != group[0].shape[1:-1] or (t.shape[-1] != width and not t.is_floating_point())
               for t in group):
            raise MixedBatchError("mixed_strategy='loop': the tasks' outputs differ in shape beyond the last "
                                  "dimension: use another strategy")
        group = [t if t.shape[-1] == width else
                 torch.cat([t, t.new_full((*t.shape[:-1], width - t.shape[-1]), float("-inf"))], dim=-1)
                 for t in group]
        leaves.append(routing.regroup(group))
    return torch.utils._pytree.tree_unflatten(leaves, spec)


class HeadDetectionError(ValueError):
    """The classifier cannot be told apart automatically; ``candidates`` are the Linear layers
    found in the model's head ``head``."""

    def __init__(self, head: str, cls: str, candidates: Sequence[str]):
        self.head, self.cls, self.candidates = head, cls, list(candidates)
        super().__init__(f"the model's head '{head}' ({cls}) holds {len(self.candidates)} Linear layers "
                         f"{self.candidates[:6]}, not one classifier: pass head_name= (the module to make "
                         "per-task) to recast.apply, or head_name='' for none")

    def __reduce__(self):
        return type(self), (self.head, self.cls, self.candidates)


class TaskHeads(nn.Module):
    """One classifier per task; forwards through the active task's head.

    In a mixed-task forward each group of rows goes through its task's head (the base task's
    for a task without one); outputs narrower than the widest head of the batch are padded
    with -inf on the last dimension, so argmax, softmax and cross_entropy read them as they
    read the task's own logits.
    """

    def __init__(self, base_task: str | None = None) -> None:
        super().__init__()
        self.heads = nn.ModuleDict()
        self.task: str | None = None
        self.base_task = base_task
        self._packed: list[PackedTasks | None] = [None]  # the model's packed tasks, an unregistered reference

    def head_of(self, task: str) -> nn.Module:
        """``task``'s head module (the base task's for a task without one; a new nn.Linear
        holding a copy of a packed task's head)."""
        packed = self._packed[0]
        if task not in self.heads and packed is not None and task in packed:
            own = packed.head(task)
            if own is not None:
                weight, bias = own
                head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight)
                with torch.no_grad():
                    head.weight.copy_(weight)
                    if bias is not None:
                        head.bias.copy_(bias)
                return head
        return self.heads[task] if task in self.heads else self.heads[self.base_task]

    def width(self, task: str) -> int | None:
        """Output width of ``task``'s head (the base head's for a task without one)."""
        packed = self._packed[0]
        if task not in self.heads and packed is not None and task in packed:
            own = packed.head(task)
            if own is not None:
                return int(own[0].shape[0])
        return getattr(self.heads[task] if task in self.heads else self.heads[self.base_task], "out_features", None)

    def run_head(self, task: str, x: torch.Tensor) -> torch.Tensor:
        """``task``'s head on ``x``: its module, or for a packed task ``F.linear`` on its rows of
        the packed heads (what ``nn.Linear`` computes with the same values)."""
        if task in self.heads:
            return self.heads[task](x)
        packed = self._packed[0]
        if packed is not None and task in packed:
            own = packed.head(task)
            if own is not None:
                return F.linear(x, own[0], own[1])
        return self.heads[self.base_task](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = route_of(self)
        if r is not None:
            r.check_rows(x, "head")
            outs = [self.run_head(t, r.select(x, u)) for u, t in enumerate(r.tasks)]
            width = max(o.shape[-1] for o in outs)
            outs = [o if o.shape[-1] == width else
                    torch.cat([o, o.new_full((*o.shape[:-1], width - o.shape[-1]), float("-inf"))], dim=-1)
                    for o in outs]
            return r.regroup(outs)
        if self.task is None:
            raise RuntimeError("no active task: call RecastModel.set_task(name) first")
        return self.run_head(self.task, x)


def _get_parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def find_head_name(model: nn.Module) -> str | None:
    """The classifier of a timm-style model: ``pretrained_cfg['classifier']`` or
    ``get_classifier()``. A head that is a container (ModuleList, Sequential, a head module)
    resolves to the single Linear inside it.

    Raises:
        HeadDetectionError: the head holds no Linear or several (e.g. CrossViT's one per branch).
    """
    name = None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    candidate = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(candidate, str):
        try:
            model.get_submodule(candidate)
            name = candidate
        except AttributeError:
            pass
    if name is None and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        name = next((n for n, m in model.named_modules() if m is head and n), None)
    if name is None:
        return None
    head = model.get_submodule(name)
    if not any(True for _ in head.children()):
        return name  # a single layer
    linears = [f"{name}.{n}" for n, m in head.named_modules() if n and isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise HeadDetectionError(name, type(head).__name__, linears)
    return linears[0]


class RecastModel(nn.Module):
    """A model rewritten into template banks + per-task coefficients (paper eqs. 1-2).

    Attributes:
        model: the wrapped network, its targeted layers replaced by RecastLinear/RecastConv2d
            and its classifier (if any) by TaskHeads.
        banks: the template banks, stored once (layers reference them without registering).
        plan: the grouping plan; config: the RecastConfig.
        task_state: per-task copies of biases, norm parameters and BatchNorm statistics (the
            tasks that own them); the network holds the active task's values.
        reference_weights: the original weights of the targeted modules (not in the
            state_dict), the target of Neural Mimicry; dropped by ``drop_reference()``.
    """

    def __init__(self, model: nn.Module, config: RecastConfig, layer_key: LayerKeyFn | None = None,
                 head_name: str | None = None, seed: int = 0):
        super().__init__()
        self.config = config
        self.plan: Plan = build_plan(model, config, layer_key, check=check_templatable)
        gen = torch.Generator().manual_seed(seed)
        modules = dict(model.named_modules())
        first = next(iter(model.parameters()))
        self.banks = nn.ModuleDict({
            b.key: TemplateBank(b.templates, b.shape, generator=gen, fan_mode=template_fan_mode(config, b.role))
            .to(first.device, first.dtype)
            for b in self.plan.banks
        })
        self.reference_weights: dict[str, torch.Tensor] = {}
        self.original_param_count = sum(p.numel() for p in model.parameters())
        base = config.base_task
        for mp in self.plan.modules:
            original = modules[mp.name]
            self.reference_weights[mp.name] = original.weight.detach().clone()
            layer = make_recast_layer(original, self.banks[mp.bank], config.coef_sets)
            layer.add_task(base, random_unit_coefficients(config.coef_sets, self.banks[mp.bank].num_templates, gen))
            layer.recast_name = mp.name  # stable name even when an adapter later wraps the layer
            parent, child = _get_parent(model, mp.name)
            setattr(parent, child, layer)
        if head_name == "":
            self.head_name = None
        else:
            self.head_name = head_name if head_name is not None else find_head_name(model)
        self.num_features = getattr(model, "num_features", None)
        if self.head_name is not None:
            head = model.get_submodule(self.head_name)
            if isinstance(head, nn.Linear):
                self.num_features = head.in_features
            heads = TaskHeads(base)
            heads.heads[base] = head
            parent, child = _get_parent(model, self.head_name)
            setattr(parent, child, heads)
        self.model = model
        self.packed: PackedTasks | None = None  # read-only tasks stored compactly (add_packed_tasks)
        self.task_state = TaskState()
        self.tasks: list[str] = [base]
        self.active_task: str | None = None
        self._frozen = False
        self.mixed_strategy = "auto"  # strategy of mixed batches: recast.mixed.STRATEGIES
        route_norms(self.model, NORM_LAYERS, skip=self.head_name)
        if config.bn_stats == "per_task":
            live = self._live("bn_stats")
            self.task_state.set_values(base, "bn_stats", live, live, None)
        self.set_task(base, freeze=False)
        if config.bn_stats == "frozen":
            freeze_batch_norm_stats(self.model)

    # ----------------------------------------------------------------- structure
    def recast_layers(self) -> Iterator[tuple[str, nn.Module]]:
        """(name, layer) of every RecastLinear/RecastConv2d, named as in the original model
        (also when an adapter wraps the layer, so task payloads do not depend on adapters)."""
        for module in self.model.modules():
            if isinstance(module, RECAST_LAYERS):
                yield module.recast_name, module

    @property
    def last_routing(self) -> Routing | None:
        """The routing of this model's last mixed forward in the calling thread (its ``picks``:
        the strategy used per templated layer); None if there was none."""
        last = _LAST_ROUTING.get()
        return last[1] if last is not None and last[0]() is self else None

    @property
    def task_heads(self) -> TaskHeads | None:
        return self.model.get_submodule(self.head_name) if self.head_name is not None else None

    def forward(self, *args, tasks: Sequence[str] | None = None, **kwargs):
        """The wrapped network's forward; with ``tasks`` a mixed-task batch.

        Args:
            tasks: one task name per row of the batch (the first argument's leading
                dimension), in the style of PEFT's ``adapter_names``. Each row's output equals
                its task's output after ``set_task(task)`` (to float rounding); the active task
                and the trainable tensors are not changed. Outputs of tasks with fewer classes
                than the widest head of the batch are padded with -inf (see ``TaskHeads``);
                ``num_classes(task)`` gives a task's width. Gradients reach each task's
                coefficients and head as its own rows alone would give them. Per-task biases,
                norm parameters and BatchNorm statistics of tasks other than the active one
                are read from their stores (no gradient: train those with ``set_task``).
                Only the first positional argument is split by rows (it is sorted by task for
                the forward, and outputs with its leading dimension are put back in row order).
                ``mixed_strategy`` (default ``"auto"``) picks how (``recast.mixed``): per
                templated layer, or ``"loop"``, one ordinary forward per task on its rows
                (then each row is bit for bit its task's ``set_task`` + forward on those rows).

        Raises:
            UnknownTaskError: a name that is not a task (the known ones are listed).
            MixedBatchError: ``tasks`` does not give one task per row, the batch is empty, or
                BatchNorm layers with per-task statistics are in train mode.
            MixedBatchAdapterError: the model holds adapters (they are one task's).
        """
        if tasks is None:
            return self.model(*args, **kwargs)
        routing = self._routing(args, tasks)
        if routing is None:
            return self.model(*args, **kwargs)
        if routing.strategy == "loop" or (routing.strategy == "auto" and self._loop_pays(args, kwargs, routing)):
            return self._loop(args, kwargs, routing)
        if routing.contiguous:
            with self._mixed(routing):
                return self.model(*args, **kwargs)
        # rows sorted by task (each task's rows one block: slices instead of gathers in every
        # layer), the outputs put back in the caller's row order
        order = sort_order([str(t) for t in tasks])
        perm = torch.tensor(order, device=args[0].device)
        inverse = torch.argsort(perm)
        routing = self._routing((args[0].index_select(0, perm),), [str(tasks[i]) for i in order])
        with self._mixed(routing):
            out = self.model(args[0].index_select(0, perm), *args[1:], **kwargs)
        rows = len(order)
        return torch.utils._pytree.tree_map(
            lambda t: t.index_select(0, inverse) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == rows else t,
            out)

    def num_classes(self, task: str) -> int | None:
        """Output width of ``task``'s head (the base head's for a task without one)."""
        if task not in self.tasks:
            raise UnknownTaskError(task, self.tasks)
        heads = self.task_heads
        return heads.width(task) if heads is not None else None

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """``task``'s coefficients and head parameters (e.g. to train several tasks in one
        mixed batch: ``p.requires_grad_()`` on those of each task)."""
        if task not in self.tasks:
            raise UnknownTaskError(task, self.tasks)
        self._refuse_packed(task, "has no parameters to train")
        params = [layer.coefs[task] for _, layer in self.recast_layers()]
        heads = self.task_heads
        if heads is not None and task in heads.heads:
            params += list(heads.heads[task].parameters())
        return params

    def _routing(self, args: tuple, tasks: Sequence[str]) -> Routing | None:
        """Validate a mixed batch; None when every row belongs to the active task."""
        if isinstance(tasks, str) or not args or not isinstance(args[0], torch.Tensor):
            raise MixedBatchError("tasks= must be a sequence of task names, one per row of the input tensor")
        tasks = [str(t) for t in tasks]
        rows = args[0].shape[0] if args[0].dim() else 0
        if rows == 0 or len(tasks) != rows:
            raise MixedBatchError(f"tasks= gives {len(tasks)} task names for a batch of {rows} rows; "
                                  "give one per row (and at least one row)")
        known = set(self.tasks)
        for t in tasks:
            if t not in known:
                raise UnknownTaskError(t, self.tasks)
        distinct = set(tasks)
        if distinct == {self.active_task}:
            return None
        adapters = [f"{n}: {type(m).__name__}" for n, m in self.model.named_modules() if isinstance(m, AdapterWrapper)]
        if adapters:
            raise MixedBatchAdapterError(adapters)
        if self.config.bn_stats == "per_task" and any(
                m.training for m in self.model.modules() if isinstance(m, _BATCH_NORM)):
            raise MixedBatchError("BatchNorm layers with per-task statistics (bn_stats='per_task') are in train "
                                  "mode, which would update one set of statistics from rows of several tasks: "
                                  "train one task at a time (set_task), or call rc.eval() for a mixed batch")
        if self.mixed_strategy not in STRATEGIES:
            raise ValueError(f"mixed_strategy must be one of {STRATEGIES}, got {self.mixed_strategy!r}")
        routing = Routing.build(tasks, args[0].device, self.mixed_strategy)
        _LAST_ROUTING.set((weakref.ref(self), routing))
        for kind in self.task_state.kinds_in_use():
            live = self._live(kind)
            per_task = [self.task_state.values(t, kind, live, self.active_task) for t in routing.tasks]
            if all(v is live for v in per_task):
                continue  # every task of the batch uses the live values
            for key in live:
                prefix = PREFIX[kind]
                if kind == "biases":
                    module, attr = key[len(prefix):], "bias"
                else:
                    module, _, attr = key[len(prefix):].rpartition(".")
                slots = routing.values.setdefault(module, [{} for _ in routing.tasks])
                for slot, values in zip(slots, per_task):
                    slot[attr] = values[key]
        return routing

    def _members(self, members: dict[int, str]) -> dict[int, str]:
        """Fill ``members`` (a routing's): ``id -> name`` of the templated layers, task heads and
        norm layers."""
        for path, m in self.model.named_modules():
            if isinstance(m, RECAST_LAYERS):
                members[id(m)] = m.recast_name
            elif isinstance(m, (TaskHeads, *NORM_LAYERS)):
                members[id(m)] = path
        return members

    @contextlib.contextmanager
    def _mixed(self, routing: Routing):
        """Route one forward: the model's templated layers, heads and norm layers read ``routing``
        from a context-local (``recast.mixed.routed``); no module is modified, so concurrent
        mixed forwards on this model are each right."""
        self._members(routing.members)
        with routed(routing):
            yield routing

    def _single_routing(self, routing: Routing, u: int, rows: int, shapes: list | None = None) -> Routing:
        """The routing of the u-th task of ``routing`` alone, on ``rows`` rows."""
        values = {module: [slots[u]] for module, slots in routing.values.items()}
        if not routing.members:
            self._members(routing.members)
        return Routing.single(routing.tasks[u], rows, routing.index.device, values, routing.members, shapes)

    def _loop(self, args: tuple, kwargs: dict, routing: Routing):
        """The ``"loop"`` strategy: one forward per distinct task on its rows (the active task's
        the ordinary forward, every other one under its own single-task routing, which computes
        what ``set_task`` + forward computes, without switching anything), the outputs put back
        in row order. Outputs of narrower heads are padded with -inf on the last dimension, as
        ``TaskHeads`` pads them in the other strategies."""
        x = args[0]
        outs = []
        for u, task in enumerate(routing.tasks):
            xu = routing.select(x, u)
            if task == self.active_task:
                outs.append(self.model(xu, *args[1:], **kwargs))
                continue
            with routed(self._single_routing(routing, u, xu.shape[0])):
                outs.append(self.model(xu, *args[1:], **kwargs))
        routing.picks.update({name: "loop" for name, _ in self.recast_layers()})
        return _gather_rows(outs, routing)

    def _loop_pays(self, args: tuple, kwargs: dict, routing: Routing) -> bool:
        """``auto``: whether the cost model (``recast.mixed.loop_costs``) puts the ``"loop"``
        strategy below the per-layer strategies for this batch. Only in eval mode (in train mode
        BatchNorm batch statistics and dropout would differ between one forward of the batch and
        one per task), where the batch's tasks have heads of one width (the loop's outputs then
        need no padding, whatever follows the head), and on CPU (where its constants were
        measured: on a GPU a module call costs orders of magnitude more multiply-adds)."""
        if args[0].device.type != "cpu" or self.training:
            return False
        heads = self.task_heads
        if heads is not None and len({heads.width(t) for t in routing.tasks}) > 1:  # packed tasks' heads too
            return False
        profile = self._profile(args, kwargs, routing)
        if profile is None:
            return False
        shapes, calls, batch_norms = profile
        if any(m.training for m in batch_norms):
            return False
        return pick_model_strategy(shapes, routing.batch, len(routing.tasks), routing.widest, calls) == "loop"

    def _profile(self, args: tuple, kwargs: dict, routing: Routing) -> tuple[list[LayerShape], int, list] | None:
        """The templated layers' shapes (per call, in call order), the module calls of one
        forward (the leaf modules outside the task heads, plus one head) on rows shaped like
        ``args[0]``'s, and the model's BatchNorm layers (whose mode ``_loop_pays`` checks); None when the model cannot run one row or its outputs do not have one row
        per input row (then the loop cannot run or put them back). Found by one forward of the
        first row (no gradient), once per row shape, dtype and device, cached on the model (a
        concurrent first call may compute it twice, to the same result)."""
        x = args[0]
        key = (tuple(x.shape[1:]), x.dtype, str(x.device))
        profiles = self.__dict__.setdefault("_profiles", {})
        if key not in profiles:
            shapes: list[LayerShape] = []
            try:
                with torch.no_grad(), routed(self._single_routing(routing, 0, 1, shapes)):
                    out = self.model(x[:1], *args[1:], **kwargs)
            except Exception:  # noqa: BLE001 - a model that cannot run one row is never looped
                out = None
            leaves = torch.utils._pytree.tree_leaves(out) if out is not None else []
            ok = bool(leaves) and all(isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 for t in leaves)
            calls = 1 + sum(1 for _, m in self._ordinary_modules() if next(iter(m.children()), None) is None)
            batch_norms = [m for m in self.model.modules() if isinstance(m, _BATCH_NORM)]
            profiles[key] = (shapes, calls, batch_norms) if ok else None
        return profiles[key]

    def _ordinary_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """(path, module) of the network outside the task heads."""
        head = self.head_name
        for path, m in self.model.named_modules():
            if head is None or (path != head and not path.startswith(head + ".")):
                yield path, m

    def _live(self, kind: Kind) -> Live:
        """The network's tensors of ``kind``, keyed by payload key (``bias.<module>``,
        ``norm.<module>.<param>``, ``bn.<module>.<buffer>``)."""
        prefix = PREFIX[kind]
        if kind == "biases":
            return {f"{prefix}{name}": layer.bias for name, layer in self.recast_layers() if layer.bias is not None}
        out: Live = {}
        for path, m in self._ordinary_modules():
            if kind == "norms" and isinstance(m, NORM_LAYERS):
                out.update({f"{prefix}{path}.{n}": p for n, p in m.named_parameters(recurse=False)})
            elif kind == "bn_stats" and isinstance(m, _BATCH_NORM):
                out.update({f"{prefix}{path}.{n}": b for n, b in m.named_buffers(recurse=False)})
        return out

    def _task_values(self, task: str, kind: Kind) -> Live:
        return self.task_state.values(task, kind, self._live(kind), self.active_task)

    def _new_tensor_trainable(self, task: str) -> bool:
        """requires_grad of tensors created for ``task``: after ``set_task(..., freeze=True)``
        only the active task's are trainable."""
        return not self._frozen or task == self.active_task

    # ----------------------------------------------------------------- tasks
    def add_task(self, task: str, num_classes: int | None = None, init_from: str | None = None,
                 init: str = "copy", generator: torch.Generator | None = None) -> None:
        """Add a task: its coefficient sets and (if ``num_classes``) a new head.

        Args:
            task: name ([A-Za-z0-9_-]+).
            num_classes: size of the new head; None keeps no head of its own.
            init_from: task whose coefficients are copied (default: the base task, i.e. the
                reconstructed backbone every task starts from); the new task also starts from
                its own copy of whatever this task owns (biases, norms, BatchNorm statistics).
            init: ``"copy"`` or ``"random"`` (paper init: random unit vectors).
        """
        if not isinstance(task, str) or not _TASK_NAME.match(task):
            raise ValueError(f"task name must match [A-Za-z0-9_-]+, got {task!r}")
        if task in self.tasks:
            raise ValueError(f"task '{task}' exists already; known: {self.tasks}")
        src = init_from or self.config.base_task
        if src not in self.tasks:
            raise ValueError(f"init_from='{src}' is not a known task; known: {self.tasks}")
        if init not in ("copy", "random"):
            raise ValueError(f"init must be 'copy' or 'random', got {init!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if num_classes is not None and (self.task_heads is None or self.num_features is None):
            raise ValueError("this model has no classifier to replace; pass head_name= to recast.apply")
        trainable = self._new_tensor_trainable(task)
        for _, layer in self.recast_layers():
            if init == "copy":
                layer.add_task(task, layer.task_coefs(src).detach())
            else:
                layer.add_task(task, random_unit_coefficients(layer.coef_sets, layer.bank.num_templates, generator))
            layer.coefs[task].requires_grad_(trainable)
        if num_classes is not None:
            like = self._like()
            head = nn.Linear(self.num_features, num_classes).to(device=like.device, dtype=like.dtype)
            self.task_heads.heads[task] = head.requires_grad_(trainable)
        kinds = set(self.task_state.owned_kinds(src)) | ({"bn_stats"} if self.config.bn_stats == "per_task" else set())
        for kind in sorted(kinds, key=KINDS.index):
            live = self._live(kind)
            self.task_state.set_values(task, kind, self._task_values(src, kind), live, self.active_task)
        self.tasks.append(task)

    def set_task(self, task: str, freeze: bool = True, train_biases: bool = False, train_norms: bool = False) -> None:
        """Activate ``task``; with ``freeze`` only its coefficients and head stay trainable.

        Args:
            freeze: make only the task's own tensors trainable. With ``freeze=False`` every
                parameter is trainable, shared ones included (for work on the base task).
            train_biases: the task gets its own copy of the templated layers' biases (kept
                from then on: switched by ``set_task``, in its payload and its counts),
                trainable with ``freeze``.
            train_norms: the same for LayerNorm/GroupNorm/BatchNorm affine parameters.
        """
        if task not in self.tasks:
            raise UnknownTaskError(task, self.tasks)
        self._refuse_packed(task, "cannot be activated: run it in a mixed forward, rc(x, tasks=[...])")
        if self.active_task is not None and task != self.active_task:
            self.task_state.switch(self.active_task, task, {k: self._live(k) for k in self.task_state.kinds_in_use()})
        for _, layer in self.recast_layers():
            layer.task = task
        heads = self.task_heads
        if heads is not None:
            heads.task = task if task in heads.heads else self.config.base_task
        self.active_task = task
        for kind, wanted in (("biases", train_biases), ("norms", train_norms)):
            if wanted and not self.task_state.owns(task, kind):
                live = self._live(kind)
                self.task_state.set_values(task, kind, live, live, task)
        self._frozen = freeze
        if not freeze:
            for p in self.parameters():
                p.requires_grad_(True)
            return
        for p in self.parameters():
            p.requires_grad_(False)
        for _, layer in self.recast_layers():
            layer.coefs[task].requires_grad_(True)
        if heads is not None and task in heads.heads:
            for p in heads.heads[task].parameters():
                p.requires_grad_(True)
        for kind, wanted in (("biases", train_biases), ("norms", train_norms)):
            if wanted:
                for p in self._live(kind).values():
                    p.requires_grad_(True)

    def owned_kinds(self, task: str) -> list[str]:
        """What ``task`` owns besides coefficients and head: ``biases``, ``norms``, ``bn_stats``."""
        if task not in self.tasks:
            raise ValueError(f"unknown task '{task}'; known: {self.tasks}")
        return list(self.task_state.owned_kinds(task))

    def task_tensors(self, task: str) -> dict[str, torch.Tensor]:
        """The tensors that define ``task``: ``coefs.<module>`` (K, n), ``head.<param>``, and
        what the task owns: ``bias.<module>``, ``norm.<module>.<param>``, ``bn.<module>.<buffer>``."""
        if task not in self.tasks:
            raise ValueError(f"unknown task '{task}'; known: {self.tasks}")
        if self.packed is not None and task in self.packed:
            return self.packed.task_tensors(task)
        out = {f"coefs.{name}": layer.coefs[task].detach() for name, layer in self.recast_layers()}
        heads = self.task_heads
        if heads is not None and task in heads.heads:
            out.update({f"head.{k}": v.detach() for k, v in heads.heads[task].state_dict().items()})
        for kind in self.task_state.owned_kinds(task):  # copies: live tensors change with set_task
            out.update({k: v.detach().clone() for k, v in self._task_values(task, kind).items()})
        return out

    def load_task_tensors(self, task: str, tensors: dict[str, torch.Tensor], num_classes: int | None = None) -> None:
        """Create or overwrite ``task`` from ``task_tensors``-style tensors.

        Existing tensors are overwritten in place; new ones are trainable only if the model
        is not frozen or ``task`` is the active task (as ``set_task`` would leave them).

        Raises:
            ValueError: a key or shape does not fit this model, or the BatchNorm statistics
                do not match ``RecastConfig.bn_stats``; ``task`` is a packed task (read-only).
        """
        self._refuse_packed(task, "is read-only")
        layers = dict(self.recast_layers())
        known = ("coefs.", "head.", *PREFIX.values())
        unknown = sorted(k for k in tensors if not k.startswith(known))
        if unknown:
            raise ValueError(f"task '{task}' tensors have unknown keys {unknown[:5]}; expected prefixes {list(known)}")
        coef_keys = {k[len("coefs."):] for k in tensors if k.startswith("coefs.")}
        if coef_keys != set(layers):
            missing, extra = sorted(set(layers) - coef_keys), sorted(coef_keys - set(layers))
            raise ValueError(f"task '{task}' tensors do not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
        by_kind = {kind: {k: v for k, v in tensors.items() if k.startswith(PREFIX[kind])} for kind in KINDS}
        has_bn = bool(self._live("bn_stats"))
        if self.config.bn_stats == "frozen" and by_kind["bn_stats"]:
            raise ValueError(f"task '{task}' tensors hold BatchNorm statistics but this model's bn_stats='frozen'; "
                             "use RecastConfig(bn_stats='per_task')")
        if self.config.bn_stats == "per_task" and has_bn and not by_kind["bn_stats"]:
            raise ValueError(f"task '{task}' tensors hold no BatchNorm statistics but this model's "
                             "bn_stats='per_task'; use RecastConfig(bn_stats='frozen')")
        for name, layer in layers.items():
            expected = (layer.coef_sets, layer.bank.num_templates)
            got = tuple(tensors[f"coefs.{name}"].shape)
            if got != expected:
                raise ValueError(f"task '{task}' coefficients of '{name}' have shape {got}, expected {expected}")
        head_sd = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
        if head_sd and self.task_heads is None:
            raise ValueError("payload has a head but this model has no classifier")
        if head_sd and self._head_fitting(task, head_sd) is None and "weight" not in head_sd:
            raise ValueError(f"task '{task}' head fits neither its current head nor a Linear; keys: {sorted(head_sd)}")
        if task not in self.tasks:
            self.add_task(task, num_classes=num_classes)
        with torch.no_grad():
            for name, layer in layers.items():
                layer.coefs[task].copy_(tensors[f"coefs.{name}"])
        if head_sd:
            self._load_head(task, head_sd)
        for kind, values in by_kind.items():
            if values:
                self.task_state.set_values(task, kind, values, self._live(kind), self.active_task)

    def add_packed_tasks(self, tasks: dict[str, dict[str, torch.Tensor]]) -> None:
        """Add read-only tasks from ``task_tensors``-style tensors, stored compactly
        (``recast.packed``): every task's coefficients in one tensor, heads in another, no
        per-task module or parameter. Their mixed-forward outputs equal those of the same tasks
        added with ``load_task_tensors``. Tasks packed earlier are packed again with them.

        Raises:
            ValueError: a name exists already or is not a task name; a key or shape does not fit
                this model; tensors that packing does not hold (biases, norms, BatchNorm
                statistics: load those with ``load_task_tensors``), or a head where the model has
                no classifier (``PackedTaskError``, a ValueError).
        """
        layers = self.packed_layers()
        for task, own in tasks.items():
            if not isinstance(task, str) or not _TASK_NAME.match(task):
                raise ValueError(f"task name must match [A-Za-z0-9_-]+, got {task!r}")
            if task in self.tasks:
                raise ValueError(f"task '{task}' exists already")
            coef_keys = {k[len("coefs."):] for k in own if k.startswith("coefs.")}
            other = sorted(k for k in own if not k.startswith("coefs.") and k not in ("head.weight", "head.bias"))
            if other:
                raise PackedTaskError(f"task '{task}' tensors {other[:5]} cannot be packed (packed tasks hold "
                                      "coefficients and a Linear head): load it with load_task_tensors")
            if coef_keys != set(layers):
                missing, extra = sorted(set(layers) - coef_keys), sorted(coef_keys - set(layers))
                raise ValueError(f"task '{task}' tensors do not fit this model: missing {missing[:5]}, "
                                 f"unexpected {extra[:5]}")
            if ("head.weight" in own or "head.bias" in own) and (self.task_heads is None or "head.weight" not in own):
                raise PackedTaskError(f"task '{task}' has head tensors {sorted(k for k in own if k.startswith('head.'))} "
                                      "that packing cannot hold (no classifier, or a bias without a weight)")
        old = self.packed
        if old is not None:  # pack the earlier packed tasks again with the new ones
            tasks = {**{t: old.task_tensors(t) for t in old.names}, **tasks}
        self.attach_packed(PackedTasks.of(tasks, self.packed_layers(), self.num_features, self._like()))

    def packed_layers(self) -> dict[str, tuple[int, int]]:
        """(K, n) per templated layer, in order: the ``layers`` of a ``PackedTasks`` for this model."""
        return {name: (layer.coef_sets, layer.bank.num_templates) for name, layer in self.recast_layers()}

    def attach_packed(self, packed: PackedTasks) -> None:
        """Serve the tasks of ``packed`` (built for this model: ``packed_layers``, ``num_features``,
        every task written by ``put``), replacing the packed tasks held so far.

        Raises:
            ValueError: a task it does not fill, a name that is another (unpacked) task of this
                model, or layers that are not this model's.
        """
        if packed.blocks.keys() != self.packed_layers().keys() or any(
                packed.blocks[n][1:] != kn for n, kn in self.packed_layers().items()):
            raise PackedTaskError("packed tasks made for other templated layers than this model's")
        if not bool(packed.filled.all()):
            missing = [t for t, f in zip(packed.names, packed.filled.tolist()) if not f]
            raise PackedTaskError(f"packed tasks {missing[:5]} were never written (put)")
        if packed.head_weight.shape[0] and (self.task_heads is None or packed.head_weight.shape[1] != self.num_features):
            raise PackedTaskError(f"packed heads of {packed.head_weight.shape[1]} features, this model's classifier "
                                  f"takes {self.num_features}")
        previous = set(self.packed.names) if self.packed is not None else set()
        clash = [t for t in packed.names if t in self.tasks and t not in previous]
        if clash:
            raise ValueError(f"tasks {clash[:5]} exist already")
        self.packed = packed
        for _, layer in self.recast_layers():
            layer._packed[0] = packed
        if self.task_heads is not None:
            self.task_heads._packed[0] = packed
        self.tasks = [t for t in self.tasks if t not in previous] + packed.names

    def _refuse_packed(self, task: str, why: str) -> None:
        if self.packed is not None and task in self.packed:
            raise PackedTaskError(f"task '{task}' is a packed (read-only) task and {why}")

    def _head_fitting(self, task: str, head_sd: dict[str, torch.Tensor]) -> nn.Module | None:
        """``task``'s current head if ``head_sd`` has exactly its keys and shapes."""
        heads = self.task_heads
        head = heads.heads[task] if heads is not None and task in heads.heads else None
        if head is None:
            return None
        own = head.state_dict()
        fits = set(own) == set(head_sd) and all(own[k].shape == head_sd[k].shape for k in own)
        return head if fits else None

    def _load_head(self, task: str, head_sd: dict[str, torch.Tensor]) -> None:
        """Overwrite ``task``'s head in place if it fits, else give it a new Linear."""
        head = self._head_fitting(task, head_sd)
        if head is None:
            w, like = head_sd["weight"], self._like()
            head = nn.Linear(w.shape[1], w.shape[0], bias="bias" in head_sd).to(device=like.device, dtype=like.dtype)
            head.requires_grad_(self._new_tensor_trainable(task))
            self.task_heads.heads[task] = head
        head.load_state_dict(head_sd)  # copies in place: requires_grad and identity are kept

    def _like(self) -> torch.Tensor:
        """A tensor with the model's device and dtype (those of the templates)."""
        return next(iter(self.banks.values())).templates

    # ----------------------------------------------------------------- export
    def materialize(self, task: str) -> nn.Module:
        """A plain model of the original classes with ``task``'s generated weights, head and
        owned tensors (biases, norms, BatchNorm statistics), in the model's dtype.

        The result holds no reference to the banks; its outputs match this model's for
        ``task`` (to float rounding).
        """
        if task not in self.tasks:
            raise ValueError(f"unknown task '{task}'; known: {self.tasks}")
        return self._plain_copy(lambda name, layer: layer.to_plain(task), task)

    def reference_model(self) -> nn.Module:
        """A plain copy holding the original (pre-RECAST) weights and the base head."""
        if not self.reference_weights:
            raise RuntimeError("reference weights were dropped (drop_reference was called)")

        def plain(name: str, layer: nn.Module) -> nn.Module:
            out = layer.to_plain(self.config.base_task)
            with torch.no_grad():
                out.weight.copy_(self.reference_weights[name])
            return out

        return self._plain_copy(plain, self.config.base_task)

    def drop_reference(self) -> None:
        """Free the copy of the original weights (after mimicry)."""
        self.reference_weights = {}

    def _plain_copy(self, make_plain, task: str) -> nn.Module:
        memo = {id(b): b for b in self.banks.values()}  # do not deep-copy the banks (nor packed tasks)
        for b in self.banks.values():
            memo[id(b.templates)] = b.templates
        if self.packed is not None:
            memo[id(self.packed)] = self.packed
        model = copy.deepcopy(self.model, memo)
        unfreeze_batch_norm_stats(model)  # a plain model of the original classes
        unroute_norms(model)
        owned = {kind: self._task_values(task, kind) for kind in self.task_state.kinds_in_use()}
        biases = owned.pop("biases", {})
        with torch.no_grad():
            for path, layer in [(n, m) for n, m in self.model.named_modules() if isinstance(m, RECAST_LAYERS)]:
                plain = make_plain(layer.recast_name, layer)
                key = f"{PREFIX['biases']}{layer.recast_name}"
                if key in biases:
                    plain.bias.copy_(biases[key])
                parent, child = _get_parent(model, path)
                setattr(parent, child, plain)
            for kind, values in owned.items():  # norms, BatchNorm statistics: same paths in the copy
                for key, value in values.items():
                    path, _, attr = key[len(PREFIX[kind]):].rpartition(".")
                    getattr(model.get_submodule(path), attr).copy_(value)
        if self.head_name is not None:
            heads = self.task_heads
            head = heads.head_of(task)
            parent, child = _get_parent(model, self.head_name)
            setattr(parent, child, copy.deepcopy(head))
        for p in model.parameters():
            p.requires_grad_(True)
        return model


def apply(model: nn.Module, config: RecastConfig, layer_key: LayerKeyFn | None = None,
          head_name: str | None = None, seed: int = 0, inplace: bool = False) -> RecastModel:
    """Rewrite ``model``'s targeted Linear/Conv2d layers into template banks + coefficients.

    Args:
        model: any torch model (timm or not).
        config: targets, G, n, K, how BatchNorm statistics are handled (``bn_stats``).
        layer_key: ``name -> (stack, index) | None``; default parses the last numeric path part.
        head_name: the classifier module to make per-task (timm: found automatically).
        seed: seed of the template/coefficient init (local generator).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The RecastModel; the base task holds the original head and random coefficients until
        ``recast.mimic`` reconstructs the original weights.
    """
    if not inplace:
        model = copy.deepcopy(model)
    return RecastModel(model, config, layer_key=layer_key, head_name=head_name, seed=seed)
