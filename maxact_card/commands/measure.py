"""`maxact-card measure`: run the corpus through a model and report where activations peak."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from maxact_card import progress as progress_mod
from maxact_card.commands._common import (
    FormatOpt,
    OutOpt,
    OutputFormat,
    RevisionOpt,
    TokenOpt,
    examples_epilog,
    handle_errors,
    stderr_console,
)
from maxact_card.commands._text import Column, key_values, stdout_width, table
from maxact_card.documents import check_writable, dumps, write_results
from maxact_card.errors import RuntimeFailure, UsageError
from maxact_card.fmt import count, db, layer_ranges, number, printable, ratio, token_label
from maxact_card.measure import distributed

if TYPE_CHECKING:
    from maxact_card.measure.run import MeasureOptions
from maxact_card.corpus.tokenizing import DEFAULT_MAX_SEQ_LEN

EXAMPLES = [
    "maxact-card measure ./my-checkpoint --out results.json",
    "maxact-card measure org/model --revision v1.0 --samples 512 \\\n    --dtype bfloat16 --format json",
    "maxact-card measure model.Q4_1.gguf --corpus my_prompts.jsonl \\\n    --max-seq-len 2048",
]

ModelArg = Annotated[str, typer.Argument(help="A checkpoint directory, a .gguf file, or a Hub repo id org/name.",
                                                   metavar="MODEL")]
CorpusOpt = Annotated[
    str | None,
    typer.Option("--corpus", help="builtin (default), a .jsonl/.txt file, or hf:DATASET[:split[:column]].",
                 envvar="MAXACT_CARD_CORPUS"),
]
SamplesOpt = Annotated[
    int | None, typer.Option("--samples", help="How many samples (category-proportional). Default: all.",
                             envvar="MAXACT_CARD_SAMPLES")
]
MaxSeqLenOpt = Annotated[int, typer.Option("--max-seq-len", help="Longest sample in tokens.", envvar="MAXACT_CARD_MAX_SEQ_LEN")]
TruncateOpt = Annotated[
    bool | None,
    typer.Option("--truncate/--no-truncate", help="Cut samples longer than --max-seq-len (default: only the built-in corpus).",
                 envvar="MAXACT_CARD_TRUNCATE", show_default=False),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the sample selection.", envvar="MAXACT_CARD_SEED")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (the checkpoint's own), float32, float16 or bfloat16.",
                                       envvar="MAXACT_CARD_DTYPE")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cuda, cuda:N or cpu.", envvar="MAXACT_CARD_DEVICE")]
DeviceMapOpt = Annotated[
    str | None, typer.Option("--device-map", help="auto: spread a large model over all visible GPUs.",
                             envvar="MAXACT_CARD_DEVICE_MAP")
]
RemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run the checkpoint's own Python code (review it first).",
                       envvar="MAXACT_CARD_TRUST_REMOTE_CODE")
]
BatchTokensOpt = Annotated[
    str, typer.Option("--max-batch-tokens", help="Padded tokens per batch, or auto: sized from free device memory.",
                      envvar="MAXACT_CARD_MAX_BATCH_TOKENS")
]
BatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", help="Fixed samples per batch instead of a token budget.",
                             envvar="MAXACT_CARD_BATCH_SIZE")
]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Largest tokens kept per site.", envvar="MAXACT_CARD_TOP_K")]
GemmInputsOpt = Annotated[
    bool, typer.Option("--gemm-inputs/--no-gemm-inputs",
                       help="Also measure the inputs of the attention projections, the attention output projection "
                       "and the MLP input projections, what W8A8/FP8 quantizes (3 more sites per layer).",
                       envvar="MAXACT_CARD_GEMM_INPUTS")
]
KvCacheOpt = Annotated[
    bool, typer.Option("--kv-cache/--no-kv-cache",
                       help="Also measure each attention layer's queries, and the keys and values a KV cache stores "
                       "(after RoPE), per head; --quant then checks FP8 KV-cache scales (3 more sites per layer).",
                       envvar="MAXACT_CARD_KV_CACHE")
]
QuantOpt = Annotated[bool, typer.Option("--quant/--no-quant", help="Also check INT8/FP8 activation scales on held-out data.",
                                        envvar="MAXACT_CARD_QUANT")]
EvalFractionOpt = Annotated[float, typer.Option("--eval-fraction", help="Share of the samples held out for --quant "
                                                "(default: 1/3).", envvar="MAXACT_CARD_EVAL_FRACTION", show_default=False)]
QuantSitesOpt = Annotated[str, typer.Option(
    "--quant-sites", help="default (the residual, the Linear inputs, the KV cache and the peak), all, residual, linear, kv, peak, or "
    "site names (comma-separated).", envvar="MAXACT_CARD_QUANT_SITES")]
ClipQuantileOpt = Annotated[float, typer.Option("--clip-quantile", help="Quantile of |a| the percentile policy clips at.",
                                                envvar="MAXACT_CARD_CLIP_QUANTILE")]
MinSqnrOpt = Annotated[float, typer.Option("--min-sqnr", help="SQNR in dB a policy needs, over the tensor and per token.",
                                           envvar="MAXACT_CARD_MIN_SQNR")]
StateDirOpt = Annotated[
    Path | None, typer.Option("--state-dir", help="Checkpoint the statistics here, so an interrupted run can --resume.",
                              envvar="MAXACT_CARD_STATE_DIR")
]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the run checkpointed in --state-dir.",
                                         envvar="MAXACT_CARD_RESUME")]
CheckpointEveryOpt = Annotated[int, typer.Option("--checkpoint-every", help="Batches between checkpoints.",
                                                 envvar="MAXACT_CARD_CHECKPOINT_EVERY")]
GpusOpt = Annotated[
    int | None,
    typer.Option("--gpus", help="Measure data-parallel in N processes, one per GPU, through torchrun "
                 "(with --device cpu: N CPU processes).", envvar="MAXACT_CARD_GPUS"),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Load even when the weights look too large for the devices.",
                                        envvar="MAXACT_CARD_FORCE")]


def summary_lines(results: dict[str, Any], width: int | None) -> list[str]:
    """The text summary: the peak and where, then per component, the top sites, the INT8/FP8 check
    and the sites not found, each fitted to `width` (None: a pipe, nothing wrapped)."""
    g, run, massive = results["global"], results["run"], results["massive"]
    loc = g["location"]
    peak = number(g["max_abs"]) + (f", the activation {number(g['value'])}" if g["value"] < 0 else "")
    site = next((s for s in results["sites"] if s["name"] == g["site"]), None)
    median = site["quantiles"]["median"] if site else None
    if median:
        peak += f" ({ratio(g['max_abs'] / median)} the median |a| of its site)"
    boot = g["bootstrap"]
    head = [
        ("model", printable(f"{results['model']['id']} ({results['model']['architecture']}, {run['dtype']})")),
        ("global max|a|", peak),
        ("where", printable(f"{g['site']} [{g['module']}], channel {loc['channel']}, sample {loc['sample_id']} "
                            f"position {loc['position']}, token {token_label(loc)}")),
        *([("context", printable(f"{g['context']['category']}: {g['context']['excerpt']}"))]
          if g.get("context") else []),
        ("bootstrap", f"median {number(boot['median'])}, 5-95% [{number(boot['p05'])}, {number(boot['p95'])}]"),
        ("massive", (f"{count(massive['tokens'])} tokens in layers {layer_ranges(massive['layers'])}"
                     if massive["tokens"] else
                     f"none (|a| > {number(massive['abs_threshold'])} and > {ratio(massive['ratio_threshold'])} "
                     "its token's median |a|)")
         + (f"; the largest ratio to a token's median |a| is {ratio(massive['max_ratio'])}"
            if massive["max_ratio"] else "")),
        ("run", (f"{count(run['samples'])} samples, {count(run['tokens'])} tokens, "
                 f"{count(round(run['tokens_per_s']))} tokens/s on {run['device']}")),
        *([("updates", updates_line(run["forward"]["statistics"], run["dtype"]))]
          if run.get("device_type") == "cuda" and run.get("forward", {}).get("statistics") else []),
        *([("time", phases_line(run["phases"]))] if run.get("phases") else []),
    ]
    lines = key_values(head, width)
    lines += [""] + table(
        "per component", [Column("component"), Column("max|a|", right=True), Column("site"),
                          Column("channel", right=True), Column("token")],
        [[name, number(c["max_abs"]), c["site"], str(c["location"]["channel"]), token_label(c["location"])]
         for name, c in results["components"].items()], width)
    top = sorted(results["sites"], key=lambda s: -s["max_abs"])[:10]
    lines += [""] + table(
        "top sites", [Column("site"), Column("max|a|", right=True), Column("q0.999", right=True),
                      Column("rms", right=True), Column("massive tokens", right=True)],
        [[s["name"], number(s["max_abs"]), number(s["quantiles"]["q0.999"]), number(s["rms"]),
          count(s["massive"]["tokens"]) if s["massive"] else "-"] for s in top], width)
    quant = results.get("quant")
    if quant:
        lines += [""] + table(
            f"INT8/FP8 on held-out data ({count(quant['eval_samples'])} samples)",
            [Column("policy"), Column("verdict"), Column("worst SQNR", right=True),
             Column("token p05", right=True), Column("failing sites", right=True), Column("worst site", wrap=True)],
            [[name, p["verdict"], db(p["worst_sqnr_db"]), db(p["worst_token_sqnr_p05_db"]),
              count(p["failing_sites"]), printable(p["worst_site"] or "-")]
             for name, p in quant["policies"].items()], width)
        lines.append(f"recommended: {quant['recommended'] or 'none passes'} "
                     f"(peak {number(g['max_abs'])} at {g['site']})")
    if results["missing_sites"]:
        lines += [""] + table("sites not found", [Column("site"), Column("reason", wrap=True)],
                              [[printable(m["site"]), printable(m["reason"])] for m in results["missing_sites"]],
                              width)
    return lines


def save_results(results: dict[str, Any], out: Path, channels: bytes | None = None) -> dict[str, Any]:
    """Write the results to `out` and their per-channel companion beside it; returns the document as
    written (it names the companion). If that fails after a run, keep the results in a temp file and
    say where."""
    try:
        return write_results(results, out, channels=channels)
    except OSError as exc:
        import tempfile

        fd, kept = tempfile.mkstemp(prefix="maxact-results-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(dumps(results))
        raise RuntimeFailure(f"cannot write --out {out} ({exc.strerror or exc}); the results are saved in {kept}",
                             hint=f"copy them from there: cp {kept} {out}") from None


_UPDATERS = {"cuda": "the CUDA scan", "triton": "the Triton scan", "torch": "torch"}


def updates_line(statistics: dict[str, int], dtype: str) -> str:
    """`3,458 by the CUDA scan`: which code updated the statistics on a GPU (`run.forward.statistics`),
    and, where a bf16 run left the CUDA scan, why it may have and that only its speed differs."""
    line = ", ".join(f"{count(n)} by {_UPDATERS[path]}" for path, n in statistics.items() if n) or "none"
    if dtype == "bfloat16" and any(n for path, n in statistics.items() if path != "cuda"):
        line += (" (a bf16 update leaves the CUDA scan for rows not a multiple of 8 wide, where its kernel"
                 " could not be built, or with MAXACT_CARD_KERNELS=0 or MAXACT_CARD_CUDA_SCAN=0: slower, the"
                 " same numbers)")
    return line


def phases_line(phases: dict[str, float]) -> str:
    """`load 5.2 s, measure 12.0 s, ... (total 18.1 s)`: where the run's time went, in order."""
    parts = [f"{name} {seconds:.1f} s" for name, seconds in phases.items()]
    return ", ".join(parts) + f" (total {sum(phases.values()):.1f} s)"


def print_results(results: dict[str, Any], fmt: OutputFormat) -> None:
    """Write the results to stdout in the asked format."""
    if fmt is OutputFormat.json:
        sys.stdout.write(dumps(results))
        return
    sys.stdout.write("\n".join(summary_lines(results, stdout_width())) + "\n")
    sys.stdout.flush()


class _PassBar(BarColumn):
    """A bar for a pass over the corpus; nothing for a step, which has no total."""

    def render(self, task: Any) -> Any:
        return Text("") if task.total is None else super().render(task)


class Display:
    """What the run is doing, on stderr, while it runs: a spinner line per step with its elapsed
    time, then a bar with samples and tokens/s for each pass over the corpus. Only on a terminal,
    and not with --format json; otherwise nothing is shown (`progress` then has no listener)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress: Progress | None = None
        self.task: Any = None
        self.samples = self.batches = self.done_batches = 0
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Display:  # noqa: PYI034 - Python 3.10 has no typing.Self
        self._stack = contextlib.ExitStack()
        if self.enabled:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), _PassBar(bar_width=24),
                TextColumn("{task.fields[count]}"), TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
                console=stderr_console(), transient=True,
            )
            self._stack.enter_context(self.progress)
            self._stack.enter_context(progress_mod.listening(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _show(self, description: str, total: int | None, count: str = "") -> None:
        assert self.progress is not None
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total, rate="", count=count)

    def step(self, text: str) -> None:
        self._show(escape(text), None)

    def start_pass(self, label: str, samples: int, tokens: int, batches: int) -> None:
        self.samples, self.batches, self.done_batches = samples, batches, 0
        self._show(f"{escape(label)}: {tokens:,} tokens", samples, self._count(0))

    def _count(self, samples: int) -> str:
        return f"{samples:,}/{self.samples:,} samples, batch {min(self.done_batches + 1, self.batches)} of {self.batches}"

    def advance(self, samples: int, tokens: int) -> None:
        if self.progress is None or self.task is None:
            return
        self.done_batches += 1
        elapsed = self.progress.tasks[-1].elapsed or 0.0
        rate = f"{tokens / elapsed:,.0f} tokens/s" if elapsed > 0 else ""
        self.progress.update(self.task, completed=samples, rate=rate, count=self._count(samples))


def launch_if_asked(gpus: int | None, opts: MeasureOptions, command: str) -> None:
    """`--gpus N`: check the options here, then run this same command line in N processes via torchrun."""
    if gpus is None or distributed.world_from_env().distributed:
        return
    if gpus < 1:
        raise UsageError(f"--gpus must be at least 1, got {gpus}")
    opts.check()
    if gpus == 1:
        return
    from maxact_card import corpus as corpus_mod

    corpus_mod.load_corpus(opts.corpus)  # a bad corpus is one line here, not one per process
    if opts.device_map:
        raise UsageError("--gpus runs one copy of the model per GPU; it cannot be combined with --device-map",
                         hint="drop --device-map, or drop --gpus to spread one model over the GPUs")
    if opts.device != "cpu":
        import torch

        available = torch.cuda.device_count()
        if available < gpus:
            raise UsageError(f"--gpus {gpus} asks for more GPUs than the {available} visible",
                             hint="lower --gpus, or pass --device cpu for CPU processes")
    argv = sys.argv[1:]
    if command not in argv:
        raise UsageError("--gpus relaunches the command line; call it from a shell",
                         hint=f"or start torchrun yourself: torchrun --nproc-per-node {gpus} -m maxact_card {command} ...")
    raise typer.Exit(distributed.launch(gpus, distributed.strip_gpus(argv)))


@handle_errors
def measure_cmd(
    model: ModelArg,
    out: OutOpt = None,
    fmt: FormatOpt = OutputFormat.text,
    revision: RevisionOpt = None,
    token: TokenOpt = None,
    corpus: CorpusOpt = None,
    samples: SamplesOpt = None,
    max_seq_len: MaxSeqLenOpt = DEFAULT_MAX_SEQ_LEN,
    truncate: TruncateOpt = None,
    seed: SeedOpt = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    trust_remote_code: RemoteCodeOpt = False,
    max_batch_tokens: BatchTokensOpt = "auto",
    batch_size: BatchSizeOpt = None,
    top_k: TopKOpt = 16,
    gemm_inputs: GemmInputsOpt = False,
    kv_cache: KvCacheOpt = False,
    force: ForceOpt = False,
    quant: QuantOpt = False,
    eval_fraction: EvalFractionOpt = 1 / 3,
    quant_sites: QuantSitesOpt = "default",
    clip_quantile: ClipQuantileOpt = 0.999,
    min_sqnr: MinSqnrOpt = 20.0,
    state_dir: StateDirOpt = None,
    resume: ResumeOpt = False,
    checkpoint_every: CheckpointEveryOpt = 20,
    gpus: GpusOpt = None,
) -> None:
    """Measure max|a| at every site of MODEL over a calibration corpus."""
    started = time.perf_counter()
    from maxact_card.measure.run import MeasureOptions, measure_run  # torch: only when a command runs

    import_s = time.perf_counter() - started

    opts = MeasureOptions(
        model=model, revision=revision, token=token, corpus=corpus, samples=samples, max_seq_len=max_seq_len,
        truncate=truncate, seed=seed, dtype=dtype, device=device, device_map=device_map,
        trust_remote_code=trust_remote_code, max_batch_tokens=max_batch_tokens,
        batch_size=batch_size, top_k=top_k, gemm_inputs=gemm_inputs, kv_cache=kv_cache, force=force, quant=quant, eval_fraction=eval_fraction,
        quant_sites=quant_sites, clip_quantile=clip_quantile, min_sqnr=min_sqnr,
        state_dir=state_dir, resume=resume, checkpoint_every=checkpoint_every,
    )
    check_writable(out, "--out")
    launch_if_asked(gpus, opts, "measure")
    with Display(enabled=sys.stderr.isatty() and fmt is not OutputFormat.json):
        measured = measure_run(opts, import_s=import_s)
    if measured is None:  # another process of a data-parallel run: rank 0 reports
        return
    results = measured.results
    if out is not None:
        results = save_results(results, Path(out), measured.channels)
    print_results(results, fmt)
    if out is not None and fmt is not OutputFormat.json:
        stderr_console().print(f"results written to {out}")


def register(app: typer.Typer) -> None:
    """Add `measure` to the app."""
    app.command("measure", help=measure_cmd.__doc__, short_help="Measure max|a| at every site of a model.",
                epilog=examples_epilog(EXAMPLES))(measure_cmd)


