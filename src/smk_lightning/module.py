"""``SMKModule``: the LightningModule that trains the MoE language model.

One training step (manual optimisation, so the statistics slot in between the main
backward and the optimizer step):

    forward (MoE layers capture what the ghost norms need)
    → main loss (+ Switch aux / z-loss) → one backward; tensor hooks keep ḡ and the norms
      of the experts' own gradients
    → M_A, M_G per layer (``stats.step_stats``) → ΔSC targets (no gradient)
    → smk_loss on router logits recomputed from the detached layer input → its backward
    → clip → skip if non-finite → optimizer step → schedule step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.text import Perplexity

from smk_lightning.errors import ConfigError
from smk_lightning.losses import router_z_loss, smk_loss, smk_metrics, smk_targets, switch_aux_loss
from smk_lightning.model import ModelConfig, MoETransformer
from smk_lightning.stats import ENGINES, step_stats
from smk_lightning.stats.vmap import vmap_stats
from smk_lightning.train_config import OptimConfig, RouterConfig, StatsConfig


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive training steps had a non-finite loss or gradient."""


class SMKModule(L.LightningModule):
    def __init__(
        self,
        model: ModelConfig = ModelConfig(),  # noqa: B008 (frozen-by-convention defaults)
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        stats: StatsConfig = StatsConfig(),  # noqa: B008
        router: RouterConfig = RouterConfig(),  # noqa: B008
        dense_only: bool = False,
    ) -> None:
        """MoE language model trained with manual optimisation.

        Args:
            model: Model shape.
            optim: Optimiser and schedule.
            stats: Per-token expert statistics M_A / M_G.
            router: Router loss (smk, switch or none) and its options.
            dense_only: Replace every MoE layer by a dense FFN of equal active FLOPs (baseline).
        """
        super().__init__()
        model, optim, stats, router = (
            c if isinstance(c, cls) else cls(**c)  # dicts come back from a checkpoint's hparams
            for c, cls in ((model, ModelConfig), (optim, OptimConfig), (stats, StatsConfig), (router, RouterConfig))
        )
        # Plain dicts in the checkpoint, so it loads with torch.load(weights_only=True).
        self.save_hyperparameters({"model": asdict(model), "optim": asdict(optim), "stats": asdict(stats),
                                   "router": asdict(router), "dense_only": dense_only})
        self.model_cfg, self.optim_cfg, self.stats_cfg, self.router_cfg = model, optim, stats, router
        self.automatic_optimization = False
        self.model = MoETransformer(self.model_cfg, dense_only=dense_only)
        self.moe_layers = self.model.moe_layers()
        decoupled = self.router_cfg.loss == "smk" and self.router_cfg.decoupled
        for layer in self.moe_layers.values():
            layer.detach_router = decoupled
        self.val_ppl = Perplexity()
        self._probe_gen = torch.Generator().manual_seed(self.stats_cfg.seed)
        self._warned_trivial = False
        # Per-step results read by the callbacks (detached; replaced every step).
        self.step_stats: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._step_targets: dict[str, tuple] = {}  # (router logits, targets, top_k) per layer
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._micro = 0  # micro-batch index within the current gradient-accumulation step
        self._finite = True  # every micro-batch loss of the current step was finite
        if self.router_cfg.loss == "smk" and not self.stats_cfg.enabled:
            raise ConfigError("router.loss=smk needs stats.enabled=true; enable stats or use router.loss=switch")

    # -- helpers -------------------------------------------------------------------------------
    @property
    def engine(self):
        fn = ENGINES[self.stats_cfg.engine]
        return partial(vmap_stats, chunk_size=self.stats_cfg.vmap_chunk_size) if fn is vmap_stats else fn

    def forward(self, idx_BT: Tensor) -> Tensor:
        return self.model(idx_BT)

    def lm_loss(self, logits_BTV: Tensor, targets_BT: Tensor) -> Tensor:
        logits = logits_BTV.flatten(0, 1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 → float32 for the loss
        return F.cross_entropy(logits, targets_BT.flatten(), ignore_index=-1)

    def router_aux_losses(self) -> tuple[Tensor, Tensor]:
        """(Switch aux loss, z-loss), averaged over MoE layers, from the current forward.

        The aux loss is on for ``loss=switch`` and, as a balancing term, for ``loss=smk``
        with ``balance_weight > 0``; ``aux_weight`` gives its weight in the total."""
        zero = torch.zeros((), device=self.device)
        aux, z = zero, zero
        if not self.moe_layers:
            return aux, z
        for layer in self.moe_layers.values():
            if self.aux_weight > 0:
                aux = aux + switch_aux_loss(layer.last_probs_NE, layer.last_topi_NK)
            if self.router_cfg.z_loss_weight > 0:
                z = z + router_z_loss(layer.last_logits_NE)
        n = len(self.moe_layers)
        return aux / n, z / n

    @property
    def aux_weight(self) -> float:
        rcfg = self.router_cfg
        return {"switch": rcfg.weight, "smk": rcfg.balance_weight}.get(rcfg.loss, 0.0)

    def _set_capture(self, on: bool) -> None:
        for layer in self.moe_layers.values():
            layer.capture_stats = on
            if not on:
                layer.clear_capture()

    def _stats_and_smk(self) -> Tensor | None:
        """After the main backward: statistics, ΔSC targets, metrics, and smk_loss averaged
        over the MoE layers (None unless ``router.loss=smk``)."""
        cfg, rcfg = self.stats_cfg, self.router_cfg
        losses, self.step_stats, self._step_targets = [], {}, {}
        for name, layer in self.moe_layers.items():
            M_A, M_G, mask = step_stats(layer, self.engine, cfg.scope, cfg.probe_fraction, self._probe_gen)
            targets = smk_targets(M_A, M_G, mask, rcfg.delta_sc, rcfg.tau)
            # Router logits recomputed from the detached layer input: smk_loss reaches the
            # router only, never the experts or the layers below.
            logits_NE = layer.router(layer.capture.x_ND)
            if rcfg.loss == "smk":
                losses.append(smk_loss(logits_NE, targets, rcfg.target))
            self.step_stats[name] = (M_A, M_G, mask)
            self._step_targets[name] = (logits_NE.detach(), targets, layer.top_k)
        return torch.stack(losses).mean() if losses else None

    def step_metrics(self) -> dict[str, dict[str, Tensor]]:
        """g_acc, kl_div, topk_overlap per MoE layer for the last statistics step; computed
        on demand (the callbacks log them every few steps, not every step)."""
        return {name: smk_metrics(*args) for name, args in self._step_targets.items()}

    def _warn_if_trivial(self) -> None:
        first = next(iter(self.moe_layers.values()), None)
        if (not self._warned_trivial and first is not None and self.stats_cfg.scope == "routed"
                and first.top_k == 1 and self.router_cfg.loss == "smk"):
            warnings.warn(
                "stats.scope=routed with top_k=1: each token has one defined expert, so smk_loss has "
                "no target to learn and g_acc ≡ 1 by construction; use scope 'probe' or 'dense'",
                stacklevel=2,
            )
            self._warned_trivial = True

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        opt = self.optimizers()
        accum = self.optim_cfg.accumulate_grad_batches
        first, last = self._micro == 0, self._micro == accum - 1
        stats_now = (self.stats_cfg.enabled and bool(self.moe_layers)
                     and self.global_step % self.stats_cfg.every_n_steps == 0)
        self._warn_if_trivial()
        self._set_capture(stats_now)
        try:
            logits = self.model(batch["input_ids"])
            loss = self.lm_loss(logits, batch["targets"])
            aux, z = self.router_aux_losses()
            total = loss + self.aux_weight * aux + self.router_cfg.z_loss_weight * z
            n_tokens = int((batch["targets"] != -1).sum())
            for layer in self.moe_layers.values():
                if layer.capture is not None:
                    # the hook sees ∂(total/accum)/∂o = ḡ_mean/accum; DESIGN §2 wants the sum loss
                    layer.capture.grad_scale = float(n_tokens * accum)
            if first:
                opt.zero_grad(set_to_none=True)
            self.manual_backward(total / accum)
            smk = self._stats_and_smk() if stats_now else None
            if smk is not None:
                self.manual_backward(self.router_cfg.weight * smk / accum)
        finally:
            self._set_capture(False)
            for layer in self.moe_layers.values():
                layer.release_graph()
        self._finite = self._finite and bool(torch.isfinite(total))
        self._micro = 0 if last else self._micro + 1
        if last:
            self._optimizer_step(opt)

        self.log("train/loss", loss, prog_bar=True)
        self.log("train/aux_loss", aux)
        self.log("train/z_loss", z)
        if smk is not None:
            self.log("train/smk_loss", smk, prog_bar=True)
        self.log("train/skipped_steps", float(self.skipped_steps))
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def _optimizer_step(self, opt) -> None:
        """Clip and step — unless the loss or a gradient is non-finite: then the weights stay
        as they are, the step is counted in ``train/skipped_steps``, and after
        ``optim.max_skipped_steps`` in a row the run stops with a checkpoint of this state."""
        finite, self._finite = self._finite and self._grads_finite(), True
        if not finite:
            opt.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self._consecutive_skips += 1
            limit = self.optim_cfg.max_skipped_steps
            if limit and self._consecutive_skips >= limit:
                self._halt_nonfinite()
            return
        self._consecutive_skips = 0
        if self.optim_cfg.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=self.optim_cfg.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.lr_schedulers().step()

    def _halt_nonfinite(self) -> None:
        trainer = self.trainer
        ckpt_dir = Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback and \
            trainer.checkpoint_callback.dirpath else Path(trainer.default_root_dir)
        path = ckpt_dir / "last-good.ckpt"
        count, self._consecutive_skips = self._consecutive_skips, 0  # a resumed run starts afresh
        trainer.save_checkpoint(path)  # weights and optimizer untouched by the skipped steps
        raise NonFiniteTrainingError(
            f"{count} training steps in a row had a non-finite loss or gradient "
            f"(optim.max_skipped_steps={self.optim_cfg.max_skipped_steps}); the last good state is in {path}: "
            "lower optim.lr or check the data, then resume with --ckpt_path"
        )

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        return not grads or bool(torch.stack(torch._foreach_norm(grads)).isfinite().all())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["smk_state"] = {
            "probe_generator": self._probe_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self._consecutive_skips,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("smk_state")
        if state:
            self._probe_gen.set_state(state["probe_generator"])
            torch.set_rng_state(state["torch_rng"])
            self.skipped_steps = state["skipped_steps"]
            self._consecutive_skips = state["consecutive_skips"]

    # -- validation ----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        want_stats = self.stats_cfg.enabled and bool(self.moe_layers) and batch_idx < self.stats_cfg.val_batches
        if want_stats:
            self._val_stats(batch)
        with torch.no_grad():
            logits = self.model(batch["input_ids"])
            loss = self.lm_loss(logits, batch["targets"])
        self.val_ppl.update(logits.float(), batch["targets"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", self.val_ppl)

    def _val_stats(self, batch: dict[str, Tensor]) -> None:
        """val/g_acc and val/kl_div: a forward + backward under enable_grad whose gradients
        go to ``torch.autograd.grad`` (never to ``.grad``); no parameter or optimizer change."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("validation statistics need a backward: run the Trainer with inference_mode=False")
        self._set_capture(True)
        try:
            with torch.enable_grad():
                logits = self.model(batch["input_ids"])
                loss = self.lm_loss(logits, batch["targets"])
                n_tokens = int((batch["targets"] != -1).sum())
                for layer in self.moe_layers.values():
                    layer.capture.grad_scale = float(n_tokens)
                lowest = next(iter(self.moe_layers.values()))
                torch.autograd.grad(loss, [lowest.w2], allow_unused=True)
                self._stats_and_smk()
        finally:
            self._set_capture(False)
        metrics_by_layer = self.step_metrics()
        for name, metrics in metrics_by_layer.items():
            for key in ("g_acc", "kl_div", "topk_overlap"):
                self.log(f"val/{name}/{key}", metrics[key], sync_dist=True)
        for key in ("g_acc", "kl_div", "topk_overlap"):
            self.log(f"val/{key}", torch.stack([m[key] for m in metrics_by_layer.values()]).nanmean(),
                     sync_dist=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        with torch.no_grad():
            loss = self.lm_loss(self.model(batch["input_ids"]), batch["targets"])
        self.log("test/loss", loss, sync_dist=True)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        with torch.no_grad():
            return self.model(batch["input_ids"]).argmax(-1)

    @torch.no_grad()
    def generate(self, idx_BT: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample continuations (used by the text-sample callback)."""
        for _ in range(max_new_tokens):
            ctx = idx_BT[:, -self.model_cfg.max_seq_len:]
            logits = self.model(ctx)[:, -1].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = (logits / temperature).softmax(-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx_BT.device)
            idx_BT = torch.cat([idx_BT, nxt], dim=1)
        return idx_BT

    # -- optimiser -----------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        router, decay, no_decay = [], [], []
        for name, p in self.named_parameters():
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
        opt = torch.optim.AdamW([g for g in groups if g["params"]], betas=cfg.betas)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 10_000
        warmup = cfg.warmup_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
