"""`smoothquant`: SmoothQuant's activation scales, `{Linear module: float32 [in_features]}`.

SmoothQuant (mit-han-lab/smoothquant) calibrates `act_scales` in `generate_act_scales`: a forward
hook on every nn.Linear keeps, per input channel, the running max of |x| over the calibration
tokens, keyed by the Linear's module name (`model.layers.0.self_attn.q_proj`), saved with
`torch.save`; `smooth_lm(model, act_scales, alpha)` then reads `act_scales[f"{layer}.self_attn.q_proj"]`,
`...post_attention_layernorm`-side `mlp.gate_proj` and so on. Our Linear-input sites hold exactly
that statistic (`SiteStats.channel_max`, over every non-padding finite token), so each reader of a
site gets its site's vector: q/k/v share one, gate/up share one.
"""

from __future__ import annotations

import io

import torch

from maxact_card.export.inputs import Inputs

WHAT = "the smoothquant export"


def act_scales(inputs: Inputs) -> dict[str, torch.Tensor]:
    """{Linear module path: float32 [in_features]} for every reader of every Linear-input site."""
    vectors = inputs.vectors(WHAT)
    scales: dict[str, torch.Tensor] = {}
    for site in inputs.linear_sites(WHAT):
        vector = vectors[site["name"]].to(torch.float32)
        for reader in site["readers"]:
            # a Linear read from two sites cannot be; if it were, the larger |a| is the safe scale
            scales[reader] = torch.maximum(scales[reader], vector) if reader in scales else vector
    return scales


def build(inputs: Inputs) -> bytes:
    """The `torch.save` bytes of `act_scales`, loadable with `torch.load(path, weights_only=True)`."""
    buffer = io.BytesIO()
    torch.save(act_scales(inputs), buffer)
    return buffer.getvalue()
