"""Independent, deliberately slow reference implementations (float64).

Nothing here imports project code: the oracles only *read* a layer's weights
(``layer.router.weight``, ``layer.w1``, ``layer.w2`` and, for SwiGLU, ``layer.w3``)
and rebuild every quantity of docs/design.md by hand, one token (and one expert) at a
time, with plain Python loops and ``torch.autograd.grad``.

Conventions (docs/design.md):
  router logits  z_t = W_r x_t            (W_r = layer.router.weight, shape [E, d])
  p_t            = softmax(z_t)
  S_t            = top_k experts of p_t
  w_{t,e}        = p_{t,e} / sum_{e' in S_t} p_{t,e'}   (or p_{t,e} without renormalisation)
  f_e(x)         = (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]     (swiglu)
                 = gelu(x @ w1[e]) @ w2[e]                       (gelu, exact erf form)
  o_t            = sum_{e in S_t} w_{t,e} f_e(x_t)
  M_A[t,e]       = ||f_e(x_t)||
  M_G[t,e]       = ||grad_{theta_e} <g_t, f_e(x_t; theta_e)>||
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "layer_activation",
    "layer_top_k",
    "layer_renormalize",
    "expert_param_names",
    "expert_weights",
    "silu_ref",
    "gelu_ref",
    "expert_forward_ref",
    "routing_ref",
    "routing_margin",
    "naive_moe_forward",
    "per_token_expert_grads",
    "oracle_stats",
]


# --------------------------------------------------------------------------- helpers
def layer_activation(layer) -> str:
    """'swiglu' or 'gelu'. Uses a string attribute if the layer has one, else infers
    from whether a w3 tensor exists."""
    act = getattr(layer, "activation", None)
    if isinstance(act, str):
        act = act.lower()
        if act in ("swiglu", "gelu"):
            return act
    return "swiglu" if getattr(layer, "w3", None) is not None else "gelu"


def layer_top_k(layer) -> int:
    for name in ("top_k", "k", "topk"):
        v = getattr(layer, name, None)
        if isinstance(v, int):
            return v
    raise AttributeError("cannot find top_k on the layer; pass top_k explicitly")


def layer_renormalize(layer) -> bool:
    v = getattr(layer, "renormalize", True)
    return bool(v)


def expert_param_names(activation: str) -> tuple[str, ...]:
    return ("w1", "w2", "w3") if activation == "swiglu" else ("w1", "w2")


def expert_weights(layer, activation: str | None = None) -> dict[str, torch.Tensor]:
    """Detached float64 copies of the stacked expert weights (+ router)."""
    activation = activation or layer_activation(layer)
    out = {"router": layer.router.weight.detach().to(torch.float64).clone()}
    for n in expert_param_names(activation):
        out[n] = getattr(layer, n).detach().to(torch.float64).clone()
    return out


def silu_ref(u: torch.Tensor) -> torch.Tensor:
    return u * (1.0 / (1.0 + torch.exp(-u)))


def gelu_ref(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * u * (1.0 + torch.erf(u / math.sqrt(2.0)))


def expert_forward_ref(x_t, w1_e, w2_e, w3_e, activation: str) -> torch.Tensor:
    """f_e(x_t) for a single token x_t [d] and one expert's weights."""
    u = x_t @ w1_e
    if activation == "swiglu":
        h = silu_ref(u) * (x_t @ w3_e)
    elif activation == "gelu":
        h = gelu_ref(u)
    else:  # pragma: no cover
        raise ValueError(activation)
    return h @ w2_e


def _softmax_ref(z: torch.Tensor) -> torch.Tensor:
    m = z.max()
    ez = torch.exp(z - m)
    return ez / ez.sum()


def routing_ref(router_w: torch.Tensor, x_t: torch.Tensor, top_k: int, renormalize: bool = True):
    """Returns (p [E], selected expert list (descending prob), weights list)."""
    z = router_w @ x_t
    p = _softmax_ref(z)
    E = p.shape[0]
    # Plain Python selection (independent of torch.topk).
    order = sorted(range(E), key=lambda e: float(p[e].detach()), reverse=True)
    sel = order[:top_k]
    denom = sum(p[e] for e in sel) if renormalize else None
    weights = [p[e] / denom if renormalize else p[e] for e in sel]
    return p, sel, weights


def routing_margin(router_w: torch.Tensor, x: torch.Tensor, top_k: int) -> float:
    """Smallest gap p_(k) - p_(k+1) over tokens (inf when top_k == E). Tests use it to make
    sure the selected set is not decided by rounding."""
    x = x.detach().to(torch.float64).reshape(-1, router_w.shape[1])
    p = torch.softmax(x @ router_w.detach().to(torch.float64).T, dim=-1)
    E = p.shape[1]
    if top_k >= E:
        return math.inf
    ps = torch.sort(p, dim=-1, descending=True).values
    return float((ps[:, top_k - 1] - ps[:, top_k]).min())


# --------------------------------------------------------------------------- forward
def naive_moe_forward(layer, x, top_k=None, activation=None, renormalize=None, params=None):
    """Per-token Python loop MoE forward in float64.

    ``params`` (optional) maps 'router', 'w1', 'w2', 'w3' to tensors to use instead of
    the layer's weights (e.g. float64 leaf copies so the caller can differentiate).
    ``x`` may be [N, d] or [..., d]; the result has the same leading shape.
    """
    activation = activation or layer_activation(layer)
    top_k = layer_top_k(layer) if top_k is None else top_k
    renormalize = layer_renormalize(layer) if renormalize is None else renormalize
    P = params if params is not None else expert_weights(layer, activation)
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1])
    if xf.dtype != torch.float64:
        xf = xf.to(torch.float64)
    rows = []
    for t in range(xf.shape[0]):
        x_t = xf[t]
        _, sel, weights = routing_ref(P["router"], x_t, top_k, renormalize)
        o_t = torch.zeros(P["w2"].shape[-1], dtype=torch.float64)
        for e, w in zip(sel, weights):
            f = expert_forward_ref(
                x_t, P["w1"][e], P["w2"][e], P.get("w3")[e] if activation == "swiglu" else None,
                activation,
            )
            o_t = o_t + w * f
        rows.append(o_t)
    return torch.stack(rows).reshape(*lead, -1)


# --------------------------------------------------------------------------- per-token grads
def per_token_expert_grads(layer, x_t, g_t, e, activation=None) -> dict[str, torch.Tensor]:
    """grad_{theta_e} <g_t, f_e(x_t; theta_e)> as a dict name -> tensor (shapes of w1[e] ...),
    computed by autograd on fresh float64 leaf copies of expert e's weights."""
    activation = activation or layer_activation(layer)
    names = expert_param_names(activation)
    leaves = {
        n: getattr(layer, n)[e].detach().to(torch.float64).clone().requires_grad_(True)
        for n in names
    }
    x_t = x_t.detach().to(torch.float64)
    g_t = g_t.detach().to(torch.float64)
    f = expert_forward_ref(x_t, leaves["w1"], leaves["w2"], leaves.get("w3"), activation)
    s = (g_t * f).sum()
    grads = torch.autograd.grad(s, [leaves[n] for n in names])
    return dict(zip(names, grads))


# --------------------------------------------------------------------------- stats oracle
def oracle_stats(layer, x, g, scope, top_k=None, activation=None):
    """M_A, M_G of docs/design.md, float64 [N, E], NaN where undefined."""
    if scope not in ("routed", "dense"):
        raise ValueError(scope)
    activation = activation or layer_activation(layer)
    top_k = layer_top_k(layer) if top_k is None else top_k
    router_w = layer.router.weight.detach().to(torch.float64)
    E = router_w.shape[0]
    x = x.detach().to(torch.float64).reshape(-1, router_w.shape[1])
    g = g.detach().to(torch.float64).reshape(x.shape[0], -1)
    N = x.shape[0]
    MA = torch.full((N, E), float("nan"), dtype=torch.float64)
    MG = torch.full((N, E), float("nan"), dtype=torch.float64)
    names = expert_param_names(activation)
    for t in range(N):
        if scope == "routed":
            _, sel, _ = routing_ref(router_w, x[t], top_k)
        else:
            sel = list(range(E))
        for e in sel:
            leaves = {
                n: getattr(layer, n)[e].detach().to(torch.float64).clone().requires_grad_(True)
                for n in names
            }
            f = expert_forward_ref(x[t], leaves["w1"], leaves["w2"], leaves.get("w3"), activation)
            MA[t, e] = torch.linalg.vector_norm(f.detach())
            s = (g[t] * f).sum()
            grads = torch.autograd.grad(s, [leaves[n] for n in names])
            MG[t, e] = torch.sqrt(sum((gr * gr).sum() for gr in grads))
    return MA, MG
