"""Named memories under a home folder: open, list, delete, and the `Memory` object itself.

Layout on disk::

    $LINMEM_HOME/<name>/log.sqlite      the item log (source of truth)
    $LINMEM_HOME/<name>/cache/...       derived caches: embeddings, state snapshots
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ._registry import Registry
from .errors import BadInput, BadName, DiskFull, LinmemError, NoSuchMemory
from .log import Log, LogState, count_items, fsync_dir
from .types import Answer, Item

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Names Windows reserves for devices, with or without an extension: a memory folder named so could
# not be copied to (or opened on) a Windows machine.
_RESERVED = re.compile(r"(?i)(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?")
LOG_FILE = "log.sqlite"
# Readers kept per memory: each distinct option set builds one (they share models, snapshots and
# vectors, so a reader itself is small), least recently used out first.
MAX_READERS = 16


def default_home() -> Path:
    """`$LINMEM_HOME`, else the per-user data directory (e.g. ~/.local/share/linmem)."""
    env = os.environ.get("LINMEM_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("linmem", appauthor=False))


def check_name(name: str) -> str:
    """Memory names are 1-64 characters of letters, digits, '.', '_' and '-', starting with a
    letter or digit and not ending with '.': never a path separator, never '..', never a name
    Windows reserves (CON, NUL, COM1, ...)."""
    if (
        not isinstance(name, str)
        or not _NAME_RE.fullmatch(name)
        or ".." in name
        or name.endswith(".")
        or _RESERVED.fullmatch(name)
    ):
        raise BadName(
            f"bad memory name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit and not ending with '.' (no path separators, no '..', no device names "
            "such as CON or NUL)"
        )
    return name


def _home(home: str | Path | None) -> Path:
    root = Path(home).expanduser() if home is not None else default_home()
    if root.exists() and not root.is_dir():
        raise BadInput(
            f"the linmem home {root} is a file, not a folder: point --home (or $LINMEM_HOME) at a folder"
        )
    return root


def memories(home: str | Path | None = None) -> list[str]:
    """Names of the memories under `home`, sorted. Nothing is opened: a damaged memory is listed
    too, and reports its damage when it is used."""
    root = _home(home)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _NAME_RE.fullmatch(p.name) and (p / LOG_FILE).is_file())


def summaries(home: str | Path | None = None) -> list[dict[str, Any]]:
    """Each memory under `home` with its item count, read without keeping any log open. A damaged
    memory is listed with its error (``{"name", "items": None, "error": {"code", "message"}}``)
    instead of failing the whole listing."""
    root = _home(home)
    rows: list[dict[str, Any]] = []
    for name in memories(root):
        try:
            rows.append({"name": name, "items": count_items(root / name / LOG_FILE)})
        except LinmemError as e:
            rows.append({"name": name, "items": None, "error": {"code": e.code, "message": str(e)}})
    return rows


def open_memory(name: str, *, home: str | Path | None = None, create: bool = False) -> Memory:
    """Open the memory `name`; with `create=True` make it if it does not exist."""
    root = _home(home)
    path = root / check_name(name)
    if not (path / LOG_FILE).is_file():
        if not create:
            existing = memories(root)
            listing = ", ".join(existing) if existing else "none yet"
            raise NoSuchMemory(f"no memory named {name!r} in {root} (existing: {listing})")
        _create(root, path)
    return Memory(name, path)


def _create(root: Path, path: Path) -> None:
    """Make a memory whole or not at all: its log is built in a private folder and then linked
    into place, so no one ever sees a half-made log, and a failure (a full disk) leaves nothing."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f".creating-{path.name}-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as e:
        raise _os_error(e, root) from e
    made_folder = False
    try:
        Log(staging / LOG_FILE, create=True).close()
        made_folder = _mkdir(path)
        try:
            os.link(staging / LOG_FILE, path / LOG_FILE)  # fails if another process created it first
        except FileExistsError:
            pass
        fsync_dir(path)
    except OSError as e:
        if made_folder:
            shutil.rmtree(path, ignore_errors=True)
        raise _os_error(e, path) from e
    except BaseException:
        if made_folder and not (path / LOG_FILE).exists():
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _mkdir(path: Path) -> bool:
    try:
        path.mkdir()
        return True
    except FileExistsError:
        return False


def _os_error(e: OSError, where: Path) -> Exception:
    if e.errno == errno.ENOSPC:
        return DiskFull(f"{where}: the disk is full; nothing was created")
    return e


def delete_memory(name: str, *, home: str | Path | None = None) -> None:
    """Remove a memory and all its caches.

    The folder is first renamed away (atomically), so a cache update still running in this or
    another process cannot write into the memory's place: caches never create the memory folder,
    and a memory created again under the same name has a new log id that old caches do not match.
    """
    memory = open_memory(name, home=home)
    memory.close()
    _remove_tree(memory.path, f".deleting-{name}")


def _remove_tree(path: Path, hidden: str) -> None:
    """Remove a folder by first renaming it (atomically) to a hidden sibling, so nothing still
    running can write into its place, then deleting that."""
    trash = path.with_name(f"{hidden}-{secrets.token_hex(4)}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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
        self._readers: Registry[tuple[str, tuple[tuple[str, Any], ...]], Any] = Registry(MAX_READERS)

    def __repr__(self) -> str:
        return f"Memory({self.name!r}, {self.path})"

    def close(self) -> None:
        """Close the log and let go of the readers (their models stay loaded in the process)."""
        self._readers.clear()
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
        for reader in self._readers.values():
            reader.on_write(written)

    add = write

    def items(self) -> list[Item]:
        return self.log.items()

    def forget(self, ids: Iterable[int]) -> int:
        """Delete items by id; derived caches notice and rebuild on their next use."""
        return self.log.delete(ids)

    def clear(self) -> int:
        """Delete every item, and the derived caches with them (they no longer match the log, and
        would only take disk space until rebuilt). Returns how many items there were."""
        removed = self.log.clear()
        if self.cache_dir.is_dir():
            _remove_tree(self.cache_dir, ".cleared")  # out of the way of running readers at once
        return removed

    def state(self) -> LogState:
        return self.log.state()

    def reader(self, backend: str = "lm", **options: Any) -> Any:
        """The reader for `backend` ("lm", "embedding" or "hybrid") with these options, built once."""
        from .readers import make_reader

        key = (backend, tuple(sorted(options.items())))
        return self._readers.get(key, lambda: make_reader(self, backend, **options))

    def ask(self, query: str, *, backend: str = "lm", **options: Any) -> Answer:
        """Answer `query` from this memory with the chosen reader."""
        return self.reader(backend, **options).read(query)

    read = ask
    query = ask

    def rank(self, query: str, k: int = 5, *, backend: str | None = None, **options: Any) -> Answer:
        """The `k` clips most relevant to `query`, best first, in `Answer.clips` (and their lines
        in `Answer.hits`). The default, hybrid lexical + dense search, answers in milliseconds;
        `backend="lm"` lets the language model rank, and so does naming a `model` without
        `rerank` (a model given with `rerank="lm"` re-ranks the hybrid's best clips)."""
        if backend is None:
            backend = "lm" if "model" in options and "rerank" not in options else "hybrid"
        return self.reader(backend, **options).rank(query, k)

    search = rank
