"""Lightning callbacks: routing/smk instruments, memory and throughput, text samples, Ctrl-C."""

from smk_lightning.callbacks.checkpoint import AtomicCheckpointIO, PeriodicCheckpoint
from smk_lightning.callbacks.console import ParamSummary, ProgressLines, StepProgressBar
from smk_lightning.callbacks.final_validation import ValidateLastStep
from smk_lightning.callbacks.interrupt import GracefulInterrupt
from smk_lightning.callbacks.routing import RouterMonitor
from smk_lightning.callbacks.samples import TextSampler
from smk_lightning.callbacks.system import SystemMonitor

__all__ = ["AtomicCheckpointIO", "GracefulInterrupt", "ParamSummary", "PeriodicCheckpoint", "ProgressLines",
           "RouterMonitor", "StepProgressBar", "SystemMonitor", "TextSampler", "ValidateLastStep"]
