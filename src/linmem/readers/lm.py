"""The seed's reader: a language model reads the whole memory plus the query and answers.

With a local model the memory prefix lives in a state snapshot (see `linmem.state`): a read forks
it and runs only the query, a write extends it by the new items only. `stateless=True` re-reads
everything on every call (the reference the snapshot path is tested against). With an
OpenAI-compatible endpoint the memory is a byte-identical prompt prefix, so the server's prefix
cache plays the snapshot's part.

A memory longer than the model's context is never truncated: by default the read stops with
ContextOverflow; with `overflow="window"` the memory is read in consecutive windows that each
answer the question, and a last call combines their answers.

`read_many` and `rank_many` answer several questions from one snapshot in one batch (see
`BatchedEngine.advance_rows`), with the answers `read` and `rank` give one by one.

The reader picks its path by what the engine can do: a `StatefulEngine` (transformers, llama.cpp)
is read from snapshots, a `BatchedEngine` also in batches, any other `Engine` by prompt prefix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import progress, prompts, render
from ..engines import load_engine
from ..engines.base import BatchedEngine, Generation, Prompt, StatefulEngine
from ..errors import ContextOverflow, EmptyMemory, EngineError, LinmemError
from ..state import SnapshotStore, Update
from ..types import Answer, Item, Timings, Tokens

OVERFLOW_MODES = ("error", "window")


class LMReader:
    """Answers over a memory with a language model (`model` is an engine spec, see linmem.engines)."""

    def __init__(
        self,
        memory: Any,
        *,
        model: str | None = None,
        stateless: bool = False,
        max_new_tokens: int = 256,
        context_length: int | None = None,
        overflow: str = "error",
        persist: bool = True,
    ) -> None:
        if overflow not in OVERFLOW_MODES:
            raise LinmemError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}, found {overflow!r}")
        self.memory = memory
        self.engine = load_engine(model)
        self.stateless = stateless or not isinstance(self.engine, StatefulEngine)
        self.max_new_tokens = max_new_tokens
        self.overflow = overflow
        self._cap = context_length
        self._store: SnapshotStore | None = None
        if isinstance(self.engine, StatefulEngine):
            head, _ = self.engine.split(prompts.read_prompt([], ""))
            # Shared by every reader of this memory and model in the process, with its stems.
            self._store = SnapshotStore.shared(self.engine, memory.cache_dir / "state", head, persist=persist)

    @property
    def context_length(self) -> int | None:
        """The model's context, or the caller's cap below it (to bound RAM); never above it.
        Looked up on each read: an HTTP engine may learn its server's limit late."""
        limit = self.engine.context_length
        cap = self._cap
        return min(cap, limit) if cap and limit else cap or limit

    @property
    def model_id(self) -> str:
        return str(self.engine.id)

    def on_write(self, items: Sequence[Item]) -> None:
        """Extend the snapshot now (and the instructions read after it), so the next read pays
        only for its question."""
        if self._store is not None and not self.stateless:
            self._store.refresh(self.memory.log, self._memory_budget(0))

    def prepare(self) -> Update | None:
        """Bring the snapshot up to date now and say what that cost (None when this reader keeps
        no snapshot, or the memory does not fit): the once-per-memory part of the reads' cost,
        which an evaluation reports apart from the per-question part."""
        if self._store is None or self.stateless or self.memory.log.state().count == 0:
            return None
        try:
            _, update = self._store.get(self.memory.log, self._memory_budget(0))
        except ContextOverflow:
            return None  # the reads report it, each as its own outcome
        return update

    @property
    def store(self) -> SnapshotStore | None:
        """The snapshot store this reader reads from (None for engines without local state)."""
        return self._store

    def read(self, query: str) -> Answer:
        t0 = time.perf_counter()
        gen, notes = self._complete(_Ask("read", query, 0), self.max_new_tokens)
        valid = self.memory.log.clips()
        clips = tuple(c for c in render.parse_clips(gen.text) if c in valid)
        return self._answer(gen, clips, t0, notes)

    def rank(self, query: str, k: int = 5) -> Answer:
        t0 = time.perf_counter()
        gen, notes = self._complete(_Ask("rank", query, k), 8 * k + 16)
        clips = tuple(render.parse_ranking(gen.text, self.memory.log.clips())[:k])
        return self._answer(gen, clips, t0, notes)

    def rank_among(self, query: str, items: Sequence[Item], k: int) -> tuple[list[int], Generation]:
        """The clips of `items` (a few candidates, not the memory) ranked for `query`, best first,
        at most `k`, and the generation that ranked them. Read without a snapshot: the candidates
        differ for every query."""
        prompt = prompts.rank_prompt(render.segments(items), query, k)
        max_new = 8 * k + 16
        self._check_fits(prompt, max_new)
        gen = self.engine.generate(prompt, max_new_tokens=max_new)
        return render.parse_ranking(gen.text, [i.clip for i in items if i.clip is not None])[:k], gen

    def read_many(self, queries: Sequence[str]) -> list[Answer]:
        """`[self.read(q) for q in queries]`, read in batches from one snapshot (see
        `_complete_many` for how work and time are shared out)."""
        done = self._complete_many([_Ask("read", q, 0) for q in queries], self.max_new_tokens)
        valid = self.memory.log.clips()
        return [
            self._answer(gen, tuple(c for c in render.parse_clips(gen.text) if c in valid), 0.0, notes, total)
            for gen, notes, total in done
        ]

    def rank_many(self, queries: Sequence[str], k: int = 5) -> list[Answer]:
        """`[self.rank(q, k) for q in queries]`, read in batches from one snapshot."""
        done = self._complete_many([_Ask("rank", q, k) for q in queries], 8 * k + 16)
        clips = self.memory.log.clips()
        return [
            self._answer(gen, tuple(render.parse_ranking(gen.text, clips)[:k]), 0.0, notes, total)
            for gen, notes, total in done
        ]

    def _answer(
        self,
        gen: Generation,
        clips: tuple[int, ...],
        t0: float,
        notes: list[str],
        total_s: float | None = None,
    ) -> Answer:
        if getattr(self.engine, "label", ""):
            notes = [f"{self.engine.id} has {self.engine.label}: its answers are noise", *notes]
        total = time.perf_counter() - t0 if total_s is None else total_s
        return Answer(
            text=gen.text.strip(),
            clips=clips,
            model=self.model_id,
            tokens=Tokens(gen.memory_tokens, gen.processed, gen.cached, gen.generated),
            timings=Timings(total, gen.prefill_s, gen.query_s, gen.generate_s),
            notes=tuple(notes),
        )

    def _complete_many(self, asks: Sequence[_Ask], max_new: int) -> list[tuple[Generation, list[str], float]]:
        """Each ask's generation, notes and seconds: batched from the snapshot when the engine can,
        else (stateless, HTTP, a model whose cache cannot be batched, a memory or question that
        does not fit) one by one, exactly as `read` and `rank` do it, errors included."""
        if not asks:
            return []
        if self.memory.log.state().count == 0:
            raise EmptyMemory.named(self.memory.name)
        if not self.stateless and isinstance(self.engine, BatchedEngine) and self.engine.can_batch():
            try:
                batched = self._many_from_snapshot(asks, max_new)
            except ContextOverflow:
                batched = None  # raised before any work was done
            if batched is not None:
                return batched
        # One by one, so that the read that does not fit fails (or is windowed) as it would alone.
        done = []
        for ask in asks:
            t0 = time.perf_counter()
            gen, notes = self._complete(ask, max_new)
            done.append((gen, notes, time.perf_counter() - t0))
        return done

    def _many_from_snapshot(
        self, asks: Sequence[_Ask], max_new: int
    ) -> list[tuple[Generation, list[str], float]] | None:
        """Batched `_from_snapshot` for asks of one kind (one stem); None when a question alone
        does not fit the context.

        Accounting per answer, as one-by-one reads would report it: bringing the snapshot and the
        stem up to date (tokens and `prefill_s`) is counted once, on the first ask; each answer
        processes its own query tokens. A batch's prompt seconds are shared out in proportion to
        the query tokens, its decoding seconds to the decoding steps each row took part in
        (tokens generated, plus the step that picked its end), and what is left of the call's
        wall time equally, so the answers' `total_s` add up to the call's."""
        engine, store = self.engine, self._store
        assert isinstance(engine, BatchedEngine) and store is not None
        t0 = time.perf_counter()
        prompts_ = [ask.prompt([]) for ask in asks]
        stem = engine.stem_ids(prompts_[0])
        tails = [engine.tail_ids(p) for p in prompts_]
        budget = self._memory_budget(len(stem) + max(len(t) for t in tails), max_new)
        if budget is not None and budget < len(engine.encode(store.head)):
            return None
        snap, update = store.get(self.memory.log, budget)
        t1 = time.perf_counter()
        base, stem_new = self._after_stem(snap, prompts_[0].stem, stem)
        t2 = time.perf_counter()
        outs, query_s, generate_s = self._batches(base, tails, max_new)
        prefill = update.seconds + (t2 - t1)
        rest = (time.perf_counter() - t0 - prefill - sum(query_s) - sum(generate_s)) / len(asks)
        done = []
        for i, out in enumerate(outs):
            first = i == 0
            gen = Generation(
                text=engine.decode(out),
                memory_tokens=snap.tokens,
                processed=(update.tokens + stem_new if first else 0) + len(tails[i]),
                cached=snap.tokens + len(stem) - (update.tokens + stem_new if first else 0),
                generated=len(out),
                prefill_s=prefill if first else 0.0,
                query_s=query_s[i],
                generate_s=generate_s[i],
            )
            reason = update.reason if first else "up to date"
            total = (prefill if first else 0.0) + query_s[i] + generate_s[i] + rest
            done.append((gen, [f"snapshot: {reason}"], total))
        return done

    def _complete(self, ask: _Ask, max_new: int) -> tuple[Generation, list[str]]:
        if self.memory.log.state().count == 0:
            raise EmptyMemory.named(self.memory.name)
        try:
            if not self.stateless:
                # The snapshot holds the memory; only the query part of the prompt is needed.
                return self._from_snapshot(ask.prompt([]), max_new)
            prompt = ask.prompt(render.segments(self.memory.log.items()))
            self._check_fits(prompt, max_new)
            return self.engine.generate(prompt, max_new_tokens=max_new), []
        except ContextOverflow:
            if self.overflow != "window":
                raise
            items = self.memory.log.items()
            return self._windowed(ask, ask.prompt(render.segments(items)), max_new, items)

    def _memory_budget(self, tail_tokens: int, max_new: int | None = None) -> int | None:
        if self.context_length is None:
            return None
        return self.context_length - tail_tokens - (self.max_new_tokens if max_new is None else max_new)

    def _check_fits(self, prompt: Prompt, max_new: int) -> None:
        if self.context_length is None:
            return
        n = self.engine.count_tokens(prompt)
        if n is not None and n + max_new > self.context_length:
            raise ContextOverflow(
                f"the prompt is {n} tokens plus {max_new} to generate, but {self.model_id} reads at most "
                f"{self.context_length}; read in windows (overflow='window') or use a longer-context model",
                needed=n + max_new,
                limit=self.context_length,
            )

    def _from_snapshot(self, prompt: Prompt, max_new: int) -> tuple[Generation, list[str]]:
        engine, store = self.engine, self._store
        assert isinstance(engine, StatefulEngine) and store is not None
        stem, tail = engine.stem_ids(prompt), engine.tail_ids(prompt)
        budget = self._memory_budget(len(stem) + len(tail), max_new)
        if budget is not None and budget < len(engine.encode(store.head)):
            raise ContextOverflow(
                f"the question alone is {len(tail)} tokens; with the prompt and {max_new} tokens to "
                f"generate it does not fit {self.model_id}'s context of {self.context_length} tokens",
                needed=len(stem) + len(tail) + max_new,
                limit=self.context_length or 0,
            )
        snap, update = store.get(self.memory.log, budget)
        t1 = time.perf_counter()
        base, stem_new = self._after_stem(snap, prompt.stem, stem)
        t2 = time.perf_counter()
        cache = engine.fork(base)
        with progress.task("reading the question", len(tail), "tok") as task:
            logits = engine.advance(cache, tail, progress=task.step)
        t3 = time.perf_counter()
        out = engine.greedy(cache, logits, max_new)
        t4 = time.perf_counter()
        gen = Generation(
            text=engine.decode(out),
            memory_tokens=snap.tokens,
            processed=update.tokens + stem_new + len(tail),
            cached=snap.tokens - update.tokens + len(stem) - stem_new,
            generated=len(out),
            prefill_s=update.seconds + (t2 - t1),
            query_s=t3 - t2,
            generate_s=t4 - t3,
        )
        return gen, [f"snapshot: {update.reason}"]

    def _batches(
        self, base: Any, tails: list[list[int]], max_new: int
    ) -> tuple[list[list[int]], list[float], list[float]]:
        """Each tail's tokens generated on top of `base`, and its shares of the prompt and decoding
        seconds, in batches as large as the engine's byte budget allows."""
        engine = self.engine
        assert isinstance(engine, BatchedEngine)
        # Similar lengths batch together: fewer prompt phases and less padding.
        order = sorted(range(len(tails)), key=lambda i: len(tails[i]))
        size = engine.batch_size(base, max(len(t) for t in tails) + max_new)
        outs: list[list[int]] = [[] for _ in tails]
        query_s, generate_s = [0.0] * len(tails), [0.0] * len(tails)
        for lo in range(0, len(order), size):
            group = order[lo : lo + size]
            t0 = time.perf_counter()
            rows = engine.advance_rows(base, [tails[i] for i in group])
            t1 = time.perf_counter()
            generated = engine.greedy_rows(rows, max_new)
            t2 = time.perf_counter()
            q_share = _shares([len(tails[i]) for i in group], t1 - t0)
            g_share = _shares([len(g) + 1 for g in generated], t2 - t1)
            for j, i in enumerate(group):
                outs[i], query_s[i], generate_s[i] = generated[j], q_share[j], g_share[j]
        return outs, query_s, generate_s

    def _after_stem(self, snap: Any, stem_text: str, stem: list[int]) -> tuple[Any, int]:
        assert self._store is not None
        return self._store.stem(snap, stem_text, stem)

    def _windowed(
        self, ask: _Ask, prompt: Prompt, max_new: int, items: list[Item]
    ) -> tuple[Generation, list[str]]:
        """Read the memory in consecutive windows that fit, then combine the windows' answers."""
        windows, memory_tokens = self._pack_windows(prompt, max_new)
        answers: list[tuple[str, str]] = []
        total = Generation("", 0, 0, 0, 0, 0.0, None, 0.0)
        for lo, hi in windows:
            part = replace(prompt, memory=prompt.memory[lo:hi])
            gen = self.engine.generate(part, max_new_tokens=max_new)
            answers.append((_clip_label(items[lo:hi]), gen.text))
            total = _add(total, gen)
        if ask.kind == "rank":
            # A ranking merges the windows' lists round-robin: each window's best first.
            lists = [
                render.parse_ranking(a, [i.clip for i in items if i.clip is not None]) for _, a in answers
            ]
            merged = [c for row in _round_robin(lists) for c in row]
            text = ", ".join(f"CLIP {c}" for c in dict.fromkeys(merged))
            final = Generation(text, None, 0, 0, 0)
        else:
            final = self.engine.generate(prompts.combine_prompt(answers, ask.query), max_new_tokens=max_new)
        # The windows repeat the prompt's head and the combining step reads their answers: summed,
        # those would overstate the memory. It is the memory's own tokens, counted once.
        return replace(_add(total, final), memory_tokens=memory_tokens), [f"read in {len(windows)} windows"]

    def _pack_windows(self, prompt: Prompt, max_new: int) -> tuple[list[tuple[int, int]], int]:
        """Consecutive item ranges that each fit the context with the prompt's fixed part and the
        tokens to generate, and the memory's tokens (as a whole read would count them)."""
        if self.context_length is None:
            raise EngineError(
                f"{self.model_id}: windowed reading needs a known context length (context_length=)"
            )
        counts, fixed, memory = self._segment_tokens(prompt)
        budget = self.context_length - fixed - max_new
        if budget <= 0:
            raise ContextOverflow(
                f"a window holds no memory: the prompt without memory is {fixed} tokens plus {max_new} "
                f"to generate, and {self.model_id}'s context is {self.context_length} tokens; raise "
                f"--context-length to at least {fixed + max_new + max(counts, default=1)}",
                needed=fixed + max_new + max(counts, default=1),
                limit=self.context_length,
            )
        windows, lo, used = [], 0, 0
        for i, n in enumerate(counts):
            if n > budget:
                raise ContextOverflow(
                    f"memory item {i + 1} alone is {n} tokens, more than the {budget} a window can hold",
                    needed=n,
                    limit=budget,
                )
            if used + n > budget:
                windows.append((lo, i))
                lo, used = i, 0
            used += n
        windows.append((lo, len(counts)))
        return windows, memory

    def _segment_tokens(self, prompt: Prompt) -> tuple[list[int], int, int]:
        """Tokens per memory segment, tokens of the rest of the prompt, and the memory's tokens as a
        whole read counts them (with its head, for an engine that snapshots it)."""
        if isinstance(self.engine, StatefulEngine):
            head, segs = self.engine.memory_ids(prompt)
            fixed = len(head) + len(self.engine.stem_ids(prompt)) + len(self.engine.tail_ids(prompt))
            return [len(s) for s in segs], fixed, len(head) + sum(len(s) for s in segs)
        empty = replace(prompt, memory=[])
        whole, fixed = self.engine.count_tokens(prompt), self.engine.count_tokens(empty)
        if whole is None or fixed is None:
            raise EngineError(
                f"{self.model_id}: windowed reading needs token counts, and the server has no /tokenize"
            )
        # The server counts the whole prompt only; share its memory tokens out by characters,
        # with a 10% margin for segments that tokenise denser than average.
        per_char = (whole - fixed) / max(1, len(prompt.memory_text))
        return [math.ceil(len(s) * per_char * 1.1) + 1 for s in prompt.memory], fixed, whole - fixed


@dataclass(frozen=True)
class _Ask:
    kind: str
    query: str
    k: int

    def prompt(self, segments: Sequence[str]) -> Prompt:
        if self.kind == "rank":
            return prompts.rank_prompt(segments, self.query, self.k)
        return prompts.read_prompt(segments, self.query)


def _clip_label(items: Sequence[Item]) -> str:
    clips = [i.clip for i in items if i.clip is not None]
    return f"clips {min(clips)}-{max(clips)}" if clips else f"{len(items)} items"


def _shares(weights: Sequence[int], seconds: float) -> list[float]:
    total = sum(weights)
    if total <= 0:
        return [seconds / len(weights)] * len(weights)
    return [seconds * w / total for w in weights]


def _round_robin(lists: list[list[int]]) -> list[list[int]]:
    depth = max((len(x) for x in lists), default=0)
    return [[x[d] for x in lists if d < len(x)] for d in range(depth)]


def _add(a: Generation, b: Generation) -> Generation:
    def plus(x: Any, y: Any) -> Any:
        return None if x is None and y is None else (x or 0) + (y or 0)

    return Generation(
        b.text,
        plus(a.memory_tokens, b.memory_tokens),
        a.processed + b.processed,
        a.cached + b.cached,
        a.generated + b.generated,
        plus(a.prefill_s, b.prefill_s),
        plus(a.query_s, b.query_s),
        plus(a.generate_s, b.generate_s),
    )
