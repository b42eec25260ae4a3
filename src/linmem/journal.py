"""Append-only JSON Lines files that a crash cannot garble: one record per line, whole lines only.

A crash in the middle of a write can leave a last line without its newline. Opening an `Appender`
cuts such a line off, so the next record starts on a line of its own; readers skip a torn last
line they meet before that.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any


def repair(path: Path) -> None:
    """Cut off a last line that has no newline (only that line's bytes are lost: it was never
    acknowledged). Reads the whole file only when the last byte says a line is torn."""
    if not path.is_file():
        return
    with path.open("rb+") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


class Appender:
    """Writes records to a journal, one JSON line each, safely from several threads. Each line is
    flushed before `write` returns, and with `fsync` it is on disk as well."""

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        repair(path)
        self.path = path
        self._fsync = fsync
        self._file = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
