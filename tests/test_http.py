"""The HTTP API, driven over a real socket: a uvicorn server on 127.0.0.1 in a background thread
(one per module) and an httpx client, with the real Service, readers and models behind it.

The limits are set small here (a 64 KiB body, a 1 KiB item) so the 413 cases stay cheap.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from datagen import KITCHEN_CLIPS
from fastapi.testclient import TestClient
from openai_server import OpenAIServer, ScriptedChat

import linmem
from linmem import prompts
from linmem.engines import load_engine
from linmem.errors import BadInput
from linmem.memory import open_memory
from linmem.service.core import Allowed, Service, check_exposure, load_token
from linmem.service.http import create_app, serve
from linmem.state import RAM

TOKEN = "correct-horse-battery-staple"
MAX_REQUEST = 64 * 2**10
MAX_ITEM = 2**10
CLIPS = KITCHEN_CLIPS
HASH: dict[str, Any] = {"backend": "embedding", "embedder": "hash", "top_k": 2, "threshold": -1.0}
TINY: dict[str, Any] = {"model": "tiny:qwen3.5", "max_new_tokens": 6}


@dataclass
class Api:
    url: str
    home: Path
    service: Service


def start(app: Any) -> tuple[str, Callable[[], None]]:
    """Serve `app` with uvicorn on a free loopback port; returns its URL and a stop function."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    home = tmp_path_factory.mktemp("api") / "home"
    budget = RAM.limit
    service = Service(home, ram_budget=256 * 2**20)
    app = create_app(service, token=TOKEN, max_request_bytes=MAX_REQUEST, max_item_bytes=MAX_ITEM)
    url, stop = start(app)
    yield Api(url, home, service)
    stop()
    RAM.limit = budget  # the budget is process-wide; leave it as other tests expect


@pytest.fixture
def client(api: Api) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=api.url, headers=headers, timeout=120) as c:
        yield c


@pytest.fixture
def anonymous(api: Api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=60) as c:
        yield c


_names = count()


@pytest.fixture
def name() -> str:
    return f"mem-{next(_names)}"


@pytest.fixture
def house(client: httpx.Client) -> str:
    """A memory of five clips, written through the API."""
    name = f"house-{next(_names)}"
    assert client.post("/v1/memories", json={"name": name}).status_code == 201
    items = [{"text": t, "clip": i, "time": f"{i * 30:02d}:00"} for i, t in enumerate(CLIPS)]
    assert client.post(f"/v1/memories/{name}/items", json={"items": items}).status_code == 200
    return name


def error(resp: Any, status: int, code: str) -> str:  # an httpx response, or a TestClient one
    """The error's message, after checking the status and that the body is exactly the error shape."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code and body["error"]["message"], body
    return str(body["error"]["message"])


def count_items(client: httpx.Client, name: str) -> int:
    return int(client.get(f"/v1/memories/{name}").json()["items"])


# Memories and items


def test_health_needs_no_token(anonymous: httpx.Client) -> None:
    assert anonymous.get("/health").json() == {"status": "ok", "version": linmem.__version__}


def test_crud_round_trip(client: httpx.Client, name: str) -> None:
    created = client.post("/v1/memories", json={"name": name})
    assert created.status_code == 201 and created.json() == {"name": name, "items": 0}
    error(client.post("/v1/memories", json={"name": name}), 409, "conflict")
    assert {"name": name, "items": 0} in client.get("/v1/memories").json()["memories"]

    items = [
        {"text": f"note {i}", "clip": i, "time": "06:00", "source": "cam", "meta": {"i": i}} for i in range(5)
    ]
    written = client.post(f"/v1/memories/{name}/items", json={"items": items})
    assert written.status_code == 200
    ids = written.json()["ids"]
    assert len(ids) == 5 and ids == sorted(ids)
    stats = client.get(f"/v1/memories/{name}").json()
    assert stats["name"] == name and stats["items"] == 5 and stats["epoch"] == 0

    page = client.get(f"/v1/memories/{name}/items", params={"limit": 3}).json()
    assert [i["id"] for i in page["items"]] == ids[:3] and page["next_after"] == ids[2]
    rest = client.get(f"/v1/memories/{name}/items", params={"after": page["next_after"]}).json()
    assert [i["id"] for i in rest["items"]] == ids[3:] and rest["next_after"] is None
    assert client.get(f"/v1/memories/{name}/items/{ids[1]}").json() == {**items[1], "id": ids[1]}

    assert client.delete(f"/v1/memories/{name}/items/{ids[1]}").json() == {"id": ids[1], "deleted": True}
    error(client.get(f"/v1/memories/{name}/items/{ids[1]}"), 404, "no_such_item")
    error(client.delete(f"/v1/memories/{name}/items/{ids[1]}"), 404, "no_such_item")
    stats = client.get(f"/v1/memories/{name}").json()
    assert stats["items"] == 4 and stats["epoch"] == 1

    assert client.delete(f"/v1/memories/{name}").json() == {"name": name, "deleted": True}
    error(client.get(f"/v1/memories/{name}"), 404, "no_such_memory")
    error(client.post(f"/v1/memories/{name}/items", json={"items": items}), 404, "no_such_memory")
    assert name not in [m["name"] for m in client.get("/v1/memories").json()["memories"]]


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ({"text": "ok", "clip": "seven"}, "items[2]: item clip must be an integer"),
        ({"text": "   "}, "items[2]: item text must be a non-empty string"),
        ({"clip": 3}, "items[2]: missing field 'text'"),
        ({"text": "ok", "colour": "red"}, "items[2]: unknown field 'colour'"),
        ("just a string", "items[2]: expected a JSON object"),
    ],
)
def test_a_bad_item_writes_nothing(client: httpx.Client, house: str, bad: Any, says: str) -> None:
    items = [{"text": "fine"}, {"text": "fine too", "clip": 9}, bad, {"text": "never reached"}]
    message = error(client.post(f"/v1/memories/{house}/items", json={"items": items}), 422, "bad_input")
    assert message.startswith(says)
    assert count_items(client, house) == len(CLIPS)


def test_unknown_and_missing_fields_are_422s_naming_them(client: httpx.Client, house: str) -> None:
    resp = client.post(f"/v1/memories/{house}/ask", json={"query": "mug?", "colour": "red", **HASH})
    assert "unknown field 'colour'" in error(resp, 422, "validation")
    assert "query" in error(client.post(f"/v1/memories/{house}/rank", json=HASH), 422, "validation")
    error(client.post(f"/v1/memories/{house}/items", json={"items": []}), 422, "validation")
    error(client.post(f"/v1/memories/{house}/items", json={"items": [], "extra": 1}), 422, "validation")
    bad_json = client.post(f"/v1/memories/{house}/items", content=b'{"items": [', headers=JSON)
    assert "invalid JSON" in error(bad_json, 422, "validation")
    surrogate = client.post(
        f"/v1/memories/{house}/items", content=rb'{"items": [{"text": "\ud800"}]}', headers=JSON
    )
    assert error(surrogate, 422, "bad_input").startswith("items[0]: item text is not valid Unicode")
    assert "query.limit" in error(client.get(f"/v1/memories/{house}/items?limit=0"), 422, "validation")
    wrong_type = client.post(f"/v1/memories/{house}/ask", json={"query": ["a", 1]})
    assert error(wrong_type, 422, "validation") == "query: Input should be a valid string"
    assert count_items(client, house) == len(CLIPS)


JSON = {"Content-Type": "application/json"}


# Limits


def test_an_item_over_the_limit_is_413_naming_it(client: httpx.Client, house: str) -> None:
    items = [{"text": "small"}, {"text": "é" * (MAX_ITEM // 2 + 1)}]  # under the limit in characters
    message = error(client.post(f"/v1/memories/{house}/items", json={"items": items}), 413, "too_large")
    assert message.startswith("items[1]:") and str(MAX_ITEM) in message
    assert count_items(client, house) == len(CLIPS)


def test_a_body_over_the_limit_is_refused_before_it_is_read(client: httpx.Client, house: str) -> None:
    # Valid JSON of valid items: had it been parsed, it would have been written.
    n = MAX_REQUEST // 30
    body = httpx.Request(
        "POST", "/", json={"items": [{"text": f"item number {i:09d}"} for i in range(n)]}
    ).content
    assert len(body) > MAX_REQUEST
    declared = client.post(f"/v1/memories/{house}/items", content=body, headers=JSON)
    assert str(len(body)) in error(declared, 413, "too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer, counted as it arrives
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    streamed = client.post(f"/v1/memories/{house}/items", content=chunks(), headers=JSON)
    assert "transfer-encoding" in streamed.request.headers
    error(streamed, 413, "too_large")
    # The connection stays usable and nothing was written.
    assert count_items(client, house) == len(CLIPS)
    small = client.post(
        f"/v1/memories/{house}/items", content=chunks_of(b'{"items": [{"text": "x"}]}'), headers=JSON
    )
    assert small.status_code == 200


def chunks_of(data: bytes) -> Iterator[bytes]:
    yield from (data[i : i + 5] for i in range(0, len(data), 5))


# Auth and names


def test_a_bad_token_is_401_and_nothing_happens(api: Api, client: httpx.Client, house: str) -> None:
    write = {"items": [{"text": "an intruder's note"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}):  # fmt: skip
        with httpx.Client(base_url=api.url, headers=headers) as other:
            resp = other.post(f"/v1/memories/{house}/items", json=write)
            error(resp, 401, "unauthorized")
            assert resp.headers["www-authenticate"] == "Bearer"
            error(other.post("/v1/memories", json={"name": f"{house}-intruder"}), 401, "unauthorized")
            error(other.delete(f"/v1/memories/{house}"), 401, "unauthorized")
            error(other.get("/openapi.json"), 401, "unauthorized")
            error(other.get("/no/such/route"), 401, "unauthorized")  # no routes revealed
    assert count_items(client, house) == len(CLIPS)
    assert not (api.home / f"{house}-intruder").exists()
    assert (
        client.get(f"/v1/memories/{house}", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    )


@pytest.mark.parametrize("bad", ["..", "a/b", "../escape", "/abs", ".hidden", "a b", "", "x" * 65, "a%2Fb"])
def test_bad_names_in_the_body_are_400(api: Api, client: httpx.Client, bad: str) -> None:
    error(client.post("/v1/memories", json={"name": bad}), 400, "bad_name")
    assert not (api.home.parent / "escape").exists() and not (api.home / "a").exists()


@pytest.mark.parametrize("path", ["%2E%2E", "%2e%2e", "x" * 65, ".hidden", "a%20b", "..."])
def test_bad_names_in_the_url_are_400(client: httpx.Client, path: str) -> None:
    error(client.get(f"/v1/memories/{path}"), 400, "bad_name")
    error(client.post(f"/v1/memories/{path}/items", json={"items": [{"text": "x"}]}), 400, "bad_name")
    error(client.delete(f"/v1/memories/{path}"), 400, "bad_name")


def test_a_slash_in_a_url_name_matches_no_route(api: Api, client: httpx.Client, house: str) -> None:
    # The server decodes %2F before routing, so the name can never reach the core with a slash in it.
    for path in (f"{house}%2F..", f"..%2F{house}", "a%2Fb", "..%2F..%2Fetc"):
        error(client.get(f"/v1/memories/{path}"), 404, "not_found")
        error(client.delete(f"/v1/memories/{path}"), 404, "not_found")
    assert count_items(client, house) == len(CLIPS)
    assert sorted(p.name for p in api.home.parent.iterdir()) == ["home"]


# Reads


def test_ask_and_rank_with_the_embedding_reader(api: Api, client: httpx.Client, house: str) -> None:
    asked = client.post(f"/v1/memories/{house}/ask", json={"query": "Where is the red mug?", **HASH})
    assert asked.status_code == 200
    answer = asked.json()
    direct = open_memory(house, home=api.home).ask("Where is the red mug?", **HASH).to_dict()
    assert [answer[k] for k in ("answer", "clips", "hits", "model")] == [
        direct[k] for k in ("answer", "clips", "hits", "model")
    ]
    assert answer["clips"][0] == 1 and answer["hits"][0]["lines"] == [CLIPS[1]]

    ranked = client.post(f"/v1/memories/{house}/rank", json={"query": "red mug", "k": 3, **HASH}).json()
    assert len(ranked["clips"]) == 3 and ranked["clips"][0] == 1 and ranked["model"] == "hash:256"
    message = error(
        client.post(f"/v1/memories/{house}/ask", json={"query": "q", **HASH, **TINY}), 422, "bad_input"
    )
    assert "'max_new_tokens'" in message  # an LM option for the embedding reader


def test_rank_defaults_to_the_hybrid_reader(client: httpx.Client, house: str) -> None:
    ranked = client.post(f"/v1/memories/{house}/rank", json={"query": "red mug", "k": 2, "embedder": "hash"})
    assert ranked.status_code == 200, ranked.text
    body = ranked.json()
    assert body["model"] == "bm25+hash:256" and body["clips"][0] == 1
    assert body["hits"][0]["lines"] == [CLIPS[1]] and 0 < body["hits"][0]["score"] <= 1
    tuned = {"query": "red mug", "embedder": "hash", "lexical_weight": 1.0, "second_line": 0.0}
    assert client.post(f"/v1/memories/{house}/rank", json=tuned).json()["clips"][0] == 1
    # The ask route keeps the LM reader as its default; hybrid options elsewhere are refused by name.
    refused = client.post(f"/v1/memories/{house}/ask", json={"query": "q", "lexical_weight": 0.5, **TINY})
    assert "'lexical_weight'" in error(refused, 422, "bad_input")
    assert error(
        client.post(f"/v1/memories/{house}/rank", json={"query": "q", "lexical_weight": 2}), 422, "validation"
    )
    # The re-ranking LM is one of the server's models, like any other.
    url = {"query": "q", "embedder": "hash", "rerank": "lm", "model": "openai:http://127.0.0.1:9/v1#x"}
    assert error(client.post(f"/v1/memories/{house}/rank", json=url), 403, "not_allowed")


def test_ask_with_the_packaged_minilm(client: httpx.Client, house: str) -> None:
    answer = client.post(
        f"/v1/memories/{house}/ask", json={"query": "Where is the mug?", "backend": "embedding"}
    )
    assert answer.status_code == 200 and answer.json()["clips"][0] == 1
    assert "MiniLM" in answer.json()["model"]


def test_ask_with_the_lm_reader_runs_only_the_question_the_second_time(
    client: httpx.Client, house: str
) -> None:
    first = client.post(f"/v1/memories/{house}/ask", json={"query": "Where is the mug?", **TINY}).json()
    assert first["model"].startswith("tiny") and first["tokens"]["generated"] > 0
    assert first["tokens"]["cached"] == 0 and first["tokens"]["processed"] > first["tokens"]["memory"]
    second = client.post(f"/v1/memories/{house}/ask", json={"query": "Who reads?", **TINY}).json()
    tail = load_engine("tiny:qwen3.5").tail_ids(prompts.read_prompt([], "Who reads?"))
    assert second["tokens"]["processed"] == len(tail)
    assert second["tokens"]["cached"] > second["tokens"]["memory"] == first["tokens"]["memory"]
    ranked = client.post(f"/v1/memories/{house}/rank", json={"query": "mug", "k": 2, "backend": "lm", **TINY})
    assert ranked.status_code == 200 and len(ranked.json()["clips"]) <= 2


def test_concurrent_asks_equal_sequential_ones(client: httpx.Client, house: str) -> None:
    questions = ["Where is the mug?", "Who reads the newspaper?", "What does the cat do?",
                 "Who makes coffee?", "What is Tom's job?", "Where is the mug?"]  # fmt: skip

    def ask(q: str) -> dict[str, Any]:
        resp = client.post(f"/v1/memories/{house}/ask", json={"query": q, **TINY})
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    ask("warm up")  # the snapshot is built once, before the race
    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    alone = [ask(q) for q in questions]
    assert [(a["answer"], a["clips"]) for a in together] == [(a["answer"], a["clips"]) for a in alone]
    assert all(a["tokens"]["cached"] > a["tokens"]["memory"] for a in together)


def test_agent_with_a_scripted_controller(
    api: Api, client: httpx.Client, house: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = ScriptedChat(["Action: [Search]\nContent: red mug", "Action: [Answer]\nContent: On the shelf."])
    with OpenAIServer(chat=chat) as server:
        spec = f"openai:{server.url}#{server.model}"
        monkeypatch.setattr(api.service, "allowed", Allowed.of(more_models=[spec]))  # as --allow-model
        body = {"question": "Where is the red mug?", "controller": spec, **HASH}
        trace = client.post(f"/v1/memories/{house}/agent", json=body)
    assert trace.status_code == 200, trace.text
    t = trace.json()
    assert t["answer"] == "On the shelf." and t["rounds"] == 2 and t["searches"] == 1 and t["policy"] == "m3"
    (search,) = [turn for turn in t["turns"] if turn["query"] is not None]
    assert search["query"] == "red mug" and 1 in search["clips"]
    assert len(chat.calls) == 2
    message = error(
        client.post(f"/v1/memories/{house}/agent", json={"question": "q", **HASH}), 422, "bad_input"
    )
    assert "controller" in message
    error(
        client.post(f"/v1/memories/{house}/agent", json={"question": "q", "policy": "x"}), 422, "validation"
    )


@pytest.mark.parametrize("route", ["ask", "rank", "agent"])
def test_every_read_route_takes_query_or_question(client: httpx.Client, house: str, route: str) -> None:
    path = f"/v1/memories/{house}/{route}"
    extra = {**HASH, "policy": "single-shot"} if route == "agent" else HASH
    q = "Where is the red mug?"
    answers = []
    for asked in ({"query": q}, {"question": q}, {"query": q, "question": q}):
        resp = client.post(path, json={**asked, **extra})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        answers.append((body["answer"], body.get("clips"), [t["content"] for t in body.get("turns", [])]))
    assert answers[0][0] and answers[0] == answers[1] == answers[2]
    differ = client.post(path, json={"query": q, "question": "Who reads?", **extra})
    assert "query and question differ" in error(differ, 422, "validation")
    assert "query (or question) is required" in error(client.post(path, json=extra), 422, "validation")
    error(client.post(path, json={"question": "", **extra}), 422, "validation")


def test_openapi_shows_both_names_of_the_question(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for model in ("AskRequest", "RankRequest", "AgentRequest"):
        assert {"query", "question"} <= set(schemas[model]["properties"]), model
        assert "query" not in schemas[model].get("required", []), model


# Errors and the spec


def test_every_error_has_the_one_shape(
    api: Api, tmp_path: Path, client: httpx.Client, house: str, name: str, *, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.post("/v1/memories", json={"name": name})
    empty, memory = f"/v1/memories/{name}", f"/v1/memories/{house}"
    (tmp_path / "not-a-model").mkdir()
    listed = ["gpt:x", f"hf:{tmp_path / 'not-a-model'}"]
    monkeypatch.setattr(api.service, "allowed", Allowed.of(more_models=listed))
    cases: list[tuple[str, str, dict[str, Any] | None, int, str]] = [
        ("GET", "/nowhere", None, 404, "not_found"),
        ("PUT", "/v1/memories", {}, 405, "method_not_allowed"),
        ("GET", f"{memory}/items?limit=0", None, 422, "validation"),
        ("GET", f"{memory}/items/seven", None, 422, "validation"),
        ("POST", "/v1/memories/nobody/ask", {"query": "q", **HASH}, 404, "no_such_memory"),
        ("POST", f"{empty}/ask", {"query": "q", **HASH}, 409, "empty_memory"),
        ("POST", f"{memory}/ask", {"query": "q", "model": "gpt:y"}, 403, "not_allowed"),
        ("POST", f"{memory}/ask", {"query": "q", "model": "gpt:x"}, 400, "unknown_spec"),
        (
            "POST",
            f"{memory}/ask",
            {"query": "q", "model": f"hf:{tmp_path / 'not-a-model'}"},
            503,
            "model_unavailable",
        ),
        ("POST", f"{memory}/ask", {"query": "q", **TINY, "context_length": 64}, 422, "context_overflow"),
    ]
    for method, path, body, status, code in cases:
        error(client.request(method, path, json=body), status, code)
    with OpenAIServer(errors=[(400, "the server says no")] * 4) as server:
        failing = {"query": "q", "model": f"openai:{server.url}#{server.model}"}
        monkeypatch.setattr(api.service, "allowed", Allowed.of(more_models=[failing["model"]]))
        assert "the server says no" in error(client.post(f"{memory}/ask", json=failing), 502, "engine_error")


def test_an_internal_error_hides_its_details(tmp_path: Path) -> None:
    class Broken(Service):
        def memories(self) -> list[dict[str, Any]]:
            raise RuntimeError("secret detail at /srv/private")

    app = create_app(Broken(tmp_path, ram_budget=RAM.limit), token=None)
    with TestClient(app, raise_server_exceptions=False) as test:
        resp = test.get("/v1/memories")
    assert "secret" not in resp.text
    error(resp, 500, "internal")


def test_error_messages_show_no_server_path(
    api: Api, client: httpx.Client, house: str, tmp_path: Path, *,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """A client learns what went wrong, never where the server keeps its files; the server's log
    keeps the whole message."""
    model = tmp_path / "private" / "not-a-model"
    model.mkdir(parents=True)
    monkeypatch.setattr(api.service, "allowed", Allowed.of(more_models=[f"hf:{model}"]))
    broken = api.home / "broken-log"
    broken.mkdir()
    (broken / "log.sqlite").write_bytes(b"not a database " * 100)
    caplog.set_level(logging.WARNING, logger="linmem")
    try:
        missing = error(
            client.post("/v1/memories/nobody/ask", json={"query": "q", **HASH}), 404, "no_such_memory"
        )
        unloadable = error(
            client.post(f"/v1/memories/{house}/ask", json={"query": "q", "model": f"hf:{model}"}),
            503,
            "model_unavailable",
        )
        damaged = error(client.get("/v1/memories/broken-log"), 500, "corrupt_memory")
        listed = client.get("/v1/memories").json()["memories"]
    finally:
        (broken / "log.sqlite").unlink()
        broken.rmdir()
    (summary,) = [m for m in listed if m["name"] == "broken-log"]
    messages = [missing, unloadable, damaged, summary["error"]["message"]]
    for message in messages:
        assert str(api.home) not in message and str(tmp_path) not in message, message
        assert not re.search(r"(^|[\s'(])/(tmp|home|srv|root|var)\b", message), message
    assert missing.startswith("no memory named 'nobody' in <home>")
    assert "<path>" in unloadable and "config.json" in unloadable
    assert damaged.startswith("<home>/broken-log/log.sqlite:") and damaged == summary["error"]["message"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"no memory named 'nobody' in {api.home}" in logged
    assert str(model) in logged and str(broken / "log.sqlite") in logged


def test_openapi_lists_the_routes_tagged(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["info"] == {**spec["info"], "title": "linmem", "version": linmem.__version__}
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    memory = "/v1/memories/{name}"
    assert routes == {
        ("GET", "/health"),
        ("GET", "/v1/memories"),
        ("POST", "/v1/memories"),
        ("GET", memory),
        ("DELETE", memory),
        ("POST", f"{memory}/items"),
        ("GET", f"{memory}/items"),
        ("GET", f"{memory}/items/{{item_id}}"),
        ("DELETE", f"{memory}/items/{{item_id}}"),
        ("POST", f"{memory}/ask"),
        ("POST", f"{memory}/rank"),
        ("POST", f"{memory}/agent"),
    }
    assert all(op["tags"] for ops in spec["paths"].values() for op in ops.values())
    ask = spec["paths"][f"{memory}/ask"]["post"]
    assert "ErrorBody" in str(ask["responses"]["422"]) and "AskRequest" in str(ask["requestBody"])


# Starting the server


def test_a_public_host_without_a_token_is_refused(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raised: list[BaseException] = []

    def run() -> None:  # in a thread, so a regression that starts serving cannot hang the suite
        try:
            serve(home=tmp_path / "home", host="0.0.0.0", port=port)
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert raised and isinstance(raised[0], BadInput), raised
    assert "refusing to serve on '0.0.0.0' without a token" in str(raised[0])
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    assert not (tmp_path / "home").exists()  # refused before anything was opened


def test_tokens_and_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_token() is None
    monkeypatch.setenv("LINMEM_API_KEY", "from-env")
    assert load_token() == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert load_token(tmp_path / "token") == "from-file"
    (tmp_path / "blank").write_text("  \n")
    with pytest.raises(BadInput, match="is empty"):
        load_token(tmp_path / "blank")
    with pytest.raises(BadInput, match="cannot read"):
        load_token(tmp_path / "missing")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        check_exposure(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com", ""):
        with pytest.raises(BadInput, match="without a token"):
            check_exposure(host, None)
        check_exposure(host, "a-token")


# What a request may make the server do


@pytest.mark.parametrize("field", ["model", "embedder", "controller"])
def test_a_request_cannot_name_a_url_of_its_own(
    client: httpx.Client, house: str, field: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spec in a request is only ever chosen among the server's own: the server never calls a
    URL a caller gave it, so it never sends its API key or a memory's text there."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-server-secret")
    with OpenAIServer(chat=ScriptedChat(["Action: [Answer]\nContent: leaked"])) as server:
        spec = f"openai:{server.url}#{server.model}"
        route, body = {
            "model": ("ask", {"query": "Where is the red mug?", "model": spec}),
            "embedder": ("rank", {"query": "red mug", "backend": "embedding", "embedder": spec}),
            "controller": ("agent", {"question": "Where is the red mug?", "controller": spec, **HASH}),
        }[field]
        message = error(client.post(f"/v1/memories/{house}/{route}", json=body), 403, "not_allowed")
        assert server.requests == []  # nothing reached the caller's server: no key, no memory text
    assert "--allow-model" in message or "--allow-embedder" in message
    assert "sk-server-secret" not in message


@pytest.mark.parametrize(
    ("route", "extra"),
    [
        ("rank", {"k": 101}),
        ("ask", {**TINY, "max_new_tokens": 100_000}),
        ("ask", {"top_k": 1000, "backend": "embedding"}),
        ("agent", {"rounds": 1000}),
    ],
)
def test_work_per_request_is_bounded(client: httpx.Client, house: str, route: str, extra: dict) -> None:
    field = "question" if route == "agent" else "query"
    error(client.post(f"/v1/memories/{house}/{route}", json={field: "q", **extra}), 422, "validation")


def test_a_loopback_server_answers_only_loopback_hosts(tmp_path: Path) -> None:
    app = create_app(Service(tmp_path / "home", ram_budget=RAM.limit), token=None, host="127.0.0.1")
    url, stop = start(app)
    try:
        port = url.rsplit(":", 1)[1]
        with httpx.Client(base_url=url) as http:
            assert http.get("/v1/memories").status_code == 200
            assert http.get("/v1/memories", headers={"Host": f"localhost:{port}"}).status_code == 200
            error(http.get("/v1/memories", headers={"Host": f"evil.example:{port}"}), 421, "bad_host")
            error(http.get("/v1/memories", headers={"Origin": "http://evil.example"}), 403, "bad_origin")
            assert http.get("/v1/memories", headers={"Origin": f"http://127.0.0.1:{port}"}).status_code == 200
    finally:
        stop()


def test_a_write_never_waits_behind_slow_reads(
    api: Api, client: httpx.Client, house: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads run in threads of their own: with every read thread busy on a slow endpoint (and
    more reads queued), a write is still answered at once."""
    client.post("/v1/memories", json={"name": "scratch"})
    with OpenAIServer(delay_s=2.0) as server:  # a wide margin: the write takes milliseconds
        spec = f"openai:{server.url}#{server.model}"
        monkeypatch.setattr(api.service, "allowed", Allowed.of(more_models=[spec]))
        done: list[str] = []

        def read(i: int) -> None:
            with httpx.Client(base_url=api.url, headers=client.headers, timeout=120) as c:
                c.post(f"/v1/memories/{house}/ask", json={"query": f"slow question {i}", "model": spec})
            done.append("read")

        with ThreadPoolExecutor(48) as pool:  # more than the 40 threads routes shared before
            reads = [pool.submit(read, i) for i in range(48)]
            deadline = time.monotonic() + 30
            while len(server.requests) < 16 and time.monotonic() < deadline:
                time.sleep(0.01)  # every read thread is now waiting on the endpoint
            r = client.post("/v1/memories/scratch/items", json={"items": [{"text": "a quick note"}]})
            assert r.status_code == 200, r.text
            done.append("write")
            for f in reads:
                f.result()
    assert done[0] == "write"


# The server process


class ServeProcess:
    """`linmem serve` in a process of its own, its stderr collected line by line as it comes."""

    def __init__(self, *args: str) -> None:
        argv = [sys.executable, "-m", "linmem", "serve", *args]
        env = {k: v for k, v in os.environ.items() if k != "LINMEM_API_KEY"}
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr or ()), daemon=True).start()

    def banner(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while not any(line.startswith("linmem serve: ") for line in self.lines):
            assert self.proc.poll() is None and time.monotonic() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.05)
        return next(line for line in self.lines if line.startswith("linmem serve: "))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_serve_says_where_it_listens_and_stops_within_seconds(tmp_path: Path) -> None:
    """The newcomer's first run: the banner names the URL (a free port for --port 0), the home
    and the auth mode; Ctrl+C then ends the process within seconds, even with a keep-alive
    connection open and a read still waiting on a slow model."""
    home = tmp_path / "home"
    with OpenAIServer(delay_s=60) as slow:
        spec = f"openai:{slow.url}#{slow.model}"
        server = ServeProcess("--home", str(home), "--port", "0", "--allow-model", spec)
        try:
            banner = server.banner()
            found = re.search(r"http://127\.0\.0\.1:(\d+) ", banner)
            assert found and int(found.group(1)) > 0, banner
            assert f"home {home};" in banner and "auth: none" in banner, banner
            url = found.group(0).strip()
            with httpx.Client(base_url=url, timeout=120) as http:  # its connection is kept alive
                assert http.post("/v1/memories", json={"name": "m"}).status_code == 201
                items = [{"text": t, "clip": i} for i, t in enumerate(CLIPS)]
                assert http.post("/v1/memories/m/items", json={"items": items}).status_code == 200
                assert http.post("/v1/memories/m/ask", json={"question": "mug?", **HASH}).status_code == 200
                outcome: list[Any] = []

                def read() -> None:
                    try:
                        outcome.append(
                            httpx.post(f"{url}/v1/memories/m/ask", json={"query": "q", "model": spec})
                        )
                    except httpx.HTTPError as e:
                        outcome.append(e)

                reader = threading.Thread(target=read, daemon=True)
                reader.start()
                deadline = time.monotonic() + 60
                while not any(path.endswith("/chat/completions") for path, _ in slow.requests):
                    assert time.monotonic() < deadline, "the slow read never reached the model"
                    time.sleep(0.02)
                started = time.monotonic()
                server.proc.send_signal(signal.SIGINT)
                status = server.proc.wait(timeout=30)
                stopped_in = time.monotonic() - started
        finally:
            server.close()
    assert status == 0 and stopped_in < 5, (status, stopped_in, "".join(server.lines)[-3000:])
    reader.join(10)
    assert outcome and not (isinstance(outcome[0], httpx.Response) and outcome[0].status_code == 200)
    assert (home / "m" / "log.sqlite").is_file()
