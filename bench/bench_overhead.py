"""Hooked measurement vs bare forward: time and peak memory over the same batches, as ratios.

    python bench/bench_overhead.py --shape qwen3-8b            # on a GPU
    python bench/bench_overhead.py --shape tiny --device cpu   # anywhere
    python bench/bench_overhead.py --shape qwen3-8b --max-batch-tokens auto --growth 64,256,1024
    python bench/bench_overhead.py --shape qwen3-8b --gemm-inputs   # with the Linear inputs measured too
    python bench/bench_overhead.py --shape qwen3-8b --kv-cache      # with the queries and KV cache too

Besides the ratios it prints tokens/s and bf16 MFU (model FLOPs: 2 x active parameters x tokens,
plus causal attention, 2 x layers x heads x head_dim x sum of squared lengths; over the device's
dense bf16 peak), and with --growth the hooked time at several corpus sizes, per token.

Random weights cost the same to run as trained ones, so real-size shapes need no download.
Both sides run the base model (no LM head) over identical length-sorted batches; each side is
warmed up over every batch shape first, then timed `--repeats` times; the median is reported. The
time ratio compares the batch loops; the figure beside it adds the hooked side's one-off set-up
(finding the sites, one tiny forward to learn widths the weights do not tell, building accumulators),
which a real run pays once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maxact_card.corpus import batches as make_batches  # noqa: E402
from maxact_card.measure.budget import active_parameters
from maxact_card.measure.loop import base_model, measure, needs_attention_mask, pad_batch  # noqa: E402
from maxact_card.model.fusion import fused_forward  # noqa: E402
from maxact_card.switches import turned_off  # noqa: E402

# Shapes from the public config.json files of these models.
SHAPES = {
    "tiny": dict(model_type="qwen3", hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=1000),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, vocab_size=151936),
}


def build(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, max_position_embeddings=32768)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def lengths_for(samples: int, min_len: int, max_len: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min_len, max_len + 1, (samples,), generator=g).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_bare(runner: torch.nn.Module, token_ids: list[list[int]], plan: list[list[int]], device: torch.device,
              use_mask: bool, fused: bool | None = None) -> float:
    """The forward the measurement makes, without hooks: the attention mask only where it needs one, and
    compiled RMSNorms and rotary embeddings where the measurement compiles them (fused=None);
    use_mask=True, fused=False is the plain transformers forward."""
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), fused_forward(runner, enabled=fused):
        for batch in plan:
            ids, mask = pad_batch(token_ids, batch)
            runner(input_ids=ids.to(device), attention_mask=mask.long().to(device) if use_mask else None,
                   use_cache=False)
    sync(device)
    return time.perf_counter() - start


# `--gemm-inputs`: the hooked side also measures every Linear input (`measure --gemm-inputs`);
# `--kv-cache`: each attention layer's queries, keys and values (`measure --kv-cache`)
GEMM_INPUTS = {"on": False, "kv": False}

def time_hooked(model: torch.nn.Module, token_ids: list[list[int]], plan: list[list[int]], device: torch.device,
                loop: list[float] | None = None) -> float:
    """Seconds for a whole measurement (accumulators built, every batch, synchronised); the batch loop's
    own share, which the bare forward is compared with, is appended to `loop`."""
    sync(device)
    start = time.perf_counter()
    measurement = measure(model, token_ids, batches=plan, device=device, gemm_inputs=GEMM_INPUTS["on"],
                          kv_cache=GEMM_INPUTS["kv"])
    sync(device)
    if loop is not None:
        loop.append(measurement.wall_time_s)
    return time.perf_counter() - start


def quant_pass(model: torch.nn.Module, token_ids: list[list[int]], plan: list[list[int]], device: torch.device):  # type: ignore[no-untyped-def]
    """The --quant held-out pass: every policy at every residual and down_proj-input site."""
    from maxact_card import quant
    from maxact_card.measure.loop import run_hooked
    from maxact_card.measure.sites import discover
    from maxact_card.measure.stats import HIST_BINS, abs_hist_keys

    sites = [s for s in discover(model).sites if s.component in ("residual", "down_proj_input")]
    hist = torch.zeros(HIST_BINS, dtype=torch.int64)
    hist[int(abs_hist_keys(torch.tensor(1.0)))] = 1000  # |a| = 1: any valid calibration histogram does for timing
    scales = quant.static_scales(8.0, hist, 0.999)
    accs = {s.name: quant.QuantAccumulator(scales, device=device) for s in sites}

    def run() -> float:
        sync(device)
        start = time.perf_counter()
        run_hooked(model, token_ids, batches=plan, sites=sites,
                   consumers={n: (lambda x, ctx, a=a: a.update(x, ctx.mask)) for n, a in accs.items()}, device=device)
        sync(device)
        return time.perf_counter() - start

    return run


def floor_pass(model: torch.nn.Module, token_ids: list[list[int]], plan: list[list[int]], device: torch.device,
               read: bool):  # type: ignore[no-untyped-def]
    """A pass with the measurement's hooks, streams and fused forward whose consumers do no statistics:
    each either does nothing (read=False: the cost of the hooks and the side stream alone) or reads its
    tensor once with one reduction (read=True: what any statistics must at least pay in memory traffic).
    A SwiGLU gate is left out of both: the measurement reads it in the kernel that makes the product, which
    the bare forward makes too. The loop's wall time, as `time_hooked` compares it."""
    from maxact_card.measure.loop import run_hooked
    from maxact_card.measure.sites import discover

    sites = [s for s in discover(model).sites if s.component != "gate"]

    def consume(x: torch.Tensor, ctx) -> None:  # type: ignore[no-untyped-def]
        if read:
            torch.amax(x)

    def run() -> float:
        report = run_hooked(model, token_ids, batches=plan, sites=sites, consumers={s.name: consume for s in sites},
                            device=device)
        return report.wall_time_s

    return run


# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets, SXM parts).
def peak_tflops(device: torch.device, override: float | None) -> float | None:
    from maxact_card.measure.budget import peak_bf16_tflops

    return override or peak_bf16_tflops(device)


def active_params(runner: torch.nn.Module, config) -> float:  # type: ignore[no-untyped-def]
    """Parameters one token passes through (`measure.budget.active_parameters`)."""
    return active_parameters(runner)


def model_flops(runner: torch.nn.Module, config, lengths: list[int]) -> float:  # type: ignore[no-untyped-def]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 2.0 * config.num_hidden_layers * heads * head_dim * sum(n * n for n in lengths)
    return 2.0 * active_params(runner, config) * sum(lengths) + attention


def peak(fn, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    """Peak allocated device memory (weights included) while fn runs, MiB."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    return torch.cuda.max_memory_allocated(device) / 2**20


def setup_costs(model: torch.nn.Module, token_ids: list[list[int]], device: torch.device) -> None:
    """What a run pays besides the batches: building the accumulators once, and the snapshot before each batch."""
    from maxact_card.measure.loop import Accumulators, prepare

    def timed(fn) -> float:  # type: ignore[no-untyped-def]
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return (time.perf_counter() - start) * 1000

    gemm, kv = GEMM_INPUTS["on"], GEMM_INPUTS["kv"]
    prepare_ms = statistics.median(timed(lambda: prepare(model, token_ids, device=device, gemm_inputs=gemm,
                                                                  kv_cache=kv))
                                   for _ in range(3))
    members = dict(prepare(model, token_ids, device=device, gemm_inputs=gemm, kv_cache=kv).stats)
    group = Accumulators(members)
    group.snapshot()
    snapshot_ms = statistics.median(timed(group.snapshot) for _ in range(5))

    class FieldsOnly:  # the same accumulator without its storages: a snapshot copies each field
        def __init__(self, acc) -> None:  # type: ignore[no-untyped-def]
            self.state_dict = acc.state_dict

    by_field = Accumulators({name: FieldsOnly(acc) for name, acc in members.items()})
    by_field.snapshot()
    by_field_ms = statistics.median(timed(by_field.snapshot) for _ in range(5))
    print(f"setup: accumulators built in {prepare_ms:.1f} ms per run; snapshot before each batch {snapshot_ms:.2f} ms "
          f"({len(members)} sites; field by field {by_field_ms:.2f} ms, {snapshot_ms / by_field_ms:.2f}x)")


def kernel_times(fn) -> dict[str, tuple[float, int]]:  # type: ignore[no-untyped-def]
    """Device time (ms) and launch count of each kernel that `fn` runs, under torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
    out: dict[str, tuple[float, int]] = {}
    for event in prof.key_averages():
        ms = getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) / 1000
        if ms > 0:
            out[event.key] = (ms, event.count)
    return out


def profile(bare_fn, hooked_fn) -> None:  # type: ignore[no-untyped-def]
    """Print the kernels the hooked pass adds over the bare one, by device time."""
    bare, hooked = kernel_times(bare_fn), kernel_times(hooked_fn)
    total_bare = sum(ms for ms, _ in bare.values())
    total_hooked = sum(ms for ms, _ in hooked.values())
    print(f"profile: the bare forward's kernels by device time (of {total_bare:.1f} ms):")
    for key, (ms, n) in sorted(bare.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"  {ms:9.2f} ms  {100 * ms / total_bare:5.1f}%  {n:6d} calls  {key[:100]}")
    print(f"profile: device time bare {total_bare:.1f} ms, hooked {total_hooked:.1f} ms "
          f"({total_hooked / total_bare:.3f}x); kernels the hooked pass adds or grows:")
    extra = sorted(((ms - bare.get(k, (0.0, 0))[0], n - bare.get(k, (0.0, 0))[1], k) for k, (ms, n) in hooked.items()),
                   reverse=True)
    for ms, n, key in extra[:25]:
        if ms < 0.05:
            break
        print(f"  {ms:9.2f} ms  {n:6d} calls  {key[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--max-batch-tokens", default="16384", help="a number, or auto (what measure does by default)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device, TFLOP/s")
    parser.add_argument("--growth", default="", help="comma-separated sample counts: hooked time per token at each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both")
    parser.add_argument("--quant", action="store_true", help="also time the INT8/FP8 held-out pass")
    parser.add_argument("--gemm-inputs", action="store_true",
                        help="measure the Linear inputs too (three more sites per layer), as measure --gemm-inputs")
    parser.add_argument("--kv-cache", action="store_true",
                        help="measure the queries, keys and values too (three more sites per layer), as measure --kv-cache")
    parser.add_argument("--variants", action="store_true",
                        help="also time the bare forward with the attention mask alone, and with eager norms and rotary alone")
    parser.add_argument("--floor", action="store_true",
                        help="also time hooks that do nothing and hooks that read each tensor once, against the same bare forward")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one bare and one hooked pass: device time per kernel, and the difference")
    args = parser.parse_args()
    GEMM_INPUTS["on"], GEMM_INPUTS["kv"] = args.gemm_inputs, args.kv_cache

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = build(args.shape, device, dtype)
    runner = base_model(model)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    lengths = lengths_for(args.samples, args.min_len, args.max_len, seed=0)
    token_ids = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    if args.max_batch_tokens == "auto":
        from maxact_card.measure.budget import auto_batch_tokens

        budget = auto_batch_tokens(model, device, dtype, args.max_len)
    else:
        budget = int(args.max_batch_tokens)
    plan = make_batches(lengths, max_batch_tokens=budget)
    tokens = sum(lengths)
    params = sum(p.numel() for p in runner.parameters())
    flops = model_flops(runner, model.config, lengths)
    peak_tf = peak_tflops(device, args.peak_tflops)
    print(f"shape={args.shape} params={params / 1e9:.2f}B active={active_params(runner, model.config) / 1e9:.2f}B "
          f"device={torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
          f"dtype={args.dtype} samples={args.samples} tokens={tokens} batches={len(plan)} budget={budget}"
          f"{' (auto)' if args.max_batch_tokens == 'auto' else ''}{' gemm-inputs' if args.gemm_inputs else ''}{' kv-cache' if args.kv_cache else ''}")

    def mfu(seconds: float) -> str:
        achieved = flops / seconds / 1e12
        return f"{achieved:.0f} TFLOP/s" + (f" = {100 * achieved / peak_tf:.1f}% bf16 MFU" if peak_tf else "")

    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    if device.type != "cuda":
        modes = [False]
    use_mask = needs_attention_mask(model, device)
    print(f"attention mask: {'passed' if use_mask else 'not needed (causal model, right padding)'}")
    # the plain transformers forward (mask, eager norms and rotary); --variants adds each change alone
    variants: list[tuple[bool, bool | None]] = [(True, False)]
    if args.variants:
        variants += [(True, None), (use_mask, False)]
    variants = list(dict.fromkeys(v for v in variants if v != (use_mask, None)))
    first = time_bare(runner, token_ids, plan, device, use_mask)  # warm-up over every batch shape
    print(f"first bare pass (warm-up; compiles the fused norms and rotary on CUDA): {first:.1f}s")
    bare_peak = peak(lambda: time_bare(runner, token_ids, plan, device, use_mask), device)
    for compiled in modes:
        os.environ["MAXACT_CARD_COMPILE"] = "1" if compiled else "0"
        time_hooked(model, token_ids, plan, device)  # warm-up (and compilation)
        bare, hooked, total = [], [], []
        others: dict[tuple[bool, bool | None], list[float]] = {v: [] for v in variants}
        for mask_on, fused in variants:
            time_bare(runner, token_ids, plan, device, mask_on, fused)  # warm-up (and compilation)
        for _ in range(args.repeats):  # interleaved, so drift hits both sides alike
            bare.append(time_bare(runner, token_ids, plan, device, use_mask))
            total.append(time_hooked(model, token_ids, plan, device, loop=hooked))
            for (mask_on, fused), times in others.items():
                times.append(time_bare(runner, token_ids, plan, device, mask_on, fused))
        hooked_peak = peak(lambda: time_hooked(model, token_ids, plan, device), device)
        b, h, t = statistics.median(bare), statistics.median(hooked), statistics.median(total)
        print(f"compile={'on' if compiled else 'off'}: bare {b:.3f}s ({tokens / b:,.0f} tok/s, {mfu(b)})  "
              f"hooked {h:.3f}s ({tokens / h:,.0f} tok/s, {mfu(h)})  time ratio {h / b:.3f}x "
              f"(with the accumulators' set-up {t / b:.3f}x)  "
              f"peak memory bare {bare_peak:,.0f} MiB hooked {hooked_peak:,.0f} MiB "
              f"ratio {hooked_peak / bare_peak if bare_peak == bare_peak and bare_peak > 0 else float('nan'):.3f}x")
        for (mask_on, fused), times in others.items():
            m = statistics.median(times)
            print(f"  bare forward, attention mask {'on' if mask_on else 'off'}, "
                  f"{'eager' if fused is False else 'compiled (on CUDA)'} norms and rotary: {m:.3f}s ({tokens / m:,.0f} tok/s, {mfu(m)}), "
                  f"{m / b:.3f}x the measurement's bare forward")
    setup_costs(model, token_ids, device)
    if args.floor:
        os.environ["MAXACT_CARD_COMPILE"] = "1"

        def every_statistic() -> float:
            loop: list[float] = []
            time_hooked(model, token_ids, plan, device, loop=loop)
            return loop[0]

        def fold_apart() -> float:  # the CUDA scans followed by the Triton fold, as before the scans folded
            with turned_off("MAXACT_CARD_SCAN_FOLD"):
                return every_statistic()

        passes = {"hooks alone": floor_pass(model, token_ids, plan, device, read=False),
                  "hooks reading each tensor once": floor_pass(model, token_ids, plan, device, read=True),
                  "every statistic": every_statistic,
                  "every statistic, the Triton fold after each scan": fold_apart}
        for run in passes.values():
            run()  # warm-up
        bare, times = [], {name: [] for name in passes}
        for _ in range(args.repeats):  # interleaved, so drift hits every pass alike
            bare.append(time_bare(runner, token_ids, plan, device, use_mask))
            for name, run in passes.items():
                times[name].append(run())
        b = statistics.median(bare)
        print(f"floor: bare {b:.3f}s; " + "; ".join(
            f"{name} {statistics.median(t):.3f}s ({statistics.median(t) / b:.3f}x)" for name, t in times.items()))
    if args.profile and device.type == "cuda":
        os.environ["MAXACT_CARD_COMPILE"] = "1"
        profile(lambda: time_bare(runner, token_ids, plan, device, use_mask), lambda: time_hooked(model, token_ids, plan, device))
    if args.quant:
        os.environ["MAXACT_CARD_COMPILE"] = "1"
        run = quant_pass(model, token_ids, plan, device)
        run()  # warm-up
        bare, extra = [], []
        for _ in range(args.repeats):
            bare.append(time_bare(runner, token_ids, plan, device, use_mask))
            extra.append(run())
        b, q = statistics.median(bare), statistics.median(extra)
        print(f"quant held-out pass: bare {b:.3f}s  with every policy {q:.3f}s  ratio {q / b:.3f}x")
    if args.growth:
        os.environ["MAXACT_CARD_COMPILE"] = "1"
        rows = []
        for n in (int(v) for v in args.growth.split(",")):
            lens = lengths_for(n, args.min_len, args.max_len, seed=1)
            ids = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]
            grow_plan = make_batches(lens, max_batch_tokens=budget)
            time_hooked(model, ids, grow_plan[:2], device)  # warm-up of new batch shapes
            t = time_hooked(model, ids, grow_plan, device)
            rows.append((n, sum(lens), t))
        base = rows[0][2] / rows[0][1]
        for n, toks, t in rows:
            print(f"growth: {n} samples, {toks} tokens: hooked {t:.3f}s, {toks / t:,.0f} tok/s, "
                  f"time per token {t / toks / base:.3f}x the smallest run's")


if __name__ == "__main__":
    main()

