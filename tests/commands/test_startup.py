"""The CLI starts without the measurement engine: --help and the commands that read results never import torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import paths

EXAMPLE = paths.ROOT / "docs" / "example" / "maxact" / "results.json"
PROBE = """
import sys
from maxact_card.__main__ import main
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
sys.stderr.write(f"\\nexit={code} torch={'torch' in sys.modules}\\n")
"""


def _run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                          cwd=paths.ROOT)
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [("--help",), ("measure", "--help"), ("check", "--help"), ("export", "--help"),
                                  ("--version",)])
def test_help_does_not_import_torch(argv: tuple[str, ...]) -> None:
    assert _run(*argv) == "exit=0 torch=False"


def test_reading_results_does_not_import_torch() -> None:
    assert _run("diff", str(EXAMPLE), str(EXAMPLE)) == "exit=0 torch=False"
    assert _run("render", str(EXAMPLE)) == "exit=0 torch=False"


def test_the_card_the_gate_and_the_hub_client_do_not_import_torch() -> None:
    # ARCHITECTURE.md promises it: whatever reads a results file runs without the GPU stack
    modules = ["maxact_card.card.section", "maxact_card.card.splice", "maxact_card.card.validate",
               "maxact_card.card.chart", "maxact_card.gate.rules", "maxact_card.gate.diff", "maxact_card.gate.summary",
               "maxact_card.gate.baseline", "maxact_card.documents", "maxact_card.hub",
               "maxact_card.commands.action_outputs", "maxact_card.export"]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=paths.ROOT)
    assert proc.stdout.strip() == "False", proc.stderr


EXIT_PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("interpreter shutdown\\n"))
sys.argv = ["maxact-card", *sys.argv[1:]]
from maxact_card.__main__ import main
main()
"""


def test_a_measuring_command_skips_the_interpreters_shutdown_and_loses_no_output(tmp_path: Path) -> None:
    from tests import factory

    factory.write_corpus(tmp_path / "corpus.jsonl")
    model = factory.save("llama", tmp_path / "llama")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", EXIT_PROBE, *argv], capture_output=True, text=True,
                              timeout=300, cwd=paths.ROOT)

    done = run("measure", str(model), "--corpus", str(tmp_path / "corpus.jsonl"), "--device", "cpu",
               "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"]["architecture"] == "LlamaForCausalLM"  # all of it, flushed
    assert "interpreter shutdown" not in done.stderr  # torch was imported: no teardown module by module
    refused = run("measure", str(model), "--corpus", str(tmp_path / "corpus.jsonl"), "--device", "cpu",
                  "--samples", "0")
    assert refused.returncode == 2 and refused.stderr.startswith("error: "), refused.stderr
    # a command that never imports torch ends the ordinary way
    assert "interpreter shutdown" in run("render", str(EXAMPLE)).stderr
