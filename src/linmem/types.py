"""Records that cross module boundaries: items written to memory and answers read from it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Item:
    """One memory item: a clip caption, a dialogue turn or a note.

    `clip` is the video-clip or dialogue-session index the item belongs to; `time` is free text
    (``"06:00-06:30"``, ``"2023-05-08 13:56"``); `source` names the video or conversation.
    `id` is assigned by the log when the item is written and never reused.
    """

    text: str
    clip: int | None = None
    time: str | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    id: int | None = None

    def with_id(self, item_id: int) -> Item:
        return replace(self, id=item_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token accounting for one read.

    `memory` is the length of the memory prompt prefix (None when the backend cannot count it),
    `processed` the prompt tokens actually run through the model for this read, `cached` the prompt
    tokens served from a state snapshot or a server prefix cache, `generated` the answer tokens.
    """

    memory: int | None
    processed: int
    cached: int
    generated: int = 0


@dataclass(frozen=True, slots=True)
class Timings:
    """Wall-clock seconds. `prefill_s` covers memory work done during this read (building or
    extending a snapshot, or the whole prompt for a stateless read); `query_s` the query tokens on
    top of a snapshot; `generate_s` decoding."""

    total_s: float
    prefill_s: float | None = None
    query_s: float | None = None
    generate_s: float | None = None


@dataclass(frozen=True, slots=True)
class Hit:
    """A clip (or an unclipped item) matched by the embedding reader, with its lines verbatim."""

    clip: int | None
    score: float
    item_ids: tuple[int, ...]
    lines: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Answer:
    """What every reader returns from `read` and `rank`.

    For `rank`, `clips` holds the ranked clip ids, best first.
    """

    text: str
    clips: tuple[int, ...]
    model: str
    tokens: Tokens
    timings: Timings
    hits: tuple[Hit, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["answer"] = d.pop("text")
        d["clips"] = list(self.clips)
        d["hits"] = [dict(asdict(h), item_ids=list(h.item_ids), lines=list(h.lines)) for h in self.hits]
        d["notes"] = list(self.notes)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of a controller dialogue (see `linmem.agent`), exactly as the model saw it.

    `role` is "system", "user" or "assistant". An assistant turn carries the parsed `action`
    ("answer", "search", or "invalid" for a turn that follows neither format), the controller's
    `tokens` and `seconds`. A user turn that carries a search result holds the `query` searched
    (None when the controller gave none: an empty search), the reader's `answer` text, the `clips` it
    returned or cited, and the reader's `tokens` and `seconds`.
    """

    role: str
    content: str
    action: str | None = None
    query: str | None = None
    answer: str | None = None
    clips: tuple[int, ...] = ()
    tokens: Tokens | None = None
    seconds: float | None = None

    def message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["clips"] = list(self.clips)
        return d
