"""A real pretrained model: SmolLM2-135M-Instruct (GGUF, dequantized), measured on the built-in corpus.

Random weights have no massive activations; a trained model does. `.ci/run` fetches the file
(`python -m maxact_card.examples fetch-smollm2 .cache/smollm2`); MAXACT_SMOLLM2_GGUF overrides.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maxact_card.cli import app
from maxact_card.examples import SMOLLM2_FILE
from maxact_card.measure.results import load_results

GGUF = Path(os.environ.get("MAXACT_SMOLLM2_GGUF", Path(__file__).resolve().parent.parent / ".cache" / "smollm2" / SMOLLM2_FILE))


@pytest.mark.slow
@pytest.mark.skipif(not GGUF.is_file(), reason=f"{GGUF} is absent: run python -m maxact_card.examples fetch-smollm2 .cache/smollm2")
def test_smollm2_shows_a_massive_activation_on_the_first_token(tmp_path: Path) -> None:
    out = tmp_path / "smollm2.json"
    result = CliRunner().invoke(
        app, ["measure", str(GGUF), "--samples", "16", "--max-seq-len", "128", "--out", str(out), "--format", "json"]
    )
    assert result.exit_code == 0, result.output
    results = load_results(out)
    assert json.loads(result.stdout) == results
    assert results["model"]["source"] == "gguf" and results["model"]["num_layers"] == 30
    assert results["corpus"]["id"] == "maxact-builtin-v1"
    peak = results["global"]
    # The peak sits in the residual stream, on the first token of a sample, in one channel ...
    assert peak["component"] in ("residual", "mlp")
    assert peak["location"]["position"] == 0
    residual = results["components"]["residual"]
    assert residual["location"]["position"] == 0
    site = next(s for s in results["sites"] if s["name"] == residual["site"])
    # ... and it is massive in Sun et al.'s sense: |a| > 100 and > 1000x the median |a| of its layer's
    # hidden state (thousands of times, for a peak of order 10^4).
    assert residual["max_abs"] > 100
    assert residual["max_abs"] > 1000 * site["quantiles"]["median"]
    # One channel carries it on every one of the site's top-K tokens (first tokens, and the
    # attention-sink positions of the repeated-token edge cases).
    assert {t["location"]["channel"] for t in site["top_k"]} == {residual["location"]["channel"]}
    assert site["top_channels"][0]["channel"] == residual["location"]["channel"]
    # Lone bytes of multi-byte characters decode to U+FFFD: the results carry the vocabulary's
    # spelling of each (the multilingual samples hold many), and the card shows that instead.
    lone = [t["location"] for s in results["sites"] for t in s["top_k"] if "\ufffd" in t["location"]["token"]]
    assert lone and all(loc.get("piece") and "\ufffd" not in loc["piece"] for loc in lone)
    card = CliRunner().invoke(app, ["render", str(out)]).stdout
    assert "\ufffd" not in card
