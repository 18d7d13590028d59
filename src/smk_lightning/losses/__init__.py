"""Router losses: Switch load balancing, router z-loss, aux-loss-free bias balancing, and
smk_loss built on M_A / M_G."""

from smk_lightning.losses.router import auxfree_update_, router_z_loss, switch_aux_loss
from smk_lightning.losses.smk import (
    DELTA_SC,
    TARGETS,
    SMKTargets,
    delta_sc,
    sinkhorn,
    smk_loss,
    smk_metrics,
    smk_targets,
)

__all__ = ["DELTA_SC", "TARGETS", "SMKTargets", "auxfree_update_", "delta_sc", "router_z_loss", "sinkhorn",
           "smk_loss", "smk_metrics", "smk_targets", "switch_aux_loss"]
