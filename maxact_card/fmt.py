"""Numbers formatted for people: `35,328` not `35328.0`, `7.0×10^5` for very large, `0.0123` for small.

Every function is pure and deterministic, so a re-rendered card is byte-identical to the first one.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Mapping
from typing import Any

#: From this magnitude on, numbers are written in scientific notation (two significant digits).
SCI_LARGE = 1e5
#: Below this magnitude (and above zero), numbers are written in scientific notation.
SCI_SMALL = 1e-4
#: Significant digits for numbers below 1,000 (larger ones are rounded to integers).
SIG_DIGITS = 4


def _sign(x: float) -> str:
    return "-" if x < 0 else ""


def _sci(x: float, digits: int = 2) -> str:
    """`7.0×10^5`: a mantissa with `digits` significant digits and a power of ten."""
    mantissa, exponent = f"{abs(x):.{digits - 1}e}".split("e")
    return f"{_sign(x)}{mantissa}×10^{int(exponent)}"


def number(x: float | None, *, sig: int = SIG_DIGITS) -> str:
    """A measured value for a reader.

    0 → `0`; below 10^-4 → `1.8×10^-5`; below 1,000 → four significant digits without trailing
    zeros (`0.0123`, `12.5`, `180.5`, `8`); below 10^5 → an integer with thousands separators
    (`35,328`); from 10^5 on → `7.0×10^5`. Negative values carry a leading `-`. `sig` sets the
    significant digits below 1,000.
    """
    if x is None:
        return "n/a"
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return f"{_sign(x)}∞"
    if x == 0:
        return "0"
    mag = abs(x)
    if mag >= SCI_LARGE or round(mag) >= SCI_LARGE:  # 99,999.6 rounds to 10^5: say so
        return _sci(x)
    if mag < SCI_SMALL:
        return _sci(x)
    if mag >= 1000:
        return f"{round(x):,}"
    text = f"{mag:#.{sig}g}"
    if "e" in text:  # cannot happen in this range, but never emit a bare exponent
        return _sci(x)
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    if text in ("0", ""):
        return "0"
    if float(text) >= 1000:  # 999.96 rounds up to 1000 with four digits
        return f"{_sign(x)}{round(mag):,}"
    return f"{_sign(x)}{text}"


def count(n: float | None) -> str:
    """A count, exact, with thousands separators: `183,424`."""
    if n is None:
        return "n/a"
    return f"{int(n):,}"


def ratio(x: float | None) -> str:
    """A multiple, always to `SIG_DIGITS` significant digits below 1,000 so that a column of them
    reads alike (`442.4×` beside `445.0×`, not `445×`): `2,400×`, `18.75×`."""
    if x is None:
        return "n/a"
    mag = abs(float(x))
    if 0 < mag < 1000 and mag >= SCI_SMALL:
        text = f"{float(x):#.{SIG_DIGITS}g}"
        if "e" not in text and float(text.replace(",", "")) < 1000:
            return f"{text.rstrip('.')}×"
    return f"{number(x)}×"


def db(x: float | None) -> str:
    """A signal-to-noise ratio in decibels with one decimal: `23.4 dB`."""
    if x is None:
        return "n/a"
    x = float(x)
    if math.isinf(x):
        return f"{_sign(x)}∞ dB"
    if math.isnan(x):
        return "NaN dB"
    text = f"{x:.1f}"
    if text == "-0.0":
        text = "0.0"
    return f"{text} dB"


def size(n: int) -> str:
    """A size in bytes, in binary units with one decimal: `15.3 GiB`, `512.0 MiB`, `300 B`."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def printable(text: str) -> str:
    """`text` with control, format and separator characters (newlines, U+2028, bidi marks, ESC)
    written as escapes, so that it stays on its line and cannot move the cursor or recolour it."""
    out = []
    for ch in text:
        category = unicodedata.category(ch)
        if category[0] == "C" or category in ("Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


#: Characters that end a line somewhere (CommonMark, a terminal, a browser, a GitHub runner).
_LINE_BREAKS = "\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def one_line(text: str) -> str:
    """`text` as one line of prose: every line break a space, other control and format characters
    (ESC, NUL, bidi overrides, zero-width marks) written as escapes (`printable`)."""
    return printable("".join(" " if ch in _LINE_BREAKS else ch for ch in str(text)))


def token_parts(location: Mapping[str, Any]) -> tuple[str, str]:
    """How people see a measured token: its text quoted and escaped (JSON's escapes, then
    `printable`), or its vocabulary spelling where the text alone reads as nothing (a lone byte of a
    multi-byte character decodes to U+FFFD); and a note with its id, always. `('" the"', 'id 262')`,
    `('"Ð"', 'id 155, as the vocabulary spells it')`."""
    text, piece = str(location.get("token", "")), location.get("piece")
    readable = bool(text) and "\ufffd" not in text
    shown = text if readable or not isinstance(piece, str) else piece
    note = f"id {location.get('token_id')}" + ("" if shown == text else ", as the vocabulary spells it")
    return printable(json.dumps(shown, ensure_ascii=False)), note


def token_label(location: Mapping[str, Any]) -> str:
    """`token_parts` as one string: `" the" (id 262)`."""
    quoted, note = token_parts(location)
    return f"{quoted} ({note})"


def layer_ranges(layers: list[int]) -> str:
    """`[1, 2, 3, 7, 9, 10]` → `1–3, 7, 9–10`: a long list of layers kept short."""
    ordered = sorted(set(layers))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}–{ordered[j]}")
        i = j + 1
    return ", ".join(parts)


__all__ = ["count", "db", "layer_ranges", "number", "one_line", "printable", "ratio", "size", "token_label",
           "token_parts"]
