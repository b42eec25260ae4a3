"""The Reader protocol: what every memory reader (LM or embedding) offers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..types import Answer, Item


@runtime_checkable
class Reader(Protocol):
    """Answers questions over one memory.

    `read` returns an answer with cited clips; `rank` returns the `k` most relevant clip ids,
    best first, in `Answer.clips`. `read_many` and `rank_many` answer several queries at once
    (batched where the reader can), with the same answers as `read` and `rank` called one by one
    in order; work shared by the queries, such as bringing a cache up to date, is counted on the
    first answer. `on_write` is called with newly written items so a reader can update its
    derived cache incrementally (it may also defer the work to the next read).
    """

    def read(self, query: str) -> Answer: ...

    def rank(self, query: str, k: int = 5) -> Answer: ...

    def read_many(self, queries: Sequence[str]) -> list[Answer]: ...

    def rank_many(self, queries: Sequence[str], k: int = 5) -> list[Answer]: ...

    def on_write(self, items: Sequence[Item]) -> None: ...
