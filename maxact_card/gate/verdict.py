"""What the gate returns: one outcome per rule, the verdict over them, and the card status it was given."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Measured = float | int | str | None


@dataclass(frozen=True)
class CardStatus:
    """What the caller found in the model card: is there a maxact section, and does it match the results.

    ``stale`` is None when it could not be told (e.g. no section to compare).
    """

    present: bool
    stale: bool | None = None


@dataclass(frozen=True)
class RuleOutcome:
    """One evaluated rule: what was measured, against which limit, where, and a sentence for people.

    ``skipped`` rules could not be evaluated (no baseline, no quant block, no card); they pass.
    """

    rule: str
    passed: bool
    measured: Measured
    limit: Measured
    site: str | None
    message: str
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "rule": self.rule,
            "passed": self.passed,
            "skipped": self.skipped,
            "measured": self.measured,
            "limit": self.limit,
            "site": self.site,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> RuleOutcome:
        """Inverse of to_dict."""
        return cls(
            rule=doc["rule"],
            passed=bool(doc["passed"]),
            measured=doc.get("measured"),
            limit=doc.get("limit"),
            site=doc.get("site"),
            message=doc.get("message", ""),
            skipped=bool(doc.get("skipped", False)),
        )


@dataclass(frozen=True)
class Verdict:
    """The gate's answer: passed when every rule passed (skipped rules pass)."""

    passed: bool
    rules: tuple[RuleOutcome, ...]
    policy: str = "default"

    @property
    def failed(self) -> tuple[RuleOutcome, ...]:
        """The rules that failed, in evaluation order."""
        return tuple(r for r in self.rules if not r.passed)

    @property
    def word(self) -> str:
        """``PASS`` or ``FAIL``."""
        return "PASS" if self.passed else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``check --format json`` prints under ``verdict``)."""
        return {
            "verdict": self.word,
            "passed": self.passed,
            "policy": self.policy,
            "failed": [r.rule for r in self.failed],
            "rules": [r.to_dict() for r in self.rules],
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Verdict:
        """Inverse of to_dict."""
        return cls(
            passed=bool(doc["passed"]),
            rules=tuple(RuleOutcome.from_dict(r) for r in doc.get("rules", ())),
            policy=doc.get("policy", "default"),
        )
