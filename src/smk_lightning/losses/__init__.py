"""Router losses: Switch load balancing, router z-loss, and smk_loss built on M_A / M_G."""

from smk_lightning.losses.router import router_z_loss, switch_aux_loss
from smk_lightning.losses.smk import DELTA_SC, TARGETS, delta_sc, smk_loss, smk_metrics, smk_targets

__all__ = ["DELTA_SC", "TARGETS", "delta_sc", "router_z_loss", "smk_loss", "smk_metrics", "smk_targets",
           "switch_aux_loss"]
