"""`linmem bench --search`: the hybrid reader and the log's full-text index at scale.

One memory of `items` items (100,000 by default) of Zipf-distributed words, clips of 20 items,
built in this process. Measured in one run, on the thread count stated (`$LINMEM_THREADS`, which
also caps numpy's BLAS):

- index build: the full-text index made again from the items (what a schema-2 log's migration
  and a damaged index's repair both cost), and FTS5's full integrity check;
- writes: 100 items appended to that memory with the index, against the same appends to a copy
  opened without it, in alternating rounds (each append commits with fsync);
- search: `rank(query, 10)` over distinct queries, p50 and p95, and its parts alone (BM25 from
  the in-RAM postings, the same BM25 from FTS5's bm25() in the log, the exact float32 dense
  product); the dense vectors come from the hash embedder at MiniLM's 384 dimensions (the same
  matrix shape, without an hour of embedding), and MiniLM's own query embedding is timed
  separately, since it does not grow with the memory; and the same searches with the int8 first
  pass over the dense half (`linmem.readers.int8`, off by default) for comparison;
- RAM: the process's resident memory before and after the reader loaded the memory.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .engines.base import threads
from .log import Log
from .memory import open_memory
from .readers import hybrid
from .readers.bm25 import LexicalIndex
from .types import Item

ITEMS = 100_000
QUICK_ITEMS = 5_000
QUERIES = 200
WRITE_ROUNDS = 9
DENSE = "hash:384"
CLIP = 20


def run_search_bench(*, items: int | None = None, quick: bool = False, echo: bool = True) -> dict[str, Any]:
    say: Callable[[str], None] = print if echo else (lambda _m: None)
    n = items or (QUICK_ITEMS if quick else ITEMS)
    n_threads = threads()
    from threadpoolctl import threadpool_limits

    result: dict[str, Any] = {
        "bench": "linmem-search",
        "items": n,
        "threads": n_threads,
        "cpu": platform.processor() or platform.machine(),
        "dense": DENSE,
    }
    rng = random.Random(0)
    vocabulary = _vocabulary(rng, 20_000)
    weights = [1 / (r + 1) ** 1.07 for r in range(len(vocabulary))]
    texts = [_sentence(rng, vocabulary, weights, rng.randint(6, 20)) for _ in range(n)]
    queries = [_sentence(rng, vocabulary, weights, rng.randint(3, 8)) for _ in range(QUERIES)]
    with threadpool_limits(n_threads), tempfile.TemporaryDirectory() as home:
        say(f"bench: writing {n} items ...")
        memory = open_memory("search", home=home, create=True)
        start = time.perf_counter()
        for lo in range(0, n, 5000):
            memory.write([Item(t, clip=(lo + i) // CLIP) for i, t in enumerate(texts[lo : lo + 5000])])
        result["write_all_s"] = round(time.perf_counter() - start, 2)
        say("bench: index build and check ...")
        result["index"] = _index(memory.log)
        say("bench: writes of 100 items, with and without the index ...")
        result["writes"] = _writes(memory.log.path, Path(home), rng, vocabulary, weights)
        say("bench: search ...")
        result["search"] = _search(memory, queries)
        say("bench: MiniLM query embedding ...")
        result["query_embedding"] = _query_embedding(queries)
        memory.close()
    result["targets"] = targets(result)
    _print(result, say)
    if echo:
        print(json.dumps(result))
    return result


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiou"]
    words: dict[str, None] = {}
    while len(words) < size:
        words["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))] = None
    return list(words)


def _sentence(rng: random.Random, vocabulary: list[str], weights: list[float], length: int) -> str:
    return " ".join(rng.choices(vocabulary, weights, k=length))


def _index(log: Log) -> dict[str, Any]:
    start = time.perf_counter()
    indexed = log.rebuild_index()
    build = time.perf_counter() - start
    start = time.perf_counter()
    problem = log.check_index(full=True)
    check = time.perf_counter() - start
    return {
        "indexed": indexed,
        "build_s": round(build, 2),
        "full_check_s": round(check, 2),
        "problem": problem,
    }


def _writes(
    path: Path, home: Path, rng: random.Random, vocabulary: list[str], weights: list[float]
) -> dict[str, Any]:
    copy = home / "copy.sqlite"
    shutil.copyfile(path, copy)
    with_index, without = Log(path), Log(copy, index=False)
    seconds: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(WRITE_ROUNDS):
        batch = [
            Item(_sentence(rng, vocabulary, weights, rng.randint(6, 20)), clip=10**7) for _ in range(100)
        ]
        for name, log in (("with", with_index), ("without", without)):
            start = time.perf_counter()
            log.append(batch)
            seconds[name].append(time.perf_counter() - start)
    with_index.close()
    without.close()
    a, b = statistics.median(seconds["with"]), statistics.median(seconds["without"])
    return {"with_ms": round(1000 * a, 1), "without_ms": round(1000 * b, 1), "ratio": round(a / b, 3)}


def _search(memory: Any, queries: list[str]) -> dict[str, Any]:
    rss_before = _rss_mb()
    reader = memory.reader("hybrid", embedder=DENSE)
    start = time.perf_counter()
    reader.rank(queries[0], 10)  # loads: vectors embedded (hash), units grouped, index checked
    load = time.perf_counter() - start
    rss_after = _rss_mb()
    lexicon = LexicalIndex.shared(memory.log.path)
    total = [_seconds(reader.rank, q, 10) for q in queries]
    # The same searches with an int8 first pass over the dense half (off by default).
    quantize_from = hybrid.QUANTIZE_FROM
    hybrid.QUANTIZE_FROM = 20_000
    try:
        reader.rank(queries[0], 10)  # packs the int8 copy
        int8 = [_seconds(reader.rank, q, 10) for q in queries]
    finally:
        hybrid.QUANTIZE_FROM = quantize_from
    lexical = [_seconds(lexicon.search, memory.log, q, 1000) for q in queries]
    fts5 = [_seconds(memory.log.search, q, 1000) for q in queries[:50]]
    index = reader.index
    matrix = index.vectors().matrix()
    q = index.embedder.embed([queries[0]])[0]
    dense = [_seconds(np.matmul, matrix, q) for _ in queries]
    return {
        "load_s": round(load, 2),
        "p50_ms": _pct(total, 50),
        "p95_ms": _pct(total, 95),
        "int8_dense_p50_ms": _pct(int8, 50),
        "int8_dense_p95_ms": _pct(int8, 95),
        "lexical_p50_ms": _pct(lexical, 50),
        "lexical_p95_ms": _pct(lexical, 95),
        "fts5_p50_ms": _pct(fts5, 50),
        "fts5_p95_ms": _pct(fts5, 95),
        "dense_p50_ms": _pct(dense, 50),
        "rss_mb_before": round(rss_before, 1),
        "rss_mb_after": round(rss_after, 1),
    }


def _query_embedding(queries: list[str]) -> dict[str, Any]:
    from .embedders import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder()
    embedder.embed(["warm up"])
    seconds = [_seconds(embedder.embed, [q]) for q in queries[:50]]
    return {"model": embedder.id, "p50_ms": _pct(seconds, 50), "p95_ms": _pct(seconds, 95)}


def _seconds(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _pct(seconds: list[float], q: int) -> float:
    return round(1000 * float(np.percentile(seconds, q)), 2)


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def targets(r: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the figure it was checked on (at 100,000 items)."""
    at_scale = r["items"] >= ITEMS
    search, index, writes = r["search"], r["index"], r["writes"]
    return {
        "search_p50_ms<=10": search["p50_ms"] <= 10 if at_scale else None,
        "search_p95_ms<=30": search["p95_ms"] <= 30 if at_scale else None,
        "index_build_s<=60": index["build_s"] <= 60 if at_scale else None,
        "write_ratio<=1.2": writes["ratio"] <= 1.2,
    }


def _print(r: dict[str, Any], say: Callable[[str], None]) -> None:
    s, i, w, e = r["search"], r["index"], r["writes"], r["query_embedding"]
    say(f"\n{r['items']} items, {r['threads']} thread(s), {r['cpu']}")
    say(f"index build {i['build_s']} s, full integrity check {i['full_check_s']} s")
    say(f"write 100 items: {w['with_ms']} ms with the index, {w['without_ms']} ms without ({w['ratio']}x)")
    say(
        f"search (rank 10): p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms; BM25 alone p50 {s['lexical_p50_ms']}"
        f" ms, p95 {s['lexical_p95_ms']} ms (FTS5's own bm25(): p50 {s['fts5_p50_ms']} ms, p95"
        f" {s['fts5_p95_ms']} ms); dense product p50 {s['dense_p50_ms']} ms"
    )
    int8 = f"p50 {s['int8_dense_p50_ms']} ms, p95 {s['int8_dense_p95_ms']} ms"
    say(f"search with an int8 first pass over the dense half (hybrid.QUANTIZE_FROM): {int8}")
    say(f"MiniLM query embedding: p50 {e['p50_ms']} ms, p95 {e['p95_ms']} ms (add to search for MiniLM)")
    say(f"RSS {s['rss_mb_before']} MB before loading, {s['rss_mb_after']} MB after (load {s['load_s']} s)")
    say(f"targets: {r['targets']}")


__all__ = ["run_search_bench", "targets"]
