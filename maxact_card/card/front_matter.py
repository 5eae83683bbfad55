"""Read a model card: its YAML front matter, its body, and the markers around the section.

The section lives between two marker lines, `<!-- maxact-card:start -->` and
`<!-- maxact-card:end -->`. Parsing keeps the card's bytes as they are (line endings, key order,
non-ASCII text), so that splicing can change only the section and the `maxact:` key.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

import yaml

from maxact_card.errors import UsageError

START_MARKER = "<!-- maxact-card:start -->"
END_MARKER = "<!-- maxact-card:end -->"


# --- errors ---------------------------------------------------------------------------------------
class CardProblem(str, enum.Enum):
    """What is wrong with a card that cannot be spliced or validated (each is exit 2)."""

    broken_markers = "broken markers"
    duplicate_sections = "duplicate sections"
    unreadable_front_matter = "unreadable front matter"
    unreadable_card = "unreadable card"


class CardError(UsageError):
    """A card that cannot be parsed; `problem` names what is wrong."""

    def __init__(self, problem: CardProblem, message: str, *, hint: str | None = None) -> None:
        super().__init__(f"{problem.value}: {message}", hint=hint)
        self.problem = problem


# --- parsing a card -------------------------------------------------------------------------------
@dataclass(frozen=True)
class FrontMatter:
    """The YAML block: `text[start:end]` is its content (between the `---` lines)."""

    start: int
    end: int
    data: dict[str, Any]


@dataclass(frozen=True)
class CardParts:
    """A parsed card: where the front matter and the section are, and the line ending it uses."""

    text: str
    eol: str
    bom: str
    front_matter: FrontMatter | None
    body_start: int
    section: tuple[int, int] | None  # start of the start-marker line, end of the end-marker line (no EOL)
    section_lines: tuple[int, int] | None  # 1-based line numbers of the two markers

    @property
    def section_text(self) -> str | None:
        """The section as it stands in the card, markers included."""
        return None if self.section is None else self.text[self.section[0] : self.section[1]]


_FM_OPEN = re.compile(r"\A(\ufeff?)([ \t\r\n]*---[ \t]*(?:\r\n|\n))")
_FM_CLOSE = re.compile(r"^---[ \t]*(?:\r\n|\n|\Z)", re.MULTILINE)
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _line_no(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def detect_eol(text: str) -> str:
    index = text.find("\n")
    return "\r\n" if index > 0 and text[index - 1] == "\r" else "\n"


class _FrontMatterLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing aliases: a few lines of `&a [*b, *b, ...]` expand to gigabytes
    (a billion laughs), and model-card metadata never needs one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"an alias (*{event.anchor}) repeats another value; write the value out instead",
                event.start_mark,
            )
        return super().compose_node(parent, index)


def _parse_front_matter(text: str) -> tuple[str, FrontMatter | None, int]:
    opening = _FM_OPEN.match(text)
    if opening is None:
        bom = "\ufeff" if text.startswith("\ufeff") else ""
        return bom, None, len(bom)
    start = opening.end()
    closing = _FM_CLOSE.search(text, start)
    if closing is None:
        raise CardError(
            CardProblem.unreadable_front_matter,
            "the front matter opened by `---` on line 1 is never closed",
            hint="add a line `---` after the YAML metadata",
        )
    yaml_text = text[start : closing.start()]
    try:
        data = yaml.load(yaml_text, Loader=_FrontMatterLoader)
    except RecursionError:
        raise CardError(CardProblem.unreadable_front_matter, "the YAML front matter is nested too deeply",
                        hint="model-card metadata is a few levels of `key: value`") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + _line_no(text, start)})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CardError(
            CardProblem.unreadable_front_matter,
            f"the YAML front matter does not parse{where}: {problem}",
            hint="fix the YAML between the `---` lines",
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CardError(
            CardProblem.unreadable_front_matter,
            f"the YAML front matter is a {type(data).__name__}, not a mapping of keys",
            hint="model-card metadata must be `key: value` lines",
        )
    return opening.group(1), FrontMatter(start=start, end=closing.start(), data=data), closing.end()


def _find_markers(text: str, body_start: int) -> list[tuple[str, int, int]]:
    """(kind, line start offset, line end offset without EOL) of every marker line outside code fences."""
    found: list[tuple[str, int, int]] = []
    fence: str | None = None
    offset = body_start
    for line in text[body_start:].splitlines(keepends=True):
        content = line.rstrip("\r\n")
        fence_match = _FENCE.match(content)
        if fence_match:
            mark = fence_match.group(1)
            if fence is None:
                fence = mark
            elif mark[0] == fence[0] and len(mark) >= len(fence) and content.strip() == mark:
                fence = None
        elif fence is None and len(content) - len(content.lstrip(" ")) <= 3:
            stripped = content.strip()
            if stripped == START_MARKER:
                found.append(("start", offset, offset + len(content)))
            elif stripped == END_MARKER:
                found.append(("end", offset, offset + len(content)))
        offset += len(line)
    return found


def decode_card(data: bytes, *, source: str) -> str:
    """A card's bytes as text; a card that is not UTF-8 is unreadable (exit 2)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CardError(
            CardProblem.unreadable_card,
            f"{source} is not UTF-8 text (byte {exc.start})",
            hint="save the card as UTF-8",
        ) from None


def parse_card(card_text: str) -> CardParts:
    """Locate the front matter and the maxact section of a card.

    Raises CardError (a UsageError, exit 2) naming the problem: broken markers (a start without
    an end, an end before any start), duplicate sections, or unreadable front matter.
    """
    bom, front_matter, body_start = _parse_front_matter(card_text)
    markers = _find_markers(card_text, body_start)
    pairs: list[tuple[int, int, int, int]] = []
    open_start: tuple[int, int] | None = None
    for kind, line_start, line_end in markers:
        line = _line_no(card_text, line_start)
        if kind == "start":
            if open_start is not None:
                raise CardError(
                    CardProblem.broken_markers,
                    f"the start marker on line {_line_no(card_text, open_start[0])} has no end marker "
                    f"before the next start marker on line {line}",
                    hint=f"restore `{END_MARKER}` after the section, or delete the partial section, then re-render",
                )
            open_start = (line_start, line_end)
        else:
            if open_start is None:
                raise CardError(
                    CardProblem.broken_markers,
                    f"the end marker on line {line} comes before any start marker",
                    hint=f"restore `{START_MARKER}` before the section, or delete the stray marker, then re-render",
                )
            pairs.append((open_start[0], line_end, _line_no(card_text, open_start[0]), line))
            open_start = None
    if open_start is not None:
        raise CardError(
            CardProblem.broken_markers,
            f"the start marker on line {_line_no(card_text, open_start[0])} has no end marker",
            hint=f"restore `{END_MARKER}` after the section, or delete the partial section, then re-render",
        )
    if len(pairs) > 1:
        where = ", ".join(f"lines {a}–{b}" for _, _, a, b in pairs)
        raise CardError(
            CardProblem.duplicate_sections,
            f"the card has {len(pairs)} maxact sections ({where})",
            hint="delete all but one of them (markers included), then re-render",
        )
    section = (pairs[0][0], pairs[0][1]) if pairs else None
    section_lines = (pairs[0][2], pairs[0][3]) if pairs else None
    return CardParts(
        text=card_text,
        eol=detect_eol(card_text),
        bom=bom,
        front_matter=front_matter,
        body_start=body_start,
        section=section,
        section_lines=section_lines,
    )
