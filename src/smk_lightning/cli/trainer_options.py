"""Trainer options that ``smk fit --help`` offers but SMKModule cannot honour as Lightning means them.

The module optimises manually (the statistics slot in between its backward and its
optimizer step), so Lightning refuses its own gradient clipping and accumulation with a
traceback; the same settings live in ``model.optim``. Sharded strategies split an
expert's weights across devices, but M_A / M_G need each expert's whole weights; and the
"true" half precisions keep no float32 master weights; ``barebones`` turns off the logger,
checkpoints and monitors. Each case is mapped (with a warning) or refused with one line
naming the option to use, before anything runs.
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

from smk_lightning.errors import ConfigError

_DDP_CLASSES = ("DDPStrategy", "SingleDeviceStrategy")
_PRECISIONS = {"32": "32-true", "32-true": "32-true", "64": "64-true", "64-true": "64-true",
               "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "16": "16-mixed", "16-mixed": "16-mixed"}

# ``smk fit --help`` text of the trainer options whose values smk restricts (instead of
# Lightning's, which lists values smk refuses)
RESTRICTED_HELP = {
    "trainer.precision": "32-true (default), bf16-mixed, 64-true, or 16-mixed on a CUDA GPU (aliases: "
                         + ", ".join(k for k, v in _PRECISIONS.items() if k != v) + "); other values are refused",
    "trainer.strategy": "auto (default), or ddp / ddp_spawn (and their variants) for several devices; sharded "
                        "strategies (FSDP, DeepSpeed, ...) are refused: the statistics need each expert's whole weights",
}


def map_optim_options(cfg) -> None:
    """``trainer.gradient_clip_val`` → ``model.optim.grad_clip`` and ``trainer.accumulate_grad_batches``
    → ``model.optim.accumulate_grad_batches`` (with a warning); ``gradient_clip_algorithm=value`` is refused."""
    trainer, optim = cfg.trainer, cfg.model.optim
    algorithm = trainer.get("gradient_clip_algorithm")
    if algorithm is not None and str(algorithm).lower() != "norm":
        raise ConfigError(f"trainer.gradient_clip_algorithm={algorithm} is not supported: smk clips the global "
                          "gradient norm; set the limit with --model.optim.grad_clip (0 disables)")
    trainer.gradient_clip_algorithm = None
    clip = trainer.get("gradient_clip_val")
    if clip is not None:
        rank_zero_warn(f"trainer.gradient_clip_val={clip} is applied as model.optim.grad_clip (the module clips "
                       "its own gradients); use --model.optim.grad_clip")
        optim.grad_clip = float(clip)
        trainer.gradient_clip_val = None
    accum = trainer.get("accumulate_grad_batches")
    if accum is not None and accum != 1:
        rank_zero_warn(f"trainer.accumulate_grad_batches={accum} is applied as model.optim.accumulate_grad_batches "
                       "(the module accumulates itself); use --model.optim.accumulate_grad_batches")
        optim.accumulate_grad_batches = int(accum)
        trainer.accumulate_grad_batches = 1
    _count_optimizer_steps(trainer, optim.accumulate_grad_batches)


def _count_optimizer_steps(trainer, accum: int) -> None:
    """Lightning counts an integer ``val_check_interval`` and ``log_every_n_steps`` in batches;
    under the module's own accumulation a batch is a micro-batch. Both are multiplied by
    ``accum`` so that they count optimizer steps, as ``max_steps`` and every callback do."""
    if accum <= 1:
        return
    if isinstance(trainer.get("val_check_interval"), int):
        trainer.val_check_interval *= accum
    trainer.log_every_n_steps = (trainer.get("log_every_n_steps") or 50) * accum


def check_barebones(barebones) -> None:
    """``barebones`` turns off what an smk run is made of (Lightning then refuses its logger
    with a traceback): refused in one line, pointing to the benchmark for raw step speed."""
    if barebones:
        raise ConfigError(f"trainer.barebones={barebones} is not supported: it turns off the logger, checkpoints "
                          "and monitors an smk run consists of; to time bare training steps use smk-bench")


def check_strategy(strategy) -> None:
    """Single device or DDP only."""
    if strategy is None:
        return
    if isinstance(strategy, str):
        name, ok = strategy, strategy == "auto" or strategy.startswith("ddp") or strategy == "single_device"
    else:  # a class_path namespace or an instance
        class_path = strategy.get("class_path") if hasattr(strategy, "get") else type(strategy).__qualname__
        name = str(class_path).rsplit(".", 1)[-1]
        ok = name in _DDP_CLASSES
    if not ok:
        raise ConfigError(f"trainer.strategy={name} is not supported: the statistics need each expert's whole "
                          "weights on every device; use --trainer.strategy ddp (or auto on one device)")


def _on_cuda(accelerator) -> bool:
    acc = str(accelerator if accelerator is not None else "auto").lower()
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def check_accelerator(accelerator) -> None:
    """``gpu`` / ``cuda`` without a visible CUDA device (Lightning: "No supported gpu backend found!")."""
    if str(accelerator).lower() in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator}: no CUDA GPU is visible to torch; "
                          "use --trainer.accelerator cpu (or auto)")


def check_precision(precision, accelerator) -> None:
    """32-true, 64-true, bf16-mixed; 16-mixed on a CUDA GPU."""
    if precision is None:
        return
    key = str(precision).lower()
    canonical = _PRECISIONS.get(key)
    if canonical is None:
        raise ConfigError(f"trainer.precision={precision} is not supported (the optimizer and the statistics need "
                          "float32 master weights); use --trainer.precision bf16-mixed (or 32-true)")
    if canonical == "16-mixed" and not _on_cuda(accelerator):
        raise ConfigError(f"trainer.precision={precision} needs a CUDA GPU; on this device use "
                          "--trainer.precision bf16-mixed or 32-true")


def check_compile(compile_model: bool, precision) -> None:
    """float64 runs the experts as a per-expert loop, which a compiled block cannot hold."""
    if compile_model and _PRECISIONS.get(str(precision).lower()) == "64-true":
        raise ConfigError(f"model.compile=true with trainer.precision={precision} is not supported (grouped "
                          "experts run in float32, bf16 or fp16); use 32-true or bf16-mixed, or model.compile=false")
