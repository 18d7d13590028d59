"""The MoE language model: ``MoELayer`` (the routed feed-forward) and ``MoETransformer``."""

from smk_lightning.model.config import ModelConfig
from smk_lightning.model.moe import MoELayer
from smk_lightning.model.transformer import MoETransformer

__all__ = ["MoELayer", "ModelConfig", "MoETransformer"]
