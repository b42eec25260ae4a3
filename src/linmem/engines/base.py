"""What an LM engine is: something that answers a chat prompt whose user turn starts with memory.

Every engine receives the same `Prompt`, so the text a model sees is identical across backends.
The message layout is fixed: a system message, then one user message made of `intro`, the
rendered memory, the `stem` (the fixed instruction of a kind of read) and the `query`, in that
order. Everything before the query is the same for every read of one kind over one memory: a
byte-identical prefix, which server-side prefix caches and our state snapshots reuse, so a read
costs only its query's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Prompt:
    system: str
    intro: str
    memory: Sequence[str]
    stem: str
    query: str

    @property
    def memory_text(self) -> str:
        return "".join(self.memory)

    @property
    def user(self) -> str:
        return self.intro + self.memory_text + self.stem + self.query

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.user}]


@dataclass(frozen=True, slots=True)
class Generation:
    """One completion with its accounting. Token fields are None when the backend cannot tell."""

    text: str
    memory_tokens: int | None
    processed: int
    cached: int
    generated: int
    prefill_s: float | None = None
    query_s: float | None = None
    generate_s: float | None = None


@runtime_checkable
class Engine(Protocol):
    """A language model that completes a `Prompt`, or any chat, from scratch (no state kept
    between calls)."""

    id: str
    context_length: int | None

    def generate(self, prompt: Prompt, *, max_new_tokens: int) -> Generation: ...

    def count_tokens(self, prompt: Prompt) -> int | None:
        """Prompt length in tokens, or None when the engine cannot count locally."""
        ...

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> Generation:
        """Complete a free-form multi-turn chat (``[{"role": ..., "content": ...}, ...]``), for a
        controller or a judge. Greedy at temperature 0; otherwise sampled, with `seed` making the
        sample reproducible. `memory_tokens` is None: a chat has no memory prefix."""
        ...


def strip_think(text: str) -> str:
    """The answer without a leading ``<think>…</think>`` block (an unclosed one is all reasoning)."""
    head = text.lstrip()
    if head.startswith("<think>"):
        _, closed, rest = head.partition("</think>")
        return rest.lstrip() if closed else ""
    if "</think>" in head and "<think>" not in head:  # the chat template opened the block
        return head.partition("</think>")[2].lstrip()
    return text
