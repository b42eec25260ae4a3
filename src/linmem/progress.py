"""Feedback on long work: a bar on a terminal, a log line now and then otherwise, nothing for
work that ends within QUIET_S.

Library code opens a `task` around work whose size it knows (a prefill's tokens, a controller's
rounds) and steps it. On a terminal the bar appears only once the work has run QUIET_S seconds,
so quick calls stay silent. Off a terminal (a log file, CI), lines are written only when the
program asked for them with `log_lines(True)`: the command line does; a server or a notebook
embedding the library does not get its stderr filled.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

QUIET_S = 2.0  # work that ends sooner shows nothing
LOG_EVERY_S = 30.0  # off a terminal: one line this often

_settings = {"log_lines": False}


def log_lines(on: bool) -> None:
    """Whether work off a terminal writes a progress line every LOG_EVERY_S seconds."""
    _settings["log_lines"] = on


class Task:
    """The progress of one piece of work of `total` `unit`s (None: unknown), shown as `label`."""

    def __init__(self, label: str, total: int | None, unit: str, stream: TextIO | None = None) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self._start = time.monotonic()
        self._last_line = self._start
        self._bar: Any = None
        self._terminal = _isatty(self.stream)

    def step(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self._start < QUIET_S:
            return
        if self._terminal:
            self._show_bar(note)
        elif _settings["log_lines"] and (now - self._last_line >= LOG_EVERY_S):
            self._last_line = now
            self.stream.write(self.line(now, note) + "\n")
            self.stream.flush()

    def line(self, now: float | None = None, note: str = "") -> str:
        """`label: done/total unit (pct), rate, ETA`: the line written off a terminal."""
        elapsed = (now if now is not None else time.monotonic()) - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label}: {self.done}"]
        if self.total:
            parts[0] += f"/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        else:
            parts[0] += f" {self.unit}"
        parts.append(f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{elapsed:.0f} s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"about {(self.total - self.done) / rate:.0f} s left")
        if note:
            parts.append(note)
        return ", ".join(parts)

    def _show_bar(self, note: str) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, unit=self.unit, desc=self.label, file=self.stream, leave=False,
                initial=self.done,
            )  # fmt: skip
        else:
            self._bar.update(self.done - self._bar.n)
        if note:
            self._bar.set_postfix_str(note, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextmanager
def task(label: str, total: int | None = None, unit: str = "it") -> Iterator[Task]:
    """A `Task` for the duration of the block, its bar removed at the end. Work inside it may open
    its own (a prefill inside an agent's round): a terminal shows both bars."""
    t = Task(label, total, unit)
    try:
        yield t
    finally:
        t.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


__all__ = ["LOG_EVERY_S", "QUIET_S", "Task", "log_lines", "task"]
