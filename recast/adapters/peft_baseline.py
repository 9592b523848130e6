"""The plain-timm LoRA/DoRA baselines through PEFT (the reference our own layers must match)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def peft_lora(model: nn.Module, targets: Sequence[str] | str, rank: int, alpha: float | None = None,
              use_dora: bool = False, modules_to_save: Sequence[str] = ()) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA (or DoRA) on ``targets``.

    Args:
        model: any torch model (timm: ``attn.qkv`` matches every block's fused qkv).
        targets: PEFT ``target_modules``: names/suffixes (a leading dot, our ``.suffix`` form,
            is dropped), or one regex string (full match).
        rank: r; alpha: lora_alpha (None: alpha = r, scale 1, as our ``LoRAConfig``).
        use_dora: DoRA instead of LoRA.
        modules_to_save: modules trained and stored in full per task (e.g. ``("head",)``).

    Returns:
        The ``peft.PeftModel``; only the adapters (and ``modules_to_save``) are trainable.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    config = LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, lora_dropout=0.0, bias="none",
        target_modules=targets if isinstance(targets, str) else [t.lstrip(".") for t in targets],
        use_dora=use_dora, modules_to_save=list(modules_to_save) or None,
    )
    return get_peft_model(model, config)
