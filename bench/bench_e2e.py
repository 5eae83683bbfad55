"""What the user waits for: `maxact-card measure` as a separate process, cold and warm, against the
floor (import torch and transformers + read the weights once from disk + a plain eager forward
over the same tokens), in one run.

    python bench/bench_e2e.py --shape qwen3-8b --samples 256          # on a GPU
    python bench/bench_e2e.py --shape tiny --samples 16 --device cpu   # anywhere
    python bench/bench_e2e.py --shape qwen3-8b --samples 5000 --cold-only --work /tmp/w   # the paper's scale

It builds the model folder once (random weights at the shape's real size, bf16 safetensors in
shards of at most 4 GB, and a word-level tokenizer over ids), writes a JSONL corpus of `--samples`
samples of 256 to 2,048 words, then times, each as its own process:

* cold: the CLI with empty TorchInductor and Triton caches (a machine that never ran it);
* warm: the CLI again, the caches as the cold run left them;
* the floor's parts: `import torch, transformers`; reading every weight file once; loading the
  model and running its plain eager forward (transformers' own, attention mask included) over the
  same batches of up to 16,384 padded tokens.

It prints, as each part ends: seconds per part, the CLI's own `run.phases` (with what they leave
out of the whole process: the interpreter's start and exit), each CLI run over the floor, and the
statistics' updates by the code that ran them (a bf16 model on CUDA should show CUDA alone).
The weights are read once before anything is timed, so every part reads them from memory alike.
`--drop-caches` (root) first empties the page cache, as on a machine just started: then the floor's
process pages in torch and CUDA's libraries from disk, and the CLI whatever it uses beyond them (NVRTC,
Triton). Every process compiles the Python it imports where PYTHONDONTWRITEBYTECODE is set, which an
installed environment does not do (pip writes the bytecode at install): the script says so, and
`python -m compileall -q -j 0 <site-packages>` beforehand times what users run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overhead import SHAPES  # the same real shapes as the loop's benchmark

VOCAB_WORDS = 30_000
FLOOR_FORWARD = """
import json, sys, time
t0 = time.perf_counter()
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
folder, corpus, device = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", use_kernels=False).to(device).eval()
tok = AutoTokenizer.from_pretrained(folder)
texts = [json.loads(line)["text"] for line in open(corpus)]
ids = sorted((tok(t)["input_ids"] for t in texts), key=len)
if device.startswith("cuda"):
    torch.cuda.synchronize()
t2 = time.perf_counter()
budget, batch = 16384, []
with torch.inference_mode():
    def run(batch):
        width = max(len(i) for i in batch)
        x = torch.tensor([i + [0] * (width - len(i)) for i in batch], device=device)
        m = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in batch], device=device)
        model.model(input_ids=x, attention_mask=m)
    for i in ids:
        if batch and max(len(b) for b in batch + [i]) * (len(batch) + 1) > budget:
            run(batch)
            batch = []
        batch.append(i)
    if batch:
        run(batch)
if device.startswith("cuda"):
    torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "forward": t3 - t2}))
"""


def build(shape: str, folder: Path) -> None:
    """A model folder at the shape's real size with random bf16 weights and a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, max_position_embeddings=32768)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # sharded as published checkpoints are (Qwen3-8B: five files of at most 4 GB): the weights are
    # hashed one file per thread beside the loading, so one 16 GB file would time a layout nobody ships
    model.save_pretrained(folder, max_shard_size="4GB")
    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(min(VOCAB_WORDS, config.vocab_size - 1))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def write_corpus(path: Path, samples: int, words: int) -> None:
    import random

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(samples):
            length = rng.randint(256, 2048)
            f.write(json.dumps({"id": f"s{i}", "text": " ".join(f"w{rng.randrange(words)}" for _ in range(length))})
                    + "\n")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def read_once(folder: Path) -> float:
    start = time.perf_counter()
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--work", type=Path, default=None, help="where to keep the model folder (default: a temp dir)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="empty the page cache first, as on a machine just started (needs root)")
    parser.add_argument("--cold-only", action="store_true", help="skip the warm run (at thousands of samples it only repeats the cold one)")
    args = parser.parse_args()
    labels = ["cold"] if args.cold_only else ["cold", "warm"]
    if sys.dont_write_bytecode:
        print("note: PYTHONDONTWRITEBYTECODE is set, so every process compiles the Python it imports from source; "
              "run python -m compileall -q -j 0 on site-packages first to time an installed environment", flush=True)

    with tempfile.TemporaryDirectory(prefix="maxact-e2e-") as tmp:
        work = args.work or Path(tmp)
        folder, corpus = work / f"model-{args.shape}", work / "corpus.jsonl"
        if not (folder / "config.json").is_file():
            build(args.shape, folder)
        write_corpus(corpus, args.samples, VOCAB_WORDS)
        if args.drop_caches:
            os.sync()
            try:
                Path("/proc/sys/vm/drop_caches").write_text("3\n", encoding="ascii")
            except OSError as exc:
                raise SystemExit(f"--drop-caches: cannot write /proc/sys/vm/drop_caches ({exc}); run as root") from None
        read_once(folder)  # into the page cache: every part below reads from memory alike
        floor_read = read_once(folder)
        env = dict(os.environ)
        floor_out = json.loads(timed([sys.executable, "-c", FLOOR_FORWARD, str(folder), str(corpus), args.device],
                                     env)[1].strip().splitlines()[-1])
        floor = floor_out["import"] + floor_read + floor_out["forward"]
        print(f"shape {args.shape}, {args.samples} samples, device {args.device}")
        print(f"floor: import {floor_out['import']:.1f} s + read weights {floor_read:.1f} s + plain forward "
              f"{floor_out['forward']:.1f} s = {floor:.1f} s (model load in the floor's process: "
              f"{floor_out['load']:.1f} s)", flush=True)
        caches = Path(tmp) / "caches"
        for label in labels:
            # cold: caches nobody has filled; warm: as the cold run left them
            run_env = dict(env, TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"), TRITON_CACHE_DIR=str(caches / "triton"))
            out = Path(tmp) / f"{label}.json"
            wall, _ = timed([sys.executable, "-m", "maxact_card", "measure", str(folder), "--corpus", str(corpus),
                             "--device", args.device, "--samples", str(args.samples), "--max-seq-len", "2048",
                             "--out", str(out), "--format", "json"], run_env)
            run = json.loads(out.read_text(encoding="utf-8"))["run"]
            phases = run.get("phases", {})
            detail = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
            ran = run.get("forward", {}).get("statistics", {})
            print(f"{label}: whole process {wall:.1f} s = {wall / floor:.2f}x the floor ({run['tokens']:,} tokens); "
                  f"run.phases: {detail}; outside them {wall - sum(phases.values()):.1f}; statistics' updates: "
                  + (", ".join(f"{path} {n:,}" for path, n in ran.items()) or "not recorded"), flush=True)


if __name__ == "__main__":
    main()
