"""Data layer: embedded synthetic corpus, byte-level BPE, streamed packed batches."""

from .corpus import DOMAINS, generate_documents, write_corpus
from .datamodule import SMKDataModule
from .metrics import unigram_entropy

__all__ = ["DOMAINS", "SMKDataModule", "generate_documents", "unigram_entropy", "write_corpus"]
