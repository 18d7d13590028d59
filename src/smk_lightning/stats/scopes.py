"""Which (token, expert) entries the statistics are defined on (docs/design.md, scope)."""

from __future__ import annotations

import torch
from torch import Tensor

SCOPES = ("routed", "dense", "probe")


def check_probe_fraction(probe_fraction: float | None) -> None:
    """The one check of the probe share (scope 'probe' needs it; the config checks it always)."""
    if not (probe_fraction is not None and 0 < probe_fraction <= 1):
        raise ValueError(f"stats.probe_fraction={probe_fraction} must be in (0, 1]; use e.g. 0.25 "
                         "(scope 'dense' evaluates every token on every expert)")


def check_scope(scope: str, probe_fraction: float | None = None) -> None:
    if scope not in SCOPES:
        raise ValueError(f"stats scope {scope!r} does not exist; use one of {SCOPES}")
    if scope == "probe":
        check_probe_fraction(probe_fraction)


def routed_mask(topi_NK: Tensor, num_experts: int) -> Tensor:
    mask_NE = torch.zeros(topi_NK.shape[0], num_experts, dtype=torch.bool, device=topi_NK.device)
    return mask_NE.scatter_(1, topi_NK, True)


def probe_count(n: int, probe_fraction: float) -> int:
    """Probe rows of a layer with n rows: round(ρ·n), at least one (a static shape)."""
    return max(1, round(probe_fraction * n))


def probe_index(n: int, probe_fraction: float, generator: torch.Generator | None,
                device: torch.device) -> Tensor:
    """``probe_count(n, ρ)`` distinct random rows of n, as indices [R] on ``device``."""
    perm = torch.randperm(n, generator=generator, device=generator.device if generator else "cpu")
    rows_R = perm[: probe_count(n, probe_fraction)]
    if torch.device(device).type == "cuda":  # from pinned memory the copy does not block the host
        return rows_R.pin_memory().to(device, non_blocking=True)
    return rows_R.to(device)


def scope_mask(topi_NK: Tensor, num_experts: int, scope: str, probe_fraction: float | None = None,
               generator: torch.Generator | None = None, rows_R: Tensor | None = None) -> Tensor:
    """Defined entries [N, E]: routed pairs, every pair, or routed plus dense probe rows
    (``rows_R``, if the caller drew them already with ``probe_index``; else drawn here)."""
    check_scope(scope, probe_fraction)
    mask_NE = routed_mask(topi_NK, num_experts)
    if scope == "dense":
        mask_NE.fill_(True)  # not mask[:] = True: that makes a tensor of the Python True first
    elif scope == "probe":
        if rows_R is None:
            rows_R = probe_index(len(mask_NE), probe_fraction, generator, mask_NE.device)
        mask_NE.index_fill_(0, rows_R, True)  # not mask[rows] = True: on CUDA that copies True to the device and waits
    return mask_NE
