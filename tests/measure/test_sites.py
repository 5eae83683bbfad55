"""Site discovery: TransformerLens names with Hugging Face module paths, and models it cannot map."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from maxact_card.errors import RuntimeFailure
from maxact_card.measure.loop import measure
from maxact_card.measure.results import build_results
from maxact_card.measure.sites import READ_INPUT, READ_OUTPUT, discover
from tests import factory

CPU = torch.device("cpu")
IDS = [[1, 40, 41, 42, 43], [1, 44, 45], [1, 46, 47, 48]]


# --- a model whose structure is unknown -------------------------------------------------------------
class _Output(SimpleNamespace):
    pass


class TinyLM(nn.Module):
    """An LM with no layer stack: three residual updates written out as attributes, no ModuleList."""

    def __init__(self, *, return_hidden_states: bool = True, layers: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(num_hidden_layers=layers, hidden_size=8)
        self.embed = nn.Embedding(64, 8)
        self.first = nn.Linear(8, 8)
        self.second = nn.Linear(8, 8)
        self.third = nn.Linear(8, 8)
        self.return_hidden_states = return_hidden_states
        self.calls: list[dict[str, Any]] = []

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
    ) -> _Output:
        self.calls.append({"output_hidden_states": output_hidden_states})
        h0 = self.embed(input_ids)
        h1 = h0 + self.first(h0)
        h2 = h1 + self.second(h1)
        h3 = h2 + self.third(h2)
        hidden = (h0, h1, h2, h3) if output_hidden_states and self.return_hidden_states else None
        return _Output(last_hidden_state=h3, hidden_states=hidden)


def _site_names(site_map: Any) -> list[str]:
    return [s.name for s in site_map.sites]


def test_discover_reports_what_it_cannot_find() -> None:
    site_map = discover(TinyLM())
    assert _site_names(site_map) == ["hook_embed"]
    assert site_map.sites[0].module == "embed"
    assert site_map.layers_path is None and site_map.num_layers == 0
    missing = dict(site_map.missing)
    assert "blocks.*" in missing and "output_hidden_states" in missing["blocks.*"]


def test_measure_falls_back_to_output_hidden_states() -> None:
    model = TinyLM()
    m = measure(model, IDS, batches=[[0, 2], [1]], device=CPU)
    assert m.hidden_states_fallback
    assert all(call["output_hidden_states"] for call in model.calls[-2:])
    names = _site_names(m.site_map)
    assert names == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    fallback = m.site_map.by_name()["blocks.1.hook_resid_post"]
    assert fallback.module == "<output_hidden_states>" and "hidden_states[2]" in fallback.note
    # the values are those of the hidden states the model returns
    with torch.no_grad():
        hidden = [model(torch.tensor([seq]), output_hidden_states=True).hidden_states for seq in IDS]
    for i in (0, 1):
        a = torch.cat([h[i + 1][0] for h in hidden])
        stats = m.stats[f"blocks.{i}.hook_resid_post"]
        assert float(stats.max) == pytest.approx(float(a.max()), rel=1e-6)
        assert float(stats.min) == pytest.approx(float(a.min()), rel=1e-6)
        assert int(stats.count) == a.numel()
    doc = build_results(
        m,
        model_info={},
        run_info={"versions": {"maxact_card": "test"}},
        corpus_info={},
        sample_ids=["a", "b", "c"],
        decode=str,
        seed=0,
    )
    assert [s["name"] for s in doc["sites"]] == names
    assert {"site": "blocks.*", "reason": dict(m.site_map.missing)["blocks.*"]} in doc["missing_sites"]


def test_fallback_accounts_for_every_standard_site() -> None:
    m = measure(TinyLM(), IDS, batches=[[0, 1, 2]], device=CPU)
    accounted = set(_site_names(m.site_map)) | {name for name, _ in m.site_map.missing}
    assert "ln_final.hook_normalized" in accounted


def test_a_model_without_hidden_states_is_reported_clearly() -> None:
    with pytest.raises(RuntimeFailure) as info:
        measure(TinyLM(return_hidden_states=False), IDS, batches=[[0, 1, 2]], device=CPU)
    assert "hidden states" in info.value.line()


def test_a_model_without_input_embeddings_still_measures_the_residual() -> None:
    class NoEmbeddings(TinyLM):
        def get_input_embeddings(self) -> nn.Module | None:  # type: ignore[override]
            return None

    m = measure(NoEmbeddings(), IDS, batches=[[0, 1, 2]], device=CPU)
    assert _site_names(m.site_map) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert dict(m.site_map.missing)["hook_embed"] == "no input embedding module found"


# --- naming and module paths of known families ----------------------------------------------------
def _expected_llama(layers: int) -> list[tuple[str, str, str, str]]:
    out = [("hook_embed", "embedding", "model.embed_tokens", READ_OUTPUT)]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [
            (f"blocks.{i}.hook_resid_post", "residual", p, READ_OUTPUT),
            (f"blocks.{i}.hook_attn_out", "attention", f"{p}.self_attn", READ_OUTPUT),
            (f"blocks.{i}.hook_mlp_out", "mlp", f"{p}.mlp", READ_OUTPUT),
            (f"blocks.{i}.mlp.hook_pre", "gate", f"{p}.mlp.gate_proj", READ_OUTPUT),
            (f"blocks.{i}.mlp.hook_post", "down_proj_input", f"{p}.mlp.down_proj", READ_INPUT),
        ]
    return out + [("ln_final.hook_normalized", "final_norm", "model.norm", READ_OUTPUT)]


def _expected_gpt2(layers: int) -> list[tuple[str, str, str, str]]:
    out = [("hook_embed", "embedding", "transformer.wte", READ_OUTPUT)]
    for i in range(layers):
        p = f"transformer.h.{i}"
        out += [
            (f"blocks.{i}.hook_resid_post", "residual", p, READ_OUTPUT),
            (f"blocks.{i}.hook_attn_out", "attention", f"{p}.attn", READ_OUTPUT),
            (f"blocks.{i}.hook_mlp_out", "mlp", f"{p}.mlp", READ_OUTPUT),
            (f"blocks.{i}.mlp.hook_post", "down_proj_input", f"{p}.mlp.c_proj", READ_INPUT),
        ]
    return out + [("ln_final.hook_normalized", "final_norm", "transformer.ln_f", READ_OUTPUT)]


@pytest.mark.parametrize(
    "arch, expected, missing",
    [
        ("llama", _expected_llama(2), {"blocks.{0-1}.mlp.hook_router_logits": "dense MLP: no router"}),
        (
            "gpt2",
            _expected_gpt2(2),
            {
                "blocks.{0-1}.mlp.hook_pre": "MLP has no gate (not a gated MLP)",
                "blocks.{0-1}.mlp.hook_router_logits": "dense MLP: no router",
            },
        ),
    ],
)
def test_site_names_and_module_paths(
    arch: str, expected: list[tuple[str, str, str, str]], missing: dict[str, str]
) -> None:
    model = factory.build_model(arch)
    site_map = discover(model)
    got = [(s.name, s.component, s.module, s.read) for s in site_map.sites]
    assert sorted(got) == sorted(expected)
    assert dict(site_map.missing) == missing
    assert site_map.num_layers == 2
    modules = dict(model.named_modules())
    assert all(s.module in modules for s in site_map.sites)


def test_gpt2_conv1d_down_projection_input_is_read_with_its_width() -> None:
    model: Any = factory.build_model("gpt2")
    captured: list[torch.Tensor] = []
    c_proj = model.transformer.h[1].mlp.c_proj
    handle = c_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()[0].clone()))
    try:
        with torch.no_grad():
            for seq in IDS:
                model.transformer(input_ids=torch.tensor([seq]))
        reference = torch.cat(captured)
    finally:
        handle.remove()
    m = measure(model, IDS, batches=[[0], [1], [2]], device=CPU)
    stats = m.stats["blocks.1.mlp.hook_post"]
    assert stats.width == 4 * model.config.n_embd == reference.shape[1]
    assert float(stats.max) == pytest.approx(float(reference.max()), rel=1e-5)
    assert float(stats.min) == pytest.approx(float(reference.min()), rel=1e-5)


def test_results_carry_module_paths_and_what_was_read() -> None:
    model = factory.build_model("llama")
    m = measure(model, IDS, batches=[[0, 1, 2]], device=CPU)
    doc = build_results(
        m,
        model_info={},
        run_info={"versions": {"maxact_card": "test"}},
        corpus_info={},
        sample_ids=["a", "b", "c"],
        decode=str,
        seed=0,
    )
    by = {s["name"]: s for s in doc["sites"]}
    assert by["blocks.0.mlp.hook_post"]["module"] == "model.layers.0.mlp.down_proj"
    assert by["blocks.0.mlp.hook_post"]["read"] == "input"
    assert by["blocks.0.mlp.hook_pre"]["width"] == 64


# --- the special read modes: router logits and the gate half of a fused projection -----------------
def _reference_max_min(model: nn.Module, module: nn.Module, pick: Any) -> tuple[float, float]:
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, o: captured.append(pick(m, a, o).detach().clone()))
    try:
        with torch.no_grad():
            for seq in IDS:
                model(input_ids=torch.tensor([seq]))
    finally:
        handle.remove()
    a = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
    return float(a.max()), float(a.min())


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_router_site_reads_the_logits(arch: str) -> None:
    model: Any = factory.build_model(arch)
    gate = model.model.layers[1].mlp.gate
    # the logits are the plain linear map of the router's input, whatever the router returns besides
    want = _reference_max_min(model, gate, lambda m, a, o: nn.functional.linear(a[0], m.weight))
    m = measure(model, IDS, batches=[[0, 1, 2]], device=CPU)
    site = m.site_map.by_name()["blocks.1.mlp.hook_router_logits"]
    assert site.module == "model.layers.1.mlp.gate" and site.component == "router"
    stats = m.stats[site.name]
    assert stats.width == 4
    assert (float(stats.max), float(stats.min)) == pytest.approx(want, rel=1e-5)


def test_fused_gate_up_projection_reads_the_gate_half() -> None:
    model: Any = factory.build_model("phi3")
    fused = model.model.layers[0].mlp.gate_up_proj
    want = _reference_max_min(model, fused, lambda m, a, o: o[..., : o.shape[-1] // 2])
    m = measure(model, IDS, batches=[[0, 1, 2]], device=CPU)
    site = m.site_map.by_name()["blocks.0.mlp.hook_pre"]
    assert site.module == "model.layers.0.mlp.gate_up_proj" and "gate half" in site.description
    stats = m.stats[site.name]
    assert stats.width == 64
    assert (float(stats.max), float(stats.min)) == pytest.approx(want, rel=1e-5)
