"""Documents that would give a wrong answer: NaN or infinity in a results file, a policy or a
baseline, and documents nested deeply enough to overflow a recursive reader. Each is one line on
stderr and exit 2 from every command that reads it, naming where the bad value is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maxact_card.cli import app
from maxact_card.documents import non_finite
from maxact_card.errors import SchemaError
from maxact_card.gate.policy import load_policy
from maxact_card.gate.rules import evaluate
from tests.gate.test_gate import example

SITE = 0  # the planted value goes into the first site's max


def _results(tmp_path: Path, constant: str) -> Path:
    """The example results with the first site's max replaced by a bare JSON constant."""
    doc = example()
    marker = 123456.789
    doc["sites"][SITE]["max"] = marker
    text = json.dumps(doc, indent=1).replace(repr(marker), constant, 1)
    path = tmp_path / "results.json"
    path.write_text(text, encoding="utf-8")
    return path


def _one_error_line(res: object) -> str:
    lines = res.stderr.splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in res.stderr  # type: ignore[attr-defined]
    return lines[0]


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("command", [["validate-results"], ["render"], ["diff", "OLD"], ["publish-dry"]])
def test_a_results_file_with_a_non_finite_number_is_refused(tmp_path: Path, constant: str, command: list[str]) -> None:
    bad = _results(tmp_path, constant)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(example()), encoding="utf-8")
    argv = {
        "validate-results": ["validate", str(tmp_path), "--results", str(bad)],
        "render": ["render", str(bad)],
        "diff": ["diff", str(good), str(bad)],
        "publish-dry": ["publish", "org/model", "--results", str(bad), "--dry-run"],
    }[command[0]]
    (tmp_path / "README.md").write_text("# card\n", encoding="utf-8")
    res = CliRunner().invoke(app, argv, env={"HF_HUB_OFFLINE": "1"})
    where = f"$.sites[{SITE}].max: {float(constant)!r} is not a finite number"
    if command[0] == "validate-results":  # validate reports it as a failed check of the results
        assert res.exit_code == 1 and "Traceback" not in res.stderr
        assert next(line for line in res.stdout.splitlines() if line.startswith("FAIL  results")).count(where) == 1
    else:
        assert res.exit_code == 2, res.stdout
        assert where in _one_error_line(res)


@pytest.mark.parametrize(("text", "where"), [
    ("schema_version = 1\n[limits]\nglobal_max_abs = nan\n", "$.limits.global_max_abs: nan"),
    ("schema_version = 1\n[baseline]\nmax_peak_growth_pct = inf\n", "$.baseline.max_peak_growth_pct: inf"),
    ("schema_version = 1\n[limits.components]\nresidual = -inf\n", "$.limits.components.residual: -inf"),
    ("schema_version = 1\n[quant]\nmin_sqnr_db = nan\nrequire_pass = ['fp8-e4m3-static']\n", "$.quant.min_sqnr_db: nan"),
])
def test_a_policy_with_a_non_finite_number_is_refused(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SchemaError) as raised:
        load_policy(path)
    assert where in str(raised.value)
    res = CliRunner().invoke(app, ["check", "./nowhere", "--policy", str(path), "--device", "cpu"])
    assert res.exit_code == 2 and where in _one_error_line(res)


def test_a_json_policy_with_nan_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"schema_version": 1, "baseline": {"max_peak_growth_pct": NaN}}', encoding="utf-8")
    with pytest.raises(SchemaError, match=r"\$\.baseline\.max_peak_growth_pct: nan is not a finite number"):
        load_policy(path)


def test_a_baseline_with_infinity_is_refused_before_measuring(tmp_path: Path) -> None:
    bad = _results(tmp_path, "Infinity")
    res = CliRunner().invoke(app, ["check", "./nowhere", "--baseline", str(bad), "--device", "cpu"])
    assert res.exit_code == 2 and f"$.sites[{SITE}].max: inf is not a finite number" in _one_error_line(res)


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_documents_nested_too_deeply_are_bad_input(tmp_path: Path, suffix: str) -> None:
    depth = 100_000
    if suffix == ".json":
        text = "[" * depth + "]" * depth
    else:
        text = "schema_version = 1\nx = " + "[" * depth + "]" * depth + "\n"
    results = tmp_path / f"deep{suffix}"
    results.write_text(text, encoding="utf-8")
    argv = ["render", str(results)] if suffix == ".json" else ["check", "./nowhere", "--policy", str(results)]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2
    _one_error_line(res)


def test_the_walk_finds_nan_at_any_depth_without_recursion() -> None:
    deep: object = float("nan")
    for _ in range(50_000):
        deep = [deep]
    found = non_finite({"a": deep})
    assert found is not None and found.startswith("$.a[0][0]") and found.endswith("nan is not a finite number")
    assert non_finite({"a": [1.0, 2, "x", None, True, {"b": 1e308}]}) is None


def test_a_finite_example_still_gates() -> None:
    assert evaluate(example(), load_policy(None)).passed


def _yaml_bomb() -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(8):
        prev, name = chr(97 + i), chr(98 + i)
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "---\n" + "\n".join(lines) + "\n---\n# A card\n"


@pytest.mark.parametrize("argv", [["validate", "{dir}"], ["render", "{results}", "--card", "{card}"]])
def test_a_yaml_alias_bomb_in_the_front_matter_is_refused_at_once(tmp_path: Path, argv: list[str]) -> None:
    import time

    card = tmp_path / "README.md"
    card.write_text(_yaml_bomb(), encoding="utf-8")
    results = tmp_path / "r.json"
    results.write_text(json.dumps(example()), encoding="utf-8")
    before = card.read_bytes()
    started = time.monotonic()
    res = CliRunner().invoke(app, [a.format(dir=tmp_path, results=results, card=card) for a in argv])
    assert time.monotonic() - started < 5
    assert res.exit_code in (1, 2) and "Traceback" not in res.stderr
    assert "an alias (*a) repeats another value" in res.stdout + res.stderr
    assert card.read_bytes() == before


def test_a_temp_file_left_by_a_killed_write_is_removed_by_the_next(tmp_path: Path) -> None:
    import os
    import subprocess

    from maxact_card.documents import atomic_write

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f".README.md.maxact-{gone.pid}.k1ll3d.tmp"
    stale.write_bytes(b"x" * 1000)
    running = tmp_path / f".README.md.maxact-{os.getppid()}.w0rk1n.tmp"  # a live writer's: kept
    running.write_bytes(b"y")
    foreign = tmp_path / ".README.md.editor.tmp"  # not ours: kept
    foreign.write_bytes(b"z")
    atomic_write(tmp_path / "README.md", b"# card\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, foreign.name, "README.md"])


def test_a_card_behind_a_symlink_is_written_through_the_link(tmp_path: Path) -> None:
    real = tmp_path / "cards" / "README.md"
    real.parent.mkdir()
    real.write_text("# A card\n", encoding="utf-8")
    link = tmp_path / "README.md"
    link.symlink_to(real)
    results = tmp_path / "maxact" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps(example()), encoding="utf-8")
    res = CliRunner().invoke(app, ["render", str(results), "--card", str(link)])
    assert res.exit_code == 0, res.stderr
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert "<!-- maxact-card:start -->" in real.read_text(encoding="utf-8")


def test_a_set_of_files_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    from maxact_card.documents import atomic_write_set

    chart, card = tmp_path / "maxact" / "profile.svg", tmp_path / "README.md"
    chart.parent.mkdir()
    chart.write_bytes(b"old chart")
    card.write_bytes(b"old card")
    blocker = tmp_path / "not_a_folder"
    blocker.write_bytes(b"")
    with pytest.raises(OSError):
        atomic_write_set([(chart, b"new chart"), (card, b"new card"), (blocker / "results.json", b"{}")])
    assert chart.read_bytes() == b"old chart" and card.read_bytes() == b"old card"
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["maxact", "profile.svg", "README.md",
                                                                  "not_a_folder"])
    atomic_write_set([(chart, b"new chart"), (card, b"new card")])
    assert chart.read_bytes() == b"new chart" and card.read_bytes() == b"new card"
