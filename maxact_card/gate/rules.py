"""The gate's rules, one check each, and `evaluate`: results + policy (+ baseline, + card status) -> verdict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maxact_card.fmt import number
from maxact_card.gate.diff import identity_text, peak_growth_pct, quant_entries
from maxact_card.gate.policy import DEFAULT_POLICY, FP16_MAX, Policy
from maxact_card.gate.verdict import CardStatus, Measured, RuleOutcome, Verdict


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
    entries = quant_entries(results)
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
        detail = f"worst SQNR {db_text(entry.get('worst_sqnr_db'))} at {site}, {entry.get('failing_sites', 0)} failing sites"
        if verdict == "PASS":
            outcomes.append(_pass(rule, verdict, "PASS", site, f"{name} passes ({detail})"))
        else:
            outcomes.append(_fail(rule, verdict, "PASS", site, f"{name} does not pass: {verdict} ({detail})"))
        if rules.min_sqnr_db is not None:
            outcomes.append(_check_sqnr(name, entry, rules.min_sqnr_db))
    if rules.require_any_pass:
        outcomes.append(_check_any(entries, has_block, policy))
    return outcomes


def db_text(value: Any) -> str:
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
            f"{name} reports no worst-site SQNR; cannot check the minimum {db_text(minimum)}",
        )
    if float(sqnr) >= minimum:
        return _pass(
            rule, float(sqnr), minimum, site, f"{name} worst SQNR {db_text(sqnr)} at {site} meets {db_text(minimum)}"
        )
    return _fail(
        rule, float(sqnr), minimum, site, f"{name} worst SQNR {db_text(sqnr)} at {site} is below {db_text(minimum)}"
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
    floor = f" with worst SQNR ≥ {db_text(minimum)}" if minimum is not None else ""
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


def _check_growth(
    results: Mapping[str, Any], baseline: Mapping[str, Any] | None, limit: float
) -> RuleOutcome:
    rule = "baseline.max_peak_growth_pct"
    if baseline is None:
        return _skip(rule, limit, "no baseline given; skipped (pass --baseline to compare)")
    old, new = baseline["global"], results["global"]
    old_peak, new_peak = float(old["max_abs"]), float(new["max_abs"])
    growth = peak_growth_pct(old_peak, new_peak)
    base = identity_text(baseline)
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
