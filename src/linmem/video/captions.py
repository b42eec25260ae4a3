"""Clip captions as memory items, and the captions JSON Lines format that carries them.

One line per caption (usually one per clip), for example
``{"clip": 3, "start": 90, "end": 120, "caption": "...", "transcript": "..."}``, with ``start``
and ``end`` in seconds and ``transcript`` optional. `linmem ingest` writes items of the same shape
from a video, and reads such files directly (for users who have captions already).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from ..itemfile import jsonl_lines, parse_json, read_utf8
from ..types import Item


def mmss(seconds: float) -> str:
    """``"MM:SS"`` for a time in seconds (minutes may exceed 59)."""
    whole = max(0, int(seconds))
    return f"{whole // 60:02d}:{whole % 60:02d}"


def caption_text(caption: str, transcript: str | None) -> str:
    """The item text of a clip: its caption, then what was said."""
    speech = transcript.strip() if transcript else ""
    return caption.strip() + (f' Speech: "{speech}"' if speech else "")


def caption_item(
    clip: int, caption: str, *, source: str, start: float | None, end: float | None,
    transcript: str | None = None, meta: dict[str, object] | None = None,
) -> Item:  # fmt: skip
    time = f"{mmss(start)}-{mmss(end)}" if start is not None and end is not None else None
    return Item(
        text=caption_text(caption, transcript),
        clip=clip,
        time=time,
        source=source,
        meta={"start": start, "end": end} | (meta or {}),
    )


def line_items(lines: dict[int, list[tuple[str, str]]], source: str, clip_seconds: int = 30) -> list[Item]:
    """Items of a structured memory: clip -> [(kind, text), ...] to one item per line, in order,
    timed as fixed-length clips, with the line's kind ("episodic", "semantic") in `meta`."""
    return [
        Item(
            text=text,
            clip=clip,
            time=f"{mmss(clip * clip_seconds)}-{mmss((clip + 1) * clip_seconds)}",
            source=source,
            meta={"kind": kind},
        )
        for clip, clip_lines in lines.items()
        for kind, text in clip_lines
    ]


def read_captions(path: str | Path, source: str) -> list[Item]:
    """Caption items of one video from a captions JSON Lines file, in clip order."""
    path = Path(path)
    content = read_utf8(path)
    items = []
    for number, line in jsonl_lines(content):
        if line.strip():
            try:
                item = _parse(line, source)
            except BadInput as e:
                raise BadInput(f"{path}:{number}: {e}") from None
            items.append(item)
    if not items:
        raise BadInput(f"{path}: no captions (the file is empty)")
    return sorted(items, key=lambda i: i.clip or 0)


def _parse(line: str, source: str) -> Item:
    obj = parse_json(line)
    if not isinstance(obj, dict):
        raise BadInput(f"expected a JSON object, found {type(obj).__name__}")
    if "text" in obj and "caption" not in obj:
        raise BadInput(
            "this is a memory item ('text'), not a clip caption ('clip', 'caption'): "
            "write items with `linmem write NAME FILE`"
        )
    for name in ("clip", "caption"):
        if name not in obj:
            raise BadInput(f"missing field {name!r}")
    clip, caption = obj["clip"], obj["caption"]
    if isinstance(clip, bool) or not isinstance(clip, int) or clip < 0:
        raise BadInput(f"field 'clip' must be an integer >= 0, found {clip!r}")
    if not isinstance(caption, str) or not caption.strip():
        raise BadInput("field 'caption' must be a non-empty string")
    times = [obj.get(name) for name in ("start", "end")]
    for name, value in zip(("start", "end"), times, strict=True):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise BadInput(f"field {name!r} must be a number of seconds, found {value!r}")
    transcript = obj.get("transcript")
    if transcript is not None and not isinstance(transcript, str):
        raise BadInput("field 'transcript' must be a string")
    return caption_item(clip, caption, source=source, start=times[0], end=times[1], transcript=transcript)
