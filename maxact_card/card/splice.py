"""Put a fresh section and front-matter summary into a card.

Splicing replaces only what lies between the markers (inclusive) and the `maxact:` key of the YAML
front matter; every other byte of the card (front matter key order and formatting, other sections,
CRLF or LF, the trailing newline, non-ASCII text) is kept. A card without a section gets it
appended at the end, after one blank line: the end is the one place that never splits someone
else's section, and the reader finds the measurement after the author's prose.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from maxact_card.card.front_matter import CardError, CardParts, CardProblem, detect_eol, parse_card
from maxact_card.card.paths import DEFAULT_CHART_PATH, DEFAULT_RESULTS_PATH
from maxact_card.card.section import SUMMARY_KEY, card_summary, md_text, render_section, summary_yaml

_SUMMARY_LINE = re.compile(rf"^{SUMMARY_KEY}[ \t]*:(?:[ \t]|\r?\n|$)")
_CONTINUATION = re.compile(r"^(?:[ \t]|\r?\n|$|-(?:[ \t]|\r?\n|$))")


def _replace_summary(yaml_text: str, block: str) -> str:
    """Replace (or append) the top-level `maxact:` block of a YAML text; every other line is kept."""
    lines = yaml_text.splitlines(keepends=True)
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(lines):
        if _SUMMARY_LINE.match(lines[i]):
            j = i + 1
            while j < len(lines) and _CONTINUATION.match(lines[j]):
                j += 1
            while j > i + 1 and lines[j - 1].strip() == "":  # trailing blank lines belong to what follows
                j -= 1
            spans.append((i, j))
            i = j
        else:
            i += 1
    if not spans:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"  # cannot happen for text between `---` lines, but never glue two keys
        return "".join(lines) + block
    # Duplicate top-level keys would be invalid YAML for most readers: keep the first place only.
    for start, end in reversed(spans[1:]):
        del lines[start:end]
    first_start, first_end = spans[0]
    lines[first_start:first_end] = [block]
    return "".join(lines)


def _fresh_front_matter(results: Mapping[str, Any]) -> str:
    """Minimal metadata for a card that has none, written by huggingface_hub's ModelCardData."""
    from huggingface_hub import ModelCardData

    source = results.get("model", {}).get("source")
    data = ModelCardData(library_name="transformers") if source in ("hub", "local") else ModelCardData()
    text = data.to_yaml()
    return "" if text.strip() in ("", "{}") else text.rstrip("\n") + "\n"


def _title(results: Mapping[str, Any]) -> str:
    return f"# {md_text(results.get('model', {}).get('id', 'Model card'))}\n"


def splice_card(
    card_text: str | None,
    results: Mapping[str, Any],
    *,
    chart_path: str = DEFAULT_CHART_PATH,
    results_path: str = DEFAULT_RESULTS_PATH,
    exports: Mapping[str, str] | None = None,
) -> str:
    """Put the rendered section and the `maxact:` summary into a card; None (or blank) → a new card.

    `exports` (export format -> file name relative to the results file) is linked from the section
    and listed in the summary (see `render_section`).

    Only the section (between the markers) and the `maxact:` front-matter block change; the
    section is appended after one blank line when the card has none. Raises CardError for a card
    that cannot be parsed (broken markers, duplicate sections, unreadable front matter).
    """
    section = render_section(results, chart_path=chart_path, results_path=results_path, exports=exports)
    summary = card_summary(results, chart_path=chart_path, results_path=results_path, exports=exports)
    block = section.rstrip("\n")
    summary_text = summary_yaml(summary)

    if card_text is None or card_text.strip(" \t\r\n\ufeff") == "":
        eol = detect_eol(card_text or "")
        text = (
            "---\n"
            + _fresh_front_matter(results)
            + summary_text
            + "---\n\n"
            + _title(results)
            + "\n"
            + section
        )
        text = text.replace("\n", eol)
        _verify(text, None, block.replace("\n", eol), summary)
        return text

    parts = parse_card(card_text)
    eol = parts.eol
    block_eol = block.replace("\n", eol)
    text = card_text
    if parts.section is not None:
        start, end = parts.section
        text = text[:start] + block_eol + text[end:]
    else:
        if text.endswith(("\n\n", "\r\n\r\n", "\n\r\n")):
            separator = ""
        elif text.endswith("\n"):
            separator = eol
        else:
            separator = eol + eol
        trailing = eol if text.endswith("\n") else ""
        text = text + separator + block_eol + trailing

    summary_block = summary_text.replace("\n", eol)
    if parts.front_matter is None:
        fresh = ("---\n" + _fresh_front_matter(results)).replace("\n", eol) + summary_block + "---" + eol
        body = text[len(parts.bom) :]
        # One blank line between the new metadata and the card, unless the card begins with one.
        # A byte-order mark is dropped: before `---` it hides the metadata from huggingface_hub.
        gap = "" if body.startswith(("\n", "\r\n")) else eol
        text = fresh + gap + body
    else:
        fm = parts.front_matter
        text = text[: fm.start] + _replace_summary(text[fm.start : fm.end], summary_block) + text[fm.end :]
    _verify(text, parts, block_eol, summary)
    return text


def _verify(text: str, before: CardParts | None, block: str, summary: Mapping[str, Any]) -> None:
    """Re-parse the spliced card: the section and summary are in place and no other key changed."""
    try:
        after = parse_card(text)
    except CardError as exc:
        raise CardError(
            CardProblem.unreadable_front_matter,
            f"adding the `{SUMMARY_KEY}:` block would break the card ({exc.message})",
            hint="write the front matter as plain block-style `key: value` lines, then re-render",
        ) from None
    if after.section_text != block:
        raise CardError(
            CardProblem.broken_markers,
            "the section did not land between the markers after splicing",
            hint="report this with the card attached",
        )
    data = after.front_matter.data if after.front_matter else {}
    if data.get(SUMMARY_KEY) != dict(summary):
        raise CardError(
            CardProblem.unreadable_front_matter,
            f"the front matter could not be edited safely (the `{SUMMARY_KEY}:` key did not read back)",
            hint="write the front matter as plain block-style `key: value` lines, then re-render",
        )
    if before is not None and before.front_matter is not None:
        old = {k: v for k, v in before.front_matter.data.items() if k != SUMMARY_KEY}
        new = {k: v for k, v in data.items() if k != SUMMARY_KEY}
        if old != new:
            raise CardError(
                CardProblem.unreadable_front_matter,
                "the front matter could not be edited safely (another key changed)",
                hint="write the front matter as plain block-style `key: value` lines, then re-render",
            )
