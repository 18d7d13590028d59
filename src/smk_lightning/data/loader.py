"""``StatefulDataLoader`` that also carries the epoch counter of the packed stream, and
every data-parallel rank's position."""

from __future__ import annotations

import time
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torchdata.stateful_dataloader import StatefulDataLoader

from smk_lightning.training.distributed import gather_objects, rank, world_size

_EPOCH_KEY = "smk_next_epoch"
# Under DDP the checkpoint holds every rank's state, in rank order: Lightning writes rank 0's
# checkpoint only, and each rank reads its own stream (a shard of the data).
_RANKS_KEY = "smk_rank_states"


class EpochStatefulDataLoader(StatefulDataLoader):
    """A ``StatefulDataLoader`` whose every fresh pass starts the next epoch of its dataset.

    Worker processes get a fresh copy of the dataset each epoch, so the dataset
    cannot count epochs by itself; this loader counts them, calls
    ``dataset.set_epoch(e)`` before each fresh pass, and stores the counter in its
    ``state_dict`` (Lightning checkpoints it with the rest of the loader state).
    A pass resumed from a loaded state keeps the epoch recorded in the dataset state.

    ``consumer_lag``: how many batches the consumer fetches before it has used them.
    Lightning's training loop prefetches one batch (``_PrefetchDataFetcher``), so
    when it checkpoints, the loader has already yielded the batch that the resumed
    run must train on next; with ``consumer_lag=1`` ``state_dict()`` reports the
    state from before the most recently yielded batch, so resume neither skips nor
    repeats a batch. Use 0 (the default) when iterating the loader directly.
    """

    def __init__(self, *args: Any, consumer_lag: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if consumer_lag not in (0, 1):
            raise ValueError(f"consumer_lag={consumer_lag} is not supported; use 0 or 1.")
        self._smk_next_epoch = 0
        self._smk_lag = consumer_lag
        self._smk_lagged_state: dict[str, Any] | None = None
        #: Seconds the consumer has spent blocked in ``next()`` (the training loop waiting for
        #: data); SystemMonitor logs it as ``throughput/data_wait_frac``.
        self.wait_s = 0.0

    def __iter__(self):
        return self._timed(super().__iter__())

    def _timed(self, it):
        """Yield ``it``'s batches, adding the time spent waiting for each to ``wait_s``; with
        ``consumer_lag`` keep the state from before the most recent batch."""
        while True:
            before = super().state_dict() if self._smk_lag else None
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self._smk_lagged_state = None
                return
            finally:
                self.wait_s += time.perf_counter() - t
            self._smk_lagged_state = before
            yield batch

    def _get_iterator(self):
        if self.next_iter_state is None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self._smk_next_epoch)
            self._smk_next_epoch += 1
        return super()._get_iterator()

    def _own_state_dict(self) -> dict[str, Any]:
        if self._smk_lag and self._smk_lagged_state is not None:
            sd = dict(self._smk_lagged_state)
        else:
            sd = dict(super().state_dict())
        sd[_EPOCH_KEY] = self._smk_next_epoch
        return sd

    def state_dict(self) -> dict[str, Any]:
        """This loader's state; under DDP every rank's (a collective: Lightning gathers the
        checkpoint on every rank together, and writes rank 0's)."""
        sd = self._own_state_dict()
        return sd if world_size() == 1 else {_RANKS_KEY: gather_objects(sd)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        world = world_size()
        states = state_dict.get(_RANKS_KEY, [state_dict])
        if len(states) != world:
            # Another world size reads other shards: no saved position is this rank's. The
            # stream starts its next epoch afresh rather than repeat another rank's data.
            rank_zero_warn(f"the checkpoint's data position was saved by {len(states)} rank(s) and this run has "
                           f"{world}: the data stream starts a fresh epoch instead of resuming mid-epoch")
            self._smk_next_epoch = int(states[0].get(_EPOCH_KEY, 0))  # the epoch after the saved one's
            self._smk_lagged_state = None
            return
        sd = dict(states[rank()])
        if _EPOCH_KEY in sd:
            self._smk_next_epoch = int(sd.pop(_EPOCH_KEY))
        self._smk_lagged_state = None
        super().load_state_dict(sd)
