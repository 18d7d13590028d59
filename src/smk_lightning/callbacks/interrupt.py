"""GracefulInterrupt: Ctrl-C finishes the current step, saves the checkpoints and stops.

Python's default Ctrl-C raises KeyboardInterrupt wherever the main thread happens to be,
and we saw it lost inside library code (the run went on). A handler that only sets a
flag cannot be lost: the trainer stops at the next step boundary, ModelCheckpoint writes
``last.ckpt`` as at any end of training, and ``smk`` exits with status 130. A second
Ctrl-C restores the default handler and interrupts at once (Lightning then still saves a
checkpoint, ``checkpoint.save_on_exception``).
"""

from __future__ import annotations

import signal
import sys
import threading

import lightning as L


class GracefulInterrupt(L.Callback):
    def __init__(self, enabled: bool = True) -> None:
        """Ctrl-C handling.

        Args:
            enabled: Stop at the next step boundary with a checkpoint on the first Ctrl-C.
        """
        self.enabled = enabled
        self.requested = False
        self._previous = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second Ctrl-C: abort now
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        sys.stderr.write("\nsmk: Ctrl-C — stopping after this step and saving a checkpoint "
                         "(Ctrl-C again to abort at once)\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.requested:
            trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
