"""How a run is sized for its device: `--max-batch-tokens auto`, a token budget from free device memory
and the model's shape; and whether compiling the fused pieces pays for the loop (`compile_choice`).

A forward pass of a decoder holds, per token in flight, a few residual-width tensors (the stream,
the normed input, q/k/v/o), the widest MLP intermediate two or three times (gate, up, the product
fed to down_proj; for MoE the routed experts' share) and, with eager attention, one row of scores
per head. The statistics add one temporary of the widest site. The estimate below counts those
with a safety factor and keeps half of the free memory as headroom; a batch that still does not
fit is split and retried by the loop, so an estimate on the high side costs one retry, not the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from maxact_card.switches import switched_off

MIN_BUDGET = 256
# Past 16,384 tokens nothing is gained, on a CPU or a GPU: the GEMMs are already as fast per token,
# and wider length ranges per batch add padding. Measured on an H100 (bench/bench_overhead.py,
# 512 samples, random weights): Qwen3-8B ran at 27,280 tok/s bare and 25,902 hooked with 16,384-token
# batches against 25,382 and 23,177 with 65,536; Qwen3-1.7B at 85,706 against 85,359 bare. More,
# smaller batches also balance better over data-parallel processes.
MAX_BUDGET = 16384
HEADROOM = 0.5  # share of the free memory the batch may use
# Dense bf16 peaks by the device's name, TFLOP/s: what the compile choice predicts a loop from and
# what bench/bench_overhead.py reports MFU against
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0}


def peak_bf16_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device named in `PEAK_BF16_TFLOPS`, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def bytes_per_token(config: Any, dtype: torch.dtype, max_seq_len: int, attn_implementation: str | None) -> int:
    """Peak bytes one token in flight costs in one layer's forward, with the statistics' temporaries."""
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or 1024)
    intermediate = int(getattr(text, "intermediate_size", 0) or getattr(text, "n_inner", 0) or 4 * hidden)
    moe_width = int(getattr(text, "moe_intermediate_size", 0) or 0)
    routed = int(getattr(text, "num_experts_per_tok", 0) or getattr(text, "num_experts_per_token", 0) or 0)
    if moe_width and routed:
        intermediate = max(intermediate, moe_width * routed)
    heads = int(getattr(text, "num_attention_heads", 0) or getattr(text, "n_head", 0) or 1)
    item = torch.empty((), dtype=dtype).element_size()
    # residual-width tensors alive at once, the MLP's three intermediates, fp32 statistics of the widest site
    per_token = item * (12 * hidden + 4 * intermediate) + 4 * max(hidden, intermediate)
    if attn_implementation in (None, "eager"):
        per_token += 2 * item * heads * max_seq_len  # scores and probabilities, one row per head
    return per_token


def free_bytes(device: torch.device, *, all_gpus: bool = False) -> int:
    """Memory free for activations on `device` now (after the weights are loaded).

    With `all_gpus` (a model spread by --device-map), the least free of the visible GPUs: every
    batch passes through each of them.
    """
    if device.type == "cuda":
        if all_gpus:
            return min(int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count()))
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def auto_batch_tokens(model: Any, device: torch.device, dtype: torch.dtype, max_seq_len: int, *,
                      sharded: bool = False) -> int:
    """The padded-token budget for `--max-batch-tokens auto`, rounded down to a multiple of 256."""
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None)
    per_token = bytes_per_token(config, dtype, max_seq_len, attn)
    budget = int(free_bytes(device, all_gpus=sharded) * HEADROOM) // max(per_token, 1)
    budget = max(MIN_BUDGET, min(MAX_BUDGET, budget))
    return budget - budget % 256


# What compiling the norms and rotary costs and gains, measured with Qwen3-8B on H100 and H200 (the
# whole CLI, bench/bench_e2e.py): 9-24 s of compile on empty caches; the loop about 6% faster.
COMPILE_COST_S = 15.0
COMPILE_GAIN = 0.06
# The loop is predicted from its matmuls: 2 x active parameters x padded tokens, at half the device's dense
# bf16 peak (measuring Qwen3-8B reaches about 0.6 of it on an H100); devices without a known peak
# (`PEAK_BF16_TFLOPS`) get 100 TFLOP/s.
_ACHIEVED = 0.5


@dataclass(frozen=True)
class CompileChoice:
    """Whether a loop compiles its norms and rotary, the loop's predicted length, and why."""

    chosen: bool
    predicted_loop_s: float | None
    why: str

    def record(self) -> dict[str, Any]:
        loop = None if self.predicted_loop_s is None else round(self.predicted_loop_s, 1)
        return {"chosen": self.chosen, "predicted_loop_s": loop, "why": self.why}


def active_parameters(model: torch.nn.Module) -> float:
    """Parameters one token passes through: all of them, less the share of the routed experts it is
    not sent to (a mixture of experts runs num_experts_per_tok of its experts per token)."""
    total = sum(p.numel() for p in model.parameters())
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else config
    experts = next((int(v) for a in ("num_experts", "num_local_experts", "n_routed_experts")
                    if isinstance(v := getattr(text, a, None), int) and v > 1), 0)
    routed = getattr(text, "num_experts_per_tok", None)
    if not experts or not isinstance(routed, int) or not 0 < routed < experts:
        return float(total)
    in_experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or n.endswith(".experts"))
    return total - in_experts * (1 - routed / experts)


def compile_choice(padded_tokens: int, parameters: float, device: torch.device) -> CompileChoice:
    """Compile the fused pieces only when the predicted loop gains more than the compile costs."""
    if device.type != "cuda":
        return CompileChoice(False, None, "not on CUDA: norms and rotary run as the model has them")
    if switched_off("MAXACT_CARD_FUSE"):
        return CompileChoice(False, None, "MAXACT_CARD_FUSE=0")
    peak = (peak_bf16_tflops(device) or 100.0) * 1e12
    loop = 2.0 * parameters * padded_tokens / (peak * _ACHIEVED)
    gain = COMPILE_GAIN * loop
    if gain > COMPILE_COST_S:
        why = f"a loop of about {loop:.0f} s gains about {gain:.0f} s, more than compiling costs"
        return CompileChoice(True, loop, f"{why} (about {COMPILE_COST_S:.0f} s)")
    why = f"a loop of about {loop:.0f} s would gain about {gain:.1f} s, less than compiling costs"
    return CompileChoice(False, loop, f"{why} (about {COMPILE_COST_S:.0f} s on empty compile caches)")
