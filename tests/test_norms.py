"""Compiled RMSNorms: the same numbers as eager, hooks still fire, forwards restored, failures fall back."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn

from maxact_card import norms
from maxact_card.measure import base_model, measure
from tests import factory

CPU = torch.device("cpu")


def _ids(batch: int = 3, length: int = 11, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, factory.VOCAB, (batch, length), generator=g)


def _bf16(arch: str) -> nn.Module:
    return factory.build_model(arch).to(torch.bfloat16)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text", "qwen3_next"])
def test_compiled_norms_match_eager_bit_for_bit_on_cpu(arch: str) -> None:
    """Qwen3 (q/k norms too), Gemma's 1 + weight, Qwen3-Next's gated norm; bf16, where the casts matter."""
    model = _bf16(arch)
    runner = base_model(model)
    with torch.no_grad():
        for m in norms.norm_modules(runner):
            if getattr(m, "weight", None) is not None:
                m.weight.normal_(0.5, 0.4)  # away from the all-ones (or zeros) init, so the weight's rounding shows
    kinds = {type(m).__name__ for m in norms.norm_modules(runner)}
    expected = len(norms.norm_modules(runner))
    assert expected >= 2 * factory.config(arch).num_hidden_layers, (arch, expected)  # type: ignore[attr-defined]
    ids = _ids()
    ids[0, 2] = 7  # keep one token fixed: a planted spike goes through every norm
    with torch.inference_mode():
        runner.embed_tokens.weight[7, 5] = 300.0
        eager = runner(input_ids=ids, use_cache=False).last_hidden_state
        with norms.compiled_norms(runner, enabled=True) as swapped:
            assert swapped == expected
            fast = runner(input_ids=ids, use_cache=False).last_hidden_state
    assert not [k for k in norms._FAILED if k[1] == "inductor"]  # compiled, not fallen back to eager
    assert torch.equal(fast, eager), (arch, kinds)
    assert all("forward" not in vars(m) for m in runner.modules())  # every forward put back


def test_a_hook_on_a_norm_still_sees_its_output() -> None:
    model = _bf16("qwen3")
    final = base_model(model).norm
    seen: list[torch.Tensor] = []
    final.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    ids = _ids()
    with torch.inference_mode():
        eager = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
        with norms.compiled_norms(model, enabled=True):
            assert "forward" in vars(final)
            base_model(model)(input_ids=ids, use_cache=False)
    assert len(seen) == 2 and torch.equal(seen[1], eager) and torch.equal(seen[0], eager)


def test_a_measurement_with_compiled_norms_equals_eager() -> None:
    model = _bf16("qwen3")
    ids = _ids(batch=6, length=9, seed=1).tolist()
    ids = [row[: 4 + i] for i, row in enumerate(ids)]  # varied lengths: padded batches
    batches = [[0, 1, 2], [3, 4, 5]]
    eager = measure(model, ids, batches=batches, device=CPU)
    with norms.compiled_norms(model, enabled=True):  # run_hooked leaves norms already swapped alone
        fast = measure(model, ids, batches=batches, device=CPU)
    assert eager.stats.keys() == fast.stats.keys()
    for name, acc in eager.stats.items():
        a, b = acc.state_dict(), fast.stats[name].state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


def test_only_norms_whose_forward_is_their_class_s_own_are_swapped() -> None:
    model = _bf16("llama")
    runner = base_model(model)
    hooked = runner.layers[0].input_layernorm
    original = hooked.forward
    hooked.forward = functools.partial(type(hooked).forward, hooked)  # what accelerate's device hooks do
    with norms.compiled_norms(model, enabled=True) as swapped:
        assert hooked.forward is not original and isinstance(hooked.forward, functools.partial)
        assert swapped == len([m for m in runner.modules() if "RMSNorm" in type(m).__name__]) - 1
    assert isinstance(hooked.forward, functools.partial)


def test_off_cuda_and_switched_off_nothing_is_swapped(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _bf16("qwen3")
    with norms.compiled_norms(model) as swapped:
        assert swapped == 0  # the norms live on the CPU
    monkeypatch.setenv("MAXACT_CARD_COMPILE_NORMS", "0")
    with norms.compiled_norms(model) as swapped:
        assert swapped == 0


def test_a_norm_that_does_not_compile_runs_eager() -> None:
    def broken(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    model = _bf16("llama")
    ids = _ids()
    with torch.inference_mode():
        eager = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
        with pytest.warns(RuntimeWarning, match="runs eager"), norms.compiled_norms(model, enabled=True,
                                                                                   backend=broken):
            out = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
    assert torch.equal(out, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_compiled_norm_is_at_most_one_bf16_step_from_eager() -> None:
    """Only the variance's order of addition may differ on a GPU: a rare last-bit difference, never more."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    torch.manual_seed(0)
    norm = Qwen3RMSNorm(4096).to("cuda", torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = (torch.randn(16384, 4096, device="cuda") * 3).bfloat16()
    x[0, 7] = 3.0e4  # a massive activation, as on a first token
    with torch.inference_mode():
        eager = norm(x).float()
        with norms.compiled_norms(norm) as swapped:  # the default: on, since the norm lives on CUDA
            assert swapped == 1
            fast = norm(x).float()
    assert not norms._FAILED
    step = torch.exp2(torch.floor(torch.log2(eager.abs().clamp_min(1e-30))) - 7)  # one bf16 step at eager's value
    assert bool(((fast - eager).abs() <= step).all())
    assert float((fast != eager).float().mean()) < 1e-3
