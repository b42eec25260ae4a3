"""The LM reader: prompts shared across engines, clip citations, context limits and windowed reads."""

from __future__ import annotations

import random

import pytest
from openai_server import OpenAIServer

from linmem import prompts, render
from linmem.errors import ContextOverflow, EmptyMemory
from linmem.memory import open_memory
from linmem.types import Item

CAPTIONS = [
    "Alice puts the red mug in the left cupboard.",
    "Bob waters the fern by the window.",
    "Alice tells Bob that Clara visits on Saturday.",
    "Bob puts his car keys in the top drawer of the hallway cabinet.",
    "Alice cooks spaghetti with garlic and tomatoes.",
    "The cat sleeps on the armchair.",
    "Bob assembles a standing desk in the study.",
]


def household(name: str = "house", repeat: int = 1):
    mem = open_memory(name, create=True)
    mem.write(
        [
            Item(text, clip=r * len(CAPTIONS) + i, time=f"{i:02d}:00-{i:02d}:30")
            for r in range(repeat)
            for i, text in enumerate(CAPTIONS)
        ]
    )
    return mem


def test_empty_memory_is_an_error() -> None:
    mem = open_memory("empty", create=True)
    with pytest.raises(EmptyMemory, match="'empty' is empty"):
        mem.ask("anything?", model="tiny:qwen3")


def test_question_longer_than_context() -> None:
    mem = household()
    question = "Where is it? " * 400
    with pytest.raises(ContextOverflow, match=r"question alone is \d+ tokens") as e:
        mem.ask(question, model="tiny:qwen3.5", context_length=2048)
    assert e.value.limit == 2048 and e.value.needed > 2048
    with pytest.raises(ContextOverflow, match=r"reads at most 2048"):
        mem.ask(question, model="tiny:qwen3.5", context_length=2048, stateless=True)


def test_memory_longer_than_context_stops_before_any_work() -> None:
    mem = household(repeat=6)
    with pytest.raises(ContextOverflow, match=r"the memory is (\d+) tokens, but .* only (\d+) fit") as e:
        mem.ask("Where are the keys?", model="tiny:qwen3.5", context_length=1500, max_new_tokens=16)
    assert e.value.needed > e.value.limit
    assert not (mem.cache_dir / "state").exists() or not any((mem.cache_dir / "state").iterdir())


def test_window_without_room_for_memory_says_how_much_is_needed() -> None:
    mem = household()
    reader = mem.reader("lm", model="tiny:qwen3.5", context_length=100, max_new_tokens=16, overflow="window")
    with pytest.raises(
        ContextOverflow, match=r"a window holds no memory: .* raise --context-length to at least \d+"
    ):
        reader.read("Where are the keys?")


def test_windowed_read_covers_every_item_once() -> None:
    mem = household(repeat=6)
    reader = mem.reader("lm", model="tiny:qwen3.5", context_length=1500, max_new_tokens=16, overflow="window")
    answer = reader.read("Where are the keys?")
    (note,) = [n for n in answer.notes if n.startswith("read in")]
    n_windows = int(note.split()[2])
    assert n_windows >= 2
    segments = render.segments(mem.items())
    prompt = prompts.read_prompt(segments, "Where are the keys?")
    windows, memory_tokens = reader._pack_windows(prompt, 16)
    assert len(windows) == n_windows
    assert windows[0][0] == 0 and windows[-1][1] == len(segments)
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:], strict=False))
    for lo, hi in windows:
        part = prompts.read_prompt(segments[lo:hi], "Where are the keys?")
        assert reader.engine.count_tokens(part) + 16 <= 1500
    # The memory is counted once, as a whole read counts it; every window plus the combining call
    # ran through the model.
    head, segs = reader.engine.memory_ids(prompt)
    assert answer.tokens.memory == memory_tokens == len(head) + sum(len(s) for s in segs)
    assert answer.tokens.processed > answer.tokens.memory
    ranked = reader.rank("keys", 4)
    assert len(ranked.clips) <= 4


def test_openai_engine_gets_the_same_prompt_with_a_stable_prefix() -> None:
    replies = iter(["The keys are in the hallway cabinet (CLIP 3).", "Clara visits on Saturday, see clip 2."])
    with OpenAIServer(chat=lambda body: {"content": next(replies)}) as server:
        mem = household()
        spec = f"openai:{server.url}#memory-model"
        a = mem.ask("Where are Bob's keys?", model=spec)
        b = mem.ask("When does Clara visit?", model=spec)
    assert a.text.startswith("The keys") and a.clips == (3,)
    assert b.clips == (2,)
    assert a.model == b.model == f"openai:memory-model@{server.url}"
    (_, first), (_, second) = [r for r in server.requests if r[0] == "/v1/chat/completions"]
    segments = render.segments(mem.items())
    assert first["messages"] == prompts.read_prompt(segments, "Where are Bob's keys?").messages()
    memory_prefix = prompts.MEMORY_INTRO + "".join(segments)
    assert first["messages"][1]["content"].startswith(memory_prefix)
    assert second["messages"][1]["content"].startswith(memory_prefix)
    assert first["messages"][0] == second["messages"][0]
    # The loopback server plays a prefix cache: the second read reports the shared prefix cached.
    assert b.tokens.cached > 0


def test_rank_parses_free_form_lists() -> None:
    with OpenAIServer(
        chat=lambda body: {"content": "Most relevant:\n1. CLIP 3\n2. clip 6\n3. CLIP 42\n4. CLIP 0"}
    ) as s:
        mem = household()
        ranked = mem.rank("keys", 3, model=f"openai:{s.url}#m")
    assert ranked.clips == (3, 6, 0)  # 42 is not a clip of this memory


def test_hf_and_openai_prompts_agree_on_text() -> None:
    """The local engine templates exactly the messages the HTTP engine sends."""
    from linmem.engines import load_engine

    engine = load_engine("tiny:qwen3")
    segments = render.segments(household().items())
    prompt = prompts.read_prompt(segments, "q?")
    templated = engine.tokenizer.apply_chat_template(
        prompt.messages(), tokenize=False, add_generation_prompt=True
    )
    head, tail = engine.split(prompt)
    assert templated == head + "".join(segments) + prompt.stem + tail


def test_cached_reads_are_exact_on_fresh_random_memories() -> None:
    rng = random.Random()
    mem = open_memory("r", create=True)
    words = "mug keys fern desk cat spaghetti drawer window Saturday".split()
    for _ in range(3):
        mem.write(
            [
                Item(" ".join(rng.choices(words, k=rng.randint(2, 11))), clip=rng.randint(0, 9))
                for _ in range(7)
            ]
        )
        for spec in ("tiny:kimi-linear", "tiny:qwen3.5"):
            q = " ".join(rng.choices(words, k=5)) + "?"
            fast = mem.ask(q, model=spec, max_new_tokens=12)
            slow = mem.ask(q, model=spec, max_new_tokens=12, stateless=True)
            assert fast.text == slow.text
            assert fast.tokens.memory == slow.tokens.memory
            assert fast.tokens.generated == slow.tokens.generated


def test_long_question_over_a_ready_snapshot_is_refused() -> None:
    mem = household(repeat=2)
    reader = mem.reader("lm", model="tiny:qwen3.5", context_length=1800, max_new_tokens=8)
    reader.read("Where?")  # the snapshot is built and fits
    with pytest.raises(ContextOverflow, match=r"the memory is \d+ tokens"):
        reader.read("Where did Bob put the keys, and why? " * 25)
