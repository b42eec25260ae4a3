"""The log's full-text index and the hybrid reader: BM25 as FTS5 defines it, against a reference
written out here; the fusion against a naive reference; bad queries; migration; damage."""

from __future__ import annotations

import math
import random
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from linmem import lexical
from linmem.embedders import load_embedder
from linmem.log import Log
from linmem.memory import Memory, open_memory
from linmem.readers.hybrid import LEXICAL_WEIGHT, SECOND_LINE, HybridReader, fuse
from linmem.types import Item

HASH = "hash:61"


def words(rng: random.Random, n: int, vocabulary: int = 40) -> str:
    # Numbers as words: the tokenizer keeps them whole and the stemmer leaves them alone, so the
    # reference below can count terms exactly as FTS5 does.
    return " ".join(str(100 + int(rng.paretovariate(1.2)) % vocabulary) for _ in range(n))


def random_items(rng: random.Random, n: int, clips: int) -> list[Item]:
    return [
        Item(words(rng, rng.randint(1, 13)), clip=rng.randrange(clips) if rng.random() < 0.9 else None)
        for _ in range(n)
    ]


def reference_bm25(docs: dict[int, str], query: str) -> dict[int, float]:
    """BM25 as SQLite's FTS5 computes it (k1 = 1.2, b = 0.75, IDF floored at 1e-6), over
    whitespace tokens, OR of the query's distinct terms."""
    tokens = {i: text.split() for i, text in docs.items()}
    n = len(tokens)
    avgdl = sum(len(t) for t in tokens.values()) / n
    terms = list(dict.fromkeys(query.split()))
    df = {t: sum(1 for toks in tokens.values() if t in toks) for t in terms}
    scores = {}
    for i, toks in tokens.items():
        counts = Counter(toks)
        total = 0.0
        matched = False
        for t in terms:
            if counts[t] == 0:
                continue
            matched = True
            idf = max(math.log((n - df[t] + 0.5) / (df[t] + 0.5)), 1e-6)
            tf = counts[t]
            total += idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(toks) / avgdl))
        if matched:
            scores[i] = total
    return scores


def log_docs(log: Log) -> dict[int, str]:
    return {i.id: i.text for i in log.items() if i.id is not None}


# The lexical module


def test_terms_drop_stopwords_and_quote_everything() -> None:
    assert lexical.terms("What did Caroline research?") == ["caroline", "research"]
    assert lexical.terms("Who is it?") == ["who", "is", "it"]  # all stopwords: keep them
    assert lexical.match('say "hi" NEAR(x) AND y*') == '"say" OR "hi" OR "near" OR "x" OR "y"'
    assert lexical.terms("Café CAFÉ café") == ["café"]
    assert lexical.match("") is None and lexical.match("   \n") is None
    assert lexical.match("😀 🎉 ?!") is None


def test_spaceless_scripts_are_indexed_by_character_and_searched_by_pairs() -> None:
    assert lexical.document("我在北京大学") == " 我  在  北  京  大  学 "
    assert lexical.terms("北京大学") == ["北 京", "京 大", "大 学"]
    assert lexical.terms("去東京") == ["去 東", "東 京"]
    assert lexical.terms("猫") == ["猫"]
    assert lexical.terms("Tokyo東京2024") == ["東 京", "tokyo", "2024"]


def test_long_queries_keep_the_first_terms_only() -> None:
    query = " ".join(f"w{i}" for i in range(5000))
    assert lexical.terms(query) == [f"w{i}" for i in range(lexical.MAX_TERMS)]


# The index in the log


@pytest.mark.parametrize("seed", [3, 17, 101])
def test_log_search_is_bm25_as_defined(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    log = Log(tmp_path / "log.sqlite", create=True)
    log.append(random_items(rng, rng.randint(37, 91), 11))
    for round_ in range(3):
        for _ in range(7):
            query = words(rng, rng.randint(1, 5))
            want = reference_bm25(log_docs(log), query)
            got = log.search(query, 10_000)
            assert {i for i, _ in got} == set(want)
            for item_id, score in got:
                assert score == pytest.approx(want[item_id], rel=1e-9, abs=1e-12)
            scores = [s for _, s in got]
            assert scores == sorted(scores, reverse=True)
            assert log.search(query, 3) == got[:3]
        # Deletions and appends keep the index in step with the items.
        ids = [i.id for i in log.items()]
        log.delete(rng.sample(ids, k=len(ids) // 5 + round_))
        log.append(random_items(rng, rng.randint(1, 17), 11))
        assert log.check_index(full=True) is None


def test_finds_words_by_stem_case_and_diacritics(tmp_path: Path) -> None:
    log = Log(tmp_path / "log.sqlite", create=True)
    log.append([Item("Caroline went HIKING at the Café"), Item("nothing here"), Item("我在北京大学读书")])
    assert [i for i, _ in log.search("hike", 5)] == [1]
    assert [i for i, _ in log.search("cafe", 5)] == [1]
    assert [i for i, _ in log.search("北京", 5)] == [3]
    assert log.search("京北", 5) == []  # the pair in the other order is not there


BAD_QUERIES = [
    '"',
    '"unbalanced',
    "*",
    "hike*",
    "NEAR(a b)",
    "a AND b OR NOT c",
    "text:caroline",
    "{text}: x",
    "((((",
    ")",
    "^start",
    "a + b - c",
    "",
    "   \t\n",
    "😀",
    "😀 hike 🎉",
    "\x00",
    "x" * 100_000,
    " ".join(["hike"] * 20_000),
]


@pytest.mark.parametrize("query", BAD_QUERIES, ids=range(len(BAD_QUERIES)))
def test_fts_syntax_and_odd_queries_are_words(tmp_path: Path, query: str) -> None:
    mine = Log(tmp_path / "a.sqlite", create=True)
    other = Log(tmp_path / "b.sqlite", create=True)
    mine.append([Item('Caroline went hiking; "NEAR" AND text: ( braces )'), Item("a b c")])
    other.append([Item("hike hike hike"), Item("another memory")])
    found = mine.search(query, 50)
    assert {i for i, _ in found} <= {1, 2}
    assert all(s > 0 for _, s in found)
    assert mine.check_index(full=True) is None
    assert [i for i, _ in mine.search("hiking", 5)] == [1]


def test_a_schema_2_log_gets_its_index_on_open(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    log = Log(path, create=True)
    log.append([Item("alpha beta", clip=1), Item("gamma", clip=2)])
    log.close()
    with sqlite3.connect(path) as db:  # as schema 2 left it: no index
        db.execute("DROP TABLE items_fts")
        db.execute("UPDATE info SET value = 2 WHERE key = 'schema'")
    reopened = Log(path)
    assert reopened.check_index(full=True) is None
    assert [i for i, _ in reopened.search("gamma", 5)] == [2]
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM info WHERE key = 'schema'").fetchone()[0] == 3


def test_writes_without_the_index_leave_it_stale_until_an_indexed_open(tmp_path: Path) -> None:
    path = tmp_path / "log.sqlite"
    Log(path, create=True).append([Item("first words")])
    bare = Log(path, index=False)
    bare.append([Item("second words")])
    assert Log(path, index=False).check_index() == "is stale (items were written without it)"
    indexed = Log(path)
    assert indexed.check_index(full=True) is None
    assert sorted(i for i, _ in indexed.search("words", 5)) == [1, 2]


def damage_blocks(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE items_fts_data SET block = zeroblob(length(block)) WHERE id > 10")


def drop_a_row(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM items_fts_docsize WHERE id = (SELECT MIN(id) FROM items_fts_docsize)")


def drop_shadow_table(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE items_fts_idx")


@pytest.mark.parametrize("damage", [damage_blocks, drop_a_row, drop_shadow_table])
def test_a_damaged_index_is_detected_and_rebuilt_from_the_items(tmp_path: Path, damage) -> None:
    path = tmp_path / "log.sqlite"
    rng = random.Random(5)
    log = Log(path, create=True)
    log.append(random_items(rng, 60, 7))
    queries = [words(rng, 3) for _ in range(5)]
    before = [log.search(q, 100) for q in queries]
    log.close()
    damage(path)
    assert Log(path).check_index(full=True) is not None
    reopened = Log(path)
    assert [reopened.search(q, 100) for q in queries] == before
    assert reopened.check_index(full=True) is None


def test_clear_and_delete_empty_the_index(tmp_path: Path) -> None:
    log = Log(tmp_path / "log.sqlite", create=True)
    log.append([Item("one fish"), Item("two fish")])
    log.delete([1])
    assert [i for i, _ in log.search("fish", 5)] == [2]
    log.clear()
    assert log.search("fish", 5) == []
    log.append([Item("red fish")])
    assert [i for i, _ in log.search("fish", 5)] == [3]
    assert log.check_index(full=True) is None


# The hybrid reader


def naive_hybrid(memory: Memory, query: str, embedder_spec: str) -> list[tuple[int | None, float]]:
    """The hybrid ranking written out: BM25 per line, cosine per line, per unit the best line plus
    `SECOND_LINE` times the second (lexical) and the best line (dense), each over its maximum."""
    embedder = load_embedder(embedder_spec)
    items = memory.items()
    bm25 = reference_bm25({i.id: i.text for i in items}, query)  # type: ignore[misc]
    q = embedder.embed([query])[0].astype(np.float64)
    cos = embedder.embed([i.text for i in items]).astype(np.float64) @ q
    units: dict[tuple[str, int], list[int]] = {}
    for r, item in enumerate(items):
        key = ("clip", item.clip) if item.clip is not None else ("item", item.id)
        units.setdefault(key, []).append(r)  # type: ignore[arg-type]
    rows = []
    for (kind, ident), members in units.items():
        lex = sorted((bm25.get(items[r].id, 0.0) for r in members), reverse=True) + [0.0]  # type: ignore[arg-type]
        rows.append((kind, ident, lex[0] + SECOND_LINE * lex[1], max(cos[r] for r in members), members))
    top_l = max(r[2] for r in rows)
    top_d = max(r[3] for r in rows)
    out = []
    for kind, ident, lex_score, dense, members in rows:
        score = (LEXICAL_WEIGHT * lex_score / top_l if top_l > 0 else 0.0) + (
            (1 - LEXICAL_WEIGHT) * dense / top_d if top_d > 0 else 0.0
        )
        first = min(items[r].id for r in members)  # type: ignore[type-var]
        out.append((score, ident if kind == "clip" else None, first))
    big = 2**62
    out.sort(key=lambda t: (-t[0], t[1] if t[1] is not None else big, t[2]))
    return [(clip, score) for score, clip, _ in out]


@pytest.mark.parametrize("seed", [2, 29])
def test_hybrid_rank_and_read_equal_the_naive_reference(seed: int) -> None:
    rng = random.Random(seed)
    memory = open_memory(f"h{seed}", create=True)
    memory.write(random_items(rng, rng.randint(41, 87), 13))
    reader = memory.reader("hybrid", embedder=HASH, top_k=4)
    for _ in range(6):
        query = words(rng, rng.randint(1, 4))
        want = naive_hybrid(memory, query, HASH)
        ranked = [(c, s) for c, s in want if c is not None]
        answer = reader.rank(query, 5)
        assert list(answer.clips) == [c for c, _ in ranked[:5]]
        assert [h.score for h in answer.hits] == pytest.approx([s for _, s in ranked[:5]], abs=1e-5)
        read = reader.read(query)
        assert [h.clip for h in read.hits] == [c for c, _ in want[:4]]
        assert answer.model == f"bm25+{HASH}"
    # Batched answers are the one-by-one answers.
    queries = [words(rng, 3) for _ in range(5)]
    many = reader.rank_many(queries, 3)
    assert [a.clips for a in many] == [reader.rank(q, 3).clips for q in queries]
    assert [a.text for a in reader.read_many(queries)] == [reader.read(q).text for q in queries]


def test_hybrid_follows_writes_and_deletions() -> None:
    memory = open_memory("live", create=True)
    memory.write([Item("the kettle is in the kitchen", clip=1), Item("the car is in the garage", clip=2)])
    reader = memory.reader("hybrid", embedder=HASH)
    assert reader.rank("where is the kettle", 1).clips == (1,)
    memory.write([Item("the passport is in the drawer", clip=3)])
    assert reader.rank("passport", 1).clips == (3,)
    memory.forget([3])
    assert 3 not in reader.rank("passport", 3).clips
    fresh = open_memory("live").reader("hybrid", embedder=HASH)
    assert fresh.rank("kettle kitchen", 2).clips == reader.rank("kettle kitchen", 2).clips


def test_hybrid_returns_fragments_verbatim_with_accounting() -> None:
    memory = open_memory("verbatim", create=True)
    memory.write(
        [Item("Anna: I moved to Lisbon in May 2023.", clip=4, time="day 1"), Item("Ben: nice!", clip=4)]
    )
    memory.write([Item("Anna: my sister lives in Porto.", clip=5)])
    answer = memory.reader("hybrid", embedder=HASH, top_k=1).read("When did Anna move to Lisbon?")
    assert answer.hits[0].clip == 4
    assert answer.hits[0].lines == ("Anna: I moved to Lisbon in May 2023.", "Ben: nice!")
    assert "Lisbon in May 2023" in answer.text
    assert answer.tokens.memory and answer.tokens.processed > 0
    assert answer.clips == (4,)


def test_queries_without_words_still_search_by_meaning() -> None:
    memory = open_memory("emoji", create=True)
    memory.write([Item("🎉 party tonight", clip=1), Item("quiet evening", clip=2)])
    reader = memory.reader("hybrid", embedder=HASH)
    for query in ["🎉", '"', "NEAR(", "x" * 100_000]:
        answer = reader.rank(query, 2)
        assert set(answer.clips) <= {1, 2}
    with pytest.raises(Exception, match="non-empty"):
        reader.rank("   ", 2)


def test_bad_options_name_the_option() -> None:
    memory = open_memory("opts", create=True)
    for options, word in (
        ({"lexical_weight": 1.5}, "lexical_weight"),
        ({"second_line": "x"}, "second_line"),
        ({"rerank": "magic"}, "rerank"),
        ({"model": "tiny:qwen3"}, "rerank='lm'"),
        ({"rerank": "lm", "rerank_depth": 0}, "rerank_depth"),
    ):
        with pytest.raises(Exception, match=word):
            HybridReader(memory, **options)  # type: ignore[arg-type]


def test_fuse_weights_each_half_by_its_best() -> None:
    fused = fuse(np.array([4.0, 2.0, 0.0]), np.array([0.1, 0.2, -0.5], dtype=np.float32), 0.6)
    assert fused == pytest.approx([0.6 + 0.2, 0.3 + 0.4, -1.0], abs=1e-6)
    assert fuse(np.zeros(2), np.array([-0.1, -0.2], dtype=np.float32), 0.6).tolist() == [0.0, 0.0]


def test_lm_rerank_reorders_only_the_candidates() -> None:
    rng = random.Random(8)
    memory = open_memory("rerank", create=True)
    memory.write(random_items(rng, 40, 9))
    plain = memory.reader("hybrid", embedder=HASH)
    reranked = memory.reader("hybrid", embedder=HASH, rerank="lm", model="tiny:qwen3", rerank_depth=4)
    query = words(rng, 3)
    base = plain.rank(query, 9).clips
    answer = reranked.rank(query, 9)
    assert sorted(answer.clips[:4]) == sorted(base[:4])
    assert answer.clips[4:] == base[4:]
    assert any("re-ranked the best 4 clips with tiny:qwen3" in n for n in answer.notes)


ENGLISH = (
    "Caroline Melanie hiking hiked hikes painting painted sunrise lake adoption agency counseling "
    "career support group running runs ran camping beach pottery class kids dog cats 2023 May Paris "
    "café naïve don't it's the a of and to in"
).split()


def english(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(ENGLISH) for _ in range(n))


@pytest.mark.parametrize("seed", [4, 23])
def test_in_ram_bm25_is_the_logs_fts5(seed: int) -> None:
    """The fast path (postings in RAM) against FTS5's own bm25(), through writes, deletions and
    a reload, with stemming, diacritics, apostrophes (phrases) and repeated terms."""
    from linmem.readers.bm25 import LexicalIndex

    rng = random.Random(seed)
    memory = open_memory(f"bm{seed}", create=True)
    memory.write([Item(english(rng, rng.randint(0, 15)) or "🎉") for _ in range(rng.randint(53, 97))])
    index = LexicalIndex()
    for round_ in range(4):
        index.sync(memory.log)
        for _ in range(9):
            query = english(rng, rng.randint(1, 6))
            got, want = index.search(memory.log, query, 10_000), memory.log.search(query, 10_000)
            assert [i for i, _ in got] == [i for i, _ in want], query
            assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-12)
            assert index.search(memory.log, query, 7) == got[:7]
        if round_ == 1:
            memory.forget(rng.sample([i.id for i in memory.items()], 9))  # the copy is read again
        else:
            memory.write([Item(english(rng, rng.randint(1, 11))) for _ in range(rng.randint(1, 19))])


def test_int8_scores_stay_within_their_bound() -> None:
    from linmem.readers.int8 import quantize

    rng = np.random.default_rng(11)
    for rows, dim in ((1, 7), (977, 61), (5003, 384)):
        matrix = rng.standard_normal((rows, dim)).astype(np.float32)
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        packed = quantize(matrix[: rows - rows // 3])
        assert packed is not None, "FBGEMM is part of every x86 torch build"
        for _ in range(5):
            q = rng.standard_normal(dim).astype(np.float32)
            q /= np.linalg.norm(q)
            approx, bound = packed.scores(matrix, q)
            error = np.abs(approx.astype(np.float64) - matrix.astype(np.float64) @ q)
            assert error.max() <= bound
            assert np.all(error[packed.packed :] < 1e-5)  # the rows added since are exact
            assert bound < 0.2


@pytest.mark.parametrize("seed", [6, 31])
def test_int8_prefilter_gives_the_exact_ranking(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from linmem.readers import hybrid

    rng = random.Random(seed)
    memory = open_memory(f"q{seed}", create=True)
    memory.write(random_items(rng, rng.randint(301, 677), rng.randint(23, 97)))
    exact = memory.reader("hybrid", embedder="hash:47", top_k=5)
    queries = [words(rng, rng.randint(1, 4)) for _ in range(12)] + ["🎉"]
    want = [(exact.rank(q, 7), exact.read(q)) for q in queries]
    monkeypatch.setattr(hybrid, "QUANTIZE_FROM", 1)
    fast = exact  # the same reader, now past the threshold
    for q, (rank, read) in zip(queries, want, strict=True):
        got = fast.rank(q, 7)
        assert got.clips == rank.clips
        assert [h.score for h in got.hits] == pytest.approx([h.score for h in rank.hits], abs=1e-6)
        assert [h.clip for h in fast.read(q).hits] == [h.clip for h in read.hits]
    memory.write(random_items(rng, 50, 11))  # rows past the packed ones are scored exactly
    q = words(rng, 3)
    assert fast.rank(q, 7).clips == naive_top(memory, q, "hash:47", 7)


def naive_top(memory: Memory, query: str, spec: str, k: int) -> tuple[int, ...]:
    return tuple(c for c, _ in naive_hybrid(memory, query, spec) if c is not None)[:k]
