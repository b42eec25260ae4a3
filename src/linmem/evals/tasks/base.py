"""What an evaluation task is: a deterministic list of examples plus the memories they read.

An example names its memory by `source` (a video, a conversation, or a synthetic haystack id) and
an optional `upto` clip: the memory is the source's items with clip <= upto (M3-Bench robot
questions see only the clips before they are asked). Examples of one source with growing `upto`
read growing prefixes of one memory, so the runner writes each clip once and the state snapshot
is extended rather than rebuilt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from ...types import Item

KINDS = ("qa", "retrieval", "summary", "niah")


@dataclass(frozen=True, slots=True)
class Example:
    """One evaluation item.

    `kind` decides how it is scored: "qa" (an answer judged against `answer`), "retrieval" (a
    ranking of clips scored against `gold_clips`), "summary" and "niah" (an answer checked for
    `keywords`). `types` are the labels results are broken down by (question types, LoCoMo
    categories). `id` is unique and stable across runs: resumed runs skip finished ids.
    """

    id: str
    kind: str
    question: str
    source: str
    answer: str | None = None
    upto: int | None = None
    gold_clips: tuple[int, ...] = ()
    keywords: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


class Task:
    """A list of examples with slicing, and the memory items of each source.

    Subclasses fill `self._examples` in their constructor (deterministically: same inputs, same
    order) and implement `items(source)`.
    """

    name = "task"

    def __init__(self) -> None:
        self._examples: list[Example] = []

    def __len__(self) -> int:
        return len(self._examples)

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...

    def __getitem__(self, index: int | slice) -> Example | list[Example]:
        return self._examples[index]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._examples)

    @property
    def examples(self) -> Sequence[Example]:
        return tuple(self._examples)

    def items(self, source: str) -> list[Item]:
        """Every memory item of `source`, in memory (log) order."""
        raise NotImplementedError

    def memory(self, example: Example) -> list[Item]:
        """The items `example` may read: its source's items, cut at `upto` when set."""
        items = self.items(example.source)
        if example.upto is None:
            return items
        return [i for i in items if i.clip is None or i.clip <= example.upto]
