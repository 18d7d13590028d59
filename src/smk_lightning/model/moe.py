"""Mixture-of-Experts feed-forward layer with sorted, per-expert-contiguous dispatch.

Shape legend (used as name suffixes):
    N  tokens (batch × seq_len, flattened)     D  d_model        F  d_ff (expert hidden)
    E  experts                                 K  top_k          P  routed (token, expert) pairs = N·K

Every (token, expert) pair is sorted by expert, so each expert's tokens are one
contiguous block of rows and no expert is evaluated on a token it was not routed to.
The experts then run as grouped GEMMs (``model/grouped.py``: torch's grouped_mm with per-expert
row offsets kept on the device, torchtitan style: no host sync) or, where grouped_mm
cannot run (float64, row widths that are not a multiple of 16 bytes, a torch without it),
as one matmul per expert on its block (``expert_impl``, see ``resolve_expert_impl``).

For the statistics engines (``smk_lightning.stats``) the layer can keep, for the
current step only, what the closed-form ("ghost") norms need: the routing, row norms
of the experts' outputs and hidden activations and — as gradients of zero "sink" leaves,
out of the autograd graph itself — those of their gradients in the normal backward and
the upstream gradient ḡ (see ``Capture``). Capture is off unless ``capture_stats`` is set
(the model then makes the sinks), and ``clear_capture()`` drops every reference.

``compute`` is the forward as a pure function (it returns what the trainer reads instead
of writing attributes), so the model's forward compiles as one graph; ``forward`` =
``compute`` + ``record``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smk_lightning.model.experts import get_expert_kind, sqnorm
from smk_lightning.model.grouped import GROUPED_MM, grouped_mm_op
from smk_lightning.model.precision import acc_dtype, to_acc

EXPERT_IMPLS = ("auto", "grouped", "loop")
_GROUPED_MM = GROUPED_MM  # eager: torch's own op and autograd (model/grouped.py)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_unsupported(dtype: torch.dtype, *widths: int) -> str | None:
    """Why grouped_mm cannot multiply expert rows of these widths in ``dtype`` (None if it can)."""
    if _GROUPED_MM is None:
        return f"torch {torch.__version__} has no grouped_mm"
    if dtype not in _GROUPED_DTYPES:
        return f"grouped_mm does not take {dtype} (float32, bfloat16 and float16 only)"
    # The kernels (CPU and CUDA) refuse strides that are not a multiple of 16 bytes.
    bad = [w for w in widths if w * dtype.itemsize % 16]
    if bad:
        return f"grouped_mm needs row widths of a multiple of 16 bytes; {bad} in {dtype} are not"
    return None


def resolve_expert_impl(impl: str, dtype: torch.dtype, *widths: int) -> bool:
    """True: run the experts as grouped GEMMs; False: one matmul per expert.

    ``auto`` takes grouped_mm wherever it can run (``grouped_mm_unsupported``) and the loop
    otherwise (float64, e.g.); ``grouped`` raises where it cannot.
    """
    if impl == "loop":
        return False
    why = grouped_mm_unsupported(dtype, *widths)
    if impl == "grouped" and why is not None:
        raise ValueError(f"model.expert_impl='grouped' cannot run these experts: {why}; "
                         "set model.expert_impl to 'auto' (grouped where possible, loop otherwise) or 'loop'")
    return why is None


@dataclass
class ExpertGroups:
    """How rows sorted by expert split into experts, and how ``mm`` multiplies each expert's
    block of rows by that expert's weight: one grouped GEMM, or one matmul per expert."""

    offs_E: Tensor | None  # int32 end offsets on the device (grouped)
    sizes: list[int] | None  # rows per expert as Python ints (loop)

    @classmethod
    def of(cls, counts_E: Tensor, grouped: bool) -> ExpertGroups:
        if grouped:
            return cls(offs_E=counts_E.cumsum(0).to(torch.int32), sizes=None)
        # HOST SYNC (loop path only): split() needs the per-expert sizes as Python ints.
        return cls(offs_E=None, sizes=counts_E.tolist())

    def mm(self, a_PX: Tensor, w_EXY: Tensor) -> Tensor:
        """``[P, X] × [E, X, Y] → [P, Y]``, rows of expert e times ``w_EXY[e]``."""
        if self.offs_E is not None:
            if torch.compiler.is_compiling():
                return grouped_mm_op(a_PX, w_EXY, self.offs_E)
            return _GROUPED_MM(a_PX, w_EXY, offs=self.offs_E)
        # unbind, not w[e]: the backward then stacks E gradients once instead of adding E
        # full-size [E, X, Y] tensors that are zero but for one expert.
        return torch.cat([a @ w for a, w in zip(a_PX.split(self.sizes), w_EXY.unbind(0))])


@dataclass
class Routing:
    """The routing decision of one forward pass (no autograd graph)."""

    topi_NK: Tensor  # selected experts, by decreasing probability
    order_P: Tensor  # pair permutation that sorts the flattened (token, slot) pairs by expert
    counts_E: Tensor  # pairs per expert (int64, on the device: reading it is a host sync)


@dataclass
class Capture:
    """What one forward/backward pass leaves for the statistics of the same step.

    Per routed pair (rows in sorted-pair order) the forward stores ‖y‖ and ‖h‖². What the
    statistics need from the backward comes out of the autograd graph itself, as the
    gradients of two zero "sink" leaves (``Sinks``), so it is the same eager, compiled and
    in a captured CUDA graph: ``sink_ND.grad`` is ḡ (``out + sink_ND``), and
    ``sink_PS.grad[:, s]`` the squared row norms of the gradient of pre-activation s (u, v),
    i.e. w²‖g_u‖², w²‖g_v‖² with w the pair's combine weight (``tap``). No extra matmul, no
    per-token gradient, no tensor hook. A backward that did not reach a sink (e.g.
    ``autograd.grad`` without the sinks among its inputs) leaves its ``.grad`` None, and
    ``missing_grads()`` names it instead of the statistics silently reading a zero.
    """

    x_ND: Tensor  # layer input (detached)
    weights_NK: Tensor  # combine weights (detached)
    routing: Routing
    ma_P: Tensor  # ‖f_e(x_t)‖, float32+
    hsq_P: Tensor  # ‖h‖², float32+
    sinks: Sinks
    grad_scale: float | Tensor = 1.0  # multiplies the captured gradients (→ ∂L_sum/∂o, docs/design.md)
    dropped_pairs: Tensor | None = None  # set by the statistics (stats.ghost.ghost_step)

    def missing_grads(self) -> list[str]:
        return [name for name, t in (("sink_ND", self.sinks.out_ND), ("sink_PS", self.sinks.pre_PS))
                if t.grad is None]

    @property
    def grad_ND(self) -> Tensor:
        """∂L/∂o of the loss that was differentiated (unscaled)."""
        return self.sinks.out_ND.grad

    @property
    def gusq_P(self) -> Tensor:
        """‖∂L/∂u‖² = w²‖g_u‖² (mean-loss gradient)."""
        return self.sinks.pre_PS.grad[:, 0]

    @property
    def gvsq_P(self) -> Tensor:
        """‖∂L/∂v‖² = w²‖g_v‖² (zeros for a kind with one input projection, GELU)."""
        g_PS = self.sinks.pre_PS.grad
        return g_PS[:, 1] if g_PS.shape[1] > 1 else torch.zeros_like(g_PS[:, 0])

    def upstream(self, dtype: torch.dtype, rows: Tensor | None = None) -> Tensor:
        """ḡ = ∂L_sum/∂o of the given rows (all if None) in ``dtype`` (docs/design.md)."""
        g = self.grad_ND if rows is None else self.grad_ND[rows]
        return g.to(dtype) * self.grad_scale


@dataclass
class Sinks:
    """The zero leaves whose gradients carry the backward's part of the statistics (see
    ``Capture``). Made outside the layer's (possibly compiled) forward and passed in: a leaf
    that requires grad cannot be created inside a compiled region."""

    out_ND: Tensor  # [N, D], float32+: ``out + sink`` so its gradient is ḡ
    pre_PS: Tensor  # [P, S], float32+: S pre-activations (u, v) per routed pair

    @classmethod
    def new(cls, n_tokens: int, d_model: int, pairs: int, n_pre: int, like: Tensor) -> Sinks:
        dt = acc_dtype(like)
        return cls(torch.zeros(n_tokens, d_model, dtype=dt, device=like.device, requires_grad=True),
                   torch.zeros(pairs, n_pre, dtype=dt, device=like.device, requires_grad=True))

    def tensors(self) -> list[Tensor]:
        return [self.out_ND, self.pre_PS]


class _Tap(torch.autograd.Function):
    """Identity on the pre-activations whose backward also returns their gradients' squared
    row norms (float32+) as the gradient of the zero sink ``[P, S]``. Pure: no in-place op in
    the forward, no side effect in the backward, so it traces under torch.compile."""

    @staticmethod
    def forward(sink_PS: Tensor, *pre: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in pre)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.acc = inputs[0].dtype

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor, ...]:
        return (torch.stack([sqnorm(g, ctx.acc) for g in grads], dim=-1), *grads)


def tap(sink_PS: Tensor, pre: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The pre-activations, unchanged, with their gradients' row norms routed to ``sink_PS``."""
    return _Tap.apply(sink_PS, *pre)


def route(logits_NE: Tensor, top_k: int, renormalize: bool,
          bias_E: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax → top-k → (optionally) renormalised combine weights.

    ``bias_E`` (aux-loss-free balancing) is added to the probabilities for the top-k
    choice only; the combine weights are the unbiased probabilities of the chosen experts.
    Returns (probs_NE, weights_NK, topi_NK); probabilities are computed in float32 at least.
    """
    probs_NE = to_acc(logits_NE).softmax(dim=-1)
    if bias_E is None:
        topw_NK, topi_NK = probs_NE.topk(top_k, dim=-1)
    else:
        topi_NK = (probs_NE.detach() + bias_E.to(probs_NE.dtype)).topk(top_k, dim=-1).indices
        topw_NK = probs_NE.gather(1, topi_NK)
    if renormalize:
        topw_NK = topw_NK / topw_NK.sum(dim=-1, keepdim=True)
    return probs_NE, topw_NK, topi_NK


def check_expert_impl(impl: str, prefix: str = "") -> None:
    """The one check of the expert path name (the config and the layer both call it)."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"{prefix}expert_impl={impl!r} is not supported; use one of {EXPERT_IMPLS}")


def check_top_k(top_k: int, num_experts: int, prefix: str = "") -> None:
    """The one check of top_k (the config and the layer both call it)."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"{prefix}top_k={top_k} must be between 1 and {prefix}num_experts={num_experts}; "
                         "lower top_k or add experts")


def expert_counts(idx: Tensor, num_experts: int) -> Tensor:
    """How often each expert occurs in ``idx`` (any shape): int64 ``[E]`` on its device.
    scatter_add_, not bincount: CUDA bincount reads the input's max on the host (a sync)."""
    flat = idx.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def sort_pairs(topi_NK: Tensor, num_experts: int) -> Routing:
    """Sort the N·K (token, slot) pairs by expert; token of sorted pair p is order_P[p] // K."""
    flat_P = topi_NK.reshape(-1)
    order_P = flat_P.argsort(stable=True)
    return Routing(topi_NK=topi_NK, order_P=order_P, counts_E=expert_counts(flat_P, num_experts))


class MoELayer(nn.Module):
    """Top-k routed MoE feed-forward: ``[N, D] → [N, D]`` (``[B, T, D]`` accepted too).

    Experts are stacked: the input projections of the expert kind (``model/experts.py``:
    ``w1 [E, D, F]`` and, for SwiGLU, ``w3 [E, D, F]``; ``w3`` is None for GELU) and
    ``w2 [E, F, D]``; expert ``e`` computes ``kind.forward((w1[e], w3[e], w2[e]), x)``, i.e.
    ``(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]`` (GELU: ``gelu(x @ w1[e]) @ w2[e]``).
    ``router`` is ``nn.Linear(D, E, bias=False)``.
    ``expert_impl`` picks grouped GEMMs or a per-expert loop (``resolve_expert_impl``); both
    compute the same function and leave the same statistics capture.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        activation: str = "swiglu",
        renormalize: bool = True,
        expert_impl: str = "auto",
    ) -> None:
        super().__init__()
        check_expert_impl(expert_impl)
        self.kind = get_expert_kind(activation)
        check_top_k(top_k, num_experts)
        self.d_model, self.d_ff = d_model, d_ff
        self.num_experts, self.top_k = num_experts, top_k
        self.activation, self.renormalize = activation, renormalize
        self.expert_impl = expert_impl
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.w3 = None  # for kinds without it (GELU)
        for name in self.kind.in_names:
            setattr(self, name, nn.Parameter(torch.empty(num_experts, d_model, d_ff)))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        # Decoupled routing: the combine weights use a detached router weight (the main loss
        # still reaches x through them, never the router), and the router losses see logits
        # recomputed from the detached input, so they train the router and nothing else.
        self.detach_router = False
        # Statistics capture for the current step (see module docstring).
        self.capture_stats = False
        self.capture: Capture | None = None
        # Router outputs of the last forward: for the router losses (with graph until
        # ``release_graph``) and the routing metrics.
        self.last_logits_NE: Tensor | None = None
        self.last_probs_NE: Tensor | None = None
        self.last_topi_NK: Tensor | None = None
        # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias on the scores for the top-k
        # choice only; a buffer, so it is checkpointed. None unless ``enable_score_bias()``.
        self.register_buffer("score_bias_E", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=0.02)
        for w in self.in_weights():
            nn.init.normal_(w, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(self.d_ff))

    def enable_score_bias(self) -> None:
        """Add the aux-loss-free balancing bias (zeros; the trainer nudges it after each step)."""
        self.register_buffer("score_bias_E", torch.zeros(self.num_experts, device=self.w1.device))

    def in_weights(self) -> tuple[Tensor, ...]:
        """The stacked input projections ``[E, D, F]``, in ``kind.in_names`` order."""
        return tuple(getattr(self, n) for n in self.kind.in_names)

    def expert_params(self, dt: torch.dtype, e: int | Tensor | None = None) -> tuple[Tensor, ...]:
        """``(*w_in, w2)`` detached in dtype ``dt``: stacked ``[E, ·, ·]``, or of expert(s) ``e``
        (an int, or an index tensor for one expert per row) — ``kind.forward``'s parameters."""
        ws = (*self.in_weights(), self.w2)
        return tuple((w if e is None else w[e]).detach().to(dt) for w in ws)

    def router_logits(self, x_ND: Tensor) -> Tensor:
        """Logits that route the tokens (and carry the main loss's gradient, if any)."""
        weight = self.router.weight.detach() if self.detach_router else self.router.weight
        return F.linear(x_ND, weight)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, D] → [N, D]`` (``[B, T, D]`` too). With ``capture_stats`` on (and grad
        enabled) the layer makes its own sinks and keeps the step's ``capture``."""
        sinks = None
        if self.capture_stats and torch.is_grad_enabled():
            sinks = self.new_sinks(x.numel() // self.d_model, x)
        out, aux = self.compute(x, sinks)
        self.record(aux, sinks)
        return out

    def new_sinks(self, n_tokens: int, like: Tensor) -> Sinks:
        """Zero sinks for a forward on ``n_tokens`` tokens, in ``like``'s accumulation dtype and device."""
        return Sinks.new(n_tokens, self.d_model, n_tokens * self.top_k, len(self.kind.in_names), like)

    def compute(self, x: Tensor, sinks: Sinks | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The forward as a pure function (it writes no attribute, so it compiles whole):
        the output and what the trainer reads of this forward (``record``): the router's
        outputs and, with ``sinks``, the forward's part of the capture."""
        shape = x.shape
        x_ND = x.reshape(-1, self.d_model)
        logits_NE = self.router_logits(x_ND)
        probs_NE, weights_NK, topi_NK = route(logits_NE, self.top_k, self.renormalize, self.score_bias_E)
        routing = sort_pairs(topi_NK.detach(), self.num_experts)
        if self.detach_router and torch.is_grad_enabled():
            logits_NE = self.router(x_ND.detach())  # the router losses' view (see __init__)
            probs_NE = logits_NE.to(probs_NE.dtype).softmax(dim=-1)
        aux = {"logits_NE": logits_NE, "probs_NE": probs_NE, "topi_NK": routing.topi_NK,
               "order_P": routing.order_P, "counts_E": routing.counts_E}

        tok_P = routing.order_P // self.top_k
        xs_PD = x_ND[tok_P]
        w_in, w2_EFD = self.in_weights(), self.w2
        cdt = self._compute_dtype(xs_PD)
        # P = 0 (an empty batch) is the loop's: grouped_mm refuses empty operands.
        grouped = resolve_expert_impl(self.expert_impl, cdt, self.d_model, self.d_ff) and len(tok_P) > 0
        if grouped:  # grouped_mm has no autocast rule (CPU) where the loop's x @ w has one: cast here
            xs_PD, w2_EFD = xs_PD.to(cdt), w2_EFD.to(cdt)
            w_in = tuple(w.to(cdt) for w in w_in)
        groups = ExpertGroups.of(routing.counts_E, grouped)
        # The experts' matmuls on their contiguous row blocks; the activation runs once over all pairs.
        # One grouped GEMM per input projection (u and v, as torchtitan), not one on cat(w1, w3):
        # the cat copies the weights every forward and measured slower on CPU (BENCHMARKS.md).
        pre = tuple(groups.mm(xs_PD, w) for w in w_in)
        if sinks is not None:
            pre = tap(sinks.pre_PS, pre)
        _, h_PF = self.kind.activations(pre)
        ys_PD = groups.mm(h_PF, w2_EFD)
        if sinks is not None:
            acc = acc_dtype(ys_PD)
            aux |= {"x_ND": x_ND.detach(), "weights_NK": weights_NK.detach(),
                    "ma_P": torch.linalg.vector_norm(ys_PD.detach(), dim=-1, dtype=acc),
                    "hsq_P": sqnorm(h_PF.detach(), acc)}

        # Unsort: pair p of the flattened (token, slot) order sits at position order_P^-1.
        y_PD = torch.empty_like(ys_PD).index_copy_(0, routing.order_P, ys_PD)
        out_ND = (y_PD.view(-1, self.top_k, self.d_model) * weights_NK.unsqueeze(-1).to(y_PD.dtype)).sum(1)
        if sinks is not None:
            out_ND = out_ND + sinks.out_ND  # zero; its gradient is ḡ
        return out_ND.view(shape), aux

    def record(self, aux: dict[str, Tensor], sinks: Sinks | None) -> None:
        """Keep what ``compute`` returned: the router outputs (for the router losses and the
        monitors) and, with sinks, the step's ``capture``."""
        self.last_logits_NE, self.last_probs_NE, self.last_topi_NK = aux["logits_NE"], aux["probs_NE"], aux["topi_NK"]
        if sinks is not None:
            routing = Routing(aux["topi_NK"], aux["order_P"], aux["counts_E"])
            self.capture = Capture(aux["x_ND"], aux["weights_NK"], routing, aux["ma_P"], aux["hsq_P"], sinks)

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the experts' matmuls run in: autocast's where it is on (as ``x @ w``
        would; float64 is never autocast), else the inputs' common dtype."""
        dt = torch.promote_types(x.dtype, self.w1.dtype)
        dev = x.device.type
        if dt != torch.float64 and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return dt

    def release_graph(self) -> None:
        """Detach the kept router outputs so no autograd graph outlives the step."""
        if self.last_logits_NE is not None:
            self.last_logits_NE = self.last_logits_NE.detach()
            self.last_probs_NE = self.last_probs_NE.detach()

    def clear_capture(self) -> None:
        """Drop every tensor kept for the statistics of the current step."""
        self.capture = None
