"""``ModelConfig``: the shape of the MoE transformer (``model.*`` in a config; field
docstrings become ``smk fit --help`` text, every default lives here once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from smk_lightning.errors import ConfigError
from smk_lightning.model.moe import check_expert_impl, check_top_k


@dataclass
class ModelConfig:
    """Shape of the MoE transformer."""

    vocab_size: int = 2048
    """Vocabulary size; linked from ``data.vocab_size``."""
    d_model: int = 128
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; must divide d_model."""
    max_seq_len: int = 512
    """Longest sequence the rotary table covers; data.seq_len must not exceed it."""
    num_experts: int = 8
    """Experts per MoE layer (E)."""
    top_k: int = 2
    """Experts each token is routed to (k)."""
    d_ff: int = 256
    """Hidden width of each expert (F)."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """Expert kind."""
    renormalize: bool = True
    """Renormalise the top-k probabilities to sum to one (else combine with raw p)."""
    moe_every: int = 1
    """Use an MoE feed-forward in every n-th block (others get a dense FFN of width dense_ff)."""
    dense_ff: int | None = None
    """Hidden width of the dense FFN blocks; default top_k·d_ff (same active FLOPs)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    activation_checkpointing: bool = False
    """Recompute each block in backward to save memory (slower)."""
    expert_impl: Literal["auto", "grouped", "loop"] = "auto"
    """How the experts run: ``grouped`` = one grouped GEMM (torch grouped_mm) per projection
    over all experts; ``loop`` = one matmul per expert (needs a host sync for the split sizes);
    ``auto`` = grouped wherever grouped_mm can run (float32/bf16/fp16, row widths d_model and
    d_ff a multiple of 16 bytes, a torch that has it), loop otherwise (float64)."""
    compile: bool = False
    """torch.compile the training forward (the whole stack of blocks as one graph: fullgraph, static shapes); the
    statistics stay exact (the capture is part of the autograd graph). Needs grouped experts
    (expert_impl auto or grouped, not float64) and no activation checkpointing."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "choose n_heads that divides d_model"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(
                f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for rotary positions"
            )
        try:
            check_top_k(self.top_k, self.num_experts, prefix="model.")
            check_expert_impl(self.expert_impl, prefix="model.")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.compile and self.activation_checkpointing:
            raise ConfigError("model.compile=true with model.activation_checkpointing=true is not supported; "
                              "set one of them to false")
        if self.compile and self.expert_impl == "loop":
            # the loop reads the per-expert sizes on the host: a new graph for every routing
            raise ConfigError("model.compile=true needs grouped experts; set model.expert_impl to auto or grouped")
        if self.moe_every < 1:
            raise ConfigError(f"model.moe_every={self.moe_every} must be >= 1")
