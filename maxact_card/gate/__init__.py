"""The release gate: results + policy (+ baseline, + card status) → verdict; and the diff of two results.

Pure functions over the results dictionaries (``schemas/maxact-results.schema.json``). Nothing here
prints or exits: callers render the returned values and map ``MaxactError`` to exit codes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2

from maxact_card import documents, fmt
from maxact_card.errors import UsageError
from maxact_card.fmt import number
from maxact_card.gate.policy import (
    COMPONENTS,
    DEFAULT_POLICY,
    FP16_MAX,
    QUANT_POLICIES,
    Policy,
    load_policy,
)
from maxact_card.resources import template_text

HUB_RESULTS_PATH = "maxact/results.json"

Measured = float | int | str | None


# --------------------------------------------------------------------------------------------------
# Verdict data


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


# --------------------------------------------------------------------------------------------------
# Evaluation


def _pass(rule: str, measured: Measured, limit: Measured, site: str | None, message: str) -> RuleOutcome:
    return RuleOutcome(rule, True, measured, limit, site, message)


def _fail(rule: str, measured: Measured, limit: Measured, site: str | None, message: str) -> RuleOutcome:
    return RuleOutcome(rule, False, measured, limit, site, message)


def _skip(rule: str, limit: Measured, message: str) -> RuleOutcome:
    return RuleOutcome(rule, True, None, limit, None, message, skipped=True)


def _limit_name(limit: float) -> str:
    return f"{number(limit)} (the float16 maximum)" if limit == FP16_MAX else number(limit)


def _pair(measured: float, limit: float) -> tuple[str, str]:
    """Both numbers for a message; exact when rounding would make them look equal."""
    shown_measured, shown_limit = number(measured), _limit_name(limit)
    if number(measured) == number(limit) and measured != limit:
        shown_measured, shown_limit = f"{measured:,}", f"{limit:,}"
    return shown_measured, shown_limit


def _within(what: str, measured: float, limit: float, site: str, rule: str) -> RuleOutcome:
    shown, shown_limit = _pair(measured, limit)
    if measured <= limit:
        return _pass(rule, measured, limit, site, f"{what} {shown} at {site} is within {shown_limit}")
    return _fail(rule, measured, limit, site, f"{what} {shown} at {site} exceeds the limit {shown_limit}")


def _check_non_finite(results: Mapping[str, Any]) -> RuleOutcome:
    rule = "non_finite"
    bad = [
        (site["name"], int(site.get("non_finite", {}).get("elements", 0)))
        for site in results.get("sites", ())
        if int(site.get("non_finite", {}).get("elements", 0)) > 0
    ]
    if not bad:
        return _pass(rule, 0, 0, None, f"no NaN or inf in {len(results.get('sites', ()))} sites")
    total = sum(n for _, n in bad)
    worst_site = max(bad, key=lambda item: item[1])[0]  # first of the largest, in site order
    dtype = results.get("run", {}).get("dtype", "the measured dtype")
    return _fail(
        rule,
        total,
        0,
        worst_site,
        f"{total:,} NaN/inf values in {len(bad)} site{'s' if len(bad) != 1 else ''} "
        f"(most at {worst_site}): the model overflows in {dtype}",
    )


def _check_global(results: Mapping[str, Any], limit: float) -> RuleOutcome:
    peak = results["global"]
    return _within("global max|a|", float(peak["max_abs"]), limit, peak["site"], "limits.global_max_abs")


def _check_component(results: Mapping[str, Any], component: str, limit: float) -> RuleOutcome:
    rule = f"limits.components.{component}"
    entry = results.get("components", {}).get(component)
    if entry is None:
        return _skip(rule, limit, f"no {component} sites in these results; nothing to limit")
    return _within(f"{component} max|a|", float(entry["max_abs"]), limit, entry["site"], rule)


def _quant_entries(results: Mapping[str, Any]) -> dict[str, Mapping[str, Any]] | None:
    quant = results.get("quant")
    if not isinstance(quant, Mapping):
        return None
    policies = quant.get("policies")
    return dict(policies) if isinstance(policies, Mapping) else {}


def _missing_quant(rule: str, policy: Policy, name: str, limit: Measured, has_block: bool) -> RuleOutcome:
    what = f"no verdict for {name} in the quant block" if has_block else "the results carry no quant block"
    if policy.quant.if_missing == "skip":
        return _skip(rule, limit, f"{what}; skipped (measure with --quant to check it)")
    return _fail(rule, None, limit, None, f'{what}; measure with --quant, or set quant.if_missing = "skip"')


def _sqnr_ok(entry: Mapping[str, Any], minimum: float | None) -> bool:
    if minimum is None:
        return True
    sqnr = entry.get("worst_sqnr_db")
    return sqnr is not None and float(sqnr) >= minimum


def _check_quant(results: Mapping[str, Any], policy: Policy) -> list[RuleOutcome]:
    rules = policy.quant
    entries = _quant_entries(results)
    has_block = entries is not None
    entries = entries or {}
    outcomes: list[RuleOutcome] = []
    for name in rules.require_pass:
        rule = f"quant.require_pass.{name}"
        entry = entries.get(name)
        if entry is None:
            outcomes.append(_missing_quant(rule, policy, name, "PASS", has_block))
            continue
        verdict = str(entry.get("verdict"))
        site = entry.get("worst_site")
        detail = f"worst SQNR {_db(entry.get('worst_sqnr_db'))} at {site}, {entry.get('failing_sites', 0)} failing sites"
        if verdict == "PASS":
            outcomes.append(_pass(rule, verdict, "PASS", site, f"{name} passes ({detail})"))
        else:
            outcomes.append(_fail(rule, verdict, "PASS", site, f"{name} does not pass: {verdict} ({detail})"))
        if rules.min_sqnr_db is not None:
            outcomes.append(_check_sqnr(name, entry, rules.min_sqnr_db))
    if rules.require_any_pass:
        outcomes.append(_check_any(entries, has_block, policy))
    return outcomes


def _db(value: Any) -> str:
    return "n/a" if value is None else f"{number(float(value))} dB"


def _check_sqnr(name: str, entry: Mapping[str, Any], minimum: float) -> RuleOutcome:
    rule = f"quant.min_sqnr_db.{name}"
    sqnr = entry.get("worst_sqnr_db")
    site = entry.get("worst_site")
    if sqnr is None:
        return _fail(
            rule,
            None,
            minimum,
            site,
            f"{name} reports no worst-site SQNR; cannot check the minimum {_db(minimum)}",
        )
    if float(sqnr) >= minimum:
        return _pass(
            rule, float(sqnr), minimum, site, f"{name} worst SQNR {_db(sqnr)} at {site} meets {_db(minimum)}"
        )
    return _fail(
        rule, float(sqnr), minimum, site, f"{name} worst SQNR {_db(sqnr)} at {site} is below {_db(minimum)}"
    )


def _check_any(entries: Mapping[str, Mapping[str, Any]], has_block: bool, policy: Policy) -> RuleOutcome:
    rule = "quant.require_any_pass"
    names = policy.quant.require_any_pass
    limit = "any of " + ", ".join(names)
    present = [n for n in names if n in entries]
    if not present:
        what = (
            "the results carry no quant block"
            if has_block is False
            else f"no verdict for any of {', '.join(names)}"
        )
        if policy.quant.if_missing == "skip":
            return _skip(rule, limit, f"{what}; skipped (measure with --quant to check it)")
        return _fail(
            rule, None, limit, None, f'{what}; measure with --quant, or set quant.if_missing = "skip"'
        )
    minimum = policy.quant.min_sqnr_db
    passing = [n for n in present if entries[n].get("verdict") == "PASS" and _sqnr_ok(entries[n], minimum)]
    floor = f" with worst SQNR ≥ {_db(minimum)}" if minimum is not None else ""
    if passing:
        return _pass(rule, ", ".join(passing), limit, None, f"passing{floor}: {', '.join(passing)}")
    worst = entries[present[0]]
    return _fail(
        rule,
        "none",
        limit,
        worst.get("worst_site"),
        f"none of {', '.join(present)} passes{floor}",
    )


def peak_growth_pct(old_peak: float, new_peak: float) -> float | None:
    """Growth of the peak in percent; None when the old peak is 0 and the new one is not."""
    if old_peak == 0:
        return 0.0 if new_peak == 0 else None
    return (new_peak - old_peak) / old_peak * 100.0


def _check_growth(
    results: Mapping[str, Any], baseline: Mapping[str, Any] | None, limit: float
) -> RuleOutcome:
    rule = "baseline.max_peak_growth_pct"
    if baseline is None:
        return _skip(rule, limit, "no baseline given; skipped (pass --baseline to compare)")
    old, new = baseline["global"], results["global"]
    old_peak, new_peak = float(old["max_abs"]), float(new["max_abs"])
    growth = peak_growth_pct(old_peak, new_peak)
    base = _identity_text(baseline)
    change = f"{number(old_peak)} at {old['site']} ({base}) → {number(new_peak)} at {new['site']}"
    if growth is None:
        return _fail(rule, None, limit, new["site"], f"peak grew from 0: {change}")
    if growth <= limit:
        return _pass(
            rule,
            growth,
            limit,
            new["site"],
            f"peak changed {growth:+.1f}% ({change}), within {number(limit)}%",
        )
    return _fail(
        rule, growth, limit, new["site"], f"peak grew {growth:+.1f}% ({change}), more than {number(limit)}%"
    )


def _check_card(policy: Policy, card: CardStatus | None) -> list[RuleOutcome]:
    outcomes: list[RuleOutcome] = []
    if policy.card.require_section:
        rule = "card.require_section"
        if card is None:
            outcomes.append(
                _fail(
                    rule,
                    "not checked",
                    "present",
                    None,
                    "the policy requires a card section but no card was checked; pass --card README.md",
                )
            )
        elif not card.present:
            outcomes.append(
                _fail(
                    rule,
                    "missing",
                    "present",
                    None,
                    "the model card has no maxact section; render and publish it before release",
                )
            )
        else:
            outcomes.append(_pass(rule, "present", "present", None, "the model card has a maxact section"))
    if policy.card.fail_on_stale:
        rule = "card.fail_on_stale"
        if card is None:
            outcomes.append(_skip(rule, "up to date", "no card checked; skipped"))
        elif not card.present:
            outcomes.append(
                _skip(rule, "up to date", "the model card has no maxact section to be stale; skipped")
            )
        elif card.stale is None:
            outcomes.append(
                _skip(rule, "up to date", "could not tell whether the card section is stale; skipped")
            )
        elif card.stale:
            outcomes.append(
                _fail(
                    rule,
                    "stale",
                    "up to date",
                    None,
                    "the card's maxact section does not match these results; re-render it before release",
                )
            )
        else:
            outcomes.append(
                _pass(
                    rule, "up to date", "up to date", None, "the card's maxact section matches these results"
                )
            )
    return outcomes


def evaluate(
    results: Mapping[str, Any],
    policy: Policy = DEFAULT_POLICY,
    *,
    baseline: Mapping[str, Any] | None = None,
    card: CardStatus | None = None,
) -> Verdict:
    """Check ``results`` against ``policy``; every configured rule yields one outcome, in a fixed order.

    Order: non-finite, global limit, component limits (model order), quant rules, baseline growth,
    card rules. Rules the policy does not configure yield nothing.
    """
    outcomes: list[RuleOutcome] = []
    if policy.fail_on_non_finite:
        outcomes.append(_check_non_finite(results))
    if policy.global_max_abs is not None:
        outcomes.append(_check_global(results, policy.global_max_abs))
    for component, limit in policy.component_max_abs:
        outcomes.append(_check_component(results, component, limit))
    outcomes.extend(_check_quant(results, policy))
    if policy.max_peak_growth_pct is not None:
        outcomes.append(_check_growth(results, baseline, policy.max_peak_growth_pct))
    outcomes.extend(_check_card(policy, card))
    return Verdict(passed=all(o.passed for o in outcomes), rules=tuple(outcomes), policy=policy.name)


# --------------------------------------------------------------------------------------------------
# Results and baselines


def validate_results(doc: Any, source: str) -> None:
    """Validate a results document; raise SchemaError (exit 2) as ``source::$.path: message``."""
    documents.validate_results(doc, source=source)


def parse_results(data: bytes | str, source: str) -> dict[str, Any]:
    """Parse and validate results JSON that did not come from a file (e.g. from the Hub)."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"{source} is not valid JSON ({exc})", hint="publish results written by maxact-card"
        ) from None
    except RecursionError:
        raise UsageError(f"{source} is nested too deeply to be a results file") from None
    validate_results(doc, source)
    return doc


def read_results(path: Path) -> dict[str, Any]:
    """Read and validate a results file (maxact_card.documents.load_results)."""
    return documents.load_results(Path(path))


_HUB_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>\S+))?")


def load_baseline(spec: str, token: str | None = None) -> dict[str, Any]:
    """Baseline results from a local results file, or from ``org/name@rev`` on the Hub (its maxact/results.json).

    A path that exists wins over a Hub id. Without ``@rev`` the Hub's default branch is read.
    """
    path = Path(spec)
    if path.is_file():
        return read_results(path)
    match = _HUB_SPEC.fullmatch(spec)
    if match is None or spec.endswith(".json"):
        raise UsageError(
            f"baseline {spec!r} is neither an existing results file nor a Hub repo id org/name[@revision]",
            hint="pass a results JSON written by maxact-card, or a model repo that has maxact/results.json",
        )
    repo_id, revision = match["repo"], match["revision"]
    from maxact_card import hub  # lazily: the gate itself never needs the network

    data = hub.read_repo_file(repo_id, HUB_RESULTS_PATH, revision, token)
    where = f"{repo_id}@{revision}" if revision else repo_id
    if data is None:
        raise UsageError(
            f"baseline {where} has no {HUB_RESULTS_PATH}",
            hint="publish results for that revision first (maxact-card publish), or pass a local results file",
        )
    return parse_results(data, f"{where}:{HUB_RESULTS_PATH}")


# --------------------------------------------------------------------------------------------------
# Diff


def _site_order(component: str | None, layer: int | None, name: str) -> tuple[int, int, str]:
    """Model order: embedding, then layer by layer (components in COMPONENTS order), then the final norm."""
    if layer is None:
        position = -1 if component == "embedding" else 1 << 30
    else:
        position = int(layer)
    rank = COMPONENTS.index(component) if component in COMPONENTS else len(COMPONENTS)
    return (position, rank, name)


def _change(old: float | None, new: float | None) -> tuple[float | None, float | None]:
    if old is None or new is None:
        return None, None
    return new - old, peak_growth_pct(old, new)


#: Run settings that change the numbers without changing the model, as `diff` names them.
RUN_SETTINGS = ("dtype", "corpus", "samples", "seed", "max_seq_len", "device")


def _identity(results: Mapping[str, Any]) -> dict[str, Any]:
    model, run, corpus = results.get("model", {}), results.get("run", {}), results.get("corpus", {})
    return {
        "model": model.get("id"),
        "revision": model.get("revision"),
        "commit_sha": model.get("commit_sha"),
        "dtype": run.get("dtype"),
        "corpus": corpus.get("id"),
        "samples": run.get("samples"),
        "tokens": run.get("tokens"),
        "seed": run.get("seed"),
        "max_seq_len": run.get("max_seq_len"),
        "device": run.get("device"),
        "weights": sorted((w.get("path"), w.get("sha256")) for w in model.get("weight_files") or ()),
    }


def _identity_text(results: Mapping[str, Any]) -> str:
    ident = _identity(results)
    text = str(ident["model"])
    if ident["revision"]:
        text += f"@{ident['revision']}"
    return text


def _non_finite_total(results: Mapping[str, Any]) -> int:
    return sum(int(s.get("non_finite", {}).get("elements", 0)) for s in results.get("sites", ()))


def _quant_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    old_entries, new_entries = _quant_entries(old) or {}, _quant_entries(new) or {}
    names = [n for n in QUANT_POLICIES if n in old_entries or n in new_entries]
    names += sorted((set(old_entries) | set(new_entries)) - set(QUANT_POLICIES))
    rows = []
    for name in names:
        o, n = old_entries.get(name, {}), new_entries.get(name, {})
        ov, nv = o.get("verdict"), n.get("verdict")
        rows.append(
            {
                "policy": name,
                "old": ov,
                "new": nv,
                "changed": ov != nv,
                "old_worst_sqnr_db": o.get("worst_sqnr_db"),
                "new_worst_sqnr_db": n.get("worst_sqnr_db"),
            }
        )
    return {
        "policies": rows,
        "recommended": {"old": _recommended(old), "new": _recommended(new)},
    }


def _recommended(results: Mapping[str, Any]) -> str | None:
    quant = results.get("quant")
    return quant.get("recommended") if isinstance(quant, Mapping) else None


def diff_results(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What changed from ``old`` to ``new`` results, in a deterministic order (JSON-ready).

    Sites and components are listed in model order; every site appears once with a status of
    ``changed``, ``unchanged``, ``added`` (only in new) or ``removed`` (only in old). Percentages are
    relative to the old value (None when it was 0 and the new one is not).
    """
    old_peak, new_peak = old["global"], new["global"]
    abs_change, pct_change = _change(float(old_peak["max_abs"]), float(new_peak["max_abs"]))
    peak = {
        "old": float(old_peak["max_abs"]),
        "new": float(new_peak["max_abs"]),
        "abs_change": abs_change,
        "pct_change": pct_change,
        "old_site": old_peak["site"],
        "new_site": new_peak["site"],
    }

    components = []
    old_comp, new_comp = old.get("components", {}), new.get("components", {})
    for name in [c for c in COMPONENTS if c in old_comp or c in new_comp] + sorted(
        (set(old_comp) | set(new_comp)) - set(COMPONENTS)
    ):
        o, n = old_comp.get(name), new_comp.get(name)
        ov = None if o is None else float(o["max_abs"])
        nv = None if n is None else float(n["max_abs"])
        a, p = _change(ov, nv)
        components.append(
            {
                "component": name,
                "status": _status(ov, nv),
                "old": ov,
                "new": nv,
                "abs_change": a,
                "pct_change": p,
                "old_site": None if o is None else o["site"],
                "new_site": None if n is None else n["site"],
            }
        )

    old_sites = {s["name"]: s for s in old.get("sites", ())}
    new_sites = {s["name"]: s for s in new.get("sites", ())}
    sites = []
    for name in set(old_sites) | set(new_sites):
        o, n = old_sites.get(name), new_sites.get(name)
        ref = n if n is not None else o
        assert ref is not None
        ov = None if o is None else float(o["max_abs"])
        nv = None if n is None else float(n["max_abs"])
        a, p = _change(ov, nv)
        sites.append(
            {
                "site": name,
                "component": ref.get("component"),
                "layer": ref.get("layer"),
                "status": _status(ov, nv),
                "old": ov,
                "new": nv,
                "abs_change": a,
                "pct_change": p,
            }
        )
    sites.sort(key=lambda s: _site_order(s["component"], s["layer"], s["site"]))
    counts = {
        k: sum(1 for s in sites if s["status"] == k) for k in ("changed", "unchanged", "added", "removed")
    }

    old_massive = sorted(set(old.get("massive", {}).get("layers", ())))
    new_massive = sorted(set(new.get("massive", {}).get("layers", ())))

    old_id, new_id = _identity(old), _identity(new)
    settings = [key for key in RUN_SETTINGS if old_id[key] != new_id[key]]
    notes = [f"{key} differs: {old_id[key]} → {new_id[key]}" for key in settings]
    same_weights = bool(old_id["weights"]) and old_id["weights"] == new_id["weights"]
    if same_weights:
        notes.append("the weights are the same (every weight file's sha256 agrees)"
                     + (": the changes come from the run settings above" if settings else ""))
    elif old_id["weights"] and new_id["weights"]:
        notes.append("the weights differ" + (", and so do run settings: not all changes are the model's"
                                             if settings else ""))
    return {
        "diff_version": 1,
        "old": old_id,
        "new": new_id,
        "same_weights": same_weights,
        "notes": notes,
        "peak": peak,
        "components": components,
        "site_counts": counts,
        "sites": sites,
        "massive_layers": {
            "old": old_massive,
            "new": new_massive,
            "became": sorted(set(new_massive) - set(old_massive)),
            "stopped": sorted(set(old_massive) - set(new_massive)),
        },
        "non_finite": {"old": _non_finite_total(old), "new": _non_finite_total(new)},
        "quant": _quant_diff(old, new),
    }


def _status(old: float | None, new: float | None) -> str:
    if old is None:
        return "added"
    if new is None:
        return "removed"
    return "unchanged" if old == new else "changed"


# --------------------------------------------------------------------------------------------------
# Rendering helpers shared by the summary and the diff


def format_value(rule: str, value: Measured) -> str:
    """A measured value or limit for people, with the unit the rule implies."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if rule.startswith("baseline."):
        return f"{value:.1f}%"
    if ".min_sqnr_db" in rule:
        return _db(value)
    if rule == "non_finite":
        return f"{int(value):,}"
    return number(value)


def signed(value: float | None) -> str:
    """A change with its sign: ``+9,003``, ``-0.5``, ``0``."""
    if value is None:
        return "—"
    if value == 0:
        return "0"
    return ("+" if value > 0 else "") + number(value)


def percent(value: float | None) -> str:
    """A relative change: ``+25.0%``; ``n/a`` when undefined (old value 0)."""
    return "n/a" if value is None else f"{value:+.1f}%"


def md_cell(value: Any) -> str:
    """Text safe inside a Markdown table cell: one line, pipes and angle brackets escaped."""
    text = "" if value is None else fmt.one_line(str(value))
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


@lru_cache(maxsize=1)
def template_environment() -> jinja2.Environment:
    """Jinja2 for Markdown: no HTML autoescape (cells go through ``md``), undefined variables are errors."""
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(template_text),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        num=number,
        num_or_dash=lambda value: "—" if value is None else number(value),
        md=md_cell,
        value_of=lambda rule, value: md_cell(format_value(rule, value)),
        signed=signed,
        percent=percent,
        db=_db,
        count=lambda value: "—" if value is None else f"{int(value):,}",
    )
    return env


def render_summary(results: Mapping[str, Any], verdict: Verdict, *, section: str = "") -> str:
    """The GitHub Action job summary (Markdown) for one checked run."""
    entries = _quant_entries(results) or {}
    quant_rows = [
        {
            "policy": name,
            "verdict": entries[name].get("verdict"),
            "worst_sqnr_db": entries[name].get("worst_sqnr_db"),
            "worst_token_sqnr_p05_db": entries[name].get("worst_token_sqnr_p05_db"),
            "worst_site": entries[name].get("worst_site"),
            "failing_sites": entries[name].get("failing_sites"),
        }
        for name in [n for n in QUANT_POLICIES if n in entries] + sorted(set(entries) - set(QUANT_POLICIES))
    ]
    return (
        template_environment()
        .get_template("summary.md.j2")
        .render(
            results=results,
            model=results["model"],
            run=results["run"],
            peak=results["global"],
            verdict=verdict,
            failed=verdict.failed,
            quant_rows=quant_rows,
            recommended=_recommended(results),
            section=section.strip(),
        )
    )


__all__ = [
    "DEFAULT_POLICY",
    "CardStatus",
    "Policy",
    "RuleOutcome",
    "Verdict",
    "diff_results",
    "evaluate",
    "format_value",
    "load_baseline",
    "load_policy",
    "parse_results",
    "peak_growth_pct",
    "read_results",
    "render_summary",
    "template_environment",
    "validate_results",
]
