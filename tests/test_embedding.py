"""The embedding reader and the embedders: real MiniLM retrieval, exactness against a naive
reference, the incremental and persistent vector cache, corruption recovery, and the
OpenAI-compatible embedder against a real loopback server."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from openai_server import OpenAIServer

from linmem import progress
from linmem.embedders import (
    DEFAULT_EMBEDDER,
    Embedder,
    HashEmbedder,
    MemoEmbedder,
    OpenAIEmbedder,
    SentenceTransformerEmbedder,
    _split_total,
    load_embedder,
)
from linmem.errors import BadInput, EmptyMemory, EngineError, ModelUnavailable, UnknownSpec
from linmem.memory import Memory, open_memory
from linmem.readers import embedding
from linmem.readers.embedding import EmbeddingReader, safe_file_stem
from linmem.types import Answer, Item

HOUSEHOLD = [
    Item("Anna puts her car keys in the top drawer of the hallway cabinet.", clip=0, time="07:50"),
    Item("She closes the drawer and takes her coat from the hook.", clip=0, time="07:51"),
    Item("Ben waters the basil and the tomato plants on the kitchen windowsill.", clip=1, time="08:10"),
    Item("Chloe boils water and cooks pasta with tomato sauce for dinner.", clip=2, time="18:30"),
    Item("She grates parmesan over the plates.", clip=2, time="18:45"),
    Item("Ben feeds the cat and refills its water bowl.", clip=3, time="19:00"),
    Item("Anna folds the laundry and stacks the towels in the bathroom cupboard.", clip=4, time="20:15"),
    Item("Chloe leaves her phone charging on the desk in the study.", clip=5, time="22:00"),
    Item("The wifi password is written on a sticker on the fridge.", clip=None, time="2024-05-01"),
]

QUESTIONS = [
    ("Where did Anna leave her keys?", 0),
    ("Who watered the plants?", 1),
    ("What did Chloe make for dinner?", 2),
    ("Who fed the cat?", 3),
    ("Where are the towels kept?", 4),
    ("Where is Chloe's phone?", 5),
]


class CountingEmbedder:
    """A real Embedder that records every text it is asked to embed, delegating to another."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.id = inner.id
        self.dim = inner.dim
        self.embedded: list[str] = []

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.embedded += list(texts)
        return self.inner.embed(texts)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.inner.count_tokens(texts)


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return load_embedder(None)


def household(name: str = "house") -> Memory:
    memory = open_memory(name, create=True)
    memory.write(HOUSEHOLD)
    return memory


def cache_file(memory: Memory, embedder: Embedder) -> Path:
    return memory.cache_dir / "embeddings" / f"{safe_file_stem(embedder.id)}.sqlite"


def reopen(memory: Memory) -> Memory:
    memory.close()
    return open_memory(memory.name)


def summary(answer: Answer) -> list[tuple[int | None, float, tuple[int, ...]]]:
    return [(h.clip, round(h.score, 5), h.item_ids) for h in answer.hits]


# --- embedders ---------------------------------------------------------------------------------


def test_default_embedder_is_packaged_minilm_loaded_once(minilm: Embedder) -> None:
    assert isinstance(minilm, MemoEmbedder) and isinstance(minilm.inner, SentenceTransformerEmbedder)
    assert minilm.id == DEFAULT_EMBEDDER and minilm.dim == 384
    for alias in ("minilm", "st:all-MiniLM-L6-v2", "st:sentence-transformers/all-MiniLM-L6-v2"):
        assert load_embedder(alias) is minilm
    vectors = minilm.embed(["a cat on a mat", "keys in a drawer", "x"])
    assert vectors.dtype == np.float32 and vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    counts = minilm.count_tokens(["a cat on a mat", "word " * 1000])
    assert counts[0] == 7  # five words plus [CLS] and [SEP]
    assert counts[1] == 256  # truncated at the model's max_seq_length, as the model sees it


def test_unknown_specs_are_refused_with_the_accepted_forms() -> None:
    for spec in ("bogus:thing", "openai:http://localhost:1/v1", "openai:localhost#m", "hash:x", "st:"):
        with pytest.raises(UnknownSpec, match="openai:http://host:port/v1#MODEL"):
            load_embedder(spec)


def test_missing_sentence_transformer_says_how_to_get_it() -> None:
    with pytest.raises(ModelUnavailable, match="download"):
        SentenceTransformerEmbedder("no-such-org/no-such-model-xyz")


def test_hash_embedder_is_batch_independent() -> None:
    embedder = load_embedder("hash:64")
    texts = ["one two", "two three four", "!!!", "one two"]
    together = embedder.embed(texts)
    alone = np.concatenate([embedder.embed([t]) for t in texts])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(together[0], together[3])


# --- retrieval with the real model -------------------------------------------------------------


def test_minilm_finds_the_right_clip(minilm: Embedder) -> None:
    memory = household()
    for question, clip in QUESTIONS:
        assert memory.rank(question, k=3, backend="embedding").clips[0] == clip, question


def test_read_returns_whole_clips_verbatim(minilm: Embedder) -> None:
    memory = household()
    answer = memory.ask("Where did Anna leave her keys?", backend="embedding", top_k=2)
    assert answer.model == DEFAULT_EMBEDDER
    assert answer.clips[0] == 0 and len(answer.hits) == 2
    first = answer.hits[0]
    assert first.lines == (HOUSEHOLD[0].text, HOUSEHOLD[1].text) and first.item_ids == (1, 2)
    assert answer.text.startswith(
        "[CLIP 0 | 07:50]\n" + HOUSEHOLD[0].text + "\n(07:51) " + HOUSEHOLD[1].text + "\n\n[CLIP "
    )
    assert answer.hits[0].score >= answer.hits[1].score
    lines = sum(minilm.count_tokens([i.text for i in HOUSEHOLD]), 0)
    query = minilm.count_tokens(["Where did Anna leave her keys?"])[0]
    assert answer.tokens.memory == lines
    assert answer.tokens.processed == query + lines and answer.tokens.cached == 0
    assert answer.timings.prefill_s is not None and answer.timings.query_s is not None


def test_unclipped_item_is_its_own_hit_but_never_ranked(minilm: Embedder) -> None:
    memory = household()
    answer = memory.ask("What is the wifi password?", backend="embedding")
    assert answer.hits[0].clip is None and answer.hits[0].item_ids == (9,)
    assert answer.text.startswith("[NOTE | 2024-05-01]\n" + HOUSEHOLD[8].text)
    assert None not in answer.clips and len(answer.clips) == len(answer.hits) - 1
    ranked = memory.rank("What is the wifi password?", k=10, backend="embedding")
    assert sorted(ranked.clips) == [0, 1, 2, 3, 4, 5]
    assert all(h.clip is not None for h in ranked.hits)


def test_threshold_and_top_k(minilm: Embedder) -> None:
    memory = household()
    question = "Who fed the cat?"
    assert len(memory.ask(question, backend="embedding", top_k=1).hits) == 1
    assert len(memory.ask(question, backend="embedding", top_k=20).hits) == len(HOUSEHOLD) - 2
    best = memory.ask(question, backend="embedding").hits[0].score
    strict = memory.ask(question, backend="embedding", threshold=best)
    assert [h.clip for h in strict.hits] == [3]
    nothing = memory.ask(question, backend="embedding", threshold=0.999)
    assert nothing.hits == () and nothing.clips == () and nothing.text == ""
    assert any("threshold" in note for note in nothing.notes)
    # rank ignores the threshold
    assert len(memory.rank(question, k=4, backend="embedding", threshold=0.999).clips) == 4


# --- exactness: a naive reference is the spec --------------------------------------------------


def random_memory(name: str, n: int, seed: int) -> Memory:
    rng = random.Random(seed)
    words = "red blue cat dog keys drawer pasta garden window kitchen phone laptop coat rain".split()
    items = [
        Item(" ".join(rng.choices(words, k=rng.randint(2, 9))), clip=rng.choice([None, *range(11)]))
        for _ in range(n)
    ]
    memory = open_memory(name, create=True)
    memory.write(items)
    return memory


def naive_rank(embedder: Embedder, items: list[Item], query: str) -> list[tuple[int, float]]:
    vectors = embedder.embed([i.text for i in items]).astype(np.float64)
    q = embedder.embed([query])[0].astype(np.float64)
    best: dict[int, float] = {}
    for item, v in zip(items, vectors, strict=True):
        cosine = float(v @ q / (np.linalg.norm(v) * np.linalg.norm(q)))
        if item.clip is not None:
            best[item.clip] = max(best.get(item.clip, -2.0), cosine)
    return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))


@pytest.mark.parametrize("spec", ["hash:97", DEFAULT_EMBEDDER])
def test_rank_equals_naive_reference(spec: str, minilm: Embedder) -> None:
    embedder = load_embedder(spec)
    memory = random_memory("rand", n=41, seed=7)
    for query in ("the red cat in the kitchen", "keys", "rain on the garden window"):
        expected = naive_rank(embedder, memory.items(), query)
        answer = memory.rank(query, k=100, backend="embedding", embedder=spec)
        assert list(answer.clips) == [clip for clip, _ in expected]
        np.testing.assert_allclose([h.score for h in answer.hits], [s for _, s in expected], atol=1e-5)


@pytest.mark.parametrize(("n", "step"), [(1, 512), (37, 512), (101, 7)])
def test_index_vectors_equal_lines_embedded_alone(
    n: int, step: int, minilm: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index embeds a memory longest first, in steps, in padded batches: each row is still
    its own item's line embedded alone (no padding, no neighbours), to float rounding."""
    monkeypatch.setattr(embedding, "_EMBED_STEP", step)
    model = minilm.inner  # type: ignore[attr-defined]  # the model itself, past the process's memo
    rng = random.Random(n)
    words = "the a red cat sat on mat keys drawer kitchen Anna Ben pasta rain window !".split()
    items = [Item(" ".join(rng.choices(words, k=rng.choice([1, 2, 5, 9, 23, 61])))) for _ in range(n)]
    memory = open_memory(f"alone{n}", create=True)
    memory.write(items)
    reader = EmbeddingReader(memory, embedder=model)
    reader.prepare()
    vectors = reader.index.vectors()
    assert [i.text for i in vectors.items] == [i.text for i in items]  # rows in the items' order
    alone = np.stack([model.embed([i.text])[0] for i in items])
    np.testing.assert_allclose(vectors.matrix(), alone, atol=1e-5, rtol=0)
    # ... and the same vectors as one call in the given order, as the index once made them
    np.testing.assert_allclose(vectors.matrix(), model.embed([i.text for i in items]), atol=1e-5, rtol=0)


def test_a_memorys_embedding_shows_one_labelled_progress(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One task over every line, stepped per saved step (off a terminal: log lines), not a bar
    per embedder call."""
    monkeypatch.setattr(embedding, "_EMBED_STEP", 5)
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setitem(progress._settings, "log_lines", True)
    counter = CountingEmbedder(HashEmbedder(64))
    memory = open_memory("progress", create=True)
    memory.write([Item(f"line number {i} " + "word " * (i % 4)) for i in range(23)])
    memory.rank("line", backend="embedding", embedder=counter)
    lines = capsys.readouterr().err.splitlines()
    assert all(line.startswith("embedding 23 lines (hash:64): ") for line in lines)
    assert [line.split(": ")[1].split()[0] for line in lines] == ["5/23", "10/23", "15/23", "20/23", "23/23"]
    assert len(counter.embedded) == 24  # 23 lines, then the query


def test_sentence_transformer_threads_follow_linmem_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("LINMEM_THREADS", "1")
    try:
        SentenceTransformerEmbedder()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_rank_breaks_ties_by_lower_clip_id() -> None:
    memory = open_memory("ties", create=True)
    memory.write([Item("same words here", clip=7), Item("same words here", clip=2), Item("other", clip=0)])
    answer = memory.rank("same words", k=3, backend="embedding", embedder="hash")
    assert answer.clips[:2] == (2, 7) and answer.hits[0].score == answer.hits[1].score


# --- incremental, persistent cache -------------------------------------------------------------


def test_a_write_embeds_only_the_new_items() -> None:
    counter = CountingEmbedder(HashEmbedder(128))
    memory = household()
    memory.ask("keys", backend="embedding", embedder=counter)
    # The memory's lines go longest first (a padded batch then pads little), then the query.
    assert counter.embedded == sorted((i.text for i in HOUSEHOLD), key=len, reverse=True) + ["keys"]
    counter.embedded.clear()
    new = [Item("Dan repairs the leaking bathroom tap.", clip=6), Item("He dries the floor.", clip=6)]
    memory.write(new)  # the live reader embeds them now
    assert counter.embedded == [i.text for i in new]
    counter.embedded.clear()
    answer = memory.ask("who fixed the tap", backend="embedding", embedder=counter)
    assert counter.embedded == ["who fixed the tap"] and answer.clips[0] == 6
    assert answer.tokens.processed == counter.count_tokens(["who fixed the tap"])[0]
    assert answer.tokens.cached == answer.tokens.memory and answer.timings.prefill_s is None


def test_items_written_elsewhere_are_embedded_at_the_next_read() -> None:
    counter = CountingEmbedder(HashEmbedder(128))
    memory = household()
    memory.ask("keys", backend="embedding", embedder=counter)
    counter.embedded.clear()
    other = open_memory(memory.name)  # another process's handle: no live reader to notify
    other.write([Item("Dan repairs the leaking bathroom tap.", clip=6)])
    answer = memory.ask("tap", backend="embedding", embedder=counter)
    assert counter.embedded == ["Dan repairs the leaking bathroom tap.", "tap"]
    new_tokens = counter.count_tokens(["Dan repairs the leaking bathroom tap."])[0]
    assert answer.tokens.processed == counter.count_tokens(["tap"])[0] + new_tokens
    assert answer.tokens.memory is not None
    assert answer.tokens.cached == answer.tokens.memory - new_tokens
    assert answer.timings.prefill_s is not None and answer.clips[0] == 6


def test_reopened_memory_uses_the_persisted_vectors(minilm: Embedder) -> None:
    memory = household()
    first = memory.ask("Who watered the plants?", backend="embedding")
    assert cache_file(memory, minilm).is_file()
    memory = reopen(memory)
    again = memory.ask("Who watered the plants?", backend="embedding")
    assert again.tokens.cached == again.tokens.memory == first.tokens.memory
    assert again.tokens.processed == minilm.count_tokens(["Who watered the plants?"])[0]
    assert again.timings.prefill_s is None
    assert summary(again) == summary(first)


def test_forgotten_items_leave_results_and_cache() -> None:
    embedder = HashEmbedder(64)
    memory = household()
    memory.ask("keys", backend="embedding", embedder=embedder)
    memory.forget([1, 2])  # all of clip 0
    answer = memory.rank("car keys drawer", k=10, backend="embedding", embedder=embedder)
    assert 0 not in answer.clips and all(1 not in h.item_ids for h in answer.hits)
    with sqlite3.connect(cache_file(memory, embedder)) as db:
        cached = {r[0] for r in db.execute("SELECT item_id FROM vectors")}
    assert cached == {i.id for i in memory.items()}
    memory.clear()
    with pytest.raises(EmptyMemory, match="no items"):
        memory.ask("keys", backend="embedding", embedder=embedder)


def test_rows_of_items_deleted_while_closed_are_dropped_on_open() -> None:
    embedder = HashEmbedder(64)
    memory = household()
    memory.ask("keys", backend="embedding", embedder=embedder)
    memory = reopen(memory)
    memory.forget([6])
    answer = memory.rank("cat", k=10, backend="embedding", embedder=embedder)
    assert 3 not in answer.clips
    with sqlite3.connect(cache_file(memory, embedder)) as db:
        assert db.execute("SELECT COUNT(*) FROM vectors WHERE item_id = 6").fetchone() == (0,)


# --- corruption --------------------------------------------------------------------------------


def garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database" * 200)


def scramble_pages(path: Path) -> None:
    """Overwrite every page after the first (the schema) with noise."""
    data = path.read_bytes()
    noise = random.Random(3).randbytes(len(data) - 4096)
    path.write_bytes(data[:4096] + noise)


def wrong_header(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE header SET value = '17' WHERE key = 'dim'")


def flip_vector_byte(path: Path) -> None:
    """Flip a raw byte of item 4's vector in the file itself: SQLite cannot notice this."""
    with sqlite3.connect(path) as db:
        (blob,) = db.execute("SELECT vector FROM vectors WHERE item_id = 4").fetchone()
    data = bytearray(path.read_bytes())
    at = data.find(blob)
    assert at >= 0
    data[at + 5] ^= 0x40
    path.write_bytes(bytes(data))


def text_hash_mismatch(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE vectors SET text_sha = zeroblob(32) WHERE item_id = 4")


def short_blob(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("UPDATE vectors SET vector = substr(vector, 1, 12) WHERE item_id = 4")


@pytest.mark.parametrize(
    ("damage", "reembedded"),
    [
        (garbage, len(HOUSEHOLD)),
        (scramble_pages, len(HOUSEHOLD)),
        (wrong_header, len(HOUSEHOLD)),
        (flip_vector_byte, 1),
        (text_hash_mismatch, 1),
        (short_blob, 1),
    ],
)
def test_damaged_cache_is_detected_and_rebuilt(damage: Callable[[Path], None], reembedded: int) -> None:
    counter = CountingEmbedder(HashEmbedder(128))
    memory = household()
    before = memory.ask("pasta for dinner", backend="embedding", embedder=counter, top_k=5)
    damage(cache_file(memory, counter))
    memory = reopen(memory)
    counter.embedded.clear()
    after = memory.ask("pasta for dinner", backend="embedding", embedder=counter, top_k=5)
    assert len(counter.embedded) == reembedded + 1
    assert summary(after) == summary(before) and after.text == before.text
    assert after.notes and "embedding cache" in after.notes[0]
    memory = reopen(memory)  # the repaired file serves everything
    counter.embedded.clear()
    assert summary(memory.ask("pasta for dinner", backend="embedding", embedder=counter, top_k=5)) == summary(
        before
    )
    assert counter.embedded == ["pasta for dinner"]


def test_live_reader_rewrites_a_clobbered_cache_from_ram() -> None:
    counter = CountingEmbedder(HashEmbedder(128))
    memory = household()
    before = memory.ask("cat", backend="embedding", embedder=counter)
    garbage(cache_file(memory, counter))
    memory.write([Item("Dan repairs the leaking bathroom tap.", clip=6)])  # persisting finds the damage
    memory = reopen(memory)
    counter.embedded.clear()
    after = memory.ask("cat", backend="embedding", embedder=counter)
    assert counter.embedded == ["cat"] and summary(after) == summary(before)


# --- errors ------------------------------------------------------------------------------------


def test_empty_memory_and_bad_arguments() -> None:
    memory = open_memory("empty", create=True)
    with pytest.raises(EmptyMemory, match="'empty' has no items"):
        memory.ask("anything", backend="embedding", embedder="hash")
    with pytest.raises(EmptyMemory):
        memory.rank("anything", backend="embedding", embedder="hash")
    memory.write(["one note"])
    with pytest.raises(BadInput, match="query"):
        memory.ask("  ", backend="embedding", embedder="hash")
    with pytest.raises(BadInput, match="k must"):
        memory.rank("x", k=0, backend="embedding", embedder="hash")
    with pytest.raises(BadInput, match="top_k"):
        EmbeddingReader(memory, top_k=0)
    with pytest.raises(UnknownSpec):
        memory.ask("x", backend="embedding", embedder="bogus:model")


# --- OpenAI-compatible endpoint ----------------------------------------------------------------


def server_vectors(texts: list[str]) -> list[list[float]]:
    """Deterministic, deliberately unnormalised vectors, as a remote model might return."""
    return (HashEmbedder(48).embed(texts) * 3.0).tolist()


def test_openai_embedder_batches_and_normalises() -> None:
    texts = [f"note number {i} about the garden" for i in range(300)]
    with OpenAIServer(embed=server_vectors) as server:
        embedder = load_embedder(f"openai:{server.url}#emb-model")
        assert isinstance(embedder, MemoEmbedder) and isinstance(embedder.inner, OpenAIEmbedder)
        assert embedder.id == f"openai:{server.url}#emb-model"
        vectors = embedder.embed(texts)
    np.testing.assert_allclose(vectors, HashEmbedder(48).embed(texts), atol=1e-6)
    assert embedder.dim == 48
    sizes = [len(body["input"]) for path, body in server.requests if path == "/v1/embeddings"]
    assert sizes == [256, 44]
    assert all(body["model"] == "emb-model" for _, body in server.requests)
    assert embedder.count_tokens(texts[:2]) == [0, 0]  # this server reports no usage: unknown


def test_openai_reader_matches_the_same_vectors_locally() -> None:
    memory = household()
    local = memory.rank("cat water bowl", k=6, backend="embedding", embedder=HashEmbedder(48))
    with OpenAIServer(embed=server_vectors) as server:
        remote = memory.rank("cat water bowl", k=6, backend="embedding", embedder=f"openai:{server.url}#m")
    assert remote.clips == local.clips
    np.testing.assert_allclose([h.score for h in remote.hits], [h.score for h in local.hits], atol=1e-6)
    assert remote.model == f"openai:{server.url}#m"
    assert remote.tokens.memory is None  # the server reports no usage, so counts are unknown


def test_openai_api_key_and_http_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with OpenAIServer(embed=server_vectors, api_key="sesame") as server:
        with pytest.raises(EngineError, match=r"/v1/embeddings returned HTTP 401"):
            OpenAIEmbedder(server.url, "m").embed(["hello"])
        assert OpenAIEmbedder(server.url, "m", api_key="sesame").embed(["hello"]).shape == (1, 48)
        monkeypatch.setenv("OPENAI_API_KEY", "sesame")
        assert OpenAIEmbedder(server.url, "m").embed(["hello"]).shape == (1, 48)
    with OpenAIServer(embed=None) as server:
        with pytest.raises(EngineError, match="HTTP 404"):
            OpenAIEmbedder(server.url, "m").embed(["hello"])
    url = server.url  # the server is gone: nothing listens there now
    with pytest.raises(EngineError, match=f"{url}/embeddings failed"):
        OpenAIEmbedder(url, "m", timeout_s=5).embed(["hello"])


def test_usage_total_is_split_exactly_by_length() -> None:
    counts = _split_total(10, ["a" * 10, "b" * 30, "c"])
    assert sum(counts) == 10 and counts[1] > counts[0] >= counts[2]
    assert _split_total(None, ["a", "b"]) == [0, 0]


def test_memo_embedder_embeds_each_text_once_and_agrees() -> None:
    inner = HashEmbedder(64)
    calls: list[int] = []

    class Counting:
        id, dim = inner.id, inner.dim

        def embed(self, texts):  # type: ignore[no-untyped-def]
            calls.append(len(texts))
            return inner.embed(texts)

        def count_tokens(self, texts):  # type: ignore[no-untyped-def]
            return inner.count_tokens(texts)

    memo = MemoEmbedder(Counting(), capacity=3)
    texts = ["a b", "c d", "a b", "e f"]
    np.testing.assert_array_equal(memo.embed(texts), inner.embed(texts))
    assert calls == [3]  # duplicates within a batch are embedded once
    np.testing.assert_array_equal(memo.embed(["c d", "e f"]), inner.embed(["c d", "e f"]))
    assert calls == [3]
    memo.embed(["g h", "a b"])  # capacity 3: the least recently used, "c d", makes room
    assert calls == [3, 1]
    memo.embed(["a b", "c d"])
    assert calls == [3, 1, 1]
    assert memo.count_tokens(texts) == inner.count_tokens(texts)
