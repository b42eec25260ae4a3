"""A controller's chat that reuses its state between rounds (`ChatSession`), against the stateless
chat it must equal, on tiny random-weights models of real architectures; and replies that stop at
the end of their Content line."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest
from openai_server import OpenAIServer, ScriptedChat

from linmem.agent import Agent, reply_done
from linmem.engines import load_engine
from linmem.memory import Memory, open_memory
from linmem.types import Item

WORDS = "mug sink kitchen Lily Tom keys garden drawer red blue where when put took saw".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _dialogue_rounds(engine: Any, rng: random.Random, rounds: int, chat: Any) -> list[tuple[str, int, int]]:
    """Grow a dialogue by the replies of `chat` and random user turns of odd lengths; each round's
    (reply, processed, cached)."""
    messages = [{"role": "system", "content": _text(rng, 23)}, {"role": "user", "content": _text(rng, 31)}]
    out = []
    for _ in range(rounds):
        gen = chat(messages, max_new_tokens=rng.choice([5, 9, 13]))
        out.append((gen.text, gen.processed, gen.cached))
        messages += [
            {"role": "assistant", "content": gen.text},
            {"role": "user", "content": _text(rng, rng.randrange(7, 40))},
        ]
    return out


@pytest.mark.parametrize("model", ["tiny:qwen3", "tiny:qwen3.5", "tiny:kimi-linear"])
def test_a_session_replies_as_the_stateless_chat_and_runs_only_what_was_added(model: str) -> None:
    engine = load_engine(model)
    seed = random.randrange(10**6)
    session = engine.chat_session()
    reused = _dialogue_rounds(engine, random.Random(seed), 4, session.chat)
    fresh = _dialogue_rounds(engine, random.Random(seed), 4, engine.chat)
    assert [r[0] for r in reused] == [f[0] for f in fresh], f"seed {seed}"
    for (_, processed, cached), (_, whole, none) in zip(reused, fresh, strict=True):
        assert none == 0 and processed + cached == whole
    assert reused[0][2] == 0 and all(cached > 0 for _, _, cached in reused[1:])
    # Round k runs what round k-1 added: far less than the whole dialogue by the last round.
    assert reused[-1][1] < fresh[-1][1] / 2


def test_a_session_survives_a_template_that_rewrites_the_prompts_end() -> None:
    """A template like Qwen3's opens the reply with an empty think block that the dialogue's copy
    of the reply no longer carries: the generation prompt is not repeated, the rest still is."""
    base = load_engine("tiny:qwen3")
    engine = copy.copy(base)
    engine.tokenizer = copy.deepcopy(base.tokenizer)
    engine._split_cache = {}
    engine.tokenizer.chat_template = (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{%- endif -%}"
    )
    seed = random.randrange(10**6)
    session = engine.chat_session()
    reused = _dialogue_rounds(engine, random.Random(seed), 3, session.chat)
    fresh = _dialogue_rounds(engine, random.Random(seed), 3, engine.chat)
    assert [r[0] for r in reused] == [f[0] for f in fresh], f"seed {seed}"
    assert all(cached > 0 for _, _, cached in reused[1:])


@pytest.mark.parametrize("model", ["tiny:qwen3", "tiny:qwen3.5", "tiny:kimi-linear"])
def test_unrelated_chats_start_from_the_head_they_share(model: str) -> None:
    """Judge-like prompts: one long instruction, then a different question each time. From the
    third on, each runs from the shared head, and every reply equals the stateless chat's."""
    engine = load_engine(model)
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    instructions = _text(rng, rng.randrange(40, 70))
    session = engine.chat_session(grows=False)
    gens = []
    # Questions whose first letters differ: two that began alike would keep a head a letter into
    # the question, which the next one need not share (it keeps their common part instead).
    firsts = rng.sample(["mug", "kitchen", "Lily", "Tom", "garden", "drawer", "red", "blue", "put"], 4)
    for first in firsts:
        asked = f"{first} {_text(rng, rng.randrange(3, 17))}"
        messages = [{"role": "system", "content": instructions}, {"role": "user", "content": asked}]
        n = rng.choice([4, 7, 11])
        kept, fresh = session.chat(messages, max_new_tokens=n), engine.chat(messages, max_new_tokens=n)
        assert (kept.text, kept.generated) == (fresh.text, fresh.generated), f"seed {seed}"
        assert kept.processed + kept.cached == fresh.processed
        gens.append(kept)
    head = len(engine.chat_ids([{"role": "system", "content": instructions}]))
    assert gens[0].cached == gens[1].cached == 0
    assert all(g.cached >= head - 8 for g in gens[2:]), (head, [g.cached for g in gens])


def test_an_agents_questions_share_the_controllers_system_head(memory: Memory) -> None:
    """Each question opens a session, and the engine's sessions share heads: a later question's
    first round starts from M3-Agent's system message, with the same trace."""
    reader = memory.reader("embedding", embedder="hash", top_k=2, threshold=-1.0)
    # Heads shared a word into the question ("Whe", "Wh") give way to the one they share.
    questions = ["Where did Lily put the mug?", "When did Tom go?", "What did Lily see?", "Who took it?"]
    reused = Agent(reader, controller="tiny:qwen3", policy="single-shot", max_new_tokens=7)
    fresh = Agent(reader, controller="tiny:qwen3", policy="single-shot", max_new_tokens=7, reuse_state=False)
    for q in questions:
        a, b = reused.run(q), fresh.run(q)
        assert a.answer == b.answer and [t.content for t in a.turns] == [t.content for t in b.turns]
        last = a
    assert last.controller_tokens.cached > 30


def test_sampled_session_replies_equal_sampled_stateless_ones() -> None:
    engine = load_engine("tiny:qwen3.5")
    messages = [{"role": "user", "content": "Say something about the kitchen."}]
    session = engine.chat_session()
    a = session.chat(messages, max_new_tokens=11, temperature=0.8, seed=5)
    b = engine.chat(messages, max_new_tokens=11, temperature=0.8, seed=5)
    assert a.text == b.text


# Replies that end at their Content line


@pytest.mark.parametrize(
    ("reply", "done"),
    [
        ("Action: [Answer]\nContent: In the sink.\n", True),
        ("Action: [Answer]\nContent: In the sink.", False),  # the line may go on
        ("Action: [Search]\nContent:\n", False),  # no content yet
        ("Action: [Search]\n", False),
        ("**Action:** [Search]\n**Content:** where is the mug\n", True),
        ("<think>Action: [Answer]\nContent: x\n", False),  # still thinking
        ("<think>hm</think>Action: [Answer]\nContent: x\n", True),
        ("Content: x\nAction: [Answer]", False),  # a label before the action is not the content
        ("I think the mug is in the sink.\n", False),
    ],
)
def test_reply_done(reply: str, done: bool) -> None:
    assert reply_done(reply) is done


def test_until_ends_a_local_reply_at_the_first_prefix_it_holds_for() -> None:
    engine = load_engine("tiny:qwen3")
    messages = [{"role": "user", "content": "Where is the mug?"}]
    full = engine.chat(messages, max_new_tokens=24)

    def until(text: str) -> bool:
        return len(text) >= 3

    cut = engine.chat(messages, max_new_tokens=24, until=until)
    assert until(cut.text) and 0 < cut.generated < full.generated
    shorter = engine.chat(messages, max_new_tokens=cut.generated - 1)
    assert not until(shorter.text)
    assert session_text(engine, messages, until) == cut.text


def session_text(engine: Any, messages: list[dict[str, str]], until: Any) -> str:
    return str(engine.chat_session().chat(messages, max_new_tokens=24, until=until).text)


def test_until_cuts_an_http_reply_where_a_local_one_would_stop() -> None:
    script = ScriptedChat(["Action: [Answer]\nContent: In the sink.\nI hope this helps!"])
    with OpenAIServer(script) as server:
        engine = load_engine(f"openai:{server.url}#{server.model}")
        gen = engine.chat([{"role": "user", "content": "?"}], max_new_tokens=64, until=reply_done)
    assert gen.text == "Action: [Answer]\nContent: In the sink.\n"


# The agent


@pytest.fixture
def memory() -> Memory:
    m = open_memory("house", create=True)
    rng = random.Random(7)
    m.write(Item(_text(rng, rng.randrange(5, 19)), clip=i) for i in range(9))
    return m


@pytest.mark.parametrize("backend", ["embedding", "lm"])
def test_agent_traces_are_the_same_with_and_without_state_reuse(memory: Memory, backend: str) -> None:
    options: dict[str, Any] = (
        {"embedder": "hash", "top_k": 2, "threshold": -1.0}
        if backend == "embedding"
        else {"model": "tiny:qwen3.5", "max_new_tokens": 9}
    )
    reader = memory.reader(backend, **options)
    traces = [
        Agent(reader, controller="tiny:qwen3.5", rounds=4, max_new_tokens=15, reuse_state=reuse).run(
            "Where did Lily put the red mug?"
        )
        for reuse in (True, False)
    ]
    reused, fresh = traces
    assert reused.rounds == fresh.rounds == 4  # a random controller never answers
    assert [t.to_dict() | {"tokens": None, "seconds": None} for t in reused.turns] == [
        t.to_dict() | {"tokens": None, "seconds": None} for t in fresh.turns
    ]
    r, f = reused.controller_tokens, fresh.controller_tokens
    assert r.processed + r.cached == f.processed and f.cached == 0
    assert r.processed < f.processed / 2


def test_a_session_never_continues_a_state_the_prompt_does_not_start_with() -> None:
    engine = load_engine("tiny:qwen3.5")
    session = engine.chat_session()
    first = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Where is the red mug?"}]
    session.chat(first, max_new_tokens=6)
    # The same length, one word changed early on: the kept state is not this prompt's prefix.
    changed = [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Where is the tan mug?"},
    ]
    gen = session.chat(changed, max_new_tokens=6)
    assert gen.text == engine.chat(changed, max_new_tokens=6).text
    assert gen.cached < len(engine.chat_ids([{"role": "system", "content": "You help."}]))
