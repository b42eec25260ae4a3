"""State caching is exact: a read from a snapshot equals a stateless full re-read.

Runs on tiny random models of the three architectures, with memory lengths that are not
multiples of 64 (the chunk size of the delta-rule kernels) and fresh random text each run.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pytest
import torch

from linmem import prompts, render
from linmem.engines import load_engine
from linmem.memory import open_memory
from linmem.state import SnapshotStore
from linmem.types import Item

ARCHS = ["tiny:kimi-linear", "tiny:qwen3.5", "tiny:qwen3"]
WORDS = "mug kitchen Alice Bob cupboard red plant window keys drawer pasta laptop sofa coat door".split()


def random_items(rng: random.Random, n: int, first_clip: int = 0) -> list[Item]:
    return [
        Item(
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 17))) + ".",
            clip=first_clip + i // rng.randint(1, 3),
            time=f"{i:02d}:{rng.randint(0, 59):02d}",
        )
        for i in range(n)
    ]


def memory_with(rng: random.Random, n: int, name: str = "m"):
    mem = open_memory(name, create=True)
    mem.write(random_items(rng, n))
    return mem


class Store:
    """A private snapshot store bound to one memory's log, as another process would have it."""

    def __init__(self, engine, mem) -> None:
        head, _ = engine.split(prompts.read_prompt([], ""))
        self.inner = SnapshotStore(engine, mem.cache_dir / "state", head)
        self.mem = mem

    def get(self, budget=None):
        return self.inner.get(self.mem.log, budget)

    @property
    def path(self):
        return self.inner.path

    @path.setter
    def path(self, value) -> None:
        self.inner.path = value

    @property
    def _snap(self):
        return self.inner.current()


def store_for(engine, mem) -> Store:
    return Store(engine, mem)


def query_tokens(question: str, spec: str = "tiny:qwen3.5") -> int:
    """Tokens a cached read must process: the question and the chat template's closing."""
    engine = load_engine(spec)
    return len(engine.tail_ids(prompts.read_prompt([], question)))


def stateless_logits(engine, prompt, keep: int) -> torch.Tensor:
    ids = engine.prompt_ids(prompt)
    return engine.advance(engine.new_cache(), ids, keep=keep, chunk=len(ids))


def snapshot_logits(engine, store, prompt, keep: int) -> torch.Tensor:
    snap, _ = store.get()
    cache = engine.fork(snap.cache)
    engine.advance(cache, engine.stem_ids(prompt))
    return engine.advance(cache, engine.tail_ids(prompt), keep=keep)


def state_tensors(engine, cache) -> dict[str, torch.Tensor]:
    tensors, _ = engine.cache_to_tensors(cache)
    return {k: v.clone() for k, v in tensors.items()}


@pytest.mark.parametrize("spec", ARCHS)
def test_snapshot_read_equals_full_read(spec: str) -> None:
    rng = random.Random()
    engine = load_engine(spec)
    mem = memory_with(rng, rng.randint(15, 40))
    store = store_for(engine, mem)
    prompt = prompts.read_prompt(render.segments(mem.items()), "Where are the " + rng.choice(WORDS) + "?")
    n_tail = len(engine.tail_ids(prompt))
    full = stateless_logits(engine, prompt, n_tail)
    fast = snapshot_logits(engine, store, prompt, n_tail)
    assert full.shape == fast.shape == (1, n_tail, engine.model.config.vocab_size)
    assert (full - fast).abs().max().item() < 1e-4
    # Greedy decoding through the reader: identical tokens and text.
    cached = mem.ask("What did Alice do?", model=spec, max_new_tokens=24)
    stateless = mem.ask("What did Alice do?", model=spec, max_new_tokens=24, stateless=True)
    assert cached.text == stateless.text
    assert cached.tokens.memory == stateless.tokens.memory


@pytest.mark.parametrize("spec", ARCHS)
def test_memory_lengths_not_multiple_of_64(spec: str) -> None:
    engine = load_engine(spec)
    rng = random.Random()
    for _ in range(2):
        mem = memory_with(rng, rng.randint(3, 25), name=f"m{rng.randrange(10**6)}")
        store = store_for(engine, mem)
        snap, _ = store.get()
        if snap.tokens % 64 == 0:  # pad away from the chunk boundary, the case under test
            mem.write([Item("x")])
            snap, _ = store.get()
        assert snap.tokens % 64 != 0
        prompt = prompts.rank_prompt(render.segments(mem.items()), "keys", 5)
        n = len(engine.tail_ids(prompt))
        assert (
            stateless_logits(engine, prompt, n) - snapshot_logits(engine, store, prompt, n)
        ).abs().max() < 1e-4


@pytest.mark.parametrize("spec", ["tiny:kimi-linear", "tiny:qwen3.5"])
def test_read_never_modifies_snapshot(spec: str) -> None:
    engine = load_engine(spec)
    mem = memory_with(random.Random(), 21)
    reader = mem.reader("lm", model=spec, max_new_tokens=8)
    reader.read("first question")
    snap = reader.store.current()
    before = state_tensors(engine, snap.cache)
    reader.read("a second, longer question about the red mug in the kitchen")
    reader.rank("plants", 3)
    after = state_tensors(engine, reader.store.current().cache)
    assert reader.store.current() is snap
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("spec", ARCHS)
def test_extend_then_read_equals_full_read(spec: str) -> None:
    rng = random.Random()
    engine = load_engine(spec)
    mem = memory_with(rng, 13)
    store = store_for(engine, mem)
    first, _ = store.get()
    # New items continue the last clip and open new ones: the block boundary moves too.
    last_clip = mem.items()[-1].clip
    mem.write(random_items(rng, 9, first_clip=last_clip))
    snap, update = store.get()
    assert update.reason.startswith("extended by 9")
    assert update.tokens == snap.tokens - first.tokens
    prompt = prompts.read_prompt(render.segments(mem.items()), "What is in the drawer?")
    n = len(engine.tail_ids(prompt))
    assert (
        stateless_logits(engine, prompt, n) - snapshot_logits(engine, store, prompt, n)
    ).abs().max() < 1e-4


def test_write_extends_snapshot_with_new_tokens_only() -> None:
    mem = memory_with(random.Random(), 30)
    reader = mem.reader("lm", model="tiny:qwen3.5", max_new_tokens=4)
    first = reader.read("q")
    assert first.tokens.cached == 0 and first.tokens.processed > first.tokens.memory
    mem.write([Item("Bob hides the keys under the sofa.", clip=77)])
    second = reader.read("q")
    added = second.tokens.memory - first.tokens.memory
    assert added > 0
    # The write extended the snapshot; the read ran only its query.
    # Every prompt token is processed or cached; the read processed only its question.
    assert second.tokens.processed + second.tokens.cached == first.tokens.processed + added
    assert second.tokens.cached > second.tokens.memory
    assert second.tokens.processed == query_tokens("q")


def test_snapshot_survives_process_restart(linmem_home) -> None:
    mem = memory_with(random.Random(), 17)
    here = mem.ask("Where is the coat?", model="tiny:kimi-linear", max_new_tokens=12)
    script = textwrap.dedent(
        """
        import json, warnings
        warnings.filterwarnings("ignore")
        from linmem.memory import open_memory
        a = open_memory("m").ask("Where is the coat?", model="tiny:kimi-linear", max_new_tokens=12)
        print(json.dumps(a.to_dict()))
        """
    )
    env = {"LINMEM_HOME": str(linmem_home), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    there = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert there["answer"] == here.text
    assert "snapshot: loaded from disk" in there["notes"]
    # The memory comes from disk; only the read's instruction and question are run.
    assert there["tokens"]["cached"] == here.tokens.memory
    assert there["tokens"]["processed"] + there["tokens"]["cached"] == here.tokens.processed


def _flip(path, offset: int = -7) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["kv", "fixed", "header", "missing"])
def test_corrupt_snapshot_is_rebuilt(damage: str) -> None:
    mem = memory_with(random.Random(), 19)
    engine = load_engine("tiny:qwen3.5")
    good = mem.ask("keys?", model="tiny:qwen3.5", max_new_tokens=10).text
    folder = store_for(engine, mem).path
    if damage == "kv":
        _flip(next(folder.glob("kv-*.safetensors")))
    elif damage == "fixed":
        _flip(next(folder.glob("fixed-*.safetensors")))
    elif damage == "header":
        (folder / "header.json").write_bytes(b"garbage")
    else:
        next(folder.glob("kv-*.safetensors")).unlink()
    snap, update = store_for(engine, mem).get()
    assert "corrupt" in update.reason
    assert update.tokens == snap.tokens  # rebuilt from the log, every token
    # The rebuilt snapshot was saved whole (no damaged file of the old one reused) and loads.
    again, update = store_for(engine, mem).get()
    assert update.reason == "loaded from disk" and again.tokens == snap.tokens
    assert open_memory("m").ask("keys?", model="tiny:qwen3.5", max_new_tokens=10).text == good


def test_appends_write_only_new_rows_to_disk() -> None:
    rng = random.Random()
    mem = memory_with(rng, 25)
    engine = load_engine("tiny:kimi-linear")
    store = store_for(engine, mem)
    first, _ = store.get()
    (kv0,) = store.path.glob("kv-*.safetensors")
    stamp = kv0.stat().st_mtime_ns
    for _ in range(3):
        mem.write(random_items(rng, 4, first_clip=50))
        store.get()
    chunks = sorted(store.path.glob("kv-*.safetensors"), key=lambda p: int(p.name.split("-")[1]))
    assert len(chunks) == 4 and chunks[0] == kv0 and kv0.stat().st_mtime_ns == stamp
    # The last file holds only the last write's rows; the chunks tile [0, tokens) exactly.
    bounds = [tuple(int(x) for x in p.stem.split("-")[1:3]) for p in chunks]
    assert bounds[0][0] == 0 and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[-1][1] == store._snap.tokens
    # What another process loads from those files reads exactly like the live snapshot.
    fresh = store_for(engine, mem)
    loaded, update = fresh.get()
    assert update.reason == "loaded from disk" and loaded.tokens == store._snap.tokens
    prompt = prompts.read_prompt(render.segments(mem.items()), "coat?")
    n = len(engine.tail_ids(prompt))
    assert torch.equal(snapshot_logits(engine, fresh, prompt, n), snapshot_logits(engine, store, prompt, n))


def test_many_appends_merge_chunks(monkeypatch) -> None:
    from linmem import state

    monkeypatch.setattr(state, "MAX_CHUNKS", 3)
    rng = random.Random()
    mem = memory_with(rng, 5)
    engine = load_engine("tiny:qwen3.5")
    store = store_for(engine, mem)
    store.get()
    for _ in range(5):
        mem.write(random_items(rng, 2, first_clip=9))
        store.get()
        assert len(list(store.path.glob("kv-*"))) <= 3
    assert len(list(store.path.iterdir())) <= 6  # header, lock, fixed, chunks: old files are cleaned up
    loaded, update = store_for(engine, mem).get()
    assert update.reason == "loaded from disk" and loaded.tokens == store._snap.tokens


def test_stale_snapshot_is_rebuilt() -> None:
    mem = memory_with(random.Random(), 12)
    engine = load_engine("tiny:qwen3.5")
    store_for(engine, mem).get()
    # Deleting an item changes the log's epoch: the snapshot's prefix no longer exists.
    mem.forget([mem.items()[3].id])
    snap, update = store_for(engine, mem).get()
    assert update.reason == "the log no longer holds the items the snapshot read"
    assert snap.items == 11
    # A snapshot made by another model is never applied, even at the same path.
    other = load_engine("tiny:kimi-linear")
    wrong = store_for(other, mem)
    wrong.path = store_for(engine, mem).path  # as if the key had collided
    _, update = wrong.get()
    assert "stale" in update.reason


def test_unknown_spec_and_missing_model() -> None:
    from linmem.errors import ModelUnavailable, UnknownSpec

    with pytest.raises(UnknownSpec, match="tiny:NAME"):
        load_engine("gpt:whatever")
    with pytest.raises(UnknownSpec, match="qwen3.5"):
        load_engine("tiny:nope")
    with pytest.raises(ModelUnavailable, match="hf download"):
        load_engine("hf:nobody/not-a-cached-model")


@pytest.mark.parametrize("name", ["kimi-linear", "qwen3.5", "qwen3"])
def test_hf_directory_loads_like_tiny(tmp_path, name: str) -> None:
    """The real loading path (from_pretrained on a directory) gives the very same model."""
    from linmem.engines import tiny

    path = tiny.save(name, tmp_path / "model")
    mem = memory_with(random.Random(), 9)
    from_disk = mem.ask("Where?", model=f"hf:{path}", max_new_tokens=10)
    built = mem.ask("Where?", model=f"tiny:{name}", max_new_tokens=10)
    assert from_disk.text == built.text
    assert from_disk.tokens == built.tokens
    assert from_disk.model == f"hf:{path}"


def test_qwen3_5_vision_checkpoint_loads_as_text_model(tmp_path) -> None:
    """Qwen/Qwen3.5-0.8B ships as a vision-language checkpoint; the reader loads its text model."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from linmem.engines import tiny

    tok = tiny.build_tokenizer()
    text, _ = tiny.build("qwen3.5")
    vision = {
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": text.config.hidden_size,
        "num_position_embeddings": 64,
    }
    ids = {"image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 7, "vision_end_token_id": 8}
    model = Qwen3_5ForConditionalGeneration(
        Qwen3_5Config(text_config=text.config.to_dict(), vision_config=vision, **ids)
    )
    model.save_pretrained(tmp_path / "vlm")
    tok.save_pretrained(tmp_path / "vlm")
    engine = load_engine(f"hf:{tmp_path / 'vlm'}")
    assert type(engine.model).__name__ == "Qwen3_5ForCausalLM"
    mem = memory_with(random.Random(), 6)
    cached = mem.ask("Where?", model=f"hf:{tmp_path / 'vlm'}", max_new_tokens=8)
    stateless = mem.ask("Where?", model=f"hf:{tmp_path / 'vlm'}", max_new_tokens=8, stateless=True)
    assert cached.text == stateless.text


@pytest.mark.parametrize("spec", ARCHS)
def test_windowed_prefill_equals_one_shot(spec: str) -> None:
    """Chunked prefill (windows that continue the state) is exact: same logits, same cache."""
    engine = load_engine(spec)
    ids = [random.randrange(256) for _ in range(random.randint(250, 400))]
    whole, windowed = engine.new_cache(), engine.new_cache()
    one_shot = engine.advance(whole, ids, keep=40, chunk=len(ids))
    for chunk in (37, 64, 129):
        windowed = engine.new_cache()
        in_windows = engine.advance(windowed, ids, keep=40, chunk=chunk)
        assert (one_shot - in_windows).abs().max().item() < 1e-4
        a, b = state_tensors(engine, whole), state_tensors(engine, windowed)
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
