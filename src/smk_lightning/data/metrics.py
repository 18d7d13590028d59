"""Token statistics used to put validation loss in context."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def unigram_entropy(token_ids: Iterable[int] | torch.Tensor) -> float:
    """Entropy (nats) of the empirical unigram distribution of ``token_ids``.

    This is the loss of the best context-free predictor; a language model's
    validation loss far below it means the model learned contextual structure.
    """
    ids = token_ids if isinstance(token_ids, torch.Tensor) else torch.as_tensor(list(token_ids))
    ids = ids.reshape(-1).long()
    if ids.numel() == 0:
        raise ValueError("unigram_entropy got no tokens; pass a non-empty sequence of token ids.")
    counts = torch.bincount(ids).double()
    p = counts[counts > 0] / ids.numel()
    h = float(-(p * p.log()).sum())
    return max(h, 0.0)
