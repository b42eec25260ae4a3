"""linmem: long-term memory for LLM agents, read by a linear-attention language model.

A memory is a durable, append-only log of items (clip captions, dialogue turns, notes). A reader
answers questions over it: the LM reader (a language model that reads the whole memory, with the
memory's model state kept as an exact snapshot) or the embedding baseline (exact cosine search).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (
    BadInput,
    BadName,
    ContextOverflow,
    EmptyMemory,
    EngineError,
    LinmemError,
    ModelUnavailable,
    NoSuchMemory,
    UnknownSpec,
)
from .itemfile import read_items
from .memory import Memory, default_home, delete_memory, memories, open_memory
from .render import parse_clips
from .types import Answer, Hit, Item, Timings, Tokens

open = open_memory  # noqa: A001 - `linmem.open(name)` reads like `gzip.open`

__all__ = [
    "Answer",
    "BadInput",
    "BadName",
    "ContextOverflow",
    "EmptyMemory",
    "EngineError",
    "Hit",
    "Item",
    "LinmemError",
    "Memory",
    "ModelUnavailable",
    "NoSuchMemory",
    "Timings",
    "Tokens",
    "UnknownSpec",
    "default_home",
    "delete_memory",
    "memories",
    "open",
    "open_memory",
    "parse_clips",
    "read_items",
]
