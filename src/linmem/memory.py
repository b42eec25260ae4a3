"""Named memories under a home folder: open, list, delete, and the `Memory` object itself.

Layout on disk::

    $LINMEM_HOME/<name>/log.sqlite      the item log (source of truth)
    $LINMEM_HOME/<name>/cache/...       derived caches: embeddings, state snapshots
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import BadName, NoSuchMemory
from .log import Log, LogState
from .types import Answer, Item

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LOG_FILE = "log.sqlite"


def default_home() -> Path:
    """`$LINMEM_HOME`, else the per-user data directory (e.g. ~/.local/share/linmem)."""
    env = os.environ.get("LINMEM_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("linmem", appauthor=False))


def check_name(name: str) -> str:
    """Memory names are 1-64 characters of letters, digits, '.', '_' and '-', starting with a
    letter or digit: never a path separator, never '..'."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise BadName(
            f"bad memory name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no path separators, no '..')"
        )
    return name


def _home(home: str | Path | None) -> Path:
    return Path(home).expanduser() if home is not None else default_home()


def memories(home: str | Path | None = None) -> list[str]:
    """Names of the memories under `home`, sorted."""
    root = _home(home)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / LOG_FILE).is_file() and _NAME_RE.fullmatch(p.name))


def open_memory(name: str, *, home: str | Path | None = None, create: bool = False) -> Memory:
    """Open the memory `name`; with `create=True` make it if it does not exist."""
    root = _home(home)
    path = root / check_name(name)
    if not (path / LOG_FILE).is_file():
        if not create:
            existing = memories(root)
            listing = ", ".join(existing) if existing else "none yet"
            raise NoSuchMemory(f"no memory named {name!r} in {root} (existing: {listing})")
        path.mkdir(parents=True, exist_ok=True)
    return Memory(name, path)


def delete_memory(name: str, *, home: str | Path | None = None) -> None:
    """Remove a memory and all its caches."""
    memory = open_memory(name, home=home)
    memory.close()
    shutil.rmtree(memory.path)


class Memory:
    """A named, durable memory: an item log plus the readers that answer questions over it.

    Readers are built on first use and kept, so repeated questions reuse loaded models and
    in-RAM state snapshots. A write tells live readers about the new items, so they update
    incrementally (new embeddings, a snapshot extended by the new tokens only).
    """

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.cache_dir = path / "cache"
        self.log = Log(path / LOG_FILE)
        self._readers: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
        self._readers_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Memory({self.name!r}, {self.path})"

    def close(self) -> None:
        self.log.close()

    def write(self, items: Iterable[Item | str], *, update_readers: bool = True) -> list[Item]:
        """Append items (Item objects or plain strings) atomically; returns them with ids.

        With `update_readers` False the live readers are not told here: a caller that wants the
        acknowledgement to wait only for the commit calls `update_readers` itself, later (the
        service does, on a background thread). Readers catch up on their own at the next read.
        """
        batch = [Item(text=i) if isinstance(i, str) else i for i in items]
        written = self.log.append(batch)
        if update_readers:
            self.update_readers(written)
        return written

    def update_readers(self, written: Sequence[Item]) -> None:
        """Let live readers absorb just-written items: new embeddings, the snapshot extended."""
        for reader in list(self._readers.values()):
            reader.on_write(written)

    add = write

    def items(self) -> list[Item]:
        return self.log.items()

    def forget(self, ids: Iterable[int]) -> int:
        """Delete items by id; derived caches notice and rebuild on their next use."""
        return self.log.delete(ids)

    def clear(self) -> int:
        return self.log.clear()

    def state(self) -> LogState:
        return self.log.state()

    def reader(self, backend: str = "lm", **options: Any) -> Any:
        """The reader for `backend` ("lm" or "embedding") with these options, built once."""
        from .readers import make_reader

        key = (backend, tuple(sorted(options.items())))
        with self._readers_lock:
            if key not in self._readers:
                self._readers[key] = make_reader(self, backend, **options)
            return self._readers[key]

    def ask(self, query: str, *, backend: str = "lm", **options: Any) -> Answer:
        """Answer `query` from this memory with the chosen reader."""
        return self.reader(backend, **options).read(query)

    read = ask
    query = ask

    def rank(self, query: str, k: int = 5, *, backend: str = "lm", **options: Any) -> Answer:
        """The `k` clips most relevant to `query`, best first, in `Answer.clips`."""
        return self.reader(backend, **options).rank(query, k)

    search = rank
