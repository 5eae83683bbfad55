"""`kv-scales`: the FP8 (E4M3) KV-cache scales, as the tensors FP8 KV-cache checkpoints carry.

Names and shapes follow what vLLM loads (read in vllm-project/vllm):
- `model_executor/model_loader/weight_utils.py` `maybe_remap_kv_scale_name`: a checkpoint's
  `{layer}.self_attn.k_scale` / `.v_scale` is remapped onto the attention's `attn.k_scale` /
  `attn.v_scale` (the deprecated single `kv_scale` is not written here);
- `model_executor/layers/quantization/compressed_tensors/compressed_tensors.py`
  `CompressedTensorsKVCacheMethod`: `k_scale`, `v_scale` and `q_scale` are float32 with one entry,
  or, for the `attn_head` strategy (`kv_cache_scheme.strategy` in the config), one per KV head
  (`n_scales = num_kv_heads`, the same tensor names); after loading vLLM uses their max.
  llm-compressor writes that per-head form (`examples/quantization_kv_cache/llama3_fp8_head_kv_example.py`,
  `kv_cache_scheme=QuantizationArgs(num_bits=8, type="float", strategy="attn_head")`).
So one name carries either the per-tensor scalar (default) or the per-head vector (`per_head`):
the format has no second tensor name a loader would accept, and an unknown name fails a strict load.

The scale is amax / 448 (the largest finite E4M3 value), symmetric, in float32; a tensor that never
left 0 gets scale 1 (a scale of 0 cannot dequantize).
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import save

from maxact_card.documents import KV_CACHE
from maxact_card.errors import UsageError
from maxact_card.export.inputs import Inputs, static_scale
from maxact_card.quant.schemes import FP8_E4M3_MAX

SCALE_NAMES = {"key_cache": "k_scale", "value_cache": "v_scale", "query": "q_scale"}


def fp8_scale(amax: float) -> float:
    """amax / 448, the symmetric E4M3 scale (1 for an all-zero tensor)."""
    return static_scale(amax, FP8_E4M3_MAX)


def kv_scales(inputs: Inputs, *, per_head: bool = False) -> dict[str, torch.Tensor]:
    """{`{attention}.k_scale` | `.v_scale` | `.q_scale`: float32 scalar, or [KV heads] with `per_head`}."""
    kv = inputs.sites(*KV_CACHE)
    if not kv:
        raise UsageError(f"this results file ({inputs.source}) has no KV-cache sites: measure with --kv-cache")
    kv_heads: dict[str, int] = {s["module"]: _heads(s, inputs.source) for s in kv if per_head}
    tensors: dict[str, torch.Tensor] = {}
    for site in inputs.sites(*KV_CACHE, "query"):
        name = f"{site['module']}.{SCALE_NAMES[site['component']]}"
        if not per_head:
            tensors[name] = torch.tensor(fp8_scale(site["max_abs"]), dtype=torch.float32)
            continue
        heads = _head_max(site, inputs.source)
        groups = kv_heads.get(site["module"], len(heads))
        if len(heads) % groups:
            raise UsageError(f"{inputs.source}: site {site['name']} has {len(heads)} heads, not a multiple of the "
                             f"{groups} KV heads of {site['module']}")
        # the query heads that share a KV head (GQA's repeat_kv order): their max is that group's amax
        per = len(heads) // groups
        amax = [max(heads[g * per:(g + 1) * per]) for g in range(groups)]
        tensors[name] = torch.tensor([fp8_scale(a) for a in amax], dtype=torch.float32)
    return tensors


def _heads(site: dict[str, Any], source: str) -> int:
    return len(_head_max(site, source))


def _head_max(site: dict[str, Any], source: str) -> list[float]:
    heads = site.get("head_max_abs")
    if not heads or len(heads) != site.get("heads", len(heads)):
        raise UsageError(f"{source}: site {site['name']} records no per-head max|a|, which --per-head needs",
                         hint="measure again with this maxact-card and --kv-cache, or drop --per-head")
    return [float(h) for h in heads]


def build(inputs: Inputs, *, per_head: bool = False) -> bytes:
    """The safetensors bytes of `kv_scales`."""
    strategy = "attn_head" if per_head else "tensor"
    return save(kv_scales(inputs, per_head=per_head),
                metadata={"producer": "maxact-card", "scheme": "fp8-e4m3", "strategy": strategy})
