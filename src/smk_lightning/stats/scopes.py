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
    """The routed entries ``[..., N, E]`` of ``topi_NK`` ``[..., N, K]``."""
    mask_NE = torch.zeros(*topi_NK.shape[:-1], num_experts, dtype=torch.bool, device=topi_NK.device)
    return mask_NE.scatter_(-1, topi_NK, True)


def probe_count(n: int, probe_fraction: float) -> int:
    """Probe rows of a layer with n rows: round(ρ·n), at least one (a static shape)."""
    return max(1, round(probe_fraction * n))


def probe_rows(n: int, probe_fraction: float, generators: list[torch.Generator | None],
               device: torch.device) -> Tensor:
    """``probe_count(n, ρ)`` distinct random rows of n for each generator (drawn on the
    CPU), as indices ``[len(generators), R]`` on ``device``, copied without blocking."""
    rows_LR = torch.stack([torch.randperm(n, generator=g)[: probe_count(n, probe_fraction)] for g in generators])
    if torch.device(device).type == "cuda":  # from pinned memory the copy does not block the host
        return rows_LR.pin_memory().to(device, non_blocking=True)
    return rows_LR.to(device)


def probe_index(n: int, probe_fraction: float, generator: torch.Generator | None,
                device: torch.device) -> Tensor:
    """``probe_count(n, ρ)`` distinct random rows of n, as indices [R] on ``device``."""
    return probe_rows(n, probe_fraction, [generator], device)[0]


def scope_mask(topi_NK: Tensor, num_experts: int, scope: str, probe_fraction: float | None = None,
               generator: torch.Generator | None = None, rows_R: Tensor | None = None) -> Tensor:
    """Defined entries ``[..., N, E]``: routed pairs, every pair, or routed plus dense probe
    rows (``rows_R`` ``[..., R]``, if the caller drew them already with ``probe_rows``; else
    drawn here, for an ``[N, K]`` ``topi_NK``)."""
    check_scope(scope, probe_fraction)
    mask_NE = routed_mask(topi_NK, num_experts)
    if scope == "dense":
        mask_NE.fill_(True)  # not mask[:] = True: that makes a tensor of the Python True first
    elif scope == "probe":
        if rows_R is None:
            rows_R = probe_index(mask_NE.shape[-2], probe_fraction, generator, mask_NE.device)
        # a scatter, not mask[rows] = True: on CUDA that copies True to the device and waits
        mask_NE.scatter_(-2, rows_R.unsqueeze(-1).expand(*rows_R.shape, num_experts), True)
    return mask_NE
