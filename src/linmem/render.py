"""The one memory-text layout every LM reader and engine sees, and clip ids parsed back out of answers.

Items render in log order (the log order is the agent's timeline). A header line opens a block
whenever the clip or the source changes::

    [CLIP 12 | 06:00-06:30 | kitchen_22]
    Alice puts the red mug in the left cupboard.
    (06:10) Bob asks where the mug is.

    [CLIP 13 | 06:30-07:00]
    Bob opens the left cupboard.

    [NOTE | 2024-05-01 09:00]
    An item with no clip gets a block of its own.

The header carries the block's first time and shows the source only when it differs from the
previous block's. A later item of the same clip with a different time prefixes its line with
``(time)``. Whitespace inside an item collapses to single spaces, so one item is one line.

Each item's text (`segments`) depends only on the item and the one before it, so appending items
appends text: the memory rendered after a write starts with the memory rendered before it. State
snapshots rely on that.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .types import Item

# Bumped whenever the layout changes: state snapshots of the old layout are then rebuilt.
LAYOUT_VERSION = 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _header(item: Item, show_source: bool) -> str:
    parts = [f"CLIP {item.clip}" if item.clip is not None else "NOTE"]
    if item.time:
        parts.append(_one_line(item.time))
    if show_source and item.source:
        parts.append(_one_line(item.source))
    return "[" + " | ".join(parts) + "]"


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where rendering stands after some items: all that the next item's text depends on.

    Keeping it lets a caller render only new items (`segments(new, cursor)`) and get exactly the
    text a full render would give them.
    """

    started: bool = False
    clip: int | None = None
    source: str | None = None
    block_time: str | None = None
    last_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cursor:
        return cls(**d)


def segments(items: Sequence[Item], cursor: Cursor | None = None) -> list[str]:
    """The rendered text of each item, in order; `"".join(segments(items))` is the memory text."""
    return advance(items, cursor)[0]


def advance(items: Sequence[Item], cursor: Cursor | None = None) -> tuple[list[str], Cursor]:
    """Render `items` following the items `cursor` stands after; returns the texts and the new cursor."""
    c = cursor or Cursor()
    out: list[str] = []
    for item in items:
        source = item.source or None
        starts_block = not c.started or item.clip is None or c.clip != item.clip or c.source != source
        block_time = (_one_line(item.time) if item.time else None) if starts_block else c.block_time
        line = _one_line(item.text)
        last_source = c.last_source
        if not starts_block:
            if item.time and _one_line(item.time) != block_time:
                line = f"({_one_line(item.time)}) {line}"
            text = line + "\n"
        else:
            show_source = bool(source) and source != last_source
            text = ("\n" if c.started else "") + _header(item, show_source) + "\n" + line + "\n"
            last_source = source or last_source
        out.append(text)
        c = Cursor(True, item.clip, source, block_time, last_source)
    return out, c


def render(items: Sequence[Item]) -> str:
    """The memory text for `items`."""
    return "".join(segments(items))


_CLIP_RE = re.compile(
    r"\bclips?[\s_#:]*(\d+(?:\s*(?:,|;|/|&|\band\b|\bor\b|-|–|\bto\b)\s*(?:clips?[\s_#:]*)?\d+)*)",
    re.IGNORECASE,
)
_NUM_RE = re.compile(r"\d+")
_RANGE_RE = re.compile(r"(\d+)\s*(?:-|–|\bto\b)\s*(?:clips?[\s_#:]*)?(\d+)", re.IGNORECASE)
_MAX_RANGE = 50


def parse_clips(text: str) -> list[int]:
    """Clip ids mentioned in a model's answer, in order of first mention, without repeats.

    Accepts ``CLIP 12``, ``CLIP_12``, ``clip12``, ``[CLIP 12 | ...]``, ``clips 3, 5 and 7`` and
    short ranges such as ``clips 3-5``. Bare numbers are not clip ids here; see `parse_ranking`.
    """
    found: list[int] = []
    for match in _CLIP_RE.finditer(text):
        group = match.group(1)
        ranges = {(m.start(), m.end()): (int(m.group(1)), int(m.group(2))) for m in _RANGE_RE.finditer(group)}
        pos = 0
        for (start, end), (a, b) in sorted(ranges.items()):
            found += [int(n) for n in _NUM_RE.findall(group[pos:start])]
            found += list(range(a, b + 1)) if 0 <= b - a <= _MAX_RANGE else [a, b]
            pos = end
        found += [int(n) for n in _NUM_RE.findall(group[pos:])]
    return _unique(found)


def parse_ranking(text: str, valid: Iterable[int]) -> list[int]:
    """A ranked list of clip ids from a model's free-form answer, tolerant of its format.

    Ids tagged as clips win; when the answer tags none, bare integers that are valid clip ids
    are taken in order. Ids not in `valid` are dropped.
    """
    allowed = set(valid)
    tagged = [c for c in parse_clips(text) if c in allowed]
    if tagged:
        return tagged
    return _unique(int(n) for n in _NUM_RE.findall(text) if int(n) in allowed)


def _unique(values: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(values))
