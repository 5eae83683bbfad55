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


# --- the inputs of the Linear layers (--gemm-inputs) -----------------------------------------------
GEMM = ("attn_input", "o_proj_input", "mlp_input")
_QKV = ("q_proj", "k_proj", "v_proj")


def _gemm_layout(arch: str, i: int) -> tuple[str, tuple[str, ...], str, str, tuple[str, ...]]:
    """Layer `i` of `arch`, relative to the layer: the attention module, its projections of the hidden
    state, its output projection, the module the MLP input is read at, and the Linear modules reading it."""
    attention: tuple[str, tuple[str, ...], str] = {
        "phi3": ("self_attn", ("qkv_proj",), "o_proj"),
        "deepseek_v3": ("self_attn", ("q_a_proj", "kv_a_proj_with_mqa"), "o_proj"),
        "gpt2": ("attn", ("c_attn",), "c_proj"),
        "gpt_neox": ("attention", ("query_key_value",), "dense"),
    }.get(arch, ("self_attn", _QKV, "o_proj"))
    if arch == "qwen3_next" and i == 0:  # a linear-attention layer
        attention = ("linear_attn", ("in_proj_qkvz", "in_proj_ba"), "out_proj")
    mlp: tuple[str, tuple[str, ...]] = {
        "qwen3_moe": ("mlp", ()),
        "mixtral": ("mlp", ()),
        "gpt_oss": ("mlp", ()),
        "qwen3_next": ("mlp", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj")),
        "phi3": ("mlp.gate_up_proj", ("mlp.gate_up_proj",)),
        "gpt2": ("mlp.c_fc", ("mlp.c_fc",)),
        "gpt_neox": ("mlp.dense_h_to_4h", ("mlp.dense_h_to_4h",)),
    }.get(arch, ("mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")))
    if arch == "deepseek_v3" and i == 1:  # routed experts beside a shared MLP
        mlp = ("mlp", ("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"))
    return (*attention, *mlp)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


@pytest.mark.parametrize("arch", factory.ARCHITECTURES)
def test_gemm_inputs_are_read_where_the_linear_layers_take_them(arch: str) -> None:
    model = factory.build_model(arch)
    plain, site_map = discover(model), discover(model, gemm_inputs=True)
    # off by default; on, it only adds sites, and every family has all three in every layer
    assert not any(s.component in GEMM for s in plain.sites)
    assert [s for s in site_map.sites if s.component not in GEMM] == list(plain.sites)
    assert site_map.missing == plain.missing
    by = site_map.by_name()
    modules = dict(model.named_modules())
    for i in range(site_map.num_layers):
        p = f"{site_map.layers_path}.{i}"
        attn, qkv, out, mlp_at, mlp_readers = _gemm_layout(arch, i)
        ln1, z, ln2 = (by[f"blocks.{i}.{n}"] for n in ("ln1.hook_normalized", "attn.hook_z", "ln2.hook_normalized"))
        assert (ln1.component, ln1.module, ln1.read) == ("attn_input", f"{p}.{attn}.{qkv[0]}", READ_INPUT)
        assert ln1.readers == tuple(f"{p}.{attn}.{n}" for n in qkv)
        assert (z.component, z.module, z.read, z.readers) == (
            "o_proj_input", f"{p}.{attn}.{out}", READ_INPUT, (f"{p}.{attn}.{out}",))
        assert (ln2.component, ln2.module, ln2.read) == ("mlp_input", f"{p}.{mlp_at}", READ_INPUT)
        assert ln2.readers == tuple(f"{p}.{n}" for n in mlp_readers)
        moe = not _is_linear(modules[ln2.module])
        assert moe == ("share" in ln2.note)
        down = by.get(f"blocks.{i}.mlp.hook_post")
        assert down is None or down.readers == (down.module,)
        assert all(_is_linear(modules[r]) for s in (ln1, z, ln2) for r in s.readers)
    # each is measured with the width its readers take
    m = measure(model, IDS, batches=[[0, 1, 2]], device=CPU, gemm_inputs=True)
    assert {s.name for s in m.site_map.sites} == set(by)
    tokens = sum(map(len, IDS))
    for s in site_map.sites:
        if s.readers:
            reader = modules[s.readers[0]]
            width = reader.weight.shape[0] if type(reader).__name__ == "Conv1D" else reader.in_features
            assert m.stats[s.name].width == width and int(m.stats[s.name].count) == tokens * width, s.name


def test_a_block_without_the_linear_layers_lists_the_sites_missing() -> None:
    model: Any = factory.build_model("llama")
    layer = model.model.layers[1]
    layer.self_attn.o_proj = nn.Identity()
    layer.mlp.gate_proj, layer.mlp.up_proj = nn.Identity(), nn.Identity()
    for n in _QKV:
        setattr(layer.self_attn, n, nn.Identity())
    site_map = discover(model, gemm_inputs=True)
    assert {s.name for s in site_map.sites if s.component in GEMM} == {
        "blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_z", "blocks.0.ln2.hook_normalized"}
    missing = dict(site_map.missing)
    assert missing["blocks.{1}.ln1.hook_normalized"] == "no Linear in the attention module takes the hidden state"
    assert missing["blocks.{1}.attn.hook_z"] == "no attention output projection (a Linear back to the hidden size)"
    assert missing["blocks.{1}.ln2.hook_normalized"] == "no Linear in the MLP takes the hidden state"


def test_gemm_inputs_match_a_pre_hook_on_the_linear_layer_exactly() -> None:
    """A planted channel: layer 1's input norm scaled by 1000 at channel 5 makes the attention input
    peak there, and each new site's max is, in fp32, the running max a pre-hook on its Linear sees
    over the real (unpadded) tokens."""
    from maxact_card.measure.loop import needs_attention_mask, prepare, run_measurement

    model: Any = factory.build_model("llama").float()
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[5] *= 1000
    batches = [[0, 1], [2]]  # sample 1 is padded to sample 0's length
    layer = model.model.layers[1]
    targets = {"blocks.1.ln1.hook_normalized": layer.self_attn.q_proj,
               "blocks.1.attn.hook_z": layer.self_attn.o_proj,
               "blocks.1.ln2.hook_normalized": layer.mlp.gate_proj}
    # the forwards before the loop's (the sites' widths, whether padding needs the mask), unseen
    measurement = prepare(model, IDS, device=CPU, gemm_inputs=True)
    needs_attention_mask(model, CPU)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in targets}

    def reference(name: str):  # type: ignore[no-untyped-def]
        batch_of_call = iter(batches)  # the loop runs the batches in order, each row right-padded

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            seen[name].extend(x[row, : len(IDS[i])] for row, i in enumerate(next(batch_of_call)))

        return hook

    handles = [module.register_forward_pre_hook(reference(name)) for name, module in targets.items()]
    try:
        run_measurement(measurement, model, batches=batches, device=CPU)
    finally:
        for handle in handles:
            handle.remove()
    for name in targets:
        tokens = torch.cat(seen[name])
        stats = measurement.stats[name]
        assert float(stats.max) == float(tokens.max()), name
        assert float(stats.min) == float(tokens.min()), name
        assert int(stats.count) == tokens.numel(), name
    attn_input = measurement.stats["blocks.1.ln1.hook_normalized"]
    assert int(attn_input.channel_max.argmax()) == 5
    assert float(attn_input.channel_max[5]) == float(torch.cat(seen["blocks.1.ln1.hook_normalized"])[:, 5].abs().max())
