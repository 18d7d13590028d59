"""TextSampler: every n steps, a continuation of fixed prompts goes to TensorBoard as text,
with distinct-n (a repetition/collapse indicator) as scalars."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger


def distinct_n(token_ids: list[int], n: int) -> float:
    """Share of distinct n-grams among all n-grams (1.0 = no repetition)."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


class TextSampler(L.Callback):
    def __init__(self, every_n_steps: int = 200, prompts: list[str] | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.8, seed: int = 0) -> None:
        """Text samples from fixed prompts.

        Args:
            every_n_steps: Sample every n training steps (and at the end of training); 0 disables.
            prompts: Prompts to continue; default: one per embedded-corpus domain.
            max_new_tokens: Tokens generated per prompt.
            temperature: Sampling temperature (0 = greedy).
            seed: Seed of the sampler, so samples at different steps are comparable.
        """
        self.every = every_n_steps
        self.prompts = prompts or ["the small robot", "12 + 7 =", "def add(", "name: ", "copy: a b c |"]
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0 and trainer.global_step > 0:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every:
            self.sample(trainer, pl_module)

    def sample(self, trainer, pl_module) -> None:
        tok = getattr(trainer.datamodule, "tokenizer", None)
        exp = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tok is None or exp is None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        texts, d2 = [], []
        was_training = pl_module.training
        pl_module.eval()
        for prompt in self.prompts:
            ids = tok.encode(prompt).ids
            idx = torch.tensor([ids], device=pl_module.device)
            out = pl_module.generate(idx, self.max_new_tokens, self.temperature, gen)[0, len(ids):].tolist()
            d2.append(distinct_n(out, 2))
            texts.append(f"**{prompt}** → {tok.decode(out)}")
        pl_module.train(was_training)
        exp.add_text("samples", "\n\n".join(t.replace("\n", "  \n") for t in texts), trainer.global_step)
        exp.add_scalar("samples/distinct_2", sum(d2) / len(d2), trainer.global_step)
