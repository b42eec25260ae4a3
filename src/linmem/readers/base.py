"""The Reader protocol: what every memory reader (LM or embedding) offers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..types import Answer, Item


@runtime_checkable
class Reader(Protocol):
    """Answers questions over one memory.

    `read` returns an answer with cited clips; `rank` returns the `k` most relevant clip ids,
    best first, in `Answer.clips`. `on_write` is called with newly written items so a reader
    can update its derived cache incrementally (it may also defer the work to the next read).
    """

    def read(self, query: str) -> Answer: ...

    def rank(self, query: str, k: int = 5) -> Answer: ...

    def on_write(self, items: Sequence[Item]) -> None: ...
