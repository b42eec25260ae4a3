"""The MCP server (`linmem mcp`): four tools over one `Service`, on stdio or streamable HTTP.

Tools: `memory_write`, `memory_query`, `memory_search`, `memory_list`. Each is a thin adapter
over the service; a linmem error comes back as an MCP tool error whose text starts with the
error's code (`no_such_memory: ...`), so a model can read it and correct its call.

The reader a call uses when it names none is the server's default: `hybrid` (BM25 over the log's
full-text index fused with the embedder that ships with linmem: milliseconds, and a desktop client
works without a GPU or a model download), or what `LINMEM_MCP_BACKEND` / `LINMEM_MCP_MODEL` or
`run()` say. A `memory_query` that names a model but no backend is read by that model (`lm`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage
from mcp.types import (
    INVALID_PARAMS,
    CallToolResult,
    ErrorData,
    JSONRPCError,
    JSONRPCResponse,
    TextContent,
    ToolAnnotations,
)
from pydantic import Field, ValidationError, WithJsonSchema
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from typing_extensions import TypedDict

from .. import __version__
from ..errors import BadInput, LinmemError, UnknownSpec
from ..readers import BACKENDS
from ..types import Answer, Item
from .core import (
    AUTH_REQUIRED,
    MAX_ITEM_BYTES,
    Allowed,
    Conflict,
    Service,
    auth_mode,
    bearer_ok,
    check_exposure,
    check_items,
    client_message,
    load_token,
    run_server,
)

ENV_BACKEND = "LINMEM_MCP_BACKEND"
ENV_MODEL = "LINMEM_MCP_MODEL"
DEFAULT_BACKEND = "hybrid"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8766
HTTP_PATH = "/mcp"

# The server entry for desktop MCP clients (Claude Desktop, Cursor, ...); the README shows it verbatim.
CLIENT_CONFIG = """\
{
  "mcpServers": {
    "linmem": {
      "command": "linmem",
      "args": ["mcp"],
      "env": {"LINMEM_HOME": "/path/to/linmem-home"}
    }
  }
}
"""

INSTRUCTIONS = (
    "linmem keeps long-term memories: named, append-only logs of items (observations, video-clip "
    "captions, dialogue turns, notes). Save what you will need later with memory_write, ask a memory "
    "a question with memory_query, find the clips relevant to something with memory_search, and see "
    "which memories exist with memory_list."
)

Backend = Literal["lm", "embedding", "hybrid"]

_ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "description": "the item itself (required, non-empty)"},
        "clip": {
            "type": ["integer", "null"],
            "minimum": 0,
            "description": "video-clip or dialogue-session index; items of one clip are read together",
        },
        "time": {"type": ["string", "null"], "description": 'free text: "06:00-06:30", "2024-05-01 09:00"'},
        "source": {"type": ["string", "null"], "description": "the video or conversation it comes from"},
        "meta": {"type": "object", "description": "any JSON object kept with the item"},
    },
    "required": ["text"],
    "additionalProperties": False,
}

# Items are checked by linmem's own item parser (the one `linmem write` uses), so the schema is
# published as written here and the arguments reach the parser untouched.
ItemsArg = Annotated[
    list[Any],
    WithJsonSchema({"type": "array", "items": _ITEM_SCHEMA, "minItems": 1}),
    Field(description="the items to append, in order"),
]
MemoryArg = Annotated[str, Field(description="memory name: 1-64 letters, digits, '.', '_' or '-'")]
CreateArg = Annotated[bool, Field(description="create the memory if it does not exist")]
BackendArg = Annotated[
    Backend | None,
    Field(
        description='"lm": a language model reads the whole memory and answers in prose; "hybrid": '
        'keyword (BM25) and similarity search fused, returning the best clips verbatim; "embedding": '
        "similarity search alone (M3-Agent's baseline). Default: the server's setting."
    ),
]
ModelArg = Annotated[
    str | None,
    Field(
        description="model spec for the chosen backend: an LM for lm (hf:REPO, gguf:NAME, openai:URL#MODEL, "
        "tiny:NAME), an embedder for embedding and hybrid (st:NAME, hash:DIM, openai:URL#MODEL). "
        "Default: the server's setting."
    ),
]


class TokensOut(TypedDict):
    """Token accounting: the memory's length, tokens run for this call, tokens served from a cache,
    tokens generated."""

    memory: int | None
    processed: int
    cached: int
    generated: int


class TimingsOut(TypedDict):
    """Wall-clock seconds."""

    total_s: float
    prefill_s: float | None
    query_s: float | None
    generate_s: float | None


class HitOut(TypedDict):
    """A clip (or an unclipped item) and its lines verbatim; `score` is the embedding reader's cosine."""

    clip: int | None
    score: float | None
    item_ids: list[int]
    lines: list[str]


class AnswerOut(TypedDict):
    """A reader's answer: its text, the clip ids it cites (best first for a search), the model that
    read, tokens, timings, the clips found with their lines, and notes."""

    answer: str
    clips: list[int]
    model: str
    tokens: TokensOut
    timings: TimingsOut
    hits: list[HitOut]
    notes: list[str]


class WriteOut(TypedDict):
    """The memory written to, how many items were written, their ids, and the memory's item count."""

    memory: str
    written: int
    ids: list[int]
    items: int


class MemoryOut(TypedDict):
    name: str
    items: int


class ListOut(TypedDict):
    """Every memory on this server with its item count."""

    memories: list[MemoryOut]


WRITE_DOC = """\
Append items to a named memory, a durable append-only log. An item is one observation, video-clip
caption, dialogue turn or note: {"text": ..., "clip": 12, "time": "06:00-06:30", "source": "kitchen",
"meta": {...}}; only "text" is required. Give items of one clip or session the same "clip" number so
they are read together. The batch is atomic: if any item is invalid, nothing is written and the
error names the item. The memory is created if it does not exist (unless create is false).
Returns the new items' ids."""

QUERY_DOC = """\
Answer a question from a memory. With backend "lm" a language model reads the whole memory and
answers in natural language, citing the clips it used; with "hybrid" (keyword and similarity search
fused) or "embedding" (similarity alone) the answer is the memory's best-matching clips, verbatim.
Returns the answer, the cited clip ids, the model, token counts and timings (and, for "hybrid" and
"embedding", the clips found with their lines in "hits")."""

SEARCH_DOC = """\
Find the k clips of a memory most relevant to a query, best first. Returns their ids in "clips" and,
in "hits", each clip with its lines verbatim (and, for the "hybrid" and "embedding" backends, its
score). Use it to look up what the memory holds about something; use memory_query to get an
answer."""

LIST_DOC = "List the memories on this server, each with its number of items."


_F = TypeVar("_F", bound=Callable[..., Any])


def _tool_errors(fn: _F, home: Path) -> _F:
    """Report a linmem error as a tool error (`code: message`) for the model to read, without the
    server's paths (the log keeps them); anything else is a crash, which the SDK reports without
    its text."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LinmemError as e:
            raise ToolError(f"{e.code}: {client_message(e, home, fn.__name__)}") from e

    return call  # type: ignore[return-value]


def build_server(
    service: Service, *, default_backend: str = DEFAULT_BACKEND, default_model: str | None = None
) -> MCPServer:
    """The MCP server over `service`. A call that names no backend uses `default_backend`; a call
    that names no model uses `default_model` when its backend is the default one, else the
    library's default model for that backend."""
    if default_backend not in BACKENDS:
        raise UnknownSpec(f"unknown backend {default_backend!r}: expected one of {', '.join(BACKENDS)}")

    def reader(backend: str | None, model: str | None) -> tuple[str, dict[str, Any]]:
        backend = backend or default_backend
        model = model or (default_model if backend == default_backend else None)
        if model is None:
            return backend, {}
        return backend, {"model" if backend == "lm" else "embedder": model}

    def query_reader(backend: str | None, model: str | None) -> tuple[str, dict[str, Any]]:
        # A model named for a question, with no backend, is an LM asked to read the memory.
        if backend is None and model is not None and default_backend != "lm":
            return reader("lm", model)
        return reader(backend, model)

    def memory_write(memory: MemoryArg, items: ItemsArg, create: CreateArg = True) -> WriteOut:
        batch = check_items(items, max_item_bytes=MAX_ITEM_BYTES)  # the HTTP API's limit
        if create:
            _ensure(service, memory)
        written = service.write(memory, batch)
        ids = [i.id for i in written if i.id is not None]
        return {"memory": memory, "written": len(ids), "ids": ids, "items": service.stats(memory)["items"]}

    def memory_query(
        memory: MemoryArg,
        question: Annotated[str, Field(description="the question, in natural language")],
        backend: BackendArg = None,
        model: ModelArg = None,
    ) -> AnswerOut:
        name, options = query_reader(backend, model)
        return _answer_out(service.ask(memory, question, backend=name, **options))

    def memory_search(
        memory: MemoryArg,
        query: Annotated[str, Field(description="what to look for")],
        k: Annotated[int, Field(ge=1, le=100, description="how many clips to return")] = 5,
        backend: BackendArg = None,
        model: ModelArg = None,
    ) -> AnswerOut:
        name, options = reader(backend, model)
        answer = service.rank(memory, query, k, backend=name, **options)
        return _with_clip_lines(service, memory, answer) if name == "lm" else _answer_out(answer)

    def memory_list() -> ListOut:
        return {"memories": [{"name": m["name"], "items": m["items"]} for m in service.memories()]}

    server = MCPServer("linmem", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING")
    for fn, hints, description in (
        (memory_write, ToolAnnotations(read_only_hint=False, destructive_hint=False), WRITE_DOC),
        (memory_query, ToolAnnotations(read_only_hint=True), QUERY_DOC),
        (memory_search, ToolAnnotations(read_only_hint=True), SEARCH_DOC),
        (memory_list, ToolAnnotations(read_only_hint=True), LIST_DOC),
    ):
        tool = _tool_errors(fn, service.home)
        server.add_tool(tool, name=fn.__name__, description=description, annotations=hints)
    return server


def _ensure(service: Service, name: str) -> None:
    with contextlib.suppress(Conflict):
        service.create(name)


def _answer_out(answer: Answer) -> AnswerOut:
    return answer.to_dict()  # type: ignore[return-value]


def _with_clip_lines(service: Service, memory: str, answer: Answer) -> AnswerOut:
    """The LM reader ranks clip ids only; the hits add those clips' lines from the memory's log."""
    by_clip: dict[int, list[Item]] = {c: [] for c in answer.clips}
    for item in service.items(memory, limit=sys.maxsize):
        if item.clip in by_clip:
            by_clip[item.clip].append(item)
    out = _answer_out(answer)
    out["hits"] = [_hit(clip, items) for clip, items in by_clip.items()]
    return out


def _hit(clip: int, items: list[Item]) -> HitOut:
    ids = [i.id for i in items if i.id is not None]
    return {"clip": clip, "score": None, "item_ids": ids, "lines": [i.text for i in items]}


def run(
    home: str | Path | None = None,
    transport: str = "stdio",
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    token_file: str | Path | None = None,
    *,
    backend: str | None = None,
    model: str | None = None,
    allow_models: Sequence[str] = (),
    allow_embedders: Sequence[str] = (),
) -> None:
    """Serve MCP until stopped: on stdin/stdout (`stdio`, what desktop clients launch) or as
    streamable HTTP at http://HOST:PORT/mcp (`http`, its URL printed on stderr once it listens;
    `port` 0 picks a free one). Over HTTP a bearer token (from `token_file`, else
    $LINMEM_API_KEY) is required when one is configured, and always on a non-loopback host.
    `backend` and `model` set the default reader (else $LINMEM_MCP_BACKEND, $LINMEM_MCP_MODEL)."""
    if transport not in ("stdio", "http"):
        raise BadInput(f"unknown transport {transport!r}: expected 'stdio' or 'http'")
    token = load_token(token_file) if transport == "http" else None
    if transport == "http":  # before anything else, so a refused start touches nothing
        check_exposure(host, token)
    default_backend = backend or os.environ.get(ENV_BACKEND) or DEFAULT_BACKEND
    default_model = model or os.environ.get(ENV_MODEL) or None
    # A call may choose only among the server's own models and embedders: the model argument comes
    # from an LLM, which may have read anything.
    allowed = Allowed.of(
        default_model if default_backend == "lm" else None,
        default_model if default_backend in ("embedding", "hybrid") else None,
        allow_models,
        allow_embedders,
    )
    service = Service(home, allowed=allowed)
    server = build_server(service, default_backend=default_backend, default_model=default_model)
    if transport == "stdio":  # stdout is the protocol's: nothing else may be printed there
        anyio.run(_serve_stdio, server)
        return

    def banner(url: str) -> str:
        return f"linmem mcp: {url}{HTTP_PATH} (home {service.home}; {auth_mode(token)}; Ctrl+C stops)"

    app = http_app(server, host=host, token=token)
    run_server(app, host=host, port=port, log_level="warning", banner=banner)


async def _serve_stdio(server: MCPServer) -> None:
    """The SDK's stdio loop, except that a request line its JSON parser refuses but Python's reads
    is answered instead of dropped (which leaves the client waiting for ever): a lone surrogate
    escape such as "\\ud800" is valid JSON, but not text linmem can store."""
    lowlevel = server._lowlevel_server
    async with stdio_server() as (read, write):
        send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)

        async def forward() -> None:
            async with send:
                async for item in read:
                    reply = _unreadable_reply(item) if isinstance(item, Exception) else None
                    await (send.send(item) if reply is None else write.send(reply))

        async with anyio.create_task_group() as tg:
            tg.start_soon(forward)
            await lowlevel.run(receive, write, lowlevel.create_initialization_options())


def _unreadable_reply(error: Exception) -> SessionMessage | None:
    """The answer to a request the SDK could not parse but Python's json can: a tool error
    (`bad_input: ...`) for a tool call, an invalid-params error for any other request."""
    line = error.errors()[0].get("input") if isinstance(error, ValidationError) and error.errors() else None
    try:
        request = json.loads(line) if isinstance(line, str) else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(request, dict) or not isinstance(request.get("id"), int | str):
        return None
    where = _lone_surrogate(request.get("params"), "params")
    what = f"bad_input: {where} is not valid Unicode (a lone surrogate)" if where else "bad_input: unreadable"
    if request.get("method") == "tools/call":
        result = CallToolResult(content=[TextContent(type="text", text=what)], is_error=True)
        body = result.model_dump(by_alias=True, exclude_none=True)
        return SessionMessage(JSONRPCResponse(jsonrpc="2.0", id=request["id"], result=body))
    refusal = ErrorData(code=INVALID_PARAMS, message=what)
    return SessionMessage(JSONRPCError(jsonrpc="2.0", id=request["id"], error=refusal))


def _lone_surrogate(value: Any, where: str) -> str | None:
    """Where in a parsed JSON value the first text that is not valid Unicode is, if anywhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        for key, inner in value.items():
            if found := _lone_surrogate(key, f"{where} key") or _lone_surrogate(inner, f"{where}.{key}"):
                return found
    if isinstance(value, list):
        for i, inner in enumerate(value):
            if found := _lone_surrogate(inner, f"{where}[{i}]"):
                return found
    return None


def http_app(server: MCPServer, *, host: str = DEFAULT_HOST, token: str | None = None) -> ASGIApp:
    """The streamable-HTTP ASGI app at `/mcp`, behind the bearer token when one is given. (The SDK
    keeps its DNS-rebinding protection on for a loopback `host`.)"""
    app = server.streamable_http_app(streamable_http_path=HTTP_PATH, host=host)
    return app if token is None else BearerAuth(app, token)


class BearerAuth:
    """ASGI middleware: an HTTP request must carry `Authorization: Bearer <token>`.

    The SDK's own auth is OAuth (an authorization server and a token verifier); one shared token,
    as the HTTP API uses (`load_token`, `check_exposure`), needs only this check in front of the app."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (
            scope["type"] == "http" and bearer_ok(dict(scope["headers"]), self._token)
        ):
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            body = {"error": {"code": "unauthorized", "message": AUTH_REQUIRED}}
            response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)


__all__ = ["CLIENT_CONFIG", "BearerAuth", "build_server", "http_app", "run"]
