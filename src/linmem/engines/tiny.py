"""Tiny, randomly initialised models of real architectures, for tests, smoke runs and benchmarks.

`tiny:kimi-linear` (KDA + MLA hybrid), `tiny:qwen3.5` (Gated DeltaNet + attention hybrid) and
`tiny:qwen3` (softmax attention) are built from real transformers configs with a fixed seed, so
the same spec gives the same weights in every process. Their tokenizer is built here: byte-level
(every UTF-8 byte is a token) plus ChatML special tokens, with a ChatML chat template.

The weights are random: answers are noise. They exercise every code path (prefill, snapshots,
extension, generation) with the real layer types and cache classes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

SEED = 1234
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CONTEXT_LENGTH = 262144  # like Qwen3.5 and Kimi-Linear: room for the benchmarks' 64k memories

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def build_tokenizer() -> Any:
    """A byte-level tokenizer: 256 byte tokens, then the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = CONTEXT_LENGTH
    return tok


VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# ChatML whose message content may also be a list of parts: {"type": "image"} becomes one image
# placeholder, as in Qwen3.5's own template.
VLM_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def _common(tok: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tok),
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.convert_tokens_to_ids("<|im_start|>"),
        "eos_token_id": tok.eos_token_id,
        "max_position_embeddings": CONTEXT_LENGTH,
        "tie_word_embeddings": False,
    }


def _kimi_linear(tok: Any) -> Any:
    from transformers import KimiLinearConfig

    # Kimi-Linear needs at least one full-attention (MLA) layer: its cache length comes from one.
    return KimiLinearConfig(
        **_common(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        linear_num_heads=4,
        linear_head_dim=16,
        moe_intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
    )


def _qwen3_5(tok: Any) -> Any:
    from transformers import Qwen3_5TextConfig

    return Qwen3_5TextConfig(
        **_common(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    )


def _qwen3(tok: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        **_common(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )


CONFIGS: dict[str, Callable[[Any], Any]] = {
    "kimi-linear": _kimi_linear,
    "qwen3.5": _qwen3_5,
    "qwen3": _qwen3,
}


def check_name(name: str) -> None:
    """Refuse an unknown tiny model name (before torch is imported: that takes seconds)."""
    from ..errors import UnknownSpec

    if name not in CONFIGS:
        raise UnknownSpec(f"unknown tiny model {name!r}: expected one of {', '.join(sorted(CONFIGS))}")


def build(name: str, seed: int = SEED) -> tuple[Any, Any]:
    """(model, tokenizer) for a tiny architecture; deterministic for a given name and seed."""
    import torch
    from transformers import AutoModelForCausalLM

    check_name(name)
    tok = build_tokenizer()
    config = CONFIGS[name](tok)
    return _seeded(lambda: AutoModelForCausalLM.from_config(config, dtype=torch.float32), tok, seed), tok


def _seeded(make: Callable[[], Any], tok: Any, seed: int) -> Any:
    """`make()` with the global RNG seeded (and left as it was), in eval mode, stopping at the
    tokenizer's end token: the same weights in every process."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    model.eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def build_vlm(seed: int = SEED) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor) of a tiny Qwen3.5 with a vision tower: the same text
    stack as `tiny:qwen3.5` plus a 2-layer ViT, for the captioning path."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS + VISION_TOKENS})
    tok.chat_template = VLM_CHAT_TEMPLATE
    ids = {name: tok.convert_tokens_to_ids(f"<|{name}|>") for name in ("vision_start", "vision_end")}
    config = Qwen3_5Config(
        text_config=_qwen3_5(tok).to_dict(),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 256,
        },
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )
    model = _seeded(lambda: Qwen3_5ForConditionalGeneration(config).float(), tok, seed)
    # Small images: a 448-pixel frame becomes a few dozen tokens, not a thousand.
    images = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=128 * 128
    )
    return model, tok, images


def weights_hash(model: Any) -> str:
    """sha256 over every parameter and buffer, by name: identifies the weights, not just the config."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save(name: str, directory: str | Path, seed: int = SEED) -> Path:
    """Write a tiny model and its tokenizer as a normal Hugging Face directory (for `hf:PATH`);
    `qwen3.5-vl`, the captioning model, also writes its image processor."""
    directory = Path(directory)
    if name == "qwen3.5-vl":
        model, tok, images = build_vlm(seed)
        images.save_pretrained(directory)
    else:
        model, tok = build(name, seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
