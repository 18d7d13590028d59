"""Lightning callbacks: routing/smk instruments, memory and throughput, text samples."""

from smk_lightning.callbacks.routing import RouterMonitor
from smk_lightning.callbacks.samples import TextSampler
from smk_lightning.callbacks.system import SystemMonitor

__all__ = ["RouterMonitor", "SystemMonitor", "TextSampler"]
