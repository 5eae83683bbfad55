"""Data-parallel measurement through torch.distributed: shard the batches, all-reduce the statistics.

Each process (started by `torchrun`, or by `--gpus N`, which launches torchrun) measures every
N-th batch of the same length-sorted plan, so the shards are disjoint and balanced. Sample and
token indices stay global, so after the collectives every process holds exactly the statistics a
single process would have computed: MAX/MIN/SUM all-reduces for the monoid fields, an all-gather
then the same top-K selection for the located maxima. Rank 0 writes the results.
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maxact_card.errors import UsageError

if TYPE_CHECKING:
    import torch

EXIT_FILE_ENV = "MAXACT_CARD_EXIT_FILE"


@dataclass(frozen=True)
class World:
    """Where this process stands: rank, world size and the device it should use."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """The process that writes results and prints."""
        return self.rank == 0

    def shard(self, batches: list[list[int]]) -> list[list[int]]:
        """This process's batches: every size-th of the plan, starting at its rank."""
        return batches[self.rank :: self.size]

    def device(self, requested: str) -> str:
        """The device this process measures on: its own GPU under torchrun, else what was asked."""
        import torch

        if not self.distributed or requested == "cpu":
            return requested
        if requested in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        if requested == "auto":
            return "cpu"
        raise UsageError(f"--device {requested} names one device, but {self.size} processes share it",
                         hint="pass --device cuda (each process takes its local GPU) or --device cpu")


def world_from_env() -> World:
    """The world torchrun describes in the environment (one process when it is not set)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers",
                         hint="start several processes with torchrun or --gpus N") from None
    return World(rank, size, local)


def init(world: World, device: torch.device) -> None:
    """Join the process group (NCCL for GPUs, gloo for CPUs); a no-op for a single process."""
    import torch
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=60),
                            **({"device_id": device} if device.type == "cuda" else {}))


def close(world: World) -> None:
    """Leave the process group, if one was joined."""
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def union_unreadable(world: World, unreadable: dict[str, str]) -> dict[str, str]:
    """Sites any process found unreadable (a process with no batch would not know)."""
    import torch.distributed as dist

    if not world.distributed:
        return unreadable
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, unreadable)
    merged: dict[str, str] = {}
    for part in gathered:
        for name, reason in sorted(part.items()):
            merged.setdefault(name, reason)
    return merged


_OPS = {"max": "MAX", "min": "MIN", "sum": "SUM"}


def all_reduce_fields(world: World, accumulators: Iterable[Any]) -> None:
    """Combine accumulators across processes in place, each field by its declared MERGE_OPS.

    Every process must pass the same accumulators in the same order. Fields of one reduce op
    and dtype are packed into one flat buffer per (op, dtype, device), so a model with hundreds
    of sites costs a handful of collectives rather than thousands.
    """
    import torch
    import torch.distributed as dist

    if not world.distributed:
        return
    accs = list(accumulators)
    # one state per accumulator, reduced field by field in packed buffers, loaded back once
    states = [acc.state_dict() for acc in accs]
    groups: dict[tuple[str, torch.dtype, torch.device], list[tuple[int, str]]] = {}
    for i, acc in enumerate(accs):
        for name, op in type(acc).MERGE_OPS.items():
            if op != "topk":
                value = states[i][name]
                groups.setdefault((op, value.dtype, value.device), []).append((i, name))
    for (op, _dtype, _device), members in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), str(kv[0][2]))):
        flat = torch.cat([states[i][name].reshape(-1) for i, name in members])
        dist.all_reduce(flat, op=getattr(dist.ReduceOp, _OPS[op]))
        offset = 0
        for i, name in members:
            shape = states[i][name].shape
            n = states[i][name].numel()
            states[i][name] = flat[offset : offset + n].view(shape).clone()
            offset += n
    for acc, state in zip(accs, states, strict=True):
        acc.load_state_dict(state)
    topk = [acc for acc in accs if "topk" in type(acc).MERGE_OPS.values()]
    for acc in topk:
        # every process's top-K, concatenated, then the same selection a merge makes
        names = [name for name, op in type(acc).MERGE_OPS.items() if op == "topk"]
        gathered = _all_gather_cat(world, {name: getattr(acc, name) for name in names})
        acc._select_topk(*(gathered[name] for name in names))


def _all_gather_cat(world: World, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import torch
    import torch.distributed as dist

    out = {}
    for name, t in tensors.items():
        parts = [torch.empty_like(t) for _ in range(world.size)]
        dist.all_gather(parts, t.contiguous())
        out[name] = torch.cat(parts)
    return out


def all_reduce_scalar(world: World, value: float, device: torch.device, op: str = "max") -> float:
    """One number combined over all processes by `op` (max: the slowest wall time; sum: a total)."""
    import torch
    import torch.distributed as dist

    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, _OPS[op]))
    return float(t.item())


def record_exit(code: int) -> None:
    """Under a `--gpus` launch, rank 0 leaves its exit code where the launcher reads it."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path and os.environ.get("RANK", "0") == "0":
        Path(path).write_text(str(code), encoding="utf-8")


def launch(processes: int, argv: list[str]) -> int:
    """Run `python -m maxact_card ARGV` in `processes` processes through torchrun; its exit code.

    torchrun reports any failed worker as exit code 1, which a release gate would read as a
    failed gate; rank 0's own code (0 pass, 1 gate, 2 usage, 3 runtime) is passed back instead.
    """
    with tempfile.TemporaryDirectory(prefix="maxact-card-launch-") as tmp:
        exit_file = Path(tmp) / "exit"
        env = dict(os.environ, **{EXIT_FILE_ENV: str(exit_file)})
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "maxact_card", *argv]
        code = subprocess.call(cmd, env=env)
        if exit_file.exists():
            return int(exit_file.read_text(encoding="utf-8") or code)
        return code


def strip_gpus(argv: list[str]) -> list[str]:
    """The command line without its --gpus option (both `--gpus N` and `--gpus=N`)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--gpus":
            skip = True
            continue
        if arg.startswith("--gpus="):
            continue
        out.append(arg)
    return out
