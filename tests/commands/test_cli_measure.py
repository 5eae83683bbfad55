"""`maxact-card measure` through the CLI runner: every family, the text report, and every bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from maxact_card.cli import app
from maxact_card.fmt import number
from maxact_card.measure.results import load_results
from tests import factory
from tests.factory import TEXTS, write_corpus

GATED = {
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "phi3",
    "olmo2",
    "qwen2_5_vl",
}
NOT_GATED = {"gpt2", "gpt_neox"}
MOE = {"qwen3_moe", "mixtral", "gpt_oss", "qwen3_next"}  # every layer routed; deepseek_v3 routes layer 1 only
POST_NORM = {"gemma2", "gemma3_text", "gemma3", "olmo2"}
MULTIMODAL = {"gemma3", "qwen2_5_vl"}
PLANT = 1234.5




def _invoke(args: list[str], **kw: Any) -> Any:
    return CliRunner().invoke(app, args, **kw)


@pytest.fixture(scope="module")
def shelf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every family's tiny checkpoint, saved once, plus the corpus."""
    root = tmp_path_factory.mktemp("checkpoints")
    for arch in factory.ARCHITECTURES:
        factory.save(arch, root / arch)
    write_corpus(root / "corpus.jsonl")
    return root


def _layers_of(site_pattern: str) -> set[int]:
    """`blocks.{0-1,3}.mlp.hook_pre` → {0, 1, 3}."""
    m = re.fullmatch(r"blocks\.\{([\d,\-]+)\}\..+", site_pattern)
    assert m, site_pattern
    out: set[int] = set()
    for part in m.group(1).split(","):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def _missing(doc: dict[str, Any], suffix: str) -> dict[int, str]:
    """Layer → reason, for the missing sites ending in `suffix`."""
    out: dict[int, str] = {}
    for m in doc["missing_sites"]:
        if m["site"].endswith(suffix) and m["site"].startswith("blocks.{"):
            out.update({layer: m["reason"] for layer in _layers_of(m["site"])})
    return out


# --- every family ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", factory.ARCHITECTURES)
def test_every_family_measures(shelf: Path, tmp_path: Path, arch: str) -> None:
    out = tmp_path / "r.json"
    res = _invoke(
        [
            "measure",
            str(shelf / arch),
            "--corpus",
            str(shelf / "corpus.jsonl"),
            "--out",
            str(out),
            "--format",
            "json",
        ]
    )
    assert res.exit_code == 0, res.stderr
    assert res.stdout == out.read_text(encoding="utf-8")
    doc = load_results(out)
    assert doc == json.loads(res.stdout)
    # the results and their per-channel companion, no temp file left beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.channels.safetensors", "r.json"]

    sites = {s["name"]: s for s in doc["sites"]}
    layers = doc["model"]["num_layers"]
    assert layers == 2 and doc["run"]["samples"] == len(TEXTS)
    # how the forward ran: nothing is compiled on a CPU; only the multimodal checkpoints keep the
    # attention mask (their vision encoders declare is_causal False)
    keeps_mask = arch in ("gemma3", "qwen2_5_vl")
    # and every site's statistics updated by torch, once in the one batch these few samples make
    assert doc["run"]["forward"] == {
        "attention_mask": keeps_mask, "compiled": [], "eager": [], "fused": [],
        "compile": {"chosen": False, "predicted_loop_s": None,
                    "why": "not on CUDA: norms and rotary run as the model has them"},
        "statistics": {"cuda": 0, "triton": 0, "torch": len(doc["sites"])},
    }
    assert "hook_embed" in sites and "ln_final.hook_normalized" in sites
    for i in range(layers):
        assert f"blocks.{i}.hook_resid_post" in sites and f"blocks.{i}.hook_attn_out" in sites
    assert doc["global"]["max_abs"] == max(s["max_abs"] for s in doc["sites"])
    assert doc["global"]["site"] in sites

    if arch in GATED:
        for i in range(layers):
            assert sites[f"blocks.{i}.mlp.hook_pre"]["component"] == "gate"
            assert sites[f"blocks.{i}.mlp.hook_pre"]["width"] == 64
    if arch in NOT_GATED:
        assert not any(name.endswith("mlp.hook_pre") for name in sites)
        assert set(_missing(doc, ".mlp.hook_pre")) == set(range(layers))
        assert all("gate" in reason for reason in _missing(doc, ".mlp.hook_pre").values())
        for i in range(layers):
            assert sites[f"blocks.{i}.mlp.hook_post"]["component"] == "down_proj_input"
    config = factory.config(arch)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts = next(
        (
            getattr(text, a)
            for a in ("num_experts", "num_local_experts", "n_routed_experts")
            if isinstance(getattr(text, a, None), int)
        ),
        None,
    )
    routed = range(layers) if arch in MOE else [1] if arch == "deepseek_v3" else []
    for i in routed:
        router = sites[f"blocks.{i}.mlp.hook_router_logits"]
        assert router["component"] == "router" and router["width"] == experts == 4
    if arch not in MOE and arch != "deepseek_v3":
        assert not any(name.endswith("hook_router_logits") for name in sites)
    if arch == "deepseek_v3":
        assert sites["blocks.0.mlp.hook_pre"]["component"] == "gate"
        assert "blocks.0.mlp.hook_router_logits" not in sites
    if arch in POST_NORM:
        for i in range(layers):
            attn = sites[f"blocks.{i}.hook_attn_out"]
            assert attn["module"].endswith(f"layers.{i}.post_attention_layernorm")
            assert "post-attention norm" in attn["read"]
            assert sites[f"blocks.{i}.hook_mlp_out"]["module"].endswith("post_feedforward_layernorm")
    else:
        assert not any(s["module"].endswith("post_attention_layernorm") for s in doc["sites"])
    if arch in MULTIMODAL:
        assert all("language_model" in s["module"] for s in doc["sites"])
        assert not any(re.search(r"visual|vision", s["module"]) for s in doc["sites"])


# --- the text report -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = factory.tokenizer()("The quick")["input_ids"][1]

    def edit(model: Any) -> None:
        model.model.embed_tokens.weight[tok, 9] = PLANT

    return factory.save("llama", tmp_path_factory.mktemp("planted") / "ckpt", edit=edit)


def test_gemm_inputs_are_measured_only_when_asked(shelf: Path, tmp_path: Path) -> None:
    """--gemm-inputs (or MAXACT_CARD_GEMM_INPUTS) adds the Linear-input sites with their readers, and the
    run says so; without it the sites are those of every run before it, and a section renders either way."""
    gemm = ("attn_input", "o_proj_input", "mlp_input")
    args = ["measure", str(shelf / "llama"), "--corpus", str(shelf / "corpus.jsonl"), "--format", "json"]
    docs = {}
    for key, extra, env in (("off", [], {}), ("flag", ["--gemm-inputs"], {}),
                            ("env", [], {"MAXACT_CARD_GEMM_INPUTS": "1"})):
        out = tmp_path / f"{key}.json"
        res = _invoke([*args, *extra, "--out", str(out)], env=env)
        assert res.exit_code == 0, res.stderr
        docs[key] = load_results(out)  # schema-valid
    assert docs["off"]["run"]["gemm_inputs"] is False and docs["flag"]["run"]["gemm_inputs"] is True
    assert [s["name"] for s in docs["flag"]["sites"]] == [s["name"] for s in docs["env"]["sites"]]
    off = [s["name"] for s in docs["off"]["sites"]]
    assert not any(s["component"] in gemm for s in docs["off"]["sites"])
    on = {s["name"]: s for s in docs["flag"]["sites"]}
    assert [n for n in on if on[n]["component"] not in gemm] == off
    for i in range(2):
        attn_input = on[f"blocks.{i}.ln1.hook_normalized"]
        assert attn_input["component"] == "attn_input" and attn_input["read"] == "input"
        assert attn_input["readers"] == [f"model.layers.{i}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
        assert on[f"blocks.{i}.attn.hook_z"]["readers"] == [f"model.layers.{i}.self_attn.o_proj"]
        assert on[f"blocks.{i}.ln2.hook_normalized"]["readers"] == [f"model.layers.{i}.mlp.gate_proj",
                                                                    f"model.layers.{i}.mlp.up_proj"]
        assert on[f"blocks.{i}.mlp.hook_post"]["readers"] == [f"model.layers.{i}.mlp.down_proj"]
    assert set(gemm) <= set(docs["flag"]["components"])
    res = _invoke(["render", str(tmp_path / "flag.json")])
    assert res.exit_code == 0, res.stderr
    assert "Attention input" in res.stdout and "o_proj input" in res.stdout and "MLP input" in res.stdout


def test_kv_cache_sites_and_their_fp8_check_are_there_only_when_asked(shelf: Path, tmp_path: Path) -> None:
    """--kv-cache (or MAXACT_CARD_KV_CACHE) adds each layer's queries, keys and values with their heads,
    and --quant checks the keys and values under every policy, FP8 with one static scale per layer
    (amax / 448) among them; a section renders with them."""
    kv = ("query", "key_cache", "value_cache")
    args = ["measure", str(shelf / "llama"), "--corpus", str(shelf / "corpus.jsonl"), "--format", "json"]
    docs = {}
    for key, extra, env in (("off", ["--quant"], {}), ("flag", ["--kv-cache", "--quant"], {}),
                            ("env", [], {"MAXACT_CARD_KV_CACHE": "1"})):
        out = tmp_path / f"{key}.json"
        res = _invoke([*args, *extra, "--out", str(out)], env=env)
        assert res.exit_code == 0, res.stderr
        docs[key] = load_results(out)  # schema-valid
    assert docs["off"]["run"]["kv_cache"] is False and docs["flag"]["run"]["kv_cache"] is True
    assert not any(s["component"] in kv for s in docs["off"]["sites"])
    on = {s["name"]: s for s in docs["flag"]["sites"]}
    assert [n for n in on if on[n]["component"] not in kv] == [s["name"] for s in docs["off"]["sites"]]
    assert [s["name"] for s in docs["env"]["sites"]] == list(on)
    for i in range(2):
        for name, component, heads in (("hook_rot_q", "query", 4), ("hook_rot_k", "key_cache", 2),
                                       ("hook_v", "value_cache", 2)):
            site = on[f"blocks.{i}.attn.{name}"]
            assert (site["component"], site["module"], site["heads"]) == (component, f"model.layers.{i}.self_attn",
                                                                          heads)
            assert max(site["head_max_abs"]) == site["max_abs"] and len(site["head_max_abs"]) == heads
    checked = {row["site"]: row for row in docs["flag"]["quant"]["sites"]}
    cache = [n for n in on if on[n]["component"] in ("key_cache", "value_cache")]
    assert cache and set(cache) <= set(checked)
    assert not any(on[n]["component"] == "query" for n in checked)  # queries are not cached: not checked
    assert all("fp8-e4m3-static" in checked[n]["policies"] for n in cache)
    res = _invoke(["render", str(tmp_path / "flag.json")])
    assert res.exit_code == 0, res.stderr
    assert "KV cache: keys" in res.stdout and "KV cache: values" in res.stdout


def test_a_quant_site_set_the_run_does_not_measure_is_refused_before_measuring(shelf: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    base = ["measure", str(shelf / "llama"), "--corpus", str(shelf / "corpus.jsonl"), "--quant", "--out", str(out)]
    res = _invoke([*base, "--quant-sites", "kv"])
    assert res.exit_code == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == ("error: --quant-sites kv selects no site of this model as measured; "
                                  "measure them with --kv-cache, or choose another --quant-sites")
    assert not out.exists()
    assert _invoke([*base, "--quant-sites", "kv", "--kv-cache"]).exit_code == 0


def test_text_output_shows_the_global_max_and_its_site(planted: Path, shelf: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = _invoke(["measure", str(planted), "--corpus", str(shelf / "corpus.jsonl"), "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    doc = load_results(out)
    assert doc["global"]["max_abs"] == pytest.approx(PLANT, rel=1e-3)
    lines = res.stdout.splitlines()
    head = next(line for line in lines if line.startswith("global max|a|"))
    shown = head.split()[2]
    assert shown == number(doc["global"]["max_abs"]) and shown.startswith("1,23"), head
    where = next(line for line in lines if line.startswith("where"))
    assert doc["global"]["site"] in where
    assert f"channel {doc['global']['location']['channel']}" in where
    assert "results written to" in res.stderr
    assert not res.stdout.lstrip().startswith("{")


def test_text_output_names_the_module_path(planted: Path, shelf: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = _invoke(["measure", str(planted), "--corpus", str(shelf / "corpus.jsonl"), "--out", str(out)])
    assert res.exit_code == 0, res.stderr
    module = load_results(out)["global"]["module"]
    where = next(line for line in res.stdout.splitlines() if line.startswith("where"))
    assert f"[{module}]" in where, where


# --- bad inputs -------------------------------------------------------------------------------------
def _corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _corrupt_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header now is not JSON
    path.write_bytes(bytes(data))


def _bad(case: str, shelf: Path, work: Path) -> list[str]:
    corpus = str(shelf / "corpus.jsonl")
    llama = str(shelf / "llama")
    if case == "missing path":
        return [str(work / "no-such-model"), "--corpus", corpus]
    if case == "no config.json":
        folder = work / "empty-model"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"")
        return [str(folder), "--corpus", corpus]
    if case.startswith("corrupt safetensors"):
        folder = work / "broken"
        shutil.copytree(llama, folder)
        (_corrupt_truncate if case.endswith("truncated") else _corrupt_header)(folder / "model.safetensors")
        return [str(folder), "--corpus", corpus]
    if case == "empty corpus":
        empty = work / "empty.jsonl"
        empty.write_text("", encoding="utf-8")
        return [llama, "--corpus", str(empty)]
    if case == "sample over --max-seq-len":
        return [llama, "--corpus", corpus, "--max-seq-len", "12"]
    if case == "--samples 0":
        return [llama, "--corpus", corpus, "--samples", "0"]
    if case == "unknown --dtype":
        return [llama, "--corpus", corpus, "--dtype", "float8"]
    raise AssertionError(case)


BAD_INPUTS = {
    "missing path": "does not exist",
    "no config.json": "config.json",
    "corrupt safetensors, truncated": "corrupt",
    "corrupt safetensors, header": "corrupt",
    "empty corpus": "no samples",
    "sample over --max-seq-len": "over the limit of 12",
    "--samples 0": "--samples",
    "unknown --dtype": "float8",
}


def _assert_usage_error(res: Any, message: str, work: Path, before: set[str]) -> None:
    assert res.exit_code == 2, (res.exit_code, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert message in lines[0]
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert res.stdout == ""
    assert {p.name for p in work.iterdir()} == before  # no --out file, no temp file


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_usage_error(shelf: Path, tmp_path: Path, case: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = _bad(case, shelf, work)
    before = {p.name for p in work.iterdir()}
    res = _invoke(["measure", *args, "--out", str(work / "r.json"), "--format", "json"])
    _assert_usage_error(res, BAD_INPUTS[case], work, before)


def test_truncate_lets_a_long_sample_pass(shelf: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = _invoke(
        [
            "measure",
            str(shelf / "llama"),
            "--corpus",
            str(shelf / "corpus.jsonl"),
            "--max-seq-len",
            "12",
            "--truncate",
            "--out",
            str(out),
            "--format",
            "json",
        ]
    )
    assert res.exit_code == 0, res.stderr
    doc = load_results(out)
    assert doc["run"]["truncate"] is True and doc["run"]["max_seq_len"] == 12
    assert doc["run"]["tokens"] == 12 * len(TEXTS)  # every sample is longer than 12 tokens
    assert all(e["location"]["position"] < 12 for s in doc["sites"] for e in s["top_k"])


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=factory.VOCAB,
        max_position_embeddings=512,
    )
    folder = tmp_path_factory.mktemp("bert") / "ckpt"
    transformers.BertModel(config).save_pretrained(folder)
    factory.tokenizer().save_pretrained(folder)
    return folder


def test_a_non_causal_checkpoint_is_refused(bert_dir: Path, shelf: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    res = _invoke(
        [
            "measure",
            str(bert_dir),
            "--corpus",
            str(shelf / "corpus.jsonl"),
            "--out",
            str(work / "r.json"),
            "--format",
            "json",
        ]
    )
    _assert_usage_error(res, "not a causal language model", work, set())


# --- unexpected failures and the debug switch ------------------------------------------------------
def test_unexpected_exception_is_exit_3_with_one_line(
    shelf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("kernel exploded\nsecond line of detail")

    monkeypatch.setattr("maxact_card.measure.run.run_measurement", boom)
    args = [
        "measure",
        str(shelf / "llama"),
        "--corpus",
        str(shelf / "corpus.jsonl"),
        "--out",
        str(tmp_path / "r.json"),
    ]
    res = _invoke(args)
    assert res.exit_code == 3
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unexpected RuntimeError: kernel exploded")
    assert "MAXACT_CARD_DEBUG=1" in lines[0] and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []

    debug = _invoke(args, env={"MAXACT_CARD_DEBUG": "1"})
    assert debug.exit_code == 3
    assert "Traceback" in debug.stderr and "kernel exploded" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith("error: unexpected RuntimeError")


def test_usage_error_traceback_only_with_debug(shelf: Path, tmp_path: Path) -> None:
    args = ["measure", str(shelf / "llama"), "--corpus", str(shelf / "corpus.jsonl"), "--samples", "0"]
    assert "Traceback" not in _invoke(args).stderr
    debug = _invoke(args, env={"MAXACT_CARD_DEBUG": "1"})
    assert debug.exit_code == 2 and "Traceback" in debug.stderr


# --- stderr stays quiet when the output is not for a person ----------------------------------------
def test_stderr_holds_no_progress_when_not_a_terminal(
    shelf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.utils.logging as hf_logging

    # the state a user's shell has: conftest's HF_HUB_DISABLE_PROGRESS_BARS hides the bug otherwise
    monkeypatch.setattr(hf_logging, "_tqdm_active", True)
    ok = _invoke(
        ["measure", str(shelf / "llama"), "--corpus", str(shelf / "corpus.jsonl"), "--format", "json"]
    )
    assert ok.exit_code == 0
    long = _invoke(
        ["measure", str(shelf / "llama"), "--corpus", str(shelf / "corpus.jsonl"), "--max-seq-len", "12"]
    )
    assert long.exit_code == 2
    assert ok.stderr == ""
    assert len(long.stderr.splitlines()) == 1
