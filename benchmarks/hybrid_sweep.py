"""How the hybrid reader's fusion and aggregation were chosen: every variant on LoCoMo dev.

    LINMEM_DATA=../shared/data python benchmarks/hybrid_sweep.py

For each retrieval question (categories 1-4, the conversation's sessions as clips) it scores
every session with the lexical half (FTS5 BM25, linmem's tokenizer and query builder) and the
dense half (MiniLM cosine per line), aggregates lines to sessions several ways, fuses the halves
by weighted sum or reciprocal-rank fusion at several weights, and prints Hit@1/5/10 and MRR.
Then leave-one-conversation-out cross-validation of the weighted-sum family: the parameters are
chosen on six conversations and scored on the seventh, which estimates the held-out figures.
"""

from __future__ import annotations

import math
import os
import sqlite3
import sys
from collections import defaultdict

import numpy as np

from linmem import lexical
from linmem.embedders import load_embedder
from linmem.evals.tasks.locomo import LoCoMoTask


def main() -> None:
    data = os.environ.get("LINMEM_DATA")
    if not data:
        sys.exit("set LINMEM_DATA to the folder holding locomo/locomo-dev.json")
    task = LoCoMoTask(f"{data}/locomo/locomo-dev.json", mode="retrieval", categories=[1, 2, 3, 4])
    embedder = load_embedder(None)
    rows = []  # (conversation, gold sessions, session ids, {feature: scores per session})
    for source in dict.fromkeys(e.source for e in task):
        rows += _conversation(task, source, embedder)
    print(f"{len(rows)} questions\n")
    variants: dict[str, object] = {name: (lambda f, name=name: f[name]) for name in rows[0][3]}
    lex, dense = "lexical: best + 0.25 x second", "dense: best line"
    for w in (0.5, 0.6, 0.7, 0.8):
        variants[f"weighted sum w={w}: {lex}, {dense}"] = lambda f, w=w: _wsum(f[lex], f[dense], w)
        variants[f"weighted sum w={w}: lexical best line, {dense}"] = (
            lambda f, w=w: _wsum(f["lexical: best line"], f[dense], w))  # fmt: skip
        variants[f"weighted sum w={w}: whole-session text, {dense}"] = (
            lambda f, w=w: _wsum(f["lexical: whole-session text"], f[dense], w))  # fmt: skip
        for k in (1, 10, 60):
            variants[f"RRF k={k} w={w}: {lex}, {dense}"] = lambda f, w=w, k=k: _rrf(f[lex], f[dense], w, k)
    print("| variant | Hit@1 | Hit@5 | Hit@10 | MRR |\n|---|---|---|---|---|")
    for name, fn in variants.items():
        h1, h5, h10, mrr = _metrics(rows, fn)
        print(f"| {name} | {h1:.1f} | {h5:.1f} | {h10:.1f} | {mrr:.3f} |")
    _cross_validate(rows)


def _conversation(task: LoCoMoTask, source: str, embedder) -> list[tuple]:
    """Every feature of every session, for each retrieval question of one conversation."""
    items = task.items(source)
    clips = np.array([i.clip for i in items])
    sessions = sorted(set(clips.tolist()))
    lines = embedder.embed([i.text for i in items])
    db = sqlite3.connect(":memory:")
    for table in ("line", "session"):
        db.execute(f"CREATE VIRTUAL TABLE {table} USING fts5(t, tokenize='{lexical.TOKENIZER}')")
    line_docs = [(r + 1, lexical.document(i.text)) for r, i in enumerate(items)]
    session_docs = [(c, "\n".join(lexical.document(i.text) for i in items if i.clip == c)) for c in sessions]
    db.executemany("INSERT INTO line (rowid, t) VALUES (?, ?)", line_docs)
    db.executemany("INSERT INTO session (rowid, t) VALUES (?, ?)", session_docs)
    rows = []
    for e in (e for e in task if e.source == source):
        expr = lexical.match(e.question)
        line_bm25 = np.zeros(len(items))
        whole = dict.fromkeys(sessions, 0.0)
        if expr:
            for r, s in db.execute("SELECT rowid, -bm25(line) FROM line WHERE line MATCH ?", (expr,)):
                line_bm25[r - 1] = s
            for c, s in db.execute(
                "SELECT rowid, -bm25(session) FROM session WHERE session MATCH ?", (expr,)
            ):
                whole[c] = s
        cos = lines @ embedder.embed([e.question])[0]
        f = {"lexical: whole-session text": np.array([whole[c] for c in sessions])}
        for name, how in (("best line", "max"), ("best + 0.25 x second", "a.25"), ("best two", "top2"),
                          ("best three", "top3"), ("all lines", "sum")):  # fmt: skip
            f[f"lexical: {name}"] = _aggregate(line_bm25, clips, sessions, how)
        for name, how in (
            ("best line", "max"),
            ("mean of best two", "mean2"),
            ("mean of best three", "mean3"),
        ):
            f[f"dense: {name}"] = _aggregate(cos, clips, sessions, how)
        rows.append((source, set(e.gold_clips), sessions, f))
    return rows


def _aggregate(values: np.ndarray, clips: np.ndarray, sessions: list[int], how: str) -> np.ndarray:
    out = []
    for c in sessions:
        v = np.sort(values[clips == c])[::-1]
        second = v[1] if len(v) > 1 else 0.0
        out.append({"max": v[0], "a.25": v[0] + 0.25 * second, "top2": v[:2].sum(), "top3": v[:3].sum(),
                    "sum": v.sum(), "mean2": v[:2].mean(), "mean3": v[:3].mean()}[how])  # fmt: skip
    return np.array(out)


def _by_best(x: np.ndarray) -> np.ndarray:
    top = x.max()
    return x / top if top > 0 else np.zeros_like(x)


def _wsum(lexical_scores: np.ndarray, dense: np.ndarray, w: float) -> np.ndarray:
    return w * _by_best(lexical_scores) + (1 - w) * _by_best(dense)


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.lexsort((np.arange(len(x)), -x))
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    return r


def _rrf(a: np.ndarray, b: np.ndarray, w: float, k: int) -> np.ndarray:
    return w / (k + _ranks(a) + 1) + (1 - w) / (k + _ranks(b) + 1)


def _metrics(rows, fn, only=None) -> tuple[float, float, float, float]:
    hits = {1: 0, 5: 0, 10: 0}
    mrr, n = 0.0, 0
    for source, gold, sessions, f in rows:
        if only is not None and source not in only:
            continue
        scores = fn(f)
        order = [sessions[i] for i in np.lexsort((np.array(sessions), -scores))]
        first = next((i for i, c in enumerate(order) if c in gold), math.inf)
        for k in hits:
            hits[k] += first < k
        mrr += 1 / (first + 1) if first < math.inf else 0.0
        n += 1
    return 100 * hits[1] / n, 100 * hits[5] / n, 100 * hits[10] / n, mrr / n


def _cross_validate(rows) -> None:
    def lex(f, a):  # best line + a x second best
        return (
            f["lexical: best line"]
            + a * (f["lexical: best + 0.25 x second"] - f["lexical: best line"]) / 0.25
        )

    family = {(a, w): (lambda f, a=a, w=w: _wsum(lex(f, a), f["dense: best line"], w))
              for a in (0.0, 0.25, 0.5, 1.0) for w in (0.4, 0.5, 0.6, 0.7, 0.8)}  # fmt: skip
    sources = sorted({r[0] for r in rows})
    counts = defaultdict(int)
    for r in rows:
        counts[r[0]] += 1
    totals = np.zeros(4)
    print("\nleave-one-conversation-out (weighted sum; second-line weight a, lexical weight w):")
    for held in sources:
        train = set(sources) - {held}

        def fit(p, train=train):  # MRR, Hit@5 breaking ties
            m = _metrics(rows, family[p], train)
            return m[3] + m[1] / 100

        best = max(family, key=fit)
        m = _metrics(rows, family[best], {held})
        totals += counts[held] * np.array(m)
        chose = f"a={best[0]} w={best[1]}"
        print(f"  {held}: chose {chose}; held-out Hit@1 {m[0]:.1f}, Hit@5 {m[1]:.1f}, MRR {m[3]:.3f}")
    t = totals / sum(counts.values())
    print(f"  pooled held-out: Hit@1 {t[0]:.1f}, Hit@5 {t[1]:.1f}, Hit@10 {t[2]:.1f}, MRR {t[3]:.3f}")


if __name__ == "__main__":
    main()
