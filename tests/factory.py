"""Tiny random-init checkpoints of every supported family, saved with save_pretrained.

Each builder returns a transformers config small enough to run in milliseconds on a CPU; `save`
writes model and tokenizer into a directory exactly as a published checkpoint is laid out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB = 320
_BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n",
    "Activations peak in the residual stream at a few channels of the first token.",
    "1234567890 + - * / = ( ) [ ] { } < > , . ; : ! ?",
    "Über naïve café — 東京 مرحبا Привет 🙂",
]
#: Short, varied texts for CLI runs on tiny checkpoints.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def main():\n    return 42\n",
    "Activations peak in the residual stream at a few channels of the first token.",
    "1234567890 + - * / = ( ) [ ] { } < > , . ; : ! ?",
    "Über naïve café — 東京 مرحبا Привет 🙂",
    "The lazy dog sleeps in the stream.",
]


def write_corpus(path: Path, texts: list[str] = TEXTS) -> Path:
    """A .jsonl corpus of `texts`, one {"text": ...} per line."""
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer trained offline, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _text(**extra: object) -> dict[str, object]:
    return {**_BASE, **extra}


def _configs() -> dict[str, Callable[[], object]]:
    import transformers as T

    moe = dict(moe_intermediate_size=16, num_experts_per_tok=2)
    return {
        "llama": lambda: T.LlamaConfig(**_text()),
        "mistral": lambda: T.MistralConfig(**_text()),
        "qwen2": lambda: T.Qwen2Config(**_text()),
        "qwen3": lambda: T.Qwen3Config(**_text(head_dim=8)),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**_text(head_dim=8, num_experts=4, decoder_sparse_step=1, **moe)),
        "mixtral": lambda: T.MixtralConfig(**_text(num_local_experts=4, num_experts_per_tok=2)),
        "gemma2": lambda: T.Gemma2Config(**_text(head_dim=8)),
        "gemma3_text": lambda: T.Gemma3TextConfig(**_text(head_dim=8)),
        "gemma3": lambda: T.Gemma3Config(
            text_config=T.Gemma3TextConfig(**_text(head_dim=8)).to_dict(),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=16),
            mm_tokens_per_image=4, boi_token_index=3, eoi_token_index=4, image_token_index=5,
        ),
        "gpt_oss": lambda: T.GptOssConfig(**_text(head_dim=8, num_local_experts=4, num_experts_per_tok=2)),
        "qwen3_next": lambda: T.Qwen3NextConfig(**_text(
            head_dim=8, num_experts=4, shared_expert_intermediate_size=16, linear_num_value_heads=4,
            linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention"], **moe)),
        "phi3": lambda: T.Phi3Config(**_text()),
        "olmo2": lambda: T.Olmo2Config(**_text()),
        "deepseek_v3": lambda: T.DeepseekV3Config(**_text(
            num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            n_group=1, topk_group=1, **moe)),
        "gpt2": lambda: T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=512,
                                     bos_token_id=1, eos_token_id=2),
        "gpt_neox": lambda: T.GPTNeoXConfig(**_text(num_key_value_heads=None)),
        "qwen2_5_vl": lambda: T.Qwen2_5_VLConfig(
            text_config=dict(**_text(), rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0]),
            vision_start_token_id=3, vision_end_token_id=4, image_token_id=5, video_token_id=6,
        ),
    }


ARCHITECTURES = tuple(_configs())


def config(arch: str) -> object:
    """The tiny config of one family."""
    return _configs()[arch]()


def build_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random-init model of one family (the class transformers' auto mapping picks)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = config(arch)
    try:
        model = AutoModelForCausalLM.from_config(cfg)
    except ValueError:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_config(cfg)
    return model.eval()


def save(arch: str, directory: Path, *, seed: int = 0,
         edit: Callable[[torch.nn.Module], None] | None = None) -> Path:
    """Write a tiny checkpoint of `arch` (weights as safetensors, config, tokenizer) into `directory`."""
    model = build_model(arch, seed)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer().save_pretrained(directory)
    return directory
