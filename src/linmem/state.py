"""State snapshots: a local model's cache after reading a memory, kept in step with the log.

A snapshot is the model's cache (recurrent and conv states of linear-attention layers, keys and
values of attention layers) after the memory prompt prefix: the chat-template head, then every
item of the log rendered in order. It records the log position it covers (epoch, last item id),
so when the log has only grown, the snapshot is extended by the new items' tokens alone; when the
log lost items (a new epoch), the model, its weights or the prompt head changed, or the file is
damaged, it is rebuilt from the log.

On disk a snapshot is one file, written whole (temp file, fsync, rename) or not at all::

    b"LINMEM-SNAPSHOT\\n" | header length (8 bytes, little endian) | JSON header | safetensors payload

The header names the model id, its fingerprint (config and weights), the prompt head's hash, the
library versions, the log position and token count, and the payload's sha256. Loading never
unpickles anything: the cache is rebuilt from plain tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import render
from .errors import ContextOverflow
from .log import Log

MAGIC = b"LINMEM-SNAPSHOT\n"
FORMAT = 1


@dataclass(frozen=True)
class Snapshot:
    """A cache that has read the memory prefix up to item `last_id`. Never mutated: reads fork it."""

    cache: Any
    tokens: int
    items: int
    last_id: int
    epoch: int
    version: int


@dataclass(frozen=True)
class Update:
    """What bringing the snapshot up to date cost: tokens run through the model, and why."""

    tokens: int
    seconds: float
    reason: str


class SnapshotStore:
    """The snapshot of one memory for one engine and one prompt head, in RAM and on disk."""

    def __init__(self, engine: Any, log: Log, directory: Path, head: str, *, persist: bool = True) -> None:
        self.engine = engine
        self.log = log
        self.head = head
        self.persist = persist
        key = hashlib.sha256(f"{engine.fingerprint}\0{head}".encode()).hexdigest()[:24]
        self.path = Path(directory) / f"{key}.snap"
        self._head_sha = hashlib.sha256(head.encode()).hexdigest()
        self._snap: Snapshot | None = None
        self._lock = threading.Lock()

    def get(self, budget: int | None = None) -> tuple[Snapshot, Update]:
        """The snapshot for the log as it is now. `budget` caps the memory prefix in tokens: a
        memory that would exceed it raises ContextOverflow before any work is done."""
        with self._lock:
            state = self.log.state()
            snap, reason = self._snap, ""
            if snap is None:
                snap, reason = self._load()
            if snap is not None and (snap.epoch != state.epoch or snap.last_id > state.last_id):
                snap, reason = None, "the log lost items since the snapshot"
            if snap is not None and snap.last_id == state.last_id:
                self._snap = snap
                return snap, Update(0, 0.0, reason or "up to date")
            snap, update = self._advance(snap, budget, reason)
            self._snap = snap
            if self.persist:
                self._save(snap)
            return snap, update

    def drop(self) -> None:
        """Forget the RAM copy (the disk copy stays)."""
        with self._lock:
            self._snap = None

    def _advance(self, snap: Snapshot | None, budget: int | None, reason: str) -> tuple[Snapshot, Update]:
        state = self.log.state()
        items = self.log.items()
        segments = render.segments(items)
        if snap is not None and sum(1 for i in items if i.id is not None and i.id <= snap.last_id) != snap.items:
            snap, reason = None, "the snapshot does not match the log"
        if snap is None:
            ids = self.engine.encode(self.head)
            start, base_tokens = 0, 0
            reason = reason or "no snapshot yet"
        else:
            ids, start, base_tokens = [], snap.items, snap.tokens
            reason = reason or f"extended by {len(items) - snap.items} new items"
        for seg in segments[start:]:
            ids += self.engine.encode(seg, specials=False)
        total = base_tokens + len(ids)
        if budget is not None and total > budget:
            raise ContextOverflow(
                f"the memory is {total} tokens, but with the question and answer only {budget} fit "
                f"in {self.engine.id}'s context of {self.engine.context_length} tokens; "
                "read it in windows (overflow='window', --overflow window) or use a longer-context model",
                needed=total,
                limit=budget,
            )
        t0 = time.perf_counter()
        cache = self.engine.new_cache() if snap is None else self.engine.fork(snap.cache)
        self.engine.advance(cache, ids, progress=_progress(len(ids)))
        seconds = time.perf_counter() - t0
        last_id = items[-1].id if items else 0
        new = Snapshot(cache, total, len(items), int(last_id or 0), state.epoch, state.version)
        return new, Update(len(ids), seconds, reason)

    def _save(self, snap: Snapshot) -> None:
        from safetensors.torch import save as st_save

        tensors, meta = self.engine.cache_to_tensors(snap.cache)
        payload = st_save({k: v.clone() for k, v in tensors.items()})
        header = self._header(snap) | {
            "cache": meta,
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "payload_bytes": len(payload),
        }
        data = json.dumps(header).encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(data)) + data)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _header(self, snap: Snapshot) -> dict[str, Any]:
        import torch
        import transformers

        return {
            "format": FORMAT,
            "model": self.engine.id,
            "fingerprint": self.engine.fingerprint,
            "head_sha256": self._head_sha,
            "layout": render.LAYOUT_VERSION,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokens": snap.tokens,
            "items": snap.items,
            "last_id": snap.last_id,
            "epoch": snap.epoch,
            "log_version": snap.version,
        }

    def _load(self) -> tuple[Snapshot | None, str]:
        """The snapshot on disk if it is intact and made by this model for this prompt head."""
        if not self.path.is_file():
            return None, ""
        try:
            header, payload = _read(self.path)
            expected = self._header(Snapshot(None, 0, 0, 0, 0, 0))
            for key in ("format", "model", "fingerprint", "head_sha256", "layout", "transformers", "torch"):
                if header.get(key) != expected[key]:
                    return None, f"snapshot on disk is stale ({key} differs)"
            if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
                return None, "snapshot on disk is corrupt (payload checksum mismatch)"
            from safetensors.torch import load as st_load

            cache = self.engine.cache_from_tensors(st_load(payload), header["cache"])
            snap = Snapshot(
                cache, header["tokens"], header["items"], header["last_id"], header["epoch"], header["log_version"]
            )
            return snap, "loaded from disk"
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            return None, f"snapshot on disk is corrupt ({type(e).__name__}: {e})"


def _read(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError("bad magic")
    (n,) = struct.unpack("<Q", data[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8
    header = json.loads(data[start : start + n])
    payload = data[start + n :]
    if len(payload) != header["payload_bytes"]:
        raise ValueError(f"payload is {len(payload)} bytes, header says {header['payload_bytes']}")
    return header, payload


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
