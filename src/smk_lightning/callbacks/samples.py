"""TextSampler: every n optimizer steps, continuations of prompts go to TensorBoard as text
(tag ``samples``, which TensorBoard's Text tab lists as ``samples/text_summary``), with
distinct-2 (a repetition/collapse indicator) as the scalar ``samples/distinct_2``.

Prompts come from the data unless given: the datamodule's ``sample_prompts()`` (one per
domain for the embedded corpus, the opening words of held-out documents for user text).
"""

from __future__ import annotations

import re

import lightning as L
import torch

from smk_lightning.callbacks.routing import tensorboard
from smk_lightning.data.corpus import PROMPTS


def distinct_n(token_ids: list[int], n: int) -> float:
    """Share of distinct n-grams among all n-grams (1.0 = no repetition)."""
    grams = [tuple(token_ids[i:i + n]) for i in range(len(token_ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def decode_visible_eot(tok, ids: list[int], eot_id: int | None) -> str:
    """Decode ``ids`` with each end-of-text token shown by name, so document boundaries are visible
    (a plain decode drops special tokens and runs the documents together)."""
    if eot_id is None:
        return tok.decode(ids)
    mark = tok.id_to_token(eot_id) or "<|eot|>"
    pieces: list[list[int]] = [[]]
    for i in ids:
        if i == eot_id:
            pieces.append([])
        else:
            pieces[-1].append(i)
    return mark.join(tok.decode(p) for p in pieces)


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", text)


def _code_block(text: str) -> str:
    """Markdown indented code block: newlines, ``*``, ``_`` and special-token names shown as they are."""
    return "\n".join("    " + line for line in text.split("\n"))


class TextSampler(L.Callback):
    def __init__(self, every_n_steps: int = 200, prompts: list[str] | None = None, max_new_tokens: int = 64,
                 temperature: float = 0.8, seed: int = 0) -> None:
        """Text samples from fixed prompts.

        Args:
            every_n_steps: Sample every n optimizer steps (and at the end of training); 0 disables.
            prompts: Prompts to continue; default: from the data (one per domain for the embedded corpus,
                the opening words of held-out validation documents for your own text).
            max_new_tokens: Tokens generated per prompt.
            temperature: Sampling temperature (0 = greedy).
            seed: Seed of the sampler, so samples at different steps are comparable.
        """
        self.every = every_n_steps
        self.prompts = prompts
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self._last_step: int | None = None  # the step last sampled at: never twice at one step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every and step > 0 and step % self.every == 0 and pl_module.step_state.boundary:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every:
            self.sample(trainer, pl_module)

    def _prompts(self, datamodule) -> list[str]:
        if self.prompts:
            return list(self.prompts)
        from_data = getattr(datamodule, "sample_prompts", None)
        return (from_data() if callable(from_data) else None) or list(PROMPTS)

    def sample(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        tok = getattr(dm, "tokenizer", None)
        exp = tensorboard(trainer)
        if tok is None or exp is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        eot_id = getattr(dm, "eot_id", None)
        gen = torch.Generator().manual_seed(self.seed)
        texts, d2 = [], []
        was_training = pl_module.training
        pl_module.eval()
        for prompt in self._prompts(dm):
            ids = tok.encode(prompt).ids
            idx = torch.tensor([ids], device=pl_module.device)
            out = pl_module.generate(idx, self.max_new_tokens, self.temperature, gen)[0, len(ids):].tolist()
            d2.append(distinct_n(out, 2))
            texts.append(f"**{_md_escape(prompt)}** →\n\n{_code_block(prompt + decode_visible_eot(tok, out, eot_id))}")
        pl_module.train(was_training)
        exp.add_text("samples", "\n\n".join(texts), trainer.global_step)
        exp.add_scalar("samples/distinct_2", sum(d2) / len(d2), trainer.global_step)
