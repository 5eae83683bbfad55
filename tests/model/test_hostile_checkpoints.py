"""Checkpoints whose weights do not fit their config are refused (exit 2, naming the tensors), never
measured: transformers would fill what is missing with random initialisation and measure noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from maxact_card.cli import app
from maxact_card.errors import UsageError
from maxact_card.model.checkpoint import check_loaded
from tests import factory, paths
from tests.factory import write_corpus


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-ckpt")
    write_corpus(root / "corpus.jsonl")
    return factory.save("llama", root / "llama")


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    (dst.parent / "corpus.jsonl").write_bytes((src.parent / "corpus.jsonl").read_bytes())
    return dst


def _measure(ckpt: Path, out: Path) -> object:
    return CliRunner().invoke(app, ["measure", str(ckpt), "--corpus", str(ckpt.parent / "corpus.jsonl"),
                                    "--device", "cpu", "--out", str(out)])


def _refused(res: object, out: Path, *needles: str) -> str:
    assert res.exit_code == 2, res.stderr  # type: ignore[attr-defined]
    line = res.stderr.strip()  # type: ignore[attr-defined]
    assert len(line.splitlines()) == 1 and "do not match its config" in line, line
    for needle in needles:
        assert needle in line, line
    assert not out.exists()  # nothing measured, nothing written
    return line


def test_a_layer_deleted_from_the_weights_is_refused(llama: Path, tmp_path: Path) -> None:
    ckpt = _copy(llama, tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if ".layers.0." not in k}  # a layer before the last
    assert len(kept) < len(tensors)
    save_file(kept, ckpt / "model.safetensors", metadata={"format": "pt"})
    line = _refused(_measure(ckpt, tmp_path / "r.json"), tmp_path / "r.json", "missing", "model.layers.0.")
    assert "random initialisation" in line


def test_a_config_claiming_more_layers_than_the_weights_hold_is_refused(llama: Path, tmp_path: Path) -> None:
    ckpt = _copy(llama, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    layers = config["num_hidden_layers"]
    config["num_hidden_layers"] = layers + 2
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"] + config["layer_types"][:2]
    (ckpt / "config.json").write_text(json.dumps(config))
    res = _measure(ckpt, tmp_path / "r.json")
    assert res.exit_code == 2 and not (tmp_path / "r.json").exists()
    assert res.stderr.strip() == (f"error: the config of {ckpt} claims {layers + 2} layers and its weights hold "
                                  f"{layers}; check num_hidden_layers in config.json against the weights")


def test_a_config_claiming_a_billion_layers_is_refused_before_building_any(llama: Path, tmp_path: Path) -> None:
    import time

    ckpt = _copy(llama, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    config.pop("layer_types", None)
    (ckpt / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    res = _measure(ckpt, tmp_path / "r.json")
    assert time.monotonic() - started < 30
    assert res.exit_code == 2 and "claims 1,000,000,000 layers" in res.stderr


def test_a_tensor_the_model_has_no_place_for_is_refused(llama: Path, tmp_path: Path) -> None:
    ckpt = _copy(llama, tmp_path / "ckpt")
    tensors = load_file(ckpt / "model.safetensors")
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    _refused(_measure(ckpt, tmp_path / "r.json"), tmp_path / "r.json", "1 unexpected",
             "model.layers.0.mlp.extra_proj.weight")


def test_the_report_lists_a_few_names_and_counts_the_rest() -> None:
    report = {"missing_keys": {f"model.layers.{i}.w" for i in range(10)}, "unexpected_keys": set(),
              "mismatched_keys": {("lm_head.weight", (4, 8), (8, 8))}}
    with pytest.raises(UsageError) as raised:
        check_loaded("ckpt", report)
    text = str(raised.value)
    assert "10 missing (model.layers.0.w, model.layers.1.w, model.layers.2.w, model.layers.3.w and 6 more)" in text
    assert "1 mismatched (lm_head.weight)" in text
    check_loaded("ckpt", {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()})


def test_a_llama_gguf_relabelled_as_another_architecture_is_refused(tmp_path: Path) -> None:
    """SmolLM2's GGUF with `general.architecture` changed from llama to mamba (same length, patched
    in place): transformers builds a Mamba model, none of whose tensors the file holds."""
    import struct

    smollm2 = paths.ROOT / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not smollm2.is_file():
        pytest.skip("python -m maxact_card.examples fetch-smollm2 .cache/smollm2")
    data = bytearray(smollm2.read_bytes())
    key = b"general.architecture"
    at = data.index(key) + len(key)
    kind, length = struct.unpack_from("<IQ", data, at)
    assert (kind, length, bytes(data[at + 12: at + 12 + length])) == (8, 5, b"llama")  # a string of 5 bytes
    data[at + 12: at + 12 + length] = b"mamba"
    relabelled = tmp_path / "relabelled.gguf"
    relabelled.write_bytes(data)
    res = CliRunner().invoke(app, ["measure", str(relabelled), "--samples", "2", "--max-seq-len", "32",
                                   "--device", "cpu", "--out", str(tmp_path / "r.json")])
    _refused(res, tmp_path / "r.json", "missing (backbone.layers.0.mixer.")


def test_the_model_is_measured_with_its_own_layers_not_hub_kernels(llama: Path) -> None:
    # transformers kernelizes by default where the `kernels` package is installed: layers swapped for
    # code fetched from the Hub. The measurement is of the checkpoint's own modeling code.
    from maxact_card.model.checkpoint import load

    loaded = load(str(llama), device="cpu")
    assert getattr(loaded.model, "_use_kernels", False) is False
    assert not any("forward" in vars(module) for module in loaded.model.modules())  # no forward swapped in
