"""Where a long run is, told to whoever shows it. The core announces; it never prints.

`step(text)` says what the run is doing now (resolving the repo, hashing the weights, loading the
model, tokenizing...). A pass over the corpus is announced with `start_pass(label, samples, tokens)`
and then reports what is done after each batch with `advance(samples, tokens)`. One listener at a time, installed
with `listening` (the CLI's display on a terminal); with none, every call does nothing, so the core
calls these freely and tests need not care.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Protocol


class Listener(Protocol):
    """What shows progress: the CLI's terminal display, or a test's recorder."""

    def step(self, text: str) -> None:
        """A new step begins; `text` says what it does, in the present tense."""

    def start_pass(self, label: str, samples: int, tokens: int, batches: int) -> None:
        """A pass over `samples` samples (`tokens` tokens, in `batches` batches) begins."""

    def advance(self, samples: int, tokens: int) -> None:
        """A batch is done: the pass in progress has done `samples` samples and `tokens` tokens so far."""


_LISTENER: ContextVar[Listener | None] = ContextVar("maxact_card_progress", default=None)


@contextlib.contextmanager
def listening(listener: Listener | None) -> Iterator[None]:
    """Send progress to `listener` (None: to nobody) while the block runs."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)


def shown() -> bool:
    """Whether someone is showing progress (the CLI on a terminal): other bars may then show too."""
    return _LISTENER.get() is not None


def step(text: str) -> None:
    """Announce a step (see the module doc)."""
    listener = _LISTENER.get()
    if listener is not None:
        listener.step(text)


def start_pass(label: str, samples: int, tokens: int, batches: int) -> None:
    """Announce a pass over the corpus."""
    listener = _LISTENER.get()
    if listener is not None:
        listener.start_pass(label, samples, tokens, batches)


def advance(samples: int, tokens: int) -> None:
    """Report the pass's done samples and tokens."""
    listener = _LISTENER.get()
    if listener is not None:
        listener.advance(samples, tokens)
