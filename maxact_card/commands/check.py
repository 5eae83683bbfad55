"""`maxact-card check`: measure (with the INT8/FP8 check), gate on a policy, and optionally card or publish.

The release gate in one command, the one the GitHub Action runs:
measure → results (schema-validated) → gate (policy, baseline, card status) → report
(→ the local card with `--card`, → a Hub pull request with `--create-pr`).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from maxact_card.card.front_matter import decode_card, parse_card
from maxact_card.card.paths import CARD_FILE, DEFAULT_RESULTS_PATH, relative_link
from maxact_card.card.validate import CheckStatus, LocalSource, validate_card
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
from maxact_card.commands._text import Column, stdout_width, table
from maxact_card.commands.measure import (
    BatchSizeOpt,
    BatchTokensOpt,
    CheckpointEveryOpt,
    ClipQuantileOpt,
    CorpusOpt,
    DeviceMapOpt,
    DeviceOpt,
    Display,
    DtypeOpt,
    EvalFractionOpt,
    ForceOpt,
    GemmInputsOpt,
    GpusOpt,
    KvCacheOpt,
    MaxSeqLenOpt,
    MinSqnrOpt,
    ModelArg,
    QuantOpt,
    QuantSitesOpt,
    RemoteCodeOpt,
    ResumeOpt,
    SamplesOpt,
    SeedOpt,
    StateDirOpt,
    TopKOpt,
    TruncateOpt,
    launch_if_asked,
    summary_lines,
)
from maxact_card.commands.render import CardOpt, run_render
from maxact_card.documents import atomic_write_text, check_writable, validate_results, write_results
from maxact_card.errors import EXIT_GATE, UsageError
from maxact_card.export import FORMATS, parse_formats
from maxact_card.fmt import printable
from maxact_card.gate.baseline import load_baseline
from maxact_card.gate.policy import DEFAULT_POLICY, FP16_MAX, Policy, load_policy
from maxact_card.gate.rules import evaluate
from maxact_card.gate.summary import format_value, render_summary
from maxact_card.gate.verdict import CardStatus, Verdict

if TYPE_CHECKING:
    from maxact_card.measure.run import MeasureOptions
from maxact_card.corpus.tokenizing import DEFAULT_MAX_SEQ_LEN

EXAMPLES = [
    "maxact-card check ./my-checkpoint --out results.json",
    "maxact-card check org/model --revision v1.0 --policy release.toml \\\n    --baseline org/model@v0.9",
    "maxact-card check ./my-checkpoint --card ./my-checkpoint/README.md",
    "maxact-card check org/model --create-pr     # HF_TOKEN with write access",
]

HELP = f"""Measure MODEL (with the INT8/FP8 check unless --no-quant), gate it on a policy, report the verdict.

Without --policy the built-in default policy applies. It fails on: any NaN or inf activation; a
global max|a| above {FP16_MAX:g} (the largest float16: it overflows when served in fp16);
int8-dynamic-per-token failing the INT8 check (skipped with --no-quant); peak growth over
{DEFAULT_POLICY.max_peak_growth_pct:g}% against --baseline (only with --baseline); a stale maxact
section in --card (only with --card).

With --card the section is spliced into the local card, the chart written to maxact/profile.svg and
the results to maxact/results.json beside it. With --create-pr a passing check opens (or updates) a
pull request on the Hub with the results, chart and card section (MODEL must be a repo id).

Exit 0 pass, 1 the gate failed, 2 bad input (policy, baseline, model path...), 3 a runtime failure."""

PolicyOpt = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="Policy file (.toml or .json). Default: the built-in policy described above.",
        envvar="MAXACT_CARD_POLICY",
        show_default=False,
    ),
]
BaselineOpt = Annotated[
    str | None,
    typer.Option(
        "--baseline",
        help="Baseline results: a results JSON, or org/name[@revision] on the Hub (its maxact/results.json).",
        envvar="MAXACT_CARD_BASELINE",
        show_default=False,
    ),
]
CreatePrOpt = Annotated[
    bool,
    typer.Option(
        "--create-pr",
        help="When the gate passes, open or update a Hub pull request with results, chart and card section.",
        envvar="MAXACT_CARD_CREATE_PR",
    ),
]
PrBaseOpt = Annotated[
    str | None,
    typer.Option(
        "--pr-base",
        help="Branch the --create-pr pull request targets (default: main); --revision only says what is measured.",
        envvar="MAXACT_CARD_PR_BASE",
        show_default=False,
    ),
]
CheckExportsOpt = Annotated[
    str | None,
    typer.Option(
        "--exports",
        help="With --create-pr, also add these exports to the commit, comma-separated: smoothquant, kv-scales, "
        "input-scales, outliers (see `maxact-card export`).",
        envvar="MAXACT_CARD_EXPORTS",
        show_default=False,
    ),
]
VerdictOutOpt = Annotated[
    Path | None,
    typer.Option(
        "--verdict-out",
        help="Also write the verdict as JSON to this file (whatever --format says).",
        envvar="MAXACT_CARD_VERDICT_OUT",
        show_default=False,
    ),
]


@dataclass(frozen=True)
class CheckRequest:
    """Everything `check` does beyond the measurement itself."""

    measure: MeasureOptions
    policy_path: Path | None = None
    baseline: str | None = None
    out: Path | None = None
    card: Path | None = None
    create_pr: bool = False
    pr_base: str | None = None
    exports: tuple[str, ...] = ()  # export formats added to the --create-pr commit


@dataclass(frozen=True)
class CheckOutcome:
    """What a check produced: the results, where they were written, the verdict, and the PR (if any)."""

    results: dict[str, Any]
    results_path: Path | None
    verdict: Verdict
    card_path: Path | None = None
    pr_url: str | None = None
    pr_skipped: bool = False
    card_was_stale: bool = False

    def to_dict(self) -> dict[str, Any]:
        """What `check --format json` prints."""
        return {
            "results_path": None if self.results_path is None else str(self.results_path),
            "verdict": self.verdict.to_dict(),
            "pr_url": self.pr_url,
        }


def card_file(card: Path) -> Path:
    """The card's README.md: `card` itself, or README.md inside it when it is a folder."""
    return card / CARD_FILE if card.is_dir() else card


def card_status(card: Path, fresh: dict[str, Any] | None = None) -> CardStatus:
    """Does the local card have a maxact section, and is it up to date?

    Stale: the section does not match the results it links (other numbers), or, given the `fresh`
    results of this check, those linked results were measured on other weights. A section that
    matches its results for the same weights is up to date even when it was rendered on another
    day (the date and library versions in it are the run's, not the model's).
    """
    report = validate_card(LocalSource(card))
    status = {check.name: check.status for check in report.checks}
    present = status.get("section") is CheckStatus.passed
    compared = [status.get(name) for name in ("section-text", "front-matter", "weights", "chart")]
    if not present or status.get("results") is not CheckStatus.passed:
        return CardStatus(present=present, stale=True if present and fresh is not None else None)
    if any(s is CheckStatus.failed for s in compared):
        return CardStatus(present=True, stale=True)
    if fresh is not None:
        linked = report.results_doc  # the results the section was rendered from, as validate read them
        if linked is not None and _weights(linked) != _weights(fresh):
            return CardStatus(present=True, stale=True)
        return CardStatus(present=True, stale=False)
    if all(s in (None, CheckStatus.skipped) for s in compared):
        return CardStatus(present=True, stale=None)
    return CardStatus(present=True, stale=False)


def _weights(results: dict[str, Any]) -> set[tuple[str, str]]:
    return {(w["path"], w["sha256"]) for w in results["model"]["weight_files"]}


def _preflight(request: CheckRequest) -> tuple[Policy, dict[str, Any] | None]:
    """Bad input fails before the (long) measurement: policy, baseline, card path, PR target."""
    check_writable(request.out, "--out")
    policy = load_policy(request.policy_path)
    baseline = load_baseline(request.baseline, request.measure.token) if request.baseline else None
    if request.card is not None:
        target = card_file(request.card)
        if target.exists() and not target.is_file():
            raise UsageError(f"{target} is not a file", hint="pass the model card (README.md) or its folder")
        check_writable(target, "--card")
        if target.is_file():  # a card that cannot take the section fails now, not after the measurement
            try:
                parse_card(decode_card(target.read_bytes(), source=str(target)))
            except OSError as exc:
                raise UsageError(f"cannot read the card {target}: {exc.strerror}") from None
    if request.exports and not request.create_pr:
        raise UsageError("--exports adds files to the --create-pr commit", hint="pass --create-pr, or run "
                         "`maxact-card export` on the results file")
    measured = {"--gemm-inputs": request.measure.gemm_inputs, "--kv-cache": request.measure.kv_cache}
    for name in request.exports:
        needs = FORMATS[name].needs
        if needs is not None and not measured[needs[0]]:
            raise UsageError(f"--exports {name} needs {needs[1]}", hint=f"add {needs[0]}")
    if request.create_pr:
        from maxact_card.hub.client import is_repo_id

        if not is_repo_id(request.measure.model):
            raise UsageError(
                f"--create-pr needs a Hub repo id org/name, not {request.measure.model!r}",
                hint="check the repo id, or drop --create-pr and use --card for a local card",
            )
        from maxact_card.hub.publish import check_publish_target

        # the repo, the token's right to write and the branch, before the model is even loaded
        check_publish_target(request.measure.model, request.pr_base or "main", request.measure.token)
    return policy, baseline


def _write_card(results: dict[str, Any], card: Path, out: Path | None, channels: bytes | None) -> Path:
    """Write results where the card links them, then splice the section and the chart (render's code)."""
    target = card_file(card)
    beside = target.parent / DEFAULT_RESULTS_PATH
    # The card links the results file: --out when it lies under the card's folder, else a copy beside it.
    linked = out if out is not None and relative_link(out, target.parent) is not None else beside
    if linked != out:
        write_results(results, linked, channels=channels)
    run_render(linked, target, None, None)
    return target


def _publish(results: dict[str, Any], results_path: Path | None, request: CheckRequest,
             channels: bytes | None) -> str | None:
    """Open or update the Hub pull request through `publish`'s own code path; the PR's URL."""
    from maxact_card.commands.publish import run_publish

    opts = request.measure

    def publish(path: Path) -> str | None:
        # the measured revision is in the results; the PR goes to the branch that receives the card
        outcome = run_publish(opts.model, path, revision=request.pr_base, direct=False, dry_run=False,
                              allow_stale=False, token=opts.token, exports=request.exports)  # fmt: skip
        return outcome.url

    if results_path is not None:
        return publish(results_path)
    with tempfile.TemporaryDirectory(prefix="maxact-card-") as tmp:  # publish reads a results file
        path = Path(tmp) / "results.json"
        write_results(results, path, channels=channels)
        return publish(path)


def run_check(request: CheckRequest) -> CheckOutcome | None:
    """Measure, validate, gate, and (optionally) write the card and publish. Raises typed errors only.

    Returns None in the processes other than rank 0 of a data-parallel run.
    """
    started = time.perf_counter()
    from maxact_card.measure.run import measure_run  # torch: only when a command runs

    import_s = time.perf_counter() - started
    policy, baseline = _preflight(request)
    measured = measure_run(request.measure, import_s=import_s)
    if measured is None:
        return None
    results, channels = measured.results, measured.channels
    if request.out is not None:
        results = write_results(results, request.out, channels=channels)
    else:
        validate_results(results, source="measured results")
    results_path = request.out
    card_path: Path | None = None
    status: CardStatus | None = None
    if request.card is not None:
        # The verdict describes the card as it was given; then the fresh section is written, so
        # that fixing a stale card is one commit of what this check left in place.
        given = card_file(request.card)
        status = card_status(given, fresh=results) if given.is_file() else CardStatus(present=False, stale=None)
        card_path = _write_card(results, request.card, request.out, channels)
        results_path = results_path or card_path.parent / DEFAULT_RESULTS_PATH
    verdict = evaluate(results, policy, baseline=baseline, card=status)
    pr_url = None
    pr_skipped = request.create_pr and not verdict.passed
    if request.create_pr and verdict.passed:
        pr_url = _publish(results, results_path, request, channels)
    return CheckOutcome(results, results_path, verdict, card_path, pr_url, pr_skipped,
                        card_was_stale=bool(status is not None and status.stale))


def rule_lines(verdict: Verdict, width: int | None) -> list[str]:
    """Every evaluated rule: outcome, measured value, limit and message (which names the site),
    fitted to `width`: on a narrow terminal the message goes under its rule."""
    rows = [
        ["skipped" if r.skipped else ("PASS" if r.passed else "FAIL"), r.rule, format_value(r.rule, r.measured),
         format_value(r.rule, r.limit), printable(r.message)]
        for r in verdict.rules
    ]
    columns = [Column("result"), Column("rule"), Column("measured", right=True), Column("limit", right=True),
               Column("message", wrap=True, labelled=False)]
    return table(f"release gate (policy {printable(verdict.policy)})", columns, rows, width)


def verdict_lines(verdict: Verdict) -> list[str]:
    """The verdict line, then one unwrapped line per failed rule (greppable in CI logs)."""
    failed = f"{len(verdict.failed)} of {len(verdict.rules)} rules failed"
    lines = [f"verdict: {verdict.word} ({failed}, policy {printable(verdict.policy)})"]
    for r in verdict.failed:
        where = f" at {printable(r.site)}" if r.site else ""
        lines.append(
            f"FAIL {r.rule}: measured {format_value(r.rule, r.measured)}, "
            f"limit {format_value(r.rule, r.limit)}{where}: {printable(r.message)}"
        )
    return lines


def print_outcome(outcome: CheckOutcome, fmt: OutputFormat) -> None:
    """The report on stdout in the asked format."""
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(outcome.to_dict(), indent=1, ensure_ascii=False) + "\n")
    elif fmt is OutputFormat.markdown:
        sys.stdout.write(render_summary(outcome.results, outcome.verdict))
    else:
        width = stdout_width()
        lines = [*summary_lines(outcome.results, width), "", *rule_lines(outcome.verdict, width), "",
                 *verdict_lines(outcome.verdict)]
        sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


def _notes(outcome: CheckOutcome) -> None:
    err = stderr_console()
    if outcome.results_path is not None:
        err.print(f"results written to {outcome.results_path}", markup=False)
    if outcome.pr_url:
        err.print(f"pull request: {outcome.pr_url}", markup=False)
    if outcome.pr_skipped:
        err.print("the gate failed: no pull request was opened", markup=False)
    if outcome.card_was_stale and outcome.card_path is not None:
        err.print(f"the card's maxact section was stale; the fresh one is now in {outcome.card_path}: "
                  "review and commit it", markup=False)


@handle_errors
def check_cmd(
    model: ModelArg,
    policy: PolicyOpt = None,
    baseline: BaselineOpt = None,
    out: OutOpt = None,
    card: CardOpt = None,
    create_pr: CreatePrOpt = False,
    pr_base: PrBaseOpt = None,
    exports: CheckExportsOpt = None,
    verdict_out: VerdictOutOpt = None,
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
    quant: QuantOpt = True,
    eval_fraction: EvalFractionOpt = 1 / 3,
    quant_sites: QuantSitesOpt = "default",
    clip_quantile: ClipQuantileOpt = 0.999,
    min_sqnr: MinSqnrOpt = 20.0,
    state_dir: StateDirOpt = None,
    resume: ResumeOpt = False,
    checkpoint_every: CheckpointEveryOpt = 20,
    gpus: GpusOpt = None,
) -> None:
    from maxact_card.measure.run import MeasureOptions

    request = CheckRequest(
        measure=MeasureOptions(
            model=model, revision=revision, token=token, corpus=corpus, samples=samples, max_seq_len=max_seq_len,
            truncate=truncate, seed=seed, dtype=dtype, device=device, device_map=device_map,
            trust_remote_code=trust_remote_code, max_batch_tokens=max_batch_tokens,
            batch_size=batch_size, top_k=top_k, gemm_inputs=gemm_inputs, kv_cache=kv_cache, force=force, quant=quant, eval_fraction=eval_fraction,
            quant_sites=quant_sites, clip_quantile=clip_quantile, min_sqnr=min_sqnr,
            state_dir=state_dir, resume=resume,
            checkpoint_every=checkpoint_every,
        ),
        policy_path=policy, baseline=baseline, out=out, card=card, create_pr=create_pr, pr_base=pr_base,
        exports=parse_formats(exports),
    )  # fmt: skip
    check_writable(verdict_out, "--verdict-out")
    launch_if_asked(gpus, request.measure, "check")
    with Display(enabled=sys.stderr.isatty() and fmt is not OutputFormat.json):
        outcome = run_check(request)
    if outcome is None:  # another process of a data-parallel run: rank 0 reports
        return
    if verdict_out is not None:
        atomic_write_text(
            verdict_out, json.dumps(outcome.verdict.to_dict(), indent=1, ensure_ascii=False) + "\n"
        )
    print_outcome(outcome, fmt)
    _notes(outcome)
    if not outcome.verdict.passed:
        raise typer.Exit(EXIT_GATE)


def register(app: typer.Typer) -> None:
    """Add `check` to the app."""
    app.command("check", help=HELP, short_help="Measure, check INT8/FP8, and gate a release on a policy.",
                epilog=examples_epilog(EXAMPLES))(check_cmd)
