"""Batched reads are exact: several queries read from one snapshot in one batch give the answers,
logits and accounting of the same reads one by one.

The reference is the one-by-one path (`advance` on a fork, then `greedy`), on tiny random models
of the three architectures, over fresh random memories and queries of odd, different lengths.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from datagen import locomo

from linmem import prompts
from linmem.errors import ContextOverflow
from linmem.evals.config import load_config
from linmem.evals.run import RESULTS, run_eval
from linmem.memory import open_memory
from linmem.readers.embedding import EmbeddingReader
from linmem.readers.lm import LMReader
from linmem.types import Item

ARCHS = ["tiny:kimi-linear", "tiny:qwen3.5", "tiny:qwen3"]
WORDS = "mug kitchen Alice Bob cupboard red plant window keys drawer pasta laptop sofa coat door".split()


def random_memory(rng: random.Random, n: int, name: str = "m") -> Any:
    mem = open_memory(name, create=True)
    mem.write(
        [
            Item(" ".join(rng.choices(WORDS, k=rng.randint(3, 17))) + ".", clip=i // 2, time=f"{i:02d}:00")
            for i in range(n)
        ]
    )
    return mem


def random_queries(rng: random.Random, n: int) -> list[str]:
    """`n` questions of different word counts, odd ones among them, and one asked twice."""
    counts = rng.sample(range(1, 24), n - 1)
    queries = [" ".join(rng.choices(WORDS, k=c)) + "?" for c in counts]
    return [*queries, queries[1]]


def state(engine: Any, cache: Any) -> dict[str, torch.Tensor]:
    tensors, _ = engine.cache_to_tensors(cache)
    return {k: v.clone() for k, v in tensors.items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_by_one(engine: Any, base: Any, tail: list[int], max_new: int) -> tuple[torch.Tensor, list, list[int]]:
    """The reference: prompt logits at every tail position, the logits each token was picked
    from, and the tokens, from a fork of `base` as a single read runs it."""
    cache = engine.fork(base)
    prompt = engine.advance(cache, tail, keep=len(tail))
    picked: list[torch.Tensor] = []

    def pick(row: torch.Tensor) -> int:
        picked.append(row)
        return int(row.argmax())

    tokens = engine._decode_loop(cache, prompt, max_new, pick)
    return prompt, picked, tokens


def assert_same_decoding(ref: list, ref_tokens: list[int], got: list, got_tokens: list[int]) -> None:
    """Logits within 1e-4 at every step; the same token wherever the reference's top two are
    more than 1e-3 apart. Only a closer tie may send the two on different paths."""
    for step, (a, b) in enumerate(zip(ref, got, strict=False)):
        assert (a - b).abs().max().item() < 1e-4, f"step {step}"
        if int(a.argmax()) != int(b.argmax()):
            top = a.topk(2).values
            assert (top[0] - top[1]).item() <= 1e-3, f"step {step}: tokens differ without a near-tie"
            return
    assert got_tokens == ref_tokens and len(got) == len(ref)


def stem_state(reader: LMReader) -> tuple[Any, Any]:
    """The reader's snapshot, and its state after the instruction of a read."""
    prompt = prompts.read_prompt([], "")
    assert reader.store is not None
    snap, _ = reader.store.get(reader.memory.log)
    base, _ = reader._after_stem(snap, prompt.stem, reader.engine.stem_ids(prompt))
    return snap, base


def stopped_lengths(rows: list[list[int]], token: int) -> set[int]:
    return {row.index(token) if token in row else len(row) for row in rows}


def tails_that_part(engine: Any, base: Any, rng: random.Random, max_new: int) -> tuple[list[list[int]], int]:
    """Random tails of different lengths (one repeated), and an end token that stops their greedy
    answers after different numbers of steps, so that rows leave the batch mid-decoding.

    The tails are random token ids: chat-templated questions all end "<|im_start|>assistant\n",
    and the random models mostly answer that the same whatever came before. Even random tails
    now and then all get one answer; then another draw is taken."""
    for _ in range(20):
        tails = [[rng.randrange(256) for _ in range(n)] for n in rng.sample(range(1, 40), 6)]
        tails.append(list(tails[2]))
        probe = engine.greedy_rows(engine.advance_rows(base, tails), max_new)
        stop = max(sorted({t for row in probe for t in row}), key=lambda t: len(stopped_lengths(probe, t)))
        if len(stopped_lengths(probe, stop)) > 1:
            return tails, stop
    raise AssertionError("20 draws of random tails all got the same answer")


@pytest.mark.parametrize("spec", ARCHS)
def test_rows_equal_one_by_one_at_every_position(spec: str) -> None:
    rng = random.Random()
    mem = random_memory(rng, rng.randint(9, 31))
    reader = LMReader(mem, model=spec, persist=False)
    engine = reader.engine
    snap, base = stem_state(reader)
    before = (state(engine, snap.cache), state(engine, base))
    max_new = 11
    tails, stop = tails_that_part(engine, base, rng, max_new)
    engine = copy.copy(engine)
    engine.stop_ids = {*engine.stop_ids, stop}

    rows = engine.advance_rows(base, tails, keep=max(len(t) for t in tails))
    trace: list[list[torch.Tensor]] = [[] for _ in tails]
    outs = engine.greedy_rows(rows, max_new, trace=trace)
    assert len({len(o) for o in outs}) > 1
    for i, tail in enumerate(tails):
        prompt, picked, tokens = one_by_one(engine, base, tail, max_new)
        assert rows.logits[i].shape == prompt.shape == (1, len(tail), engine.model.config.vocab_size)
        assert (rows.logits[i] - prompt).abs().max().item() < 1e-4
        assert_same_decoding(picked, tokens, trace[i], outs[i])
    assert same_state(before[0], state(engine, snap.cache))
    assert same_state(before[1], state(engine, base))


@pytest.mark.parametrize("spec", ["tiny:qwen3.5", "tiny:qwen3"])
def test_a_batch_of_one_and_of_equal_lengths(spec: str) -> None:
    rng = random.Random()
    reader = LMReader(random_memory(rng, 13), model=spec, persist=False)
    engine = reader.engine
    _, base = stem_state(reader)
    tail = engine.tail_ids(prompts.read_prompt([], "Where is the red mug?"))
    for tails in ([tail], [tail, list(tail), list(tail)]):
        trace: list[list[torch.Tensor]] = [[] for _ in tails]
        rows = engine.advance_rows(base, tails, keep=len(tail))
        outs = engine.greedy_rows(rows, 9, trace=trace)
        prompt, picked, tokens = one_by_one(engine, base, tail, 9)
        for i in range(len(tails)):
            assert (rows.logits[i] - prompt).abs().max().item() < 1e-4
            assert_same_decoding(picked, tokens, trace[i], outs[i])


def assert_same_answers(many: list, single: list) -> None:
    assert len(many) == len(single)
    for a, b in zip(many, single, strict=True):
        assert (a.text, a.clips, a.model, a.tokens, a.notes) == (b.text, b.clips, b.model, b.tokens, b.notes)
        assert a.hits == b.hits


@pytest.mark.parametrize("spec", ARCHS)
def test_read_many_equals_reads_one_by_one(spec: str) -> None:
    rng = random.Random()
    mem = random_memory(rng, rng.randint(7, 25))
    # Readers of one memory share its snapshot store; the one-by-one reference reads a twin
    # memory of the same items, so that each pays for its own snapshot and instructions.
    twin = open_memory("twin", create=True)
    twin.write([replace(i, id=None) for i in mem.items()])
    queries = random_queries(rng, 6)
    batched = LMReader(mem, model=spec, max_new_tokens=10, persist=False)
    alone = LMReader(twin, model=spec, max_new_tokens=10, persist=False)
    assert batched.store is not alone.store
    many = batched.read_many(queries)
    assert_same_answers(many, [alone.read(q) for q in queries])
    # The first answer carries the snapshot and the instruction; the others only their question.
    memory = many[0].tokens.memory
    assert memory is not None and many[0].tokens.processed > memory > many[1].tokens.processed
    assert many[0].timings.prefill_s and many[1].timings.prefill_s == 0.0
    snap, base = stem_state(batched)
    before = (state(batched.engine, snap.cache), state(batched.engine, base))
    assert_same_answers(batched.rank_many(queries[:4], 3), [alone.rank(q, 3) for q in queries[:4]])
    assert_same_answers(batched.read_many(queries[2:3]), [alone.read(queries[2])])
    assert batched.read_many([]) == []
    snap_after, base_after = stem_state(batched)
    assert snap_after is snap and base_after is base
    assert same_state(before[0], state(batched.engine, snap.cache))
    assert same_state(before[1], state(batched.engine, base))


def test_byte_budget_splits_a_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from linmem.engines import hf

    rng = random.Random()
    mem = random_memory(rng, 11)
    queries = random_queries(rng, 7)
    alone = LMReader(mem, model="tiny:qwen3.5", max_new_tokens=6, persist=False)
    single = [alone.read(q) for q in queries]
    batched = LMReader(mem, model="tiny:qwen3.5", max_new_tokens=6, persist=False)
    _, base = stem_state(batched)
    unsplit = batched.engine.batch_size(base, 64)
    monkeypatch.setattr(hf, "BATCH_BYTES", hf.BATCH_BYTES * 2 / unsplit)
    assert batched.engine.batch_size(base, 64) == 2
    batched = LMReader(mem, model="tiny:qwen3.5", max_new_tokens=6, persist=False)
    assert batched.store is not None
    batched.store.drop()
    assert_same_answers(batched.read_many(queries), single)


def test_read_many_that_does_not_fit_fails_as_reads_would() -> None:
    mem = random_memory(random.Random(), 5)
    queries = ["Where are the keys?", "Where is it? " * 90]

    def reader() -> LMReader:
        return LMReader(mem, model="tiny:qwen3.5", context_length=1400, max_new_tokens=8, persist=False)

    assert len(reader().read_many(queries[:1] * 2)) == 2
    with pytest.raises(ContextOverflow) as alone:
        one = reader()
        [one.read(q) for q in queries]
    with pytest.raises(ContextOverflow) as batched:
        reader().read_many(queries)
    assert str(batched.value) == str(alone.value)


def test_embedding_read_many_equals_reads_one_by_one() -> None:
    seed = random.randrange(10**9)
    # Two copies of one memory: each reader embeds it itself, rather than finding the other's vectors on disk.
    mem, twin = (random_memory(random.Random(seed), 40, name) for name in ("a", "b"))
    queries = random_queries(random.Random(seed), 6)
    batched, alone = (
        EmbeddingReader(mem, embedder="hash", top_k=3),
        EmbeddingReader(twin, embedder="hash", top_k=3),
    )
    assert_same_answers(batched.read_many(queries), [alone.read(q) for q in queries])
    assert_same_answers(batched.rank_many(queries, 4), [alone.rank(q, 4) for q in queries])
    assert batched.rank_many([], 2) == []


EVAL = """
title = "batched"
table = "locomo_retrieval"
[[tasks]]
label = "ret"
name = "locomo"
path = "{path}"
mode = "retrieval"
[[tasks]]
label = "qa"
name = "locomo"
path = "{path}"
mode = "qa"
[[systems]]
name = "lm"
model = "tiny:qwen3.5"
max_new_tokens = 6
[[systems]]
name = "hash"
backend = "embedding"
embedder = "hash"
[run]
k = [1, 2]
batch = {batch}
"""


def test_eval_results_do_not_depend_on_the_batch(tmp_path: Path) -> None:
    path = locomo(tmp_path / "locomo.json", conversations=1, sessions=4)

    def records(batch: int) -> list[dict]:
        config_path = tmp_path / f"b{batch}.toml"
        config_path.write_text(EVAL.format(path=path, batch=batch))
        out = tmp_path / f"out{batch}"
        run_eval(load_config(config_path), out=out)
        lines = [json.loads(x) for x in (out / RESULTS).read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "timings"} for r in lines]

    one, three = records(1), records(3)
    assert len(one) == 2 * 2 * 5 and all("error" not in r for r in one)
    assert one == three


def test_timing_batched_vs_one_by_one() -> None:
    """Not an assertion on speed: prints what batching buys on this machine."""
    rng = random.Random(0)
    mem = random_memory(rng, 55)  # about 4,500 tokens
    queries = random_queries(rng, 8)
    reader = LMReader(mem, model="tiny:qwen3.5", max_new_tokens=24, persist=False)
    warm = reader.read_many(["warm up", "the snapshot and the batched path"])[0]
    t0 = time.perf_counter()
    single = [reader.read(q) for q in queries]
    t1 = time.perf_counter()
    many = reader.read_many(queries)
    t2 = time.perf_counter()
    assert [a.text for a in many] == [a.text for a in single]
    print(
        f"\ntiny:qwen3.5, {warm.tokens.memory}-token memory, 8 queries x 24 new tokens: "
        f"one by one {t1 - t0:.2f}s, read_many {t2 - t1:.2f}s ({(t1 - t0) / (t2 - t1):.1f}x)"
    )
