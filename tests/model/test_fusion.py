"""Compiled RMSNorms and rotary embeddings: the same numbers as eager, hooks still fire, everything put
back, failures fall back."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from torch import nn

from maxact_card.measure.loop import base_model, measure
from maxact_card.measure.stats import SiteStats
from maxact_card.model import fusion
from tests import factory

CPU = torch.device("cpu")


def _ids(batch: int = 3, length: int = 11, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, factory.VOCAB, (batch, length), generator=g)


def _bf16(arch: str) -> nn.Module:
    return factory.build_model(arch).to(torch.bfloat16)


def _compiled_not_fallen_back() -> bool:
    return not [key for key in fusion._FAILED if key[1] == "inductor"]


def _one_step(fast: torch.Tensor, eager: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """Whether each value is within `steps` bf16 steps of eager's."""
    fast, eager = fast.float(), eager.float()
    step = torch.exp2(torch.floor(torch.log2(eager.abs().clamp_min(1e-30))) - 7)
    return (fast - eager).abs() <= steps * step


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text", "qwen3_next"])
def test_each_compiled_norm_is_within_two_bf16_steps_of_eager(arch: str) -> None:
    """Qwen3 (q/k norms too), Gemma's 1 + weight, Qwen3-Next's gated norm; bf16, where the casts matter.
    Only the order of the sum of squares may differ from eager: rarely the normalised value's last bit,
    and then its product with the weight's."""
    runner = base_model(_bf16(arch))
    norms = fusion.norm_modules(runner)
    assert len(norms) >= 2 * factory.config(arch).num_hidden_layers, arch  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(1)
    checked = set()
    with torch.inference_mode():
        for m in norms:
            if type(m) in checked:
                continue
            checked.add(type(m))
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.4 + 0.5)
            width = m.weight.shape[-1]
            x = (torch.randn(64, width, generator=g) * 3).bfloat16()
            x[0, 1] = 3.0e4  # a massive activation
            args = (x, torch.randn(64, width, generator=g).bfloat16()) if "Gated" in type(m).__name__ else (x,)
            eager = m(*args)
            with fusion.fused_forward(m, enabled=True) as fused:
                assert fused.norms == 1
                fast = m(*args)
            assert "forward" not in vars(m)  # put back
            assert bool(_one_step(fast, eager, steps=2).all()), type(m).__name__
            assert float((fast != eager).float().mean()) < 0.01, type(m).__name__
    assert _compiled_not_fallen_back()
    assert len(checked) == (2 if arch == "qwen3_next" else 1)


def test_the_compiled_rotary_embedding_is_bit_identical() -> None:
    """Elementwise only: with the precision casts kept, every bf16 rounding happens where eager's does."""
    runner = base_model(_bf16("qwen3"))
    files = fusion.rotary_files(runner)
    assert len(files) == 1
    eager_fn = getattr(files[0], fusion.ROTARY)
    g = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, h, 17, 8, generator=g).bfloat16() * 5 for h in (4, 2))
    angles = torch.arange(17).float()[:, None] * torch.rand(4, generator=g)[None]
    cos, sin = (torch.cat([f(angles)] * 2, -1)[None].bfloat16() for f in (torch.cos, torch.sin))
    eager = eager_fn(q, k, cos, sin)
    with fusion.fused_forward(runner, enabled=True) as fused:
        assert fused.rotary == 1 and getattr(files[0], fusion.ROTARY) is not eager_fn
        fast = getattr(files[0], fusion.ROTARY)(q, k, cos, sin)
    assert getattr(files[0], fusion.ROTARY) is eager_fn  # put back
    assert _compiled_not_fallen_back()
    assert torch.equal(fast[0], eager[0]) and torch.equal(fast[1], eager[1])


def _modelling_file(name: str, rotary: object) -> tuple[Any, nn.Module]:
    """A stand-in modelling file in sys.modules: one module class defined there, and `rotary` under
    the name transformers gives the rotary function."""
    import sys
    import types

    file = types.ModuleType(name)
    layer = type("Layer", (nn.Module,), {"__module__": name})
    file.Layer = layer  # type: ignore[attr-defined]
    setattr(file, fusion.ROTARY, rotary)
    sys.modules[name] = file
    return file, layer()


def _hub_wrapped(func: Any) -> nn.Module:
    """What kernels' `use_kernel_forward_from_hub` makes of a function (transformers >= 5.2x with the
    `kernels` package): an instance of a per-function nn.Module class whose forward calls the function
    it closes over."""

    class Func(nn.Module):
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return func(*args, **kwargs)

    return Func()


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q * cos + k * sin, k * cos - q * sin


_rotate.__name__ = _rotate.__qualname__ = fusion.ROTARY


def test_a_rotary_function_wrapped_in_a_module_is_compiled_from_the_function_inside() -> None:
    import sys

    wrapped = _hub_wrapped(_rotate)
    file, layer = _modelling_file("modeling_wrapped_rotary", wrapped)
    try:
        assert fusion.eager_rotary(wrapped) is _rotate
        assert fusion.rotary_files(layer) == [file]
        x = torch.randn(3, 4)
        with fusion.fused_forward(layer, enabled=True, backend="eager") as fused:
            swapped = getattr(file, fusion.ROTARY)
            assert fused.rotary == 1 and swapped is not wrapped
            assert all(torch.equal(a, b) for a, b in zip(swapped(x, x, x, x), _rotate(x, x, x, x)))
        assert getattr(file, fusion.ROTARY) is wrapped  # put back: the module, not the function inside
        assert fused.record() == {"compiled": [f"test_fusion.{fusion.ROTARY}"], "eager": [], "fused": []}
    finally:
        del sys.modules["modeling_wrapped_rotary"]


def test_a_rotary_that_cannot_be_unwrapped_is_left_alone_and_recorded() -> None:
    """A kernelized wrapper (its forward set on the instance) or any other callable runs as it is,
    and the results say why it was not fused."""
    import sys

    kernelized = _hub_wrapped(_rotate)
    kernelized.forward = lambda *args: _rotate(*args)  # type: ignore[method-assign]
    for name, held in (("modeling_kernelized", kernelized), ("modeling_partial", functools.partial(_rotate))):
        file, layer = _modelling_file(name, held)
        try:
            assert fusion.eager_rotary(held) is None and fusion.rotary_files(layer) == []
            with fusion.fused_forward(layer, enabled=True, backend="eager") as fused:
                assert getattr(file, fusion.ROTARY) is held and fused.rotary == 0
            kind = type(held).__qualname__
            assert fused.record()["not_fused"] == [
                f"{name}.{fusion.ROTARY}: not a plain function ({kind}), runs as the modelling file has it"
            ]
        finally:
            del sys.modules[name]


def test_a_hook_on_a_norm_still_sees_its_output() -> None:
    model = _bf16("qwen3")
    final = base_model(model).norm
    seen: list[torch.Tensor] = []
    final.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    ids = _ids()
    with torch.inference_mode():
        eager = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
        with fusion.fused_forward(model, enabled=True):
            assert "forward" in vars(final)
            base_model(model)(input_ids=ids, use_cache=False)
    assert len(seen) == 2 and torch.equal(seen[0], eager) and torch.equal(seen[1], eager)


def test_a_measurement_with_the_fused_forward_agrees_with_eager() -> None:
    model = _bf16("qwen3")
    with torch.no_grad():
        base_model(model).embed_tokens.weight[7, 5] = 300.0  # planted: the peak of every residual site
    ids = _ids(batch=6, length=9, seed=1).tolist()
    ids = [row[: 4 + i] for i, row in enumerate(ids)]  # varied lengths: padded batches
    ids[4][3] = 7
    batches = [[0, 1, 2], [3, 4, 5]]
    eager = measure(model, ids, batches=batches, device=CPU)
    with fusion.fused_forward(model, enabled=True) as fused:  # the loop's own block finds nothing left to swap
        assert fused.norms > 0 and fused.rotary == 1
        fast = measure(model, ids, batches=batches, device=CPU)
    assert _compiled_not_fallen_back()
    assert fused.record() == {"compiled": ["modeling_qwen3.Qwen3RMSNorm.forward", "modeling_qwen3.apply_rotary_pos_emb"],
                              "eager": ["modeling_qwen3.Qwen3MLP.forward"], "fused": []}  # no kernel on a CPU
    assert eager.stats.keys() == fast.stats.keys()
    residual = [name for name in eager.stats if name.endswith("hook_resid_post")]
    assert residual
    for name, acc in eager.stats.items():
        a, b = acc.state_dict(), fast.stats[name].state_dict()
        assert torch.equal(a["count"], b["count"]), name
        for key in ("max", "min", "channel_max", "topk_value"):
            assert torch.allclose(a[key], b[key], rtol=2e-2, atol=1e-3), (name, key)
        if name in residual:  # the planted peak: the same token (low bits of the key) and channel
            assert int(a["topk_key"][0]) & 0xFFFFFFFF == int(b["topk_key"][0]) & 0xFFFFFFFF, name
            assert int(a["topk_channel"][0]) == int(b["topk_channel"][0]) == 5, name


def test_a_norm_under_a_device_hook_is_compiled_behind_the_hook() -> None:
    """accelerate's device hooks (a sharded model) wrap the class's forward: the hook stays, the forward it
    calls is the compiled one; a forward replaced by anything else is left alone."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = _bf16("llama")
    runner = base_model(model)
    hooked, other = runner.layers[0].input_layernorm, runner.layers[1].input_layernorm
    add_hook_to_module(hooked, AlignDevicesHook(execution_device=CPU, io_same_device=True))
    wrapper, saved = hooked.forward, hooked._old_forward
    other.forward = functools.partial(type(other).forward, other)
    total = len([m for m in runner.modules() if "RMSNorm" in type(m).__name__])
    ids = _ids()
    with torch.inference_mode():
        eager = runner(input_ids=ids, use_cache=False).last_hidden_state
        with fusion.fused_forward(model, enabled=True) as fused:
            assert fused.norms == total - 1
            assert hooked.forward is wrapper and hooked._old_forward is not saved
            assert isinstance(other.forward, functools.partial)
            calls: list[int] = []
            hooked.register_forward_pre_hook(lambda *a: calls.append(1))
            fast = runner(input_ids=ids, use_cache=False).last_hidden_state
    assert calls == [1]
    assert hooked.forward is wrapper and hooked._old_forward is saved  # put back
    assert _compiled_not_fallen_back()
    assert bool(_one_step(fast, eager, steps=2).all())


def test_off_cuda_and_switched_off_nothing_is_swapped(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _bf16("qwen3")
    with fusion.fused_forward(model) as fused:
        assert fused == fusion.Fused()  # the norms live on the CPU
    monkeypatch.setenv("MAXACT_CARD_FUSE", "0")
    with fusion.fused_forward(model, enabled=None) as fused:
        assert fused == fusion.Fused()


def test_a_piece_that_does_not_compile_runs_eager() -> None:
    def broken(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no compiler here")

    model = _bf16("llama")
    ids = _ids()
    with torch.inference_mode():
        eager = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
        with fusion.fused_forward(model, enabled=True, backend=broken) as fused:
            assert fused.norms > 0 and fused.rotary == 1
            with pytest.warns(RuntimeWarning, match="runs eager"):
                out = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
    assert torch.equal(out, eager)
    assert {key[0].__name__ for key in fusion._FAILED if key[1] is broken} == {"forward", fusion.ROTARY}
    # what a run's results record: both pieces fell back, each named once for all its modules
    assert fused.record() == {"compiled": [],
                              "eager": ["modeling_llama.LlamaMLP.forward", "modeling_llama.LlamaRMSNorm.forward",
                                        "modeling_llama.apply_rotary_pos_emb"],
                              "fused": []}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_compiled_norm_is_at_most_two_bf16_steps_from_eager() -> None:
    """Only the sum of squares' order of addition (and the reciprocal square root's last bit) may differ
    on a GPU: rarely the normalised value's last bit, and then its product with the weight's, never more."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    torch.manual_seed(0)
    norm = Qwen3RMSNorm(4096).to("cuda", torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = (torch.randn(16384, 4096, device="cuda") * 3).bfloat16()
    x[0, 7] = 3.0e4  # a massive activation, as on a first token
    with torch.inference_mode():
        eager = norm(x).float()
        with fusion.fused_forward(norm) as fused:  # the default: on, since the norm lives on CUDA
            assert fused.norms == 1
            fast = norm(x).float()
    assert _compiled_not_fallen_back()
    within = _one_step(fast, eager, steps=2)
    differ = float((fast != eager).float().mean())
    assert differ < 1e-3, f"{differ:.2e} of the values differ"
    assert bool(within.all()), f"{int((~within).sum())} values more than two bf16 steps away"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_fused_forward_of_a_model_stays_within_bf16_rounding() -> None:
    model = factory.build_model("qwen3").to("cuda", torch.bfloat16)
    runner = base_model(model)
    ids = _ids(batch=4, length=64).to("cuda")
    with torch.inference_mode():
        eager = runner(input_ids=ids, use_cache=False).last_hidden_state.float()
        with fusion.fused_forward(model) as fused:
            assert fused.norms > 0 and fused.rotary == 1
            fast = runner(input_ids=ids, use_cache=False).last_hidden_state.float()
    assert _compiled_not_fallen_back()
    assert float((fast - eager).norm() / eager.norm()) < 1e-2


# --- SwiGLU MLPs --------------------------------------------------------------------------------------
class _Form(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
        self.act_fn = nn.SiLU()


class _Commuted(_Form):
    def forward(self, x):  # type: ignore[no-untyped-def]
        """A docstring, then the product the other way round."""
        return self.down_proj(self.up_proj(x) * self.act_fn(self.gate_proj(x)))


class _Named(_Form):
    def forward(self, hidden):  # type: ignore[no-untyped-def]
        out = self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))
        return out


class _Scaled(_Form):
    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x) * 2)


class _Swapped(_Form):  # the activation on the up projection: another MLP
    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))


class _Extra(_Form):
    def forward(self, x, scale=1.0):  # type: ignore[no-untyped-def]
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Gelu(_Named):
    def __init__(self) -> None:
        super().__init__()
        self.act_fn = nn.GELU()


@pytest.mark.parametrize(("cls", "taken"), [(_Commuted, True), (_Named, True), (_Scaled, False), (_Swapped, False),
                                            (_Extra, False), (_Gelu, False)])
def test_only_the_exact_swiglu_form_is_swapped(cls: type, taken: bool) -> None:
    model = nn.Sequential(cls())
    assert fusion.gated_mlps(model) == ([model[0]] if taken else [])
    x = torch.randn(3, 4)
    with torch.inference_mode():
        want = model(x)
        with fusion.fused_forward(model, enabled=True, backend="eager") as fused:
            assert ("forward" in vars(model[0])) == taken and fused.mlps == int(taken)
            got = model(x)
    assert "forward" not in vars(model[0])  # put back
    assert torch.equal(got, want)


@pytest.mark.parametrize(("arch", "mlps"), [("llama", "LlamaMLP"), ("qwen3", "Qwen3MLP"), ("mistral", "MistralMLP"),
                                            ("qwen2", "Qwen2MLP"), ("olmo2", "Olmo2MLP"), ("gemma3_text", None),
                                            ("qwen3_moe", None), ("phi3", None), ("gpt2", None)])
def test_the_families_gated_mlps(arch: str, mlps: str | None) -> None:
    """Gemma's MLPs use a tanh GELU, Phi-3's fuse gate and up, GPT-2's are not gated, Qwen3-MoE's experts
    are fused tensors: none is taken."""
    model = factory.build_model(arch)
    found = {type(m).__name__ for m in fusion.gated_mlps(model)}
    assert found == ({mlps} if mlps else set())


def test_gated_sites_are_read_once_through_the_mlp(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the MLP swapped, the gate and down_proj-input sites reach their consumers through the MLP's
    reader, once per batch, with the tensors the hooks would have given; their hooks stay quiet."""
    from maxact_card.measure import hooks as hooks_mod
    from maxact_card.measure import loop as measure_mod
    from maxact_card.measure.sites import discover

    model = _bf16("qwen3")
    ids = _ids(batch=4, length=9, seed=2).tolist()
    ids = [row[: 5 + i] for i, row in enumerate(ids)]
    batches = [[0, 1], [2, 3]]
    sites = [s for s in discover(model).sites if s.component in ("gate", "down_proj_input", "mlp")]
    assert len(sites) == 3 * factory.config("qwen3").num_hidden_layers  # type: ignore[attr-defined]

    def run() -> dict[str, list[torch.Tensor]]:
        seen: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
        consumers = {s.name: (lambda x, ctx, n=s.name: seen[n].append(x.clone())) for s in sites}
        measure_mod.run_hooked(model, ids, batches=batches, sites=sites, consumers=consumers, device=CPU)
        return seen

    calls: list[object] = []
    real = hooks_mod.gated_update

    def counting(acc, g, up, ctx):  # type: ignore[no-untyped-def]
        calls.append(acc)
        return real(acc, g, up, ctx)

    monkeypatch.setattr(hooks_mod, "gated_update", counting)
    plain = run()
    assert calls == []  # not swapped: the hooks read every site
    with fusion.fused_forward(model, enabled=True, backend="eager") as fused:
        assert fused.mlps == 2
        through = run()
    # no SiteStats behind these consumers: nothing to fold into the product's kernel, so the reader
    # makes the product and hands both tensors on
    assert calls == []
    assert plain.keys() == through.keys()
    for name, tensors in plain.items():
        assert len(tensors) == len(through[name]) == len(batches), name
        assert all(torch.equal(a, b) for a, b in zip(tensors, through[name])), name
    assert not fusion._READERS and not fusion._QUIET  # every reader unregistered
    # with the accumulators behind them, the reader offers the gate's to the kernel (which only runs
    # on CUDA: here the reader falls back to the consumers), once per MLP and batch
    hidden = factory.config("qwen3").hidden_size  # type: ignore[attr-defined]
    accs = {s.name: SiteStats(measure_mod._site_width(model, s) or hidden, len(ids), CPU) for s in sites}
    with fusion.fused_forward(model, enabled=True, backend="eager"):
        measure_mod.run_hooked(model, ids, batches=batches, sites=sites,
                               consumers={n: a.update for n, a in accs.items()}, device=CPU, stats=accs)
    gates = [accs[s.name] for s in sites if s.component == "gate"]
    assert calls == [gates[0], gates[1]] * len(batches)
    tokens = sum(map(len, ids))
    for s in sites:
        assert int(accs[s.name].count) == tokens * accs[s.name].width, s.name  # each read once


def test_the_mlp_input_is_read_at_gate_proj_in_a_swapped_mlp() -> None:
    """The swapped MLP quiets its gate_proj's output hook and its down_proj's input hook, whose tensors its
    reader hands on; the gate_proj's input (the MLP input site of --gemm-inputs) nothing hands on, so
    its pre-hook reads it in the swapped MLP as in the model's own."""
    from maxact_card.measure import loop as measure_mod
    from maxact_card.measure.sites import discover

    model = _bf16("qwen3")
    ids = [row[: 5 + i] for i, row in enumerate(_ids(batch=2, length=9, seed=3).tolist())]
    sites = [s for s in discover(model, gemm_inputs=True).sites if s.component in ("mlp_input", "down_proj_input")]
    assert {s.module.rsplit(".", 1)[1] for s in sites} == {"gate_proj", "down_proj"}

    def run() -> dict[str, list[torch.Tensor]]:
        seen: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
        consumers = {s.name: (lambda x, ctx, n=s.name: seen[n].append(x.clone())) for s in sites}
        measure_mod.run_hooked(model, ids, batches=[[0, 1]], sites=sites, consumers=consumers, device=CPU)
        return seen

    plain = run()
    with fusion.fused_forward(model, enabled=True, backend="eager") as fused:
        assert fused.mlps == 2
        through = run()
    for name, tensors in plain.items():
        assert len(tensors) == len(through[name]) == 1, name
        assert torch.equal(tensors[0], through[name][0]), name


def test_gated_switch_keeps_the_mlps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAXACT_CARD_GATED", "0")
    model = _bf16("llama")
    assert fusion.gated_mlps(model) == []
    with fusion.fused_forward(model, enabled=True, backend="eager") as fused:
        assert fused.mlps == 0 and fused.norms > 0


def test_without_compiling_the_norms_and_rotary_stay_and_the_mlps_are_still_swapped() -> None:
    model = _bf16("llama")
    mlps = len(fusion.gated_mlps(model))
    with fusion.fused_forward(model, enabled=True, compile_pieces=False, backend="eager") as fused:
        assert fused.norms == 0 and fused.rotary == 0 and fused.pieces == ()
        assert fused.mlps == mlps > 0
        assert fused.record()["compiled"] == []
    with fusion.fused_forward(model, enabled=True, backend="eager") as fused:
        assert fused.norms > 0 and fused.rotary > 0
