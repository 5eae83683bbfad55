"""The verdict and the results as Markdown: the Action's job summary and `check --format markdown`."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import jinja2

from maxact_card import fmt
from maxact_card.fmt import number
from maxact_card.gate.diff import quant_entries, recommended
from maxact_card.gate.policy import QUANT_POLICIES
from maxact_card.gate.rules import db_text
from maxact_card.gate.verdict import Measured, Verdict
from maxact_card.resources import template_text


def format_value(rule: str, value: Measured) -> str:
    """A measured value or limit for people, with the unit the rule implies."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    if rule.startswith("baseline."):
        return f"{value:.1f}%"
    if ".min_sqnr_db" in rule:
        return db_text(value)
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
        db=db_text,
        count=lambda value: "—" if value is None else f"{int(value):,}",
    )
    return env


def render_summary(results: Mapping[str, Any], verdict: Verdict, *, section: str = "") -> str:
    """The GitHub Action job summary (Markdown) for one checked run."""
    entries = quant_entries(results) or {}
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
            recommended=recommended(results),
            section=section.strip(),
        )
    )
