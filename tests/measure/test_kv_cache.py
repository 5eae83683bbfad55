"""The queries and the KV cache (`--kv-cache`): read where the attention module calls its attention
function, checked against the model's own projections, norms and rotary embedding."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
from torch import nn

from maxact_card.measure.attention import NO_CALL
from maxact_card.measure.loop import measure, needs_attention_mask, prepare, run_measurement
from maxact_card.measure.results import build_results
from maxact_card.measure.sites import ATTENTION_READS, discover
from tests import factory

CPU = torch.device("cpu")
IDS = [[1, 40, 41, 42, 43], [1, 44, 45], [1, 46, 47, 48]]
BATCHES = [[0, 1], [2]]  # sample 1 is right-padded to sample 0's length
KV = ("query", "key_cache", "value_cache")


def _reference_keys(model: Any, arch: str, layer: int) -> tuple[dict[str, list[torch.Tensor]], list[Any]]:
    """Hooks that rebuild layer `layer`'s cached keys and values independently: k_proj's output (through
    k_norm where the family has one) with the modeling file's own `apply_rotary_pos_emb` applied with
    the cos/sin the layer is given, and v_proj's output; kept per real token, [tokens, heads, dim]."""
    attn = model.model.layers[layer].self_attn
    rope = importlib.import_module(type(attn).__module__).apply_rotary_pos_emb
    head_dim = attn.head_dim
    seen: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    pending: dict[str, torch.Tensor] = {}
    batch_of_call = iter(BATCHES)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(*t.shape[:2], -1, head_dim)

    def on_k(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        pending["k"] = heads(out.detach())

    def on_v(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        pending["v"] = heads(out.detach())

    def on_attention(module: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        cos, sin = kwargs["position_embeddings"]
        k = pending["k"].transpose(1, 2)
        _, k = rope(k, k, cos, sin)
        batch = next(batch_of_call)
        for name, t in (("k", k.transpose(1, 2)), ("v", pending["v"])):
            seen[name].extend(t[row, : len(IDS[i])] for row, i in enumerate(batch))

    k_source = attn.k_norm if arch == "qwen3" else attn.k_proj  # Qwen3 norms each head's key before RoPE
    handles = [k_source.register_forward_hook(on_k), attn.v_proj.register_forward_hook(on_v),
               attn.register_forward_hook(on_attention, with_kwargs=True)]
    return seen, handles


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_cached_keys_and_values_match_the_models_own_rotary_exactly(arch: str) -> None:
    """A planted head: layer 1's k_proj rows of kv head 1 scaled by 100. The recorded keys are, in fp32
    and bit for bit, the model's own post-RoPE keys over the real tokens: max, min, count and max|k|
    of every head; the peak sits in head 1."""
    model: Any = factory.build_model(arch).float()
    attn = model.model.layers[1].self_attn
    d = attn.head_dim
    with torch.no_grad():
        attn.k_proj.weight[d : 2 * d] *= 100
        if arch == "qwen3":  # the k norm would undo a scaled projection: scale its weight instead
            attn.k_norm.weight *= 100
            attn.k_proj.weight[d : 2 * d] /= 100
    measurement = prepare(model, IDS, device=CPU, kv_cache=True)
    needs_attention_mask(model, CPU)  # the probe forwards before the loop's, unseen by the reference
    seen, handles = _reference_keys(model, arch, 1)
    try:
        run_measurement(measurement, model, batches=BATCHES, device=CPU)
    finally:
        for handle in handles:
            handle.remove()
    results = build_results(measurement, model_info={}, run_info={"versions": {"maxact_card": "0"}},
                            corpus_info={}, sample_ids=["a", "b", "c"], decode=str, seed=0)
    by = {s["name"]: s for s in results["sites"]}
    for name, key in (("blocks.1.attn.hook_rot_k", "k"), ("blocks.1.attn.hook_v", "v")):
        tokens = torch.cat(seen[key])  # [tokens, heads, dim]
        stats, site = measurement.stats[name], by[name]
        assert float(stats.max) == float(tokens.max()), name
        assert float(stats.min) == float(tokens.min()), name
        assert int(stats.count) == tokens.numel(), name
        assert site["heads"] == tokens.shape[1] == model.config.num_key_value_heads
        assert site["width"] == tokens.shape[1] * d
        assert site["head_max_abs"] == tokens.abs().amax(dim=(0, 2)).tolist(), name
    keys = by["blocks.1.attn.hook_rot_k"]
    assert max(range(keys["heads"]), key=keys["head_max_abs"].__getitem__) == 1
    assert keys["location"]["channel"] // d == 1


@pytest.mark.parametrize("arch", factory.ARCHITECTURES)
def test_every_family_has_queries_keys_and_values_or_says_why_not(arch: str) -> None:
    model: Any = factory.build_model(arch)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ALL_ATTENTION_FUNCTIONS}
    plain = discover(model)
    assert not any(s.component in KV for s in plain.sites)
    m = measure(model, IDS, batches=BATCHES, device=CPU, kv_cache=True)
    # the attention interface is as it was: nothing of the run is left behind
    assert {name: ALL_ATTENTION_FUNCTIONS[name] for name in ALL_ATTENTION_FUNCTIONS} == before
    kv = [s for s in m.site_map.sites if s.component in KV]
    missing = dict(m.site_map.missing)
    config = model.config.get_text_config()
    layers = config.num_hidden_layers
    hybrid = getattr(config, "layer_types", None)
    softmax_layers = [i for i in range(layers) if hybrid is None or hybrid[i] != "linear_attention"]
    assert sorted({s.layer for s in kv}) == softmax_layers
    assert all(s.read in ATTENTION_READS and s.heads for s in kv)
    for i in set(range(layers)) - set(softmax_layers):  # Qwen3-Next's linear-attention layers
        for name in ("hook_rot_q", "hook_rot_k", "hook_v"):
            assert missing[f"blocks.{{{i}}}.attn.{name}"] == NO_CALL
    keys = next(s for s in kv if s.component == "key_cache")
    latent = getattr(config, "kv_lora_rank", None) is not None
    heads = config.num_attention_heads if latent else (getattr(config, "num_key_value_heads", None)
                                                       or config.num_attention_heads)
    assert keys.heads == heads
    assert ("latent" in keys.note) == latent
    tokens = sum(map(len, IDS))
    assert all(int(m.stats[s.name].count) == tokens * m.stats[s.name].width for s in kv)


def test_an_override_already_on_the_attention_interface_is_called_through_and_put_back() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model: Any = factory.build_model("llama")
    calls = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = spy  # another library's override: called through, then put back
    try:
        m = measure(model, IDS, batches=BATCHES, device=CPU, kv_cache=True)
        assert calls and ALL_ATTENTION_FUNCTIONS["sdpa"] is spy
        assert any(s.component == "key_cache" for s in m.site_map.sites)
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original
