"""The README tells the truth: its policy loads, its workflow lints and uses the action's real
inputs, its commands and options exist, and CI installs and tests the way it says."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer.main
import yaml

from maxact_card.cli import app
from maxact_card.gate.policy import load_policy
from tests.commands.test_action import INPUTS, OUTPUTS, actionlint

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    """The fenced code blocks of the README in `language`."""
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def commands(block: str) -> list[list[str]]:
    """Each shell command of a block as words, comments and continuation lines dealt with."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def test_the_policy_example_is_a_valid_policy(tmp_path: Path) -> None:
    (block,) = blocks("toml")
    path = tmp_path / "policy.toml"
    path.write_text(block, encoding="utf-8")
    policy = load_policy(path)  # schema-validated
    assert policy.name == "release"
    assert policy.global_max_abs == 32752.0
    assert dict(policy.component_max_abs) == {"down_proj_input": 16384.0}
    assert policy.quant.require_pass == ("int8-dynamic-per-token",) and policy.quant.if_missing == "fail"
    assert policy.max_peak_growth_pct == 10.0 and policy.card.require_section


def test_the_workflow_example_lints_and_uses_the_actions_interface(tmp_path: Path) -> None:
    (block,) = blocks("yaml")
    workflow = yaml.safe_load(block)
    steps = workflow["jobs"]["gate"]["steps"]
    (gate,) = [s for s in steps if "maxact-card" in s.get("uses", "")]
    assert set(gate["with"]) <= INPUTS and "model" in gate["with"]
    assert "HF_TOKEN" in gate["env"]
    used = set(re.findall(r"steps\.gate\.outputs\.([\w-]+)", block))
    assert used and used <= OUTPUTS
    path = tmp_path / "release-gate.yml"
    path.write_text(block, encoding="utf-8")
    assert actionlint([path]) == []


def _command_options() -> dict[str, set[str]]:
    group = typer.main.get_command(app)  # Typer's own Click (it vendors one): no isinstance check
    return {
        name: {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
        for name, cmd in group.commands.items()  # type: ignore[attr-defined]
    }


def test_every_command_and_option_the_readme_shows_exists() -> None:
    options = _command_options()
    shown = 0
    for block in blocks("bash"):
        for words in commands(block):
            if words[0] != "maxact-card" or words[1].startswith("-"):
                continue
            name, *rest = words[1:]
            assert name in options, f"README shows `maxact-card {name}`, which is not a command"
            for word in rest:
                if word.startswith("--"):
                    assert word.split("=")[0] in options[name], f"`maxact-card {name}` has no option {word}"
            shown += 1
    inline = re.findall(r"`(--[a-z][a-z0-9-]*)", README)
    everywhere = set().union(*options.values()) | {"--version", "--help", "--index-url", "--prefix"}
    assert not [o for o in inline if o not in everywhere]
    assert shown >= 4


def test_ci_installs_and_tests_the_way_the_readme_says() -> None:
    """Every command of the README's development block is a command of .ci/run (which makes its
    fresh environment in .cache/venv rather than .venv)."""
    ci = [words for words in commands((ROOT / ".ci" / "run").read_text(encoding="utf-8"))]
    ci_lines = {" ".join(w for w in words if not w.startswith("--quiet") and not w.startswith("--silent")
                         and w not in ("--no-audit", "--no-fund")) for words in ci}
    block = next(b for b in blocks("bash") if "pytest" in b)
    for words in commands(block):
        if words[:3] == ["python", "-m", "venv"]:
            continue
        line = " ".join(words).replace("pip install", "python -m pip install", 1) if words[0] == "pip" else " ".join(words)
        assert line in ci_lines, f"the README says `{' '.join(words)}`, which .ci/run does not run"
