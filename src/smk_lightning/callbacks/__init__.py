"""Lightning callbacks: routing/smk instruments, memory and throughput, text samples, Ctrl-C."""

from smk_lightning.callbacks.interrupt import GracefulInterrupt
from smk_lightning.callbacks.routing import RouterMonitor
from smk_lightning.callbacks.samples import TextSampler
from smk_lightning.callbacks.system import SystemMonitor

__all__ = ["GracefulInterrupt", "RouterMonitor", "SystemMonitor", "TextSampler"]
