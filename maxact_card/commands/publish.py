"""`maxact-card publish`: the card section, results and chart on the Hub in one commit, as a pull request.

The command checks that the results were measured on the weights the target revision holds (by
sha256, also for results measured from a local folder), builds the title and the description, and
hands the rest to `hub.publish`, which finds and updates an open maxact-card pull request instead
of opening another one.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import jinja2
import typer

from maxact_card import fmt, hub
from maxact_card.card.chart import render_chart
from maxact_card.card.paths import DEFAULT_CHART_PATH, DEFAULT_RESULTS_PATH
from maxact_card.card.section import COMPONENT_LABELS, md_code, md_sample, md_text, md_token, read_results
from maxact_card.card.splice import splice_card
from maxact_card.commands._common import (
    FormatOpt,
    OutputFormat,
    RevisionOpt,
    TokenOpt,
    examples_epilog,
    handle_errors,
    stderr_console,
)
from maxact_card.corpus import BUILTIN_ID
from maxact_card.documents import COMPONENTS, companion_path, dumps, read_companion
from maxact_card.errors import UsageError
from maxact_card.export import file_names, parse_formats
from maxact_card.resources import template_text

DESCRIPTION_TEMPLATE = "pr_description.md.j2"
EXAMPLES = [
    "maxact-card publish my-org/my-model --results maxact/results.json",
    "maxact-card publish my-org/my-model --results maxact/results.json --dry-run",
    "maxact-card publish my-org/my-model --results results.json \\\n    --revision dev --direct",
]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


RepoArg = Annotated[
    str,
    typer.Argument(
        help="The Hub model repo to publish to (org/name).", show_default=False, metavar="ORG/NAME"
    ),
]
ResultsOpt = Annotated[
    Path,
    typer.Option(
        "--results",
        help="Results JSON written by `maxact-card measure`.",
        envvar="MAXACT_CARD_RESULTS",
        show_default=False,
    ),
]
DirectOpt = Annotated[
    bool,
    typer.Option(
        "--direct",
        help="Commit to the branch instead of opening a pull request.",
        envvar="MAXACT_CARD_DIRECT",
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="Print the card's diff and the files; write nothing.", envvar="MAXACT_CARD_DRY_RUN"
    ),
]
ExportsOpt = Annotated[
    str | None,
    typer.Option(
        "--exports",
        help="Also add these exports to the commit, comma-separated: smoothquant, kv-scales, input-scales, "
        "outliers (see `maxact-card export`).",
        envvar="MAXACT_CARD_EXPORTS",
        show_default=False,
    ),
]
AllowStaleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-stale",
        help="Publish results measured on other weights than the revision holds.",
        envvar="MAXACT_CARD_ALLOW_STALE",
    ),
]


# ---- staleness -----------------------------------------------------------------------------


def weight_mismatch(measured: Mapping[str, str], current: Mapping[str, str]) -> str | None:
    """What differs between the measured weights and the repo's ({path: sha256} each); None when equal."""
    for path in sorted(set(measured) | set(current)):
        if path not in current:
            return f"{path} was measured but is not among the weights there"
        if path not in measured:
            return f"{path} is there but was not measured"
        if measured[path] != current[path]:
            return f"{path} differs (measured sha256 {measured[path][:12]}…, there {current[path][:12]}…)"
    return None


def check_weights(
    results: Mapping[str, Any], repo_id: str, revision: str | None, token: str | None, *, allow_stale: bool
) -> str:
    """The target revision's commit sha; UsageError when the results were measured on other weights."""
    commit, current = hub.repo_weight_state(repo_id, revision, token)
    measured = {w["path"]: w["sha256"] for w in results["model"].get("weight_files", [])}
    where = f"{repo_id}@{revision or 'main'} (commit {commit[:12]})"
    problem = "the results record no weight files" if not measured else weight_mismatch(measured, current)
    if problem is None:
        return commit
    message = f"the results were measured on other weights than {where}: {problem}"
    if not allow_stale:
        raise UsageError(
            message,
            hint=f"re-measure with `maxact-card measure {repo_id} --revision {commit}`, or pass --allow-stale",
        )
    stderr_console().print(f"warning: {message}; publishing anyway (--allow-stale)", markup=False)
    return commit


# ---- title and description -----------------------------------------------------------------


def pr_title(results: Mapping[str, Any]) -> str:
    """`[maxact-card] Maximum activations: 36,012 at blocks.3.hook_resid_post` (the prefix is what the dedupe matches)."""
    glob = results["global"]
    return f"{hub.PR_TITLE_PREFIX} Maximum activations: {fmt.number(glob['max_abs'])} at {fmt.one_line(glob['site'])}"


def _corpus_spec(corpus_id: str) -> str:
    """The `--corpus` value that loads the corpus with this id again."""
    if corpus_id == BUILTIN_ID:
        return "builtin"
    return corpus_id.removeprefix("file:")  # a file corpus records only its name: the path is the user's


def reproduce_commands(
    results: Mapping[str, Any], repo_id: str, commit: str, *, revision: str | None, direct: bool,
    exports: tuple[str, ...] = (),
) -> dict[str, str]:
    """The exact `maxact-card measure` and `maxact-card publish` command lines (no token: it is never written)."""
    model, run, corpus = results["model"], results["run"], results["corpus"]
    # Results measured on the Hub name their commit; results from a local folder were checked to
    # hold the same weights as the target commit, so that commit reproduces them.
    measured_at = (
        model.get("commit_sha") if model.get("source") == "hub" and model.get("commit_sha") else commit
    )
    measured_repo = model["id"] if model.get("source") == "hub" else repo_id
    samples = int(corpus.get("samples", run["samples"])) + int(corpus.get("eval_samples", 0) or 0)
    measure = [
        "maxact-card",
        "measure",
        measured_repo,
        "--revision",
        measured_at,
        "--corpus",
        _corpus_spec(corpus["id"]),
        "--samples",
        str(samples),
        "--max-seq-len",
        str(run["max_seq_len"]),
        "--seed",
        str(run["seed"]),
        "--dtype",
        str(run["dtype"]),
    ]
    if "truncate" in run:
        measure.append("--truncate" if run["truncate"] else "--no-truncate")
    # the sites measured: the Linear inputs and the KV cache are there only when asked for
    measure += [flag for key, flag in (("gemm_inputs", "--gemm-inputs"), ("kv_cache", "--kv-cache")) if run.get(key)]
    if results.get("quant"):
        measure.append("--quant")
        min_sqnr = (results["quant"].get("thresholds") or {}).get("min_sqnr_db")
        if isinstance(min_sqnr, (int, float)) and not isinstance(min_sqnr, bool):
            measure += ["--min-sqnr", f"{min_sqnr:g}"]
        # the split and the clip change the figures: carry them when they are not the defaults
        eval_fraction, clip = results["quant"].get("eval_fraction"), results["quant"].get("clip_quantile")
        if isinstance(eval_fraction, float) and abs(eval_fraction - 1 / 3) > 1e-12:
            measure += ["--eval-fraction", repr(eval_fraction)]
        if isinstance(clip, float) and clip != 0.999:
            measure += ["--clip-quantile", repr(clip)]
    measure += ["--out", DEFAULT_RESULTS_PATH]
    publish = ["maxact-card", "publish", repo_id, "--results", DEFAULT_RESULTS_PATH]
    if revision:
        publish += ["--revision", revision]
    if direct:
        publish.append("--direct")
    if exports:
        publish += ["--exports", ",".join(exports)]
    return {"measure": shell_join(measure), "publish": shell_join(publish)}


def shell_join(words: list[str]) -> str:
    """A bash command line for `words` on one line: plain words quoted as `shlex` quotes them, a word
    with a line break or another control character as `$'...'` with escapes, so that no file name
    can end the line (and with it the fenced block the command stands in)."""
    return " ".join(shlex.quote(w) if w.isprintable() else _ansi_c_quote(w) for w in words)


def _ansi_c_quote(word: str) -> str:
    out = []
    for ch in word:
        if ch in "\\'":
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x80 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "$'" + "".join(out) + "'"


def _quant_context(results: Mapping[str, Any]) -> dict[str, Any] | None:
    quant = results.get("quant")
    if not quant:
        return None
    rows = []
    for name, policy in (quant.get("policies") or {}).items():
        verdict = str(policy.get("verdict", "?"))
        rows.append(
            {
                "policy": md_code(name),
                "verdict": {"PASS": "PASS", "FAIL": "**FAIL**"}.get(verdict, md_text(verdict)),
                "worst_sqnr": fmt.db(policy.get("worst_sqnr_db")),
                "token_p05": fmt.db(policy.get("worst_token_sqnr_p05_db")),
                "worst_site": md_code(policy["worst_site"]) if policy.get("worst_site") else "–",
                "failing_sites": fmt.count(policy.get("failing_sites", 0)),
            }
        )
    recommended = quant.get("recommended")
    return {
        "rows": rows,
        "recommended": md_code(recommended, in_table=False) if recommended else None,
        "eval_samples": fmt.count(quant.get("eval_samples", results["corpus"].get("eval_samples", 0))),
    }


def _run_context(results: Mapping[str, Any], commit: str) -> dict[str, Any]:
    model, run, corpus = results["model"], results["run"], results["corpus"]
    versions = run.get("versions", {})
    version_text = ", ".join(f"{md_text(k)} {md_text(v)}" for k, v in versions.items() if k != "maxact_card")
    weights = model.get("weight_files", [])
    if len(weights) <= 4:
        weight_text = ", ".join(
            f"{md_code(w['path'], in_table=False)} (sha256 `{w['sha256'][:12]}…`)" for w in weights
        )
    else:
        weight_text = f"{len(weights)} files, {fmt.count(sum(int(w['size']) for w in weights))} bytes"
    if model.get("source") == "hub" and model.get("commit_sha"):
        at = f" of {md_code(model['id'], in_table=False)} at commit `{model['commit_sha'][:12]}`"
    else:
        at = f" (measured from a local folder; the same sha256 as commit `{commit[:12]}`)"
    device = md_text(run["device"])
    if run.get("device_type") and run["device_type"] not in run["device"]:
        device += f" ({md_text(run['device_type'])})"
    if (run.get("world_size") or 1) > 1:
        device += f", {run['world_size']} processes"
    return {
        "weights": weight_text or "none recorded",
        "model_at": at,
        "corpus_id": md_code(corpus["id"], in_table=False),
        "corpus_sha": corpus["sha256"][:12],
        "samples": fmt.count(run["samples"]),
        "tokens": fmt.count(run["tokens"]),
        "max_seq_len": fmt.count(run["max_seq_len"]),
        "seed": str(run["seed"]),
        "dtype": md_text(run["dtype"]),
        "device": device,
        "tool_version": md_text(results["tool"]["version"]),
        "versions": version_text,
    }


def pr_description(
    results: Mapping[str, Any], repo_id: str, commit: str, *, revision: str | None, direct: bool,
    exports: tuple[str, ...] = (),
) -> str:
    """The pull request's Markdown description, rendered from templates/pr_description.md.j2."""
    glob, loc, boot, massive = (
        results["global"],
        results["global"]["location"],
        results["global"]["bootstrap"],
        results["massive"],
    )
    components = [
        {
            "label": COMPONENT_LABELS.get(name, md_text(name)),
            "max_abs": fmt.number(results["components"][name]["max_abs"]),
            "site": md_code(results["components"][name]["site"]),
        }
        for name in [*COMPONENTS, *sorted(set(results["components"]) - set(COMPONENTS))]
        if name in results["components"]
    ]
    context = {
        "direct": direct,
        "model_id": md_code(repo_id, in_table=False),
        "files": {
            "results": md_code(DEFAULT_RESULTS_PATH, in_table=False),
            "chart": md_code(DEFAULT_CHART_PATH, in_table=False),
        },
        "peak": {
            "max_abs": fmt.number(glob["max_abs"]),
            "negative": float(glob["value"]) < 0,
            "value": fmt.number(glob["value"]),
            "site": md_code(glob["site"], in_table=False),
            "module": md_code(glob["module"], in_table=False),
            "channel": str(loc["channel"]),
            "token": md_token(loc, in_table=False),
            "position": str(loc["position"]),
            "sample_id": md_sample(glob),
            "median": fmt.number(boot["median"]),
            "p05": fmt.number(boot["p05"]),
            "p95": fmt.number(boot["p95"]),
        },
        "massive": {
            "tokens_raw": massive["tokens"],
            "tokens": fmt.count(massive["tokens"]),
            "layers": fmt.layer_ranges(massive["layers"]),
            "max_ratio": None if massive.get("max_ratio") is None else fmt.ratio(massive["max_ratio"]),
            "abs_threshold": fmt.number(massive["abs_threshold"]),
            "ratio_threshold": fmt.ratio(massive["ratio_threshold"]),
        },
        "components": components,
        "quant": _quant_context(results),
        "run": _run_context(results, commit),
        "reproduce": reproduce_commands(results, repo_id, commit, revision=revision, direct=direct, exports=exports),
        "exports": [{"format": md_code(name), "path": md_code(path)} for name, path in published_exports(exports).items()],
    }
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # Markdown: values are escaped for Markdown above
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.from_string(template_text(DESCRIPTION_TEMPLATE)).render(**context)


# ---- the command ---------------------------------------------------------------------------


def run_publish(
    repo_id: str,
    results_path: Path,
    *,
    revision: str | None,
    direct: bool,
    dry_run: bool,
    allow_stale: bool,
    token: str | None,
    exports: str | tuple[str, ...] | None = None,
) -> hub.PublishOutcome:
    """Check, build and publish; returns what hub.publish did. Raises typed errors.

    `exports` (export format names) are built from the results and uploaded beside them in the same
    commit, and the card's section links them."""
    if not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise UsageError(f"{repo_id!r} is not a Hub repo id", hint="pass the model repo as org/name")
    formats = parse_formats(exports)
    results = read_results(results_path)
    companion = read_companion(results, results_path)  # the JSON names it: the repo must hold it too
    hub.check_publish_target(repo_id, revision or "main", token, dry_run=dry_run)
    commit = check_weights(results, repo_id, revision, token, allow_stale=allow_stale)
    if results["model"].get("source") == "hub" and results["model"]["id"] != repo_id:
        stderr_console().print(
            f"note: the results name {results['model']['id']}; its weights match {repo_id}", markup=False
        )
    # Everything is rendered before anything is sent: an error leaves the repo untouched.
    files = {DEFAULT_CHART_PATH: render_chart(results).encode("utf-8"),
             **export_files(results, results_path, formats)}
    if companion is not None:
        # beside the results under their repo name, so the published JSON names the file next to it
        published = companion_path(Path(DEFAULT_RESULTS_PATH))
        results = {**results, "channels": {**results["channels"], "file": published.name}}
        files[published.as_posix()] = companion
    files = {DEFAULT_RESULTS_PATH: dumps(results).encode("utf-8"), **files}
    return hub.publish(
        repo_id,
        build_card=lambda current: splice_card(
            current, results, chart_path=DEFAULT_CHART_PATH, results_path=DEFAULT_RESULTS_PATH,
            exports=file_names(formats) or None,
        ),
        files=files,
        title=pr_title(results),
        description=pr_description(results, repo_id, commit, revision=revision, direct=direct, exports=formats),
        revision=revision,
        direct=direct,
        dry_run=dry_run,
        token=token,
    )


def export_files(results: dict[str, Any], results_path: Path, formats: tuple[str, ...]) -> dict[str, bytes]:
    """{repo path: bytes} of each export asked for, beside the results (`maxact/<format's file name>`)."""
    if not formats:
        return {}
    from maxact_card.export import build
    from maxact_card.export.inputs import Inputs

    inputs = Inputs.read(results, results_path)
    paths = published_exports(formats)
    return {paths[name]: build(inputs, name) for name in formats}


def published_exports(formats: tuple[str, ...]) -> dict[str, str]:
    """format → where publish puts its file, relative to the card (`maxact/maxact-act-scales.pt`):
    the links the card's section gives to what was exported."""
    folder = Path(DEFAULT_RESULTS_PATH).parent
    return {name: (folder / file_name).as_posix() for name, file_name in file_names(formats).items()}


def outcome_text(outcome: hub.PublishOutcome, repo_id: str, revision: str | None, *, direct: bool) -> str:
    """The text report on stdout."""
    branch = revision or "main"
    pr = f"pull request #{outcome.pr_num}" if outcome.pr_num is not None else None
    lines: list[str] = []
    if outcome.action == "dry-run":
        lines.append(outcome.card_diff.rstrip("\n") if outcome.card_diff else "(README.md unchanged)")
        if pr:
            lines.append(f"dry run: nothing written; would update {pr}: {outcome.url}")
        elif not direct and not outcome.saw_open_prs:
            lines.append(f"dry run: nothing written; without a token the open pull requests of {repo_id} "
                         "cannot be seen: publishing would open one, or update the one you opened")
        else:
            how = "commit to" if direct else "open a pull request against"
            lines.append(f"dry run: nothing written; would {how} {repo_id}@{branch}")
    elif outcome.action == "opened":
        lines.append(f"opened {pr}: {outcome.url}")
    elif outcome.action == "updated":
        lines.append(f"updated {pr}: {outcome.url}")
    elif outcome.action == "committed":
        lines.append(f"committed to {repo_id}@{branch}: {outcome.url}")
    elif outcome.action == "unchanged":
        where = f"{pr} ({outcome.url})" if pr else f"{repo_id}@{branch}"
        lines.append(f"unchanged: {where} already holds these files; nothing written")
    else:
        lines.append(f"{outcome.action}: {outcome.url or ''}".rstrip(": "))
    lines.append("files: " + ", ".join(outcome.files))
    return "\n".join(lines) + "\n"


def outcome_json(outcome: hub.PublishOutcome) -> str:
    """The JSON report on stdout; a dry run also carries the card's diff."""
    doc: dict[str, Any] = {
        "action": outcome.action,
        "url": outcome.url,
        "pr_num": outcome.pr_num,
        "files": list(outcome.files),
    }
    if outcome.action == "dry-run":
        doc["card_diff"] = outcome.card_diff
        doc["saw_open_prs"] = outcome.saw_open_prs
    return json.dumps(doc, indent=1) + "\n"


def register(app: typer.Typer) -> None:
    """Add `publish` to the app."""

    @app.command(
        "publish",
        help="Publish the Maximum activations section, results and chart to ORG/NAME in one commit "
        "(a pull request unless --direct).",
        short_help="Open a Hub pull request with the section, results and chart.",
        epilog=examples_epilog(EXAMPLES),
    )
    @handle_errors
    def publish(
        repo_id: RepoArg,
        results: ResultsOpt,
        revision: RevisionOpt = None,
        direct: DirectOpt = False,
        dry_run: DryRunOpt = False,
        allow_stale: AllowStaleOpt = False,
        token: TokenOpt = None,
        fmt_: FormatOpt = OutputFormat.text,
        exports: ExportsOpt = None,
    ) -> None:
        if fmt_ is OutputFormat.markdown:
            raise UsageError("publish reports as text or json", hint="pass --format text or --format json")
        outcome = run_publish(
            repo_id,
            results,
            revision=revision,
            direct=direct,
            dry_run=dry_run,
            allow_stale=allow_stale,
            token=token,
            exports=exports,
        )
        out = (
            outcome_json(outcome)
            if fmt_ is OutputFormat.json
            else outcome_text(outcome, repo_id, revision, direct=direct)
        )
        sys.stdout.write(out)
        sys.stdout.flush()
