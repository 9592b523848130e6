"""The paper's published accuracies (RECAST, ICLR 2025, Tables 1-2): test accuracy in percent
averaged over the six tasks, keyed by (arch, method) as this project names them."""

from __future__ import annotations

PAPER_AVG_ACC: dict[tuple[str, str], float] = {
    ("vit", "head_only"): 82.4, ("vit", "recast"): 85.0,
    ("vit", "rosa_spa_mlp"): 84.5, ("vit", "rosa_spa_mlp_recast"): 85.4,
    ("vit", "adaptformer"): 89.0, ("vit", "adaptformer_recast"): 90.1,
    ("vit", "melo"): 88.7, ("vit", "melo_recast"): 89.6,
    ("vit", "rosa"): 88.6, ("vit", "rosa_recast"): 88.9,
    ("vit", "dora"): 89.3, ("vit", "inflora"): 88.5, ("vit", "l2p"): 35.9,
    ("resnet", "head_only"): 65.2, ("resnet", "recast"): 66.3,
    ("resnet", "piggyback"): 82.9, ("resnet", "piggyback_recast"): 83.9,
    ("resnet", "clr"): 79.9, ("resnet", "clr_recast"): 80.9,
    ("resnet", "hat"): 40.0, ("resnet", "gdumb"): 34.8, ("resnet", "er_ace"): 36.1,
    ("resnet", "ewc"): 22.1, ("resnet", "lwf"): 19.3, ("resnet", "derpp"): 16.2,
}
