"""The durable item log of one memory: an append-only SQLite table, the only source of truth.

Every derived cache (embeddings, model-state snapshots) records the `LogState` it was built from
and is rebuilt when the log has moved on in a way it cannot follow. Appends only raise `version`
and `last_id`; deletions also raise `epoch`, which tells caches that their prefix is gone.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadInput
from .types import Item

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    clip INTEGER,
    time TEXT,
    source TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    written_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO info VALUES ('schema', 1), ('version', 0), ('epoch', 0);
"""


@dataclass(frozen=True, slots=True)
class LogState:
    """Where the log stands. A cache built at (epoch, last_id) is a valid prefix of the log
    whenever the epoch is unchanged: only items with larger ids can have been added since."""

    version: int
    epoch: int
    last_id: int
    count: int


def check_item(item: Item) -> None:
    """Refuse an item the log cannot store faithfully; the message names the field."""
    if not isinstance(item.text, str) or not item.text.strip():
        raise BadInput(f"item text must be a non-empty string, found {item.text!r}")
    if item.clip is not None and (isinstance(item.clip, bool) or not isinstance(item.clip, int)):
        raise BadInput(f"item clip must be an integer or null, found {item.clip!r}")
    if item.clip is not None and item.clip < 0:
        raise BadInput(f"item clip must be >= 0, found {item.clip}")
    for name in ("time", "source"):
        value = getattr(item, name)
        if value is not None and not isinstance(value, str):
            raise BadInput(f"item {name} must be a string or null, found {value!r}")
    if not isinstance(item.meta, dict):
        raise BadInput(f"item meta must be an object, found {item.meta!r}")
    try:
        json.dumps(item.meta)
    except (TypeError, ValueError) as e:
        raise BadInput(f"item meta is not JSON-serialisable: {e}") from None


class Log:
    """An append-only item log in one SQLite file (WAL mode, synchronous=FULL).

    A write returns only after its transaction has committed. The object is safe to share
    between threads; SQLite serialises writers across processes.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, items: Sequence[Item]) -> list[Item]:
        """Append items atomically (all or none) and return them with their ids."""
        for item in items:
            check_item(item)
        if not items:
            return []
        now = time.time()
        rows = [
            (i.text, i.clip, i.time, i.source, json.dumps(i.meta, ensure_ascii=False), now) for i in items
        ]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = [
                    self._db.execute(
                        "INSERT INTO items (text, clip, time, source, meta, written_at) VALUES (?,?,?,?,?,?)",
                        row,
                    ).lastrowid
                    for row in rows
                ]
                self._db.execute("UPDATE info SET value = value + 1 WHERE key = 'version'")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return [item.with_id(int(i or 0)) for item, i in zip(items, ids, strict=True)]

    def items(
        self, after_id: int = 0, ids: Iterable[int] | None = None, limit: int | None = None
    ) -> list[Item]:
        """Items in log order; only those with id > `after_id`, or only the given `ids`; at most
        `limit` of them."""
        query = "SELECT id, text, clip, time, source, meta FROM items WHERE id > ?"
        args: list[Any] = [after_id]
        if ids is not None:
            wanted = sorted(set(ids))
            query += f" AND id IN ({','.join('?' * len(wanted))})"
            args += wanted
        with self._lock:
            tail = " ORDER BY id" + (" LIMIT ?" if limit is not None else "")
            rows = self._db.execute(query + tail, args + ([limit] if limit is not None else [])).fetchall()
        return [
            Item(text=t, clip=c, time=tm, source=s, meta=json.loads(m), id=i) for i, t, c, tm, s, m in rows
        ]

    def clips(self) -> set[int]:
        """The clip ids present in the log."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT clip FROM items WHERE clip IS NOT NULL")}

    def count_upto(self, last_id: int) -> int:
        """How many items have an id <= `last_id` (a cache covering that prefix must hold as many)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM items WHERE id <= ?", (last_id,)).fetchone()[0])

    def delete(self, ids: Iterable[int]) -> int:
        """Delete the given items; returns how many existed. Invalidates every derived prefix."""
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = self._db.execute(
                    f"DELETE FROM items WHERE id IN ({','.join('?' * len(wanted))})", wanted
                ).rowcount
                if n:
                    self._db.execute("UPDATE info SET value = value + 1 WHERE key IN ('version', 'epoch')")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return n

    def clear(self) -> int:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM items").fetchall()]
        return self.delete(ids)

    def state(self) -> LogState:
        with self._lock:
            self._db.execute("BEGIN")
            try:
                info = dict(self._db.execute("SELECT key, value FROM info").fetchall())
                last_id, count = self._db.execute(
                    "SELECT COALESCE(MAX(id), 0), COUNT(*) FROM items"
                ).fetchone()
            finally:
                self._db.execute("COMMIT")
        return LogState(version=info["version"], epoch=info["epoch"], last_id=last_id, count=count)
