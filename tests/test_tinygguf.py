"""The tiny GGUF models load in llama.cpp as recurrent memory, decode, and restore their state."""

from __future__ import annotations

import ctypes
from pathlib import Path

import needs
import numpy as np
import pytest

llama_cpp = needs.llama_cpp()
pytest.importorskip("gguf")

from tinygguf import build_gguf  # noqa: E402

KINDS = {"qwen35": (False, True), "mamba": (True, False)}  # (is_recurrent, is_hybrid)


def _decode(llm, ids: list[int], pos0: int) -> np.ndarray:
    """Decode `ids` on sequence 0 from position `pos0`; the last token's logits."""
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        for i, token in enumerate(ids):
            batch.token[i] = token
            batch.pos[i] = pos0 + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(ids) - 1
        batch.n_tokens = len(ids)
        assert llama_cpp.llama_decode(llm.ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy()


@pytest.mark.parametrize("arch", sorted(KINDS))
def test_tiny_gguf_loads_and_restores_state(tmp_path: Path, arch: str) -> None:
    path = build_gguf(tmp_path / "a.gguf", arch, seed=3)
    assert path.read_bytes() == build_gguf(tmp_path / "b.gguf", arch, seed=3).read_bytes()
    assert path.read_bytes() != build_gguf(tmp_path / "c.gguf", arch, seed=4).read_bytes()
    assert path.stat().st_size < 2_000_000

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False)
    try:
        recurrent, hybrid = KINDS[arch]
        assert llama_cpp.llama_model_is_recurrent(llm.model) == recurrent
        assert llama_cpp.llama_model_is_hybrid(llm.model) == hybrid
        ids = llm.tokenize(b"<|im_start|>user\nhello, tiny model<|im_end|>\n", special=True)
        assert ids[0] == 258 and len(ids) == 25  # byte level, with the ChatML specials

        memory = llama_cpp.llama_get_memory(llm.ctx)
        full = _decode(llm, ids, 0)
        assert np.isfinite(full).all() and full.std() > 0.1

        # Snapshot the state after a prefix, clear, restore, decode the rest: the same logits.
        llama_cpp.llama_memory_clear(memory, True)
        _decode(llm, ids[:10], 0)
        size = llama_cpp.llama_state_seq_get_size(llm.ctx, 0)
        state = (ctypes.c_uint8 * size)()
        assert llama_cpp.llama_state_seq_get_data(llm.ctx, state, size, 0) == size
        llama_cpp.llama_memory_clear(memory, True)
        assert llama_cpp.llama_state_seq_set_data(llm.ctx, state, size, 0) == size
        np.testing.assert_array_equal(_decode(llm, ids[10:], 10), full)

        # The state matters: without it the same tail gives other logits.
        llama_cpp.llama_memory_clear(memory, True)
        assert np.abs(_decode(llm, ids[10:], 0) - full).max() > 1e-3
    finally:
        llm.close()
