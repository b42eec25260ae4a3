"""Values built once per key and shared: loaded engines and embedders, a memory's readers.

The build of one key runs outside the registry's lock, so a slow build (a model download, an HTTP
endpoint that takes its time to answer) never holds up a lookup of another key; callers asking for
the same key meanwhile wait for that one build and share its result or its error. With a
`capacity`, the least recently used values beyond it are dropped.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Registry(Generic[K, V]):
    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1, found {capacity}")
        self.capacity = capacity
        self._values: OrderedDict[K, V] = OrderedDict()
        self._pending: dict[K, Future[V]] = {}
        self._lock = threading.Lock()

    def get(self, key: K, build: Callable[[], V]) -> V:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            pending = self._pending.get(key)
            owner = pending is None
            if pending is None:
                pending = self._pending[key] = Future()
        if not owner:
            return pending.result()
        try:
            value = build()
        except BaseException as e:
            with self._lock:
                del self._pending[key]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._pending[key]
            self._values[key] = value
            while self.capacity is not None and len(self._values) > self.capacity:
                self._values.popitem(last=False)
        pending.set_result(value)
        return value

    def values(self) -> list[V]:
        with self._lock:
            return list(self._values.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
