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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .. import progress
from ..errors import BadInput, ContextOverflow, ModelUnavailable


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
        until: Callable[[str], bool] | None = None,
    ) -> Generation:
        """Complete a free-form multi-turn chat (``[{"role": ..., "content": ...}, ...]``), for a
        controller or a judge. Greedy at temperature 0; otherwise sampled, with `seed` making the
        sample reproducible. The reply ends at an end token, after `max_new_tokens`, or as soon as
        `until(reply so far)` holds. `memory_tokens` is None: a chat has no memory prefix."""
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

    def greedy(
        self,
        cache: Any,
        logits: Any,
        max_new_tokens: int,
        *,
        until: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        """Tokens picked greedily after `logits`, feeding each back into `cache`; ends at an end
        token, after `max_new_tokens`, or once `until(tokens so far)` holds."""
        ...

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


def transcript(messages: list[dict[str, str]]) -> str:
    """The prompt of a model without a chat template: a plain transcript, then the reply's turn."""
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant:"


class LocalEngine:
    """What the local engines (transformers, llama.cpp) share: a prompt cut around the memory
    and tokenised in pieces, so cached and stateless reads run the same ids; the context check;
    and stateless completions run through the engine's own state operations.

    A subclass sets `id`, `context_length` and an empty `_split_cache` dict, and provides
    `render` (messages -> templated text with the generation prompt), `encode`, `decode`,
    `new_cache`, `advance`, `greedy` and `sample`; `head_ids` when the head needs more than
    `encode` (a BOS token)."""

    id: str
    context_length: int | None
    _split_cache: dict[tuple[str, str, str, str], tuple[str, str]]

    def render(self, messages: list[dict[str, str]]) -> str:
        raise NotImplementedError

    def encode(self, text: str, *, specials: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def new_cache(self) -> Any:
        raise NotImplementedError

    def advance(
        self, cache: Any, ids: Sequence[int], *, progress: Callable[[int], None] | None = None
    ) -> Any:
        raise NotImplementedError

    def greedy(
        self,
        cache: Any,
        logits: Any,
        max_new_tokens: int,
        *,
        until: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        raise NotImplementedError

    def sample(
        self,
        cache: Any,
        logits: Any,
        max_new_tokens: int,
        *,
        temperature: float,
        seed: int,
        until: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        raise NotImplementedError

    # Prompt -> ids

    def split(self, prompt: Prompt) -> tuple[str, str]:
        """The templated prompt cut around the memory and the stem (see `split_template`)."""
        key = (prompt.system, prompt.intro, prompt.stem, prompt.query)
        if key not in self._split_cache:
            if len(self._split_cache) > 256:
                self._split_cache.clear()
            self._split_cache[key] = split_template(self.render, prompt, self.id)
        return self._split_cache[key]

    def head_ids(self, head: str) -> list[int]:
        """Ids of the text a prompt starts with (the templated head, or a whole chat)."""
        return self.encode(head)

    def memory_ids(self, prompt: Prompt) -> tuple[list[int], list[list[int]]]:
        """(head ids, ids of each memory segment); segments keep special-looking text as text."""
        head, _ = self.split(prompt)
        return self.head_ids(head), [self.encode(s, specials=False) for s in prompt.memory]

    def stem_ids(self, prompt: Prompt) -> list[int]:
        return self.encode(prompt.stem)

    def tail_ids(self, prompt: Prompt) -> list[int]:
        return self.encode(self.split(prompt)[1])

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """Head, memory segments, stem and tail, each tokenised on its own and concatenated: the
        ids the cached path builds piece by piece."""
        head, segments = self.memory_ids(prompt)
        return head + [t for s in segments for t in s] + self.stem_ids(prompt) + self.tail_ids(prompt)

    def count_tokens(self, prompt: Prompt) -> int:
        return len(self.prompt_ids(prompt))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat under the model's template, with the generation prompt."""
        return self.head_ids(self.render(messages))

    # Stateless completions

    def check_fits(self, prompt_tokens: int, max_new_tokens: int, *, what: str = "the prompt") -> None:
        """Refuse, never truncate, a prompt that does not fit the context."""
        limit = self.context_length
        if limit is not None and prompt_tokens + max_new_tokens > limit:
            raise ContextOverflow(
                f"{what} needs {prompt_tokens} tokens plus {max_new_tokens} to generate "
                f"= {prompt_tokens + max_new_tokens}, but {self.id} reads at most {limit}",
                needed=prompt_tokens + max_new_tokens,
                limit=limit,
            )

    def generate(self, prompt: Prompt, *, max_new_tokens: int) -> Generation:
        """Stateless read: the whole prompt from an empty state, then greedy decoding."""
        head, segments = self.memory_ids(prompt)
        memory = head + [t for s in segments for t in s]
        ids = memory + self.stem_ids(prompt) + self.tail_ids(prompt)
        self.check_fits(len(ids), max_new_tokens)
        return self._complete(ids, max_new_tokens, memory_tokens=len(memory))

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        until: Callable[[str], bool] | None = None,
    ) -> Generation:
        """A multi-turn chat from scratch: the chat template (with the generation prompt), one
        prefill, then greedy decoding, or sampling when `temperature` > 0, until an end token,
        `max_new_tokens`, or `until(reply so far)`."""
        if temperature < 0:
            raise BadInput(f"temperature must be >= 0, found {temperature!r}")
        ids = self.chat_ids(messages)
        self.check_fits(len(ids), max_new_tokens, what="the chat")
        return self._complete(ids, max_new_tokens, temperature=temperature, seed=seed, until=until)

    def chat_session(self, *, grows: bool = True) -> Any:
        """A `ChatSession`: chats whose dialogue only grows, each run from the state the last one
        left, and from the heads this engine's chats share (see `linmem.engines.session`);
        `grows=False` for unrelated chats that share only a head (a judge's)."""
        from .session import ChatSession, Heads

        heads = getattr(self, "_chat_heads", None)
        if heads is None:
            heads = self._chat_heads = Heads()
        return ChatSession(self, grows=grows, heads=heads)

    def reply(
        self,
        state: Any,
        logits: Any,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        until: Callable[[str], bool] | None = None,
    ) -> list[int]:
        """The reply's tokens from a prompt's state and last logits: greedy or sampled, ending
        as `chat` says."""
        stop = None if until is None else (lambda out: until(self.decode(out)))
        if temperature == 0:
            return self.greedy(state, logits, max_new_tokens, until=stop)
        return self.sample(state, logits, max_new_tokens, temperature=temperature, seed=seed, until=stop)

    def _complete(
        self,
        ids: list[int],
        max_new_tokens: int,
        *,
        memory_tokens: int | None = None,
        temperature: float = 0.0,
        seed: int = 0,
        until: Callable[[str], bool] | None = None,
    ) -> Generation:
        state = self.new_cache()
        t0 = time.perf_counter()
        with progress.task("reading the prompt", len(ids), "tok") as task:
            logits = self.advance(state, ids, progress=task.step)
        t1 = time.perf_counter()
        out = self.reply(state, logits, max_new_tokens, temperature=temperature, seed=seed, until=until)
        t2 = time.perf_counter()
        return Generation(
            text=self.decode(out),
            memory_tokens=memory_tokens,
            processed=len(ids),
            cached=0,
            generated=len(out),
            prefill_s=t1 - t0,
            generate_s=t2 - t1,
        )


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
