"""The controller loop, its engines' chat call and the judge, with real readers and real engines.

The controller and the judge are the loopback OpenAI-compatible server playing a scripted model
(`ScriptedChat`), so every prompt sent can be checked verbatim; the readers are real (the hash
embedder, a tiny random-weights LM), and one test runs a tiny local controller end to end.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from datagen import KITCHEN_CLIPS
from openai_server import OpenAIServer, ScriptedChat

from linmem import prompts
from linmem.agent import Agent, Trace, m3_clips_json, parse_action
from linmem.cli import main
from linmem.engines import load_engine
from linmem.errors import BadInput, EngineError
from linmem.evals.judge import Judge, Verdict
from linmem.memory import Memory, open_memory
from linmem.types import Item, Tokens

QUESTION = "Where did Lily put the red mug?"
CLIPS = KITCHEN_CLIPS
INSTRUCTION, LAST, EMPTY = prompts.M3_INSTRUCTION, prompts.M3_LAST_ROUND, prompts.M3_EMPTY_RESULT


@pytest.fixture
def memory() -> Memory:
    m = open_memory("house", create=True)
    m.write(Item(text, clip=i, time=f"{i * 30:02d}:00") for i, text in enumerate(CLIPS))
    return m


def embedding(memory: Memory) -> Any:
    # Signed feature hashing gives negative cosines too: no threshold, so top_k alone cuts.
    return memory.reader("embedding", embedder="hash", top_k=2, threshold=-1.0)


def spec(server: OpenAIServer) -> str:
    return f"openai:{server.url}#{server.model}"


def system(question: str = QUESTION) -> dict[str, str]:
    return {"role": "system", "content": prompts.M3_SYSTEM.format(question=question)}


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def knowledge(reader: Any, query: str, shown: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    """What a search should bring back, built here from the reader's own hits."""
    hits = sorted(reader.read(query, exclude_clips=shown).hits, key=lambda h: h.clip)
    shown_now = {f"CLIP_{h.clip}": list(h.lines) for h in hits}
    return prompts.M3_KNOWLEDGE + json.dumps(shown_now, ensure_ascii=False) + ("" if hits else EMPTY)


def run(reader: Any, replies: list[str], *, after: str = "", **options: Any) -> tuple[Trace, ScriptedChat]:
    chat = ScriptedChat(list(replies), after=after)
    with OpenAIServer(chat=chat) as server:
        trace = Agent(reader, controller=spec(server), **options).run(QUESTION)
    return trace, chat


# The m3 policy


def test_search_search_answer_sends_m3_prompts_verbatim(memory: Memory) -> None:
    reader = embedding(memory)
    replies = [
        "Action: [Search]\nContent: red mug shelf",
        "<think>Need Tom too.</think>Action: [Search]\nContent: Tom marketing manager",
        "Action: [Answer]\nContent: On the shelf above the sink.",
    ]
    first = knowledge(reader, "red mug shelf")
    shown = set(json_clips(first))
    second = knowledge(reader, "Tom marketing manager", shown)
    trace, chat = run(reader, replies)

    assert trace.answer == "On the shelf above the sink."
    assert (trace.rounds, trace.searches, trace.policy) == (3, 2, "m3")
    assert len(chat.calls) == 3
    opening = [system(), user("Searched knowledge: {}" + INSTRUCTION)]
    assert chat.calls[0] == opening
    after_one = [*opening, assistant(replies[0]), user(first + INSTRUCTION)]
    assert chat.calls[1] == after_one
    # The engine strips the think block before the reply enters the dialogue.
    after_two = [
        *after_one,
        assistant("Action: [Search]\nContent: Tom marketing manager"),
        user(second + INSTRUCTION),
    ]
    assert chat.calls[2] == after_two
    assert [t.message() for t in trace.turns] == [*after_two, assistant(replies[2])]
    assert [t.action for t in trace.turns if t.role == "assistant"] == ["search", "search", "answer"]
    searches = [t for t in trace.turns if t.query is not None]
    assert [t.query for t in searches] == ["red mug shelf", "Tom marketing manager"]
    assert not set(searches[0].clips) & set(searches[1].clips)
    assert 1 in searches[0].clips and 3 in searches[1].clips


def json_clips(content: str) -> list[int]:
    shown = json.loads(content.removeprefix(prompts.M3_KNOWLEDGE).removesuffix(EMPTY))
    return [int(k.removeprefix("CLIP_")) for k in shown]


def test_malformed_turns_are_empty_searches(memory: Memory) -> None:
    replies = [
        "I am not sure what to do.",
        "Action: [Search]\nContent:   ",
        "**Action:** answer\n**Content:** Lily",
    ]
    trace, chat = run(embedding(memory), replies)
    assert trace.answer == "Lily"
    assert (trace.rounds, trace.searches) == (3, 0)
    assert [t.action for t in trace.turns if t.role == "assistant"] == ["invalid", "search", "answer"]
    empty = user("Searched knowledge: {}" + EMPTY + INSTRUCTION)
    assert chat.calls[1][-1] == empty and chat.calls[2][-1] == empty
    # Nothing was read: no searches, no reader tokens, no reader time; the reader is still named.
    assert trace.reader_tokens == Tokens(None, 0, 0, 0)
    assert (trace.reader_s, trace.reader) == (0.0, embedding(memory).model_id)


def test_the_last_round_must_answer(memory: Memory) -> None:
    trace, chat = run(
        embedding(memory), ["Action: [Search]\nContent: mug", "Action: [Answer]\nContent: shelf"], rounds=2
    )
    assert trace.answer == "shelf"
    assert chat.calls[0][-1]["content"].endswith(INSTRUCTION)
    assert not chat.calls[0][-1]["content"].endswith(LAST)
    assert chat.calls[1][-1]["content"].endswith(INSTRUCTION + LAST)
    # The instruction stays on earlier user turns, as in control.py.
    assert chat.calls[1][1]["content"] == "Searched knowledge: {}" + INSTRUCTION


def test_a_controller_that_never_answers_gives_none(memory: Memory) -> None:
    trace, chat = run(embedding(memory), [], after="Action: [Search]\nContent: red mug", rounds=3)
    assert trace.answer is None and trace.to_dict()["answer"] is None
    assert (trace.rounds, trace.searches, len(chat.calls)) == (3, 2, 3)
    # The last round's search would never be read, so it is not run.
    assert trace.turns[-1].role == "assistant"
    assert chat.calls[2][-1]["content"].endswith(LAST)


def test_embedding_searches_skip_clips_already_shown(memory: Memory) -> None:
    same = "Action: [Search]\nContent: red mug"
    trace, chat = run(embedding(memory), [same] * 4 + ["Action: [Answer]\nContent: x"], rounds=5)
    results = [t for t in trace.turns if t.query is not None]
    assert [len(t.clips) for t in results] == [2, 2, 1, 0]
    seen = [c for t in results for c in t.clips]
    assert sorted(seen) == [0, 1, 2, 3, 4]
    assert results[-1].content == "Searched knowledge: {}" + EMPTY + INSTRUCTION + LAST
    # Each result lists its clips in clip order with their lines verbatim.
    for turn in results[:3]:
        assert json_clips(turn.content.removesuffix(INSTRUCTION)) == sorted(turn.clips)
        shown = json.loads(turn.content.removesuffix(INSTRUCTION).removeprefix(prompts.M3_KNOWLEDGE))
        assert all(shown[f"CLIP_{c}"] == [CLIPS[c]] for c in turn.clips)


def test_exclude_clips_on_the_embedding_reader(memory: Memory) -> None:
    reader = embedding(memory)
    best = reader.read("red mug").clips
    rest = reader.read("red mug", exclude_clips=best).clips
    assert len(best) == len(rest) == 2 and not set(best) & set(rest)
    assert reader.read("red mug", exclude_clips=range(5)).hits == ()


def test_lm_reader_search_result_is_its_answer(memory: Memory) -> None:
    reader = memory.reader("lm", model="tiny:qwen3.5", max_new_tokens=8)
    replies = ["Action: [Search]\nContent: Where is the mug?", "Action: [Answer]\nContent: shelf"]
    trace, chat = run(reader, replies)
    expected = reader.read("Where is the mug?").text
    (search,) = [t for t in trace.turns if t.query is not None]
    assert search.answer == expected
    note = "" if expected.strip() else EMPTY
    assert chat.calls[1][-1] == user(prompts.M3_KNOWLEDGE + expected.strip() + note + INSTRUCTION)
    assert search.tokens is not None and search.tokens.memory and search.tokens.generated <= 8
    assert trace.reader == "tiny:qwen3.5"


def test_trace_totals_add_up(memory: Memory) -> None:
    reader = memory.reader("lm", model="tiny:qwen3.5", max_new_tokens=4)
    replies = [
        "Action: [Search]\nContent: mug",
        "Action: [Search]\nContent: Tom",
        "Action: [Answer]\nContent: shelf",
    ]
    trace, _ = run(reader, replies)
    asked = [t for t in trace.turns if t.role == "assistant"]
    searched = [t for t in trace.turns if t.query is not None]
    assert len(asked) == trace.rounds == 3 and len(searched) == trace.searches == 2

    def total(turns: list[Any], field: str) -> int:
        return sum(getattr(t.tokens, field) for t in turns)

    c, r = trace.controller_tokens, trace.reader_tokens
    assert (c.processed, c.cached, c.generated) == tuple(
        total(asked, f) for f in ("processed", "cached", "generated")
    )
    assert c.memory is None and c.processed + c.cached > 0 and c.generated == 3 * 4  # the server counts words
    assert (r.memory, r.processed, r.cached, r.generated) == tuple(
        total(searched, f) for f in ("memory", "processed", "cached", "generated")
    )
    assert trace.controller_s == pytest.approx(sum(t.seconds or 0.0 for t in asked))
    assert trace.reader_s == pytest.approx(sum(t.seconds or 0.0 for t in searched))
    assert trace.total_s >= trace.controller_s + trace.reader_s
    first = json.loads(json.dumps(trace.to_dict()))["turns"][2]
    assert asked[0].tokens is not None and first["tokens"]["processed"] == asked[0].tokens.processed


# The single-shot policy


def test_single_shot_searches_the_question_then_answers_once(memory: Memory) -> None:
    reader = embedding(memory)
    expected = knowledge(reader, QUESTION)
    trace, chat = run(reader, ["Action: [Answer]\nContent: On the shelf."], policy="single-shot")
    assert chat.calls == [[system(), user(expected + INSTRUCTION + LAST)]]
    assert (trace.answer, trace.rounds, trace.searches) == ("On the shelf.", 1, 1)


def test_single_shot_without_an_answer_is_none(memory: Memory) -> None:
    trace, _ = run(embedding(memory), ["Action: [Search]\nContent: more"], policy="single-shot")
    assert trace.answer is None and trace.rounds == 1


def test_single_shot_without_a_controller_answers_with_the_reader(memory: Memory) -> None:
    reader = memory.reader("lm", model="tiny:qwen3.5", max_new_tokens=6)
    trace = Agent(reader, policy="single-shot").run(QUESTION)
    assert trace.answer == reader.read(QUESTION).text
    assert (trace.rounds, trace.searches, trace.controller, len(trace.turns)) == (0, 1, None, 1)
    assert trace.controller_tokens == Tokens(None, 0, 0, 0)


def test_bad_settings_are_refused(memory: Memory) -> None:
    reader = embedding(memory)
    with pytest.raises(BadInput, match="controller"):
        Agent(reader)
    with pytest.raises(BadInput, match="policy"):
        Agent(reader, policy="react", controller="tiny:qwen3")
    with pytest.raises(BadInput, match="rounds"):
        Agent(reader, controller="tiny:qwen3", rounds=0)
    with pytest.raises(BadInput, match="question"):
        Agent(reader, policy="single-shot").run("  ")


# A real local controller


def test_a_tiny_local_controller_runs_end_to_end(memory: Memory) -> None:
    agent = Agent(embedding(memory), controller="tiny:qwen3", rounds=2, max_new_tokens=12)
    trace = agent.run(QUESTION)
    assert trace.controller == "tiny:qwen3" and 1 <= trace.rounds <= 2
    assert trace.turns[0].role == "system" and trace.turns[-1].role == "assistant"
    assert all(
        t.tokens is not None and t.tokens.generated <= 12 for t in trace.turns if t.role == "assistant"
    )
    json.dumps(trace.to_dict())


def test_sampled_chat_is_reproducible_by_seed() -> None:
    engine = load_engine("tiny:qwen3")
    messages = [{"role": "user", "content": "Say something."}]

    def sample(seed: int) -> str:
        return engine.chat(messages, max_new_tokens=12, temperature=1.0, seed=seed).text

    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1
    with pytest.raises(BadInput):
        engine.chat(messages, max_new_tokens=1, temperature=-1.0)


def test_greedy_chat_equals_generate_on_the_same_messages() -> None:
    engine = load_engine("tiny:qwen3.5")
    prompt = prompts.read_prompt(["[CLIP 0]\nLily makes coffee.\n\n"], "What does Lily make?")
    chat = engine.chat(prompt.messages(), max_new_tokens=10)
    read = engine.generate(prompt, max_new_tokens=10)
    assert (chat.text, chat.processed, chat.generated, chat.memory_tokens) == (
        read.text,
        read.processed,
        read.generated,
        None,
    )


def test_openai_chat_sends_the_messages_and_a_seed_only_when_sampling() -> None:
    messages = [system(), user("hello"), assistant("hi"), user("again")]
    with OpenAIServer() as server:
        engine = load_engine(spec(server))
        greedy = engine.chat(messages, max_new_tokens=5)
        engine.chat(messages, max_new_tokens=5, temperature=0.6, seed=7)
        (_, first), (_, second) = server.requests
    assert greedy.text == "echo: again" and greedy.memory_tokens is None
    assert first["messages"] == messages and (first["temperature"], first["max_tokens"]) == (0.0, 5)
    assert "seed" not in first and (second["temperature"], second["seed"]) == (0.6, 7)


# Reply parsing


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ("Action: [Answer]\nContent: Lily", ("answer", "Lily")),
        ("Action: [Search]\nContent: where is the mug", ("search", "where is the mug")),
        ("action: [answer]\ncontent: a red mug.", ("answer", "a red mug.")),
        ("ACTION: ANSWER\nCONTENT: Tom", ("answer", "Tom")),
        ("**Action:** [Answer]\n**Content:** Marketing staff", ("answer", "Marketing staff")),
        ("**Action**: Search\n**Content**: `Tom's job`", ("search", "Tom's job")),
        ("Reasoning first.\n\nAction: [Answer] Content: kitchen", ("answer", "kitchen")),
        ("Action: [Answer] The shelf", ("answer", "The shelf")),
        ("[Answer] The shelf", ("answer", "The shelf")),
        ("<think>Action: [Search]\nContent: x</think>\nAction: [Answer]\nContent: y", ("answer", "y")),
        ("Action: [Lookup]\nContent: Tom", ("search", "Tom")),
        ("Action: [Search]\nContent:", ("search", None)),
        ("Action: [Answer]\nContent:  ", ("invalid", None)),
        ("The answer is the shelf.", ("invalid", None)),
        ("", ("invalid", None)),
        ("The next action should be clear. Content: x", ("invalid", None)),
    ],
)
def test_replies_are_parsed_tolerantly(reply: str, parsed: tuple[str, str | None]) -> None:
    assert parse_action(reply) == parsed


def test_m3_clips_json_is_in_clip_order_with_unclipped_items_last() -> None:
    from linmem.types import Hit

    hits = (Hit(7, 0.9, (8,), ("b",)), Hit(None, 0.8, (3,), ("note",)), Hit(2, 0.5, (2, 4), ("a", "ä")))
    assert m3_clips_json(hits) == '{"CLIP_2": ["a", "ä"], "CLIP_7": ["b"], "ITEM_3": ["note"]}'


# The judge


def judge_run(
    replies: list[str], prediction: str | None, **options: Any
) -> tuple[Verdict, ScriptedChat, Any]:
    chat = ScriptedChat(list(replies))
    with OpenAIServer(chat=chat, errors=options.pop("errors", [])) as server:
        verdict = Judge(spec(server), backoff_s=0, **options).evaluate(QUESTION, "On the shelf.", prediction)
        return verdict, chat, list(server.requests)


def test_the_judge_sends_m3_benchs_prompt_and_says_yes() -> None:
    verdict, chat, requests = judge_run(["Yes"], "It is on the shelf above the sink.")
    assert verdict.correct and verdict.raw == "Yes" and verdict.model.startswith("openai:test-model@")
    user_text = prompts.JUDGE_PROMPT.format(
        question=QUESTION,
        ground_truth_answer="On the shelf.",
        agent_answer="It is on the shelf above the sink.",
    )
    assert chat.calls == [
        [{"role": "system", "content": "You are an expert in video understanding."}, user(user_text)]
    ]
    assert "\t•\tagent_answer: It is on the shelf above the sink.\n\nOutput ('Yes' or 'No'):" in user_text
    assert (requests[0][1]["temperature"], requests[0][1]["max_tokens"]) == (0.0, 2048)


@pytest.mark.parametrize(
    ("reply", "correct"), [("No", False), ("no.", False), ("YES.", True), ("<think>yes?</think>No", False)]
)
def test_the_judge_decides_by_yes_in_the_reply(reply: str, correct: bool) -> None:
    assert judge_run([reply], "the sink")[0].correct is correct


@pytest.mark.parametrize("prediction", [None, "", "   "])
def test_no_answer_is_wrong_without_a_call(prediction: str | None) -> None:
    verdict, chat, requests = judge_run(["Yes"], prediction)
    assert verdict == Verdict(False, "", verdict.model) and chat.calls == [] and requests == []


def test_judge_errors_are_retried_then_raised() -> None:
    verdict, _, requests = judge_run(["Yes"], "shelf", errors=[(400, "busy")] * 2)
    assert verdict.correct and len(requests) == 3
    with pytest.raises(EngineError, match="busy"):
        judge_run(["Yes"], "shelf", errors=[(400, "busy")] * 3)


# The CLI


def test_cli_agent_json_prints_one_trace(memory: Memory, capsys: pytest.CaptureFixture[str]) -> None:
    chat = ScriptedChat(["Action: [Search]\nContent: red mug", "Action: [Answer]\nContent: On the shelf."])
    with OpenAIServer(chat=chat) as server:
        argv = ["agent", "house", QUESTION, "--controller", spec(server), "--backend", "embedding"]
        code = main([*argv, "--embedder", "hash", "--top-k", "2", "--threshold", "-1", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and len(out.strip().splitlines()) == 1
    trace = json.loads(out)
    assert trace["answer"] == "On the shelf." and (trace["rounds"], trace["searches"]) == (2, 1)
    assert trace["turns"][3]["query"] == "red mug" and len(trace["turns"][3]["clips"]) == 2


def test_cli_agent_for_people_and_errors(memory: Memory, capsys: pytest.CaptureFixture[str]) -> None:
    chat = ScriptedChat(["Action: [Answer]\nContent: On the shelf."])
    with OpenAIServer(chat=chat) as server:
        code = main(
            [
                "agent",
                "house",
                QUESTION,
                "--controller",
                spec(server),
                "--backend",
                "embedding",
                "--embedder",
                "hash",
                "--policy",
                "single-shot",
            ]
        )
    captured = capsys.readouterr()
    assert code == 0 and captured.out == "On the shelf.\n" and "searches 1" in captured.err
    assert main(["agent", "house", QUESTION, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "bad_input"
