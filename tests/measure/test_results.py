"""Results documents: what measure writes validates, broken copies fail with their JSON path, writes are atomic."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from maxact_card.cli import app
from maxact_card.documents import OLDEST_READABLE_VERSION, RESULTS_SCHEMA, SCHEMA_VERSION
from maxact_card.errors import SchemaError, UsageError
from maxact_card.measure import results as results_mod
from maxact_card.measure.results import dumps, load_results, validate_results, write_results
from maxact_card.resources import load_schema
from tests import factory, paths

EXAMPLE = paths.TESTS / "data" / "results_example.json"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n",
    "Activations peak in the residual stream at a few channels of the first token.",
    "The lazy dog sleeps in the stream.",
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("results")
    ckpt = factory.save("qwen3_moe", root / "ckpt")
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    out = root / "r.json"
    res = CliRunner().invoke(
        app, ["measure", str(ckpt), "--corpus", str(corpus), "--out", str(out), "--format", "json"]
    )
    assert res.exit_code == 0, res.stderr
    return {"path": out, "doc": json.loads(out.read_text(encoding="utf-8"))}


def _write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def test_measured_results_validate(measured: dict[str, Any]) -> None:
    doc = load_results(measured["path"])
    assert doc == measured["doc"]
    assert doc["schema_version"] == results_mod.SCHEMA_VERSION
    assert doc["model"]["source"] == "local" and doc["model"]["architecture"] == "Qwen3MoeForCausalLM"
    assert all(len(w["sha256"]) == 64 for w in doc["model"]["weight_files"])
    assert doc["corpus"]["samples"] == len(TEXTS)
    # the file is the canonical text of the document
    assert measured["path"].read_text(encoding="utf-8") == dumps(doc)


@pytest.mark.parametrize(
    "break_it, path, words",
    [
        (
            lambda d: d["global"].__setitem__("max_abs", "large"),
            "$.global.max_abs",
            "'large' is not of type 'number'",
        ),
        (lambda d: d.pop("corpus"), "$", "'corpus' is a required property"),
        (lambda d: d["sites"][0].pop("count"), "$.sites[0]", "'count' is a required property"),
        (
            lambda d: d["sites"][1]["location"].__setitem__("channel", -1),
            "$.sites[1].location.channel",
            "minimum",
        ),
        (
            lambda d: d["global"].__setitem__("component", "kernel"),
            "$.global.component",
            "'kernel' is not one of",
        ),
    ],
)
def test_a_broken_copy_names_the_json_path(
    measured: dict[str, Any], tmp_path: Path, break_it: Any, path: str, words: str
) -> None:
    doc = copy.deepcopy(measured["doc"])
    break_it(doc)
    broken = _write(tmp_path / "broken.json", doc)
    with pytest.raises(SchemaError) as info:
        load_results(broken)
    line = info.value.line()
    assert line.startswith(f"{broken}::{path}: "), line
    assert words in line
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2


def test_readers_are_optional_and_must_be_module_paths() -> None:
    """A results file written before sites named their readers still validates; a reader is a string."""
    old = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert not any("readers" in s for s in old["sites"]) and "gemm_inputs" not in old["run"]
    validate_results(old)
    new = copy.deepcopy(old)
    new["sites"][0]["readers"] = ["model.layers.0.mlp.down_proj"]
    new["run"]["gemm_inputs"] = True
    validate_results(new)
    new["sites"][0]["readers"] = [3]
    with pytest.raises(SchemaError):
        validate_results(new)


def test_several_errors_are_counted(measured: dict[str, Any]) -> None:
    doc = copy.deepcopy(measured["doc"])
    doc["global"]["max_abs"] = "large"
    doc["run"]["seed"] = "zero"
    with pytest.raises(SchemaError) as info:
        validate_results(doc, source="r.json")
    assert "(1 other error; fix this one first)" in info.value.line()


def test_an_older_schema_version_asks_for_a_rerun(measured: dict[str, Any], tmp_path: Path) -> None:
    doc = copy.deepcopy(measured["doc"])
    doc["schema_version"] = OLDEST_READABLE_VERSION - 1
    old = _write(tmp_path / "old.json", doc)
    with pytest.raises(SchemaError) as info:
        load_results(old)
    assert info.value.line() == (
        f"{old}::$.schema_version: schema version {OLDEST_READABLE_VERSION - 1} is older than "
        f"{OLDEST_READABLE_VERSION}; re-run `maxact-card measure` to write a valid results file"
    )


def test_a_version_2_file_is_still_read_but_cannot_name_a_companion(measured: dict[str, Any], tmp_path: Path) -> None:
    """Version 3 only added `channels`: a version 2 document (without it) still loads; the schema's
    version enum admits both and nothing else."""
    doc = copy.deepcopy(measured["doc"])
    doc.pop("channels", None)
    doc["schema_version"] = 2
    assert load_results(_write(tmp_path / "v2.json", doc))["schema_version"] == 2
    assert load_schema(RESULTS_SCHEMA)["properties"]["schema_version"]["enum"] == [2, 3]


def test_a_newer_schema_version_asks_for_an_upgrade(measured: dict[str, Any]) -> None:
    doc = copy.deepcopy(measured["doc"])
    doc["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(SchemaError) as info:
        validate_results(doc, source="r.json")
    line = info.value.line()
    assert line.startswith(f"r.json::$.schema_version: schema version {SCHEMA_VERSION + 1} is newer than")
    assert "upgrade maxact-card" in line


def test_the_schema_carries_the_version_the_code_writes() -> None:
    schema = load_schema(RESULTS_SCHEMA)
    assert schema["properties"]["schema_version"]["enum"][-1] == SCHEMA_VERSION
    assert schema["properties"]["schema_version"]["enum"][0] == OLDEST_READABLE_VERSION
    assert schema["$id"].endswith(f"/maxact-results/v{SCHEMA_VERSION}.schema.json")
    # version 2 added the quant block, 3 the per-channel companion; bump it (and the $id) with any change
    assert SCHEMA_VERSION == 3


# A results file of schema version 1, the version before the quant block, read by every command.
OLD_LINE = (
    "error: {path}::$.schema_version: schema version 1 is older than 2; "
    "re-run `maxact-card measure` to write a valid results file\n"
)


@pytest.fixture
def version_1(tmp_path: Path) -> dict[str, Path]:
    current = json.loads(EXAMPLE.read_text(encoding="utf-8"))
    old = dict(current, schema_version=1)
    return {
        "old": _write(tmp_path / "old.json", old),
        "current": _write(tmp_path / "current.json", current),
        "model": tmp_path,  # `check` reads its baseline before it loads any model
    }


@pytest.mark.parametrize(
    "args",
    [
        ["render", "{old}"],
        ["diff", "{old}", "{current}"],
        ["diff", "{current}", "{old}"],
        ["publish", "org/model", "--results", "{old}", "--dry-run"],
        ["check", "{model}", "--baseline", "{old}", "--no-quant"],
    ],
    ids=["render", "diff-old", "diff-new", "publish", "check-baseline"],
)
def test_every_command_refuses_a_version_1_file_in_one_line(
    version_1: dict[str, Path], args: list[str]
) -> None:
    res = CliRunner().invoke(app, [a.format(**version_1) for a in args])
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    assert res.stderr == OLD_LINE.format(path=version_1["old"])


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_unreadable_files_are_usage_errors(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=words):
        load_results(path)


def test_shipped_example_validates() -> None:
    # the example stays a version 2 file (no companion beside it): it also shows that version 2 still reads
    assert load_results(EXAMPLE)["schema_version"] == 2


# --- writing ---------------------------------------------------------------------------------------
def test_write_results_round_trips(measured: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "nested" / "r.json"
    written = write_results(measured["doc"], out)  # without channels: no companion, none named
    assert load_results(out) == written and "channels" not in written
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]


def test_write_results_is_atomic(
    measured: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_results(measured["doc"], tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_write_results_keeps_the_old_file_when_replacing_fails(
    measured: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r.json"
    out.write_text("previous", encoding="utf-8")
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_results(measured["doc"], out)
    assert out.read_text(encoding="utf-8") == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_results_validates_first(measured: dict[str, Any], tmp_path: Path) -> None:
    doc = copy.deepcopy(measured["doc"])
    doc["global"]["max_abs"] = "large"
    with pytest.raises(SchemaError, match=r"::\$\.global\.max_abs: "):
        write_results(doc, tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_a_site_that_is_all_nan_is_reported_not_dropped(tmp_path: Path) -> None:
    def nan_final_norm(model: Any) -> None:
        model.model.norm.weight[0] = float("nan")  # every token's ln_final vector holds a NaN

    ckpt = factory.save("llama", tmp_path / "ckpt", edit=nan_final_norm)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), encoding="utf-8")
    res = CliRunner().invoke(app, ["measure", str(ckpt), "--corpus", str(corpus), "--format", "json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    reported = {s["name"]: s["non_finite"]["tokens"] for s in doc["sites"]}
    missing = {m["site"]: m["reason"] for m in doc["missing_sites"]}
    assert reported.get("ln_final.hook_normalized") == doc["run"]["tokens"] or (
        "non-finite" in missing.get("ln_final.hook_normalized", "")
    )


def test_non_finite_numbers_are_never_written(measured: dict[str, Any]) -> None:
    doc = copy.deepcopy(measured["doc"])
    doc["sites"][0]["mean"] = float("nan")
    with pytest.raises(ValueError):
        dumps(doc)


def test_the_results_of_the_deepest_model_we_support_stay_far_below_the_hubs_file_limit(tmp_path: Path) -> None:
    """The Hub takes regular (non-LFS) files up to 10 MiB. A DeepSeek-V3-shaped model (61 layers,
    MoE from layer 3, tiny widths: the width of a site does not change how much it records)
    has 249 sites; its results with --quant must stay well under that limit."""
    import torch
    import transformers

    from tests import factory

    cfg = transformers.AutoConfig.for_model(
        "deepseek_v3", vocab_size=len(factory.tokenizer()), hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=61, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=3, q_lora_rank=32,
        kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=4, topk_group=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "ckpt")
    factory.tokenizer().save_pretrained(tmp_path / "ckpt")
    factory.write_corpus(tmp_path / "c.jsonl")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["measure", str(tmp_path / "ckpt"), "--corpus", str(tmp_path / "c.jsonl"),
                                   "--device", "cpu", "--quant", "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    assert len(load_results(out)["sites"]) >= 240
    assert out.stat().st_size < 4 * 1024 * 1024  # 1.5 MB when written
