"""Where a long run is, told to whoever shows it. The core announces; it never prints.

`step(text)` says what the run is doing now (resolving the repo, hashing the weights, loading the
model, tokenizing...). A pass over the corpus is announced with `start_pass(label, samples, tokens)`
and then reports what is done after each batch with `advance(samples, tokens)`. One listener at a time, installed
with `listening` (the CLI's display on a terminal); with none, every call does nothing, so the core
calls these freely and tests need not care. Each announcement also names its phase, and
`timing` adds up the seconds per phase for the results (`run.phases`).
"""

from __future__ import annotations

import contextlib
import time
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


class PhaseClock:
    """Seconds per phase: each announcement starts a phase and ends the one before."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._current: str | None = None
        self._since = time.perf_counter()

    def mark(self, phase: str | None) -> None:
        now = time.perf_counter()
        if self._current is not None:
            self.totals[self._current] = self.totals.get(self._current, 0.0) + now - self._since
        self._current, self._since = phase, now

    def add(self, phase: str, seconds: float) -> None:
        """Count `seconds` spent in `phase` before the clock started (the imports that precede it)."""
        self.totals[phase] = self.totals.get(phase, 0.0) + seconds

    def stop(self) -> dict[str, float]:
        """End the phase in progress; the totals, rounded to milliseconds."""
        self.mark(None)
        return {phase: round(seconds, 3) for phase, seconds in self.totals.items()}


_CLOCK: ContextVar[PhaseClock | None] = ContextVar("maxact_card_phases", default=None)


@contextlib.contextmanager
def timing() -> Iterator[PhaseClock]:
    """Time the phases announced while the block runs."""
    clock = PhaseClock()
    token = _CLOCK.set(clock)
    try:
        yield clock
    finally:
        _CLOCK.reset(token)


def _mark(phase: str) -> None:
    clock = _CLOCK.get()
    if clock is not None:
        clock.mark(phase)


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


def step(text: str, phase: str) -> None:
    """Announce a step (see the module doc); `phase` names it in `run.phases`."""
    _mark(phase)
    listener = _LISTENER.get()
    if listener is not None:
        listener.step(text)


def start_pass(label: str, samples: int, tokens: int, batches: int, *, phase: str) -> None:
    """Announce a pass over the corpus; `phase` names it in `run.phases`."""
    _mark(phase)
    listener = _LISTENER.get()
    if listener is not None:
        listener.start_pass(label, samples, tokens, batches)


def advance(samples: int, tokens: int) -> None:
    """Report the pass's done samples and tokens."""
    listener = _LISTENER.get()
    if listener is not None:
        listener.advance(samples, tokens)
