"""Pull a tiny model from the local Hub server and measure it through the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from maxact_card.cli import app
from maxact_card.measure.results import load_results
from tests.hub_server import HubServer, tiny_llama_files


def test_measure_pulls_only_what_it_needs_and_records_the_commit(hub_server: HubServer, tmp_path: Path) -> None:
    files = tiny_llama_files(tmp_path / "build")
    hub_server.create_repo("org/tiny", files=files)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in ("Hello there, world.", "def f(x): return x")) + "\n")
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["measure", "org/tiny", "--corpus", str(corpus), "--device", "cpu",
                                      "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    results = load_results(out)
    state = hub_server.repo_state("org/tiny")
    main_sha = state["branches"]["main"] if isinstance(state, dict) and "branches" in state else None
    assert results["model"]["source"] == "hub" and results["model"]["id"] == "org/tiny"
    assert results["model"]["commit_sha"] is not None and len(results["model"]["commit_sha"]) == 40
    if main_sha is not None:
        assert results["model"]["commit_sha"] == main_sha
    weights = {w["path"]: w["sha256"] for w in results["model"]["weight_files"]}
    assert weights == {"model.safetensors": hashlib.sha256(files["model.safetensors"]).hexdigest()}
    downloaded = set(hub_server.downloads("org/tiny"))
    assert "model.safetensors" in downloaded and "config.json" in downloaded
    assert not {p for p in downloaded if p.endswith((".bin", ".onnx", ".gguf", ".png", ".jpg"))}


def test_a_refused_file_download_says_what_the_hub_answered(hub_server: HubServer, tmp_path: Path,
                                                            monkeypatch: Any) -> None:
    """A HEAD answered 429 reaches us wrapped in LocalEntryNotFoundError: we say rate limiting, not
    that the Hub is unreachable."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    hub_server.create_repo("org/limited", files=tiny_llama_files(tmp_path / "build"))
    hub_server.fail_files["config.json"] = 429
    result = CliRunner().invoke(app, ["measure", "org/limited", "--device", "cpu"])
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: the Hub at ") and "is rate limiting requests" in result.stderr


def test_xet_and_disabled_repo_errors_are_named() -> None:
    from huggingface_hub import errors

    from maxact_card.hub.client import Hub, translate

    hub = Hub.from_env(None)
    if hasattr(errors, "XetDownloadError"):
        found = translate(errors.XetDownloadError("boom"), hub, "org/m", "main", False)
        assert found is not None and "Xet storage failed" in found.message and "HF_HUB_DISABLE_XET=1" in (found.hint or "")
