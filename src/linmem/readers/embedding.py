"""The embedding reader, M3-Agent's retrieval baseline, and the vector cache it persists.

Every item line is embedded once. A query is scored against every line by exact cosine (one
matrix product, no approximate index); a clip scores the maximum over its lines, and an item
without a clip is a unit of its own. `read` returns the best `top_k` units scoring at least
`threshold`, with all of their lines verbatim, as M3-Agent returns whole clips.

The vectors live in RAM as one matrix and on disk in
``<memory>/cache/embeddings/<embedder>.sqlite``, a derived cache that follows the item log:
new items are embedded on write (or at the next read), rows of deleted items are dropped, and
a damaged file or row is detected and re-embedded from the log.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sqlite3
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .. import progress
from ..embedders import Embedder, load_embedder
from ..errors import BadInput, EmptyMemory, EngineError, LinmemError
from ..log import Log, LogState
from ..render import render
from ..state import Update
from ..types import Answer, Hit, Item, Timings, Tokens

if TYPE_CHECKING:
    from ..memory import Memory

log = logging.getLogger(__name__)

# MiniLM gives unrelated lines cosines near 0 and related ones 0.3 and up, so a threshold tuned
# for text-embedding-3-large (M3-Agent's 0.5) would often return nothing; top_k does the cutting.
DEFAULT_TOP_K = 3
DEFAULT_THRESHOLD = 0.0
# Embed and persist this many lines at a time, so that a long first build survives an
# interruption half-way and its progress bar moves every few seconds.
_EMBED_STEP = 512


class EmbeddingReader:
    """Answers with the memory's clips closest to the query (see the module docstring).

    `embedder` is a spec for `linmem.embedders.load_embedder` (default all-MiniLM-L6-v2) or an
    `Embedder` object. The model is loaded at the first read, not at construction. The vectors
    live in the memory's `VectorIndex` for that embedder, which every reader of the memory with
    that embedder shares (readers that differ in `top_k` or `threshold` hold no copy of their own).
    """

    def __init__(
        self,
        memory: Memory,
        *,
        embedder: str | Embedder | None = None,
        top_k: int = DEFAULT_TOP_K,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise BadInput(f"top_k must be a positive integer, found {top_k!r}")
        if not isinstance(threshold, int | float) or not math.isfinite(threshold):
            raise BadInput(f"threshold must be a finite number, found {threshold!r}")
        self.memory = memory
        self.top_k = top_k
        self.threshold = float(threshold)
        self._spec = embedder if isinstance(embedder, str | None) else None
        self._embedder: Embedder | None = None if isinstance(embedder, str | None) else embedder
        self._index: VectorIndex | None = None

    def __repr__(self) -> str:
        model = self._embedder.id if self._embedder else self._spec
        return f"EmbeddingReader({self.memory.name!r}, embedder={model!r}, top_k={self.top_k})"

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = load_embedder(self._spec)
        return self._embedder

    @property
    def model_id(self) -> str:
        return self.embedder.id

    @property
    def index(self) -> VectorIndex:
        """The memory's shared vectors for this reader's embedder (loads the embedder)."""
        if self._index is None:
            self._index = VectorIndex.shared(self.memory.cache_dir, self.embedder)
        return self._index

    def read(self, query: str, *, exclude_clips: Iterable[int] = ()) -> Answer:
        """The `top_k` best clips (and unclipped items) scoring at least `threshold`.

        Clips in `exclude_clips` (e.g. those a dialogue has already shown) are skipped before the
        top `top_k` are taken, so the answer holds the best clips not yet seen.
        """
        return self._answer(query, self.top_k, clips_only=False, exclude=frozenset(exclude_clips))

    def rank(self, query: str, k: int = 5) -> Answer:
        """The `k` best clip ids by score, best first (ties: lower clip id), no threshold."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise BadInput(f"k must be a positive integer, found {k!r}")
        return self._answer(query, k, clips_only=True)

    def prepare(self) -> Update | None:
        """Embed what the index lacks now and say what that cost (None for an empty memory): the
        once-per-memory part of the searches' cost, which an evaluation reports apart."""
        if self.memory.log.state().count == 0:
            return None
        t0 = time.perf_counter()
        self._prepare()
        index = self.index
        with index.lock:
            work = index.sync(self.memory.log)
        return Update(work.tokens, time.perf_counter() - t0, "embedded" if work.tokens else "up to date")

    def on_write(self, items: Sequence[Item]) -> None:
        """Embed just-written items now if the index is live; otherwise the next read will."""
        if self._index is not None:
            self._index.on_write(items)

    def read_many(self, queries: Sequence[str]) -> list[Answer]:
        """`[self.read(q) for q in queries]`, with one sync of the vectors for them all."""
        return self._answers(queries, self.top_k, clips_only=False)

    def rank_many(self, queries: Sequence[str], k: int = 5) -> list[Answer]:
        """`[self.rank(q, k) for q in queries]`, with one sync of the vectors for them all."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise BadInput(f"k must be a positive integer, found {k!r}")
        return self._answers(queries, k, clips_only=True)

    def _answer(
        self, query: str, k: int, *, clips_only: bool, exclude: frozenset[int] = frozenset()
    ) -> Answer:
        return self._answers([query], k, clips_only=clips_only, exclude=exclude)[0]

    def _answers(
        self, queries: Sequence[str], k: int, *, clips_only: bool, exclude: frozenset[int] = frozenset()
    ) -> list[Answer]:
        """One answer per query. Syncing the vectors (its tokens, seconds and notes) is counted on
        the first. Each query is embedded on its own: a sentence-transformers batch pads its texts,
        which moves the vectors in the last bits and could reorder near-tied clips, and an answer
        must not depend on the queries it was asked with."""
        for query in queries:
            if not isinstance(query, str) or not query.strip():
                raise BadInput(f"query must be a non-empty string, found {query!r}")
        if not queries:
            return []
        start = time.perf_counter()
        # Checked before the sync too, so that an empty memory does not load a model to say so.
        if self.memory.log.state().count == 0:
            raise self._empty()
        self._prepare()
        index = self.index
        with index.lock:
            work = index.sync(self.memory.log)
            vectors = index.vectors()
            if not len(vectors):
                raise self._empty()
            answers = []
            for query in queries:
                query_start = time.perf_counter()
                q = self.embedder.embed([query])[0]
                query_tokens = self.embedder.count_tokens([query])[0]
                hits, extra = self._search(vectors, query, q, k, clips_only=clips_only, exclude=exclude)
                work = work.plus(extra)
                timings = Timings(
                    total_s=time.perf_counter() - start,
                    prefill_s=work.embed_s,
                    query_s=time.perf_counter() - query_start,
                )
                answers.append(self._build(vectors, hits, query_tokens, work, timings, clips_only=clips_only))
                work, start = _Work(), time.perf_counter()
        return answers

    def _prepare(self) -> None:
        """Bring what a reader built on this one keeps beside the vectors up to date (nothing here)."""

    def _build(
        self,
        vectors: _Vectors,
        hits: list[tuple[Hit, list[Item]]],
        query_tokens: int,
        work: _Work,
        timings: Timings,
        *,
        clips_only: bool,
    ) -> Answer:
        total, known = vectors.total_tokens(), vectors.tokens_known()
        if not hits and not clips_only:
            work = work.plus(_Work(notes=(f"nothing scored at or above the threshold {self.threshold}",)))
        return Answer(
            text="\n".join(render(items) for _, items in hits).rstrip("\n"),
            clips=tuple(h.clip for h, _ in hits if h.clip is not None),
            model=self.model_id,
            tokens=Tokens(
                memory=total if known else None,
                processed=query_tokens + work.tokens,
                cached=total - work.tokens,
            ),
            timings=timings,
            hits=tuple(h for h, _ in hits),
            notes=work.notes,
        )

    def _empty(self) -> EmptyMemory:
        return EmptyMemory(f"memory {self.memory.name!r} has no items to search: write some first")

    def _search(
        self,
        vectors: _Vectors,
        query: str,
        q: np.ndarray,
        k: int,
        *,
        clips_only: bool,
        exclude: frozenset[int],
    ) -> tuple[list[tuple[Hit, list[Item]]], _Work]:
        """The best `k` units for the query (text `query`, vector `q`), and any work done beyond
        the vectors' sync (for readers built on this one)."""
        units = vectors.units()
        line_scores = vectors.matrix() @ q
        scores = np.full(len(units.clip), -np.inf, dtype=np.float32)
        np.maximum.at(scores, units.unit_of_row, line_scores)
        order = np.lexsort((units.first_id, units.sort_clip, -scores))
        if clips_only:
            order = order[units.clip[order] >= 0]
        else:
            order = order[scores[order] >= self.threshold]
        if exclude:
            order = order[~np.isin(units.clip[order], list(exclude))]
        return [self._hit(vectors, units, int(u), float(scores[u])) for u in order[:k]], _Work()

    @staticmethod
    def _hit(vectors: _Vectors, units: _Units, unit: int, score: float) -> tuple[Hit, list[Item]]:
        items = sorted((vectors.items[r] for r in units.rows[unit]), key=lambda i: i.id or 0)
        clip = int(units.clip[unit])
        hit = Hit(
            clip=clip if clip >= 0 else None,
            score=score,
            item_ids=tuple(i.id for i in items if i.id is not None),
            lines=tuple(i.text for i in items),
        )
        return hit, items


_INDEXES: weakref.WeakValueDictionary[tuple[str, str], VectorIndex] = weakref.WeakValueDictionary()
_INDEXES_LOCK = threading.Lock()


class VectorIndex:
    """One memory's item vectors for one embedder, in RAM and in the disk cache, kept in step with
    the log. One per (memory folder, embedder) per process (`shared`); `lock` serialises its use."""

    def __init__(self, cache_dir: Path, embedder: Embedder) -> None:
        self.embedder = embedder
        self.lock = threading.RLock()
        self._path = cache_dir / "embeddings" / f"{safe_file_stem(embedder.id)}.sqlite"
        self._vectors: _Vectors | None = None
        self._cache: VectorCache | None = None
        self._state: LogState | None = None

    @classmethod
    def shared(cls, cache_dir: Path, embedder: Embedder) -> VectorIndex:
        key = (str(Path(cache_dir).resolve()), embedder.id)
        with _INDEXES_LOCK:
            index = _INDEXES.get(key)
            if index is None or index.embedder is not embedder:
                _INDEXES[key] = index = cls(cache_dir, embedder)
            return index

    def vectors(self) -> _Vectors:
        assert self._vectors is not None, "sync builds the vectors"
        return self._vectors

    def on_write(self, items: Sequence[Item]) -> None:
        """Embed just-written items now if the vectors are in RAM; otherwise the next read will.

        The items are already committed to the log, so a failure here is logged and the work is
        left to the next read's sync rather than failing the write.
        """
        with self.lock:
            if self._vectors is None:
                return
            fresh = [i for i in items if i.id is not None and i.id not in self._vectors]
            try:
                self._add(fresh)
            except (LinmemError, sqlite3.Error, OSError) as e:
                log.warning("embedding new items deferred to the next read: %s", e)

    def sync(self, memory_log: Log) -> _Work:
        """Bring the vectors up to the log: embed missing items, drop deleted or changed ones."""
        state = memory_log.state()
        if self._vectors is not None and state == self._state:
            return _Work()
        if self._vectors is None or self._cache is None:
            self._vectors = _Vectors(self.embedder.dim)
            # Through a weak reference: no cycle, so an index nobody reads is freed at once.
            me = weakref.ref(self)
            self._cache = VectorCache(
                self._path, self.embedder.id, self.embedder.dim, lambda: _backup_of(me())
            )
        work = _Work()
        delta = memory_log.since(self._state) if self._state is not None else None
        if delta is None:
            # First sync, or the log no longer extends what the vectors were built from (items
            # deleted, a backup restored): keep only the rows whose item is still there unchanged.
            everything = memory_log.since(None)
            assert everything is not None
            items, state = everything
            self._vectors.retain(items)
            work = work.plus(self._drop_gone({i.id for i in items if i.id is not None}))
        else:
            items, state = delta
        work = work.plus(self._add([i for i in items if i.id not in self._vectors]))
        self._state = state
        return work

    def _drop_gone(self, present: set[int]) -> _Work:
        cache = self._cache
        assert cache is not None
        return self._persist(lambda: cache.drop_except(present))

    def _add(self, items: Sequence[Item]) -> _Work:
        """Add items to the vectors, in their order: from the disk cache when a valid row exists,
        else embedded.

        The lines to embed go longest first, as one job (one progress bar) cut into steps that
        are each saved to the cache: a padded batch then holds lines of about one length, across
        the whole job rather than within each step (the vectors match a line embedded alone to
        float rounding, whatever its neighbours).
        """
        items = [i for i in items if i.id is not None]
        vectors, cache = self._vectors, self._cache
        assert vectors is not None and cache is not None
        if not items:
            return _Work()
        found: dict[int, CacheRow] = {}
        work = self._persist(lambda: found.update(cache.rows(items)))
        missing = sorted((i for i in items if i.id not in found), key=lambda i: -len(i.text))
        if missing:
            label = f"embedding {len(missing)} lines ({self.embedder.id})"
            with progress.task(label, len(missing), "lines") as task:
                for lo in range(0, len(missing), _EMBED_STEP):
                    step = missing[lo : lo + _EMBED_STEP]
                    embedded, done = self._embed_and_save(step)
                    found |= embedded
                    work = work.plus(done)
                    task.step(len(step))
        vectors.append(items, [found[_id(i)] for i in items])
        return work

    def _embed_and_save(self, items: Sequence[Item]) -> tuple[dict[int, CacheRow], _Work]:
        cache = self._cache
        assert cache is not None
        embedded, embed_s = self._embed(items)
        work = self._persist(lambda: cache.put(embedded.values()))
        return embedded, work.plus(_Work(tokens=sum(r.tokens for r in embedded.values()), embed_s=embed_s))

    def _embed(self, items: Sequence[Item]) -> tuple[dict[int, CacheRow], float | None]:
        if not items:
            return {}, None
        start = time.perf_counter()
        texts = [i.text for i in items]
        matrix = self.embedder.embed(texts)
        counts = self.embedder.count_tokens(texts)
        if matrix.shape != (len(items), self.embedder.dim):
            raise EngineError(
                f"embedder {self.embedder.id} returned shape {matrix.shape} for {len(items)} texts, "
                f"expected ({len(items)}, {self.embedder.dim})"
            )
        rows = {
            i.id: CacheRow(i.id, text_digest(i.text), int(n), np.ascontiguousarray(v, dtype=np.float32))
            for i, v, n in zip(items, matrix, counts, strict=True)
            if i.id is not None
        }
        return rows, time.perf_counter() - start

    def _persist(self, op: Callable[[], object]) -> _Work:
        """Run a cache operation; the cache is derived, so failing to save it costs a note, not the read."""
        assert self._cache is not None
        try:
            op()
        except (sqlite3.Error, OSError) as e:
            log.warning("embedding cache %s not updated: %s", self._cache.path, e)
            return _Work(notes=(f"embedding cache not updated: {e}",))
        return _Work(notes=self._cache.take_notes())


def _backup_of(index: VectorIndex | None) -> list[CacheRow]:
    return index._vectors.rows() if index is not None and index._vectors is not None else []


@dataclass(frozen=True, slots=True)
class _Work:
    """What a sync did: tokens embedded, seconds spent embedding (None if nothing), notes."""

    tokens: int = 0
    embed_s: float | None = None
    notes: tuple[str, ...] = ()

    def plus(self, other: _Work) -> _Work:
        seconds = [s for s in (self.embed_s, other.embed_s) if s is not None]
        return _Work(self.tokens + other.tokens, sum(seconds) if seconds else None, self.notes + other.notes)


@dataclass(frozen=True, slots=True)
class CacheRow:
    """One cached vector: the item it embeds, a digest of the text it embedded, its token count."""

    item_id: int
    text_sha: bytes
    tokens: int
    vector: np.ndarray


def _id(item: Item) -> int:
    assert item.id is not None, "items read from the log carry ids"
    return item.id


def text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _vector_digest(blob: bytes) -> bytes:
    return hashlib.blake2b(blob, digest_size=16).digest()


def safe_file_stem(embedder_id: str) -> str:
    """A file name for an embedder id: readable, and unique through a short hash of the id."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", embedder_id).strip("._")[:80]
    return f"{readable}-{hashlib.sha256(embedder_id.encode()).hexdigest()[:12]}"


@dataclass(frozen=True, slots=True)
class _Units:
    """Clips and unclipped items over the vector rows. `clip` is -1 for an unclipped unit;
    `sort_clip` breaks score ties by clip id, unclipped units last, then by first item id."""

    clip: np.ndarray
    sort_clip: np.ndarray
    first_id: np.ndarray
    unit_of_row: np.ndarray
    rows: list[list[int]]
    # The rows grouped by unit (`by_unit[starts[u]:starts[u + 1]]` are unit u's), for gathering
    # many units' rows at once.
    by_unit: np.ndarray
    starts: np.ndarray

    def rows_of_units(self, units: np.ndarray) -> np.ndarray:
        """The rows of all `units`, unit after unit."""
        lo, hi = self.starts[units], self.starts[units + 1]
        lengths = hi - lo
        offsets = np.repeat(lo - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return self.by_unit[offsets + np.arange(int(lengths.sum()))]


class _Vectors:
    """The in-RAM vectors, one row per item, in a buffer that grows by doubling."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.items: list[Item] = []
        self._tokens: list[int] = []
        self._text_sha: list[bytes] = []
        self._row_of: dict[int, int] = {}
        self._buffer = np.zeros((0, dim), dtype=np.float32)
        self._units: _Units | None = None
        self._cached: tuple[int, bool, np.ndarray, np.ndarray] | None = None
        self._int8: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row_of

    def matrix(self) -> np.ndarray:
        return self._buffer[: len(self.items)]

    def total_tokens(self) -> int:
        return self._derived()[0]

    def tokens_known(self) -> bool:
        """False when the embedder could not count some line (it reported 0 tokens)."""
        return self._derived()[1]

    def int8(self) -> Any:
        """An int8 copy of the rows for fast bounded cosines (`linmem.readers.int8`), packed
        again once many rows were added since; None where the kernel is unavailable."""
        from .int8 import quantize, stale

        n = len(self.items)
        if stale(self._int8, n):
            self._int8 = quantize(self.matrix())
        return self._int8

    def rows_of(self, item_ids: np.ndarray) -> np.ndarray:
        """The row of each item id (int64 array), -1 for an id without a vector."""
        _, _, ids, order = self._derived()
        if not len(ids):
            return np.full(len(item_ids), -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(ids, item_ids), len(ids) - 1)
        return np.where(ids[at] == item_ids, order[at], -1)

    def _derived(self) -> tuple[int, bool, np.ndarray, np.ndarray]:
        """Sums and lookups over the rows, computed once per change (a read at 100,000 items
        would otherwise spend milliseconds on them)."""
        if self._cached is None:
            row_ids = np.array([item.id or 0 for item in self.items], dtype=np.int64)
            order = np.argsort(row_ids, kind="stable")
            self._cached = (sum(self._tokens), all(self._tokens), row_ids[order], order)
        return self._cached

    def append(self, items: Sequence[Item], rows: Sequence[CacheRow]) -> None:
        n, extra = len(self.items), len(rows)
        if n + extra > len(self._buffer):
            grown = np.zeros((max(2 * len(self._buffer), n + extra, 64), self.dim), dtype=np.float32)
            grown[:n] = self._buffer[:n]
            self._buffer = grown
        for offset, (item, row) in enumerate(zip(items, rows, strict=True)):
            self._buffer[n + offset] = row.vector
            self._row_of[row.item_id] = n + offset
            self.items.append(item)
            self._tokens.append(row.tokens)
            self._text_sha.append(row.text_sha)
        self._units = None
        self._cached = None

    def retain(self, items: Sequence[Item]) -> None:
        """Keep only the rows of `items` whose text is the one embedded, as those items (their
        clip, time and source may have changed); drop every other row."""
        current = {i.id: i for i in items if i.id is not None}
        keep = [
            r
            for r, item in enumerate(self.items)
            if item.id in current and self._text_sha[r] == text_digest(current[item.id].text)
        ]
        self._int8 = None  # rows may move: the packed copy no longer lines up
        self.items = [current[self.items[r].id] for r in keep]  # type: ignore[index]
        self._units = None
        self._cached = None
        if len(keep) == len(self._text_sha):
            return
        self._buffer = self._buffer[keep].copy()
        self._tokens = [self._tokens[r] for r in keep]
        self._text_sha = [self._text_sha[r] for r in keep]
        self._row_of = {item.id: r for r, item in enumerate(self.items) if item.id is not None}
        self._units = None
        self._cached = None

    def rows(self) -> list[CacheRow]:
        return [
            CacheRow(item.id, sha, tokens, self._buffer[r])
            for r, (item, sha, tokens) in enumerate(
                zip(self.items, self._text_sha, self._tokens, strict=True)
            )
            if item.id is not None
        ]

    def units(self) -> _Units:
        if self._units is None:
            self._units = _group(self.items)
        return self._units


def _group(items: Sequence[Item]) -> _Units:
    index: dict[tuple[str, int], int] = {}
    unit_of_row = np.empty(len(items), dtype=np.int64)
    rows: list[list[int]] = []
    clips: list[int] = []
    first: list[int] = []
    for r, item in enumerate(items):
        key = ("clip", item.clip) if item.clip is not None else ("item", item.id or 0)
        unit = index.setdefault(key, len(index))
        if unit == len(rows):
            rows.append([])
            clips.append(item.clip if item.clip is not None else -1)
            first.append(item.id or 0)
        rows[unit].append(r)
        first[unit] = min(first[unit], item.id or 0)
        unit_of_row[r] = unit
    clip = np.array(clips, dtype=np.int64)
    return _Units(
        clip=clip,
        sort_clip=np.where(clip >= 0, clip, np.iinfo(np.int64).max),
        first_id=np.array(first, dtype=np.int64),
        unit_of_row=unit_of_row,
        rows=rows,
        by_unit=np.argsort(unit_of_row, kind="stable"),
        starts=np.searchsorted(np.sort(unit_of_row), np.arange(len(rows) + 1)),
    )


_FORMAT = "1"
_SCHEMA = """
CREATE TABLE header (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE vectors (
    item_id INTEGER PRIMARY KEY,
    text_sha BLOB NOT NULL,
    tokens INTEGER NOT NULL,
    vector BLOB NOT NULL,
    vector_sha BLOB NOT NULL
);
"""
_IN_CHUNK = 500  # ids per `IN (...)`: well under SQLite's host-parameter limit


class CacheCorrupt(Exception):
    """The cache file cannot be trusted as a whole; it is rebuilt."""


# SQLite result codes that mean "this file is not the cache we wrote": a generic error (a table or
# column missing), a damaged page, a datatype mismatch, not a database at all. Busy, locked, full
# and I/O errors are not the file's fault and are left to propagate.
_DAMAGED = {sqlite3.SQLITE_ERROR, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_MISMATCH, sqlite3.SQLITE_NOTADB}
_COLUMNS = ["item_id", "text_sha", "tokens", "vector", "vector_sha"]

T = TypeVar("T")


class VectorCache:
    """One SQLite file of item vectors for one embedder: a header (format, embedder id, dim) and
    one row per item (text digest, token count, float32 vector, vector digest).

    Updates run in transactions. A file that is not SQLite, is damaged or has the wrong header is
    replaced whole (written to a temporary file, then renamed over it) with the rows `backup`
    returns, so the file is never seen half-written. A row whose text digest, length or vector
    digest does not check out is left out of `rows` and gets overwritten by the next `put`.
    """

    def __init__(self, path: Path, embedder_id: str, dim: int, backup: Callable[[], list[CacheRow]]) -> None:
        self.path = path
        self.embedder_id = embedder_id
        self.dim = dim
        self._backup = backup
        self._notes: list[str] = []

    def take_notes(self) -> tuple[str, ...]:
        notes, self._notes = tuple(self._notes), []
        return notes

    def rows(self, items: Sequence[Item]) -> dict[int, CacheRow]:
        """Valid cached rows for these items, by item id."""
        by_id = {i.id: i for i in items if i.id is not None}
        raw = self._run(lambda db: _select(db, sorted(by_id)))
        checked = {item_id: self._check(by_id[item_id], *rest) for item_id, *rest in raw}
        found = {item_id: row for item_id, row in checked.items() if row is not None}
        if len(found) < len(checked):
            self._notes.append(f"embedding cache: {len(checked) - len(found)} damaged row(s) re-embedded")
        return found

    def put(self, rows: Iterable[CacheRow]) -> None:
        records = [_record(r) for r in rows]

        def insert(db: sqlite3.Connection) -> None:
            with _transaction(db):
                db.executemany("INSERT OR REPLACE INTO vectors VALUES (?,?,?,?,?)", records)

        self._run(insert)

    def drop_except(self, present: set[int]) -> int:
        """Delete the rows of items not in `present`; returns how many went."""

        def drop(db: sqlite3.Connection) -> int:
            with _transaction(db):
                gone = [r[0] for r in db.execute("SELECT item_id FROM vectors") if r[0] not in present]
                for chunk in _chunks(gone, _IN_CHUNK):
                    db.execute(f"DELETE FROM vectors WHERE item_id IN ({','.join('?' * len(chunk))})", chunk)
            return len(gone)

        return self._run(drop)

    def _check(
        self, item: Item, text_sha: object, tokens: object, blob: object, vector_sha: object
    ) -> CacheRow | None:
        if not isinstance(blob, bytes) or len(blob) != 4 * self.dim or not isinstance(tokens, int):
            return None
        if text_sha != text_digest(item.text) or vector_sha != _vector_digest(blob):
            return None
        return CacheRow(_id(item), text_sha, tokens, np.frombuffer(blob, dtype="<f4").astype(np.float32))

    def _run(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` on a header-checked connection; if the file proves damaged, rebuild it and
        run `op` once more."""
        try:
            return self._run_once(op)
        except (CacheCorrupt, sqlite3.DatabaseError) as e:
            code = getattr(e, "sqlite_errorcode", None)
            if isinstance(e, sqlite3.DatabaseError) and (code is None or code & 0xFF not in _DAMAGED):
                raise
            reason = str(e) or type(e).__name__
            log.warning("embedding cache %s unusable (%s); rebuilding it", self.path, reason)
            self._notes.append(f"embedding cache rebuilt: {reason}")
            self._rebuild()
            return self._run_once(op)

    def _run_once(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if not self.path.exists():
            self._rebuild()
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            self._check_header(db)
            return op(db)
        finally:
            db.close()

    def _check_header(self, db: sqlite3.Connection) -> None:
        header = dict(db.execute("SELECT key, value FROM header").fetchall())
        columns = [r[1] for r in db.execute("PRAGMA table_info(vectors)")]
        expected = {"format": _FORMAT, "embedder": self.embedder_id, "dim": str(self.dim)}
        if header != expected:
            raise CacheCorrupt(f"header {header} does not match {expected}")
        if columns != _COLUMNS:
            raise CacheCorrupt(f"vectors table has columns {columns}, expected {_COLUMNS}")

    def _rebuild(self) -> None:
        """Write a fresh file beside the old one and rename it over: atomic on POSIX and Windows."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        try:
            _write_fresh(Path(tmp), self.embedder_id, self.dim, self._backup())
            # A leftover rollback journal of the old file would be "replayed" into the new one.
            Path(f"{self.path}-journal").unlink(missing_ok=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _write_fresh(path: Path, embedder_id: str, dim: int, rows: Sequence[CacheRow]) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.executescript(_SCHEMA)
        with _transaction(db):
            header = [("format", _FORMAT), ("embedder", embedder_id), ("dim", str(dim))]
            db.executemany("INSERT INTO header VALUES (?, ?)", header)
            db.executemany("INSERT INTO vectors VALUES (?,?,?,?,?)", [_record(r) for r in rows])
    finally:
        db.close()


def _select(db: sqlite3.Connection, ids: Sequence[int]) -> list[tuple[int, object, object, object, object]]:
    query = "SELECT item_id, text_sha, tokens, vector, vector_sha FROM vectors WHERE item_id IN ({})"
    out: list[tuple[int, object, object, object, object]] = []
    for chunk in _chunks(ids, _IN_CHUNK):
        out += db.execute(query.format(",".join("?" * len(chunk))), chunk).fetchall()
    return out


def _record(row: CacheRow) -> tuple[int, bytes, int, bytes, bytes]:
    blob = np.ascontiguousarray(row.vector, dtype="<f4").tobytes()
    return (row.item_id, row.text_sha, row.tokens, blob, _vector_digest(blob))


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _chunks(values: Sequence[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(values), size):
        yield list(values[i : i + size])


__all__ = [
    "DEFAULT_THRESHOLD",
    "DEFAULT_TOP_K",
    "EmbeddingReader",
    "VectorCache",
    "VectorIndex",
    "safe_file_stem",
]
