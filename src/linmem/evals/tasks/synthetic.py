"""Tasks built from a base task's memories: clip retrieval, needle in a haystack, summarisation.

These are the seed paper's ablations made from data that can be had offline. Each example reads
its own memory (its `source` is the example id), assembled from clips of the base task (LoCoMo
conversations or M3-Bench videos, built from ``**base_options``). Everything is deterministic for
a seed: the same options give the same examples, ids and memories. Keyword-scored examples take
their keywords from the gold answer with `linmem.evals.metrics.keywords_of` (QAs whose answer has
none, such as "No", are not used).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

from ...errors import BadInput
from ...render import render
from ...types import Item
from ..metrics import keywords_of
from .base import Example, Task

DEFAULT_CONTEXTS = (10, 20, 30, 50, 80, 100)
DEFAULT_BUDGETS = (8_000, 32_000, 96_000)
DISTRACTORS = ("other", "same", "mixed")
FACTUAL_CATEGORIES = (1, 2, 4)  # LoCoMo multi-hop, temporal, single-hop: facts stated in the dialogue
MAX_ANSWER_WORDS = 5  # "short answers": keyword matching is only meaningful for them

Clip = tuple[str, int]  # (base source, clip id)


@dataclass(frozen=True, slots=True)
class _Query:
    source: str
    clips: tuple[int, ...]  # the clips the answer lies in
    question: str
    answer: str | None
    base_id: str | None = None
    types: tuple[str, ...] = ()


class _Assembled(Task):
    """A task whose every example reads clips of a base task laid out in its own order."""

    def __init__(self, base: str, base_options: dict[str, Any]) -> None:
        super().__init__()
        from . import BASE_TASKS, load_task

        if base not in BASE_TASKS:
            raise BadInput(f"task {self.name!r}: unknown base {base!r}: expected {', '.join(BASE_TASKS)}")
        self.base = load_task(base, **base_options)
        self._clips: dict[str, dict[int, list[Item]]] = {}
        self._layouts: dict[str, tuple[tuple[Clip, ...], bool]] = {}

    def clips(self, source: str) -> dict[int, list[Item]]:
        """Clip id -> items of one base source, clips in memory order."""
        if source not in self._clips:
            grouped: dict[int, list[Item]] = {}
            for item in self.base.items(source):
                if item.clip is not None:
                    grouped.setdefault(item.clip, []).append(item)
            self._clips[source] = grouped
        return self._clips[source]

    def base_sources(self) -> list[str]:
        return list(dict.fromkeys(e.source for e in self.base))

    def _add(self, example: Example, layout: Sequence[Clip], renumber: bool = False) -> None:
        self._layouts[example.source] = (tuple(layout), renumber)
        self._examples.append(example)

    def items(self, source: str) -> list[Item]:
        if source not in self._layouts:
            raise BadInput(f"unknown {self.name} memory {source!r}")
        layout, renumber = self._layouts[source]
        return [
            replace(item, clip=new_id) if renumber else item
            for new_id, (base_source, clip) in enumerate(layout)
            for item in self.clips(base_source)[clip]
        ]

    def _factual(self) -> list[_Query]:
        """Short-answer QAs with known evidence clips: LoCoMo categories 1, 2 and 4 with evidence;
        M3-Bench questions, whose evidence is the video up to the question (no clip-level gold)."""
        queries = []
        for e in self.base:
            if e.answer is None or len(e.answer.split()) > MAX_ANSWER_WORDS or not keywords_of(e.answer):
                continue
            if self.base.name == "locomo":
                if e.meta.get("category") not in FACTUAL_CATEGORIES or not e.gold_clips:
                    continue
                clips = e.gold_clips
            else:
                clips = tuple(c for c in self.clips(e.source) if e.upto is None or c <= e.upto)
            if clips:
                queries.append(_Query(e.source, clips, e.question, e.answer, e.id, e.types))
        return queries


class ClipRetrievalTask(_Assembled):
    """Find the clip a query comes from among N: kind "retrieval", one example per target and N.

    ``distractors="other"``: the target clip plus N-1 clips of other sources, shuffled and
    renumbered 0..N-1 in memory order. ``distractors="same"``: N consecutive clips of the
    target's own source around it, original ids kept (so a near miss is |rank - target| <= 1);
    sources with fewer than N clips give no example for that N. ``distractors="mixed"``: the
    target's own source's other clips first (shuffled), then clips of other sources to fill N,
    shuffled and renumbered: on LoCoMo the distractors are then the same two speakers' other
    sessions, so the speakers' names do not give the target away.

    Queries: on LoCoMo, a question whose evidence lies in a single session (adversarial
    category 5 excluded); that session is the target. On M3-Bench, which has no clip-level
    gold, one caption line of the target clip (an episodic one for graph memories), chosen with
    the seed: the only ground truth available offline, and a lexical one.
    """

    name = "clip_retrieval"

    def __init__(
        self,
        base: str,
        *,
        contexts: Sequence[int] = DEFAULT_CONTEXTS,
        per_context: int | None = None,
        distractors: str = "other",
        seed: int = 0,
        **base_options: Any,
    ) -> None:
        if distractors not in DISTRACTORS:
            raise BadInput(f"unknown distractors {distractors!r}: expected one of {', '.join(DISTRACTORS)}")
        contexts = _positive_ints("contexts", contexts)
        if per_context is not None and (not isinstance(per_context, int) or per_context < 1):
            raise BadInput(f"per_context must be a positive integer, found {per_context!r}")
        super().__init__(base, base_options)
        self.seed = seed
        # Every clip of every source, each source's clips contiguous, and where each source's run lies.
        self._pool = [(s, c) for s in self.base_sources() for c in self.clips(s)]
        self._spans: dict[str, tuple[int, int]] = {}
        for i, (s, _) in enumerate(self._pool):
            self._spans[s] = (self._spans.get(s, (i, i))[0], i + 1)
        targets = self._targets()
        for n in contexts:
            rng = random.Random(f"{seed}:{n}")
            fits = [t for t in targets if self._fits(t, n, distractors)]
            if per_context is not None and per_context < len(fits):
                fits = [fits[i] for i in sorted(rng.sample(range(len(fits)), per_context))]
            for index, target in enumerate(fits):
                self._add_example(n, index, target, distractors, rng)
        if not self._examples:
            raise BadInput(
                f"clip_retrieval on {base!r}: no target fits contexts {list(contexts)} ({distractors})"
            )

    def _targets(self) -> list[_Query]:
        if self.base.name == "locomo":
            return [
                _Query(e.source, e.gold_clips, e.question, e.answer, e.id, e.types)
                for e in self.base
                if len(e.gold_clips) == 1 and e.meta.get("category") != 5
            ]
        rng = random.Random(f"{self.seed}:queries")
        targets = []
        for source in self.base_sources():
            for clip, items in self.clips(source).items():
                episodic = [i for i in items if i.meta.get("kind") != "semantic"] or items
                targets.append(_Query(source, (clip,), rng.choice(episodic).text, None))
        return targets

    def _fits(self, target: _Query, n: int, distractors: str) -> bool:
        own = len(self.clips(target.source))
        if distractors == "same":
            return own >= n
        if distractors == "mixed":
            return len(self._pool) >= n
        return len(self._pool) - own >= n - 1

    def _add_example(self, n: int, index: int, target: _Query, distractors: str, rng: random.Random) -> None:
        clip = target.clips[0]
        if distractors == "same":
            ids = list(self.clips(target.source))
            pos = ids.index(clip)
            start = max(0, min(pos - rng.randrange(n), len(ids) - n))
            layout = [(target.source, c) for c in ids[start : start + n]]
            gold = clip
        elif distractors == "mixed":
            first, end = self._spans[target.source]
            own = [i for i in range(first, end) if self._pool[i] != (target.source, clip)]
            rng.shuffle(own)
            rest = [i for i in range(len(self._pool)) if not first <= i < end]
            picks = own[: n - 1] + rng.sample(rest, max(0, n - 1 - len(own)))
            layout = [self._pool[i] for i in picks] + [(target.source, clip)]
            rng.shuffle(layout)
            gold = layout.index((target.source, clip))
        else:
            pool = self._pool
            first, end = self._spans[target.source]
            # Indices of the pool with the target's own (contiguous) source cut out.
            picks = rng.sample(range(len(pool) - (end - first)), n - 1)
            layout = [pool[i if i < first else i + end - first] for i in picks] + [(target.source, clip)]
            rng.shuffle(layout)
            gold = layout.index((target.source, clip))
        ident = f"clipret-N{n}-{index:05d}"
        meta: dict[str, Any] = {"context": n, "distractors": distractors, "target": [target.source, clip]}
        if target.base_id is not None:
            meta["base_id"] = target.base_id
        example = Example(
            id=ident,
            kind="retrieval",
            question=target.question,
            source=ident,
            answer=target.answer,
            gold_clips=(gold,),
            types=(f"N={n}",),
            meta=meta,
        )
        self._add(example, layout, renumber=distractors != "same")


class NIAHTask(_Assembled):
    """Needle in a haystack: a QA's evidence clips hidden among other sources' clips.

    For each token budget B (estimated as rendered characters / `chars_per_token`), `per_budget`
    short-answer QAs (LoCoMo categories 1, 2, 4; on M3-Bench the question's video up to its
    ask time is the needle) each get a memory of whole clips of other sources, in a seeded order,
    filled up to B (laid out again in a new order when they run out: `meta["passes"]` says how
    many times), with the needle's clips inserted as one block at `depth` (0 = start, 1 = end;
    a number, a list cycled over the examples, or None for a seeded random depth). A needle must
    be at most half the budget. kind "niah", scored by the answer's `keywords`.
    """

    name = "niah"

    def __init__(
        self,
        base: str = "locomo",
        *,
        budgets: Sequence[int] = DEFAULT_BUDGETS,
        per_budget: int = 5,
        depth: float | Sequence[float] | None = None,
        seed: int = 0,
        chars_per_token: float = 4.0,
        **base_options: Any,
    ) -> None:
        budgets = _positive_ints("budgets", budgets)
        if not isinstance(per_budget, int) or per_budget < 1:
            raise BadInput(f"per_budget must be a positive integer, found {per_budget!r}")
        depths = _depths(depth)
        if not isinstance(chars_per_token, int | float) or chars_per_token <= 0:
            raise BadInput(f"chars_per_token must be a positive number, found {chars_per_token!r}")
        super().__init__(base, base_options)
        self.chars_per_token = float(chars_per_token)
        self._tokens: dict[Clip, float] = {}
        needles = self._factual()
        for budget in budgets:
            rng = random.Random(f"{seed}:{budget}")
            order = rng.sample(needles, len(needles))
            chosen = list(islice((q for q in order if self._feasible(q, budget)), per_budget))
            if not chosen:
                raise BadInput(
                    f"niah budget {budget}: no needle fits (a needle must be at most half the budget, "
                    "and other sources must exist to hide it among)"
                )
            for index, needle in enumerate(chosen):
                d = rng.random() if depths is None else depths[index % len(depths)]
                self._add_example(budget, index, needle, d, rng)

    def tokens(self, source: str, clip: int) -> float:
        """Estimated tokens of one base clip's rendered text."""
        if (source, clip) not in self._tokens:
            self._tokens[(source, clip)] = len(render(self.clips(source)[clip])) / self.chars_per_token
        return self._tokens[(source, clip)]

    def _needle_tokens(self, q: _Query) -> float:
        return sum(self.tokens(q.source, c) for c in q.clips)

    def _feasible(self, q: _Query, budget: int) -> bool:
        return self._needle_tokens(q) <= budget / 2 and any(s != q.source for s in self.base_sources())

    def _haystack(
        self, needle: _Query, room: float, rng: random.Random
    ) -> tuple[list[Clip], list[float], int]:
        """Whole clips of the other sources, sources in a seeded order, until the next clip would
        overflow `room`; when every other source is used up, they are laid out again in a new
        order (a small data set can still fill a large budget). Returns clips, sizes and passes."""
        others = [s for s in self.base_sources() if s != needle.source and self.clips(s)]
        clips: list[Clip] = []
        sizes: list[float] = []
        total = 0.0
        passes = 0
        while others:
            passes += 1
            for source in rng.sample(others, len(others)):
                for clip in self.clips(source):
                    size = self.tokens(source, clip)
                    if total + size > room:
                        return clips, sizes, passes
                    clips.append((source, clip))
                    sizes.append(size)
                    total += size
        return clips, sizes, passes

    def _add_example(self, budget: int, index: int, needle: _Query, depth: float, rng: random.Random) -> None:
        haystack, sizes, passes = self._haystack(needle, budget - self._needle_tokens(needle), rng)
        at, filled = 0, 0.0
        while at < len(sizes) and filled + sizes[at] / 2 < depth * sum(sizes):
            filled += sizes[at]
            at += 1
        layout = haystack[:at] + [(needle.source, c) for c in needle.clips] + haystack[at:]
        ident = f"niah-B{budget}-{index:03d}"
        answer = needle.answer or ""
        meta: dict[str, Any] = {
            "budget": budget,
            "depth": depth,
            "tokens": round(sum(sizes) + self._needle_tokens(needle)),
            "needle": [needle.source, list(needle.clips)],
            "passes": passes,
        }
        if needle.base_id is not None:
            meta["base_id"] = needle.base_id
        example = Example(
            id=ident,
            kind="niah",
            question=needle.question,
            source=ident,
            answer=answer,
            keywords=keywords_of(answer),
            types=(f"budget={budget}",),
            meta=meta,
        )
        self._add(example, layout)


class SummarizationTask(_Assembled):
    """The seed paper's summarisation test: `n` factual QAs (LoCoMo categories 1, 2, 4, short
    answers, with evidence), each reading ONLY its evidence sessions. kind "summary", scored by
    the answer's `keywords`. Needs LoCoMo: M3-Bench has no evidence annotations."""

    name = "summarization"

    def __init__(self, base: str = "locomo", *, n: int = 20, seed: int = 0, **base_options: Any) -> None:
        if base != "locomo":
            raise BadInput(f"summarization needs evidence annotations: base must be 'locomo', found {base!r}")
        if not isinstance(n, int) or n < 1:
            raise BadInput(f"n must be a positive integer, found {n!r}")
        super().__init__(base, base_options)
        candidates = self._factual()
        if not candidates:
            raise BadInput("summarization: the base task has no short factual QA with evidence")
        rng = random.Random(f"{seed}:summary")
        picks = sorted(rng.sample(range(len(candidates)), min(n, len(candidates))))
        for index, i in enumerate(picks):
            q = candidates[i]
            ident = f"summary-{index:03d}"
            example = Example(
                id=ident,
                kind="summary",
                question=q.question,
                source=ident,
                answer=q.answer,
                gold_clips=q.clips,
                keywords=keywords_of(q.answer or ""),
                types=q.types,
                meta={"base_id": q.base_id, "sessions": list(q.clips), "conversation": q.source},
            )
            self._add(example, [(q.source, c) for c in q.clips])


def _positive_ints(name: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, list | tuple) or not values:
        raise BadInput(f"{name} must be a non-empty list of positive integers, found {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadInput(f"{name} must be a non-empty list of positive integers, found {values!r}")
    return tuple(dict.fromkeys(values))


def _depths(depth: Any) -> tuple[float, ...] | None:
    if depth is None:
        return None
    values = [depth] if isinstance(depth, int | float) and not isinstance(depth, bool) else depth
    if not isinstance(values, list | tuple) or not values:
        raise BadInput(f"depth must be a number in [0, 1], a list of them, or null; found {depth!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
            raise BadInput(f"depth must be a number in [0, 1], a list of them, or null; found {depth!r}")
    return tuple(float(v) for v in values)
