"""Large runs: out-of-memory splits, data-parallel processes (gloo on CPU), resume after a kill, auto budget."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from maxact_card.cli import app
from maxact_card.errors import RuntimeFailure
from maxact_card.measure import budget, distributed
from maxact_card.measure.loop import LoopControl, LoopReport, measure
from maxact_card.measure.state import StateDir
from maxact_card.quant.heldout import QuantAccumulator
from maxact_card.quant.schemes import STATIC_POLICIES
from tests import paths
from tests.factory import TEXTS, build_model, save, write_corpus

ROOT = paths.ROOT
CPU = torch.device("cpu")
TIMING = {("run", "wall_time_s"), ("run", "tokens_per_s"), ("run", "started_at"), ("run", "world_size"),
          ("run", "phases"), ("quant", "wall_time_s")}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MoE checkpoint (router, experts, every site kind) and a 48-sample corpus of mixed lengths."""
    root = tmp_path_factory.mktemp("scale")
    save("qwen3_moe", root / "model")
    texts = [text * (1 + i % 5) for i, text in enumerate(TEXTS * 8)]
    write_corpus(root / "corpus.jsonl", texts)
    return root


def _cmd(work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "maxact_card", "measure", str(work / "model"), "--corpus", str(work / "corpus.jsonl"),
            "--device", "cpu", "--quant", "--format", "json", *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _run(work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cmd(work, *extra), capture_output=True, text=True, env=_env(), timeout=300)


def _stable(doc: dict[str, Any]) -> dict[str, Any]:
    """The results without what depends on the clock or the process count."""
    doc = json.loads(json.dumps(doc))
    for block, key in TIMING:
        doc.get(block, {}).pop(key, None)
    # the updates this process ran in this session: a share under torchrun, the rest after a resume
    doc.get("run", {}).get("forward", {}).pop("statistics", None)
    # the companion's name follows --out; its sha256 stays: the per-channel vectors must be the same bytes
    doc.get("channels", {}).pop("file", None)
    return doc


def _assert_same(a: Any, b: Any, path: str = "$") -> None:
    """Equal, floats within 1e-9 relative (sums may add in another order); everything else exactly."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def reference(work: Path) -> dict[str, Any]:
    """One uninterrupted single-process run, batch size 1."""
    res = _run(work, "--batch-size", "1", "--out", str(work / "reference.json"))
    assert res.returncode == 0, res.stderr
    return json.loads((work / "reference.json").read_text())


# --- data parallel ------------------------------------------------------------------------------


def test_two_gloo_processes_give_the_one_process_result(work: Path, tmp_path: Path) -> None:
    # Same batch plan in both runs: the model's own fp32 arithmetic differs in the last bits between
    # batch shapes (BLAS picks other kernels), which could reorder exact ties; the statistics do not.
    res = _run(work, "--batch-size", "3", "--out", str(tmp_path / "one.json"))
    assert res.returncode == 0, res.stderr
    reference = json.loads((tmp_path / "one.json").read_text())
    out = tmp_path / "two.json"
    res = _run(work, "--gpus", "2", "--batch-size", "3", "--out", str(out))
    assert res.returncode == 0, res.stderr
    two = json.loads(out.read_text())
    assert two["run"]["world_size"] == 2 and reference["run"]["world_size"] == 1
    # rank 0 reports the updates it ran: its share of the batches, 6 of the 11 here
    ran = [doc["run"]["forward"]["statistics"] for doc in (two, reference)]
    assert ran[0]["cuda"] == ran[0]["triton"] == 0 and 11 * ran[0]["torch"] == 6 * ran[1]["torch"] > 0
    # the located maxima, counts and histograms exactly; the rest within float tolerance
    assert two["global"] == reference["global"]
    assert [s["top_k"] for s in two["sites"]] == [s["top_k"] for s in reference["sites"]]
    assert [s["quantiles"] for s in two["sites"]] == [s["quantiles"] for s in reference["sites"]]
    _assert_same(_stable(two), _stable(reference))
    # rank 0 alone wrote to stdout: exactly one JSON document
    assert json.loads(res.stdout)["run"]["world_size"] == 2


def test_a_usage_error_in_the_processes_keeps_exit_code_2(work: Path) -> None:
    res = _run(work, "--gpus", "2", "--quant-sites", "blocks.99.nothing")
    assert res.returncode == 2, res.stderr
    assert "unknown --quant-sites name 'blocks.99.nothing'" in res.stderr


def test_world_shards_are_disjoint_and_cover_the_plan() -> None:
    plan = [[i] for i in range(7)]
    shards = [distributed.World(rank, 3).shard(plan) for rank in range(3)]
    assert shards == [[[0], [3], [6]], [[1], [4]], [[2], [5]]]


def test_strip_gpus_removes_both_spellings() -> None:
    assert distributed.strip_gpus(["measure", "m", "--gpus", "2", "--quant"]) == ["measure", "m", "--quant"]
    assert distributed.strip_gpus(["measure", "--gpus=4", "m"]) == ["measure", "m"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gpus", "0"], "--gpus must be at least 1, got 0"),
        (["--gpus", "2", "--device-map", "auto"], "cannot be combined with --device-map"),
        (["--gpus", "64", "--device", "cuda"], "--gpus 64 asks for more GPUs than the"),
    ],
)
def test_bad_gpus_requests_are_one_line_exit_2(work: Path, extra: list[str], message: str) -> None:
    args = ["measure", str(work / "model"), "--corpus", str(work / "corpus.jsonl"), *extra]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


# --- out of memory ------------------------------------------------------------------------------


class _MemoryWall:
    """Raises CUDA's out-of-memory error in layer 1 for batches above `limit` padded tokens.

    Layer 0's sites have already been fed when it fires, so a loop that did not roll back would
    count those tokens twice.
    """

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        self.limit = limit
        self.fired = 0
        self.handle = model.model.layers[1].register_forward_pre_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor) and hidden.shape[0] * hidden.shape[1] > self.limit:
            self.fired += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _ids(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 300, (int(torch.randint(4, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def test_an_out_of_memory_batch_is_rolled_back_split_and_retried() -> None:
    model = build_model("llama").eval()
    ids = _ids(24)
    everything = [sorted(range(24), key=lambda i: -len(ids[i]))]
    wall = _MemoryWall(model, limit=200)
    try:
        reports: list[LoopReport] = []
        control = LoopControl(after_batch=lambda done, report: reports.append(report))
        split = measure(model, ids, batches=everything, device=CPU, control=control)
    finally:
        wall.handle.remove()
    report = reports[-1]
    assert wall.fired >= 2 and report.oom_splits == wall.fired
    run = report.batches_run
    assert len(run) > 1 and sorted(i for b in run for i in b) == list(range(24))
    assert all(len(b) * max(len(ids[i]) for i in b) <= 200 for b in run)
    # the same batches without the wall: the model computes bit for bit the same, so must the statistics
    reference = measure(model, ids, batches=run, device=CPU)
    assert set(split.stats) == set(reference.stats)
    for name, stats in reference.stats.items():
        got, want = split.stats[name].state_dict(), stats.state_dict()
        for field in ("max", "min", "channel_max", "count", "hist", "nonfinite_tokens", "massive_tokens",
                      "sample_max", "topk_key", "topk_value", "topk_channel", "topk_token_id"):
            assert torch.equal(got[field], want[field]), (name, field)
        for field in ("sum", "sumsq"):
            assert torch.allclose(got[field], want[field], rtol=1e-9), (name, field)


def test_a_single_sample_that_does_not_fit_fails_the_run_in_one_line() -> None:
    model = build_model("llama").eval()
    wall = _MemoryWall(model, limit=5)
    try:
        with pytest.raises(RuntimeFailure, match=r"out of memory on a single sample of 1x\d+ tokens"):
            measure(model, _ids(3), batches=[[0, 1, 2]], device=CPU)
    finally:
        wall.handle.remove()


def test_quant_accumulators_roll_back_to_their_snapshot() -> None:
    from maxact_card.measure.loop import Accumulators

    acc = QuantAccumulator({p: 0.01 for p in STATIC_POLICIES}, device=CPU)
    group = Accumulators({"site": acc})
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    acc.update(x, mask)
    before = acc.state_dict()
    saved = group.snapshot()
    acc.update(x * 7, mask)
    group.restore(saved)
    after = acc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_site_stats_roll_back_in_place_to_their_snapshot() -> None:
    """The snapshot copies a SiteStats' three storages; a batch that replaced top-K entries (a planted
    larger token) is undone in place, and every field stays a view of the storages throughout."""
    from maxact_card.measure.loop import Accumulators
    from maxact_card.measure.stats import BatchContext, SiteStats

    def ctx(offset: int) -> BatchContext:
        return BatchContext(torch.ones(2, 5, dtype=torch.bool), torch.arange(10).view(2, 5) + offset,
                            torch.arange(2), torch.arange(10).view(2, 5))

    def views_of_storages(acc: SiteStats) -> bool:
        bases = {t.untyped_storage().data_ptr() for t in acc.storages()}
        return all(v.untyped_storage().data_ptr() in bases for v in acc.state_dict().values())

    acc = SiteStats(8, 4, CPU, top_k=3, massive=True)
    group = Accumulators({"site": acc})
    acc.update(torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)), ctx(0))
    before = {k: v.clone() for k, v in acc.state_dict().items()}
    saved = group.snapshot()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    x[1, 3, 6] = 500.0
    acc.update(x, ctx(10))
    assert float(acc.topk_value[0]) == 500.0 and int(acc.topk_channel[0]) == 6 and views_of_storages(acc)
    group.restore(saved)
    after = acc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert views_of_storages(acc) and views_of_storages(acc.merge(acc))
    acc.load_state_dict({k: v.clone() for k, v in before.items()})
    assert views_of_storages(acc)
    with pytest.raises(ValueError, match="field 'hist' has shape"):
        acc.load_state_dict({**before, "hist": before["hist"][:-1]})


# --- resume -------------------------------------------------------------------------------------


def _wait_for_checkpoint(proc: subprocess.Popen[str], path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its first checkpoint: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no checkpoint appeared")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_resumes_to_the_uninterrupted_result(work: Path, reference: dict[str, Any], tmp_path: Path,
                                                          sig: signal.Signals) -> None:
    state = tmp_path / "state"
    args = ["--batch-size", "1", "--state-dir", str(state), "--checkpoint-every", "1"]
    proc = subprocess.Popen(_cmd(work, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_checkpoint(proc, state / "measure-rank0.pt")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 3, stderr
        assert "stopped by SIGTERM after" in stderr and "--resume" in stderr
    saved = torch.load(state / "measure-rank0.pt", weights_only=True)
    assert 1 <= saved["done"] < len(saved["plan"]), "the kill came after the pass had finished"
    assert not list(state.glob(".*.tmp")), "a half-written checkpoint was left behind"

    out = tmp_path / "resumed.json"
    res = _run(work, *args, "--resume", "--out", str(out))
    assert res.returncode == 0, res.stderr
    resumed = json.loads(out.read_text())
    assert resumed["run"]["resumed"] is True and reference["run"]["resumed"] is False
    resumed["run"]["resumed"] = False
    _assert_same(_stable(resumed), _stable(reference))


def _invoke(args: list[str]) -> Any:
    return CliRunner().invoke(app, args)


def test_a_state_dir_of_another_run_is_refused(work: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    base = ["measure", str(work / "model"), "--corpus", str(work / "corpus.jsonl"), "--samples", "6",
            "--state-dir", str(state)]
    assert _invoke(base).exit_code == 0
    again = _invoke(base)
    assert again.exit_code == 2 and "already holds a run; pass --resume to continue it" in again.output
    other = _invoke([*base, "--resume", "--top-k", "4"])
    assert other.exit_code == 2
    assert "holds a run with a different settings.top_k (16, now 4)" in other.output
    gemm = _invoke([*base, "--resume", "--gemm-inputs"])  # more sites: another run
    assert gemm.exit_code == 2 and "different settings.gemm_inputs (false, now true)" in gemm.output
    seed = _invoke([*base, "--resume", "--seed", "9"])
    assert seed.exit_code == 2 and "different samples" in seed.output
    assert _invoke([*base, "--resume"]).exit_code == 0  # same run: the finished state gives the results again


def test_resume_needs_a_state_dir_and_a_state_dir_must_be_a_directory(work: Path, tmp_path: Path) -> None:
    base = ["measure", str(work / "model"), "--corpus", str(work / "corpus.jsonl")]
    res = _invoke([*base, "--resume"])
    assert res.exit_code == 2 and "--resume needs the --state-dir" in res.output
    afile = tmp_path / "f"
    afile.write_text("x")
    res = _invoke([*base, "--state-dir", str(afile)])
    assert res.exit_code == 2 and "is a file" in res.output
    stranger = tmp_path / "full"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    res = _invoke([*base, "--state-dir", str(stranger)])
    assert res.exit_code == 2 and "not empty and holds no maxact-card run" in res.output


def test_state_dir_fingerprint_check_is_per_key(tmp_path: Path) -> None:
    StateDir(tmp_path / "s", {"model": "a", "settings": {"seed": 1}}, resume=False)
    with pytest.raises(Exception, match=r"different model \(a, now b\)"):
        StateDir(tmp_path / "s", {"model": "b", "settings": {"seed": 1}}, resume=True)


# --- auto budget --------------------------------------------------------------------------------


def test_bytes_per_token_counts_the_model_shape() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=12288, num_attention_heads=32)
    bf16 = budget.bytes_per_token(config, torch.bfloat16, 4096, "sdpa")
    assert bf16 == 2 * (12 * 4096 + 4 * 12288) + 4 * 12288
    eager = budget.bytes_per_token(config, torch.bfloat16, 4096, "eager")
    assert eager - bf16 == 2 * 2 * 32 * 4096


def test_auto_budget_follows_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("llama")
    model.config._attn_implementation = "sdpa"
    per_token = budget.bytes_per_token(model.config, torch.float32, 64, "sdpa")
    monkeypatch.setattr(budget, "free_bytes", lambda device, all_gpus=False: per_token * 10_000)
    assert budget.auto_batch_tokens(model, CPU, torch.float32, 64) == 4864  # half of 10,000, down to 256s
    monkeypatch.setattr(budget, "free_bytes", lambda device, all_gpus=False: 1 << 50)
    assert budget.auto_batch_tokens(model, CPU, torch.float32, 64) == budget.MAX_BUDGET == 16384
    monkeypatch.setattr(budget, "free_bytes", lambda device, all_gpus=False: 0)
    assert budget.auto_batch_tokens(model, CPU, torch.float32, 64) == budget.MIN_BUDGET


def test_auto_budget_is_recorded_and_bad_values_are_refused(work: Path) -> None:
    base = ["measure", str(work / "model"), "--corpus", str(work / "corpus.jsonl"), "--samples", "6",
            "--format", "json"]
    res = _invoke(base)
    assert res.exit_code == 0, res.output
    batching = json.loads(res.stdout)["run"]["batching"]
    assert batching.startswith("max_batch_tokens=") and batching.endswith(" (auto)")
    assert json.loads(_invoke([*base, "--max-batch-tokens", "512"]).stdout)["run"]["batching"] == "max_batch_tokens=512"
    bad = _invoke([*base, "--max-batch-tokens", "lots"])
    assert bad.exit_code == 2 and "--max-batch-tokens must be a number of tokens or auto, got 'lots'" in bad.output


# --- sharded models -----------------------------------------------------------------------------


def test_device_map_auto_measures_the_same_as_one_device(work: Path) -> None:
    base = ["measure", str(work / "model"), "--corpus", str(work / "corpus.jsonl"), "--samples", "8",
            "--batch-size", "4", "--format", "json"]
    plain = _invoke(base)
    mapped = _invoke([*base, "--device-map", "auto"])
    assert plain.exit_code == 0 and mapped.exit_code == 0, mapped.output
    one, spread = json.loads(plain.stdout), json.loads(mapped.stdout)
    assert spread["run"]["device_map"] == "auto"
    spread["run"]["device_map"] = None
    _assert_same(_stable(spread), _stable(one))


def test_device_map_needs_a_known_strategy_and_accelerate(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    base = ["measure", str(work / "model"), "--corpus", str(work / "corpus.jsonl")]
    res = _invoke([*base, "--device-map", "everywhere"])
    assert res.exit_code == 2 and "--device-map must be one of auto, balanced" in res.output
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    res = _invoke([*base, "--device-map", "auto"])
    assert res.exit_code == 2 and "--device-map needs the accelerate package" in res.output


@pytest.mark.parametrize(("tokens", "chosen"), [(300_000, False), (17_000_000, True)])
def test_compiling_is_chosen_only_when_the_predicted_loop_gains_more_than_it_costs(
        monkeypatch: pytest.MonkeyPatch, tokens: int, chosen: bool) -> None:
    # Qwen3-8B on an H100 (sm90): 256 release-check samples (~300k tokens) predict a loop of about
    # 10 s, which would gain 0.6 s; the paper's 5,000 samples (~17M tokens) about 550 s, gaining 33 s
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.delenv("MAXACT_CARD_FUSE", raising=False)
    choice = budget.compile_choice(tokens, 8_190_000_000, torch.device("cuda", 0))
    assert choice.chosen is chosen
    expected = 2 * 8_190_000_000 * tokens / (989e12 * 0.5)
    assert choice.predicted_loop_s == pytest.approx(expected)
    assert choice.record() == {"chosen": chosen, "predicted_loop_s": round(expected, 1), "why": choice.why}
    assert ("more than" if chosen else "less than") in choice.why


def test_no_compile_off_cuda_or_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert budget.compile_choice(10**9, 10**10, torch.device("cpu")).record() == {
        "chosen": False, "predicted_loop_s": None,
        "why": "not on CUDA: norms and rotary run as the model has them"}
    monkeypatch.setenv("MAXACT_CARD_FUSE", "0")
    assert budget.compile_choice(10**9, 10**10, torch.device("cuda", 0)).why == "MAXACT_CARD_FUSE=0"


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "llama"])
def test_a_mixture_of_experts_is_costed_by_the_experts_a_token_runs(arch: str) -> None:
    """The compile choice's loop prediction counts the parameters a token passes through: a tiny MoE
    with 4 experts of which 2 run per token counts half its expert weights; a dense model all."""
    model: Any = build_model(arch)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n or n.endswith(".experts"))
    if arch == "llama":
        assert experts == 0 and budget.active_parameters(model) == total
    else:
        assert experts > 0 and budget.active_parameters(model) == total - experts / 2
