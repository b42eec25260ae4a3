"""Reliability of the HTTP service under load, crashes and damaged caches.

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
  down; after a restart both are detected, rebuilt from the log, and give the same answers.

Prints a summary and one JSON line; exits non-zero when a correctness check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

TOKEN = "reliability-token"
READ_OPTIONS = {"backend": "embedding", "embedder": "hash"}
LM_OPTIONS = {"backend": "lm", "model": "tiny:qwen3.5", "max_new_tokens": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `linmem serve` child process on a free loopback port."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ, LINMEM_API_KEY=TOKEN, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-m", "linmem", "serve", "--home", str(self.home), "--port", str(self.port)]
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
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60.0)


@contextmanager
def running(home: Path) -> Iterator[Server]:
    server = Server(home)
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
    """Damage the snapshot and the embedding cache while the server is down; same answers after."""
    questions = ["Where is the mug?", "Who waters the fern?"]
    lm = {"backend": "lm", "model": "tiny:qwen3.5", "max_new_tokens": 8}
    with running(home) as server, server.client() as client:
        _create(client, "corrupt")
        items = [
            {"text": f"Clip {i}: Alice moves the {w}.", "clip": i}
            for i, w in enumerate(["mug", "fern", "keys"] * 4)
        ]
        client.post("/v1/memories/corrupt/items", json={"items": items}).raise_for_status()
        before = [_ask(client, q, opts) for q in questions for opts in (lm, READ_OPTIONS)]
    cache = home / "corrupt" / "cache"
    damaged = []
    for path in sorted(cache.rglob("*")):
        if path.is_file() and path.suffix in {".safetensors", ".sqlite"}:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0xFF
            data[-3] ^= 0xFF
            path.write_bytes(bytes(data))
            damaged.append(str(path.relative_to(cache)))
    with running(home) as server, server.client() as client:
        after = [_ask(client, q, opts) for q in questions for opts in (lm, READ_OPTIONS)]
    same = [
        a["answer"] == b["answer"] and a["clips"] == b["clips"] for a, b in zip(before, after, strict=True)
    ]
    notes = sorted({n for a in after for n in a.get("notes", []) if "corrupt" in n or "rebuilt" in n.lower()})
    return {
        "damaged_files": damaged,
        "same_answers": all(same),
        "notes": notes,
        "ok": all(same) and bool(damaged),
    }


def _ask(client: httpx.Client, question: str, options: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/memories/corrupt/ask", json={"query": question, **options})
    r.raise_for_status()
    return dict(r.json())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m linmem.service.reliability", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--long", action="store_true", help="2,000 operations and 20 crash trials")
    args = parser.parse_args(argv)
    ops, trials = (2000, 20) if args.long else (300, 3)
    with tempfile.TemporaryDirectory() as tmp:
        checks = {
            "load": check_load(Path(tmp) / "load", ops),
            "crash": check_crash(Path(tmp) / "crash", trials),
            "corruption": check_corruption(Path(tmp) / "corruption"),
        }
    result: dict[str, Any] = dict(checks) | {"ok": all(c["ok"] for c in checks.values())}
    load, crash = result["load"], result["crash"]
    print(
        f"load: {load['ops']} ops in {load['seconds']} s, {load['acknowledged_items']} items acknowledged, "
        f"{load['lost']} lost, {load['duplicated']} duplicated; write p50/p95 {load['write_p50_ms']}/"
        f"{load['write_p95_ms']} ms, embedding read {load['embedding_read_p50_ms']}/"
        f"{load['embedding_read_p95_ms']} ms, LM read {load['lm_read_p50_ms']}/{load['lm_read_p95_ms']} ms"
    )
    print(f"crash: {crash['trials']} kill -9 trials, {crash['acknowledged_batches']} acknowledged batches, "
          f"{len(crash['failures'])} failures")  # fmt: skip
    corr = result["corruption"]
    print(
        f"corruption: {len(corr['damaged_files'])} cache files damaged, "
        f"same answers after: {corr['same_answers']}"
    )
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
