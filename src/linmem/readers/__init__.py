"""Readers answer questions over a memory: the LM reader (the seed's method), the embedding
baseline (M3-Agent's), and the hybrid lexical + dense search agents use by default."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UnknownSpec
from .base import Reader

if TYPE_CHECKING:
    from ..memory import Memory

BACKENDS = ("lm", "embedding", "hybrid")


def make_reader(memory: Memory, backend: str, **options: Any) -> Reader:
    """Build the reader for `backend` over `memory`; options go to the reader's constructor."""
    if backend == "lm":
        from .lm import LMReader

        return LMReader(memory, **options)
    if backend == "embedding":
        from .embedding import EmbeddingReader

        return EmbeddingReader(memory, **options)
    if backend == "hybrid":
        from .hybrid import HybridReader

        return HybridReader(memory, **options)
    raise UnknownSpec(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Reader", "make_reader"]
