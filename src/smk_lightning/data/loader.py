"""``StatefulDataLoader`` that also carries the epoch counter of the packed stream."""

from __future__ import annotations

from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

_EPOCH_KEY = "smk_next_epoch"


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

    def __iter__(self):
        it = super().__iter__()
        if self._smk_lag == 0:
            return it
        return self._lagged(it)

    def _lagged(self, it):
        while True:
            before = super().state_dict()
            try:
                batch = next(it)
            except StopIteration:
                self._smk_lagged_state = None
                return
            self._smk_lagged_state = before
            yield batch

    def _get_iterator(self):
        if self.next_iter_state is None and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self._smk_next_epoch)
            self._smk_next_epoch += 1
        return super()._get_iterator()

    def state_dict(self) -> dict[str, Any]:
        if self._smk_lag and self._smk_lagged_state is not None:
            sd = dict(self._smk_lagged_state)
        else:
            sd = dict(super().state_dict())
        sd[_EPOCH_KEY] = self._smk_next_epoch
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        if _EPOCH_KEY in sd:
            self._smk_next_epoch = int(sd.pop(_EPOCH_KEY))
        self._smk_lagged_state = None
        super().load_state_dict(sd)
