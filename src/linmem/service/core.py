"""The library as a long-lived service: what the HTTP API and the MCP server both call.

One `Service` per process owns the open memories. Writes to one memory are serialised by a lock
of its own; reads run concurrently. Models are loaded once per process (the engine registry) and
shared. Questions that reach one local-model reader at the same moment are answered together in
one batched forward pass (`read_many`), which is exact. State snapshots stay in RAM under a byte
budget, least recently used out first, and are reloaded from disk when needed again.
"""

from __future__ import annotations

import contextlib
import hmac
import importlib
import ipaddress
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._spec import split as split_spec
from ..embedders import DEFAULT_EMBEDDER, canonical_spec
from ..engines import DEFAULT_MODEL
from ..engines.base import BatchedEngine
from ..errors import BadInput, LinmemError, NoSuchMemory, NotAllowed
from ..itemfile import item_from_dict, stored_bytes
from ..memory import Memory, check_name, default_home, delete_memory, memories, open_memory, summaries
from ..state import set_ram_budget
from ..types import Answer, Item

DEFAULT_RAM_BUDGET = 2 * 2**30
BATCH_WINDOW_S = 0.005
BATCH_MAX = 8
# Upper bounds on what one request may ask for: each multiplies work or memory.
MAX_K = 100
MAX_NEW_TOKENS = 4096
MAX_ROUNDS = 20
MAX_HASH_DIM = 4096
TINY_MODELS = ("tiny:kimi-linear", "tiny:qwen3.5", "tiny:qwen3")


class Conflict(LinmemError):
    code = "conflict"


class TooLarge(LinmemError):
    code = "too_large"


class MissingExtra(LinmemError):
    code = "missing_extra"


class NoSuchItem(NoSuchMemory):
    """The memory exists but holds no item with that id (a subclass, so `except NoSuchMemory` still
    catches it; its own code tells a client the memory itself is there)."""

    code = "no_such_item"


@dataclass(frozen=True)
class Allowed:
    """The models and embedders a service may use: requests choose among these, never a spec of
    their own. A spec names code to load or a URL to call (with the server's API key), so letting
    callers name one would let them turn the server against its host or its network.

    `models[0]` and `embedders[0]` are the defaults. The tiny random-weights models are always
    allowed (they are built in code), as are hash embedders up to `MAX_HASH_DIM` dimensions.
    """

    models: tuple[str, ...] = (DEFAULT_MODEL,)
    embedders: tuple[str, ...] = (DEFAULT_EMBEDDER,)

    @classmethod
    def of(
        cls,
        model: str | None = None,
        embedder: str | None = None,
        more_models: Sequence[str] = (),
        more_embedders: Sequence[str] = (),
    ) -> Allowed:
        """The default model and embedder (the library's when None) and any more to allow."""
        models = (model or DEFAULT_MODEL, *more_models)
        embedders = (embedder or DEFAULT_EMBEDDER, *more_embedders)
        return cls(tuple(m.strip() for m in models), tuple(canonical_spec(e) for e in embedders))

    def model(self, spec: str | None) -> str:
        spec = (spec or self.models[0]).strip()
        if spec in self.models or spec in TINY_MODELS:
            return spec
        raise NotAllowed(
            f"model {spec!r} is not one this server was started with; allowed: "
            f"{', '.join(self.models + TINY_MODELS)} (start it with --allow-model SPEC to add one)"
        )

    def embedder(self, spec: str | None) -> str:
        key = canonical_spec(spec or self.embedders[0])
        if key in {canonical_spec(e) for e in self.embedders}:
            return key
        parsed = split_spec(key)
        if parsed.scheme == "hash" and parsed.target.isdigit() and 1 <= int(parsed.target) <= MAX_HASH_DIM:
            return key
        raise NotAllowed(
            f"embedder {key!r} is not one this server was started with; allowed: "
            f"{', '.join(self.embedders)}, hash:DIM up to {MAX_HASH_DIM} "
            "(start it with --allow-embedder SPEC to add one)"
        )

    def options(self, backend: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """A request's reader options with its model or embedder checked against this list."""
        out = dict(options)
        if backend == "lm":
            out["model"] = self.model(out.get("model"))
        elif backend in ("embedding", "hybrid"):
            out["embedder"] = self.embedder(out.get("embedder"))
            if backend == "hybrid" and out.get("rerank") is not None:
                out["model"] = self.model(out.get("model"))
            elif out.get("model") is not None:
                out["model"] = self.model(out["model"])  # refused by the reader, but never loaded
        return out


@dataclass
class _Handle:
    memory: Memory
    write_lock: threading.Lock = field(default_factory=threading.Lock)
    pending: set[Future[None]] = field(default_factory=set)
    deleted: bool = False


class Service:
    """Named memories under one home, safe to call from many threads.

    `allowed` lists the models and embedders requests may use (see `Allowed`).
    """

    def __init__(
        self,
        home: str | Path | None = None,
        *,
        ram_budget: int | None = DEFAULT_RAM_BUDGET,
        allowed: Allowed | None = None,
    ) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.allowed = allowed or Allowed()
        set_ram_budget(ram_budget)
        self._handles: dict[str, _Handle] = {}
        self._lock = threading.Lock()
        self._batchers: weakref.WeakKeyDictionary[Any, dict[str, _Batcher]] = weakref.WeakKeyDictionary()
        self._updates = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linmem-update")

    # Memories

    def _handle(self, name: str) -> _Handle:
        check_name(name)
        with self._lock:
            handle = self._handles.get(name)
            if handle is None:
                handle = self._handles[name] = _Handle(open_memory(name, home=self.home))
            return handle

    def memories(self) -> list[dict[str, Any]]:
        """Every memory with its item count; logs are not kept open for this (a listing of
        thousands of memories costs no file descriptors), and a damaged one shows its error."""
        return summaries(self.home)

    def create(self, name: str) -> dict[str, Any]:
        check_name(name)
        with self._lock:
            if name in memories(self.home):
                raise Conflict(f"memory {name!r} already exists")
            self._handles[name] = _Handle(open_memory(name, home=self.home, create=True))
        return {"name": name, "items": 0}

    def delete(self, name: str) -> None:
        """Delete a memory once its background updates have finished (queued ones are skipped),
        so no update writes into a memory after it is gone."""
        handle = self._handle(name)
        with handle.write_lock:
            handle.deleted = True
            for update in list(handle.pending):
                update.cancel()
            wait(list(handle.pending))
            with self._lock:
                if self._handles.get(name) is handle:
                    del self._handles[name]
            handle.memory.close()
            delete_memory(name, home=self.home)

    def stats(self, name: str) -> dict[str, Any]:
        state = self._handle(name).memory.state()
        return {"name": name, "items": state.count, "log_version": state.version, "epoch": state.epoch}

    # Items

    def write(self, name: str, items: Sequence[Item]) -> list[Item]:
        """Append a batch atomically; returns right after the commit.

        The live readers absorb the items afterwards, on one background thread: extending an LM
        snapshot waits for the model, which may be busy with reads, and an acknowledgement should
        not. A read that comes first catches up by itself; the result is the same either way.
        """
        handle = self._handle(name)
        with handle.write_lock:
            if handle.deleted:
                raise NoSuchMemory(f"memory {name!r} was deleted")
            written = handle.memory.write(items, update_readers=False)
            update = self._updates.submit(_update_readers, handle, written)
            handle.pending.add(update)
        update.add_done_callback(handle.pending.discard)
        return written

    def items(self, name: str, *, after: int = 0, limit: int = 100) -> list[Item]:
        return self._handle(name).memory.log.items(after_id=after, limit=limit)

    def item(self, name: str, item_id: int) -> Item:
        found = self._handle(name).memory.log.items(ids=[item_id])
        if not found:
            raise NoSuchItem(f"memory {name!r} has no item {item_id}")
        return found[0]

    def forget(self, name: str, ids: Sequence[int]) -> int:
        handle = self._handle(name)
        with handle.write_lock:
            return handle.memory.forget(ids)

    # Reads

    def reader(self, name: str, backend: str = "lm", **options: Any) -> Any:
        """The reader of memory `name` for `backend` with these options, its model or embedder
        checked against the allowed ones first."""
        check_bounds(options)
        return self._handle(name).memory.reader(backend, **self.allowed.options(backend, options))

    def ask(self, name: str, query: str, *, backend: str = "lm", **options: Any) -> Answer:
        reader = self.reader(name, backend, **options)
        return self._batcher(reader, "read").submit(query, reader.read_many)

    def rank(self, name: str, query: str, k: int = 5, *, backend: str = "hybrid", **options: Any) -> Answer:
        check_bounds({"k": k})
        reader = self.reader(name, backend, **options)
        return self._batcher(reader, f"rank:{k}").submit(query, _ranker(reader, k))

    def agent(self, name: str, question: str, *, controller: str | None = None, policy: str = "m3",
              rounds: int = 5, backend: str = "lm", **options: Any) -> dict[str, Any]:  # fmt: skip
        from ..agent import Agent, check_settings

        check_bounds({"rounds": rounds})
        if controller is not None:
            controller = self.allowed.model(controller)
        check_settings(policy, controller, rounds)  # before a reader loads its model
        reader = self.reader(name, backend, **options)
        return Agent(reader, controller=controller, policy=policy, rounds=rounds).run(question).to_dict()

    def _batcher(self, reader: Any, kind: str) -> _Batcher:
        """The batcher of one reader and kind of read. It holds no reference to the reader (the
        caller hands in what to run), so a reader evicted from its memory is freed with it."""
        with self._lock:
            kinds = self._batchers.setdefault(reader, {})
            if kind not in kinds:
                engine = getattr(reader, "engine", None)
                batched = isinstance(engine, BatchedEngine) and engine.can_batch()
                kinds[kind] = _Batcher(window_s=BATCH_WINDOW_S if batched else 0.0)
            return kinds[kind]


def check_bounds(options: Mapping[str, Any]) -> None:
    """Refuse a request whose `k`, `top_k`, `max_new_tokens` or `rounds` is past its bound."""
    for key, bound in (
        ("k", MAX_K),
        ("top_k", MAX_K),
        ("max_new_tokens", MAX_NEW_TOKENS),
        ("rounds", MAX_ROUNDS),
    ):
        value = options.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound
        ):
            raise BadInput(f"{key} must be an integer from 1 to {bound}, found {value!r}")


class _Batcher:
    """Collects the questions that reach one reader within a few milliseconds and answers them
    with one `read_many`; a question whose batch fails is answered (or fails) on its own.

    One caller at a time leads: it waits the window, takes up to `BATCH_MAX` questions in arrival
    order and answers them. A leader stops leading once its own question is answered, and another
    waiting caller takes over, so no caller serves others' batches for longer than it takes to
    reach its own (each batch it serves moves it `BATCH_MAX` places up the queue).
    """

    def __init__(self, *, window_s: float) -> None:
        self.window_s = window_s
        self._queue: list[tuple[str, Future[Answer]]] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = False

    def submit(self, query: str, run: Callable[[list[str]], list[Answer]]) -> Answer:
        """`run([query])[0]`, answered in a batch with the questions that arrive meanwhile (every
        caller of one batcher hands in the same reader's `run`)."""
        if self.window_s <= 0:
            return run([query])[0]
        future: Future[Answer] = Future()
        with self._lock:
            self._queue.append((query, future))
        while not future.done():
            with self._lock:
                self._idle.wait_for(lambda: future.done() or not self._busy)
                if future.done():
                    break
                self._busy = True
            try:
                self._serve_one_batch(run)
            finally:
                with self._lock:
                    self._busy = False
                    self._idle.notify_all()
        return future.result()

    def _serve_one_batch(self, run: Callable[[list[str]], list[Answer]]) -> None:
        time.sleep(self.window_s)
        with self._lock:
            batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
        if not batch:
            return
        try:
            answers = run([q for q, _ in batch])
        except Exception:
            for q, f in batch:
                _settle(f, run, q)
            return
        for (_, f), a in zip(batch, answers, strict=True):
            f.set_result(a)


def _update_readers(handle: _Handle, written: Sequence[Item]) -> None:
    if handle.deleted:
        return
    try:
        handle.memory.update_readers(written)
    except Exception:  # the items are committed; the next read catches up instead
        logging.getLogger("linmem").warning(
            "updating readers of %s failed", handle.memory.name, exc_info=True
        )


def _settle(future: Future[Answer], run: Callable[[list[str]], list[Answer]], query: str) -> None:
    try:
        future.set_result(run([query])[0])
    except Exception as e:
        future.set_exception(e)


def _ranker(reader: Any, k: int) -> Callable[[list[str]], list[Answer]]:
    def rank(queries: list[str]) -> list[Answer]:
        return list(reader.rank_many(queries, k))

    return rank


def load_token(token_file: str | Path | None = None) -> str | None:
    """The bearer token clients must send: the contents of `token_file`, else `$LINMEM_API_KEY`,
    else None (no authentication)."""
    if token_file is None:
        return os.environ.get("LINMEM_API_KEY") or None
    path = Path(token_file).expanduser()
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read the token file {path}: {e}") from None
    if not token:
        raise BadInput(f"the token file {path} is empty")
    return token


def require_serve_extra(command: str, modules: Sequence[str]) -> None:
    """Refuse `command` at once, naming the extra to install, when one of `modules` is missing:
    FastAPI, uvicorn and the MCP SDK are the `serve` extra, not dependencies of the library."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise MissingExtra(
                f"{command} needs the serve extra (FastAPI, uvicorn and the MCP SDK), and module "
                f"{e.name or module!r} is not installed: pip install 'linmem[serve]'"
            ) from None


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, bracketed IPv6 allowed, or "localhost") is this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token: anyone who can reach the port could
    read and rewrite every memory."""
    if token is None and not is_loopback(host):
        raise BadInput(
            f"refusing to serve on {host!r} without a token: set $LINMEM_API_KEY or pass --token-file, "
            "or listen on 127.0.0.1"
        )


# An absolute POSIX path: a slash not inside a word, a URL or a relative path, up to a character
# that ends a path in a message (space, quote, comma, colon, bracket), less a sentence's full stop.
_PATH_END = r"[\s'\"`,;:()<>\[\]]"
_PATH_CHARS = r"[^\s'\"`,;:()<>\[\]]"
_ABSOLUTE_PATH = re.compile(rf"(?<![\w/.~<>-])/(?!/){_PATH_CHARS}+(?<!\.)")


def client_message(error: Exception, home: Path, where: str) -> str:
    """`error`'s message for a client (`redact`ed); when that hides something, the full message
    goes to the server's log, under `where` (the route or tool)."""
    message = redact(str(error), home)
    if message != str(error):
        logging.getLogger(__name__).warning("%s: %s: %s", where, getattr(error, "code", "error"), error)
    return message


def redact(message: str, home: Path) -> str:
    """`message` as a client may see it: the server's home folder shown as `<home>` (a memory's
    files are still named within it) and any other absolute path as `<path>`. Where the server
    keeps its files is no business of a client, and a path can carry a user name."""
    for form in sorted({str(home.absolute()), str(home.resolve())}, key=len, reverse=True):
        message = re.sub(re.escape(form) + rf"(?=/|\.?(?:{_PATH_END}|$))", "<home>", message)
    return _ABSOLUTE_PATH.sub("<path>", message)


# In-flight requests get this long to finish once a server is told to stop; then they are
# cancelled (a read's thread is abandoned). Every write is committed before it is acknowledged,
# so a cancelled request loses nothing an answer promised.
SHUTDOWN_GRACE_S = 1


def run_server(app: Any, *, host: str, port: int, log_level: str, banner: Callable[[str], str]) -> None:
    """Serve the ASGI `app` with uvicorn until SIGINT or SIGTERM. Once it listens, print
    `banner(url)` on stderr, with the port bound (`port` 0 picks a free one)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                bound = self.servers[0].sockets[0].getsockname()[1]
                print(banner(f"http://{_url_host(host)}:{bound}"), file=sys.stderr, flush=True)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)  # fmt: skip
    # uvicorn stops on the first SIGINT, then raises it again: the KeyboardInterrupt is the stop.
    with contextlib.suppress(KeyboardInterrupt):
        Server(config).run()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def auth_mode(token: str | None) -> str:
    """How a server admits clients, in words for its banner (without a token it listens only on
    loopback: `check_exposure`)."""
    if token is not None:
        return "auth: bearer token required"
    return "auth: none, open to every program on this machine"


# The most one item may take as stored (text, time, source and meta's JSON, UTF-8) over HTTP and MCP.
MAX_ITEM_BYTES = 64 * 2**10


def check_items(raw: list[Any], *, max_item_bytes: int | None = None) -> list[Item]:
    """Items from a request's JSON objects, every one checked before any is written; an error names
    the first bad item by its index (`TooLarge` one over `max_item_bytes` as stored: `stored_bytes`)."""
    if not raw:
        raise BadInput("items is empty: give at least one item")
    items = []
    for index, obj in enumerate(raw):
        try:
            item = item_from_dict(obj)  # refuses lone surrogates, so the item encodes
        except BadInput as e:
            raise BadInput(f"items[{index}]: {e}") from None
        if max_item_bytes is not None and (size := stored_bytes(item)) > max_item_bytes:
            raise TooLarge(
                f"items[{index}]: the item is {size} bytes as stored (text, time, source and meta), "
                f"over the limit of {max_item_bytes}"
            )
        items.append(item)
    return items


AUTH_REQUIRED = "a valid 'Authorization: Bearer <token>' header is required"


def bearer_ok(headers: Mapping[bytes, bytes], token: bytes) -> bool:
    """Whether ASGI request headers carry `Authorization: Bearer <token>` (compared in constant time)."""
    scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
