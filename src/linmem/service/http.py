"""The HTTP API (`linmem serve`): FastAPI routes over `Service`, each a few lines calling one method.

Before any route runs, one ASGI guard checks the bearer token and the body size, so a refused
request never reaches a handler and an oversized body is never parsed. Every error is the JSON
object ``{"error": {"code", "message"}}`` with the library's stable codes, its message without
the server's paths (`redact`; the log keeps them). Routes are plain functions, which FastAPI
runs in its thread pool: the `Service` serialises writes to a memory, runs reads concurrently
and batches questions that arrive together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import BadInput, LinmemError
from ..itemfile import json_failure
from .core import (
    AUTH_REQUIRED,
    DEFAULT_RAM_BUDGET,
    MAX_ITEM_BYTES,
    MAX_K,
    MAX_NEW_TOKENS,
    MAX_ROUNDS,
    Allowed,
    NoSuchItem,
    Service,
    auth_mode,
    bearer_ok,
    check_exposure,
    check_items,
    client_message,
    is_loopback,
    load_token,
    redact,
    run_server,
)

MAX_REQUEST_BYTES = 8 * 2**20

READ_THREADS = 16

STATUS = {
    "bad_name": 400,
    "bad_host": 421,
    "bad_origin": 403,
    "not_allowed": 403,
    "unknown_spec": 400,
    "unauthorized": 401,
    "no_such_memory": 404,
    "no_such_item": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "conflict": 409,
    "empty_memory": 409,
    "too_large": 413,
    "bad_input": 422,
    "context_overflow": 422,
    "validation": 422,
    "internal": 500,
    "corrupt_memory": 500,
    "engine_error": 502,
    "model_unavailable": 503,
    "disk_full": 507,
}
LM_OPTIONS = ("model", "stateless", "max_new_tokens", "context_length", "overflow")
EMBEDDING_OPTIONS = ("embedder", "top_k", "threshold")
HYBRID_OPTIONS = ("embedder", "top_k", "lexical_weight", "second_line", "rerank", "rerank_depth", "model")
_OPTIONS = {"lm": LM_OPTIONS, "embedding": EMBEDDING_OPTIONS, "hybrid": HYBRID_OPTIONS}


class ErrorDetail(BaseModel):
    code: str = Field(examples=["no_such_memory"])
    message: str = Field(examples=["no memory named 'x' in <home> (existing: none yet)"])


class ErrorBody(BaseModel):
    """Every error: a stable `code` to branch on and a `message` for people."""

    error: ErrorDetail


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateRequest(_Body):
    name: str


class WriteRequest(_Body):
    items: list[Any] = Field(min_length=1, description="objects: text (required), clip, time, source, meta")


class _ReadRequest(_Body):
    backend: Literal["lm", "embedding", "hybrid"] = "lm"
    model: str | None = Field(
        None,
        description="LM spec, one of those the server allows (--allow-model); for the hybrid reader, "
        "the re-ranking LM (with rerank)",
    )
    stateless: bool | None = None
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    context_length: int | None = Field(None, ge=1, le=2**24)
    overflow: Literal["error", "window"] | None = None
    embedder: str | None = Field(
        None, description="embedding spec, one of those the server allows (--allow-embedder), or hash:DIM"
    )
    top_k: int | None = Field(None, ge=1, le=MAX_K)
    threshold: float | None = Field(None, allow_inf_nan=False)
    lexical_weight: float | None = Field(None, ge=0, le=1, description="hybrid: the lexical half's weight")
    second_line: float | None = Field(None, ge=0, le=1, description="hybrid: weight of a clip's second line")
    rerank: Literal["lm"] | None = Field(
        None, description="hybrid: let the LM (model) re-rank the best clips"
    )
    rerank_depth: int | None = Field(
        None, ge=1, le=MAX_K, description="hybrid: how many clips the LM re-ranks"
    )

    def options(self) -> dict[str, Any]:
        """The reader's options that were given; one meant for another backend is refused."""
        mine = _OPTIONS[self.backend]
        known = dict.fromkeys(o for options in _OPTIONS.values() for o in options)
        given = {k: v for k in known if (v := getattr(self, k)) is not None}
        stray = sorted(set(given) - set(mine))
        if stray:
            raise BadInput(
                f"option {stray[0]!r} is not the {self.backend} reader's (it takes {', '.join(mine)})"
            )
        return given


class _Question(_ReadRequest):
    """A read's question, under either name: clients written against `linmem ask` say query,
    those thinking of the agent say question, and every read route takes both."""

    query: str | None = Field(None, min_length=1, description="the question (or give it as question)")
    question: str | None = Field(None, min_length=1, description="the same as query")

    @model_validator(mode="after")
    def _one_question(self) -> Self:
        if self.query is None and self.question is None:
            raise PydanticCustomError("missing", "query (or question) is required")
        if None not in (self.query, self.question) and self.query != self.question:
            raise PydanticCustomError("ambiguous", "query and question differ: give one of them")
        return self

    @property
    def text(self) -> str:
        text = self.query if self.query is not None else self.question
        assert text is not None  # _one_question
        return text


class AskRequest(_Question):
    pass


class RankRequest(_Question):
    # Search defaults to the hybrid reader: milliseconds, no model to load.
    backend: Literal["lm", "embedding", "hybrid"] = "hybrid"
    k: int = Field(5, ge=1, le=MAX_K)


class AgentRequest(_Question):
    controller: str | None = Field(
        None, description="the controller's LM spec (needed by policy m3), one the server allows"
    )
    policy: Literal["m3", "single-shot"] = "m3"
    rounds: int = Field(5, ge=1, le=MAX_ROUNDS)


def create_app(
    service: Service,
    *,
    token: str | None,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_item_bytes: int = MAX_ITEM_BYTES,
    host: str | None = None,
) -> FastAPI:
    """The API over `service`. With a `token`, every route but /health needs
    ``Authorization: Bearer <token>``. `host` is the address the server listens on: on a loopback
    address, requests must name a loopback host (and origin, when they carry one), which keeps a
    web page the user visits from reaching the API through DNS rebinding."""
    app = FastAPI(
        title="linmem",
        version=__version__,
        description="Named agent memories, read by a language model or an embedding reader.",
        openapi_tags=[
            {"name": "memories", "description": "create, list, inspect and delete memories"},
            {"name": "items", "description": "append, read and delete a memory's items"},
            {"name": "reads", "description": "answer, rank and run the agent over a memory"},
            {"name": "service", "description": "liveness"},
        ],
        responses={s: {"model": ErrorBody} for s in (400, 401, 404, 413, 422, 500)},
    )
    app.add_middleware(
        _Guard, token=token, max_bytes=max_request_bytes, loopback=host is not None and is_loopback(host)
    )
    _add_error_handlers(app, service.home)
    _memory_routes(app, service)
    _item_routes(app, service, max_item_bytes)
    _read_routes(app, service)
    return app


def serve(
    home: str | Path | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    token_file: str | Path | None = None,
    ram_budget: int | None = DEFAULT_RAM_BUDGET,
    allowed: Allowed | None = None,
) -> None:
    """Run the API with uvicorn until SIGINT or SIGTERM, printing its URL, home and auth mode on
    stderr once it listens (`port` 0: a free one). The token comes from `token_file`, else
    `$LINMEM_API_KEY`; without one, only a loopback `host` is allowed. Requests may use only the
    models and embedders in `allowed`. Stopping takes about a second: requests still running
    then are cancelled (`SHUTDOWN_GRACE_S`)."""
    token = load_token(token_file)
    check_exposure(host, token)
    service = Service(home, ram_budget=ram_budget, allowed=allowed)
    app = create_app(service, token=token, host=host)

    def banner(url: str) -> str:
        return f"linmem serve: {url} (home {service.home}; {auth_mode(token)}; Ctrl+C stops)"

    run_server(app, host=host, port=port, log_level="info", banner=banner)


def _memory_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health", tags=["service"])
    async def health() -> dict[str, str]:  # on the event loop: alive even when every worker is busy
        return {"status": "ok", "version": __version__}

    @app.get("/v1/memories", tags=["memories"])
    def list_memories() -> dict[str, Any]:
        return {"memories": [_without_paths(m, service.home) for m in service.memories()]}

    @app.post("/v1/memories", status_code=201, tags=["memories"])
    def create_memory(body: CreateRequest) -> dict[str, Any]:
        return service.create(body.name)

    @app.get("/v1/memories/{name}", tags=["memories"])
    def memory_stats(name: str) -> dict[str, Any]:
        return service.stats(name)

    @app.delete("/v1/memories/{name}", tags=["memories"])
    def delete_memory(name: str) -> dict[str, Any]:
        service.delete(name)
        return {"name": name, "deleted": True}


def _without_paths(summary: dict[str, Any], home: Path) -> dict[str, Any]:
    """A memory's summary as a client sees it: a damaged one's error without the server's paths."""
    error = summary.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return summary
    return {**summary, "error": {**error, "message": redact(error["message"], home)}}


def _item_routes(app: FastAPI, service: Service, max_item_bytes: int) -> None:
    @app.post("/v1/memories/{name}/items", tags=["items"])
    def write_items(name: str, body: WriteRequest) -> dict[str, Any]:
        """Append the items atomically: one bad item and nothing is written."""
        written = service.write(name, check_items(body.items, max_item_bytes=max_item_bytes))
        return {"ids": [i.id for i in written]}

    @app.get("/v1/memories/{name}/items", tags=["items"])
    def list_items(
        name: str, after: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)
    ) -> dict[str, Any]:
        """Items with ids above `after`, in log order; `next_after` continues the listing."""
        items = service.items(name, after=after, limit=limit)
        more = len(items) == limit
        return {"items": [i.to_dict() for i in items], "next_after": items[-1].id if more else None}

    @app.get("/v1/memories/{name}/items/{item_id}", tags=["items"])
    def get_item(name: str, item_id: int) -> dict[str, Any]:
        return service.item(name, item_id).to_dict()

    @app.delete("/v1/memories/{name}/items/{item_id}", tags=["items"])
    def delete_item(name: str, item_id: int) -> dict[str, Any]:
        if not service.forget(name, [item_id]):
            raise NoSuchItem(f"memory {name!r} has no item {item_id}")
        return {"id": item_id, "deleted": True}


def _read_routes(app: FastAPI, service: Service) -> None:
    # Reads run in threads of their own, at most READ_THREADS at once: slow reads (a long prefill,
    # a slow endpoint) then queue among themselves and never take the threads writes run in.
    limiter: list[anyio.CapacityLimiter] = []

    async def in_read_thread(call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if not limiter:
            limiter.append(anyio.CapacityLimiter(READ_THREADS))
        # Abandoned when the request is cancelled (a server stopping), so no read holds up the stop.
        return await anyio.to_thread.run_sync(call, limiter=limiter[0], abandon_on_cancel=True)

    @app.post("/v1/memories/{name}/ask", tags=["reads"])
    async def ask(name: str, body: AskRequest) -> dict[str, Any]:
        options = body.options()
        return await in_read_thread(
            lambda: service.ask(name, body.text, backend=body.backend, **options).to_dict()
        )

    @app.post("/v1/memories/{name}/rank", tags=["reads"])
    async def rank(name: str, body: RankRequest) -> dict[str, Any]:
        options = body.options()
        return await in_read_thread(
            lambda: service.rank(name, body.text, body.k, backend=body.backend, **options).to_dict()
        )

    @app.post("/v1/memories/{name}/agent", tags=["reads"])
    async def agent(name: str, body: AgentRequest) -> dict[str, Any]:
        options = body.options()
        return await in_read_thread(
            lambda: service.agent(
                name,
                body.text,
                controller=body.controller,
                policy=body.policy,
                rounds=body.rounds,
                backend=body.backend,
                **options,
            )  # fmt: skip
        )


def error_response(code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, STATUS.get(code, 400), headers)


def _add_error_handlers(app: FastAPI, home: Path) -> None:
    async def linmem_error(request: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, LinmemError)
        return error_response(e.code, client_message(e, home, f"{request.method} {request.url.path}"))

    async def http_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, HTTPException)
        if e.status_code == 400 and isinstance(e.__cause__, ValueError | RecursionError):
            # FastAPI's json.loads failed other than on syntax (a number past Python's int-string
            # limit, nesting past the recursion limit, bytes that are not UTF-8): the client's to fix.
            return error_response("bad_input", f"the request body is {json_failure(e.__cause__)}")
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        response = error_response(code, str(e.detail), e.headers)
        response.status_code = e.status_code
        return response

    async def validation_error(_: Request, e: Exception) -> JSONResponse:
        assert isinstance(e, RequestValidationError)
        return error_response("validation", "; ".join(_describe(err) for err in e.errors()))

    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        # Starlette re-raises after this response, so the server logs the traceback; clients never see it.
        return error_response("internal", "internal error (see the server log)")

    app.add_exception_handler(LinmemError, linmem_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


def _describe(err: Any) -> str:
    """One validation error as a sentence: where (``query.limit``, ``items[0]``) and what."""
    loc = list(err.get("loc", ()))
    where = ""
    for part in loc[1:] if loc[:1] == ["body"] else loc:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
    where = where or "body"
    if err.get("type") == "extra_forbidden":
        return f"unknown field {where!r}"
    if err.get("type") == "json_invalid":
        return f"invalid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
    return f"{where}: {err.get('msg')}"


class _Guard:
    """ASGI middleware run before routing: the bearer token, then the body size.

    The body is read here, counting bytes as they arrive (a declared Content-Length too large is
    refused before reading), and handed to the app only when it fits, so no handler ever runs for
    a refused request and no oversized body is parsed.
    """

    def __init__(self, app: ASGIApp, *, token: str | None, max_bytes: int, loopback: bool = False) -> None:
        self.app = app
        self.token = token.encode() if token is not None else None
        self.max_bytes = max_bytes
        self.loopback = loopback

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None:
            body, refusal = await self._read_body(receive)
            if body is not None:
                await self.app(scope, _replay(body, receive), send)
        if refusal is not None:
            await refusal(scope, receive, send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        headers = dict(scope["headers"])
        if self.loopback and (refused := _foreign(headers)) is not None:
            return refused
        if self.token is not None and scope["path"] != "/health" and not bearer_ok(headers, self.token):
            return error_response("unauthorized", AUTH_REQUIRED, {"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return self._too_large(int(length))
        return None

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, JSONResponse | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None, self._too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self, declared: int | None) -> JSONResponse:
        # No "Connection: close": the server then discards the rest of the body and the client,
        # still sending, gets to read this answer instead of a reset connection.
        size = "larger" if declared is None else f"{declared} bytes, more"
        return error_response(
            "too_large", f"the request body is {size} than the limit of {self.max_bytes} bytes"
        )


_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def _hostname(value: str) -> str:
    """The host part of a Host header value or an origin's netloc, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _foreign(headers: Mapping[bytes, bytes]) -> JSONResponse | None:
    """Refuse a request to a loopback server that names another host or comes from another
    origin: a browser that resolved an attacker's name to 127.0.0.1 still sends that name."""
    host = headers.get(b"host", b"").decode("latin-1")
    if _hostname(host) not in _LOOPBACK_NAMES:
        return error_response(
            "bad_host", f"this server answers only requests to a loopback host, not {host!r}"
        )
    origin = headers.get(b"origin")
    if origin is not None:
        netloc = urlsplit(origin.decode("latin-1")).netloc
        if _hostname(netloc) not in _LOOPBACK_NAMES:
            return error_response(
                "bad_origin", f"requests from origin {origin.decode('latin-1')!r} are refused"
            )
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the body already read, then defers to the server's."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
