"""AdamW in three parameter groups (decayed matrices, the rest, the routers at their own
learning rate) and its schedule: linear warmup, then cosine decay to ``min_lr_ratio``."""

from __future__ import annotations

import math

import torch

from smk_lightning.training.config import OptimConfig


def make_optimizer(named_params, cfg: OptimConfig, total_steps: int) -> dict:
    """Lightning's ``configure_optimizers`` result for ``total_steps`` optimizer steps."""
    router, decay, no_decay = [], [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue  # a frozen router
        if ".router." in name:
            router.append(p)
        elif p.dim() >= 2 and "embed" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
        {"params": router, "weight_decay": 0.0, "lr": cfg.router_lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=cfg.betas, fused=cfg.fused or None)
    warmup = cfg.warmup_steps

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
