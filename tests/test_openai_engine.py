"""The OpenAI-compatible engine against a real loopback server: wire format, accounting, failures."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from openai_server import OpenAIServer

from linmem.engines.base import Engine, Prompt
from linmem.engines.openai import OpenAIEngine
from linmem.errors import ContextOverflow, EngineError, ModelUnavailable, UnknownSpec

CHAT = "/v1/chat/completions"
# Odd whitespace and non-ASCII on purpose: none of it may be reformatted on the way out.
MEMORY = [
    "[CLIP 1 | 06:00-06:30 | kitchen]\n",
    "Alice puts the  café mug away.\t\n\n",
    "[CLIP 2]\nBob 看 it. \n",
]


def words(text: str) -> int:
    return max(1, len(text.split()))


def prompt(query: str, memory: list[str] = MEMORY) -> Prompt:
    return Prompt(
        system="You read memories.",
        intro="Memory:\n",
        memory=memory,
        stem="\nAnswer briefly.\n",
        query=f"Question: {query}\n",
    )


def engine(server: OpenAIServer, **options: Any) -> OpenAIEngine:
    return OpenAIEngine.from_spec(f"{server.url}#{server.model}", **{"backoff_s": 0.01, **options})


def sent(server: OpenAIServer, path: str = CHAT) -> list[dict[str, Any]]:
    return [body for p, body in server.requests if p == path]


def test_two_queries_send_a_byte_identical_memory_prefix() -> None:
    with OpenAIServer() as server, engine(server) as eng:
        p1, p2 = prompt("Where is the mug?"), prompt("Who saw it?")
        eng.generate(p1, max_new_tokens=7)
        eng.generate(p2, max_new_tokens=9)
        first, second = sent(server)
    assert first["messages"] == p1.messages() and second["messages"] == p2.messages()
    assert (first["temperature"], first["max_tokens"], second["max_tokens"]) == (0, 7, 9)
    prefix = (p1.intro + p1.memory_text).encode()
    users = [body["messages"][1]["content"].encode() for body in (first, second)]
    assert users[0][: len(prefix)] == users[1][: len(prefix)] == prefix
    assert first["messages"][0] == second["messages"][0]


def test_usage_becomes_processed_cached_and_generated() -> None:
    with OpenAIServer() as server, engine(server) as eng:
        p1, p2 = prompt("Where is the mug?"), prompt("Who saw it?")
        g1, g2 = eng.generate(p1, max_new_tokens=8), eng.generate(p2, max_new_tokens=8)
    assert (g1.cached, g1.processed) == (0, words(p1.system + p1.user))
    assert g2.cached > 0 and g2.processed + g2.cached == words(p2.system + p2.user)
    assert g2.generated == words(g2.text) and g2.text == "echo: Question: Who saw it?"
    assert g2.generate_s is not None and g2.generate_s > 0
    assert g2.prefill_s is None and g2.query_s is None


def test_server_reported_usage_is_taken_verbatim() -> None:
    usage = {"prompt_tokens": 100, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 64}}
    with (
        OpenAIServer(chat=lambda body: {"content": "a b c", "usage": usage}) as server,
        engine(server) as eng,
    ):
        g = eng.generate(prompt("q"), max_new_tokens=4)
    assert (g.processed, g.cached, g.generated) == (36, 64, 3)


@pytest.mark.parametrize("details", [None, {}, {"cached_tokens": None}])
def test_missing_cached_tokens_count_as_zero(details: Any) -> None:
    usage = {"prompt_tokens": 50, "prompt_tokens_details": details}
    with OpenAIServer(chat=lambda body: {"content": "x", "usage": usage}) as server, engine(server) as eng:
        g = eng.generate(prompt("q"), max_new_tokens=4)
    assert (g.processed, g.cached) == (50, 0)


def test_memory_is_counted_by_tokenize_once_per_version() -> None:
    with OpenAIServer() as server, engine(server) as eng:
        g1 = eng.generate(prompt("one"), max_new_tokens=4)
        g2 = eng.generate(prompt("two"), max_new_tokens=4)
        longer = [*MEMORY, "[CLIP 3]\nCarol leaves.\n"]
        g3 = eng.generate(prompt("three", longer), max_new_tokens=4)
        n = eng.count_tokens(prompt("four"))
        counted = [body["prompt"] for body in sent(server, "/tokenize")]
    assert g1.memory_tokens == g2.memory_tokens == words("".join(MEMORY))
    assert g3.memory_tokens == words("".join(longer))
    assert counted.count("".join(MEMORY)) == 1 and counted.count("".join(longer)) == 1
    p = prompt("four")
    assert n == sum(words(t) for t in (p.system, p.intro, p.memory_text, p.query))
    assert all(body["model"] == "test-model" for body in sent(server, "/tokenize"))


def test_without_tokenize_counts_are_none_and_it_is_asked_once() -> None:
    with OpenAIServer(tokenize=False) as server, engine(server) as eng:
        g = eng.generate(prompt("one"), max_new_tokens=4)
        eng.generate(prompt("two"), max_new_tokens=4)
        assert eng.count_tokens(prompt("three")) is None
        assert len(sent(server, "/tokenize")) == 1
    assert g.memory_tokens is None and g.text == "echo: Question: one"


def test_context_length_from_argument_models_or_tokenize() -> None:
    with OpenAIServer(context_length=8192) as server:
        assert engine(server).context_length == 8192
        assert engine(server, context_length=1000).context_length == 1000
    with OpenAIServer() as server, engine(server) as eng:
        assert eng.context_length is None  # /models has no max_model_len
        eng.count_tokens(prompt("q"))
        assert eng.context_length == 4096  # learned from /tokenize


def test_model_is_discovered_from_models() -> None:
    with OpenAIServer(model="org/Served-Model") as server, OpenAIEngine.from_spec(server.url) as eng:
        assert eng.model == "org/Served-Model"
        assert eng.id == f"openai:org/Served-Model@{server.url}"
        assert isinstance(eng, Engine)
        eng.generate(prompt("q"), max_new_tokens=4)
        assert sent(server)[0]["model"] == "org/Served-Model"


def test_a_server_without_models_is_a_clear_error() -> None:
    with OpenAIServer(model="") as server, pytest.raises(ModelUnavailable, match="lists no model"):
        OpenAIEngine.from_spec(server.url)


def test_api_key_from_argument_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with OpenAIServer(api_key="s3cret") as server:
        engine(server, api_key="s3cret").generate(prompt("q"), max_new_tokens=4)
        monkeypatch.setenv("OPENAI_API_KEY", "s3cret")
        engine(server).generate(prompt("q"), max_new_tokens=4)
        assert {h["authorization"] for h in server.headers} == {"Bearer s3cret"}
        with pytest.raises(EngineError, match="401.*bad api key"):
            engine(server, api_key="wrong").generate(prompt("q"), max_new_tokens=4)


def test_no_authorization_header_without_a_key() -> None:
    with OpenAIServer() as server, engine(server) as eng:
        eng.generate(prompt("q"), max_new_tokens=4)
        assert all("authorization" not in h for h in server.headers)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_a_transient_failure_is_retried(status: int) -> None:
    with OpenAIServer(errors=[(status, "busy")]) as server, engine(server) as eng:
        g = eng.generate(prompt("q"), max_new_tokens=4)
        assert len(sent(server)) == 2
    assert g.text == "echo: Question: q"


def test_retries_are_limited_and_the_error_names_url_status_and_message() -> None:
    with OpenAIServer(errors=[(500, "kaboom")] * 5) as server, engine(server, retries=2) as eng:
        with pytest.raises(EngineError) as caught:
            eng.generate(prompt("q"), max_new_tokens=4)
        assert len(sent(server)) == 3
    assert f"{server.url}/chat/completions" in str(caught.value)
    assert "500" in str(caught.value) and "kaboom" in str(caught.value)


def test_a_client_error_is_not_retried() -> None:
    with OpenAIServer(errors=[(404, "The model `nope` does not exist.")]) as server, engine(server) as eng:
        with pytest.raises(EngineError, match="404.*does not exist"):
            eng.generate(prompt("q"), max_new_tokens=4)
        assert len(sent(server)) == 1


def test_connection_refused_names_the_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with OpenAIEngine(url, "m", backoff_s=0.01) as eng:  # constructing needs no server
        with pytest.raises(EngineError, match="cannot reach") as caught:
            eng.generate(prompt("q"), max_new_tokens=4)
    assert f"{url}/chat/completions" in str(caught.value)
    with pytest.raises(EngineError, match=f"{url}/models"):
        OpenAIEngine(url, backoff_s=0.01)


def test_a_timeout_is_an_engine_error_and_not_retried() -> None:
    with OpenAIServer(delay_s=1.0) as server, engine(server, timeout_s=0.2) as eng:
        with pytest.raises(EngineError, match="no answer within 0.2s"):
            eng.generate(prompt("q"), max_new_tokens=4)
        assert len(sent(server)) == 1


def test_context_overflow_from_the_server() -> None:
    p = prompt("Where is the mug?")
    with OpenAIServer(context_length=30) as server, engine(server) as eng:
        with pytest.raises(ContextOverflow) as caught:
            eng.generate(p, max_new_tokens=10)
        assert len(sent(server)) == 1
    assert caught.value.needed == words(p.system + p.user) + 10
    assert caught.value.limit == 30
    assert "maximum context length is 30" in str(caught.value)


@pytest.mark.parametrize(
    ("message", "needed", "limit"),
    [
        (
            "'max_tokens' or 'max_completion_tokens' is too large: 16. This model's maximum context length "
            "is 4096 tokens and your request has 4090 input tokens (16 > 4096 - 4090).",
            4106,
            4096,
        ),
        ("The input (5000 tokens) is longer than the model's context length (4096 tokens).", 5016, 4096),
        (
            "Requested token count exceeds the model's maximum context length of 4096 tokens. You requested "
            "a total of 5000 tokens: 4984 tokens from the input messages and 16 tokens for the completion.",
            5000,
            4096,
        ),
        ("The decoder prompt (length 5000) is longer than the maximum model length of 4096.", 5016, 4096),
        ("Your prompt is too long for this model's context window.", -1, -1),
    ],
)
def test_context_overflow_phrasings(message: str, needed: int, limit: int) -> None:
    with OpenAIServer(errors=[(400, message)]) as server, engine(server) as eng:
        with pytest.raises(ContextOverflow) as caught:
            eng.generate(prompt("q"), max_new_tokens=16)
    assert (caught.value.needed, caught.value.limit) == (needed, limit)
    assert message in str(caught.value)


def test_other_bad_requests_stay_engine_errors() -> None:
    with OpenAIServer(errors=[(400, "temperature must be non-negative")]) as server, engine(server) as eng:
        with pytest.raises(EngineError, match="400.*temperature") as caught:
            eng.generate(prompt("q"), max_new_tokens=4)
    assert not isinstance(caught.value, ContextOverflow)


@pytest.mark.parametrize(
    "target",
    [
        "",
        "#model",
        "127.0.0.1:8000/v1#m",
        "localhost:8000/v1",
        "ftp://host/v1#m",
        "http://#m",
        "http://h:x/v1",
    ],
)
def test_a_bad_spec_is_refused_with_an_example(target: str) -> None:
    with pytest.raises(UnknownSpec, match="e.g. openai:http://"):
        OpenAIEngine.from_spec(target)


@pytest.mark.parametrize(
    ("content", "answer"),
    [
        ("<think>The mug...\nkitchen.</think>\n\nIn the left cupboard.", "In the left cupboard."),
        ("  <think></think>Paris", "Paris"),
        ("reasoning opened by the template</think>\nParis", "Paris"),
        ("<think>ran out of tokens while thinking", ""),
        ("Plain answer, <think> mentioned later.", "Plain answer, <think> mentioned later."),
        ("  kept as is \n", "  kept as is \n"),
    ],
)
def test_a_leading_think_block_is_stripped(content: str, answer: str) -> None:
    with OpenAIServer(chat=lambda body: {"content": content}) as server, engine(server) as eng:
        assert eng.generate(prompt("q"), max_new_tokens=4).text == answer


def test_threads_share_one_engine() -> None:
    with OpenAIServer() as server, engine(server) as eng:
        with ThreadPoolExecutor(8) as pool:
            gens = list(pool.map(lambda i: eng.generate(prompt(f"q{i}"), max_new_tokens=4), range(16)))
        counted = [body["prompt"] for body in sent(server, "/tokenize")]
    assert [g.text for g in gens] == [f"echo: Question: q{i}" for i in range(16)]
    assert counted.count("".join(MEMORY)) == 1
