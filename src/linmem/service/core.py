"""The library as a long-lived service: what the HTTP API and the MCP server both call.

One `Service` per process owns the open memories. Writes to one memory are serialised by a lock
of its own; reads run concurrently. Models are loaded once per process (the engine registry) and
shared. Questions that reach one local-model reader at the same moment are answered together in
one batched forward pass (`read_many`), which is exact. State snapshots stay in RAM under a byte
budget, least recently used out first, and are reloaded from disk when needed again.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BadInput, LinmemError, NoSuchMemory
from ..itemfile import item_from_dict
from ..memory import Memory, check_name, default_home, delete_memory, memories, open_memory
from ..state import set_ram_budget
from ..types import Answer, Item

DEFAULT_RAM_BUDGET = 2 * 2**30
BATCH_WINDOW_S = 0.005
BATCH_MAX = 8


class Conflict(LinmemError):
    code = "conflict"


class TooLarge(LinmemError):
    code = "too_large"


class NoSuchItem(NoSuchMemory):
    """The memory exists but holds no item with that id (a subclass, so `except NoSuchMemory` still
    catches it; its own code tells a client the memory itself is there)."""

    code = "no_such_item"


@dataclass
class _Handle:
    memory: Memory
    write_lock: threading.Lock = field(default_factory=threading.Lock)


class Service:
    """Named memories under one home, safe to call from many threads."""

    def __init__(
        self, home: str | Path | None = None, *, ram_budget: int | None = DEFAULT_RAM_BUDGET
    ) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.home.mkdir(parents=True, exist_ok=True)
        set_ram_budget(ram_budget)
        self._handles: dict[str, _Handle] = {}
        self._lock = threading.Lock()
        self._batchers: dict[int, _Batcher] = {}
        self._updates = ThreadPoolExecutor(max_workers=1, thread_name_prefix="linmem-update")

    # Memories

    def _handle(self, name: str) -> _Handle:
        check_name(name)
        with self._lock:
            if name not in self._handles:
                self._handles[name] = _Handle(open_memory(name, home=self.home))
            return self._handles[name]

    def memories(self) -> list[dict[str, Any]]:
        return [{"name": n, "items": self._handle(n).memory.state().count} for n in memories(self.home)]

    def create(self, name: str) -> dict[str, Any]:
        check_name(name)
        with self._lock:
            if name in memories(self.home):
                raise Conflict(f"memory {name!r} already exists")
            self._handles[name] = _Handle(open_memory(name, home=self.home, create=True))
        return {"name": name, "items": 0}

    def delete(self, name: str) -> None:
        handle = self._handle(name)
        with handle.write_lock, self._lock:
            self._handles.pop(name, None)
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
            written = handle.memory.write(items, update_readers=False)
        self._updates.submit(_update_readers, handle.memory, written)
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

    def ask(self, name: str, query: str, *, backend: str = "lm", **options: Any) -> Answer:
        reader = self._handle(name).memory.reader(backend, **options)
        return self._batcher(reader, "read").submit(query)

    def rank(self, name: str, query: str, k: int = 5, *, backend: str = "lm", **options: Any) -> Answer:
        reader = self._handle(name).memory.reader(backend, **options)
        return self._batcher(reader, f"rank:{k}").submit(query)

    def agent(self, name: str, question: str, *, controller: str | None = None, policy: str = "m3",
              rounds: int = 5, backend: str = "lm", **options: Any) -> dict[str, Any]:  # fmt: skip
        from ..agent import Agent, check_settings

        check_settings(policy, controller, rounds)  # before a reader loads its model
        reader = self._handle(name).memory.reader(backend, **options)
        return Agent(reader, controller=controller, policy=policy, rounds=rounds).run(question).to_dict()

    def _batcher(self, reader: Any, kind: str) -> _Batcher:
        key = hash((id(reader), kind))
        with self._lock:
            if key not in self._batchers:
                run = reader.read_many if kind == "read" else _ranker(reader, int(kind.split(":")[1]))
                batched = getattr(getattr(reader, "engine", None), "can_batch", lambda: False)()
                self._batchers[key] = _Batcher(run, window_s=BATCH_WINDOW_S if batched else 0.0)
            return self._batchers[key]


class _Batcher:
    """Collects the questions that reach one reader within a few milliseconds and answers them
    with one `read_many`; a question whose batch fails is answered (or fails) on its own."""

    def __init__(self, run: Callable[[list[str]], list[Answer]], *, window_s: float) -> None:
        self.run = run
        self.window_s = window_s
        self._queue: list[tuple[str, Future[Answer]]] = []
        self._lock = threading.Lock()
        self._busy = False

    def submit(self, query: str) -> Answer:
        if self.window_s <= 0:
            return self.run([query])[0]
        future: Future[Answer] = Future()
        with self._lock:
            self._queue.append((query, future))
            lead = not self._busy
            self._busy = True
        if lead:
            self._drain()
        return future.result()

    def _drain(self) -> None:
        """The thread that found the batcher idle serves batches until the queue is empty."""
        while True:
            time.sleep(self.window_s)
            with self._lock:
                batch, self._queue = self._queue[:BATCH_MAX], self._queue[BATCH_MAX:]
                if not batch:
                    self._busy = False
                    return
            try:
                answers = self.run([q for q, _ in batch])
            except Exception:
                for q, f in batch:
                    _settle(f, self.run, q)
                continue
            for (_, f), a in zip(batch, answers, strict=True):
                f.set_result(a)


def _update_readers(memory: Memory, written: Sequence[Item]) -> None:
    try:
        memory.update_readers(written)
    except Exception:  # the items are committed; the next read catches up instead
        logging.getLogger("linmem").warning("updating readers of %s failed", memory.name, exc_info=True)


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


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token: anyone who can reach the port could
    read and rewrite every memory."""
    if token is not None:
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise BadInput(
            f"refusing to serve on {host!r} without a token: set $LINMEM_API_KEY or pass --token-file, "
            "or listen on 127.0.0.1"
        )


def check_items(raw: list[Any], *, max_item_bytes: int | None = None) -> list[Item]:
    """Items from a request's JSON objects, every one checked before any is written; an error names
    the first bad item by its index (and `TooLarge` one whose text is over `max_item_bytes`)."""
    if not raw:
        raise BadInput("items is empty: give at least one item")
    items = []
    for index, obj in enumerate(raw):
        try:
            item = item_from_dict(obj)
            size = len(item.text.encode("utf-8"))
        except BadInput as e:
            raise BadInput(f"items[{index}]: {e}") from None
        except UnicodeEncodeError:
            raise BadInput(f"items[{index}]: item text is not valid Unicode (a lone surrogate)") from None
        if max_item_bytes is not None and size > max_item_bytes:
            raise TooLarge(f"items[{index}]: item text is {size} bytes, over the limit of {max_item_bytes}")
        items.append(item)
    return items


AUTH_REQUIRED = "a valid 'Authorization: Bearer <token>' header is required"


def bearer_ok(headers: Mapping[bytes, bytes], token: bytes) -> bool:
    """Whether ASGI request headers carry `Authorization: Bearer <token>` (compared in constant time)."""
    scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)
