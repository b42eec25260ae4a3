"""The service core: concurrent writes and reads on shared memories, batching, the RAM budget."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from linmem.errors import BadName, NoSuchMemory
from linmem.service import Conflict, Service
from linmem.service.core import redact
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


def test_a_batcher_leader_serves_only_until_its_own_question_is_answered() -> None:
    """Every batch is served by a caller whose own question is in it: no caller answers other
    callers' questions while its own is already done (the starvation of one leader)."""
    from linmem.service.core import BATCH_MAX, _Batcher
    from linmem.types import Answer, Timings, Tokens

    batches: list[tuple[int, list[str]]] = []

    def run(queries: list[str]) -> list[Answer]:
        batches.append((threading.get_ident(), list(queries)))
        return [Answer(q, (), "m", Tokens(None, 0, 0), Timings(0.0)) for q in queries]

    batcher = _Batcher(window_s=0.002)

    def caller(n: int) -> None:
        me = threading.get_ident()
        for i in range(n):
            assert batcher.submit(f"{me}:{i}", run).text == f"{me}:{i}"

    threads = [threading.Thread(target=caller, args=(40,)) for _ in range(BATCH_MAX // 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(q) for _, q in batches) == 40 * len(threads)
    for leader, queries in batches:
        assert any(q.startswith(f"{leader}:") for q in queries), "a leader served a batch not its own"


def test_four_hundred_memories_under_a_low_file_limit(tmp_path) -> None:
    """Logs close when idle: a service touching 400 memories under `ulimit -n 256` lists, writes
    and reads all of them (it used to keep every log open and fail with 500s)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        from linmem.service import Service
        from linmem.types import Item
        service = Service({str(tmp_path / "home")!r}, ram_budget=None)
        for i in range(400):
            service.create(f"m{{i}}")
            service.write(f"m{{i}}", [Item(f"note {{i}} about the red mug", clip=i)])
        listing = service.memories()
        assert len(listing) == 400 and all(m["items"] == 1 for m in listing), listing[:3]
        for i in range(400):
            answer = service.rank(f"m{{i}}", "red mug", 1, backend="embedding", embedder="hash:64")
            assert answer.clips == (i,), (i, answer.clips)
            assert service.stats(f"m{{i}}")["items"] == 1
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_a_slow_endpoint_holds_up_no_other_read(tmp_path) -> None:
    """Loading an engine whose server is slow to answer /models happens outside every shared
    lock: an embedding read of the same memory meanwhile is answered first."""
    from openai_server import OpenAIServer

    from linmem.service.core import Allowed

    with OpenAIServer(models_delay_s=3.0) as server:  # a wide margin: the embedding read takes ms
        slow = f"openai:{server.url}"  # no #model: the engine asks /models which one to use
        service = Service(tmp_path / "home", ram_budget=None, allowed=Allowed.of(more_models=[slow]))
        service.create("m")
        service.write("m", [Item(c, clip=i) for i, c in enumerate(CAPTIONS)])
        service.ask("m", "keys", backend="embedding", embedder="hash:64")  # vectors ready
        done: list[str] = []
        lm = threading.Thread(target=lambda: (service.ask("m", "keys?", model=slow), done.append("lm")))
        lm.start()
        while not any(p.rstrip("/") == "/v1/models" for p in server.gets) and lm.is_alive():
            threading.Event().wait(0.01)
        service.ask("m", "keys", backend="embedding", embedder="hash:64")
        done.append("embedding")
        lm.join()
    assert done == ["embedding", "lm"]


def test_option_sets_do_not_grow_without_bound(service: Service) -> None:
    """Each distinct option set builds a reader, but readers share the memory's vectors (and
    snapshot), and a memory keeps at most MAX_READERS of them."""
    from linmem.memory import MAX_READERS

    service.create("m")
    service.write("m", [Item(c, clip=i) for i, c in enumerate(CAPTIONS)])
    readers = []
    for i in range(3 * MAX_READERS):
        service.ask("m", "keys", backend="embedding", embedder="hash:64", threshold=i / 100)
        readers.append(service.reader("m", "embedding", embedder="hash:64", threshold=i / 100))
    assert len({id(r.index) for r in readers}) == 1  # one set of vectors for every threshold
    assert len(service._handle("m").memory._readers) <= MAX_READERS


def test_hash_dimensions_are_bounded(service: Service) -> None:
    from linmem.errors import NotAllowed

    service.create("m")
    service.write("m", [Item("the red mug", clip=0)])
    with pytest.raises(NotAllowed, match="hash:DIM up to"):
        service.ask("m", "mug", backend="embedding", embedder="hash:4000000")


def test_an_evicted_reader_is_freed(service: Service) -> None:
    """Nothing the service keeps per reader (its batchers) holds the reader alive."""
    import gc
    import weakref

    from linmem.memory import MAX_READERS

    service.create("m")
    service.write("m", [Item(c, clip=i) for i, c in enumerate(CAPTIONS)])
    service.ask("m", "keys", backend="embedding", embedder="hash:64", threshold=0.5)
    first = weakref.ref(service.reader("m", "embedding", embedder="hash:64", threshold=0.5))
    for i in range(MAX_READERS + 1):
        service.ask("m", "keys", backend="embedding", embedder="hash:64", threshold=i / 100)
    gc.collect()
    assert first() is None


def test_redact_hides_the_home_and_absolute_paths_only() -> None:
    home = Path("/srv/linmem-home")
    cases = [
        (
            "no memory named 'x' in /srv/linmem-home (existing: a)",
            "no memory named 'x' in <home> (existing: a)",
        ),
        ("/srv/linmem-home/robot/log.sqlite: damaged", "<home>/robot/log.sqlite: damaged"),
        ("cannot write /srv/linmem-home.", "cannot write <home>."),
        ("/srv/linmem-home-old/x is gone", "<path> is gone"),  # another folder, not the home
        ("'hf:/models/private/qwen' has no config.json", "'hf:<path>' has no config.json"),
        ("No space left on device: '/var/tmp/x.tmp'", "No space left on device: '<path>'"),
        ("read /etc/passwd.", "read <path>."),
        # Left alone: URLs, model names, relative paths, a slash between words.
        ("openai:http://127.0.0.1:9/v1#m answered 400", "openai:http://127.0.0.1:9/v1#m answered 400"),
        ("hf:Qwen/Qwen3.5-0.8B, a/b and either / or", "hf:Qwen/Qwen3.5-0.8B, a/b and either / or"),
    ]
    for message, shown in cases:
        assert redact(message, home) == shown, message


@pytest.mark.parametrize(
    ("argv", "module"),
    [
        (["serve", "--port", "0"], "fastapi"),
        (["serve", "--port", "0"], "uvicorn"),
        (["mcp"], "mcp"),
        (["mcp", "--transport", "http", "--port", "0"], "uvicorn"),
    ],
)
def test_a_server_without_the_serve_extra_says_what_to_install(
    tmp_path: Path, argv: list[str], module: str
) -> None:
    """As on a machine without `linmem[serve]`: the module is made unimportable before the CLI runs."""
    home = tmp_path / "home"
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None\n"  # `import` then raises ModuleNotFoundError
        "from linmem.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))"
    )
    for extra in ([], ["--json"]):
        command = [sys.executable, "-c", code, *argv, "--home", str(home), *extra]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        error = json.loads(done.stdout)["error"] if extra else {"message": done.stderr}
        assert f"linmem {argv[0]} needs the serve extra" in error["message"], error
        assert "pip install 'linmem[serve]'" in error["message"] and repr(module) in error["message"]
        assert error.get("code", "missing_extra") == "missing_extra"
        assert not home.exists()  # refused before anything was opened
