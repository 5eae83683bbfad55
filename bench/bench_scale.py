"""Several GPUs: data-parallel scaling and a model sharded over GPUs, each checked against one GPU.

    torchrun --nproc-per-node 2 bench/bench_scale.py dp --shape qwen3-1.7b     # 2 GPUs, data parallel
    python bench/bench_scale.py sharded --shape qwen3-1.7b                     # 2+ GPUs, --device-map style

dp: every process builds the same random-weight model (rank 0's weights are broadcast), then
  1. rank 0 alone measures every batch (the one-GPU baseline), the others wait;
  2. every process measures its share of the same plan and the statistics are all-reduced,
     exactly as `maxact-card measure --gpus N` does.
  It prints tokens/s of both, their ratio against N, and whether the merged statistics equal the
  one-GPU statistics (max, min, channel max, counts, histograms, top-K and locations exactly;
  sums within 1e-9 relative).
sharded: one process measures the model on GPU 0, then the same weights spread over all visible
  GPUs with accelerate's dispatch (what from_pretrained(device_map=...) does), and compares.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import SHAPES, build, lengths_for, sync  # noqa: E402

from maxact_card.corpus import batches as make_batches  # noqa: E402
from maxact_card.measure import distributed  # noqa: E402
from maxact_card.measure.loop import drop_sites, prepare, run_measurement  # noqa: E402

EXACT = ("max", "min", "channel_max", "count", "hist", "nonfinite_tokens", "massive_tokens", "sample_max",
         "topk_key", "topk_value", "topk_channel", "topk_token_id")


def workload(model: torch.nn.Module, samples: int, min_len: int, max_len: int, budget: int):  # type: ignore[no-untyped-def]
    lengths = lengths_for(samples, min_len, max_len, seed=0)
    g = torch.Generator().manual_seed(0)
    token_ids = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    return token_ids, make_batches(lengths, max_batch_tokens=budget)


def run(model: torch.nn.Module, token_ids: list[list[int]], plan: list[list[int]], device: torch.device):  # type: ignore[no-untyped-def]
    m = prepare(model, token_ids, device=device)
    report = run_measurement(m, model, batches=plan, device=device)
    drop_sites(m, report.unreadable)
    return m


def host_state(m) -> dict[str, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    return {name: {k: v.detach().cpu().clone() for k, v in s.state_dict().items()} for name, s in m.stats.items()}


def compare(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Where two sets of statistics differ (empty: identical)."""
    problems = []
    if set(a) != set(b):
        return [f"different sites: {sorted(set(a) ^ set(b))[:5]}"]
    for name in a:
        for field in EXACT:
            if not torch.equal(a[name][field], b[name][field]):
                problems.append(f"{name}.{field}")
        for field in ("sum", "sumsq"):
            if not torch.allclose(a[name][field], b[name][field], rtol=1e-9, atol=0):
                problems.append(f"{name}.{field} (beyond 1e-9)")
    return problems


def timed(fn, device: torch.device):  # type: ignore[no-untyped-def]
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def data_parallel(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    world = distributed.world_from_env()
    # CPU processes over gloo where there is no GPU: a dry run of the same code path
    device = torch.device(f"cuda:{world.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    distributed.init(world, device)
    torch.manual_seed(0)
    model = build(args.shape, device, getattr(torch, args.dtype))
    for p in model.parameters():  # the same weights everywhere, whatever each GPU's generator did
        dist.broadcast(p.data, 0)
    token_ids, plan = workload(model, args.samples, args.min_len, args.max_len, args.max_batch_tokens)
    tokens = sum(len(t) for t in token_ids)
    # warm-up over every batch shape (and compilation) in each process
    run(model, token_ids, world.shard(plan), device)
    dist.barrier()
    one_state, one_time = None, 0.0
    if world.is_main:
        m, one_time = timed(lambda: run(model, token_ids, plan, device), device)
        one_state = host_state(m)
    dist.barrier()

    def sharded():  # type: ignore[no-untyped-def]
        m = run(model, token_ids, world.shard(plan), device)
        distributed.all_reduce_fields(world, [m.stats[n] for n in sorted(m.stats)])
        return m

    dist.barrier()
    m, n_time = timed(sharded, device)
    n_time = distributed.all_reduce_scalar(world, n_time, device)
    if world.is_main:
        assert one_state is not None
        problems = compare(one_state, host_state(m))
        speedup = one_time / n_time
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"shape={args.shape} processes={world.size} ({name}) tokens={tokens} "
              f"batches={len(plan)} budget={args.max_batch_tokens}")
        print(f"one GPU: {one_time:.3f}s ({tokens / one_time:,.0f} tok/s)   {world.size} GPUs: {n_time:.3f}s "
              f"({tokens / n_time:,.0f} tok/s)   tokens/s ratio {speedup:.2f} = {speedup / world.size:.2f} x N")
        print("merged statistics identical to one GPU" if not problems else f"DIFFERENT: {problems[:8]}")
    distributed.close(world)


def sharded_model(args: argparse.Namespace) -> None:
    from accelerate import dispatch_model

    gpus = torch.cuda.device_count()
    if gpus < 2:
        raise SystemExit("sharded needs at least 2 visible GPUs")
    torch.manual_seed(0)
    dev0 = torch.device("cuda:0")
    model = build(args.shape, dev0, getattr(torch, args.dtype))
    token_ids, plan = workload(model, args.samples, args.min_len, args.max_len, args.max_batch_tokens)
    run(model, token_ids, plan, dev0)  # warm-up
    m, t_one = timed(lambda: run(model, token_ids, plan, dev0), dev0)
    one = host_state(m)
    # layers split evenly over the GPUs; embeddings on the first, final norm on the last
    layers = model.config.num_hidden_layers
    # a tied LM head shares the embedding's weight, so it stays beside it (it never runs here)
    head = 0 if model.config.tie_word_embeddings else gpus - 1
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": gpus - 1, "lm_head": head}
    for i in range(layers):
        device_map[f"model.layers.{i}"] = i * gpus // layers
    model = dispatch_model(model, device_map=device_map)
    run(model, token_ids, plan, dev0)  # warm-up
    m, t_sharded = timed(lambda: run(model, token_ids, plan, dev0), dev0)
    placed = sorted({str(s.max.device) for s in m.stats.values()})
    from maxact_card.kernels import scan
    from maxact_card.measure import stats

    print(f"fused kernels on: {stats._KERNELS['error'] is None}; CUDA scan loaded on devices "
          f"{sorted({key[0] for key in scan._cuda_scan['kernels']})}, failed: {scan._cuda_scan['failed']}")
    problems = compare(one, host_state(m))
    print(f"shape={args.shape} one GPU {t_one:.3f}s, sharded over {gpus} GPUs {t_sharded:.3f}s; statistics on {placed}")
    print("sharded statistics identical to one GPU" if not problems else f"DIFFERENT: {problems[:8]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["dp", "sharded"])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-1.7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--min-len", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    args = parser.parse_args()
    (data_parallel if args.mode == "dp" else sharded_model)(args)


if __name__ == "__main__":
    main()
