"""``SMKModule``: the LightningModule that trains the MoE language model.

One training step (manual optimisation, so the statistics slot in between the main
backward and the optimizer step):

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

import math
import warnings
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.text import Perplexity

from smk_lightning.distributed import (
    all_ranks_true,
    all_reduce_sum,
    average_grads,
    broadcast_,
    world_size,
)
from smk_lightning.errors import ConfigError
from smk_lightning.losses import (
    auxfree_update_,
    router_z_loss,
    smk_loss,
    smk_metrics,
    smk_targets,
    switch_aux_loss,
)
from smk_lightning.model import ModelConfig, MoETransformer
from smk_lightning.model.moe import expert_counts
from smk_lightning.model.precision import to_acc
from smk_lightning.stats import StatsCapture, get_engine, probe_generator
from smk_lightning.stats.capture import TRAIN_STREAM, VAL_STREAM
from smk_lightning.train_config import OptimConfig, RouterConfig, StatsConfig

METRIC_KEYS = ("g_acc", "g_acc_dense", "kl_div", "topk_overlap", "agreement")
DROPPED_KEY = "train/stats_dropped_pairs"  # routed pairs the statistics left out (stats.ghost.ghost_step)


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
            router: Router loss (smk, switch, auxfree or none) and its options.
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
            if self.auxfree:
                layer.enable_score_bias()
            if self.router_cfg.loss == "frozen":
                layer.router.weight.requires_grad_(False)  # no gradient, no optimizer state: it cannot move
        # The routers' gradients are reduced by hand (see the module docstring): DDP must not
        # own them, or the router-only smk gradient would need a second DDP backward.
        self._ddp_params_and_buffers_to_ignore = [n for n, _ in self.named_parameters() if ".router." in n]
        self.val_ppl = Perplexity()
        self._warned_trivial = False
        self._warned_dropped = False
        self._dropped_total: Tensor | None = None  # pairs left out of the statistics since the last read
        # Per-step results read by the callbacks: filled only on a micro-batch that computed
        # statistics (empty otherwise, never touched by validation).
        self.step_stats: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._step_targets: dict[str, tuple] = {}  # (router logits, targets, top_k, topi) per layer
        self.step_boundary = True  # the last micro-batch ended an optimizer step (callbacks act then)
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._micro = 0  # micro-batch index within the current gradient-accumulation step
        self._finite: Tensor | None = None  # every micro-batch loss of the current step was finite
        self._load_LE: Tensor | None = None  # aux-free: expert loads of the current step, per layer
        self._restored_grads: dict[str, Tensor] | None = None  # see on_load_checkpoint
        self._step_logs: dict[str, tuple[Tensor, int]] = {}  # train/* sums over the step's micro-batches
        if self.router_cfg.loss == "smk" and not self.stats_cfg.enabled:
            raise ConfigError("router.loss=smk needs stats.enabled=true; enable stats or use router.loss=switch")
        if self.router_cfg.loss == "smk" and self.stats_cfg.every_n_steps > 1:
            n = self.stats_cfg.every_n_steps
            warnings.warn(f"router.loss=smk with stats.every_n_steps={n}: smk_loss trains the router on one step in "
                          f"{n} only; set stats.every_n_steps=1 to train it on every step", stacklevel=2)

    # -- helpers -------------------------------------------------------------------------------
    @property
    def engine(self):
        return get_engine(self.stats_cfg.engine, chunk_size=self.stats_cfg.vmap_chunk_size)

    @property
    def auxfree(self) -> bool:
        rcfg = self.router_cfg
        return rcfg.loss == "auxfree" or (rcfg.loss == "smk" and rcfg.balance == "auxfree")

    @property
    def aux_weight(self) -> float:
        """Weight of the Switch aux loss in the total: the router loss itself for loss=switch,
        the balance term for loss=smk with balance=switch."""
        rcfg = self.router_cfg
        if rcfg.loss == "switch":
            return rcfg.weight
        return rcfg.balance_weight if rcfg.loss == "smk" and rcfg.balance == "switch" else 0.0

    def router_params(self) -> list[Tensor]:
        """The routers' weights that train (none with ``router.loss=frozen``)."""
        return [layer.router.weight for layer in self.moe_layers.values() if layer.router.weight.requires_grad]

    def forward(self, idx_BT: Tensor) -> Tensor:
        return self.model(idx_BT)

    def lm_loss(self, logits_BTV: Tensor, targets_BT: Tensor) -> Tensor:
        logits = logits_BTV.flatten(0, 1)
        logits = to_acc(logits)  # bf16 → float32 for the loss
        return F.cross_entropy(logits, targets_BT.flatten(), ignore_index=-1)

    def router_aux_losses(self) -> tuple[Tensor, Tensor]:
        """(Switch aux loss, z-loss), averaged over MoE layers, from the current forward.

        The aux loss is over the global batch (see ``switch_aux_loss``); ``aux_weight`` gives
        its weight in the total."""
        zero = torch.zeros((), device=self.device)
        aux, z = zero, zero
        if not self.moe_layers:
            return aux, z
        for layer in self.moe_layers.values():
            if self.aux_weight > 0:
                aux = aux + switch_aux_loss(layer.last_probs_NE, layer.last_topi_NK, all_reduce_sum, world_size())
            if self.router_cfg.z_loss_weight > 0:
                z = z + router_z_loss(layer.last_logits_NE)
        n = len(self.moe_layers)
        return aux / n, z / n

    def _loss_scale(self) -> Tensor | float:
        """The 16-mixed GradScaler's current scale (its tensor: no host sync), else 1."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer else None
        if scaler is None or not scaler.is_enabled():
            return 1.0
        scale = getattr(scaler, "_scale", None)
        return scale if scale is not None else scaler.get_scale()

    def _stats_and_targets(self, capture: StatsCapture, stream: int, step: int, micro: int
                           ) -> tuple[dict, dict, Tensor | None]:
        """After a backward: statistics, ΔSC targets, and smk_loss averaged over the MoE
        layers (None unless ``router.loss=smk``), all with autocast off. The targets and the
        loss run once on the layers' statistics stacked to ``[L, N, E]`` (each layer keeps its
        own moments): a few kernels per step instead of a few per layer."""
        cfg, rcfg, rank = self.stats_cfg, self.router_cfg, self.global_rank
        stats = capture.stats(self.engine, cfg.scope, cfg.probe_fraction,
                              lambda i: probe_generator(cfg.seed, stream, step, micro, i, rank))
        if not stats:  # no MoE layer
            return stats, {}, None
        names, layers = list(stats), [self.moe_layers[name] for name in stats]
        with torch.autocast(self.device.type, enabled=False):
            M_A_LNE, M_G_LNE, mask_LNE = (torch.stack(ts) for ts in zip(*stats.values()))
            t = smk_targets(M_A_LNE, M_G_LNE, mask_LNE, rcfg.delta_sc, rcfg.tau, rcfg.target,
                            rcfg.sinkhorn_iters, all_reduce_sum)
            # Router logits recomputed from the detached layer input: smk_loss reaches the
            # router only, never the experts or the layers below.
            logits_LNE = torch.stack([layer.router(layer.capture.x_ND.to(layer.router.weight.dtype))
                                      for layer in layers])
            smk = smk_loss(logits_LNE, t, rcfg.target, all_reduce_sum).mean() if rcfg.loss == "smk" else None
        targets = {name: (logits_LNE[i].detach(), t[i], layer.top_k, layer.capture.routing.topi_NK)
                   for i, (name, layer) in enumerate(zip(names, layers))}
        return stats, targets, smk

    def step_metrics(self) -> dict[str, dict[str, Tensor]]:
        """g_acc, g_acc_dense, kl_div, topk_overlap per MoE layer for this micro-batch's
        statistics (empty when none were computed); computed on demand (the callbacks log
        them every few steps, not every step)."""
        return {name: smk_metrics(logits, t, k, topi) for name, (logits, t, k, topi) in self._step_targets.items()}

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
        opt = self.optimizers()
        if self._restored_grads is not None:
            self._restore_partial_step()
        accum = self.optim_cfg.accumulate_grad_batches
        first, last = self._micro == 0, self._micro == accum - 1
        stats_now = (self.stats_cfg.enabled and bool(self.moe_layers)
                     and self.global_step % self.stats_cfg.every_n_steps == 0)
        self._warn_if_trivial()
        self.step_stats, self._step_targets = {}, {}
        smk, dropped = None, None
        capture = StatsCapture(self.moe_layers) if stats_now else nullcontext()
        try:
            with capture:
                logits = self.model(batch["input_ids"])
                loss = self.lm_loss(logits, batch["targets"])
                aux, z = self.router_aux_losses()
                total = loss + self.aux_weight * aux + self.router_cfg.z_loss_weight * z
                if first:
                    opt.zero_grad(set_to_none=True)
                self.manual_backward(total / accum)
                if stats_now:
                    loss_scale = self._loss_scale()
                    capture.set_grad_scale((batch["targets"] != -1).sum(), accum, loss_scale)
                    self.step_stats, self._step_targets, smk = self._stats_and_targets(
                        capture, TRAIN_STREAM, self.global_step, self._micro)
                    dropped = capture.dropped_pairs()
                    if smk is not None:
                        # × world size: the routers' gradients are averaged over ranks below, and
                        # smk is this rank's share of the global mean; × loss_scale: the same
                        # units as the main backward's (scaled) gradients.
                        self._router_backward(self.router_cfg.weight * smk * (world_size() * loss_scale / accum))
        finally:
            for layer in self.moe_layers.values():
                layer.release_graph()
        average_grads(self.router_params())
        finite = torch.isfinite(total.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        self._count_load()
        self.step_boundary = last
        self._micro = 0 if last else self._micro + 1
        self._add_step_logs({"train/loss": loss, "train/aux_loss": aux, "train/z_loss": z}
                            | ({"train/smk_loss": smk * world_size()} if smk is not None else {})
                            | ({DROPPED_KEY: dropped.float()} if dropped is not None else {}))
        if last:
            self._optimizer_step(opt)
            self._log_step()
        return loss

    def _add_step_logs(self, values: dict[str, Tensor]) -> None:
        for key, v in values.items():
            total, n = self._step_logs.get(key, (0.0, 0))
            self._step_logs[key] = (total + v.detach(), n + 1)

    def _log_step(self) -> None:
        """Once per optimizer step: the means over its micro-batches (train/stats_dropped_pairs:
        the sum), on the optimizer-step axis (``step`` = optimizer steps done, as the callbacks
        and the console count them; Lightning's own batch counter would count micro-batches and
        shift after a resume). Python numbers go in as CPU tensors: Lightning would copy a float
        to the device, a blocking copy every step."""
        logs, self._step_logs = self._step_logs, {}
        self._warn_if_dropped(logs[DROPPED_KEY][0] if DROPPED_KEY in logs else None)
        if not self._logs_written_now():
            return
        for key, (total, n) in logs.items():
            self.log(key, total if key == DROPPED_KEY else total / n, prog_bar=key in ("train/loss", "train/smk_loss"))
        for key, value in (("train/skipped_steps", self.skipped_steps),
                           ("train/lr", self.lr_schedulers().get_last_lr()[0]), ("step", self.global_step)):
            self.log(key, torch.scalar_tensor(float(value)))  # on the CPU, made there (no copy)

    def _logs_written_now(self) -> bool:
        """Whether Lightning writes this step's logged values to the loggers (every
        ``log_every_n_steps``, when stopping), or it is the last step (``callback_metrics``
        then hold the run's final values). The other steps skip ``self.log``: Lightning's
        bookkeeping costs about 0.5 ms per value, about a tenth of a step on a GPU (measured,
        BENCHMARKS.md), for values it would overwrite unwritten."""
        trainer = self._trainer
        if trainer is None or trainer.fast_dev_run or trainer.should_stop:
            return True
        if 0 < trainer.max_steps <= self.global_step:
            return True
        # Lightning's own test (private; where it is missing, log every step as before)
        return bool(getattr(getattr(trainer, "_logger_connector", None), "should_update_logs", True))

    def _warn_if_dropped(self, dropped: Tensor | None) -> None:
        """Once per run: say so when the statistics left routed pairs out (``ghost_step``;
        ``dropped``: this step's count, None on a step without statistics). The count is summed
        on the device (``_dropped_total``) and read at the console's cadence (every
        ``log_every_n_steps`` optimizer steps; Lightning reads its logged values then too)."""
        if self._warned_dropped:
            return
        if dropped is not None:
            self._dropped_total = dropped if self._dropped_total is None else self._dropped_total + dropped
        if self._dropped_total is None:
            return
        accum = self.optim_cfg.accumulate_grad_batches  # the CLI counts log_every_n_steps in micro-batches
        every = max(1, self.trainer.log_every_n_steps // accum) if self._trainer else 1
        if self.global_step % every:
            return
        total, self._dropped_total = float(self._dropped_total), None  # HOST SYNC, logging steps only
        if total > 0:
            self._warned_dropped = True
            warnings.warn(
                f"the statistics left {total:.0f} routed pairs out in the last {every} steps (combine weight "
                "too small to divide out of the gradients, more than stats.ghost.LOST_PAIR_BUDGET per layer): the router is extremely "
                "confident; see train/stats_dropped_pairs, and consider router.z_loss_weight > 0",
                stacklevel=2,
            )

    def _router_backward(self, loss: Tensor) -> None:
        """Add ∂loss/∂router to the routers' ``.grad`` without a DDP backward."""
        params = self.router_params()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad + g

    def _count_load(self) -> None:
        """Aux-free balancing: add this micro-batch's expert loads (all MoE layers)."""
        if not self.auxfree:
            return
        load_LE = torch.stack([expert_counts(layer.last_topi_NK, layer.num_experts)
                               for layer in self.moe_layers.values()])
        self._load_LE = load_LE if self._load_LE is None else self._load_LE + load_LE

    def _update_score_bias(self) -> None:
        if self._load_LE is None:
            return
        load_LE, self._load_LE = all_reduce_sum(self._load_LE), None
        for layer, load_E in zip(self.moe_layers.values(), load_LE):
            auxfree_update_(layer.score_bias_E, load_E, self.router_cfg.auxfree_rate)

    def _optimizer_step(self, opt) -> None:
        """Step — unless the loss or a gradient is non-finite on any rank: then the weights
        stay as they are, the step is counted in ``train/skipped_steps``, and after
        ``optim.max_skipped_steps`` in a row the run stops with a checkpoint of this state.
        Under 16-mixed the GradScaler owns overflowing gradients: it skips that update and
        lowers its scale (so the optimizer step is still called), and only a non-finite
        loss counts as skipped here."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        local = self._finite if scaler is not None else self._finite & self._grads_finite()
        self._finite = None
        if not all_ranks_true(local):  # the one host sync of the step: every rank decides alike
            if scaler is not None:
                opt.step()  # the scaler sees the non-finite gradients: skips and backs off
            opt.zero_grad(set_to_none=True)
            self._load_LE = None
            self.skipped_steps += 1
            self._consecutive_skips += 1
            limit = self.optim_cfg.max_skipped_steps
            if limit and self._consecutive_skips >= limit:
                self._halt_nonfinite()
            return
        self._consecutive_skips = 0
        opt.step()
        self.lr_schedulers().step()
        self._update_score_bias()

    def on_before_optimizer_step(self, optimizer) -> None:
        # Here, not before opt.step(): a 16-mixed GradScaler has unscaled the gradients by now.
        if self.optim_cfg.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.optim_cfg.grad_clip, gradient_clip_algorithm="norm")

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

    def _grads_finite(self) -> Tensor:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return torch.ones((), dtype=torch.bool, device=self.device)
        return torch.stack(torch._foreach_norm(grads)).isfinite().all()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = {"skipped_steps": self.skipped_steps, "consecutive_skips": self._consecutive_skips,
                 "micro": self._micro}
        if self._micro:  # mid-way through gradient accumulation: keep what was accumulated
            state["finite"] = self._finite.cpu()
            state["grads"] = {n: p.grad.cpu() for n, p in self.named_parameters() if p.grad is not None}
            if self._load_LE is not None:
                state["load"] = self._load_LE.cpu()
        checkpoint["smk_state"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("smk_state")
        if not state:
            return
        self.skipped_steps = state["skipped_steps"]
        self._consecutive_skips = state["consecutive_skips"]
        self._micro = state.get("micro", 0)
        if self._micro:
            self._finite = state["finite"]
            self._load_LE = state.get("load")
            # Applied by the next training_step: the trainer's restore order would drop .grad set here.
            self._restored_grads = state["grads"]

    def _restore_partial_step(self) -> None:
        """After a mid-accumulation resume: put back what the first micro-batches accumulated."""
        grads, self._restored_grads = self._restored_grads, None
        params = dict(self.named_parameters())
        for n, g in grads.items():
            params[n].grad = g.to(params[n].device, params[n].dtype)
        self._finite = self._finite.to(self.device)
        if self._load_LE is not None:
            self._load_LE = self._load_LE.to(self.device)

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
        metrics_by_layer = {name: smk_metrics(*args) for name, args in targets.items()}
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
        cfg = self.optim_cfg
        router, decay, no_decay = [], [], []
        for name, p in self.named_parameters():
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
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 10_000
        warmup = cfg.warmup_steps

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
