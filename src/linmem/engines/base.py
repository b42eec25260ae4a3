"""What an LM engine is: something that answers a chat prompt whose user turn starts with memory.

Every engine receives the same `Prompt`, so the text a model sees is identical across backends.
The message layout is fixed: a system message, then one user message made of `intro`, the
rendered memory, the `stem` (the fixed instruction of a kind of read) and the `query`, in that
order. Everything before the query is the same for every read of one kind over one memory: a
byte-identical prefix, which server-side prefix caches and our state snapshots reuse, so a read
costs only its query's tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..errors import ModelUnavailable


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


@runtime_checkable
class StatefulEngine(Engine, Protocol):
    """A local model whose state after a prompt prefix can be kept, forked, extended and saved:
    what the LM reader's snapshot path and `linmem.state` need. An engine without these (an HTTP
    endpoint) is read through the byte-identical prompt prefix instead.

    A *state* is opaque to callers; `advance` updates it in place, so reads work on a `fork`.
    Logits are opaque too: whatever `advance` returns, `greedy` accepts."""

    fingerprint: str  # model file(s), config and tokenizer: a snapshot is only for this model
    config_hash: str
    versions: dict[str, str]  # libraries whose numerics a snapshot depends on

    def split(self, prompt: Prompt) -> tuple[str, str]:
        """The templated prompt around the memory: (head through the intro, tail from the query
        to the generation prompt)."""
        ...

    def encode(self, text: str, *, specials: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def memory_ids(self, prompt: Prompt) -> tuple[list[int], list[list[int]]]: ...

    def stem_ids(self, prompt: Prompt) -> list[int]: ...

    def tail_ids(self, prompt: Prompt) -> list[int]: ...

    def new_cache(self) -> Any: ...

    def fork(self, cache: Any) -> Any: ...

    def advance(
        self, cache: Any, ids: Sequence[int], *, progress: Callable[[int], None] | None = None
    ) -> Any: ...

    def greedy(self, cache: Any, logits: Any, max_new_tokens: int) -> list[int]: ...

    def state_bytes(self, cache: Any) -> int:
        """Bytes the state holds in RAM."""
        ...

    def cache_to_tensors(self, cache: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, JSON layout) to save. Layout key "growing" names the tensors that grow by one
        row per token along dim -2 (attention keys and values), which a save may write in chunks."""
        ...

    def cache_from_tensors(self, tensors: dict[str, Any], meta: dict[str, Any], tokens: int) -> Any:
        """The state saved as (tensors, meta) after `tokens` tokens; ValueError unless it is exactly
        what this model's own state would hold (dtypes, shapes, layout)."""
        ...


@runtime_checkable
class BatchedEngine(StatefulEngine, Protocol):
    """A stateful engine that can also continue one state by several prompts in one batch."""

    def can_batch(self) -> bool: ...

    def batch_size(self, cache: Any, new_tokens: int) -> int: ...

    def advance_rows(self, cache: Any, tails: Sequence[Sequence[int]]) -> Any: ...

    def greedy_rows(self, rows: Any, max_new_tokens: int) -> list[list[int]]: ...


# Markers put where the memory and the query go, to cut a chat template's output around them.
_MEMORY = "\ue000linmem-memory\ue000"
_QUERY = "\ue000linmem-query\ue000"


def split_template(
    render: Callable[[list[dict[str, str]]], str], prompt: Prompt, model: str
) -> tuple[str, str]:
    """(head, tail) of `prompt` under a chat template `render` (messages -> text with the
    generation prompt): the head runs through the intro, the tail from the query on. Refuses a
    template that does not keep the user message intact, since the snapshot relies on it."""
    messages = [
        {"role": "system", "content": prompt.system},
        {"role": "user", "content": prompt.intro + _MEMORY + prompt.stem + _QUERY + prompt.query},
    ]
    text = render(messages)
    if text.count(_MEMORY) != 1 or text.count(_QUERY) != 1:
        raise ModelUnavailable(f"{model}: its chat template does not keep the user message intact")
    head, rest = text.split(_MEMORY)
    stem, tail = rest.split(_QUERY)
    if stem != prompt.stem:
        raise ModelUnavailable(f"{model}: its chat template rewrites the user message")
    return head, tail


def threads() -> int:
    """CPU threads a local engine computes with: `$LINMEM_THREADS`, else half the cores. On a busy
    shared machine, using every core makes each thread wait for the slowest (measured on 2 cores
    under load: llama.cpp decoded 25 tok/s with 1 thread, 1.1 with 2)."""
    want = os.environ.get("LINMEM_THREADS", "").strip()
    if want:
        try:
            n = int(want)
        except ValueError:
            n = 0
        if n < 1:
            raise ModelUnavailable(f"LINMEM_THREADS must be a whole number >= 1, found {want!r}")
        return n
    return max(1, (os.cpu_count() or 2) // 2)


def strip_think(text: str) -> str:
    """The answer without a leading ``<think>…</think>`` block (an unclosed one is all reasoning)."""
    head = text.lstrip()
    if head.startswith("<think>"):
        _, closed, rest = head.partition("</think>")
        return rest.lstrip() if closed else ""
    if "</think>" in head and "<think>" not in head:  # the chat template opened the block
        return head.partition("</think>")[2].lstrip()
    return text
