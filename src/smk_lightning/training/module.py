"""``SMKModule``: the LightningModule that trains the MoE language model.

One training step (manual optimisation, so the statistics slot in between the main
backward and the optimizer step); the pieces live beside this file — ``router_step``
(statistics → targets → smk_loss), ``guard`` (the skip decision), ``state`` (what is
accumulated, and what the callbacks read), ``optimizer``:

    forward under ``StatsCapture`` (MoE layers keep what the ghost norms need)
    → main loss (+ Switch aux / z-loss) → one ``manual_backward`` (DDP averages the
      gradients of everything but the routers); the capture's sinks get ḡ and the norms
      of the experts' own gradients (out of the autograd graph: the same compiled)
    → M_A, M_G per layer → ΔSC targets (no gradient, autocast off, global moments)
    → smk_loss on router logits recomputed from the detached layer input → its gradient by
      ``torch.autograd.grad`` on the router-only graph, added to the routers' ``.grad``
    → router gradients averaged over ranks by hand (the routers are kept out of DDP's
      reducer: a second DDP backward, or ``find_unused_parameters``, is never needed)
    → at the last micro-batch: one global finite check (skip if non-finite) → optimizer
      step (clipping in ``on_before_optimizer_step``, after a GradScaler has unscaled)
      → schedule step → aux-free bias update.

Validation, sanity checks and sampling draw no random numbers that training uses: probe
rows are a pure function of (stats.seed, stream, step, micro-batch, layer, rank).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.text import Perplexity

from smk_lightning.errors import ConfigError
from smk_lightning.losses import auxfree_update_, smk_metrics
from smk_lightning.model import ModelConfig, MoETransformer
from smk_lightning.model.moe import expert_counts
from smk_lightning.model.precision import to_acc
from smk_lightning.stats import StatsCapture, get_engine, probe_generator
from smk_lightning.stats.capture import TRAIN_STREAM, VAL_STREAM
from smk_lightning.training.config import OptimConfig, RouterConfig, StatsConfig
from smk_lightning.training.distributed import all_reduce_sum, average_grads, broadcast_, world_size
from smk_lightning.training.guard import NonFiniteGuard, NonFiniteTrainingError, grads_finite
from smk_lightning.training.optimizer import make_optimizer
from smk_lightning.training.router_step import (
    aux_weight,
    router_aux_losses,
    router_backward,
    stats_and_targets,
    uses_auxfree,
)
from smk_lightning.training.state import Accumulation, LayerTargets, StepState

__all__ = ["METRIC_KEYS", "NonFiniteTrainingError", "SMKModule"]

METRIC_KEYS = ("g_acc", "g_acc_dense", "kl_div", "topk_overlap", "agreement")
DROPPED_KEY = "train/stats_dropped_pairs"  # routed pairs the statistics left out (stats.ghost.ghost_step)


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
            router: Router loss (smk, switch, auxfree, none or frozen) and its options.
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
        self.auxfree = uses_auxfree(router)
        self.aux_weight = aux_weight(router)
        decoupled = router.loss == "smk" and router.decoupled
        for layer in self.moe_layers.values():
            layer.detach_router = decoupled
            if self.auxfree:
                layer.enable_score_bias()
            if router.loss == "frozen":
                layer.router.weight.requires_grad_(False)  # no gradient, no optimizer state: it cannot move
        # The routers' gradients are reduced by hand (see the module docstring): DDP must not
        # own them, or the router-only smk gradient would need a second DDP backward.
        self._ddp_params_and_buffers_to_ignore = [n for n, _ in self.named_parameters() if ".router." in n]
        self.val_ppl = Perplexity()
        self.step_state = StepState()  # what the callbacks read
        self.acc = Accumulation(optim.accumulate_grad_batches)
        self.guard = NonFiniteGuard(optim.max_skipped_steps)
        self._warned_trivial = False
        self._warned_dropped = False
        if router.loss == "smk" and not stats.enabled:
            raise ConfigError("router.loss=smk needs stats.enabled=true; enable stats or use router.loss=switch")
        if router.loss == "smk" and stats.every_n_steps > 1:
            n = stats.every_n_steps
            warnings.warn(f"router.loss=smk with stats.every_n_steps={n}: smk_loss trains the router on one step in "
                          f"{n} only; set stats.every_n_steps=1 to train it on every step", stacklevel=2)

    # -- helpers -------------------------------------------------------------------------------
    @property
    def engine(self):
        return get_engine(self.stats_cfg.engine, chunk_size=self.stats_cfg.vmap_chunk_size)

    def router_params(self) -> list[Tensor]:
        """The routers' weights that train (none with ``router.loss=frozen``)."""
        return [layer.router.weight for layer in self.moe_layers.values() if layer.router.weight.requires_grad]

    def forward(self, idx_BT: Tensor) -> Tensor:
        return self.model(idx_BT)

    def lm_loss(self, logits_BTV: Tensor, targets_BT: Tensor) -> Tensor:
        logits = logits_BTV.flatten(0, 1)
        logits = to_acc(logits)  # bf16 → float32 for the loss
        return F.cross_entropy(logits, targets_BT.flatten(), ignore_index=-1)

    def _loss_scale(self) -> Tensor | float:
        """The 16-mixed GradScaler's current scale (its tensor: no host sync), else 1."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer else None
        if scaler is None or not scaler.is_enabled():
            return 1.0
        scale = getattr(scaler, "_scale", None)
        return scale if scale is not None else scaler.get_scale()

    def _stats_and_targets(self, capture: StatsCapture, stream: int, step: int, micro: int
                           ) -> tuple[dict, dict[str, LayerTargets], Tensor | None]:
        cfg, rank = self.stats_cfg, self.global_rank
        # compiled with the model, in training only (as the model's forward): a validation
        # batch's shapes would compile graphs of their own
        return stats_and_targets(capture, self.moe_layers, self.engine, cfg, self.router_cfg,
                                 lambda i: probe_generator(cfg.seed, stream, step, micro, i, rank), self.device,
                                 compiled=self.model_cfg.compile and stream == TRAIN_STREAM)

    def _warn_if_trivial(self) -> None:
        first = next(iter(self.moe_layers.values()), None)
        if (not self._warned_trivial and first is not None and self.stats_cfg.scope == "routed"
                and first.top_k == 1 and self.router_cfg.loss == "smk"):
            warnings.warn(
                "stats.scope=routed with top_k=1: each token has one defined expert, so smk_loss has "
                "no target to learn and g_acc is undefined; use scope 'probe' or 'dense'",
                stacklevel=2,
            )
            self._warned_trivial = True

    # -- training ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        broadcast_([layer.router.weight for layer in self.moe_layers.values()])  # DDP broadcasts the weights it owns; the routers are ours

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        opt, acc = self.optimizers(), self.acc
        acc.restore(self.named_parameters(), self.device)
        stats_now = (self.stats_cfg.enabled and bool(self.moe_layers)
                     and self.global_step % self.stats_cfg.every_n_steps == 0)
        self._warn_if_trivial()
        state = self.step_state = StepState(boundary=acc.last)
        smk, dropped = None, None
        capture = StatsCapture(self.moe_layers) if stats_now else nullcontext()
        try:
            with capture:
                logits = self.model(batch["input_ids"])
                loss = self.lm_loss(logits, batch["targets"])
                aux, z = router_aux_losses(list(self.moe_layers.values()), self.router_cfg, self.device)
                total = loss + self.aux_weight * aux + self.router_cfg.z_loss_weight * z
                if acc.first:
                    opt.zero_grad(set_to_none=True)
                self.manual_backward(total / acc.accum)
                if stats_now:
                    loss_scale = self._loss_scale()
                    capture.set_grad_scale((batch["targets"] != -1).sum(), acc.accum, loss_scale)
                    state.stats, state.targets, smk = self._stats_and_targets(
                        capture, TRAIN_STREAM, self.global_step, acc.micro)
                    dropped = capture.dropped_pairs()
                    if smk is not None:
                        # × world size: the routers' gradients are averaged over ranks below, and
                        # smk is this rank's share of the global mean; × loss_scale: the same
                        # units as the main backward's (scaled) gradients.
                        router_backward(self.router_cfg.weight * smk * (world_size() * loss_scale / acc.accum),
                                        self.router_params())
        finally:
            for layer in self.moe_layers.values():
                layer.release_graph()
        average_grads(self.router_params())
        last = acc.last
        acc.add(torch.isfinite(total.detach()), self._expert_load(),
                {"train/loss": loss}  # a term whose weight is 0 is not logged (a flat zero)
                | ({"train/aux_loss": aux} if self.aux_weight > 0 else {})
                | ({"train/z_loss": z} if self.router_cfg.z_loss_weight > 0 else {})
                | ({"train/smk_loss": smk * world_size()} if smk is not None else {})
                | ({DROPPED_KEY: dropped.float()} if dropped is not None else {}))
        acc.advance()
        if last:
            logs = acc.take_logs()
            dropped_all = self._optimizer_step(opt, logs[DROPPED_KEY][0] if DROPPED_KEY in logs else None)
            self._warn_if_dropped(dropped_all)
            self._log_step(logs)
        return loss

    def _log_step(self, logs: dict[str, tuple[Tensor, int]]) -> None:
        """Once per optimizer step: the means over its micro-batches (train/stats_dropped_pairs:
        the sum), on the optimizer-step axis (``step`` = optimizer steps done, as the callbacks
        and the console count them; Lightning's own batch counter would count micro-batches and
        shift after a resume). Python numbers go in as CPU tensors: Lightning would copy a float
        to the device, a blocking copy every step."""
        if not self._logs_written_now():
            return
        for key, (total, n) in logs.items():
            self.log(key, total if key == DROPPED_KEY else total / n, prog_bar=key in ("train/loss", "train/smk_loss"))
        for key, value in (("train/skipped_steps", self.guard.skipped),
                           ("train/lr", self.lr_schedulers().get_last_lr()[0]), ("step", self.global_step)):
            self.log(key, torch.scalar_tensor(float(value)))  # on the CPU, made there (no copy)

    def _logs_written_now(self) -> bool:
        """Whether Lightning writes this step's logged values to the loggers (every
        ``log_every_n_steps``, when stopping), or it is the last step (``callback_metrics``
        then hold the run's final values). The other steps skip ``self.log``: Lightning's
        bookkeeping costs about 0.5 ms per value, about a tenth of a step on a GPU, for
        values it would overwrite unwritten."""
        trainer = self._trainer
        if trainer is None or trainer.fast_dev_run or trainer.should_stop:
            return True
        if 0 < trainer.max_steps <= self.global_step:
            return True
        # Lightning's own test (private; where it is missing, log every step as before)
        return bool(getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", True))

    def _warn_if_dropped(self, dropped: int) -> None:
        """Once per run: say so when the statistics left routed pairs out (``ghost_step``;
        ``dropped``: this step's count over all ranks, read with the skip decision)."""
        if self._warned_dropped or dropped <= 0:
            return
        self._warned_dropped = True
        warnings.warn(
            f"the statistics left {dropped} routed pairs out at step {self.global_step} (combine weight too "
            "small to divide out of the gradients, more than stats.ghost.LOST_PAIR_BUDGET per layer): the router "
            "is extremely confident; see train/stats_dropped_pairs, and consider router.z_loss_weight > 0",
            stacklevel=2,
        )

    def _expert_load(self) -> Tensor | None:
        """Aux-free balancing: this micro-batch's expert loads ``[L, E]`` (None otherwise)."""
        if not self.auxfree:
            return None
        return torch.stack([expert_counts(layer.last_topi_NK, layer.num_experts) for layer in self.moe_layers.values()])

    def _update_score_bias(self, load_LE: Tensor | None) -> None:
        if load_LE is None:
            return
        for layer, load_E in zip(self.moe_layers.values(), all_reduce_sum(load_LE)):
            auxfree_update_(layer.score_bias_E, load_E, self.router_cfg.auxfree_rate)

    def _optimizer_step(self, opt, dropped: Tensor | None) -> int:
        """Step — unless the loss or a gradient is non-finite on any rank: then the weights
        stay as they are, the step is counted in ``train/skipped_steps``, and after
        ``optim.max_skipped_steps`` in a row the run stops with a checkpoint of this state.
        Under 16-mixed the GradScaler owns overflowing gradients: it skips that update and
        lowers its scale (so the optimizer step is still called), and only a non-finite
        loss counts as skipped here. Returns the pairs the statistics left out this step
        (all ranks), read in the same host sync as the decision."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        finite = self.acc.take_finite()
        local = finite if scaler is not None else finite & grads_finite(self.parameters(), self.device)
        load_LE = self.acc.take_load()
        ok, dropped_all = self.guard.decide(local, dropped)  # the one host sync of the step
        if not ok:
            if scaler is not None:
                opt.step()  # the scaler sees the non-finite gradients: skips and backs off
            opt.zero_grad(set_to_none=True)
            if self.guard.skipped_one():
                self._halt_nonfinite()
            return dropped_all
        self.guard.stepped()
        opt.step()
        self.lr_schedulers().step()
        self._update_score_bias(load_LE)
        return dropped_all

    def on_before_optimizer_step(self, optimizer) -> None:
        # Here, not before opt.step(): a 16-mixed GradScaler has unscaled the gradients by now.
        if self.optim_cfg.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim_cfg.grad_clip, gradient_clip_algorithm="norm")

    def _halt_nonfinite(self) -> None:
        trainer = self.trainer
        ckpt_dir = Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback and \
            trainer.checkpoint_callback.dirpath else Path(trainer.default_root_dir)
        path = ckpt_dir / "last-good.ckpt"
        count, self.guard.consecutive = self.guard.consecutive, 0  # a resumed run starts afresh
        trainer.save_checkpoint(path)  # weights and optimizer untouched by the skipped steps
        raise NonFiniteTrainingError(
            f"{count} training steps in a row had a non-finite loss or gradient "
            f"(optim.max_skipped_steps={self.optim_cfg.max_skipped_steps}); the last good state is in {path}: "
            "lower optim.lr or check the data, then resume with --ckpt_path"
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["smk_state"] = self.guard.state_dict() | self.acc.state_dict(self.named_parameters())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("smk_state")
        if state:
            self.guard.load_state_dict(state)
            self.acc.load_state_dict(state)

    # -- validation ----------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        want_stats = self.stats_cfg.enabled and bool(self.moe_layers) and batch_idx < self.stats_cfg.val_batches
        if want_stats:
            self._val_stats(batch, batch_idx)
        with torch.no_grad():
            logits = self.model(batch["input_ids"])
            loss = self.lm_loss(logits, batch["targets"])
        self.val_ppl.update(logits.float(), batch["targets"])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", self.val_ppl)
        self.log("step", float(self.global_step))  # the optimizer-step axis of the training logs

    def val_stats(self, batch: dict[str, Tensor], batch_idx: int) -> tuple[dict, dict]:
        """(statistics, targets) per MoE layer of a validation batch: a forward + backward under
        enable_grad whose gradients go to the capture's sinks only (``inputs=``: the weights'
        ``.grad`` is never touched); its own probe stream. No parameter, optimizer or training
        state changes."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("validation statistics need a backward: run the Trainer with inference_mode=False")
        try:
            with StatsCapture(self.moe_layers) as capture, torch.enable_grad():
                loss = self.lm_loss(self.model(batch["input_ids"]), batch["targets"])
                loss.backward(inputs=capture.sinks())
                capture.set_grad_scale((batch["targets"] != -1).sum())
                stats, targets, _ = self._stats_and_targets(capture, VAL_STREAM, batch_idx, 0)
        finally:
            for layer in self.moe_layers.values():
                layer.release_graph()
        return stats, targets

    def _val_stats(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, targets = self.val_stats(batch, batch_idx)
        metrics_by_layer = {name: smk_metrics(t.logits_NE, t.targets, t.top_k, t.topi_NK)
                            for name, t in targets.items()}
        for name, metrics in metrics_by_layer.items():
            for key in METRIC_KEYS:
                self.log(f"val/{name}/{key}", metrics[key], sync_dist=True)
        for key in METRIC_KEYS:
            self.log(f"val/{key}", torch.stack([m[key] for m in metrics_by_layer.values()]).nanmean(),
                     sync_dist=True)

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
        total = self.trainer.max_steps if self._trainer and self.trainer.max_steps > 0 else 10_000
        return make_optimizer(self.named_parameters(), self.optim_cfg, total)
