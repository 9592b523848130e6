"""Continual-learning baselines (task-incremental, one head per task) on timm backbones.

Typical use::

    backbone = timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=0)
    tasks = [TaskSpec("cifar10", 10, train, val, test), ...]
    method = make_method("ewc", backbone, {"lam": 10.0})
    result = run_sequential(method, tasks, TrainConfig(epochs=10, lr=1e-4))
    result.to_json()  # acc_matrix, final_acc, forgetting, params, bytes, wall time
"""

from recast.baselines.buffer import ClassBalancedBuffer
from recast.baselines.common import MultiHeadNet, TaskSpec, TensorBatches, TrainConfig
from recast.baselines.derpp import DERPP, DERPPConfig
from recast.baselines.er_ace import ERACE, ReplayConfig
from recast.baselines.ewc import EWC, EWCConfig
from recast.baselines.finetune import FinetuneFull, FinetuneHead
from recast.baselines.gdumb import GDumb, GDumbConfig
from recast.baselines.hat import HAT, HATConfig
from recast.baselines.inflora import InfLoRA, InfLoRAConfig, InfLoRALinear
from recast.baselines.l2p import L2P, L2PConfig
from recast.baselines.lwf import LwF, LwFConfig
from recast.baselines.method import ContinualMethod
from recast.baselines.recast_seq import RecastSequential
from recast.baselines.results import SequentialResult, forgetting_per_task
from recast.baselines.runner import METHODS, make_method, run_sequential

__all__ = [
    "DERPP", "DERPPConfig", "ERACE", "EWC", "EWCConfig", "ClassBalancedBuffer", "ContinualMethod",
    "FinetuneFull", "FinetuneHead", "GDumb", "GDumbConfig", "HAT", "HATConfig", "InfLoRA", "InfLoRAConfig",
    "InfLoRALinear", "L2P", "L2PConfig",
    "LwF", "LwFConfig", "METHODS", "MultiHeadNet", "RecastSequential", "ReplayConfig", "SequentialResult", "TaskSpec",
    "TensorBatches", "TrainConfig", "forgetting_per_task", "make_method",
    "run_sequential",
]
