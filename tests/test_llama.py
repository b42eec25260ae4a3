"""The llama.cpp engine: exact snapshots on real weights (SmolLM2-135M) and on a hybrid (a tiny
random Qwen3.5 GGUF), model lookup, and bad model files."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import needs
import pytest

llama_cpp = needs.llama_cpp()

from linmem import prompts  # noqa: E402
from linmem.engines import load_engine  # noqa: E402
from linmem.engines.llama import LlamaEngine, load_gguf, local_models, resolve  # noqa: E402
from linmem.errors import ContextOverflow, ModelUnavailable  # noqa: E402
from linmem.memory import open_memory  # noqa: E402
from linmem.readers.lm import LMReader  # noqa: E402
from linmem.types import Item  # noqa: E402

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOMS = ["kitchen", "hallway", "study", "garden", "garage", "bedroom", "attic"]
THINGS = ["red mug", "car keys", "blue scarf", "laptop", "fern", "toolbox", "umbrella"]


def _smol_path() -> Path | None:
    for folder in (os.environ.get("LINMEM_MODELS"), Path.home() / ".cache/linmem-models"):
        if folder and (Path(folder) / SMOL).is_file():
            return Path(folder) / SMOL
    return None


@pytest.fixture(scope="module")
def smol() -> str:
    path = _smol_path()
    if path is None:
        if os.environ.get("LINMEM_REQUIRE_GGUF"):
            pytest.fail(f"{SMOL} is missing: run ../shared/models/get-models --small")
        pytest.skip(f"{SMOL} not found (../shared/models/get-models --small writes it)")
    return f"gguf:{path}"


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("gguf")
    from tinygguf import build_gguf

    path = build_gguf(tmp_path_factory.mktemp("gguf") / "tiny-qwen35.gguf", "qwen35")
    return f"gguf:{path}"


def _items(rng: random.Random, n: int, start: int = 0) -> list[Item]:
    return [
        Item(f"Someone puts the {rng.choice(THINGS)} in the {rng.choice(ROOMS)}.", clip=start + i)
        for i in range(n)
    ]


@pytest.mark.parametrize("which", ["smol", "hybrid"])
def test_snapshot_reads_equal_stateless_reads(which: str, request: pytest.FixtureRequest) -> None:
    """Prefill once, then every read runs only its question: the same greedy tokens as a full
    re-read; extending by a write equals reading the longer memory from scratch; a read leaves
    the snapshot's bytes unchanged."""
    spec = request.getfixturevalue(which)
    rng = random.Random(f"llama-{which}")
    mem = open_memory("m", create=True)
    mem.write(_items(rng, rng.randrange(9, 14)))
    cached = LMReader(mem, model=spec, max_new_tokens=12)
    full = LMReader(mem, model=spec, max_new_tokens=12, stateless=True)
    assert not cached.stateless and cached.engine is full.engine
    for query in ("Where is the red mug?", "What is in the garden?"):
        a, b = cached.read(query), full.read(query)
        assert a.text == b.text and a.tokens.generated == b.tokens.generated
    assert cached.store is not None
    snap = cached.store.current()
    assert snap is not None
    before = cached.engine.cache_to_tensors(snap.cache)[0]["state"].clone()
    cached.rank("Which clips show the laptop?", k=3)
    assert cached.engine.cache_to_tensors(snap.cache)[0]["state"].equal(before)

    mem.write(_items(rng, rng.randrange(2, 5), start=100))
    cached.on_write([])
    a = cached.read("Where is the toolbox?")
    tail = cached.engine.tail_ids(prompts.read_prompt([], "Where is the toolbox?"))
    assert a.tokens.processed == len(tail) and "up to date" in a.notes[0]  # only the question ran
    assert a.text == full.read("Where is the toolbox?").text


def test_snapshot_persists_and_is_checked_on_load(smol: str) -> None:
    mem = open_memory("m", create=True)
    mem.write(_items(random.Random(3), 7))
    first = LMReader(mem, model=smol, max_new_tokens=10).read("Where is the fern?")
    # A fresh store (as in a new process) loads the snapshot from disk instead of prefilling.
    again = LMReader(mem, model=smol, max_new_tokens=10, persist=True)
    assert again.store is not None
    again.store.drop()
    second = again.read("Where is the fern?")
    assert "loaded from disk" in second.notes[0] and second.text == first.text
    question = prompts.read_prompt([], "Where is the fern?")
    # Only the instruction and the question ran, not the memory.
    assert second.tokens.processed == len(again.engine.stem_ids(question) + again.engine.tail_ids(question))

    # Damaged state bytes: rebuilt from the log, same answer.
    folder = next((mem.cache_dir / "state").iterdir())
    header = json.loads((folder / "header.json").read_text())
    fixed = folder / header["fixed"]["file"]
    data = bytearray(fixed.read_bytes())
    data[-100] ^= 0xFF
    fixed.write_bytes(bytes(data))
    again.store.drop()
    third = again.read("Where is the fern?")
    assert "corrupt" in third.notes[0] and third.text == first.text


def test_a_snapshot_of_another_model_file_is_not_used(hybrid: str, tmp_path: Path) -> None:
    """A snapshot made by another file of the same name (other weights) copied under this
    model's folder fails the identity check, and the memory is read again from the log."""
    from tinygguf import build_gguf

    (tmp_path / "other").mkdir()
    other = build_gguf(tmp_path / "other" / Path(hybrid).name, "qwen35", seed=1)
    mem = open_memory("m", create=True)
    mem.write(_items(random.Random(4), 6))
    ours = LMReader(mem, model=hybrid, max_new_tokens=8)
    want = ours.read("Where is the umbrella?").text
    LMReader(mem, model=f"gguf:{other}", max_new_tokens=8).read("Where is the umbrella?")
    state = mem.cache_dir / "state"
    assert ours.store is not None
    theirs = next(d for d in state.iterdir() if d != ours.store.path)
    shutil.rmtree(ours.store.path)
    shutil.copytree(theirs, ours.store.path)
    ours.store.drop()
    got = ours.read("Where is the umbrella?")
    assert "stale (fingerprint differs)" in got.notes[0] and got.text == want


def test_memory_longer_than_the_context(smol: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINMEM_CONTEXT", "256")
    path = resolve(smol.removeprefix("gguf:"))
    engine = load_gguf(str(path))
    assert engine.context_length == 256
    mem = open_memory("m", create=True)
    mem.write(_items(random.Random(5), 30))
    reader = LMReader(mem, model=smol, max_new_tokens=8)
    reader.engine = engine  # this engine's small context, not the shared one's
    with pytest.raises(ContextOverflow, match=r"the memory is \d+ tokens"):
        reader.read("Where is the laptop?")
    with pytest.raises(ContextOverflow, match="reads at most 256"):
        engine.generate(prompts.read_prompt([i.text for i in mem.log.items()], "?"), max_new_tokens=8)


def test_decoding_continues_a_state_exactly(smol: str) -> None:
    """Greedy tokens from a forked, restored state equal those of one straight run, and a fork
    is independent of its parent."""
    engine = load_engine(smol)
    assert isinstance(engine, LlamaEngine) and engine.attention == "softmax"
    ids = engine.encode("The robot walks into the kitchen and opens the fridge. It takes out")
    straight = engine.new_cache()
    want = engine.greedy(straight, engine.advance(straight, ids), 9)
    base = engine.new_cache()
    engine.advance(base, ids[:5])
    other = engine.fork(base)
    engine.advance(other, engine.encode(" unrelated words"))
    fork = engine.fork(base)
    assert engine.greedy(fork, engine.advance(fork, ids[5:]), 9) == want


@pytest.mark.parametrize("which", ["smol", "hybrid"])
def test_forks_of_a_state_that_moved_on_hold_where_it_was_then(
    which: str, request: pytest.FixtureRequest
) -> None:
    """Fork, advance, fork again: each fork holds the tokens read when it was taken (the second
    once got the first one's bytes with the second one's length)."""
    import numpy as np

    engine = load_engine(request.getfixturevalue(which))
    rng = random.Random()
    ids = engine.encode(" ".join(rng.choice(THINGS + ROOMS) for _ in range(60)))
    a, b = sorted(rng.sample(range(9, len(ids) - 9), 2))
    if b - a < 8:
        b = a + 8
    state = engine.new_cache()
    engine.advance(state, ids[:a])
    first = engine.fork(state)
    engine.advance(state, ids[a:b])
    second = engine.fork(state)
    engine.advance(state, ids[b:])
    for fork, at in ((first, a), (second, b)):
        fresh = engine.new_cache()
        want = engine.advance(fresh, ids).row
        assert np.array_equal(engine.advance(fork, ids[at:]).row, want), (which, a, b)


def test_hybrid_is_reported_as_such(hybrid: str) -> None:
    engine = load_engine(hybrid)
    assert engine.hybrid and engine.attention == "linear hybrid"
    assert repr(engine).startswith("LlamaEngine(")


# Finding models


def test_names_resolve_in_the_local_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hybrid: str
) -> None:
    gguf = Path(hybrid.removeprefix("gguf:"))
    ours = tmp_path / "models"
    ours.mkdir()
    shutil.copy(gguf, ours / "Tiny-Qwen35.Q8_0.gguf")
    ollama = tmp_path / "ollama"
    digest = "sha256-" + "ab" * 32
    (ollama / "blobs").mkdir(parents=True)
    shutil.copy(gguf, ollama / "blobs" / digest)
    manifest = ollama / "manifests/registry.ollama.ai/library/tinyq/latest"
    manifest.parent.mkdir(parents=True)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": digest.replace("-", ":")}]
    manifest.write_text(json.dumps({"layers": layers}))
    hub = tmp_path / "hf" / "hub" / "models--org--tiny-GGUF" / "snapshots" / "abc123"
    hub.mkdir(parents=True)
    shutil.copy(gguf, hub / "tiny-hub-q4.gguf")
    monkeypatch.setenv("LINMEM_MODELS", str(ours))
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))

    assert set(local_models()) == {"Tiny-Qwen35.Q8_0", "tinyq:latest", "tiny-hub-q4"}
    assert resolve("tiny-qwen35") == ours / "Tiny-Qwen35.Q8_0.gguf"  # a unique prefix, any case
    assert resolve("tinyq:latest") == ollama / "blobs" / digest
    assert resolve("tiny-hub-q4") == hub / "tiny-hub-q4.gguf"
    with pytest.raises(ModelUnavailable, match="could be any of"):
        resolve("tiny")
    with pytest.raises(ModelUnavailable, match=r"no GGUF model named 'nope'.*get-models"):
        resolve("nope")
    with pytest.raises(ModelUnavailable, match="no such GGUF file"):
        resolve(str(tmp_path / "missing.gguf"))


# Bad model files: one clear error naming the file, nothing written


def test_a_file_that_is_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip file, not a model")
    with pytest.raises(ModelUnavailable, match=r"model.gguf: not a GGUF file \(it starts with b'PK"):
        load_gguf(str(path))


def test_a_truncated_gguf(tmp_path: Path, hybrid: str) -> None:
    data = Path(hybrid.removeprefix("gguf:")).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        ModelUnavailable, match=rf"cut.gguf: truncated GGUF: its tensors need {len(data)} bytes"
    ):
        load_gguf(str(cut))
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:300])
    with pytest.raises(ModelUnavailable, match="head.gguf: a damaged or truncated GGUF header"):
        load_gguf(str(head))


def test_an_architecture_llama_cpp_does_not_know(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "not-a-real-arch")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelUnavailable, match=r"odd.gguf: llama.cpp .* cannot load .*'not-a-real-arch'"):
        load_gguf(str(path))


def test_threads_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from linmem.engines.base import threads

    monkeypatch.setenv("LINMEM_THREADS", "3")
    assert threads() == 3
    monkeypatch.setenv("LINMEM_THREADS", "zero")
    with pytest.raises(ModelUnavailable, match="LINMEM_THREADS must be a whole number >= 1, found 'zero'"):
        threads()
    monkeypatch.delenv("LINMEM_THREADS")
    assert threads() == max(1, (os.cpu_count() or 2) // 2)


# A controller's dialogue on llama.cpp states


@pytest.mark.parametrize("which", ["smol", "hybrid"])
def test_a_chat_session_replies_as_the_stateless_chat(which: str, request: pytest.FixtureRequest) -> None:
    engine = load_engine(request.getfixturevalue(which))
    rng = random.Random()
    messages = [
        {"role": "system", "content": "You answer questions about a house."},
        {"role": "user", "content": " ".join(rng.choice(THINGS) for _ in range(rng.randrange(5, 30)))},
    ]
    session = engine.chat_session()
    for _ in range(3):
        n = rng.choice([7, 12, 19])
        kept, fresh = session.chat(messages, max_new_tokens=n), engine.chat(messages, max_new_tokens=n)
        assert (kept.text, kept.generated) == (fresh.text, fresh.generated), messages
        assert kept.processed + kept.cached == fresh.processed
        messages += [
            {"role": "assistant", "content": kept.text},
            {"role": "user", "content": f"And the {rng.choice(THINGS)} in the {rng.choice(ROOMS)}?"},
        ]
    assert kept.cached > 0


def test_a_real_judge_keeps_its_instructions_and_judges_as_a_fresh_call(smol: str) -> None:
    from linmem.evals.judge import Judge
    from linmem.prompts import judge_messages

    judge = Judge(smol, max_new_tokens=5)
    rng = random.Random()
    for _ in range(4):
        question = f"Where is the {rng.choice(THINGS)}{' ' * rng.randrange(3)}?"
        gold, answer = f"In the {rng.choice(ROOMS)}.", f"It is in the {rng.choice(ROOMS)}."
        verdict = judge.evaluate(question, gold, answer)
        fresh = judge.engine.chat(judge_messages(question, gold, answer), max_new_tokens=5)
        assert verdict.raw == fresh.text, (question, gold, answer)
    session = judge._chat.__self__
    assert any(len(ids) > 200 for ids, _ in session.heads.states)  # M3-Bench's instructions are kept
    # The same answer again is not asked again.
    assert judge.evaluate(question, gold, answer) is judge.evaluate(question, gold, answer)


def test_a_real_controller_gives_the_same_trace_with_and_without_its_kept_state(
    smol: str, tmp_path: Path
) -> None:
    from linmem.agent import Agent

    memory = open_memory("house", home=tmp_path, create=True)
    memory.write(_items(random.Random(3), 11))
    reader = memory.reader("embedding", embedder="hash", top_k=2, threshold=-1.0)
    reused, fresh = (
        Agent(reader, controller=smol, rounds=3, max_new_tokens=40, reuse_state=reuse).run(
            "Where is the red mug?"
        )
        for reuse in (True, False)
    )
    assert [(t.role, t.content) for t in reused.turns] == [(t.role, t.content) for t in fresh.turns]
    assert reused.answer == fresh.answer
    r, f = reused.controller_tokens, fresh.controller_tokens
    assert r.processed + r.cached == f.processed
    if reused.rounds > 1:
        assert r.cached > 0


@pytest.mark.parametrize("which", ["smol", "hybrid"])
def test_any_cut_into_calls_of_8_or_more_tokens_gives_the_same_logits(
    which: str, request: pytest.FixtureRequest
) -> None:
    import numpy as np

    from linmem.engines.llama import _windows

    engine = load_engine(request.getfixturevalue(which))
    rng = random.Random()
    ids = engine.encode(" ".join(rng.choice(THINGS + ROOMS) for _ in range(400)))[: rng.randrange(530, 700)]
    whole = engine.new_cache()
    ref = engine.advance(whole, ids).row
    cut = rng.randrange(8, len(ids) - 8)
    parts = engine.new_cache()
    engine.advance(parts, ids[:cut])
    assert np.array_equal(engine.advance(parts, ids[cut:]).row, ref), cut
    # No call is shorter than 8 tokens when it can be helped.
    assert all(b - a >= 8 for a, b in _windows(513)) and _windows(513)[-1][1] == 513
