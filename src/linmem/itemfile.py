"""Items from files: JSON Lines (one item object per line) or plain text (one item per paragraph).

A file is parsed whole before anything is written, so a bad line anywhere writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import BadInput
from .log import check_item
from .types import Item

FIELDS = ("text", "clip", "time", "source", "meta")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_items(path: str | Path, fmt: str | None = None, data: bytes | None = None) -> list[Item]:
    """Parse a file of items. `fmt` is "jsonl" or "text"; by default the suffix decides
    (.jsonl and .ndjson are JSON Lines, anything else is text). `data` replaces reading `path`
    (used for standard input)."""
    path = Path(path)
    content = read_utf8(path, data)
    fmt = fmt or ("jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text")
    if fmt == "jsonl":
        items = _parse_jsonl(content, path)
    elif fmt == "text":
        items = [Item(text=p.strip()) for p in _paragraphs(content)]
    else:
        raise BadInput(f"unknown item format {fmt!r}: expected 'jsonl' or 'text'")
    if not items:
        raise BadInput(f"{path}: no items found (the file is empty or blank)")
    return items


def read_utf8(path: Path, data: bytes | None = None) -> str:
    """The text of a file (or of `data`, read from it already); `BadInput` naming the file when it
    cannot be read, or the line and byte where it stops being UTF-8."""
    try:
        raw = path.read_bytes() if data is None else data
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise BadInput(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _paragraphs(content: str) -> list[str]:
    paragraphs, current = [], []
    for line in content.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return paragraphs


def _parse_jsonl(content: str, path: Path) -> list[Item]:
    items = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
        try:
            items.append(item_from_dict(obj))
        except BadInput as e:
            raise BadInput(f"{path}:{number}: {e}") from None
    return items


def item_from_dict(obj: Any) -> Item:
    """An Item from a JSON object with the fields text, clip, time, source and meta."""
    if not isinstance(obj, dict):
        raise BadInput(f"expected a JSON object, found {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS) - {"id"})
    if unknown:
        raise BadInput(f"unknown field {unknown[0]!r}: expected only {', '.join(FIELDS)}")
    if "text" not in obj:
        raise BadInput("missing field 'text'")
    item = Item(
        text=obj["text"],
        clip=obj.get("clip"),
        time=obj.get("time"),
        source=obj.get("source"),
        meta=obj.get("meta") or {},
    )
    check_item(item)
    return item
