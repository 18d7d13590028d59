"""PurgeAfterResume: after a resume, each TensorBoard step holds the resumed run's values only.

A fit resumed from ``last.ckpt`` logs into its run directory again (``smk fit --ckpt_path
last``). A process killed after that checkpoint had already logged some later steps; the
resumed one logs them again. TensorBoard's remedy is a ``SessionLog.START`` event at the
first step the new process logs (what ``SummaryWriter(purge_step=...)`` writes): readers
hide the older events from that step on. The step is read when the first batch starts,
because Lightning's restart arithmetic for the logger step (``_batches_that_stepped``)
depends on where in the loop the checkpoint was written.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger


def purge_from(writer, step: int) -> None:
    """Mark ``step`` as a restart in a ``torch.utils.tensorboard.SummaryWriter``'s event file."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer._get_file_writer().add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))


class PurgeAfterResume(L.Callback):
    def __init__(self) -> None:
        self._pending = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._pending = bool(trainer.ckpt_path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._pending:
            return
        self._pending = False
        if not trainer.is_global_zero:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step this batch is logged at
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                purge_from(logger.experiment, step)
