"""Reliability of the HTTP service under load, crashes, damaged caches and hostile requests.

    python -m linmem.service.reliability            # the short form (CI)
    python -m linmem.service.reliability --long     # 2,000 operations, 20 crash trials

Each check drives a real `linmem serve` process on 127.0.0.1 over HTTP:

- load: 8 writers and 8 readers (half of them through the embedding reader, half through the LM
  reader on a tiny model, whose snapshot the writes keep extending), on one memory and across
  four; every acknowledged item must be in the log exactly once. Latencies are reported, not
  asserted.
- crash: the server is killed with SIGKILL while writers are busy, then restarted; every
  acknowledged write must be there, and every batch must be there whole or not at all.
- corruption: the state snapshot and the embedding cache are damaged on disk while the server is
  down; after a restart both are detected and rebuilt from the log.
- backup restore: a backup of the log is restored under the running server (SQLite's backup API)
  and different items are written; the old snapshot must not be read.
- delete during update: a memory is deleted while its snapshot is being extended in the
  background, then created again; nothing of the deleted content may come back.
- swapped state folder: another memory's snapshot folder is copied in; it must be refused.
- header tampering: snapshot headers are edited in several ways; each must mean a rebuild.
- SSRF refused: requests naming a URL of their own (model, embedder, controller) are refused, and
  the URL's server receives nothing; a foreign Host header is refused.
- file descriptors: 400 memories are created, written, listed and read under `ulimit -n 256`.
- starving asker: LM askers on one memory; none may wait far longer than the others.

Wherever a check needs "the snapshot is right", it is checked for what it is, not by comparing
answers of random-weight models (wrong states often give the same noise): the snapshot the server
saved is loaded here and must have the stateless read's token count, and the logits of the first
answer token must be the stateless read's within 1e-4.

Prints a summary and one JSON line; exits non-zero when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ..log import Log

TOKEN = "reliability-token"
READ_OPTIONS = {"backend": "embedding", "embedder": "hash"}
HYBRID_OPTIONS = {"backend": "hybrid", "embedder": "hash"}
LM_OPTIONS = {"backend": "lm", "model": "tiny:qwen3.5", "max_new_tokens": 4}
TINY_LM = {"backend": "lm", "model": "tiny:qwen3.5", "max_new_tokens": 8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `linmem serve` child process on a free loopback port (`files`: its descriptor limit)."""

    def __init__(self, home: Path, *, env: dict[str, str] | None = None, files: int | None = None) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = env or {}
        self.files = files

    def start(self, timeout: float = 120.0) -> None:
        env = dict(os.environ, LINMEM_API_KEY=TOKEN, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env |= self.env
        cmd = [sys.executable, "-m", "linmem", "serve", "--home", str(self.home), "--port", str(self.port)]
        if self.files is not None:  # as `ulimit -n` in a shell would (no preexec_fn: we have threads)
            cmd = ["sh", "-c", f'ulimit -n {self.files} && exec "$@"', "sh", *cmd]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"linmem serve did not come up on {self.url}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300.0)


@contextmanager
def running(home: Path, **options: Any) -> Iterator[Server]:
    server = Server(home, **options)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _create(client: httpx.Client, name: str) -> None:
    r = client.post("/v1/memories", json={"name": name})
    if r.status_code not in (201, 409):
        raise RuntimeError(f"create {name}: HTTP {r.status_code} {r.text}")


def _texts(client: httpx.Client, name: str) -> list[str]:
    texts: list[str] = []
    after = 0
    while True:
        page = client.get(f"/v1/memories/{name}/items", params={"after": after, "limit": 1000})
        page.raise_for_status()
        items = page.json()["items"]
        if not items:
            return texts
        texts += [i["text"] for i in items]
        after = items[-1]["id"]


def check_load(home: Path, ops: int) -> dict[str, Any]:
    """8 writers and 8 readers, `ops` operations in equal shares, over one memory and across four."""
    names = ["load-shared", "load-a", "load-b", "load-c", "load-d"]
    acked: list[str] = []
    lat: dict[str, list[float]] = {"write": [], "read_embedding": [], "read_lm": []}
    lock = threading.Lock()
    with running(home) as server, server.client() as admin:
        for n in names:
            _create(admin, n)
            admin.post(f"/v1/memories/{n}/items", json={"items": [{"text": "seed item", "clip": 0}]})
            # Load the models and build each reader before the clock starts: the latencies are
            # steady-state reads, not one-off model loads.
            for options in (READ_OPTIONS, LM_OPTIONS):
                admin.post(f"/v1/memories/{n}/ask", json={"query": "warm up", **options}).raise_for_status()
        errors: list[str] = []

        def worker(kind: str, seed: int) -> None:
            try:
                work(kind, seed)
            except Exception as e:  # a thread's failure must fail the check, not vanish
                with lock:
                    errors.append(f"{kind} worker {seed}: {e}")

        def work(kind: str, seed: int) -> None:
            rng = random.Random(seed)
            with server.client() as client:
                # Every worker does its share: fast embedding reads must not crowd out the writes.
                for j in range(ops // 16 + (seed < ops % 16)):
                    op = f"{seed}.{j}"
                    name = "load-shared" if rng.random() < 0.5 else rng.choice(names[1:])
                    t0 = time.perf_counter()
                    series = kind
                    if kind == "write":
                        texts = [f"load op {op} item {j} of {name}" for j in range(rng.randint(1, 4))]
                        r = client.post(
                            f"/v1/memories/{name}/items", json={"items": [{"text": t} for t in texts]}
                        )
                        if r.status_code == 200:
                            with lock:
                                acked.extend(f"{name}\0{t}" for t in texts)
                    else:
                        # Half the reads go through the LM reader: its snapshot is being extended
                        # by the concurrent writes while it is read.
                        options = LM_OPTIONS if seed % 2 else READ_OPTIONS
                        series = "read_lm" if seed % 2 else "read_embedding"
                        r = client.post(f"/v1/memories/{name}/ask", json={"query": f"op {op}", **options})
                    with lock:
                        lat[series].append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        raise RuntimeError(f"{kind} {name}: HTTP {r.status_code} {r.text}")

        threads = [
            threading.Thread(target=worker, args=(k, i)) for i, k in enumerate(["write"] * 8 + ["read"] * 8)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        stored = [f"{n}\0{t}" for n in names for t in _texts(admin, n) if t != "seed item"]
    lost = sorted(set(acked) - set(stored))
    duplicated = len(stored) - len(set(stored))
    return {
        "ops": ops,
        "errors": errors[:10],
        "seconds": round(seconds, 2),
        "acknowledged_items": len(acked),
        "lost": len(lost),
        "duplicated": duplicated,
        "write_p50_ms": _ms(lat["write"], 50),
        "write_p95_ms": _ms(lat["write"], 95),
        "embedding_read_p50_ms": _ms(lat["read_embedding"], 50),
        "embedding_read_p95_ms": _ms(lat["read_embedding"], 95),
        "lm_read_p50_ms": _ms(lat["read_lm"], 50),
        "lm_read_p95_ms": _ms(lat["read_lm"], 95),
        "reads": {"embedding": len(lat["read_embedding"]), "lm": len(lat["read_lm"])},
        "ok": not lost and duplicated == 0 and not errors,
    }


def _ms(values: list[float], pct: int) -> float | None:
    if not values:
        return None
    return round(1000 * statistics.quantiles(values, n=100, method="inclusive")[pct - 1], 1)


def check_crash(home: Path, trials: int, seed: int = 0) -> dict[str, Any]:
    """Kill -9 the server while 4 writers write batches; after a restart, every acknowledged
    batch is present and every batch is whole or absent."""
    rng = random.Random(seed)
    acked: set[str] = set()
    sent: dict[str, int] = {}
    failures: list[str] = []
    server = Server(home)
    for trial in range(trials):
        server.start()
        with server.client() as admin:
            _create(admin, "crash")
        stop = threading.Event()

        def writer(w: int, trial: int = trial, stop: threading.Event = stop) -> None:
            with server.client() as client:
                for n in range(10**6):
                    if stop.is_set():
                        return
                    batch = f"t{trial}w{w}b{n}"
                    size = 1 + n % 5
                    sent[batch] = size
                    items = [
                        {"text": f"{batch} part {j}/{size}", "meta": {"batch": batch}} for j in range(size)
                    ]
                    try:
                        r = client.post("/v1/memories/crash/items", json={"items": items}, timeout=10)
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        acked.add(batch)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.3, 1.2))
        server.kill()
        stop.set()
        for t in threads:
            t.join()
        server.start()
        with server.client() as client:
            texts = _texts(client, "crash")
        server.stop()
        failures += [f"trial {trial}: {problem}" for problem in audit(texts, sent, acked)]
    return {
        "trials": trials,
        "acknowledged_batches": len(acked),
        "failures": failures[:20],
        "ok": not failures,
    }


def audit(texts: list[str], sent: dict[str, int], acked: set[str]) -> list[str]:
    """What is wrong with a log after crashes: an acknowledged batch missing, or a batch present
    only in part (a torn write). Item texts start with their batch name."""
    present: dict[str, int] = {}
    for text in texts:
        batch = text.split(" ", 1)[0]
        present[batch] = present.get(batch, 0) + 1
    problems = [f"acknowledged batch {b} missing" for b in sorted(acked) if b not in present]
    problems += [
        f"batch {b} torn ({n} of {sent.get(b)} items)" for b, n in present.items() if n != sent.get(b)
    ]
    return problems


def check_corruption(home: Path) -> dict[str, Any]:
    """Damage the snapshot, the embedding cache and the log's full-text index while the server is
    down; after a restart all three are rebuilt: the LM read has the stateless read's tokens, the
    saved snapshot its logits, the embedding and hybrid searches their answers of before."""
    questions = ["Where is the mug?", "Who waters the fern?"]
    readers = (TINY_LM, READ_OPTIONS, HYBRID_OPTIONS)
    with running(home) as server, server.client() as client:
        _create(client, "corrupt")
        items = [
            {"text": f"Clip {i}: Alice moves the {w}.", "clip": i}
            for i, w in enumerate(["mug", "fern", "keys"] * 4)
        ]
        client.post("/v1/memories/corrupt/items", json={"items": items}).raise_for_status()
        before = [_ask(client, "corrupt", q, opts) for q in questions for opts in readers]
    cache = home / "corrupt" / "cache"
    damaged = []
    for path in sorted(cache.rglob("*")):
        if path.is_file() and path.suffix in {".safetensors", ".sqlite"}:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            data[-3] ^= 0xFF
            path.write_bytes(bytes(data))
            damaged.append(str(path.relative_to(cache)))
    index = _damage_index(home / "corrupt" / "log.sqlite")
    with running(home) as server, server.client() as client:
        after = [_ask(client, "corrupt", q, opts) for q in questions for opts in readers]
        exact = _exact_read(client, "corrupt")
    verified = verify_snapshot(home, "corrupt")
    same = [
        a["answer"] == b["answer"] and a["clips"] == b["clips"] for a, b in zip(before, after, strict=True)
    ]
    notes = sorted({n for a in after for n in a.get("notes", []) if "corrupt" in n or "rebuilt" in n.lower()})
    searches_same = [x for i, x in enumerate(same) if i % len(readers)]  # embedding and hybrid: exact
    return {
        "damaged_files": damaged,
        "index_damage": index,
        "same_answers": all(same),
        "searches_same": all(searches_same),
        "index_ok_after": Log(home / "corrupt" / "log.sqlite").check_index(full=True) is None,
        "lm_tokens_exact": exact,
        "snapshot": verified,
        "notes": notes,
        "ok": bool(damaged) and bool(index) and exact and verified["ok"] and all(searches_same),
    }


def _damage_index(path: Path) -> str:
    """Zero the full-text index's data blocks inside the log file: FTS5 then answers queries with
    nothing, without an error, which only its integrity check catches."""
    db = sqlite3.connect(path)
    try:
        n = db.execute("UPDATE items_fts_data SET block = zeroblob(length(block)) WHERE id > 10").rowcount
        db.commit()
    finally:
        db.close()
    return f"{n} index blocks zeroed" if n else ""


def check_backup_restore(home: Path) -> dict[str, Any]:
    """Restore a 20-item backup of the log under the running server, keep the caches, write 12
    other items: the 32-item snapshot of before must not be read."""
    rng = random.Random(1)
    with running(home) as server, server.client() as client:
        _create(client, "restore")
        _write(client, "restore", _items(rng, 20))
        _ask(client, "restore", "keys?", TINY_LM)
        backup = home / "backup.sqlite"
        _backup(home / "restore" / "log.sqlite", backup)
        _write(client, "restore", _items(rng, 12, 100))
        _ask(client, "restore", "keys?", TINY_LM)  # the 32-item snapshot, in RAM and on disk
        _backup(backup, home / "restore" / "log.sqlite")
        _write(client, "restore", _items(rng, 12, 200))
        exact = _exact_read(client, "restore")
        ranked = client.post(
            "/v1/memories/restore/rank", json={"query": "keys drawer", "k": 5, **READ_OPTIONS}
        )
    with running(home) as again, again.client() as client:  # a new process: its ranking must agree
        reranked = client.post(
            "/v1/memories/restore/rank", json={"query": "keys drawer", "k": 5, **READ_OPTIONS}
        )
    verified = verify_snapshot(home, "restore")
    same_ranking = ranked.json()["clips"] == reranked.json()["clips"]
    return {
        "lm_tokens_exact": exact,
        "snapshot": verified,
        "embedding_ranking_same": same_ranking,
        "ok": exact and verified["ok"] and same_ranking,
    }


def check_delete_during_update(home: Path) -> dict[str, Any]:
    """Delete a memory right after a large write, while the server extends its snapshot in the
    background; nothing may reappear, and a new memory of that name reads only its own items."""
    rng = random.Random(2)
    with running(home) as server, server.client() as client:
        _create(client, "doomed")
        _write(client, "doomed", _items(rng, 30))
        _ask(client, "doomed", "keys?", TINY_LM)
        _write(client, "doomed", _items(rng, 400, 100))  # acknowledged at commit; extended after
        r = client.delete("/v1/memories/doomed")
        gone = r.status_code == 200 and not (home / "doomed").exists()
        time.sleep(2.0)  # time for a late background save to misbehave
        still_gone = not (home / "doomed").exists()
        _create(client, "doomed")
        _write(client, "doomed", _items(rng, 100, 900))
        exact = _exact_read(client, "doomed")
    verified = verify_snapshot(home, "doomed")
    return {
        "deleted": gone,
        "stayed_deleted": still_gone,
        "lm_tokens_exact": exact,
        "snapshot": verified,
        "ok": gone and still_gone and exact and verified["ok"],
    }


def check_swapped_state(home: Path) -> dict[str, Any]:
    """Copy one memory's snapshot folder into another with as many items: it must be refused."""
    rng = random.Random(3)
    with running(home) as server, server.client() as client:
        for name in ("swap-a", "swap-b"):
            _create(client, name)
            _write(client, name, _items(rng, 15))
            _ask(client, name, "keys?", TINY_LM)
    shutil.rmtree(home / "swap-b" / "cache" / "state")
    shutil.copytree(home / "swap-a" / "cache" / "state", home / "swap-b" / "cache" / "state")
    with running(home) as server, server.client() as client:
        notes = _ask(client, "swap-b", "keys?", TINY_LM)["notes"]
        exact = _exact_read(client, "swap-b")
    verified = verify_snapshot(home, "swap-b")
    refused = any("corrupt" in n for n in notes)
    return {
        "refused": refused,
        "lm_tokens_exact": exact,
        "snapshot": verified,
        "ok": refused and exact and verified["ok"],
    }


def _edit_header(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        path = folder / "header.json"
        header = json.loads(path.read_text())
        edit(header)
        path.write_text(json.dumps(header))

    return tamper


def _replace_header(content: str | None) -> Callable[[Path], None]:
    def tamper(folder: Path) -> None:
        (folder / "header.json").unlink()
        if content is None:
            (folder / "header.json").mkdir()
        else:
            (folder / "header.json").write_text(content)

    return tamper


TAMPERINGS: dict[str, Callable[[Path], None]] = {
    "kv rows +5": _edit_header(lambda h: h["kv"][-1].update(end=h["kv"][-1]["end"] + 5)),
    "cursor edited": _edit_header(lambda h: h["cursor"].update(clip=999)),
    "position lowered": _edit_header(
        lambda h: h["position"].update(last_id=h["position"]["last_id"] - 3, count=h["position"]["count"] - 3)
    ),  # fmt: skip
    "tokens not a number": _edit_header(lambda h: h.update(tokens="lots")),
    "file outside the folder": _edit_header(
        lambda h: h["fixed"].update(file="../../../../outside.safetensors")
    ),
    "dtype os": _edit_header(lambda h: h["cache"]["layers"][0]["attrs"].update(dtype={"dtype": "os"})),
    "header a list": _replace_header("[]"),
    "header a folder": _replace_header(None),
}


def check_tampering(home: Path) -> dict[str, Any]:
    """Edit each memory's snapshot header in another way while the server is down; after a
    restart every read is exact and every snapshot rebuilt."""
    rng = random.Random(4)
    names = {kind: f"tamper-{i}" for i, kind in enumerate(TAMPERINGS)}
    with running(home) as server, server.client() as client:
        for name in names.values():
            _create(client, name)
            _write(client, name, _items(rng, rng.randint(9, 21)))
            _ask(client, name, "keys?", TINY_LM)
    for kind, name in names.items():
        (folder,) = [p for p in (home / name / "cache" / "state").iterdir() if p.is_dir()]
        TAMPERINGS[kind](folder)
    results = {}
    with running(home) as server, server.client() as client:
        for kind, name in names.items():
            notes = _ask(client, name, "keys?", TINY_LM)["notes"]
            results[kind] = {
                "rebuilt": any("corrupt" in n for n in notes),
                "lm_tokens_exact": _exact_read(client, name),
            }
    for kind, name in names.items():
        results[kind]["snapshot_ok"] = verify_snapshot(home, name)["ok"]
    failed = [k for k, r in results.items() if not all(r.values())]
    return {"kinds": len(results), "failed": failed, "ok": not failed}


def check_ssrf(home: Path) -> dict[str, Any]:
    """Requests that name a URL of their own are refused, and that URL's server hears nothing:
    not the server's API key, not a memory's text. A foreign Host header is refused too."""
    with _Recorder() as trap, running(home, env={"OPENAI_API_KEY": "sk-server-secret"}) as server:
        with server.client() as client:
            _create(client, "ssrf")
            _write(client, "ssrf", [{"text": "the secret recipe is in the blue tin", "clip": 0}])
            spec = f"openai:{trap.url}/v1#m"
            attempts = [
                ("ask", {"query": "recipe?", "model": spec}),
                ("rank", {"query": "recipe", "backend": "embedding", "embedder": spec}),
                ("agent", {"question": "recipe?", "controller": spec, **READ_OPTIONS}),
            ]
            codes = [
                client.post(f"/v1/memories/ssrf/{route}", json=body).status_code for route, body in attempts
            ]
            host = client.get("/v1/memories", headers={"Host": "attacker.example"}).status_code
    refused = codes == [403, 403, 403]
    return {
        "statuses": codes,
        "foreign_host_status": host,
        "requests_to_the_url": len(trap.seen),
        "ok": refused and host == 421 and not trap.seen,
    }


def check_file_limit(home: Path, memories: int = 400, files: int = 256) -> dict[str, Any]:
    """`memories` memories created, written, listed and read through a server whose descriptor
    limit is `files`: every request answered, /health honest."""
    failures: list[str] = []
    with running(home, files=files) as server, server.client() as client:
        for i in range(memories):
            name = f"fd-{i}"
            for r in (
                client.post("/v1/memories", json={"name": name}),
                client.post(
                    f"/v1/memories/{name}/items",
                    json={"items": [{"text": f"note {i} about the mug", "clip": i}]},
                ),
            ):
                if r.status_code not in (200, 201):
                    failures.append(f"{name}: HTTP {r.status_code} {r.text[:200]}")
        listing = client.get("/v1/memories")
        listed = len(listing.json().get("memories", [])) if listing.status_code == 200 else 0
        for i in range(memories):
            r = client.post(f"/v1/memories/fd-{i}/rank", json={"query": "mug", "k": 1, **READ_OPTIONS})
            if r.status_code != 200 or r.json()["clips"] != [i]:
                failures.append(f"fd-{i} rank: HTTP {r.status_code} {r.text[:200]}")
        health = client.get("/health").status_code
    return {
        "memories": memories,
        "file_limit": files,
        "listed": listed,
        "failures": failures[:10],
        "ok": not failures and listed == memories and health == 200,
    }


def check_starvation(home: Path, askers: int = 4, asks: int = 25) -> dict[str, Any]:
    """`askers` threads ask one memory's LM reader in a loop (their questions are batched); the
    longest wait must stay within `starved`'s bound of the others' latencies."""
    with running(home) as server, server.client() as admin:
        _create(admin, "starve")
        _write(admin, "starve", _items(random.Random(5), 40))
        _ask(admin, "starve", "warm up", TINY_LM)
        waits: list[list[float]] = [[] for _ in range(askers)]

        def ask(i: int) -> None:
            with server.client() as client:
                for j in range(asks):
                    t0 = time.perf_counter()
                    _ask(client, "starve", f"asker {i} question {j}", TINY_LM)
                    waits[i].append(time.perf_counter() - t0)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(askers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    flat = [w for row in waits for w in row]
    return {
        "asks": len(flat),
        "p50_ms": _ms(flat, 50),
        "p95_ms": _ms(flat, 95),
        "max_ms": round(1000 * max(flat), 1),
        "ok": len(flat) == askers * asks and not starved(flat),
    }


def starved(waits: list[float]) -> bool:
    """Whether some wait is out of all proportion to the others: over ten times the 95th
    percentile plus a second (a starving caller waited 200 times the median)."""
    if len(waits) < 2:
        return False
    p95 = statistics.quantiles(waits, n=100, method="inclusive")[94]
    return max(waits) > 10 * p95 + 1.0


class _Recorder:
    """An HTTP server on 127.0.0.1 that records every request and answers 404: the URL an
    attacker would name."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __enter__(self) -> _Recorder:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _record(self) -> None:
                seen.append(f"{self.command} {self.path} {self.headers.get('Authorization')}")
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _record

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def verify_snapshot(home: Path, name: str, spec: str = "tiny:qwen3.5") -> dict[str, Any]:
    """Load the snapshot the server saved for memory `name` and compare it with a stateless read
    of the log: the same token count, and first-answer-token logits within 1e-4."""
    from .. import prompts, render
    from ..engines import load_engine
    from ..memory import open_memory
    from ..state import SnapshotStore

    memory = open_memory(name, home=home)
    try:
        engine = load_engine(spec)
        head, _ = engine.split(prompts.read_prompt([], ""))
        snap, update = SnapshotStore(engine, memory.cache_dir / "state", head, persist=False).get(memory.log)
        prompt = prompts.read_prompt(render.segments(memory.items()), "Where are the keys?")
        ids = engine.prompt_ids(prompt)
        full = engine.advance(engine.new_cache(), ids)
        cache = engine.fork(snap.cache)
        engine.advance(cache, engine.stem_ids(prompt))
        fast = engine.advance(cache, engine.tail_ids(prompt))
        memory_tokens = len(ids) - len(engine.stem_ids(prompt)) - len(engine.tail_ids(prompt))
    finally:
        memory.close()
    diff = float((full - fast).abs().max())
    loaded = update.reason == "loaded from disk"
    return {
        "loaded_from_disk": loaded,
        "tokens": snap.tokens,
        "stateless_tokens": memory_tokens,
        "max_logit_diff": diff,
        "ok": loaded and snap.tokens == memory_tokens and diff < 1e-4,
    }


def _exact_read(client: httpx.Client, name: str) -> bool:
    """Whether the server's snapshot read has the token count of its stateless read."""
    cached = _ask(client, name, "Where are the keys?", TINY_LM)["tokens"]
    stateless = _ask(client, name, "Where are the keys?", TINY_LM | {"stateless": True})["tokens"]
    return bool(
        cached["memory"] == stateless["memory"]
        and cached["processed"] + cached["cached"] == stateless["processed"]
    )


def _items(rng: random.Random, n: int, clip0: int = 0) -> list[dict[str, Any]]:
    words = "mug kitchen Alice Bob cupboard red plant window keys drawer pasta laptop sofa coat".split()
    return [
        {"text": " ".join(rng.choices(words, k=rng.randint(3, 14))) + ".", "clip": clip0 + i // 2}
        for i in range(n)
    ]


def _write(client: httpx.Client, name: str, items: list[dict[str, Any]]) -> None:
    client.post(f"/v1/memories/{name}/items", json={"items": items}).raise_for_status()


def _backup(src: Path, dst: Path) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


def _ask(client: httpx.Client, name: str, question: str, options: dict[str, Any]) -> dict[str, Any]:
    r = client.post(f"/v1/memories/{name}/ask", json={"query": question, **options})
    r.raise_for_status()
    return dict(r.json())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m linmem.service.reliability", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--long", action="store_true", help="2,000 operations and 20 crash trials")
    args = parser.parse_args(argv)
    ops, trials = (2000, 20) if args.long else (300, 3)
    checks: dict[str, Callable[[Path], dict[str, Any]]] = {
        "load": lambda home: check_load(home, ops),
        "crash": lambda home: check_crash(home, trials),
        "corruption": check_corruption,
        "backup_restore": check_backup_restore,
        "delete_during_update": check_delete_during_update,
        "swapped_state": check_swapped_state,
        "tampering": check_tampering,
        "ssrf": check_ssrf,
        "file_limit": check_file_limit,
        "starvation": lambda home: check_starvation(home, asks=60 if args.long else 25),
    }
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, check in checks.items():
            t0 = time.perf_counter()
            result[name] = check(Path(tmp) / name) | {"check_s": round(time.perf_counter() - t0, 1)}
    result["ok"] = all(c["ok"] for c in result.values())
    for line in _summary(result):
        print(line)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def _summary(r: dict[str, Any]) -> list[str]:
    load, crash, corr = r["load"], r["crash"], r["corruption"]
    verdict = {True: "ok", False: "FAILED"}
    return [
        f"load: {load['ops']} ops in {load['seconds']} s, {load['acknowledged_items']} items acknowledged, "
        f"{load['lost']} lost, {load['duplicated']} duplicated; write p50/p95 {load['write_p50_ms']}/"
        f"{load['write_p95_ms']} ms, embedding read {load['embedding_read_p50_ms']}/"
        f"{load['embedding_read_p95_ms']} ms, LM read {load['lm_read_p50_ms']}/{load['lm_read_p95_ms']} ms",
        f"crash: {crash['trials']} kill -9 trials, {crash['acknowledged_batches']} acknowledged batches, "
        f"{len(crash['failures'])} failures",
        f"corruption: {len(corr['damaged_files'])} cache files damaged; rebuilt snapshot exact: "
        f"{corr['snapshot']['ok']} (max logit diff {corr['snapshot']['max_logit_diff']:.1e})",
        f"backup restore: {verdict[r['backup_restore']['ok']]}; delete during update: "
        f"{verdict[r['delete_during_update']['ok']]}; "
        f"swapped state folder: {verdict[r['swapped_state']['ok']]}",
        f"header tampering: {r['tampering']['kinds']} kinds, failed: {r['tampering']['failed'] or 'none'}",
        f"ssrf: statuses {r['ssrf']['statuses']}, foreign Host {r['ssrf']['foreign_host_status']}, "
        f"{r['ssrf']['requests_to_the_url']} requests reached the named URL",
        f"file limit: {r['file_limit']['memories']} memories under "
        f"ulimit -n {r['file_limit']['file_limit']}: {verdict[r['file_limit']['ok']]}",
        f"starvation: {r['starvation']['asks']} LM asks, p50/p95/max {r['starvation']['p50_ms']}/"
        f"{r['starvation']['p95_ms']}/{r['starvation']['max_ms']} ms: {verdict[r['starvation']['ok']]}",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
