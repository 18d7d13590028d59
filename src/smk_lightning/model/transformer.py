"""Decoder-only MoE transformer: embedding → blocks (RMSNorm, rotary causal attention,
MoE or dense feed-forward) → RMSNorm → head.

Shape legend: B batch, T sequence, D d_model, H heads, V vocabulary, N = B·T.
The model is plain PyTorch; it knows nothing about Lightning or distribution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from smk_lightning.model.config import ModelConfig
from smk_lightning.model.experts import get_expert_kind
from smk_lightning.model.moe import MoELayer, Sinks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_table(seq_len: int, head_dim: int, base: float = 10000.0) -> Tensor:
    """cos/sin of rotary angles, ``[T, head_dim/2, 2]``."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary(x_BHTC: Tensor, rot_TC2: Tensor) -> Tensor:
    """Rotate the channel pairs of ``x`` ``[..., T, C]`` by the angles of ``rot_TC2`` (any
    leading dimensions: the attention passes q and k stacked, one call for both)."""
    x1, x2 = x_BHTC.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rot_TC2.unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x_BHTC)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BTD: Tensor, rot_TC2: Tensor) -> Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(qkv[:2], rot_TC2[:T]).unbind(0)  # q and k in one call: half the kernels
        v = qkv[2]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class DenseFFN(nn.Module):
    """An MLP of the same form as one expert (its kind from ``model/experts.py``)."""

    def __init__(self, d_model: int, d_ff: int, activation: str) -> None:
        super().__init__()
        self.activation, self.kind = activation, get_expert_kind(activation)
        self.w3 = None  # for kinds without it (GELU)
        for name in self.kind.in_names:
            setattr(self, name, nn.Linear(d_model, d_ff, bias=False))
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.kind.activations(tuple(getattr(self, n)(x) for n in self.kind.in_names))
        return self.w2(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, use_moe: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads)
        self.ffn_norm = RMSNorm(cfg.d_model)
        if use_moe:
            self.ffn = MoELayer(
                cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k, cfg.activation, cfg.renormalize,
                cfg.expert_impl,
            )
        else:
            self.ffn = DenseFFN(cfg.d_model, cfg.dense_ff or cfg.top_k * cfg.d_ff, cfg.activation)

    def forward(self, x_BTD: Tensor, rot_TC2: Tensor, sinks: Sinks | None = None) -> tuple[Tensor, dict | None]:
        """The block's output and, for an MoE block, what its layer's ``record`` keeps (the
        block writes no attribute, so it compiles)."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), rot_TC2)
        if isinstance(self.ffn, MoELayer):
            y_BTD, aux = self.ffn.compute(self.ffn_norm(x_BTD), sinks)
            return x_BTD + y_BTD, aux
        return x_BTD + self.ffn(self.ffn_norm(x_BTD)), None


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, dense_only: bool = False) -> None:
        """``dense_only`` replaces every MoE with a dense FFN of the same active FLOPs (benchmark)."""
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, use_moe=not dense_only and i % cfg.moe_every == cfg.moe_every - 1)
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.register_buffer(
            "rot_TC2", rotary_table(cfg.max_seq_len, cfg.d_model // cfg.n_heads), persistent=False
        )
        self.reset_parameters()
        self._moe = [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]  # depth order
        # Compiled at the first training forward (a compiled module cannot be pickled, as DDP
        # spawn and deepcopy do before training).
        self._compiled = None

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        for name, p in self.named_parameters():
            if p.dim() == 2 and name.endswith(("qkv.weight", "proj.weight", "w1.weight", "w2.weight", "w3.weight")):
                nn.init.normal_(p, std=0.02)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.head.weight, std=0.02)

    def moe_layers(self) -> dict[str, MoELayer]:
        """MoE layers by a short stable name (``layer<i>``), in depth order."""
        return {f"layer{i}": b.ffn for i, b in enumerate(self.blocks) if isinstance(b.ffn, MoELayer)}

    def forward(self, idx_BT: Tensor) -> Tensor:
        """Token ids ``[B, T]`` → logits ``[B, T, V]``. The MoE layers keep their router outputs
        (and, with ``capture_stats``, the step's capture: the sinks are made here, outside
        the compiled region, and passed in)."""
        B, T = idx_BT.shape
        if T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}; "
                "raise model.max_seq_len or lower data.seq_len"
            )
        if self.cfg.compile and self._compiled is None and self.training:
            # The whole stack as one graph (fullgraph, static shapes: P = N·K rows whatever the
            # routing, so a new routing never recompiles). Per block it gained a tenth as much
            # on the launch-bound stand-in (BENCHMARKS.md): each compiled region's call costs.
            self._compiled = torch.compile(self.run_blocks, fullgraph=True, dynamic=False)
        capture = torch.is_grad_enabled()
        sinks = [layer.new_sinks(B * T, self.embed.weight) if capture and layer.capture_stats else None
                 for layer in self._moe]
        # compiled in training only: validation and sampling (whose length grows token by
        # token) would each compile graphs of their own
        run = self._compiled if self._compiled is not None and self.training else self.run_blocks
        logits, auxes = run(idx_BT, sinks)
        for layer, aux, layer_sinks in zip(self._moe, auxes, sinks):
            layer.record(aux, layer_sinks)
        return logits

    def run_blocks(self, idx_BT: Tensor, sinks: list[Sinks | None]) -> tuple[Tensor, list[dict]]:
        """The forward as a pure function: logits and, per MoE layer (given its sinks, in
        depth order), what its ``record`` keeps. No attribute is written, so it compiles whole."""
        x = self.embed(idx_BT)
        auxes, moe_sinks = [], iter(sinks)
        for block in self.blocks:
            layer_sinks = next(moe_sinks) if isinstance(block.ffn, MoELayer) else None
            if self.cfg.activation_checkpointing and self.training:
                x, aux = checkpoint(block, x, self.rot_TC2, layer_sinks, use_reentrant=False)
            else:
                x, aux = block(x, self.rot_TC2, layer_sinks)
            if aux is not None:
                auxes.append(aux)
        return self.head(self.norm(x)), auxes
