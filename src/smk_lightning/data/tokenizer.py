"""Byte-level BPE tokenizer (Hugging Face ``tokenizers``) with an end-of-text token at id 0."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from smk_lightning.errors import ConfigError

from .pieces import split_text

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 0


def _head(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """The first ``max_chars`` characters of ``texts`` (and the rest of the text or piece that
    crosses that mark), a text longer than ``PIECE_CHARS`` in pieces: the trainer never holds
    a whole long document. Pieces end on pre-token boundaries, so its word counts are those
    of the whole text."""
    total = 0
    for t in texts:
        for piece in split_text(t):
            if total >= max_chars:
                return
            total += len(piece)
            yield piece


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_chars: int = 2_000_000) -> Tokenizer:
    """Train a byte-level BPE on the first ``max_chars`` characters of ``texts`` (long texts
    in pieces of ``PIECE_CHARS``)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_head(texts, max_chars), trainer=trainer)
    if tok.token_to_id(EOT_TOKEN) != EOT_ID:
        raise RuntimeError(f"{EOT_TOKEN} must have id {EOT_ID}")
    return tok


def load_tokenizer(path: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """Load a tokenizer.json and check it fits the configured vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"tokenizer_path {str(path)!r} does not exist; pass an existing tokenizer.json or leave it unset to train one."
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for unreadable files
        raise ConfigError(
            f"tokenizer_path {str(path)!r} is not a valid tokenizer.json ({str(e)[:120]}); "
            "pass a file saved by tokenizers' Tokenizer.save, or leave it unset to train one."
        ) from None
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ConfigError(
            f"tokenizer {str(path)!r} has {n} tokens but vocab_size is {vocab_size}; "
            f"set --data.vocab_size to at least {n} (or use a smaller tokenizer)."
        )
    if tok.token_to_id(EOT_TOKEN) is None:
        raise ConfigError(
            f"tokenizer {str(path)!r} has no {EOT_TOKEN} token; add it as a special token."
        )
    return tok


def get_or_train_tokenizer(
    cache_path: str | os.PathLike, texts_fn, vocab_size: int, max_chars: int = 2_000_000
) -> Tokenizer:
    """Load ``cache_path`` if it exists, else train on ``texts_fn()`` and save it there."""
    cache_path = Path(cache_path)
    if cache_path.is_file():
        return load_tokenizer(cache_path, vocab_size)
    tok = train_tokenizer(texts_fn(), vocab_size, max_chars)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(cache_path.name + f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, cache_path)
    return tok
