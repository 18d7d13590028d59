"""Small shared fixtures: random MoE layers, a tiny model config and a random-token datamodule."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from smk_lightning.model import ModelConfig, MoELayer
from tests import oracles


def make_layer(d, ff, E, k, act, seed, dtype=torch.float64, **kw):
    """Build the project's layer, then overwrite its weights with seeded random values
    (independent of the project's init) so logits are well spread."""
    torch.manual_seed(seed)
    layer = MoELayer(d_model=d, d_ff=ff, num_experts=E, top_k=k, activation=act, **kw)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(E, d) * (2.0 / math.sqrt(d)))
        layer.w1.copy_(torch.randn(E, d, ff) / math.sqrt(d))
        layer.w2.copy_(torch.randn(E, ff, d) / math.sqrt(ff))
        if act == "swiglu":
            layer.w3.copy_(torch.randn(E, d, ff) / math.sqrt(d))
    return layer.to(dtype)


def tiny_model(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=32, num_experts=4,
                top_k=2, d_ff=24)
    base.update(kw)
    return ModelConfig(**base)


class RandomTokens(Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, vocab, (n, seq_len + 1), generator=g)
        self.domain = torch.randint(0, 3, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i, :-1], "targets": self.data[i, 1:], "domain": self.domain[i]}


class RandomDataModule(L.LightningDataModule):
    domain_names = ["a", "b", "c"]
    tokenizer = None

    def __init__(self, n: int = 16, seq_len: int = 16, vocab: int = 64, batch_size: int = 4) -> None:
        super().__init__()
        self.ds = RandomTokens(n, seq_len, vocab)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.ds, batch_size=self.batch_size)


def starved_case(act, k, seed=7):
    """Layer + inputs where expert `starved` can never be selected: every token has
    x[0] >= 1 and the starved expert's router row is (-30, 0, ..., 0)."""
    d, ff, E, N = 8, 12, 5, 24
    layer = make_layer(d, ff, E, k, act, seed)
    starved = 3
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=gen, dtype=torch.float64)
    x[:, 0] = 1.0 + torch.rand(N, generator=gen, dtype=torch.float64)
    g = torch.randn(N, d, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight[starved].zero_()
        layer.router.weight[starved, 0] = -30.0
    # really unselected (by the independent routing), and every other expert is fine
    for t in range(N):
        _, sel, _ = oracles.routing_ref(layer.router.weight.detach(), x[t], k)
        assert starved not in sel
    return layer, x, g, starved
