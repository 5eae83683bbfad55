"""The wheel carries schemas/, templates/ and the CUDA sources, and the code reads them from the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_ships_every_resource(tmp_path: Path) -> None:
    pytest.importorskip("hatchling")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(dist), str(ROOT)], check=True)
    wheel = next(dist.glob("maxact_card-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True)
    probe = """
import importlib.resources, json, maxact_card, pathlib
from maxact_card import resources
from maxact_card.corpus import builtin_corpus
root = pathlib.Path(maxact_card.__file__).parent
schemas = sorted(p.name for p in (root / "schemas").iterdir())
templates = sorted(p.name for p in (root / "templates").iterdir())
cuda = sorted(p.name for p in (root / "kernels" / "cuda").iterdir())
for name in schemas:
    resources.load_schema(name)
for name in templates:
    resources.template_text(name)
for name in cuda:  # as the kernels read them (importing the package alone needs no torch)
    (importlib.resources.files("maxact_card.kernels") / "cuda" / name).read_text(encoding="utf-8")
print(json.dumps({"file": maxact_card.__file__, "schemas": schemas, "templates": templates, "cuda": cuda,
                  "corpus": len(builtin_corpus().samples)}))
"""
    # without PYTHONPATH: a source tree on it (`PYTHONPATH=$PWD pytest`) would shadow the wheel
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=env)
    import json

    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert str(env_dir) in found["file"], "the probe imported the source tree, not the wheel"
    assert found["schemas"] == sorted(p.name for p in (ROOT / "schemas").iterdir())
    assert found["templates"] == sorted(p.name for p in (ROOT / "templates").iterdir())
    assert found["cuda"] == sorted(p.name for p in (ROOT / "maxact_card" / "kernels" / "cuda").iterdir())
    assert found["corpus"] >= 256
