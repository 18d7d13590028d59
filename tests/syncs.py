"""A host-sync detector that runs on the CPU: a ``TorchDispatchMode`` that records every op
which, on a CUDA tensor, makes the host wait for the device — reading a value
(``.item()``, ``bool()``, ``int()``, ``.tolist()``: ``aten._local_scalar_dense``), or an op
whose output shape depends on the data (``nonzero``, boolean indexing, ``masked_select``,
``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``).

On the CPU nothing waits, so a test can prove the *code* has no such op where a GPU run would
pay for one. Copies to the host (``.cpu()``) are invisible here (CPU to CPU); the GPU test
in ``test_syncs.py`` covers them where a GPU is present.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.bincount.default, aten.repeat_interleave.Tensor, aten.equal.default, aten.is_nonzero.default,
            aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}
INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


def _where() -> str:
    """The innermost frames outside torch's dispatch machinery and this file, for messages."""
    frames = [f for f in traceback.extract_stack()[:-2]
              if "torch/utils/_python_dispatch" not in f.filename and not f.filename.endswith("syncs.py")]
    return " ← ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                      for f in reversed(frames[-4:]))


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as s: ...`` → ``s.hits``: [(op, where)] of every would-be sync."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sync = func in SYNC_OPS
        if func in INDEX_OPS:
            sync = any(i is not None and i.dtype == torch.bool for i in args[1])
        if sync:
            self.hits.append((str(func), _where()))
        return func(*args, **(kwargs or {}))
