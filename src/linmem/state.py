"""State snapshots: a local model's cache after reading a memory, kept in step with the log.

A snapshot is the model's cache (recurrent and conv states of linear-attention layers, keys and
values of attention layers) after the memory prompt prefix: the chat-template head, then every
item of the log rendered in order. It records the log position it covers (`LogState`: the log's
id, the last item id and the running hash of the items up to it) and the renderer's cursor.
Before it is used it must still be a prefix of the log (`Log.since`): then it is extended by the
new items' tokens alone; otherwise (items deleted or replaced, a restored backup, another
memory's files) it is rebuilt from the log. So an answer from a snapshot is always the answer a
full re-read of the log would give.

There is one store per state folder per process (`SnapshotStore.shared`): readers that differ
only in their options share the snapshot and the states after each kind of read's instruction
(the *stems*). Stores in different processes share the folder safely: a save holds an exclusive
`flock` on ``.lock``, a load a shared one, and files are never overwritten, only added under new
names and removed once no header refers to them.

On disk a snapshot is a folder ``state/<key>/``:

- ``kv-<start>-<end>-<tag>.safetensors``: rows [start, end) of the attention keys and values,
  which only ever grow. A write adds one file with the new rows (older ones are reused when the
  log position at their end is one this snapshot passed through); they are merged once there are
  `MAX_CHUNKS`.
- ``fixed-<tag>.safetensors``: everything else (linear-attention and conv states): small and
  constant-size, rewritten on every save.
- ``header.json``: model id, config hash, fingerprint (config, weights, tokenizer), prompt-head
  hash, layout version, library versions, log position, token count, renderer cursor, the cache's
  layout, the name, size and sha256 of every file above, and an HMAC of all of it under the log's
  secret. It is replaced atomically, last, so a crash mid-save leaves the previous snapshot whole.

Loading trusts nothing in the folder: the header must verify under the log's secret and match a
schema, file names must be plain names of the forms above, every file its checksum, and every
tensor the dtype and shape the model's own cache has. Any failure means a rebuild from the log.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import progress, render
from .errors import ContextOverflow
from .log import Log, LogState

FORMAT = 4
MAX_CHUNKS = 32
# A header is a few kB; anything much larger is not ours.
MAX_HEADER_BYTES = 4 * 2**20
LOCK_FILE = ".lock"
_FILE_RE = re.compile(r"(?:kv-[0-9]+-[0-9]+|fixed)-[0-9a-f]{8}\.safetensors")
_HEX = re.compile(r"[0-9a-f]+")

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    """A cache that has read the memory prefix up to log position `position`. Never mutated:
    reads fork it. `marks` are the (tokens, log hash) pairs it passed through on its way here,
    which tells a save which attention rows already on disk are this snapshot's own."""

    cache: Any
    tokens: int
    position: LogState
    cursor: render.Cursor
    marks: tuple[tuple[int, str], ...] = ()

    @property
    def items(self) -> int:
        return self.position.count

    @property
    def last_id(self) -> int:
        return self.position.last_id


@dataclass(frozen=True)
class Update:
    """What bringing the snapshot up to date cost: tokens run through the model, and why."""

    tokens: int
    seconds: float
    reason: str


class RamBudget:
    """A process-wide cap on the bytes of snapshots held in RAM, least recently used out first.

    An evicted snapshot stays on disk and is loaded again at its next use. No cap by default (a
    library user holds what they open); the service sets one.
    """

    def __init__(self) -> None:
        self.limit: int | None = None
        self._held: OrderedDict[int, tuple[weakref.ref[SnapshotStore], int]] = OrderedDict()
        self._lock = threading.Lock()

    def touch(self, store: SnapshotStore, snap: Snapshot) -> None:
        if self.limit is None:
            return
        size = store.nbytes(snap)
        with self._lock:
            self._held[id(store)] = (weakref.ref(store), size)
            self._held.move_to_end(id(store))
            victims = []
            total = sum(s for _, s in self._held.values())
            for key, (ref, s) in list(self._held.items()):
                if total <= self.limit or key == id(store):
                    continue
                del self._held[key]
                total -= s
                if (victim := ref()) is not None:
                    victims.append(victim)
        for victim in victims:
            victim.drop()

    def held(self) -> int:
        """Bytes of the snapshots in RAM now."""
        with self._lock:
            entries = [(ref(), s) for ref, s in self._held.values()]
        return sum(s for store, s in entries if store is not None and store.current() is not None)


RAM = RamBudget()


def set_ram_budget(nbytes: int | None) -> None:
    """Cap the RAM that state snapshots may hold across the process (None: no cap)."""
    RAM.limit = nbytes


_SHARED: weakref.WeakValueDictionary[tuple[str, bool], SnapshotStore] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


class SnapshotStore:
    """The snapshot of one memory for one engine and one prompt head, in RAM and on disk.

    `directory` is the memory's ``cache/state`` folder; the store's own folder is named by the
    engine's fingerprint and the head. Use `shared` to get the one store of that folder in this
    process; a store built directly is private (as another process's would be).
    """

    def __init__(self, engine: Any, directory: Path, head: str, *, persist: bool = True) -> None:
        self.engine = engine
        self.head = head
        self.persist = persist
        key = hashlib.sha256(f"{engine.fingerprint}\0{head}".encode()).hexdigest()[:24]
        self.path = Path(directory) / key
        self._head_sha = hashlib.sha256(head.encode()).hexdigest()
        self._snap: Snapshot | None = None
        # Per kind of read (keyed by its instruction): the snapshot it was derived from, the state
        # after the instruction, and the instruction's ids (kept to refresh it after a write).
        self._stems: dict[str, tuple[Snapshot | None, Any, list[int]]] = {}
        self._lock = threading.Lock()
        self._stems_lock = threading.Lock()

    @classmethod
    def shared(cls, engine: Any, directory: Path, head: str, *, persist: bool = True) -> SnapshotStore:
        """This process's store for (memory, engine, head), built on first use."""
        probe = cls(engine, directory, head, persist=persist)
        key = (str(probe.path.resolve()), persist)
        with _SHARED_LOCK:
            store = _SHARED.get(key)
            if store is None or store.engine is not engine:
                _SHARED[key] = store = probe
            return store

    def current(self) -> Snapshot | None:
        """The snapshot in RAM, if any (None after an eviction, or before the first read)."""
        return self._snap

    def get(self, log: Log, budget: int | None = None) -> tuple[Snapshot, Update]:
        """The snapshot for `log` as it is now. `budget` caps the memory prefix in tokens: a
        memory that would exceed it raises ContextOverflow before any work is done."""
        snap, update = self._get(log, budget)
        # Outside our own lock: making room may drop other stores' snapshots (and take their locks).
        RAM.touch(self, snap)
        return snap, update

    def _get(self, log: Log, budget: int | None) -> tuple[Snapshot, Update]:
        with self._lock:
            snap, reason = self._snap, ""
            if snap is None:
                snap, reason = self._load(log)
                if reason.startswith("snapshot on disk is"):
                    self._discard()  # none of its files may be reused by the rebuilt snapshot
            delta = log.since(snap.position if snap is not None else None)
            if delta is None:
                snap, reason = None, "the log no longer holds the items the snapshot read"
                delta = log.since(None)
                assert delta is not None
            items, state = delta
            if snap is not None and not items:
                self._snap = snap
                self._check_budget(snap.tokens, budget)
                return snap, Update(0, 0.0, reason or "up to date")
            snap, update = self._advance(snap, items, state, budget, reason)
            self._snap = snap
            if self.persist:
                self._save(log, snap)
            return snap, update

    def drop(self) -> None:
        """Forget the RAM copy (the disk copy stays) and the states derived from it."""
        with self._lock:
            self._snap = None
        with self._stems_lock:
            self._stems = {text: (None, None, ids) for text, (_, _, ids) in self._stems.items()}

    def nbytes(self, snap: Snapshot) -> int:
        return int(self.engine.state_bytes(snap.cache))

    def disk_bytes(self) -> int:
        """Bytes of this store's folder on disk."""
        if not self.path.is_dir():
            return 0
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    # Stems: the state after the memory and a kind of read's fixed instruction

    def stem(self, snap: Snapshot, text: str, ids: list[int]) -> tuple[Any, int]:
        """The state after `snap` and the instruction `text` (tokens `ids`), kept per snapshot;
        returns it and how many tokens were run now to make it (0 when it was kept)."""
        with self._stems_lock:
            kept = self._stems.get(text)
            if kept is not None and kept[0] is snap:
                return kept[1], 0
        cache = self.engine.fork(snap.cache)
        if ids:
            self.engine.advance(cache, ids)
        with self._stems_lock:
            for other, (s, _, other_ids) in list(self._stems.items()):
                if s is not snap:  # the memory moved on: keep the kind, drop its stale state
                    self._stems[other] = (None, None, other_ids)
            self._stems[text] = (snap, cache, ids)
        return cache, len(ids)

    def refresh(self, log: Log, budget: int | None) -> None:
        """Bring the snapshot and every kind's stem up to date now (after a write), if the
        snapshot is in RAM, so the next read pays only for its question."""
        if self._snap is None:
            return
        try:
            snap, _ = self.get(log, budget)
        except ContextOverflow:
            self.drop()
            return
        with self._stems_lock:
            kinds = [(text, ids) for text, (_, _, ids) in self._stems.items()]
        for text, ids in kinds:
            self.stem(snap, text, ids)

    # Building

    def _advance(
        self,
        snap: Snapshot | None,
        items: list[Any],
        state: LogState,
        budget: int | None,
        reason: str,
    ) -> tuple[Snapshot, Update]:
        marks: tuple[tuple[int, str], ...] = ()
        if snap is None:
            ids = self.engine.encode(self.head)
            base, cursor = 0, None
            reason = reason or "no snapshot yet"
        else:
            ids, base, cursor, marks = [], snap.tokens, snap.cursor, snap.marks
            reason = reason or f"extended by {len(items)} new items"
        texts, cursor = render.advance(items, cursor)
        for text in texts:
            ids += self.engine.encode(text, specials=False)
        total = base + len(ids)
        self._check_budget(total, budget)
        t0 = time.perf_counter()
        cache = self.engine.new_cache() if snap is None else self.engine.fork(snap.cache)
        if ids:
            with progress.task("reading the memory", len(ids), "tok") as task:
                self.engine.advance(cache, ids, progress=task.step)
        seconds = time.perf_counter() - t0
        new = Snapshot(cache, total, state, cursor, (*marks, (total, state.head))[-4 * MAX_CHUNKS :])
        return new, Update(len(ids), seconds, reason)

    def _check_budget(self, total: int, budget: int | None) -> None:
        if budget is not None and total > budget:
            raise ContextOverflow(
                f"the memory is {total} tokens, but next to the question and the answer only {budget} "
                f"fit in the context {self.engine.id} is read with; read it in windows "
                "(overflow='window', --overflow window) or use a longer-context model",
                needed=total,
                limit=budget,
            )

    # Disk

    def _identity(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "model": self.engine.id,
            "config_sha256": self.engine.config_hash,
            "fingerprint": self.engine.fingerprint,
            "head_sha256": self._head_sha,
            "layout": render.LAYOUT_VERSION,
            "versions": dict(self.engine.versions),
        }

    def _save(self, log: Log, snap: Snapshot) -> None:
        """Write the snapshot; a failure (the memory was deleted, the disk is full) costs the
        disk copy only, never the answer."""
        try:
            if self._make_folder():
                with _flock(self.path / LOCK_FILE, exclusive=True):
                    self._save_locked(log, snap)
        except OSError as e:
            _logger.warning("state snapshot %s not saved: %s", self.path, e)

    def _discard(self) -> None:
        """Remove a snapshot on disk that failed its checks (the folder itself stays)."""
        try:
            with _flock(self.path / LOCK_FILE, exclusive=True):
                for f in self.path.iterdir():
                    if f.name != LOCK_FILE:
                        _remove(f)
        except OSError as e:
            _logger.warning("state snapshot %s not removed: %s", self.path, e)

    def _make_folder(self) -> bool:
        """Create ``cache/state/<key>`` inside the memory folder, never the memory folder itself:
        a memory deleted meanwhile stays deleted."""
        memory_dir = self.path.parent.parent.parent
        if not memory_dir.is_dir():
            return False
        for folder in (self.path.parent.parent, self.path.parent, self.path):
            try:
                folder.mkdir()
            except FileExistsError:
                pass
            except FileNotFoundError:
                return False
        return True

    def _save_locked(self, log: Log, snap: Snapshot) -> None:
        tensors, meta = self.engine.cache_to_tensors(snap.cache)
        growing = set(meta["growing"])
        n_rows = max((tensors[k].shape[-2] for k in growing), default=0)
        marks = set(snap.marks)
        chunks = []
        for chunk in self._disk_chunks(log):
            if (chunk["end"], chunk["head"]) not in marks or chunk["end"] > n_rows:
                break
            chunks.append(chunk)
        if len(chunks) >= MAX_CHUNKS:
            chunks = []  # merge: one file for all rows so far
        start = chunks[-1]["end"] if chunks else 0
        written: list[str] = []
        try:
            if n_rows > start and growing:
                part = {k: tensors[k][..., start:, :] for k in growing}
                name = f"kv-{start}-{n_rows}-{secrets.token_hex(4)}.safetensors"
                entry = _write(self.path / name, part) | {
                    "start": start,
                    "end": n_rows,
                    "head": snap.position.head,
                }
                written.append(name)
                chunks.append(entry)
            fixed = _write(
                self.path / f"fixed-{secrets.token_hex(4)}.safetensors",
                {k: v for k, v in tensors.items() if k not in growing},
            )
            written.append(fixed["file"])
            header = self._identity() | {
                "tokens": snap.tokens,
                "position": _position_dict(snap.position),
                "cursor": snap.cursor.to_dict(),
                "cache": meta,
                "fixed": fixed,
                "kv": chunks,
            }
            header["mac"] = log.mac(_canonical(header))
            _write_atomic(self.path / "header.json", json.dumps(header).encode())
        except BaseException:
            for name in written:
                (self.path / name).unlink(missing_ok=True)
            raise
        keep = {"header.json", LOCK_FILE, fixed["file"], *(c["file"] for c in chunks)}
        for f in self.path.iterdir():
            if f.name not in keep:
                _remove(f)

    def _disk_chunks(self, log: Log) -> list[dict[str, Any]]:
        """The attention-row chunks the header on disk lists, if it is a valid header of ours."""
        try:
            header = self._read_header(log)
        except (OSError, ValueError):
            return []
        return list(header["kv"])

    def _read_header(self, log: Log) -> dict[str, Any]:
        path = self.path / "header.json"
        with open(path, "rb") as f:  # a folder or a device raises here, or reads nothing sensible
            data = f.read(MAX_HEADER_BYTES + 1)
        if len(data) > MAX_HEADER_BYTES:
            raise ValueError("header.json is too large")
        header = json.loads(data)
        if not isinstance(header, dict) or not isinstance(header.get("mac"), str):
            raise ValueError("header.json is not a snapshot header")
        mac = header.pop("mac")
        if not _same(mac, log.mac(_canonical(header))):
            raise ValueError("header.json does not verify under this log's secret")
        _check_header(header)
        return header

    def _load(self, log: Log) -> tuple[Snapshot | None, str]:
        """The snapshot on disk, if it is intact and made by this model for this prompt head over
        this log; else None and why."""
        if not (self.path / "header.json").exists():
            return None, ""
        try:
            with _flock(self.path / LOCK_FILE, exclusive=False):
                header = self._read_header(log)
                for key, want in self._identity().items():
                    if header[key] != want:
                        return None, f"snapshot on disk is stale ({key} differs)"
                tensors = _read(self.path, header["fixed"])
                chunks = [_read(self.path, c) for c in header["kv"]]
            cache = self._rebuild_cache(header, tensors, chunks)
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError) as e:
            return None, f"snapshot on disk is corrupt ({type(e).__name__}: {e})"
        position = _position(header["position"])
        marks = tuple((c["end"], c["head"]) for c in header["kv"]) + ((header["tokens"], position.head),)
        if not log.extends(position):
            return None, "the log no longer holds the items the snapshot read"
        # The cursor is what the next item's text depends on: it is rendered again from the log,
        # never taken from the folder.
        prefix = [i for i in log.items() if (i.id or 0) <= position.last_id]
        cursor = render.advance(prefix)[1]
        if cursor != render.Cursor.from_dict(header["cursor"]) or len(prefix) != position.count:
            return None, "snapshot on disk is corrupt (its cursor or item count is not the log's)"
        snap = Snapshot(cache, header["tokens"], position, cursor, marks)
        return snap, "loaded from disk"

    def _rebuild_cache(
        self, header: dict[str, Any], tensors: dict[str, Any], chunks: list[dict[str, Any]]
    ) -> Any:
        import torch

        growing = header["cache"]["growing"]
        for part in chunks:
            if set(part) != set(growing):
                raise ValueError("an attention chunk holds other tensors than the header lists")
        for key in growing:
            tensors[key] = torch.cat([c[key] for c in chunks], dim=-2) if len(chunks) > 1 else chunks[0][key]
        return self.engine.cache_from_tensors(tensors, header["cache"], header["tokens"])


# Header and tensor checks


def _check_header(h: dict[str, Any]) -> None:
    """Raise ValueError unless `h` has exactly the shape `_save_locked` writes."""
    for key, kind in (("format", int), ("layout", int), ("tokens", int)):
        _want(h.get(key), kind, key)
    for key in ("model", "config_sha256", "fingerprint", "head_sha256"):
        _want(h.get(key), str, key)
    for name, version in _want(h.get("versions"), dict, "versions").items():
        _want(version, str, f"versions.{name}")
    _position(h.get("position"))
    render.Cursor.from_dict(_want(h.get("cursor"), dict, "cursor"))
    cache = _want(h.get("cache"), dict, "cache")
    _want(cache.get("layers"), list, "cache.layers")
    for key in _want(cache.get("growing"), list, "cache.growing"):
        _want(key, str, "cache.growing[]")
    _file_entry(h.get("fixed"), "fixed")
    end = 0
    for i, chunk in enumerate(_want(h.get("kv"), list, "kv")):
        _file_entry(chunk, f"kv[{i}]")
        start, stop = _want(chunk.get("start"), int, "kv.start"), _want(chunk.get("end"), int, "kv.end")
        _hex(chunk.get("head"), 64, "kv.head")
        if start != end or stop <= start or not chunk["file"].startswith(f"kv-{start}-{stop}-"):
            raise ValueError(f"kv[{i}] covers [{start}, {stop}) after {end}: chunks must tile the rows")
        end = stop
    if h["kv"] and end != h["tokens"]:
        raise ValueError(f"the attention chunks hold {end} rows, the header says {h['tokens']} tokens")


def _want(value: Any, kind: type, what: str) -> Any:
    negative = isinstance(value, int) and (isinstance(value, bool) or value < 0)
    if not isinstance(value, kind) or (kind is int and negative):
        raise ValueError(
            f"header field {what} is {value!r}, expected a {'non-negative ' * (kind is int)}{kind.__name__}"
        )
    return value


def _hex(value: Any, length: int, what: str) -> str:
    if not isinstance(value, str) or len(value) != length or not _HEX.fullmatch(value):
        raise ValueError(f"header field {what} is {value!r}, expected {length} hex digits")
    return value


def _file_entry(entry: Any, what: str) -> None:
    entry = _want(entry, dict, what)
    name = _want(entry.get("file"), str, f"{what}.file")
    if not _FILE_RE.fullmatch(name):
        raise ValueError(f"header field {what}.file is {name!r}, not a snapshot file name")
    _hex(entry.get("sha256"), 64, f"{what}.sha256")
    _want(entry.get("bytes"), int, f"{what}.bytes")


def _position_dict(p: LogState) -> dict[str, Any]:
    return {"version": p.version, "epoch": p.epoch, "last_id": p.last_id, "count": p.count,
            "log_id": p.log_id, "head": p.head}  # fmt: skip


def _position(d: Any) -> LogState:
    d = _want(d, dict, "position")
    version, epoch, last_id, count = (
        _want(d.get(k), int, f"position.{k}") for k in ("version", "epoch", "last_id", "count")
    )
    log_id, head = _hex(d.get("log_id"), 32, "position.log_id"), _hex(d.get("head"), 64, "position.head")
    return LogState(version, epoch, last_id, count, log_id, head)


# Files


def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def _write(path: Path, tensors: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save

    data = save({k: v.contiguous().clone() for k, v in tensors.items()})
    _write_atomic(path, data)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _read(directory: Path, entry: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load

    path = directory / entry["file"]
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{entry['file']} is not a regular file")
    data = path.read_bytes()
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{entry['file']}: checksum mismatch")
    try:
        return dict(load(data))
    except Exception as e:  # safetensors raises its own error types on a malformed file
        raise ValueError(f"{entry['file']}: not a safetensors file ({e})") from None


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all: a temporary file, fsynced, renamed over it.
    The temporary file is removed if anything fails (a full disk)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)  # a folder where the header belongs: not ours, and in the way
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def _flock(path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold an advisory lock on `path` (created if missing): shared for reading a snapshot,
    exclusive for writing one. Where `fcntl` does not exist, only the in-process lock applies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


__all__ = ["RAM", "Snapshot", "SnapshotStore", "Update", "set_ram_budget"]
