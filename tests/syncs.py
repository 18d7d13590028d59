"""A host-sync detector that runs on the CPU: a ``TorchDispatchMode`` that records every op
which, on a CUDA tensor, makes the host wait for the device — reading a value
(``.item()``, ``bool()``, ``int()``, ``.tolist()``: ``aten._local_scalar_dense``), or an op
whose output shape depends on the data (``nonzero``, boolean indexing, ``masked_select``,
``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``).

It also records tensors made from Python data (``torch.tensor(x, device=...)``,
``new_tensor``, a float given to Lightning's ``self.log``: ``aten.lift_fresh``), which on a
GPU are blocking host→device copies — a Python scalar assigned by indexing too
(``mask[rows] = True``: CUDA's index_put_ copies the 0-dim value to the device and waits,
seen on an H100; ``index_fill_``/``masked_fill_`` take the scalar as a kernel argument). On
the CPU it cannot tell ``torch.tensor(x)`` (a CPU tensor, harmless) from ``torch.tensor(x, device=cuda)``: code
that wants a CPU scalar tensor makes it with a factory (``torch.scalar_tensor``).

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


SKIP_FRAMES = ("torch/utils/_python_dispatch", "torch/_dynamo/", "torch/_compile.py")


def _where() -> str:
    """The innermost frames outside torch's dispatch machinery and this file, for messages."""
    frames = [f for f in traceback.extract_stack()[:-2]
              if not any(k in f.filename for k in SKIP_FRAMES) and not f.filename.endswith("syncs.py")]
    return " ← ".join(f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno}" for f in reversed(frames[-4:]))


class HostSyncs(TorchDispatchMode):
    """``with HostSyncs() as s: ...`` → ``s.hits``: [(op, where)] of every would-be sync (the
    project's code takes the same path on every device, so this is what a GPU would run)."""

    def __init__(self) -> None:
        super().__init__()
        self._syncs: list[tuple[str, str]] = []
        self._lifted: dict[int, tuple[str, str]] = {}  # tensors made from Python data, not yet excused

    @property
    def hits(self) -> list[tuple[str, str]]:
        return self._syncs + list(self._lifted.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        sync = func in SYNC_OPS
        if func in INDEX_OPS:
            sync = any(i is not None and i.dtype == torch.bool for i in args[1])
            if len(args) > 2 and id(args[2]) in self._lifted:  # x[i] = 1.0: copied to the device, a wait
                self._lifted[id(args[2])] = (f"{func} of a Python scalar (use index_fill_)", _where())
        if sync:
            self._syncs.append((str(func), _where()))
        out = func(*args, **(kwargs or {}))
        if func is aten.lift_fresh.default:
            self._lifted[id(out)] = ("aten.lift_fresh (tensor from Python data)", _where())
        return out
