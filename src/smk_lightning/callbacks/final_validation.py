"""ValidateLastStep: the final optimizer step is always validated.

Validation runs every ``val_check_interval`` batches; when ``max_steps`` is not a multiple
of it, the run ended with a stale ``val/loss`` (up to an interval old). Lightning already
validates after the batch on which ``trainer.should_stop`` is set (its early-stopping
path: same global step, same logger, ModelCheckpoint's ``on_validation_end``); raising the
flag on the batch that reaches ``max_steps`` reuses it. It never adds a second validation:
Lightning decides once per batch.
"""

from __future__ import annotations

import lightning as L


class ValidateLastStep(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        max_steps = trainer.max_steps
        if (max_steps and max_steps > 0 and trainer.global_step >= max_steps
                and pl_module.step_state.boundary):
            trainer.should_stop = True
