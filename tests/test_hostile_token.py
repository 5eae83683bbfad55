"""The Hub token never reaches the user's screen or a file: a token with a character no HTTP header
may hold is bad input (exit 2, not echoed); surrounding white space is stripped; and any message
that would quote the token, ours or a library's, shows `hf_***` instead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from maxact_card.cli import app
from maxact_card.commands._common import clean_token
from maxact_card.errors import UsageError
from tests.hub_server import HubServer, tiny_llama_files

SECRET = "hf_PlantedSecretToken0123456789"


def _everything(res: Any, *paths: Path) -> str:
    text = res.stdout + res.stderr
    for path in paths:
        if path.is_dir():
            text += "".join(p.read_text(encoding="utf-8", errors="replace") for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            text += path.read_text(encoding="utf-8", errors="replace")
    return text


@pytest.mark.parametrize("bad", [SECRET[:10] + "\x07" + SECRET[10:], SECRET[:8] + "\x1b[2J" + SECRET[8:],
                                 SECRET[:8] + " " + SECRET[8:], SECRET[:8] + "é" + SECRET[8:],
                                 SECRET[:8] + "\u2028" + SECRET[8:], "\u200b" + SECRET])
def test_a_token_no_header_can_hold_is_bad_input_and_not_echoed(bad: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError) as raised:
        clean_token(bad, source="--token")
    assert SECRET[:8] not in str(raised.value)
    for argv, env in ((["--token", bad], {}), ([], {"MAXACT_CARD_TOKEN": bad}), ([], {"HF_TOKEN": bad})):
        res = CliRunner().invoke(app, ["measure", "org/model", "--device", "cpu", *argv], env=env)
        assert res.exit_code == 2, res.stderr
        assert len(res.stderr.splitlines()) == 1 and "holds a space, control or non-ASCII character" in res.stderr
        assert SECRET[:8] not in _everything(res)


@pytest.mark.parametrize("padded", [SECRET + "\r", SECRET + "\n", f"  {SECRET}\r\n", "\t" + SECRET])
def test_surrounding_white_space_is_stripped(padded: str) -> None:
    assert clean_token(padded, source="--token") == SECRET
    assert clean_token(" \r\n", source="--token") is None


def test_a_message_that_quotes_the_token_shows_it_redacted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Any text reaching the user from a failure (a library's, say) is scrubbed, debug traceback too."""

    def leaky(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"Illegal header value b'Bearer {SECRET}\\r' (and again: {SECRET})")

    monkeypatch.setattr("maxact_card.measure.run.measure_run", leaky)
    for env in ({}, {"MAXACT_CARD_DEBUG": "1"}):
        res = CliRunner().invoke(app, ["check", "org/model", "--token", SECRET + "\r", "--device", "cpu"], env=env)
        assert res.exit_code == 3
        assert SECRET not in _everything(res) and "Bearer hf_***" in res.stderr
    res = CliRunner().invoke(app, ["check", "org/model", "--device", "cpu"], env={"HF_TOKEN": SECRET})
    assert res.exit_code == 3 and SECRET not in _everything(res) and "hf_***" in res.stderr


def test_a_padded_token_measures_from_the_hub_and_is_written_nowhere(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.create_repo("org/private", files=tiny_llama_files(tmp_path / "build"), private=True)
    hub_server.add_token(SECRET, "alice")
    hub_server.grant("org/private", "alice")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "Hello there, world."}) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["measure", "org/private", "--corpus", str(corpus), "--device", "cpu",
                                   "--out", str(out / "r.json"), "--token", f" {SECRET}\r\n"])
    assert res.exit_code == 0, res.stderr
    assert SECRET not in _everything(res, out)
