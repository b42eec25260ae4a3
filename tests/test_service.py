"""The service core: concurrent writes and reads on shared memories, batching, the RAM budget."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from linmem.errors import BadName, NoSuchMemory
from linmem.service import Conflict, Service
from linmem.state import RAM, set_ram_budget
from linmem.types import Item

CAPTIONS = [f"Clip {i}: Alice moves the {w} to the {p}." for i, (w, p) in enumerate(
    [("mug", "cupboard"), ("keys", "drawer"), ("fern", "window"), ("coat", "hook"), ("laptop", "desk")] * 3
)]  # fmt: skip


@pytest.fixture
def service(tmp_path):
    svc = Service(tmp_path / "home", ram_budget=None)
    yield svc
    set_ram_budget(None)


def test_create_list_delete(service: Service) -> None:
    assert service.create("kitchen") == {"name": "kitchen", "items": 0}
    with pytest.raises(Conflict):
        service.create("kitchen")
    with pytest.raises(BadName):
        service.create("../up")
    service.write("kitchen", [Item("a"), Item("b")])
    assert service.memories() == [{"name": "kitchen", "items": 2}]
    service.delete("kitchen")
    assert service.memories() == []
    with pytest.raises(NoSuchMemory):
        service.stats("kitchen")


def test_concurrent_writers_lose_and_duplicate_nothing(service: Service) -> None:
    service.create("shared")
    ids: list[int] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        for i in range(25):
            written = service.write("shared", [Item(f"w{w} item {i}.{j}", clip=w) for j in range(3)])
            with lock:
                ids.extend(x.id for x in written)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(writer, range(8)))
    assert len(ids) == len(set(ids)) == 8 * 25 * 3
    texts = [i.text for i in service.items("shared", limit=10_000)]
    assert len(texts) == len(set(texts)) == 600
    assert sorted(ids) == [i.id for i in service.items("shared", limit=10_000)]


def test_concurrent_asks_are_batched_and_exact(service: Service) -> None:
    service.create("m")
    service.write("m", [Item(c, clip=i) for i, c in enumerate(CAPTIONS)])
    questions = [f"Where is the {w}?" for w in ("mug", "keys", "fern", "coat", "laptop", "mug and keys")]
    reader = service._handle("m").memory.reader("lm", model="tiny:qwen3.5", max_new_tokens=6)
    batches: list[int] = []
    real = reader.read_many

    def counting(queries):  # a real read_many, counted
        batches.append(len(queries))
        return real(queries)

    reader.read_many = counting
    alone = [service.ask("m", q, model="tiny:qwen3.5", max_new_tokens=6).text for q in questions]
    assert batches == [1] * len(questions)
    batches.clear()
    barrier = threading.Barrier(len(questions))

    def ask(q: str) -> str:
        barrier.wait()
        return service.ask("m", q, model="tiny:qwen3.5", max_new_tokens=6).text

    with ThreadPoolExecutor(len(questions)) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone
    assert sum(batches) == len(questions) and max(batches) > 1  # some questions shared a pass


def test_ram_budget_evicts_and_reloads(service: Service) -> None:
    for name in ("a", "b", "c"):
        service.create(name)
        service.write(name, [Item(c, clip=i) for i, c in enumerate(CAPTIONS)])
    set_ram_budget(2**40)  # tracked, not yet binding
    first = service.ask("a", "Where is the mug?", model="tiny:qwen3", max_new_tokens=4)
    one = RAM.held()
    assert one > 0
    set_ram_budget(int(one * 1.5))  # room for one snapshot of this size, not two
    for name in ("b", "c"):
        service.ask(name, "Where is the mug?", model="tiny:qwen3", max_new_tokens=4)
    assert RAM.held() <= one * 1.5
    again = service.ask("a", "Where is the mug?", model="tiny:qwen3", max_new_tokens=4)
    assert "snapshot: loaded from disk" in again.notes
    assert again.text == first.text
