"""BM25 over an in-RAM copy of the log's full-text index: the hybrid reader's fast path.

FTS5 scores every row that holds any query term, one row at a time in C; a question whose words
are common matches most of a large memory, and at 100,000 items such a search took 200 ms. Here
the same index lives in RAM as postings (per token: the items holding it and how often), and a
query is one weighted `bincount` per term, with BM25 exactly as FTS5 defines it (k1 = 1.2,
b = 0.75, IDF floored at 1e-6, every query term a phrase of its own, in order). `search` returns
what `Log.search` returns, in the same order, and tests hold it to that.

The copy is read from the log's own index (`Log.index_terms`) and follows the log: new items are
tokenised by FTS5's tokenizer (`linmem.lexical.tokens`) and added; when the log no longer
extends the copy (a deletion, a restored backup) it is read again. A query term that is a phrase
of several tokens (a pair of Chinese characters, "don't") goes to the log's FTS5, which knows
token positions; this copy does not keep them.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from pathlib import Path

import numpy as np

from .. import lexical
from ..log import Log, LogState
from ..types import Item

K1 = 1.2
B = 0.75


class LexicalIndex:
    """One memory's postings, kept in step with its log (one per log file per process: `shared`)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._state: LogState | None = None
        self._ids = np.zeros(0, dtype=np.int64)  # item id of each document, in log order
        self._lengths = np.zeros(0, dtype=np.float64)  # its tokens
        self._postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # token -> (docs, counts)
        self._pending: dict[str, list[tuple[int, int]]] = {}  # added since, merged on first use
        self._total_tokens = 0

    @classmethod
    def shared(cls, path: Path) -> LexicalIndex:
        key = str(Path(path).resolve())
        with _SHARED_LOCK:
            index = _SHARED.get(key)
            if index is None:
                _SHARED[key] = index = cls()
            return index

    def sync(self, log: Log) -> None:
        """Bring the copy up to the log: add new items, or read it again if the log changed under it."""
        with self.lock:
            state = log.state()
            if state == self._state:
                return
            delta = log.since(self._state) if self._state is not None else None
            if delta is None:
                self._load(log)
            else:
                items, state = delta
                self._add(items)
                self._state = state

    def search(self, log: Log, query: str, limit: int) -> list[tuple[int, float]]:
        """`log.search(query, limit)`, from RAM when every term is one token (see the module
        docstring); call `sync` first."""
        ids, scores = self.search_arrays(log, query, limit)
        return [(int(i), float(s)) for i, s in zip(ids, scores, strict=True)]

    def search_arrays(self, log: Log, query: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """`search` as two arrays, item ids and scores (no Python objects per hit)."""
        nothing = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
        terms = lexical.terms(query)
        if not terms or limit == 0:
            return nothing
        parts = lexical.tokens(terms)
        if any(len(p) != 1 for p in parts):
            found = log.search(query, limit)
            return np.array([i for i, _ in found], dtype=np.int64), np.array([s for _, s in found])
        with self.lock:
            return self._search([p[0] for p in parts], limit)

    def _search(self, tokens: list[str], limit: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(self._ids)
        if n == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        average = self._total_tokens / n
        norm = K1 * (1 - B + B * self._lengths / average)
        scores = np.zeros(n, dtype=np.float64)
        matched = np.zeros(n, dtype=bool)
        for token in tokens:  # duplicates included: FTS5 scores each phrase of the query
            docs, counts = self._posting(token)
            if not len(docs):
                continue
            idf = math.log((n - len(docs) + 0.5) / (len(docs) + 0.5))
            idf = idf if idf > 0 else 1e-6
            scores[docs] += idf * (counts * (K1 + 1)) / (counts + norm[docs])
            matched[docs] = True
        hits = np.flatnonzero(matched)
        if len(hits) > limit:
            # Keep every document tied with the limit-th score: the id breaks ties, below.
            cut = np.partition(scores[hits], len(hits) - limit)[len(hits) - limit]
            hits = hits[scores[hits] >= cut]
        best = hits[np.lexsort((self._ids[hits], -scores[hits]))[:limit]]
        return self._ids[best], scores[best]

    def _posting(self, token: str) -> tuple[np.ndarray, np.ndarray]:
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))
        docs, counts = self._postings.get(token, empty)
        extra = self._pending.pop(token, None)
        if extra:
            docs = np.concatenate([docs, np.array([d for d, _ in extra], dtype=np.int64)])
            counts = np.concatenate([counts, np.array([c for _, c in extra], dtype=np.float64)])
            self._postings[token] = (docs, counts)
        return docs, counts

    def _load(self, log: Log) -> None:
        state, ids, rows = log.index_terms()
        self._ids = np.array(ids, dtype=np.int64)
        self._postings, self._pending = {}, {}
        lengths = np.zeros(len(ids), dtype=np.float64)
        # Rows come grouped by token (FTS5's vocabulary order): one posting per group.
        for token, group in itertools.groupby(rows, key=lambda r: r[0]):
            docs, counts = np.unique(
                np.searchsorted(self._ids, np.fromiter((d for _, d in group), dtype=np.int64)),
                return_counts=True,
            )
            self._postings[token] = (docs, counts.astype(np.float64))
            lengths[docs] += counts
        self._lengths = lengths
        self._total_tokens = int(lengths.sum())
        self._state = state

    def _add(self, items: list[Item]) -> None:
        items = [i for i in items if i.id is not None]
        if not items:
            return
        base = len(self._ids)
        texts = [lexical.document(i.text) for i in items]
        lengths = []
        for offset, toks in enumerate(lexical.tokens(texts)):
            lengths.append(len(toks))
            for token, count in _counts(toks).items():
                self._pending.setdefault(token, []).append((base + offset, count))
        self._ids = np.concatenate([self._ids, np.array([i.id for i in items], dtype=np.int64)])
        self._lengths = np.concatenate([self._lengths, np.array(lengths, dtype=np.float64)])
        self._total_tokens += sum(lengths)


def _counts(tokens: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tokens:
        out[t] = out.get(t, 0) + 1
    return out


_SHARED: weakref.WeakValueDictionary[str, LexicalIndex] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


__all__ = ["LexicalIndex"]
