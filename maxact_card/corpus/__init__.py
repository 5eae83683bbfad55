"""Calibration corpora: the built-in multi-domain corpus, user files, Hugging Face datasets.

The flow is load (`builtin_corpus`, `load_corpus`) -> pick (`select`, `split`) ->
`tokenize` -> `batches`. Every step is deterministic for a given seed, and a corpus carries a
SHA-256 over its canonical content so a card can say exactly what was measured.
"""

from __future__ import annotations

from maxact_card.corpus.batching import batches
from maxact_card.corpus.loading import BUILTIN_ID, DEFAULT_CATEGORY, builtin_corpus, load_corpus
from maxact_card.corpus.model import Corpus, Sample, canonical_line, content_sha256
from maxact_card.corpus.sampling import apportion, select, split
from maxact_card.corpus.tokenizing import chat_as_text, tokenize

__all__ = [
    "BUILTIN_ID",
    "DEFAULT_CATEGORY",
    "Corpus",
    "Sample",
    "apportion",
    "batches",
    "builtin_corpus",
    "canonical_line",
    "chat_as_text",
    "content_sha256",
    "load_corpus",
    "select",
    "split",
    "tokenize",
]
