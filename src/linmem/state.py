"""State snapshots: a local model's cache after reading a memory, kept in step with the log.

A snapshot is the model's cache (recurrent and conv states of linear-attention layers, keys and
values of attention layers) after the memory prompt prefix: the chat-template head, then every
item of the log rendered in order. It records the log position it covers (epoch, last item id)
and the renderer's cursor, so when the log has only grown it is extended by the new items'
tokens alone; when the log lost items (a new epoch), when the model, its weights, the prompt head
or the layout changed, or when its files are damaged, it is rebuilt from the log.

On disk a snapshot is a folder ``state/<key>/``:

- ``kv-<start>-<end>.safetensors``: rows [start, end) of the attention keys and values, which
  only ever grow. A write adds one file with the new rows; old files are never rewritten (they
  are merged once there are many).
- ``fixed-<n>.safetensors``: everything else (linear-attention states, conv states): small and
  constant-size, rewritten on every save.
- ``header.json``: model id, config hash, fingerprint (config, weights, tokenizer), prompt-head
  hash, layout version, library versions, log position (epoch, last item id, log version), token
  count, and the sha256 of every file above. It is replaced atomically, last, so a crash mid-save
  leaves the previous snapshot intact.

Loading checks every checksum and never unpickles anything: the cache is rebuilt from tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import render
from .errors import ContextOverflow
from .log import Log

FORMAT = 2
MAX_CHUNKS = 32


@dataclass(frozen=True)
class Snapshot:
    """A cache that has read the memory prefix up to item `last_id`. Never mutated: reads fork it."""

    cache: Any
    tokens: int
    items: int
    last_id: int
    epoch: int
    version: int
    cursor: render.Cursor
    lineage: str = field(default_factory=lambda: uuid.uuid4().hex)


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
        return sum(s for store, s in entries if store is not None and store._snap is not None)


RAM = RamBudget()


def set_ram_budget(nbytes: int | None) -> None:
    """Cap the RAM that state snapshots may hold across the process (None: no cap)."""
    RAM.limit = nbytes


class SnapshotStore:
    """The snapshot of one memory for one engine and one prompt head, in RAM and on disk."""

    def __init__(self, engine: Any, log: Log, directory: Path, head: str, *, persist: bool = True) -> None:
        self.engine = engine
        self.log = log
        self.head = head
        self.persist = persist
        key = hashlib.sha256(f"{engine.fingerprint}\0{head}".encode()).hexdigest()[:24]
        self.path = Path(directory) / key
        self._head_sha = hashlib.sha256(head.encode()).hexdigest()
        self._snap: Snapshot | None = None
        self._disk: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self.on_drop: list[Callable[[], None]] = []

    def get(self, budget: int | None = None) -> tuple[Snapshot, Update]:
        """The snapshot for the log as it is now. `budget` caps the memory prefix in tokens: a
        memory that would exceed it raises ContextOverflow before any work is done."""
        snap, update = self._get(budget)
        # Outside our own lock: making room may drop other stores' snapshots (and take their locks).
        RAM.touch(self, snap)
        return snap, update

    def _get(self, budget: int | None) -> tuple[Snapshot, Update]:
        with self._lock:
            state = self.log.state()
            snap, reason = self._snap, ""
            if snap is None:
                snap, reason = self._load()
            if snap is not None and (snap.epoch != state.epoch or snap.last_id > state.last_id):
                snap, reason = None, "the log lost items since the snapshot"
            if snap is not None and self.log.count_upto(snap.last_id) != snap.items:
                snap, reason = None, "the snapshot does not match the log"
            if snap is not None and snap.last_id == state.last_id:
                self._snap = snap
                self._check_budget(snap.tokens, budget)
                return snap, Update(0, 0.0, reason or "up to date")
            snap, update = self._advance(snap, budget, reason)
            self._snap = snap
            if self.persist:
                self._save(snap)
            return snap, update

    def drop(self) -> None:
        """Forget the RAM copy (the disk copy stays); listeners (a reader's derived states) too."""
        with self._lock:
            self._snap = None
        for listener in list(self.on_drop):
            listener()

    def nbytes(self, snap: Snapshot) -> int:
        tensors, _ = self.engine.cache_to_tensors(snap.cache)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def _advance(self, snap: Snapshot | None, budget: int | None, reason: str) -> tuple[Snapshot, Update]:
        state = self.log.state()
        if snap is None:
            new_items = self.log.items()
            ids = self.engine.encode(self.head)
            base, cursor = 0, None
            reason = reason or "no snapshot yet"
        else:
            new_items = self.log.items(after_id=snap.last_id)
            ids, base, cursor = [], snap.tokens, snap.cursor
            reason = reason or f"extended by {len(new_items)} new items"
        texts, cursor = render.advance(new_items, cursor)
        for text in texts:
            ids += self.engine.encode(text, specials=False)
        total = base + len(ids)
        self._check_budget(total, budget)
        t0 = time.perf_counter()
        cache = self.engine.new_cache() if snap is None else self.engine.fork(snap.cache)
        if ids:
            self.engine.advance(cache, ids, progress=_progress(len(ids)))
        seconds = time.perf_counter() - t0
        last_id = int(new_items[-1].id or 0) if new_items else (snap.last_id if snap else 0)
        items = (snap.items if snap else 0) + len(new_items)
        lineage = snap.lineage if snap else uuid.uuid4().hex
        new = Snapshot(cache, total, items, last_id, state.epoch, state.version, cursor, lineage)
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
        import torch
        import transformers

        return {
            "format": FORMAT,
            "model": self.engine.id,
            "config_sha256": self.engine.config_hash,
            "fingerprint": self.engine.fingerprint,
            "head_sha256": self._head_sha,
            "layout": render.LAYOUT_VERSION,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }

    def _save(self, snap: Snapshot) -> None:
        tensors, meta = self.engine.cache_to_tensors(snap.cache)
        growing = set(meta["growing"])
        rows = {k: tensors[k].shape[-2] for k in growing}
        n_rows = max(rows.values(), default=0)
        old = self._disk if self._disk and self._disk.get("lineage") == snap.lineage else None
        chunks = list(old["kv"]) if old else []
        if len(chunks) >= MAX_CHUNKS:
            chunks = []  # merge: one file for all rows so far
        start = chunks[-1]["end"] if chunks else 0
        self.path.mkdir(parents=True, exist_ok=True)
        if n_rows > start and growing:
            part = {k: tensors[k][..., start:, :] for k in growing}
            chunks.append(
                _write(self.path / f"kv-{start}-{n_rows}.safetensors", part) | {"start": start, "end": n_rows}
            )
        serial = (old["serial"] + 1) if old else 0
        fixed = _write(
            self.path / f"fixed-{serial}.safetensors", {k: v for k, v in tensors.items() if k not in growing}
        )
        header = self._identity() | {
            "tokens": snap.tokens,
            "items": snap.items,
            "last_id": snap.last_id,
            "epoch": snap.epoch,
            "log_version": snap.version,
            "cursor": snap.cursor.to_dict(),
            "lineage": snap.lineage,
            "serial": serial,
            "cache": meta,
            "fixed": fixed,
            "kv": chunks,
        }
        _write_atomic(self.path / "header.json", json.dumps(header).encode())
        self._disk = header
        keep = {"header.json", fixed["file"], *(c["file"] for c in chunks)}
        for f in self.path.iterdir():
            if f.name not in keep:
                f.unlink(missing_ok=True)

    def _load(self) -> tuple[Snapshot | None, str]:
        """The snapshot on disk if it is intact and made by this model for this prompt head."""
        header_path = self.path / "header.json"
        if not header_path.is_file():
            return None, ""
        try:
            header = json.loads(header_path.read_bytes())
            for key, want in self._identity().items():
                if header.get(key) != want:
                    return None, f"snapshot on disk is stale ({key} differs)"
            tensors = _read(self.path, header["fixed"])
            chunks = [_read(self.path, c) for c in header["kv"]]
            import torch

            for key in header["cache"]["growing"]:
                tensors[key] = (
                    torch.cat([c[key] for c in chunks], dim=-2) if len(chunks) > 1 else chunks[0][key]
                )
            cache = self.engine.cache_from_tensors(tensors, header["cache"])
        except (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            return None, f"snapshot on disk is corrupt ({type(e).__name__}: {e})"
        self._disk = header
        snap = Snapshot(
            cache,
            header["tokens"],
            header["items"],
            header["last_id"],
            header["epoch"],
            header["log_version"],
            render.Cursor.from_dict(header["cursor"]),
            header["lineage"],
        )
        return snap, "loaded from disk"


def _write(path: Path, tensors: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save

    data = save({k: v.contiguous().clone() for k, v in tensors.items()})
    _write_atomic(path, data)
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _read(directory: Path, entry: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import load

    data = (directory / entry["file"]).read_bytes()
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{entry['file']}: checksum mismatch")
    return dict(load(data))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _progress(total: int) -> Any:
    """A tqdm progress callback for long prefills on a terminal, else None."""
    import sys

    if total < 8192 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="tok", desc="prefill", leave=False)

    def step(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return step
