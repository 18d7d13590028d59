"""Training: ``SMKModule`` (the LightningModule), its options (``config``) and the collectives
its step needs beyond DDP (``distributed``)."""

from smk_lightning.training.config import OptimConfig, RouterConfig, StatsConfig
from smk_lightning.training.module import NonFiniteTrainingError, SMKModule

__all__ = ["NonFiniteTrainingError", "OptimConfig", "RouterConfig", "SMKModule", "StatsConfig"]
