"""Release policies: which measured facts fail a model release.

A policy is a TOML (or JSON) file validated against ``schemas/maxact-policy.schema.json``. A file
replaces the built-in default entirely: a limit or list it leaves out is not checked, a boolean it
leaves out takes its default (``fail_on_non_finite = true``, ``card.fail_on_stale = true``).

The default policy
==================
Used when no policy file is given (``DEFAULT_POLICY``); as a file it reads::

    schema_version = 1
    name = "default"
    fail_on_non_finite = true

    [limits]
    global_max_abs = 65504.0          # the largest finite float16

    [quant]
    require_pass = ["int8-dynamic-per-token"]
    if_missing = "skip"               # the quant pass is optional (--quant)

    [baseline]
    max_peak_growth_pct = 25.0        # checked only when a baseline is given

    [card]
    require_section = false
    fail_on_stale = true              # checked only when a card was checked

Why these rules, and only these:

* **Non-finite activations fail.** A NaN or inf in the measured forward pass means the model is
  already broken in the dtype it was measured in; no deployment of that checkpoint survives it.
* **Global max|a| ≤ 65504.** 65504 is the largest finite float16. An activation above it becomes
  inf when the model is served in float16, which is still common (GPUs without bfloat16 such as
  T4 and V100, fp16 engine paths, ONNX / TensorRT / mobile exports); this is the overflow that
  made some released models unusable in fp16. The measured maximum is a lower bound of the true
  one (it is the maximum over a finite corpus), so the limit is a floor, not a safety margin:
  tighten it in a policy file for headroom, or remove it if the model ships in bfloat16 only.
* **``int8-dynamic-per-token`` must PASS (when the results carry a quant block).** It is the most
  forgiving INT8 activation recipe: one scale per token, computed at run time, so a few massive
  tokens do not crush the resolution of the others. If even it fails, no plain W8A8 INT8 path
  serves the model without outlier handling (SmoothQuant-style migration, mixed precision). Static
  recipes failing is expected for models with massive activations, so they are reported, not
  gated. Without a quant block the rule is skipped, because ``--quant`` is an optional, extra
  pass; a policy file that requires a quant policy fails on a missing block unless it says
  ``if_missing = "skip"``.
* **Peak growth ≤ 25 % against a baseline.** Massive activations are a stable property of a model
  (the same channels and tokens, Sun et al. 2024), and resampling the corpus moves the peak by far
  less than this (the bootstrap p05–p95 of the example results spans under 0.1 %). Growth beyond
  25 % means training changed the outlier structure and ate into the float16 / INT8 headroom:
  worth a human look before release. Checked only when ``--baseline`` is given.
* **A stale card section fails; a missing one does not.** Published numbers must describe the
  checkpoint they ship with; an absent section is merely absent information (``publish`` adds
  it). Checked only when the caller checked a card.

Report-only use is not a policy: to see numbers without gating, use ``measure`` or ``render``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maxact_card.documents import COMPONENTS, validate_document
from maxact_card.errors import UsageError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib  # type: ignore[no-redef]

POLICY_SCHEMA = "maxact-policy.schema.json"
POLICY_SCHEMA_VERSION = 1

#: The largest finite float16 value: an activation above it overflows to inf in fp16.
FP16_MAX = 65504.0


#: Quantization policies of the results' quant block, from strictest to most forgiving INT8, then FP8.
QUANT_POLICIES: tuple[str, ...] = (
    "int8-static-maxabs",
    "int8-static-percentile",
    "int8-static-mse",
    "int8-dynamic-per-token",
    "fp8-e4m3-static",
)


@dataclass(frozen=True)
class QuantRules:
    """Requirements on the results' quantization verdicts."""

    require_pass: tuple[str, ...] = ()
    require_any_pass: tuple[str, ...] = ()
    min_sqnr_db: float | None = None
    if_missing: str = "fail"

    def is_empty(self) -> bool:
        """True when no quant rule is configured."""
        return not self.require_pass and not self.require_any_pass


@dataclass(frozen=True)
class CardRules:
    """Rules on the model card's maxact section."""

    require_section: bool = False
    fail_on_stale: bool = True


@dataclass(frozen=True)
class Policy:
    """A release policy. ``None`` limits are not checked."""

    name: str = "unnamed"
    source: str = "built-in default"
    description: str = ""
    fail_on_non_finite: bool = True
    global_max_abs: float | None = None
    #: (component, limit) pairs in COMPONENTS order.
    component_max_abs: tuple[tuple[str, float], ...] = ()
    quant: QuantRules = field(default_factory=QuantRules)
    max_peak_growth_pct: float | None = None
    card: CardRules = field(default_factory=CardRules)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], *, source: str) -> Policy:
        """Build a policy from a schema-valid document (call ``validate_policy`` first)."""
        limits = doc.get("limits", {})
        components = limits.get("components", {})
        quant = doc.get("quant", {})
        card = doc.get("card", {})
        baseline = doc.get("baseline", {})
        global_limit = limits.get("global_max_abs")
        growth = baseline.get("max_peak_growth_pct")
        sqnr = quant.get("min_sqnr_db")
        return cls(
            name=doc.get("name", Path(source).stem if source else "unnamed"),
            source=source,
            description=doc.get("description", ""),
            fail_on_non_finite=bool(doc.get("fail_on_non_finite", True)),
            global_max_abs=None if global_limit is None else float(global_limit),
            component_max_abs=tuple(
                (name, float(components[name])) for name in COMPONENTS if name in components
            ),
            quant=QuantRules(
                require_pass=_ordered(quant.get("require_pass", ())),
                require_any_pass=_ordered(quant.get("require_any_pass", ())),
                min_sqnr_db=None if sqnr is None else float(sqnr),
                if_missing=quant.get("if_missing", "fail"),
            ),
            max_peak_growth_pct=None if growth is None else float(growth),
            card=CardRules(
                require_section=bool(card.get("require_section", False)),
                fail_on_stale=bool(card.get("fail_on_stale", True)),
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """The policy as a document valid against the policy schema (round-trips through from_dict)."""
        doc: dict[str, Any] = {"schema_version": POLICY_SCHEMA_VERSION, "name": self.name}
        if self.description:
            doc["description"] = self.description
        doc["fail_on_non_finite"] = self.fail_on_non_finite
        limits: dict[str, Any] = {}
        if self.global_max_abs is not None:
            limits["global_max_abs"] = self.global_max_abs
        if self.component_max_abs:
            limits["components"] = dict(self.component_max_abs)
        if limits:
            doc["limits"] = limits
        if not self.quant.is_empty():
            quant: dict[str, Any] = {}
            if self.quant.require_pass:
                quant["require_pass"] = list(self.quant.require_pass)
            if self.quant.require_any_pass:
                quant["require_any_pass"] = list(self.quant.require_any_pass)
            if self.quant.min_sqnr_db is not None:
                quant["min_sqnr_db"] = self.quant.min_sqnr_db
            quant["if_missing"] = self.quant.if_missing
            doc["quant"] = quant
        if self.max_peak_growth_pct is not None:
            doc["baseline"] = {"max_peak_growth_pct": self.max_peak_growth_pct}
        doc["card"] = {
            "require_section": self.card.require_section,
            "fail_on_stale": self.card.fail_on_stale,
        }
        return doc


def _ordered(names: Iterable[str]) -> tuple[str, ...]:
    """Quant policy names in QUANT_POLICIES order, so reports do not depend on how a file lists them."""
    wanted = set(names)
    return tuple(name for name in QUANT_POLICIES if name in wanted) + tuple(
        sorted(wanted - set(QUANT_POLICIES))
    )


DEFAULT_POLICY = Policy(
    name="default",
    source="built-in default",
    fail_on_non_finite=True,
    global_max_abs=FP16_MAX,
    quant=QuantRules(require_pass=("int8-dynamic-per-token",), if_missing="skip"),
    max_peak_growth_pct=25.0,
    card=CardRules(require_section=False, fail_on_stale=True),
)


def validate_policy(doc: Any, source: str) -> None:
    """Validate a policy document; raise SchemaError with ``source::$.path: message``.

    The same validator and message shape as every results file (maxact_card.measure.results).
    """
    validate_document(doc, POLICY_SCHEMA, source=source)


def parse_policy_text(text: str, *, source: str, fmt: str) -> Policy:
    """Parse and validate policy text (``fmt`` "toml" or "json")."""
    try:
        doc = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{source}: not valid TOML: {exc}", hint="fix the syntax") from None
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            hint="fix the syntax",
        ) from None
    except RecursionError:
        raise UsageError(f"{source}: nested too deeply to be a policy", hint="see the README's policy example") from None
    validate_policy(doc, source)
    return Policy.from_dict(doc, source=source)


def load_policy(path: Path | None) -> Policy:
    """The policy in ``path`` (``.toml`` or ``.json``), or DEFAULT_POLICY when ``path`` is None."""
    if path is None:
        return DEFAULT_POLICY
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise UsageError(
            f"policy file {path} must end in .toml or .json",
            hint="rename it, or leave --policy out to use the default policy",
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(
            f"policy file {path} not found",
            hint="pass an existing .toml or .json policy file, or leave --policy out for the default policy",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read policy file {path}: {exc}", hint="check the path") from None
    return parse_policy_text(text, source=str(path), fmt=suffix[1:])


__all__ = [
    "COMPONENTS",
    "DEFAULT_POLICY",
    "FP16_MAX",
    "QUANT_POLICIES",
    "CardRules",
    "Policy",
    "QuantRules",
    "load_policy",
    "parse_policy_text",
    "validate_policy",
]
