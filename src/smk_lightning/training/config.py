"""Training options of ``SMKModule``: optimiser, statistics and router loss.

Every default lives here, once; field docstrings become ``smk fit --help`` text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from smk_lightning.errors import ConfigError
from smk_lightning.losses.smk import DeltaSC, Target
from smk_lightning.stats.engines import get_engine
from smk_lightning.stats.scopes import check_probe_fraction, check_scope
from smk_lightning.stats.vmap import DEFAULT_CHUNK_SIZE, check_chunk_size


@dataclass
class OptimConfig:
    """AdamW with warmup + cosine decay."""

    lr: float = 3e-3
    """Peak learning rate of all non-router parameters."""
    router_lr: float = 3e-3
    """Peak learning rate of the router weights (no weight decay)."""
    weight_decay: float = 0.1
    """AdamW weight decay of matrices (norms, embeddings' rows and routers excluded)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = 50
    """Linear warmup steps."""
    min_lr_ratio: float = 0.1
    """Cosine decays to this fraction of the peak learning rate at trainer.max_steps."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    accumulate_grad_batches: int = 1
    """Micro-batches whose gradients are summed (mean) into one optimizer step."""
    fused: bool = False
    """Fused AdamW (CPU and CUDA): a few kernels per parameter group instead of a few per tensor, equal up to rounding; on a launch-bound step it saves a sixth of the step (BENCHMARKS.md)."""
    max_skipped_steps: int = 10
    """Stop (with a checkpoint of the last good state) after this many consecutive steps with a non-finite loss or gradient; 0 never stops."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.router_lr < 0:
            raise ConfigError(f"optim.lr={self.lr} / optim.router_lr={self.router_lr} must be positive")
        if self.accumulate_grad_batches < 1:
            raise ConfigError(f"optim.accumulate_grad_batches={self.accumulate_grad_batches} must be >= 1")


@dataclass
class StatsConfig:
    """Per-token, per-expert statistics M_A, M_G (docs/design.md)."""

    enabled: bool = True
    """Compute the statistics during training (smk_loss needs them)."""
    engine: Literal["ghost", "vmap", "loop"] = "ghost"
    """ghost: closed form (fast, default); vmap: torch.func per-token gradients (check); loop: reference (tiny models only)."""
    scope: Literal["routed", "dense", "probe"] = "probe"
    """routed: selected experts only; dense: every expert; probe: dense on probe_fraction of tokens, routed elsewhere."""
    probe_fraction: float = 0.25
    """Share of tokens evaluated on every expert in scope 'probe', in (0, 1]."""
    every_n_steps: int = 1
    """Compute the statistics every n-th training step — and so smk_loss too, with router.loss=smk (a warning says so when n > 1)."""
    vmap_chunk_size: int = DEFAULT_CHUNK_SIZE
    """Tokens per vmap chunk (bounds the memory of the vmap engine)."""
    val_batches: int = 2
    """Validation batches on which val/g_acc and val/kl_div are computed (0 disables)."""
    seed: int = 0
    """Seed of the probe-token draw (probe rows are a pure function of seed, step, micro-batch, layer and rank)."""

    def __post_init__(self) -> None:
        try:
            get_engine(self.engine)
            check_scope(self.scope, self.probe_fraction)
            check_probe_fraction(self.probe_fraction)  # a bad share is bad whatever the scope
            check_chunk_size(self.vmap_chunk_size)
        except ValueError as e:  # the stats package raises plain ValueError for programmatic use
            raise ConfigError(str(e)) from None
        if self.every_n_steps < 1:
            raise ConfigError(f"stats.every_n_steps={self.every_n_steps} must be >= 1")


@dataclass
class RouterConfig:
    """How the router is trained. The default is the Switch aux loss (weight 0.01), the router
    the README's comparison chose; the smk arms are in configs/experiments/."""

    loss: Literal["smk", "switch", "auxfree", "none", "frozen"] = "switch"
    """smk: smk_loss on ΔSC targets; switch: Switch load-balancing loss; auxfree: aux-loss-free bias balancing (no router loss); none: main loss only; frozen: the random initial router is never trained (the zero-learning control)."""
    weight: float | None = None
    """Weight of the router loss chosen in `loss` (smk_loss or the Switch aux loss); null: 1.0 for smk, 0.01 for switch."""
    balance: Literal["switch", "auxfree", "none"] = "switch"
    """Balance mechanism used together with loss=smk: a Switch aux loss of weight balance_weight, aux-loss-free bias balancing, or none."""
    balance_weight: float = 1.0
    """Weight of the Switch balance term added to smk_loss (loss=smk, balance=switch; 0 disables)."""
    auxfree_rate: float = 1e-3
    """Aux-loss-free balancing: per-step change of each expert's routing bias (DeepSeek-V3's γ)."""
    z_loss_weight: float = 0.0
    """Weight of the router z-loss (combinable with any `loss`; 0 disables)."""
    delta_sc: DeltaSC = "zscore"
    """ΔSC: z(M_A) − z(M_G) (global z-scores), the same with each expert column standardised on its own, σ(M_A) − σ(M_G), −M_G, or log1p(M_A) − log1p(M_G)."""
    target: Target = "soft"
    """hard: CE to argmax ΔSC; soft: KL(softmax(ΔSC/τ) ‖ p̃); balanced: soft, with Q on dense rows Sinkhorn-balanced over experts."""
    tau: float = 1.0
    """Temperature τ of the soft target (also used for the kl_div metric)."""
    sinkhorn_iters: int = 20
    """Sinkhorn–Knopp iterations of target=balanced."""
    decoupled: bool = True
    """True: only smk_loss trains the router (main loss sees a detached router); False: both do."""

    def __post_init__(self) -> None:
        if self.weight is None:  # the Switch loss is summed over experts: its usual scale is 100× smaller
            self.weight = 1.0 if self.loss == "smk" else 0.01
        if self.tau <= 0:
            raise ConfigError(f"router.tau={self.tau} must be > 0")
        if self.sinkhorn_iters < 1:
            raise ConfigError(f"router.sinkhorn_iters={self.sinkhorn_iters} must be >= 1")
        for name in ("weight", "balance_weight", "z_loss_weight", "auxfree_rate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"router.{name}={getattr(self, name)} must be >= 0")
        if self.loss == "frozen" and self.z_loss_weight > 0:
            raise ConfigError(f"router.loss=frozen with router.z_loss_weight={self.z_loss_weight}: a frozen router "
                              "has nothing to regularise; set router.z_loss_weight=0")
