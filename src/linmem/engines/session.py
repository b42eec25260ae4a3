"""A chat that only grows, continued from kept model states: a controller's dialogue.

An M3-Agent controller is asked again after every search, and each time its prompt is the whole
dialogue so far: the system message, every reply and every search result. Run from scratch,
round k re-reads everything rounds 1 to k-1 read. A `ChatSession` keeps the model state at the
end of the part of each prompt that later prompts repeat, so a round processes only what the
round before added: the previous reply, the new search result, the generation prompt.

Which part is repeated is measured, not assumed: chat templates rewrite the end of a prompt
once the reply is in (Qwen3's drops the empty ``<think></think>`` it opened the reply with), so
the stable part of a prompt is its common token prefix with the same dialogue plus one more
exchange. A kept state is used only for a prompt whose ids start with exactly the ids it read,
so a session's prompt is the stateless prompt, token for token, and gives the same reply; only
the work differs (the tests compare whole agent traces).

Chats that do not grow one from another still share a head: every question's dialogue opens with
M3-Agent's system message, every judge call with M3-Bench's instructions. A session also keeps
the state at the longest common prefix of a prompt with the one before it (when that is at least
`SHARED_MIN` tokens), so the next question's first round, or the next verdict, starts there.
These heads are the engine's (`Heads`), shared by its sessions: an agent opens one session per
question.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import BadInput
from .base import Generation

# Stand-ins for a reply and the next user turn: only where the template starts to differ counts.
_PROBE = [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]

# The shortest head shared with the previous prompt worth a kept state: a state is a copy of the
# model's cache, and the chat template's own opening is a few tokens.
SHARED_MIN = 32


class Heads:
    """Kept states at prompt heads shared between chats, and the last prompt's ids to find the
    next one: an engine's, for all its sessions. At most `keep` states, the least recently used
    dropped first (a judge's shared instructions outlive the per-question heads between them)."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = max(1, keep)
        self.states: list[tuple[list[int], Any]] = []
        self.last: list[int] = []
        self.lock = threading.Lock()

    def shared(self, ids: list[int]) -> int:
        """The longest common prefix of `ids` with the previous prompt (which `ids` now becomes)
        or with a kept head. A head that went a token into its question ("...Question: What")
        does not begin the next question ("How"): their common part is the head worth keeping."""
        with self.lock:
            n = max(_common(ids, k) for k in (self.last, *(k for k, _ in self.states)))
            self.last = ids
            return n

    def hold(self, ids: list[int], state: Any) -> None:
        with self.lock:
            self.states.append((ids, state))
            del self.states[: -self.keep]

    def longest(self, ids: list[int], most: int) -> tuple[int, Any]:
        """(length, state) of the longest kept head that begins `ids` and is at most `most` long,
        now the most recently used; (0, None) when none is."""
        with self.lock:
            best = _longest(self.states, ids, most)
            for i, (_, state) in enumerate(self.states):
                if state is best[1]:
                    self.states.append(self.states.pop(i))
                    break
            return best


class ChatSession:
    """Chats on a local engine that reuse kept states (see the module docstring): the growing
    dialogue's, at most `keep` (each is a copy of the model's cache at that point), and the heads
    in `heads` (the session's own when None). `grows=False` (a judge's unrelated prompts) keeps
    heads only."""

    def __init__(self, engine: Any, *, keep: int = 2, grows: bool = True, heads: Heads | None = None) -> None:
        self.engine = engine
        self.keep = max(1, keep)
        self.grows = grows
        self.heads = heads if heads is not None else Heads()
        self._states: list[tuple[list[int], Any]] = []

    def chat(
        self,
        messages: list[dict[str, str]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        until: Callable[[str], bool] | None = None,
    ) -> Generation:
        """`engine.chat(messages, ...)`, from the longest kept state the prompt starts with.
        `processed` counts the tokens run now, `cached` those a kept state had read."""
        if temperature < 0:
            raise BadInput(f"temperature must be >= 0, found {temperature!r}")
        engine = self.engine
        ids = engine.chat_ids(messages)
        engine.check_fits(len(ids), max_new_tokens, what="the chat")
        # The part run after the kept state is at least the engine's smallest exact call (llama.cpp's
        # results change below 8 tokens a call; see `linmem.engines.llama.MIN_WINDOW`), and so is
        # every piece between the points a state is kept at.
        tail = max(1, getattr(engine, "min_window", 1))
        end = len(ids) - tail
        t0 = time.perf_counter()
        start, base = self._longest(ids)
        state = engine.fork(base) if base is not None else engine.new_cache()
        shared = self.heads.shared(ids)
        points: list[tuple[int, Callable[[list[int], Any], None]]] = []
        if shared >= SHARED_MIN:
            points.append((min(shared, end), self.heads.hold))
        if self.grows:
            stable = min(_common(ids, engine.chat_ids([*messages, *_PROBE])), end)
            points.append((stable, self._hold))
        run_from = start
        for point, hold in sorted(points, key=lambda p: p[0]):
            if point - run_from < tail:
                continue
            engine.advance(state, ids[run_from:point])
            hold(ids[:point], engine.fork(state))
            run_from = point
        logits = engine.advance(state, ids[run_from:])
        t1 = time.perf_counter()
        out = engine.reply(state, logits, max_new_tokens, temperature=temperature, seed=seed, until=until)
        t2 = time.perf_counter()
        return Generation(
            text=engine.decode(out),
            memory_tokens=None,
            processed=len(ids) - start,
            cached=start,
            generated=len(out),
            prefill_s=t1 - t0,
            generate_s=t2 - t1,
        )

    def _longest(self, ids: list[int]) -> tuple[int, Any]:
        """(length, state) of the longest kept state whose ids begin `ids`, leaving at least the
        engine's smallest exact call to run (the logits come from it); (0, None) when none does."""
        most = len(ids) - max(1, getattr(self.engine, "min_window", 1))
        own = _longest(self._states, ids, most)
        head = self.heads.longest(ids, most)
        return head if head[0] > own[0] else own

    def _hold(self, ids: list[int], state: Any) -> None:
        self._states.append((ids, state))
        del self._states[: -self.keep]


def _longest(kept: list[tuple[list[int], Any]], ids: list[int], most: int) -> tuple[int, Any]:
    """(length, state) of the longest of `kept` whose ids begin `ids`, at most `most` long."""
    best: tuple[int, Any] = (0, None)
    for prefix, state in kept:
        n = len(prefix)
        if best[0] < n <= most and ids[:n] == prefix:
            best = (n, state)
    return best


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


__all__ = ["ChatSession", "Heads"]
