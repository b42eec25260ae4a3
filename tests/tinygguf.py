"""Tiny, randomly initialised GGUF models of recurrent architectures, for the llama.cpp tests.

`build_gguf(path, "qwen35")` writes a Qwen3.5 (Gated DeltaNet + attention hybrid) with the
shape of linmem's `tiny:qwen3.5`: 4 layers, three linear-attention layers then one full
attention layer, hidden size 64. `build_gguf(path, "mamba")` writes a pure recurrent Mamba.
Both carry the tiny models' tokenizer: the 256 byte-level tokens, then the ChatML special
tokens, with the same ids and chat template as `linmem.engines.tiny.build_tokenizer()`.

The weights are random (seeded numpy; matrices with std 1/sqrt(fan in), norms near 1), so the
output is noise, but finite and history-dependent: the recurrent state moves the logits. F32
tensors, under 1 MB; the bytes depend only on the arch and the seed. Writing needs the `gguf`
package (pure Python); llama.cpp (`llama_cpp`) loads the result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# The same layout as linmem.engines.tiny: bytes first (sorted by their GPT-2 unicode form), then
# eos, pad and the additional special tokens.
SPECIAL_TOKENS = ["<|im_end|>", "<|endoftext|>", "<|im_start|>", "<think>", "</think>"]
EOS, PAD, IM_START = 256, 257, 258
CONTEXT_LENGTH = 262144
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

N_EMBD = 64
N_LAYER = 4
N_FF = 128
STD = 0.02  # spread of the norm weights around 1


def byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: one printable character per byte, sorted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = [chr(b) for b in printable]
    extra = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    return sorted(chars)


def _tokenizer(w: Any) -> None:
    import gguf

    tokens = byte_tokens() + SPECIAL_TOKENS
    types = [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * len(SPECIAL_TOKENS)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    # llama.cpp requires a merge list, and the writer drops an empty one: one merge of bytes 0x00
    # and 0x01, whose result is no token, so every byte stays its own token as in tiny:qwen3.5.
    w.add_token_merges(["\u0100 \u0101"])
    w.add_bos_token_id(PAD)
    w.add_eos_token_id(EOS)
    w.add_pad_token_id(PAD)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


class _Weights:
    """Seeded random tensors, given in ggml order (ne0 first) and stored row-major."""

    def __init__(self, w: Any, seed: int) -> None:
        self.w = w
        self.rng = np.random.default_rng(seed)

    def add(
        self, name: str, ne: tuple[int, ...], fill: Callable[[tuple[int, ...]], np.ndarray] | None = None
    ) -> None:
        shape = tuple(reversed(ne))
        # default: a matrix with std 1/sqrt(fan in), so every layer (and the recurrent state)
        # moves the logits, while they stay O(1)
        data = fill(shape) if fill is not None else self.rng.normal(0.0, ne[0] ** -0.5, shape)
        self.w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))

    def ones(self, shape: tuple[int, ...]) -> np.ndarray:
        return 1.0 + self.rng.normal(0.0, STD, shape)


def _qwen35(w: Any, t: _Weights) -> None:
    n_head, n_head_kv, head_dim = 4, 2, 16
    k_heads, v_heads, lin_head_dim, d_conv = 2, 4, 16, 4  # llama.cpp: one head dim for k and v
    key_dim, value_dim = k_heads * lin_head_dim, v_heads * lin_head_dim
    conv_dim = 2 * key_dim + value_dim
    full_attention_interval = 4  # layers 0-2 Gated DeltaNet, layer 3 attention

    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim // 4)  # partial_rotary_factor 0.25
    w.add_rope_dimension_sections([1, 1, 0, 0])  # interleaved M-RoPE over the 2 rotary pairs
    w.add_full_attention_interval(full_attention_interval)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(value_dim)
    w.add_ssm_state_size(lin_head_dim)
    w.add_ssm_time_step_rank(v_heads)
    w.add_ssm_group_count(k_heads)

    _embeddings(t)
    for il in range(N_LAYER):
        p = f"blk.{il}."
        t.add(p + "attn_norm.weight", (N_EMBD,), t.ones)
        t.add(p + "post_attention_norm.weight", (N_EMBD,), t.ones)
        if (il + 1) % full_attention_interval == 0:
            t.add(p + "attn_q.weight", (N_EMBD, 2 * n_head * head_dim))  # queries and output gate
            t.add(p + "attn_k.weight", (N_EMBD, n_head_kv * head_dim))
            t.add(p + "attn_v.weight", (N_EMBD, n_head_kv * head_dim))
            t.add(p + "attn_output.weight", (n_head * head_dim, N_EMBD))
            t.add(p + "attn_q_norm.weight", (head_dim,), t.ones)
            t.add(p + "attn_k_norm.weight", (head_dim,), t.ones)
        else:
            t.add(p + "attn_qkv.weight", (N_EMBD, conv_dim))
            t.add(p + "attn_gate.weight", (N_EMBD, value_dim))
            t.add(p + "ssm_conv1d.weight", (d_conv, conv_dim), lambda s: t.rng.normal(0.0, 0.3, s))
            t.add(p + "ssm_dt.bias", (v_heads,), np.ones)
            t.add(p + "ssm_a", (v_heads,), lambda s: -t.rng.uniform(1.0, 16.0, s))  # -exp(A_log)
            t.add(p + "ssm_beta.weight", (N_EMBD, v_heads))
            t.add(p + "ssm_alpha.weight", (N_EMBD, v_heads))
            t.add(p + "ssm_norm.weight", (lin_head_dim,), t.ones)
            t.add(p + "ssm_out.weight", (value_dim, N_EMBD))
        t.add(p + "ffn_gate.weight", (N_EMBD, N_FF))
        t.add(p + "ffn_up.weight", (N_EMBD, N_FF))
        t.add(p + "ffn_down.weight", (N_FF, N_EMBD))


def _embeddings(t: _Weights) -> None:
    """Token embeddings, the final norm and the (untied) output head, as every arch here has."""
    n_vocab = 256 + len(SPECIAL_TOKENS)
    t.add("token_embd.weight", (N_EMBD, n_vocab))
    t.add("output_norm.weight", (N_EMBD,), t.ones)
    t.add("output.weight", (N_EMBD, n_vocab))


def _mamba(w: Any, t: _Weights) -> None:
    d_inner, d_state, dt_rank, d_conv = 2 * N_EMBD, 16, 4, 4  # llama.cpp supports expansion 2 only

    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_ssm_conv_kernel(d_conv)
    w.add_ssm_inner_size(d_inner)
    w.add_ssm_state_size(d_state)
    w.add_ssm_time_step_rank(dt_rank)

    _embeddings(t)
    for il in range(N_LAYER):
        p = f"blk.{il}."
        t.add(p + "attn_norm.weight", (N_EMBD,), t.ones)
        t.add(p + "ssm_in.weight", (N_EMBD, 2 * d_inner))
        t.add(p + "ssm_conv1d.weight", (d_conv, d_inner), lambda s: t.rng.normal(0.0, 0.3, s))
        t.add(p + "ssm_conv1d.bias", (d_inner,))
        t.add(p + "ssm_x.weight", (d_inner, dt_rank + 2 * d_state))
        t.add(p + "ssm_dt.weight", (dt_rank, d_inner), lambda s: t.rng.normal(0.0, 0.3, s))
        # softplus(bias) = a time step in [0.001, 0.1], as Mamba initialises it
        t.add(p + "ssm_dt.bias", (d_inner,), lambda s: np.log(np.expm1(t.rng.uniform(1e-3, 0.1, s))))
        # -exp(A_log) with Mamba's A_log = log(1..d_state) for every channel
        t.add(p + "ssm_a", (d_state, d_inner), lambda s: -np.broadcast_to(np.arange(1.0, s[1] + 1), s))
        t.add(p + "ssm_d", (d_inner,), np.ones)
        t.add(p + "ssm_out.weight", (d_inner, N_EMBD))


ARCHS: dict[str, Callable[[Any, _Weights], None]] = {"qwen35": _qwen35, "mamba": _mamba}


def build_gguf(path: Path, arch: str = "qwen35", seed: int = 0) -> Path:
    """Write a tiny random-weights GGUF of `arch` (one of ARCHS) to `path`; returns `path`."""
    import gguf

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(sorted(ARCHS))}")
    path = Path(path)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"linmem-tiny-{arch}")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    _tokenizer(w)
    ARCHS[arch](w, _Weights(w, seed))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
