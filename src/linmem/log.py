"""The durable item log of one memory: an append-only SQLite table, the only source of truth.

Every derived cache (embeddings, model-state snapshots) records the `LogState` it was built from
and checks, before it is trusted again, that the log still *extends* that state: the same log
(a random id made when the log was created) and the same items up to the cached position. The
second half is a running hash: each item row stores ``chain = sha256(previous chain, the row)``,
seeded by the log id, so one comparison of the chain at a cache's last item proves that every
item up to it is the one the cache read. A restored backup, a log swapped under a cache folder,
or another memory's cache copied in all fail that comparison and the cache is rebuilt.

Appends raise `version`, `last_id` and the item count (kept in the `info` table, so reading the
state is a few indexed lookups, not a scan). Deletions also raise `epoch` and re-chain the items after
the first deleted one, so a cache that covered a deleted item no longer matches, while a cache of
the prefix before it still does.

The log also holds its own full-text index (`items_fts`, SQLite FTS5 ranked by BM25, see
`linmem.lexical`), written in the same transaction as the items it indexes, so it cannot drift
from them: a write, a deletion or a clear commits to both or to neither. `Log.search` reads it;
an index found damaged (SQLite reports it corrupt, or it no longer holds one row per item) is
rebuilt from the items, which are the truth.

Each log keeps a random secret too, which caches use to authenticate their headers (`Log.mac`):
a header edited by hand, or written for another log, does not verify.

The SQLite connection is opened on demand and closed again when the process holds too many open
(`MAX_OPEN`, least recently used first), so a service with thousands of memories never runs out
of file descriptors.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import lexical
from .errors import BadInput, CorruptMemory, DiskFull, LinmemError
from .types import Item

SCHEMA_VERSION = 3
# Schema 3 added the full-text index. Its tokenizer is part of the schema: changing it means a
# new schema version whose migration rebuilds the index.
_FTS_TABLE = f"CREATE VIRTUAL TABLE IF NOT EXISTS items_fts USING fts5(text, tokenize='{lexical.TOKENIZER}')"
# SQLite's INTEGER is a signed 64-bit value.
MAX_INT = 2**63 - 1
# Deeper `meta` objects are refused: a JSON encoder or decoder recurses once per level.
MAX_META_DEPTH = 64
# Ids per `IN (...)` clause: well under SQLite's host-parameter limit (32,766 on stock builds).
_IN_CHUNK = 500


def _max_open() -> int:
    """Open SQLite connections kept per process across all logs: each holds three descriptors
    (the file, its WAL and shared memory), so an eighth of the descriptor limit, at most 64."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        return 64
    return 64 if soft == resource.RLIM_INFINITY else max(4, min(64, soft // 8))


MAX_OPEN = _max_open()

_TABLES = (
    """CREATE TABLE IF NOT EXISTS items (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        text TEXT NOT NULL,
        clip INTEGER,
        time TEXT,
        source TEXT,
        meta TEXT NOT NULL DEFAULT '{}',
        written_at REAL NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO info VALUES ('schema', 1), ('version', 0), ('epoch', 0)",
    # Text values apart from `info`, whose INTEGER affinity would turn an all-digit id into a number.
    "CREATE TABLE IF NOT EXISTS identity (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    _FTS_TABLE,
)
_COLUMNS = "id, text, clip, time, source, meta"

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LogState:
    """Where the log stands: its counters, its identity and the running hash of all its items.

    `head` is the chain value after the last item (the log's seed when it is empty). Two states
    are equal only if the logs hold the same items, so an unchanged state means unchanged content.
    """

    version: int
    epoch: int
    last_id: int
    count: int
    log_id: str
    head: str


def check_item(item: Item) -> None:
    """Refuse an item the log cannot store faithfully; the message names the field."""
    if not isinstance(item.text, str) or not item.text.strip():
        raise BadInput(f"item text must be a non-empty string, found {_short(item.text)}")
    if item.clip is not None and (isinstance(item.clip, bool) or not isinstance(item.clip, int)):
        raise BadInput(f"item clip must be an integer or null, found {_short(item.clip)}")
    if item.clip is not None and item.clip < 0:
        raise BadInput(f"item clip must be >= 0, found {item.clip}")
    if item.clip is not None and item.clip > MAX_INT:
        raise BadInput(
            f"item clip must be at most {MAX_INT} (2^63 - 1), found a {len(str(item.clip))}-digit number"
        )
    for name in ("time", "source"):
        value = getattr(item, name)
        if value is not None and not isinstance(value, str):
            raise BadInput(f"item {name} must be a string or null, found {_short(value)}")
    if not isinstance(item.meta, dict):
        raise BadInput(f"item meta must be an object, found {type(item.meta).__name__}")
    for name in ("text", "time", "source"):
        _check_unicode(getattr(item, name), f"item {name}")
    _check_json(item.meta, "item meta", 1)


def _short(value: Any, limit: int = 80) -> str:
    """A value as an error message quotes it: its repr, cut short (a bad value may be megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _check_unicode(value: str | None, where: str) -> None:
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadInput(
            f"{where} is not valid Unicode: a lone surrogate {value[e.start]!r} at character {e.start}"
        ) from None


def _check_json(value: Any, where: str, depth: int) -> None:
    """Plain JSON only: finite numbers, integers SQLite-sized, valid strings, bounded depth."""
    if depth > MAX_META_DEPTH:
        raise BadInput(f"{where} is nested more than {MAX_META_DEPTH} levels deep")
    if isinstance(value, dict):
        for key, inner in value.items():
            if not isinstance(key, str):
                raise BadInput(f"{where} has a key that is not a string: {_short(key)}")
            _check_unicode(key, f"{where} key")
            _check_json(inner, f"{where}.{key}", depth + 1)
    elif isinstance(value, list | tuple):
        for i, inner in enumerate(value):
            _check_json(inner, f"{where}[{i}]", depth + 1)
    else:
        _check_scalar(value, where)


def _check_scalar(value: Any, where: str) -> None:
    if isinstance(value, str):
        _check_unicode(value, where)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if not -MAX_INT - 1 <= value <= MAX_INT:
            raise BadInput(f"{where} holds an integer outside the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise BadInput(f"{where} holds {value}, which JSON cannot represent")
    else:
        raise BadInput(f"{where} holds a {type(value).__name__}, which is not JSON")


def check_id(value: Any, what: str) -> int:
    """An item id (or an `after` cursor) as SQLite can hold it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise BadInput(f"{what} must be an integer between 0 and {MAX_INT}, found {value!r}")
    return value


def _row_digest(previous: bytes, row: Sequence[Any]) -> bytes:
    """The chain after one item row: (id, text, clip, time, source, meta as stored)."""
    payload = json.dumps(list(row), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(previous + payload.encode("utf-8", "surrogatepass")).digest()


def _seed(log_id: str) -> bytes:
    return hashlib.sha256(b"linmem-log\0" + log_id.encode()).digest()


class Log:
    """An append-only item log in one SQLite file (WAL mode, synchronous=FULL).

    A write returns only after its transaction has committed. The object is safe to share
    between threads; SQLite serialises writers across processes. `create=True` makes the file
    (only `linmem.memory` does, in a folder no one else sees yet); otherwise the file must exist
    and be a linmem log, and `CorruptMemory` says when it is not.
    """

    def __init__(self, path: Path, *, create: bool = False, index: bool = True) -> None:
        self.path = Path(path)
        # Without its index (only benchmarks open a log so, to time writes without it), a write
        # marks the index stale and the next indexed use rebuilds it.
        self._lexical = index
        self._index_checked = False
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[str, bytes] | None = None
        self._closed = False
        self._may_create = create
        with self._connection():
            pass  # opens, migrates if needed, and proves the file readable
        self._may_create = False  # a reopen after an idle close must find the file again

    def __repr__(self) -> str:
        return f"Log({str(self.path)!r})"

    def close(self) -> None:
        """Close the file for good: a closed log refuses further use instead of reopening."""
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._db.close()
                self._db = None
        _OPEN.forget(self)

    # Writing

    def append(self, items: Sequence[Item]) -> list[Item]:
        """Append items atomically (all or none) and return them with their ids."""
        for item in items:
            check_item(item)
        if not items:
            return []
        now = time.time()
        metas = [json.dumps(i.meta, ensure_ascii=False, allow_nan=False) for i in items]

        def insert(db: sqlite3.Connection) -> list[int]:
            last = db.execute("SELECT id, chain FROM items ORDER BY id DESC LIMIT 1").fetchone()
            chain = last[1] if last else _seed(self.log_id)
            ids = []
            for item, meta in zip(items, metas, strict=True):
                cur = db.execute(
                    "INSERT INTO items (text, clip, time, source, meta, written_at) VALUES (?,?,?,?,?,?)",
                    (item.text, item.clip, item.time, item.source, meta, now),
                )
                item_id = int(cur.lastrowid or 0)
                chain = _row_digest(chain, (item_id, item.text, item.clip, item.time, item.source, meta))
                db.execute("UPDATE items SET chain = ? WHERE id = ?", (chain, item_id))
                ids.append(item_id)
            self._index_rows(db, [(i, item.text) for i, item in zip(ids, items, strict=True)])
            db.execute("UPDATE info SET value = value + 1 WHERE key = 'version'")
            db.execute("UPDATE info SET value = value + ? WHERE key = 'count'", (len(ids),))
            return ids

        ids = self._write(insert)
        return [item.with_id(i) for item, i in zip(items, ids, strict=True)]

    def delete(self, ids: Iterable[int]) -> int:
        """Delete the given items; returns how many existed. Items after the first deleted one
        are re-chained, so every derived cache that covered a deleted item stops matching."""
        wanted = sorted({check_id(i, "item id") for i in ids})
        if not wanted:
            return 0

        def remove(db: sqlite3.Connection) -> int:
            n = 0
            for chunk in _chunks(wanted, _IN_CHUNK):
                marks = ",".join("?" * len(chunk))
                n += db.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk).rowcount
                if self._lexical:
                    db.execute(f"DELETE FROM items_fts WHERE rowid IN ({marks})", chunk)
            if n:
                self._unindexed(db)
                self._rechain(db, wanted[0])
                db.execute("UPDATE info SET value = value - ? WHERE key = 'count'", (n,))
                db.execute("UPDATE info SET value = value + 1 WHERE key IN ('version', 'epoch')")
            return n

        return self._write(remove)

    def clear(self) -> int:
        """Delete every item; returns how many there were."""

        def remove(db: sqlite3.Connection) -> int:
            n = db.execute("DELETE FROM items").rowcount
            # Dropped and made again rather than emptied row by row: faster, and it also works
            # when the index is damaged.
            db.execute("DROP TABLE IF EXISTS items_fts")
            db.execute(_FTS_TABLE)
            db.execute("DELETE FROM info WHERE key = 'fts_stale'")
            db.execute("UPDATE info SET value = 0 WHERE key = 'count'")
            if n:
                db.execute("UPDATE info SET value = value + 1 WHERE key IN ('version', 'epoch')")
            return n

        return self._write(remove)

    def _rechain(self, db: sqlite3.Connection, from_id: int) -> None:
        before = db.execute(
            "SELECT chain FROM items WHERE id < ? ORDER BY id DESC LIMIT 1", (from_id,)
        ).fetchone()
        _chain_after(db, before[0] if before else _seed(self.log_id), from_id)

    def _index_rows(self, db: sqlite3.Connection, rows: Sequence[tuple[int, str]]) -> None:
        if self._lexical:
            db.executemany(
                "INSERT INTO items_fts (rowid, text) VALUES (?, ?)",
                [(i, lexical.document(text)) for i, text in rows],
            )
        else:
            self._unindexed(db)

    def _unindexed(self, db: sqlite3.Connection) -> None:
        if not self._lexical:
            db.execute("INSERT OR REPLACE INTO info VALUES ('fts_stale', 1)")

    # Full-text search

    def search(self, query: str, limit: int) -> list[tuple[int, float]]:
        """The items whose text best matches `query` by BM25, best first (ties: lower id), at
        most `limit`: (item id, score), scores positive, higher better. The query is words, never
        FTS5 syntax (see `linmem.lexical.match`); one without words matches nothing."""
        check_id(limit, "limit")
        if not isinstance(query, str):
            raise BadInput(f"query must be a string, found {_short(query)}")
        expr = lexical.match(query)
        if expr is None or limit == 0:
            return []
        sql = (
            "SELECT rowid, -bm25(items_fts) FROM items_fts WHERE items_fts MATCH ? "
            "ORDER BY bm25(items_fts), rowid LIMIT ?"
        )
        return [
            (int(i), float(s)) for i, s in self._indexed(lambda db: db.execute(sql, (expr, limit)).fetchall())
        ]

    def index_terms(self) -> tuple[LogState, list[int], list[tuple[str, int]]]:
        """The log's state, its item ids in order, and every token occurrence the full-text index
        holds as (token, item id), grouped by token; read in one transaction, so all three agree
        (for in-RAM copies of the index)."""

        def read(db: sqlite3.Connection) -> tuple[LogState, list[int], list[tuple[str, int]]]:
            vocab = "fts5vocab(main, items_fts, instance)"
            db.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS temp.items_terms USING {vocab}")
            db.execute("BEGIN")
            try:
                rows = db.execute("SELECT term, doc FROM temp.items_terms").fetchall()
                ids = [r[0] for r in db.execute("SELECT id FROM items ORDER BY id")]
                state = self._state(db)
            finally:
                db.execute("COMMIT")
            return state, ids, rows

        return self._indexed(read)

    def check_index(self, *, full: bool = False) -> str | None:
        """What is wrong with the full-text index, or None if nothing is. The quick check compares
        the index's rows with the items; `full` also runs FTS5's own integrity check, which reads
        the whole index."""
        try:
            problem = self._read(_quick_index_problem)
            if problem is None and full:
                problem = self._write(_full_index_problem)
        except CorruptMemory as e:
            return str(e)
        return problem

    def rebuild_index(self) -> int:
        """Build the full-text index again from the items; returns how many it indexed."""
        if not self._lexical:
            raise LinmemError(f"{self.path}: this log was opened without its index (index=False)")
        return self._write(_rebuild_index)

    def _indexed(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` on the index, first checking it (fully, once per log object); an index found
        damaged, then or by `op` failing, is rebuilt from the items and `op` runs again."""
        if not self._lexical:
            raise LinmemError(f"{self.path}: this log was opened without its index (index=False)")
        try:
            if not self._index_checked:
                # Once per log object: the full check reads the whole index (0.9 s at 100,000
                # items), and only it catches damage that makes FTS5 answer wrongly, not fail.
                problem = self._read(_quick_index_problem) or self._write(_full_index_problem)
                if problem is not None:
                    log.warning("%s: full-text index %s; rebuilding it from the items", self.path, problem)
                    self._write(_rebuild_index)
                self._index_checked = True
            return self._read(op)
        except (CorruptMemory, sqlite3.DatabaseError) as e:
            if not _is_index_damage(e):
                raise
            log.warning("%s: full-text index damaged (%s); rebuilding it from the items", self.path, e)
            self._write(_rebuild_index)
            return self._read(op)

    # Reading

    def items(
        self, after_id: int = 0, ids: Iterable[int] | None = None, limit: int | None = None
    ) -> list[Item]:
        """Items in log order; only those with id > `after_id`, or only the given `ids`; at most
        `limit` of them."""
        check_id(after_id, "after")
        if limit is not None:
            check_id(limit, "limit")
        if ids is not None:
            wanted = sorted(i for i in {check_id(i, "item id") for i in ids} if i > after_id)[:limit]
            rows = self._read(lambda db: _select_ids(db, wanted))
        else:
            query = f"SELECT {_COLUMNS} FROM items WHERE id > ? ORDER BY id"
            args: list[Any] = [after_id]
            if limit is not None:
                query += " LIMIT ?"
                args.append(limit)
            rows = self._read(lambda db: db.execute(query, args).fetchall())
        return [_item(row) for row in rows]

    def clips(self) -> set[int]:
        """The clip ids present in the log."""
        return self._read(
            lambda db: {r[0] for r in db.execute("SELECT DISTINCT clip FROM items WHERE clip IS NOT NULL")}
        )

    def state(self) -> LogState:
        def read(db: sqlite3.Connection) -> LogState:
            db.execute("BEGIN")
            try:
                return self._state(db)
            finally:
                db.execute("COMMIT")

        return self._read(read)

    def _state(self, db: sqlite3.Connection) -> LogState:
        info = dict(db.execute("SELECT key, value FROM info").fetchall())
        last = db.execute("SELECT id, chain FROM items ORDER BY id DESC LIMIT 1").fetchone()
        last_id, chain = last if last else (0, _seed(self.log_id))
        return LogState(info["version"], info["epoch"], last_id, info["count"], self.log_id, chain.hex())

    def _extends(self, db: sqlite3.Connection, prefix: LogState) -> bool:
        if prefix.log_id != self.log_id:
            return False
        if prefix.last_id == 0:
            return prefix.head == _seed(self.log_id).hex()
        row = db.execute("SELECT chain FROM items WHERE id = ?", (prefix.last_id,)).fetchone()
        return row is not None and row[0].hex() == prefix.head

    def since(self, prefix: LogState | None) -> tuple[list[Item], LogState] | None:
        """The items after `prefix` (all items when it is None) and the log's state, read in one
        transaction, so the two agree; None when the log no longer extends `prefix`."""

        def read(db: sqlite3.Connection) -> tuple[list[Item], LogState] | None:
            db.execute("BEGIN")
            try:
                if prefix is not None and not self._extends(db, prefix):
                    return None
                after = prefix.last_id if prefix is not None else 0
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM items WHERE id > ? ORDER BY id", (after,)
                ).fetchall()
                state = self._state(db)
            finally:
                db.execute("COMMIT")
            return [_item(row) for row in rows], state

        return self._read(read)

    def extends(self, prefix: LogState) -> bool:
        """Whether this log still holds exactly the items `prefix` was taken over, possibly
        followed by more: the same log, and the same running hash at `prefix.last_id`."""
        return self._read(lambda db: self._extends(db, prefix))

    @property
    def log_id(self) -> str:
        return self._ident()[0]

    def mac(self, data: bytes) -> str:
        """An authentication code for `data` under this log's secret (for derived caches' headers)."""
        return hmac.new(self._ident()[1], data, hashlib.sha256).hexdigest()

    # Connection handling

    def _ident(self) -> tuple[str, bytes]:
        if self._identity is None:
            with self._connection():
                pass
        assert self._identity is not None
        return self._identity

    def _read(self, op: Callable[[sqlite3.Connection], T]) -> T:
        with self._connection() as db:
            return op(db)

    def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        with self._connection() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = op(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return result

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """The open connection, under this log's lock, with SQLite failures as linmem errors."""
        with self._lock:
            if self._closed:
                raise LinmemError(f"{self.path}: the log was closed (its memory was closed or deleted)")
            try:
                if self._db is None:
                    if not self._may_create:
                        self._check_file()  # sqlite3 would silently make a new, empty one
                    self._db = self._open()
                yield self._db
            except sqlite3.Error as e:
                raise _translate(e, self.path) from e
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DiskFull(f"{self.path}: the disk is full") from e
                raise
        _OPEN.touch(self)

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._identity = _migrate(db, self._lexical)
        except BaseException:
            db.close()
            raise
        return db

    def _check_file(self) -> None:
        """A log file that exists but holds nothing was damaged: a real log always holds its
        tables, because memories are created whole (see `linmem.memory`)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise CorruptMemory(f"{self.path}: the log file is missing") from None
        wal = self.path.with_name(self.path.name + "-wal")
        if size == 0 and not (wal.exists() and wal.stat().st_size > 0):
            raise CorruptMemory(f"{self.path}: the log file is empty (0 bytes): it was truncated or damaged")

    def _close_if_idle(self) -> None:
        # Non-blocking: a log busy in another thread is not idle, and waiting could deadlock.
        if self._lock.acquire(blocking=False):
            try:
                if self._db is not None:
                    self._db.close()
                    self._db = None
            finally:
                self._lock.release()


def _migrate(db: sqlite3.Connection, indexed: bool = True) -> tuple[str, bytes]:
    """Bring the file to the current schema (once, whichever process gets there first) and return
    the log's (id, secret). Schema 1 logs get an identity and their chain here, schema 2 logs
    their full-text index, and an index left stale by an unindexed writer is rebuilt."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _TABLES:
            db.execute(statement)
        columns = [r[1] for r in db.execute("PRAGMA table_info(items)")]
        if "chain" not in columns:
            db.execute("ALTER TABLE items ADD COLUMN chain BLOB")
        ident = dict(db.execute("SELECT key, value FROM identity").fetchall())
        if "log_id" not in ident or "secret" not in ident:
            ident = {"log_id": secrets.token_hex(16), "secret": secrets.token_hex(32)}
            db.executemany("INSERT OR REPLACE INTO identity VALUES (?, ?)", list(ident.items()))
        schema = db.execute("SELECT value FROM info WHERE key = 'schema'").fetchone()[0]
        if schema < 2:
            _chain_after(db, _seed(ident["log_id"]), 0)
        if schema < 3 or (indexed and _stale(db)):
            _rebuild_index(db)
        if db.execute("SELECT 1 FROM info WHERE key = 'count'").fetchone() is None:
            # Kept by every write since schema 3, so reading the state is not a scan of the items.
            db.execute("INSERT INTO info SELECT 'count', COUNT(*) FROM items")
        if schema < SCHEMA_VERSION:
            db.execute("UPDATE info SET value = ? WHERE key = 'schema'", (SCHEMA_VERSION,))
        elif schema > SCHEMA_VERSION:
            raise CorruptMemory(f"the log has schema {schema}; this linmem reads up to {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return ident["log_id"], bytes.fromhex(ident["secret"])


def _chain_after(db: sqlite3.Connection, chain: bytes, after_id: int) -> None:
    """Store the running hash of every item after `after_id`, continuing from `chain`."""
    rows = db.execute(f"SELECT {_COLUMNS} FROM items WHERE id > ? ORDER BY id", (after_id,)).fetchall()
    updates = []
    for row in rows:
        chain = _row_digest(chain, row)
        updates.append((chain, row[0]))
    db.executemany("UPDATE items SET chain = ? WHERE id = ?", updates)


def _stale(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM info WHERE key = 'fts_stale'").fetchone() is not None


def _rebuild_index(db: sqlite3.Connection) -> int:
    """Make the full-text index again from the items. The old table is dropped, not emptied: a
    damaged index may not survive the reads that deleting its rows takes."""
    db.execute("DROP TABLE IF EXISTS items_fts")
    db.execute(_FTS_TABLE)
    rows = db.execute("SELECT id, text FROM items ORDER BY id").fetchall()
    db.executemany(
        "INSERT INTO items_fts (rowid, text) VALUES (?, ?)", [(i, lexical.document(t)) for i, t in rows]
    )
    db.execute("DELETE FROM info WHERE key = 'fts_stale'")
    return len(rows)


def _quick_index_problem(db: sqlite3.Connection) -> str | None:
    """Why the index cannot be trusted, or None, read in one transaction: it must hold one row
    per item, with the same ids at both ends (a row lost or added shows in the count or the ends)."""
    db.execute("BEGIN")
    try:
        if _stale(db):
            return "is stale (items were written without it)"
        items = db.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM items").fetchone()
        indexed = db.execute("SELECT COUNT(*), MIN(id), MAX(id) FROM items_fts_content").fetchone()
        sizes = db.execute("SELECT COUNT(*) FROM items_fts_docsize").fetchone()
    finally:
        db.execute("COMMIT")
    if tuple(items) != tuple(indexed) or sizes[0] != items[0]:
        return f"holds {indexed[0]} rows ({sizes[0]} sizes) for {items[0]} items"
    return None


def _full_index_problem(db: sqlite3.Connection) -> str | None:
    """FTS5's own integrity check, which reads the whole index (run inside a write transaction)."""
    try:
        db.execute("INSERT INTO items_fts (items_fts, rank) VALUES ('integrity-check', 1)")
    except sqlite3.DatabaseError as e:
        if not _is_index_damage(e):
            raise
        return f"fails its integrity check ({e})"
    return None


# Failures that are not the index's fault: waiting, a full disk, memory, an interrupted call.
_TRANSIENT = {
    sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_INTERRUPT, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN,
}  # fmt: skip


def _is_index_damage(e: Exception) -> bool:
    """Whether a failure met inside an index operation means the index is broken: SQLite's error
    (raw, or as the CorruptMemory it became) and not a transient one."""
    cause = e if isinstance(e, sqlite3.DatabaseError) else e.__cause__
    if not isinstance(cause, sqlite3.DatabaseError):
        return False
    code = getattr(cause, "sqlite_errorcode", None)
    return not (isinstance(code, int) and code & 0xFF in _TRANSIENT)


def _translate(e: sqlite3.Error, path: Path) -> Exception:
    """SQLite's failures as linmem errors a caller can act on; others pass through unchanged."""
    code = getattr(e, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    if primary == sqlite3.SQLITE_FULL or (primary == sqlite3.SQLITE_IOERR and _no_space(path)):
        return DiskFull(f"{path}: the disk is full ({e})")
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or (
        isinstance(e, sqlite3.DatabaseError) and primary == sqlite3.SQLITE_ERROR and "no such" in str(e)
    ):
        return CorruptMemory(f"{path}: not a readable linmem log ({e})")
    return e


def _no_space(path: Path) -> bool:
    """Whether the disk holding `path` is (all but) full: SQLite reports a full disk met while
    growing its shared-memory file (-shm) or writing the WAL as an I/O error, not SQLITE_FULL."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 2**20


def _item(row: Sequence[Any]) -> Item:
    item_id, text, clip, time_, source, meta = row
    return Item(text=text, clip=clip, time=time_, source=source, meta=json.loads(meta), id=item_id)


def _select_ids(db: sqlite3.Connection, ids: Sequence[int]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for chunk in _chunks(ids, _IN_CHUNK):
        query = f"SELECT {_COLUMNS} FROM items WHERE id IN ({','.join('?' * len(chunk))}) ORDER BY id"
        rows += db.execute(query, chunk).fetchall()
    return rows


def _chunks(values: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(values), size):
        yield list(values[i : i + size])


def count_items(path: Path) -> int:
    """How many items the log file at `path` holds, read without keeping it open (for listings)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    except sqlite3.Error as e:
        raise _translate(e, path) from e
    try:
        return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    except sqlite3.Error as e:
        raise _translate(e, path) from e
    finally:
        db.close()


class _OpenLogs:
    """The process's open log connections, least recently used first; past `MAX_OPEN` the oldest
    idle ones are closed (they reopen on their next use)."""

    def __init__(self) -> None:
        self._order: OrderedDict[int, Log] = OrderedDict()
        self._lock = threading.Lock()

    def touch(self, log: Log) -> None:
        with self._lock:
            self._order[id(log)] = log
            self._order.move_to_end(id(log))
            excess = len(self._order) - MAX_OPEN
            victims = [v for v in list(self._order.values())[: max(0, excess)] if v is not log]
            for victim in victims:
                self._order.pop(id(victim), None)
        for victim in victims:  # outside our lock: closing takes the victim's own lock
            victim._close_if_idle()

    def forget(self, log: Log) -> None:
        with self._lock:
            self._order.pop(id(log), None)


_OPEN = _OpenLogs()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
