"""Items from files: JSON Lines (one item object per line), a JSON array of item objects, or plain
text (one item per paragraph).

A file is parsed whole before anything is written, so a bad line anywhere writes nothing. Without
a format and a suffix that names one, content that is wholly item objects (JSON Lines, or an array)
is read as items: stored as text, it would become one note of raw JSON, which no one means.

JSON Lines are split on "\\n" only (a "\\r" before it is dropped): a JSON string may hold U+2028,
U+0085 and the other characters `str.splitlines` also breaks at, and a line number must be the
one an editor shows. Text files break lines at "\\n", "\\r\\n" and "\\r", as Python's text mode does.
A leading byte order mark (U+FEFF), which some editors write, is dropped from either.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BadInput
from .log import MAX_META_DEPTH, check_item
from .types import Item

FIELDS = ("text", "clip", "time", "source", "meta")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BOM = "\ufeff"
_TEXT_NEWLINE = re.compile(r"\r\n|\r|\n")


FORMATS = ("jsonl", "json", "text")


def read_items(path: str | Path, fmt: str | None = None, data: bytes | None = None) -> list[Item]:
    """Parse a file of items. `fmt` is "jsonl", "json" (an array of item objects, or one) or
    "text"; by default .jsonl and .ndjson are JSON Lines, .json is JSON, and anything else is
    text unless its content is wholly item objects. `data` replaces reading `path` (used for
    standard input)."""
    return read_items_as(path, fmt, data)[0]


def read_items_as(
    path: str | Path, fmt: str | None = None, data: bytes | None = None
) -> tuple[list[Item], str]:
    """`read_items`, and the format the items were read in."""
    path = Path(path)
    content = read_utf8(path, data)
    if fmt is None:
        fmt, items = _sniff(content, path)
    elif fmt == "jsonl":
        items = _parse_jsonl(content, path)
    elif fmt == "json":
        items = _parse_json(content, path)
    elif fmt == "text":
        items = [Item(text=p) for p in _paragraphs(content)]
    else:
        raise BadInput(f"unknown item format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not items:
        raise BadInput(f"{path}: no items found (the file is empty or blank)")
    return items, fmt


def _sniff(content: str, path: Path) -> tuple[str, list[Item]]:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl", _parse_jsonl(content, path)
    if suffix == ".json":
        # Many tools write JSON Lines under .json: a file that is not one JSON document is
        # tried as lines, and the document's own error is the one reported if both fail.
        try:
            return "json", _parse_json(content, path)
        except BadInput as whole:
            try:
                return "jsonl", _parse_jsonl(content, path)
            except BadInput:
                raise whole from None
    if _looks_like_json(content):
        failures = []
        for fmt, parse in (("json", _parse_json), ("jsonl", _parse_jsonl)):
            try:
                return fmt, parse(content, path)
            except BadInput as e:
                failures.append(e)
        # JSON Lines name the line that failed; a document that is one value, its own error.
        error = failures[1] if "\n" in content.strip() and content.lstrip()[:1] == "{" else failures[0]
        raise BadInput(f"{error} (the file looks like JSON items; --format text stores it as text)")
    return "text", [Item(text=p) for p in _paragraphs(content)]


def _looks_like_json(content: str) -> bool:
    """Whether text is meant as JSON: its first line is a JSON object or array, or the whole is
    bracketed like one. A note that merely starts with a bracket ("[draft] ...") is not."""
    body = content.strip()
    if not body or body[0] not in "{[":
        return False
    if (body[0], body[-1]) in (("{", "}"), ("[", "]")):
        return True
    try:
        return isinstance(json.loads(body.split("\n", 1)[0]), dict | list)
    except (ValueError, RecursionError):
        return False


def _parse_json(content: str, path: Path) -> list[Item]:
    try:
        doc = json.loads(content)
    except (ValueError, RecursionError) as e:
        line = f":{e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise BadInput(f"{path}{line}: {json_failure(e)}") from None
    objects = doc if isinstance(doc, list) else [doc]
    items = []
    for n, obj in enumerate(objects):
        try:
            items.append(item_from_dict(obj))
        except BadInput as e:
            where = f"item {n + 1} of the array" if isinstance(doc, list) else "the object"
            raise BadInput(f"{path}: {where}: {e}") from None
    return items


def read_utf8(path: Path, data: bytes | None = None) -> str:
    """The text of a file (or of `data`, read from it already), without a leading byte order mark;
    `BadInput` naming the file when it cannot be read, or the line and byte where it stops being
    UTF-8."""
    try:
        raw = path.read_bytes() if data is None else data
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise BadInput(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    return text.removeprefix(BOM)


def jsonl_lines(content: str) -> Iterator[tuple[int, str]]:
    """The lines of a JSON Lines text with their numbers (from 1), split on "\\n" only."""
    for number, line in enumerate(content.split("\n"), start=1):
        yield number, line.removesuffix("\r")


def parse_json(text: str) -> Any:
    """`json.loads`, with each way it fails (not only `JSONDecodeError`) as a `BadInput`."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise BadInput(json_failure(e)) from None


def json_failure(e: BaseException) -> str:
    """What was wrong with a JSON text `json.loads` refused, for a person to fix. Besides syntax,
    Python's decoder refuses integers past its int-string limit (a ValueError) and nesting past
    the interpreter's recursion limit (a RecursionError)."""
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e.msg} at column {e.colno})"
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    if isinstance(e, RecursionError):
        return f"invalid JSON: nested too deeply to read (meta may nest at most {MAX_META_DEPTH} levels)"
    if isinstance(e, ValueError) and "digits" in str(e):
        return (
            f"invalid JSON: a number with more than {sys.get_int_max_str_digits()} digits "
            "(integers must fit in 64 bits: at most 19 digits)"
        )
    return f"invalid JSON ({e})"


def _parse_jsonl(content: str, path: Path) -> list[Item]:
    items = []
    for number, line in jsonl_lines(content):
        if not line.strip():
            continue
        try:
            items.append(item_from_dict(parse_json(line)))
        except BadInput as e:
            raise BadInput(f"{path}:{number}: {e}") from None
    return items


def _paragraphs(content: str) -> list[str]:
    """Runs of non-blank lines, each stripped."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in _TEXT_NEWLINE.split(content):
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current).strip())
            current = []
    if current:
        paragraphs.append("\n".join(current).strip())
    return paragraphs


def item_from_dict(obj: Any) -> Item:
    """An Item from a JSON object with the fields text, clip, time, source and meta."""
    if not isinstance(obj, dict):
        raise BadInput(f"expected a JSON object, found {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS) - {"id"})
    if unknown:
        raise BadInput(f"unknown field {unknown[0]!r}: expected only {', '.join(FIELDS)}")
    if "text" not in obj:
        raise BadInput("missing field 'text'")
    meta = obj.get("meta")
    item = Item(
        text=obj["text"],
        clip=obj.get("clip"),
        time=obj.get("time"),
        source=obj.get("source"),
        meta={} if meta is None else meta,  # a false value that is not an object is refused
    )
    check_item(item)
    return item


def stored_bytes(item: Item) -> int:
    """The UTF-8 bytes an item takes in the log: its text, time and source, and its meta as the
    JSON `Log.append` stores. Only for an item `check_item` accepted (it encodes)."""
    meta = json.dumps(item.meta, ensure_ascii=False, allow_nan=False)
    return sum(len(s.encode("utf-8")) for s in (item.text, item.time or "", item.source or "", meta))
