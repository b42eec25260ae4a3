"""The MCP server over its real transports: the SDK's client drives `linmem mcp` spawned over stdio
exactly as CLIENT_CONFIG tells desktop clients to, and over streamable HTTP on a loopback port
behind a bearer token."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from linmem.errors import BadInput, UnknownSpec
from linmem.service import Service
from linmem.service.mcp import CLIENT_CONFIG, ENV_MODEL, build_server, run

README = Path(__file__).resolve().parents[1] / "README.md"
TOOLS = {"memory_write", "memory_query", "memory_search", "memory_list"}
ITEMS = [
    {"text": "Alice puts the red mug in the left cupboard.", "clip": 0, "time": "00:00-00:30"},
    {"text": "Bob waters the fern by the window.", "clip": 1, "time": "00:30-01:00"},
    {
        "text": "Alice reads a book on the sofa.",
        "clip": 2,
        "time": "01:00-01:30",
        "source": "living_room",
        "meta": {"cam": 2},
    },
]
# The hash embedder needs no model, so a server answers its first query in milliseconds.
SERVER_ENV = {ENV_MODEL: "hash:64"}
TOKEN_ENV = "LINMEM_API_KEY"


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


async def error_text(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    return " ".join(getattr(c, "text", "") for c in result.content)


async def exercise(client: Client) -> None:
    """Every tool once through a real session, plus the errors a model is likely to cause."""
    listed = (await client.list_tools()).tools
    assert sorted(t.name for t in listed) == sorted(TOOLS)
    schemas = {t.name: t.input_schema for t in listed}
    assert all(t.description and t.output_schema for t in listed)
    assert schemas["memory_write"]["required"] == ["memory", "items"]
    item = schemas["memory_write"]["properties"]["items"]["items"]
    assert item["required"] == ["text"] and set(item["properties"]) == set(ITEMS[2])
    assert schemas["memory_query"]["required"] == ["memory", "question"]
    backend = schemas["memory_query"]["properties"]["backend"]
    assert {"enum": ["lm", "embedding", "hybrid"], "type": "string"} in backend["anyOf"]
    assert schemas["memory_search"]["properties"]["k"]["default"] == 5
    assert schemas["memory_list"]["properties"] == {}

    written = await call(client, "memory_write", memory="robot", items=ITEMS)
    assert written == {"memory": "robot", "written": 3, "ids": [1, 2, 3], "items": 3}

    answer = await call(client, "memory_query", memory="robot", question="Where is the red mug?")
    # The default reader is the hybrid one, its dense half the server's embedder.
    assert answer["model"] == "bm25+hash:64" and answer["clips"][0] == 0
    assert "Alice puts the red mug in the left cupboard." in answer["answer"]
    assert answer["tokens"]["memory"] > 0 and answer["hits"][0]["lines"] == [ITEMS[0]["text"]]

    found = await call(client, "memory_search", memory="robot", query="who waters the fern", k=1)
    assert found["clips"] == [1] and found["hits"][0]["lines"] == [ITEMS[1]["text"]]

    assert await call(client, "memory_list") == {"memories": [{"name": "robot", "items": 3}]}

    assert "no_such_memory" in await error_text(client, "memory_query", memory="nowhere", question="Hi?")
    missing = await error_text(client, "memory_write", memory="new", items=ITEMS, create=False)
    assert "no_such_memory" in missing
    bad = await error_text(client, "memory_write", memory="robot", items=[{"text": "fine"}, {"text": ""}])
    assert "bad_input" in bad and "items[1]" in bad
    assert "bad_name" in await error_text(client, "memory_search", memory="../etc", query="x")
    # A call chooses among the server's models and embedders; it cannot name a URL or path.
    url = "openai:http://127.0.0.1:9/v1#exfiltrate"
    refused = await error_text(
        client, "memory_query", memory="robot", question="Hi?", backend="lm", model=url
    )
    assert "not_allowed: " in refused
    refused = await error_text(client, "memory_search", memory="robot", query="x", model="st:/etc/passwd")
    assert "not_allowed: " in refused
    # The rejected batch wrote nothing, not even its valid first item.
    assert await call(client, "memory_list") == {"memories": [{"name": "robot", "items": 3}]}


def stdio_server(home: Path) -> StdioServerParameters:
    """The server entry of CLIENT_CONFIG, pointed at this test's home."""
    entry = json.loads(CLIENT_CONFIG)["mcpServers"]["linmem"]
    command = shutil.which(entry["command"], path=str(Path(sys.executable).parent))
    assert command, f"the {entry['command']} console script is not installed beside {sys.executable}"
    env = entry["env"] | {"LINMEM_HOME": str(home)} | SERVER_ENV
    return StdioServerParameters(command=command, args=entry["args"], env=env)


def test_stdio_session(tmp_path: Path) -> None:
    async def main() -> None:
        async with Client(stdio_server(tmp_path / "home")) as client:
            await exercise(client)
            # The LM reader once: a tiny random-weights Qwen3.5 reads the memory and ranks clips.
            lm = {"backend": "lm", "model": "tiny:qwen3.5"}
            answer = await call(client, "memory_query", memory="robot", question="Where is the mug?", **lm)
            assert answer["model"] == "tiny:qwen3.5" and answer["tokens"]["generated"] > 0
            assert answer["tokens"]["memory"] > 0 and set(answer["clips"]) <= {0, 1, 2}
            ranked = await call(client, "memory_search", memory="robot", query="the fern", k=2, **lm)
            texts = {c["clip"]: c["text"] for c in ITEMS}
            assert [h["clip"] for h in ranked["hits"]] == ranked["clips"]
            assert all(h["lines"] == [texts[h["clip"]]] and h["score"] is None for h in ranked["hits"])

    anyio.run(main)
    assert (tmp_path / "home" / "robot" / "log.sqlite").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    port = free_port()
    argv = [sys.executable, "-m", "linmem", "mcp", "--transport", "http", "--port", str(port)]
    argv += ["--home", str(tmp_path / "home"), "--token-file", str(token_file)]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV} | SERVER_ENV
    log = tmp_path / "server.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}/mcp"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    pytest.fail(f"the MCP server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        yield url, "s3cret-token"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_http_session_with_token(http_server: tuple[str, str]) -> None:
    url, token = http_server
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
        refused = httpx.post(url, json=ping, headers=headers)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["code"] == "unauthorized"

    async def main() -> None:
        timeout = httpx2.Timeout(30, read=300)
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as http:
            async with Client(streamable_http_client(url, http_client=http)) as client:
                await exercise(client)

    anyio.run(main)


def test_http_says_where_it_listens_and_stops_at_once(tmp_path: Path) -> None:
    """`linmem mcp --transport http` prints its URL (a free port for --port 0), home and auth
    mode; a session's errors name no server path; SIGINT ends the process within seconds."""
    home = tmp_path / "home"
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    argv = [sys.executable, "-m", "linmem", "mcp", "--transport", "http", "--port", "0"]
    argv += ["--home", str(home), "--token-file", str(token_file)]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV} | SERVER_ENV
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        banner = proc.stderr.readline()  # the SDK logs only warnings: the banner comes first
        found = re.match(r"linmem mcp: (http://127\.0\.0\.1:(\d+)/mcp) ", banner)
        assert found and int(found.group(2)) > 0, banner + proc.stderr.read()
        assert f"home {home};" in banner and "token required" in banner, banner

        async def main() -> None:
            headers = {"Authorization": "Bearer s3cret-token"}
            async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120)) as http:
                async with Client(streamable_http_client(found.group(1), http_client=http)) as client:
                    await call(client, "memory_write", memory="robot", items=ITEMS)
                    missing = await error_text(client, "memory_query", memory="nowhere", question="Hi?")
                    assert "no_such_memory" in missing and "<home>" in missing and str(home) not in missing
                    proc.send_signal(signal.SIGINT)  # with the session still open
                    started = time.monotonic()
                    while proc.poll() is None and time.monotonic() - started < 30:
                        await anyio.sleep(0.05)
                    assert proc.poll() == 0 and time.monotonic() - started < 5, proc.poll()

        anyio.run(main)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_client_config_is_the_readme_snippet() -> None:
    entry = json.loads(CLIENT_CONFIG)["mcpServers"]["linmem"]
    assert entry["command"] == "linmem" and entry["args"] == ["mcp"] and "LINMEM_HOME" in entry["env"]
    readme = README.read_text(encoding="utf-8")
    if "mcpServers" not in readme:
        pytest.skip("the README does not show the MCP client config yet")
    assert CLIENT_CONFIG.strip() in readme


def test_http_refuses_an_open_network_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(BadInput, match="without a token"):
        run(home=tmp_path / "home", transport="http", host="0.0.0.0", port=free_port())
    assert not (tmp_path / "home").exists()


def test_default_backend_is_checked(tmp_path: Path) -> None:
    with pytest.raises(UnknownSpec, match="vector"):
        build_server(Service(tmp_path, ram_budget=None), default_backend="vector")
