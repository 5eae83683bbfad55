"""`maxact-card export` and the per-channel companion: planted answers on a tiny model, round trips
through each consumer's own loader, integrity of the companion, and exports published on the local Hub."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from typer.testing import CliRunner, Result

from maxact_card.cli import app
from maxact_card.documents import companion_path, load_results, write_results
from tests import factory

PLANTED = 5  # the channel of layer 0's input norm weight multiplied by 1000
TEXTS = factory.TEXTS


def invoke(*args: Any, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("export")

    def plant(model: Any) -> None:
        model.model.layers[0].input_layernorm.weight[PLANTED] *= 1000.0

    ckpt = factory.save("llama", root / "ckpt", edit=plant)
    corpus = factory.write_corpus(root / "corpus.jsonl")
    out = root / "run" / "results.json"
    res = invoke("measure", ckpt, "--corpus", corpus, "--gemm-inputs", "--device", "cpu", "--dtype", "float32",
                 "--batch-size", "3", "--out", out)
    assert res.exit_code == 0, res.stderr
    return {"ckpt": ckpt, "path": out, "doc": load_results(out), "root": root}


def reference_act_scales(ckpt: Path) -> dict[str, torch.Tensor]:
    """SmoothQuant's calibration, written here independently: a forward pre-hook on every nn.Linear of
    the decoder layers keeps the running max|x| per input channel, in fp32, one sample at a time (so
    no padding), over the corpus the run measured."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    scales: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(dim=0)
            scales[name] = torch.maximum(scales[name], x) if name in scales else x

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    with torch.no_grad():
        for text in TEXTS:
            model(torch.tensor([tokenizer(text)["input_ids"]]))
    for handle in handles:
        handle.remove()
    return scales


# --- the companion --------------------------------------------------------------------------------
def test_the_companion_holds_every_sites_channel_max_and_its_sha256(measured: dict[str, Any]) -> None:
    doc, path = measured["doc"], measured["path"]
    companion = path.parent / "results.channels.safetensors"
    assert companion_path(path) == companion
    data = companion.read_bytes()
    assert doc["schema_version"] == 3
    assert doc["channels"] == {"file": companion.name, "sha256": hashlib.sha256(data).hexdigest(),
                               "sites": len(doc["sites"])}
    vectors = load_safetensors(data)
    assert set(vectors) == {s["name"] for s in doc["sites"]}
    for site in doc["sites"]:
        vector = vectors[site["name"]]
        assert vector.dtype == torch.float32 and vector.shape == (site["width"],)
        top = site["top_channels"][0]
        assert int(vector.argmax()) == top["channel"] and float(vector.max()) == top["max_abs"] == site["max_abs"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.channels.safetensors", "results.json"]


def test_the_smoothquant_export_equals_an_independent_hook_bit_for_bit(measured: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "act_scales.pt"
    res = invoke("export", measured["path"], "--format", "smoothquant", "--out", out)
    assert res.exit_code == 0, res.stderr
    assert res.stdout == f"{out}\n"
    scales = torch.load(out, weights_only=True)
    reference = reference_act_scales(measured["ckpt"])
    assert set(scales) == set(reference) and len(scales) == 2 * 7  # q k v o gate up down per layer
    for name, expected in reference.items():
        assert scales[name].dtype == torch.float32 and scales[name].shape == expected.shape, name
        assert torch.equal(scales[name], expected), name
    for proj in ("q_proj", "k_proj", "v_proj"):
        vector = scales[f"model.layers.0.self_attn.{proj}"]
        assert int(vector.argmax()) == PLANTED


def test_the_planted_channel_leads_the_outlier_map(measured: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "outliers.json"
    assert invoke("export", measured["path"], "--format", "outliers", "--out", out).exit_code == 0
    outliers = json.loads(out.read_text(encoding="utf-8"))
    assert outliers["format"] == "maxact-outliers" and outliers["version"] == 1
    layer0 = next(entry for entry in outliers["layers"] if entry["layer"] == 0)
    site = next(s for s in layer0["sites"] if s["site"] == "blocks.0.ln1.hook_normalized")
    first = site["channels"][0]
    source = next(s for s in measured["doc"]["sites"] if s["name"] == "blocks.0.ln1.hook_normalized")
    assert first["channel"] == PLANTED and first["max_abs"] == source["max_abs"]
    assert first["ratio_to_median"] == pytest.approx(source["max_abs"] / source["quantiles"]["median"])
    carried = [t for t in source["top_k"] if t["location"]["channel"] == PLANTED]
    assert carried and [t["position"] for t in first["tokens"]] == [t["location"]["position"] for t in carried]
    assert [t["token"] for t in first["tokens"]] == [t["location"]["token"] for t in carried]
    assert site["readers"] == [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert [entry["layer"] for entry in outliers["layers"]] == sorted(
        {s["layer"] for s in measured["doc"]["sites"]}, key=lambda x: -1 if x is None else x)


@pytest.mark.parametrize("scheme, qmax", [(None, 448.0), ("fp8", 448.0), ("int8", 127.0)])
def test_input_scales_are_amax_over_qmax_per_linear(measured: dict[str, Any], tmp_path: Path,
                                                     scheme: str | None, qmax: float) -> None:
    out = tmp_path / "input_scales.safetensors"
    res = invoke("export", measured["path"], "--format", "input-scales", "--out", out,
                 *(["--scheme", scheme] if scheme else []))
    assert res.exit_code == 0, res.stderr
    expected = {f"{reader}.input_scale": site["max_abs"] / qmax
                for site in measured["doc"]["sites"] if site.get("readers") for reader in site["readers"]}
    with safe_open(out, framework="pt") as f:
        assert set(f.keys()) == set(expected)
        assert f.metadata()["scheme"] == (scheme or "fp8")
        for name, value in expected.items():
            tensor = f.get_tensor(name)
            assert tensor.dtype == torch.float32 and tensor.shape == ()
            assert tensor.item() == torch.tensor(value, dtype=torch.float32).item()


# --- KV-cache scales, on hand-built KV sites --------------------------------------------------------
KV_HEADS, Q_HEADS, HEAD_DIM = 2, 4, 8


def _kv_site(template: dict[str, Any], layer: int, component: str, head_max: list[float]) -> dict[str, Any]:
    hook = {"query": "hook_rot_q", "key_cache": "hook_rot_k", "value_cache": "hook_v"}[component]
    site = copy.deepcopy(template)
    site.pop("readers", None)
    site.update(name=f"blocks.{layer}.attn.{hook}", component=component, layer=layer,
                module=f"model.layers.{layer}.self_attn", width=len(head_max) * HEAD_DIM, heads=len(head_max),
                head_max_abs=head_max, max_abs=max(head_max), massive=None)
    site["top_channels"] = [{"channel": 0, "max_abs": max(head_max)}]
    return site


@pytest.fixture
def with_kv(measured: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """The measured results plus KV sites (as `--kv-cache` writes them), companion and all."""
    doc = copy.deepcopy(measured["doc"])
    template = doc["sites"][0]
    planted = {0: ([3.5, 896.0], [1.0, 2.25], [10.0, 20.0, 30.0, 448.0]),
               1: ([0.0, 0.0], [7.0, 0.5], [1.0, 2.0, 3.0, 4.0])}
    for layer, (keys, values, queries) in planted.items():
        doc["sites"] += [_kv_site(template, layer, "key_cache", keys), _kv_site(template, layer, "value_cache", values),
                         _kv_site(template, layer, "query", queries)]
    vectors = load_safetensors(measured["path"].with_name("results.channels.safetensors").read_bytes())
    for site in doc["sites"]:
        vectors.setdefault(site["name"], torch.full((site["width"],), site["max_abs"]))
    path = tmp_path / "kv.json"
    write_results(doc, path, channels=save_safetensors(vectors))
    return {"path": path, "doc": doc}


def test_kv_scales_are_amax_over_448_under_the_names_vllm_loads(with_kv: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "kv.safetensors"
    res = invoke("export", with_kv["path"], "--format", "kv-scales", "--out", out)
    assert res.exit_code == 0, res.stderr
    expected = {
        "model.layers.0.self_attn.k_scale": 896.0 / 448, "model.layers.0.self_attn.v_scale": 2.25 / 448,
        "model.layers.0.self_attn.q_scale": 448.0 / 448, "model.layers.1.self_attn.k_scale": 1.0,  # never left 0
        "model.layers.1.self_attn.v_scale": 7.0 / 448, "model.layers.1.self_attn.q_scale": 4.0 / 448,
    }
    with safe_open(out, framework="pt") as f:
        assert set(f.keys()) == set(expected)
        assert f.metadata()["strategy"] == "tensor"
        for name, value in expected.items():
            tensor = f.get_tensor(name)
            assert tensor.dtype == torch.float32 and tensor.shape == ()
            assert tensor.item() == torch.tensor(value, dtype=torch.float32).item(), name


def test_per_head_kv_scales_have_one_entry_per_kv_head(with_kv: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "kv.safetensors"
    res = invoke("export", with_kv["path"], "--format", "kv-scales", "--per-head", "--out", out)
    assert res.exit_code == 0, res.stderr
    with safe_open(out, framework="pt") as f:
        assert f.metadata()["strategy"] == "attn_head"
        k = f.get_tensor("model.layers.0.self_attn.k_scale")
        assert k.dtype == torch.float32 and k.tolist() == [3.5 / 448, 896.0 / 448]
        # the 4 query heads share the 2 KV heads in pairs: each pair's max
        q = f.get_tensor("model.layers.0.self_attn.q_scale")
        assert q.tolist() == pytest.approx([20.0 / 448, 448.0 / 448], rel=1e-7) and q.shape == (KV_HEADS,)
        assert f.get_tensor("model.layers.1.self_attn.k_scale").tolist() == [1.0, 1.0]


def test_kv_scales_without_kv_sites_say_what_to_measure(measured: dict[str, Any], tmp_path: Path) -> None:
    res = invoke("export", measured["path"], "--format", "kv-scales", "--out", tmp_path / "kv.safetensors")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "has no KV-cache sites: measure with --kv-cache" in res.stderr
    assert not (tmp_path / "kv.safetensors").exists()


# --- bad input ---------------------------------------------------------------------------------------
@pytest.fixture
def copied(measured: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / "r.json"
    path.write_bytes(measured["path"].read_bytes())
    (tmp_path / "r.channels.safetensors").write_bytes(measured["path"].with_name("results.channels.safetensors")
                                                      .read_bytes())
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["channels"]["file"] = "r.channels.safetensors"
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", ["smoothquant", "input-scales", "outliers"])
@pytest.mark.parametrize("damage", ["altered", "missing"])
def test_a_missing_or_altered_companion_is_one_line_exit_2(copied: Path, fmt: str, damage: str) -> None:
    companion = copied.with_name("r.channels.safetensors")
    if damage == "missing":
        companion.unlink()
    else:
        data = bytearray(companion.read_bytes())
        data[-1] ^= 1
        companion.write_bytes(bytes(data))
    out = copied.with_name("out.bin")
    res = invoke("export", copied, "--format", fmt, "--out", out)
    assert res.exit_code == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1
    assert ("is missing beside it" if damage == "missing" else "r.channels.safetensors of") in res.stderr
    assert not out.exists()


def test_validate_refuses_an_altered_companion(copied: Path, measured: dict[str, Any]) -> None:
    folder = copied.parent / "card"
    (folder / "maxact").mkdir(parents=True)
    results = folder / "maxact" / "results.json"
    results.write_bytes(measured["path"].read_bytes())
    companion = folder / "maxact" / "results.channels.safetensors"
    companion.write_bytes(measured["path"].with_name("results.channels.safetensors").read_bytes())
    assert invoke("render", results, "--card", folder / "README.md").exit_code == 0
    ok = invoke("validate", folder)
    assert "its companion's sha256 matches" in ok.stdout, ok.stdout
    companion.write_bytes(companion.read_bytes()[:-4] + b"\0\0\0\0")
    res = invoke("validate", folder)
    assert res.exit_code == 2 and res.stdout == "" and res.stderr.count("\n") == 1
    assert "the companion file results.channels.safetensors of maxact/results.json has sha256" in res.stderr
    explicit = invoke("validate", folder, "--results", results)
    assert explicit.exit_code == 2 and f"of {results} has sha256" in explicit.stderr
    companion.unlink()
    assert "is missing beside it" in invoke("validate", folder).stderr


def test_a_version_2_file_still_renders_but_cannot_give_smoothquant(measured: dict[str, Any], tmp_path: Path) -> None:
    old = copy.deepcopy(measured["doc"])
    old["schema_version"] = 2
    del old["channels"]
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(old), encoding="utf-8")
    assert invoke("render", path).exit_code == 0
    assert invoke("diff", path, measured["path"]).exit_code == 0
    res = invoke("export", path, "--format", "smoothquant", "--out", tmp_path / "s.pt")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1
    assert res.stderr == (
        f"error: {path}::$.schema_version: schema version 2 predates the per-channel vectors the smoothquant "
        "export needs (schema version 3); measure again with this maxact-card and --out to write them\n")
    # what needs only the JSON still works
    assert invoke("export", path, "--format", "input-scales", "--out", tmp_path / "i.safetensors").exit_code == 0


def test_printed_results_name_no_companion(measured: dict[str, Any], tmp_path: Path) -> None:
    res = invoke("measure", measured["ckpt"], "--corpus", measured["root"] / "corpus.jsonl", "--device", "cpu",
                 "--format", "json")
    assert res.exit_code == 0, res.stderr
    printed = tmp_path / "printed.json"
    printed.write_text(res.stdout, encoding="utf-8")
    assert "channels" not in json.loads(res.stdout)
    res = invoke("export", printed, "--format", "smoothquant", "--out", tmp_path / "s.pt")
    assert res.exit_code == 2 and "names no per-channel companion file" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["printed.json"]


def test_without_gemm_inputs_smoothquant_says_to_measure_them(tmp_path: Path, measured: dict[str, Any]) -> None:
    doc = copy.deepcopy(measured["doc"])
    doc["sites"] = [s for s in doc["sites"] if s["component"] not in ("attn_input", "o_proj_input", "mlp_input")]
    vectors = load_safetensors(measured["path"].with_name("results.channels.safetensors").read_bytes())
    path = tmp_path / "r.json"
    write_results(doc, path, channels=save_safetensors({s["name"]: vectors[s["name"]] for s in doc["sites"]}))
    res = invoke("export", path, "--format", "smoothquant", "--out", tmp_path / "s.pt")
    assert res.exit_code == 2 and "measure with --gemm-inputs" in res.stderr


def test_a_failed_write_leaves_no_half_written_file(measured: dict[str, Any], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    data = measured["path"].with_name("results.channels.safetensors").read_bytes()
    replaced: list[str] = []
    real = os.replace

    def second_fails(src: Any, dst: Any) -> None:
        if replaced:
            raise OSError(28, "No space left on device")
        replaced.append(str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError):
        write_results(measured["doc"], tmp_path / "r.json", channels=data)
    # the companion went first and is in place; the JSON, which would name it, is not, and no temp file is left
    assert replaced == [str(tmp_path / "r.channels.safetensors")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.channels.safetensors"]
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError("disk full")))
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError):
        write_results(measured["doc"], fresh / "r.json", channels=data)
    assert list(fresh.iterdir()) == []


def test_an_unknown_format_or_a_misplaced_option_is_usage(measured: dict[str, Any], tmp_path: Path) -> None:
    assert invoke("export", measured["path"], "--format", "gguf").exit_code == 2
    res = invoke("export", measured["path"], "--format", "smoothquant", "--scheme", "int8")
    assert res.exit_code == 2 and "--scheme applies to --format input-scales only" in res.stderr
    res = invoke("export", tmp_path / "nope.json", "--format", "outliers")
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_the_default_out_is_the_formats_file_beside_the_results(copied: Path) -> None:
    res = invoke("export", copied, "--format", "outliers")
    assert res.exit_code == 0, res.stderr
    assert res.stdout == f"{copied.parent / 'maxact-outliers.json'}\n"


# --- publishing ----------------------------------------------------------------------------------------
def test_publish_exports_puts_results_companion_and_exports_in_the_pull_request(
        measured: dict[str, Any], hub_server: Any, tmp_path: Path) -> None:
    from tests.hub_server import tiny_llama_files

    repo, token = "org/tiny", "hf_write_token_for_export_tests"
    files = tiny_llama_files(tmp_path / "repo")
    hub_server.create_repo(repo, files)
    hub_server.add_token(token, "alice", write=True)
    doc = copy.deepcopy(measured["doc"])
    weights = files["model.safetensors"]
    doc["model"].update(id=repo, commit_sha=hub_server.repo_state(repo)["branches"]["main"], weight_files=[
        {"path": "model.safetensors", "sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}])
    companion = measured["path"].with_name("results.channels.safetensors").read_bytes()
    local = tmp_path / "local" / "run-7.json"  # another name than the repo's: the published JSON is renamed
    written = write_results(doc, local, channels=companion)
    res = invoke("publish", repo, "--results", local, "--token", token, "--exports", "smoothquant,outliers,kv-scales")
    assert res.exit_code == 2 and "no KV-cache sites" in res.stderr  # checked before anything is sent
    assert not hub_server.repo_state(repo)["pull_requests"]
    res = invoke("publish", repo, "--results", local, "--token", token, "--exports", "smoothquant,outliers")
    assert res.exit_code == 0, res.stderr
    assert ("files: README.md, maxact/results.json, maxact/profile.svg, maxact/maxact-act-scales.pt, "
            "maxact/maxact-outliers.json, maxact/results.channels.safetensors") in res.stdout
    published = json.loads(hub_server.read(repo, "maxact/results.json", "refs/pr/1"))
    assert published["channels"] == {**written["channels"], "file": "results.channels.safetensors"}
    assert hub_server.read(repo, "maxact/results.channels.safetensors", "refs/pr/1") == companion
    scales = hub_server.read(repo, "maxact/maxact-act-scales.pt", "refs/pr/1")
    (tmp_path / "s.pt").write_bytes(scales)
    assert torch.equal(torch.load(tmp_path / "s.pt", weights_only=True)["model.layers.0.self_attn.q_proj"],
                       load_safetensors(companion)["blocks.0.ln1.hook_normalized"])
    outliers = json.loads(hub_server.read(repo, "maxact/maxact-outliers.json", "refs/pr/1"))
    assert outliers["model"]["id"] == repo
    # the published pair validates as a card on the Hub, companion included
    res = invoke("validate", repo, "--revision", "refs/pr/1", "--token", token)
    assert "its companion's sha256 matches" in res.stdout, res.stdout + res.stderr


def test_results_copied_with_their_companion_under_another_name_still_read(copied: Path, tmp_path: Path) -> None:
    """`cp r.json new.json; cp r.channels.safetensors new.channels.safetensors`: the JSON still names
    r.channels.safetensors; the companion beside it under the new name is read, and its sha256 decides."""
    new = tmp_path / "new.json"
    new.write_bytes(copied.read_bytes())
    new.with_name("new.channels.safetensors").write_bytes(copied.with_name("r.channels.safetensors").read_bytes())
    copied.with_name("r.channels.safetensors").unlink()
    assert json.loads(new.read_text(encoding="utf-8"))["channels"]["file"] == "r.channels.safetensors"
    res = invoke("export", new, "--format", "smoothquant", "--out", tmp_path / "a.pt")
    assert res.exit_code == 0, res.stderr
    folder = tmp_path / "card"
    (folder / "maxact").mkdir(parents=True)
    (folder / "maxact" / "results.json").write_bytes(new.read_bytes())
    (folder / "maxact" / "results.channels.safetensors").write_bytes(
        new.with_name("new.channels.safetensors").read_bytes())
    assert invoke("render", folder / "maxact" / "results.json", "--card", folder / "README.md").exit_code == 0
    ok = invoke("validate", folder)
    assert ok.exit_code == 0 and "its companion's sha256 matches" in ok.stdout, ok.stdout + ok.stderr
    # the sha256 still decides: a companion of other results under the new name is refused
    companion = new.with_name("new.channels.safetensors")
    companion.write_bytes(companion.read_bytes()[:-4] + b"\0\0\0\0")
    res = invoke("export", new, "--format", "smoothquant", "--out", tmp_path / "b.pt")
    assert res.exit_code == 2 and "has sha256" in res.stderr and not (tmp_path / "b.pt").exists()
