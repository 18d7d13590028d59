"""Training: ``SMKModule`` (the LightningModule, ``module``), its options (``config``), and the
pieces of its step as plain functions and classes — the router's side (``router_step``), the
skip decision (``guard``), what is accumulated and what the callbacks read (``state``), the
optimizer (``optimizer``) and the collectives beyond DDP (``distributed``)."""

from smk_lightning.training.config import OptimConfig, RouterConfig, StatsConfig
from smk_lightning.training.module import NonFiniteTrainingError, SMKModule

__all__ = ["NonFiniteTrainingError", "OptimConfig", "RouterConfig", "SMKModule", "StatsConfig"]
