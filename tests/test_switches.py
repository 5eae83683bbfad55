"""The switches are one documented table: the code reads only names in it, and the docs show it."""

from __future__ import annotations

import re

import pytest

from maxact_card.switches import SWITCHES, markdown_table, switched_off, turned_off
from tests import paths

DOC = paths.ROOT / "docs" / "switches.md"


def test_the_docs_show_the_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert markdown_table() in text, "docs/switches.md: paste maxact_card.switches.markdown_table() again"


def test_every_switch_read_in_the_code_is_in_the_table_and_where_it_says() -> None:
    read: dict[str, set[str]] = {}
    for path in (paths.ROOT / "maxact_card").rglob("*.py"):
        module = ".".join(path.relative_to(paths.ROOT).with_suffix("").parts).removesuffix(".__init__")
        for name in re.findall(r'switched_off\("(MAXACT_CARD_\w+)"\)', path.read_text(encoding="utf-8")):
            read.setdefault(name, set()).add(module)
    assert set(read) == set(SWITCHES)
    for name, modules in read.items():
        assert SWITCHES[name].module in modules, (name, modules)


def test_a_switch_is_off_only_when_set_to_an_off_word(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAXACT_CARD_FUSE", raising=False)
    assert not switched_off("MAXACT_CARD_FUSE")
    for value, off in (("0", True), ("false", True), ("off", True), ("1", False), ("yes", False)):
        monkeypatch.setenv("MAXACT_CARD_FUSE", value)
        assert switched_off("MAXACT_CARD_FUSE") is off
    monkeypatch.delenv("MAXACT_CARD_FUSE")
    with turned_off("MAXACT_CARD_FUSE"):
        assert switched_off("MAXACT_CARD_FUSE")
    assert not switched_off("MAXACT_CARD_FUSE")


def test_a_misspelt_switch_is_refused() -> None:
    with pytest.raises(KeyError, match="MAXACT_CARD_FUSED is not a switch"):
        switched_off("MAXACT_CARD_FUSED")
