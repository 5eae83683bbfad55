"""The corpus data model: samples, a corpus, and the canonical hash that names its content."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One calibration sample: exactly one of `text`, `messages` (chat turns) or `input_ids` is set."""

    id: str
    category: str
    text: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    input_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("text", "messages", "input_ids") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"sample {self.id!r} needs exactly one of text, messages, input_ids; got {given}"
            )
        # Callers may pass lists; store tuples and fresh plain dicts so a sample cannot change under
        # a corpus hash that was computed from it.
        if self.messages is not None:
            turns = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in self.messages)
            object.__setattr__(self, "messages", turns)
        if self.input_ids is not None:
            object.__setattr__(self, "input_ids", tuple(int(i) for i in self.input_ids))

    def __hash__(self) -> int:
        # The generated hash would fail on the dicts inside `messages`; hash their items instead.
        turns = None if self.messages is None else tuple((m["role"], m["content"]) for m in self.messages)
        return hash((self.id, self.category, self.text, turns, self.input_ids))

    @property
    def kind(self) -> str:
        """Which payload the sample carries: "text", "chat" or "input_ids"."""
        if self.text is not None:
            return "text"
        if self.messages is not None:
            return "chat"
        return "input_ids"

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON-ready form: id, category and the one payload that is set."""
        out: dict[str, Any] = {"id": self.id, "category": self.category}
        if self.text is not None:
            out["text"] = self.text
        elif self.messages is not None:
            out["messages"] = [dict(m) for m in self.messages]
        else:
            out["input_ids"] = list(self.input_ids or ())
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sample:
        """Inverse of `to_dict` (no validation beyond the dataclass's own; loaders validate input files)."""
        messages = data.get("messages")
        input_ids = data.get("input_ids")
        return cls(
            id=str(data["id"]),
            category=str(data["category"]),
            text=data.get("text"),
            messages=None if messages is None else tuple(messages),
            input_ids=None if input_ids is None else tuple(input_ids),
        )


def canonical_line(sample: Sample) -> str:
    """One sample as canonical JSON: sorted keys, no optional whitespace, ASCII escapes.

    ASCII escapes keep the bytes independent of the platform's encoding and survive lone
    surrogates, so the hash below is the same on every machine.
    """
    return json.dumps(sample.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def content_sha256(samples: Iterable[Sample]) -> str:
    """SHA-256 (hex) of the samples' canonical lines, in order, each followed by a newline."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(canonical_line(sample).encode("ascii"))
        digest.update(b"\n")
    return digest.hexdigest()


@dataclass(frozen=True)
class Corpus:
    """A named, hashed, ordered collection of samples. Build one with `Corpus.from_samples`."""

    id: str
    sha256: str
    samples: tuple[Sample, ...] = field(repr=False)

    @classmethod
    def from_samples(cls, corpus_id: str, samples: Sequence[Sample]) -> Corpus:
        """A corpus whose `sha256` is computed from `samples`; sample ids must be unique."""
        seen: set[str] = set()
        for sample in samples:
            if sample.id in seen:
                raise ValueError(f"corpus {corpus_id} has the sample id {sample.id!r} twice")
            seen.add(sample.id)
        ordered = tuple(samples)
        return cls(id=corpus_id, sha256=content_sha256(ordered), samples=ordered)

    def categories(self) -> dict[str, int]:
        """Sample count per category, in order of each category's first appearance."""
        counts: dict[str, int] = {}
        for sample in self.samples:
            counts[sample.category] = counts.get(sample.category, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self.samples)
