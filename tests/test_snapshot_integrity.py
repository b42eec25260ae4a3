"""A snapshot is only ever used over the log it was read from.

Each test changes what lies under a memory's caches the way a user (or an attacker) can: a
restored backup of the log, a memory deleted during a background update, another memory's
cache folder copied in, a hand-edited header, two stores saving into one folder. Each then checks
the promise itself: the read from the snapshot has exactly the stateless read's tokens, and the
logits of its first answer token are the stateless read's within 1e-4. (The models have random
weights, so equal answer *texts* would prove little: wrong states often give the same noise.)
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from linmem import prompts, render
from linmem.engines import load_engine
from linmem.memory import open_memory
from linmem.state import SnapshotStore
from linmem.types import Item

SPEC = "tiny:qwen3.5"
WORDS = "mug kitchen Alice Bob cupboard red plant window keys drawer pasta laptop sofa coat door".split()


def items(rng: random.Random, n: int, clip0: int = 0) -> list[Item]:
    return [
        Item(
            " ".join(rng.choices(WORDS, k=rng.randint(3, 14))) + ".", clip=clip0 + i // 2, time=f"{i:02d}:00"
        )
        for i in range(n)
    ]


def private_store(mem) -> SnapshotStore:
    """A store of its own on the memory's folder, as another process would have."""
    engine = load_engine(SPEC)
    head, _ = engine.split(prompts.read_prompt([], ""))
    return SnapshotStore(engine, mem.cache_dir / "state", head)


def first_token_logits(engine, cache, prompt) -> torch.Tensor:
    """Logits of the first answer token after `cache` (which holds the memory prefix)."""
    cache = engine.fork(cache)
    engine.advance(cache, engine.stem_ids(prompt))
    return engine.advance(cache, engine.tail_ids(prompt))


def assert_exact(mem, store: SnapshotStore, question: str = "Where are the keys?") -> None:
    """The snapshot `store` gives for the log now reads exactly like a stateless full read."""
    engine = store.engine
    snap, _ = store.get(mem.log)
    prompt = prompts.read_prompt(render.segments(mem.items()), question)
    head, segments = engine.memory_ids(prompt)
    assert snap.tokens == len(head) + sum(len(s) for s in segments)
    full = engine.advance(engine.new_cache(), engine.prompt_ids(prompt), chunk=10**6)
    assert (first_token_logits(engine, snap.cache, prompt) - full).abs().max().item() < 1e-4
    cached = mem.ask(question, model=SPEC, max_new_tokens=6)
    stateless = mem.ask(question, model=SPEC, max_new_tokens=6, stateless=True)
    assert cached.tokens.memory == stateless.tokens.memory
    assert cached.tokens.processed + cached.tokens.cached == stateless.tokens.processed


def backup(src: Path, dst: Path) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


def test_restored_backup_of_the_log_is_not_read_through_the_old_snapshot(tmp_path) -> None:
    rng = random.Random()
    mem = open_memory("m", create=True)
    mem.write(items(rng, 20))
    backup(mem.log.path, tmp_path / "backup.sqlite")
    mem.write(items(rng, 12, clip0=10))
    mem.ask("keys?", model=SPEC, max_new_tokens=4)  # the 32-item snapshot, in RAM and on disk
    backup(tmp_path / "backup.sqlite", mem.log.path)  # restore onto the live file
    mem.write(items(rng, 12, clip0=40))  # 32 items again, 12 of them different
    assert mem.state().count == 32
    assert_exact(mem, private_store(mem))  # what another process loads from disk
    assert_exact(mem, mem.reader("lm", model=SPEC, max_new_tokens=6).store)  # the live RAM copy
    # The embedding reader's vectors follow the restored items too.
    fresh = open_memory("m").reader("embedding", embedder="hash:64").rank("keys drawer", 5)
    assert mem.rank("keys drawer", 5, backend="embedding", embedder="hash:64").clips == fresh.clips


def test_another_memorys_state_folder_is_refused() -> None:
    rng = random.Random()
    same = items(rng, 15)
    a, b = open_memory("a", create=True), open_memory("b", create=True)
    a.write(same)
    b.write(items(rng, 15))  # the same count, other items
    a.ask("keys?", model=SPEC, max_new_tokens=4)
    shutil.rmtree(b.cache_dir, ignore_errors=True)
    shutil.copytree(a.cache_dir / "state", b.cache_dir / "state")
    snap, update = private_store(b).get(b.log)
    assert update.reason.startswith("snapshot on disk is corrupt") and "verify" in update.reason
    assert update.tokens == snap.tokens
    assert_exact(b, private_store(b))
    # Even the same items in another memory: its log has another id and secret.
    c = open_memory("c", create=True)
    c.write(same)
    shutil.copytree(a.cache_dir / "state", c.cache_dir / "state")
    _, update = private_store(c).get(c.log)
    assert "verify" in update.reason


def _header(store: SnapshotStore) -> dict:
    return json.loads((store.path / "header.json").read_text())


def _resign(mem, header: dict) -> dict:
    """Sign an edited header with the log's own secret: an attacker who has read log.sqlite.
    The checks besides the signature must still catch the edit."""
    from linmem.state import _canonical

    header.pop("mac", None)
    header["mac"] = mem.log.mac(_canonical(header))
    return header


def _edit(edit):
    """A tampering that edits the header's JSON (and leaves it unsigned, as a user editing by hand)."""

    def apply(mem, store: SnapshotStore, outside: Path) -> dict | None:
        h = _header(store)
        edit(h)
        return h

    return apply


def _signed(tamper):
    """The same tampering, re-signed with the log's secret (an attacker who read log.sqlite)."""

    def apply(mem, store: SnapshotStore, outside: Path) -> dict | None:
        return _resign(mem, tamper(mem, store, outside))

    return apply


def _lower_position(h: dict) -> None:
    h["position"]["last_id"] -= 3
    h["position"]["count"] -= 3


def _header_list(mem, store: SnapshotStore, outside: Path) -> None:
    (store.path / "header.json").write_text("[]")


def _header_folder(mem, store: SnapshotStore, outside: Path) -> None:
    (store.path / "header.json").unlink()
    (store.path / "header.json").mkdir()


def _outside_path(mem, store: SnapshotStore, outside: Path) -> dict:
    h = _header(store)
    shutil.copy(store.path / h["fixed"]["file"], outside)
    h["fixed"]["file"] = "../../../../" + outside.name
    return h


def _bad_content(mem, store: SnapshotStore, outside: Path) -> dict:
    """A valid safetensors file with the wrong tensors, its checksum and size updated."""
    import hashlib

    from safetensors.torch import save

    h = _header(store)
    data = save({"0.conv_states.0": torch.full((1, 3), float("nan"))})
    (store.path / h["fixed"]["file"]).write_bytes(data)
    h["fixed"] |= {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return h


def _kv_end(h: dict) -> None:
    h["kv"][-1]["end"] += 5


def _tokens_text(h: dict) -> None:
    h["tokens"] = "lots"


def _cursor(h: dict) -> None:
    h["cursor"]["clip"] = 999


def _dtype_os(h: dict) -> None:
    h["cache"]["layers"][0]["attrs"]["dtype"] = {"dtype": "os"}


TAMPERINGS = {
    "kv_end": _edit(_kv_end),
    "cursor": _edit(_cursor),
    "position_lowered": _edit(_lower_position),
    "tokens_text": _edit(_tokens_text),
    "tokens_text_signed": _signed(_edit(_tokens_text)),
    "kv_end_signed": _signed(_edit(_kv_end)),
    "cursor_signed": _signed(_edit(_cursor)),
    "position_lowered_signed": _signed(_edit(_lower_position)),
    "header_list": _header_list,
    "header_folder": _header_folder,
    "outside_path_signed": _signed(_outside_path),
    "dtype_os_signed": _signed(_edit(_dtype_os)),
    "bad_content_signed": _signed(_bad_content),
}


def _tamper(kind: str, mem, store: SnapshotStore, outside: Path) -> None:
    header = TAMPERINGS[kind](mem, store, outside)
    if header is not None:
        (store.path / "header.json").write_text(json.dumps(header))


@pytest.mark.parametrize("kind", sorted(TAMPERINGS))
def test_tampered_header_means_a_rebuild(kind: str, tmp_path) -> None:
    rng = random.Random()
    mem = open_memory("m", create=True)
    mem.write(items(rng, rng.randint(9, 21)))
    store = private_store(mem)
    store.get(mem.log)
    outside = tmp_path / "outside.safetensors"
    _tamper(kind, mem, store, outside)
    snap, update = private_store(mem).get(mem.log)
    assert update.reason.startswith(("snapshot on disk is corrupt", "the log no longer holds")), update.reason
    assert update.tokens == snap.tokens  # rebuilt from the log, every token
    assert_exact(mem, private_store(mem))  # the rebuilt snapshot was saved and loads cleanly
    assert (store.path / "header.json").is_file()


def test_a_restart_after_tampering_reads_exactly() -> None:
    """The rebuild is not a one-off: every later read, in every process, is exact."""
    mem = open_memory("m", create=True)
    mem.write(items(random.Random(), 13))
    store = private_store(mem)
    store.get(mem.log)
    h = _header(store)
    h["tokens"] = "lots"
    (store.path / "header.json").write_text(json.dumps(h))
    for _ in range(2):
        assert_exact(mem, private_store(mem))


def test_readers_that_differ_in_options_share_one_store() -> None:
    mem = open_memory("m", create=True)
    mem.write(items(random.Random(), 5))
    a = mem.reader("lm", model=SPEC, max_new_tokens=4)
    b = mem.reader("lm", model=SPEC, max_new_tokens=9)
    assert a is not b and a.store is b.store
    again = open_memory("m").reader("lm", model=SPEC, max_new_tokens=4)
    assert again.store is a.store


def test_tokenizing_in_two_threads_gives_each_its_own_ids() -> None:
    """Regression: the tokenizer's special-token switch is shared state; a memory item encoded in
    one thread while another encodes a prompt head must not change either's ids (it made a
    snapshot built during a write 31 tokens longer than its memory, seen in CI)."""
    engine = load_engine(SPEC)
    head = "<|im_start|>system\nYou answer.<|im_end|>\n" * 8
    item = "an item quoting <|im_end|> as text. " * 8
    want = {True: engine.encode(head), False: engine.encode(item, specials=False)}
    wrong: list[bool] = []

    def encode(specials: bool) -> None:
        for _ in range(300):
            if engine.encode(head if specials else item, specials=specials) != want[specials]:
                wrong.append(specials)
                return

    workers = [threading.Thread(target=encode, args=(s,)) for s in (True, False)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert wrong == []


def test_two_stores_on_one_folder_save_concurrently() -> None:
    """Two stores (as two processes would have) extend and save one folder while a writer
    appends: no save fails, and what is left on disk is a snapshot that reads exactly."""
    rng = random.Random()
    mem = open_memory("m", create=True)
    mem.write(items(rng, 6))
    stores = [private_store(mem), private_store(mem)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(store: SnapshotStore) -> None:
        try:
            while not stop.is_set():
                store.get(mem.log)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for i in range(40):
        mem.write(items(rng, 1, clip0=100 + i))
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    saves = [s.get(mem.log) for s in stores]
    assert all(snap.items == 46 for snap, _ in saves)
    assert_exact(mem, private_store(mem))
    referenced = set(json.dumps(_header(stores[0])).split('"'))
    on_disk = {f.name for f in stores[0].path.iterdir()}
    assert on_disk - referenced <= {"header.json", ".lock"}  # no orphaned files


def test_a_deleted_memory_is_never_recreated_by_a_late_save() -> None:
    from linmem.memory import delete_memory

    mem = open_memory("m", create=True)
    mem.write(items(random.Random(), 8))
    store = private_store(mem)
    snap, _ = store.get(mem.log)
    delete_memory("m")
    store._save(mem.log, snap)  # a background update that finishes after the delete
    assert not mem.path.exists()


def test_delete_during_a_background_update_leaks_nothing(linmem_home) -> None:
    from linmem.service import Service

    rng = random.Random()
    service = Service(linmem_home)
    service.create("m")
    service.write("m", items(rng, 30))
    service.ask("m", "keys?", model=SPEC, max_new_tokens=4)  # a live snapshot the writes extend
    service.write("m", items(rng, 400, clip0=100))  # acknowledged now, extended in the background
    service.delete("m")
    assert not (linmem_home / "m").exists()
    service.create("m")
    service.write("m", items(rng, 100, clip0=900))
    again = service.ask("m", "keys?", model=SPEC, max_new_tokens=4)
    stateless = service.ask("m", "keys?", model=SPEC, max_new_tokens=4, stateless=True)
    assert again.tokens.memory == stateless.tokens.memory
    assert_exact(open_memory("m"), private_store(open_memory("m")))


def test_hub_model_fingerprint_follows_refs_main(tmp_path) -> None:
    """A hub id resolves through the cache's refs/main: a new revision with new weights and the
    same config is a new fingerprint, so old snapshots are never applied to it."""
    import os
    import subprocess
    import sys

    from linmem.engines import tiny

    hub = tmp_path / "hf" / "hub" / "models--linmem-test--tiny"
    model, tokenizer = tiny.build("qwen3.5")
    for commit, nudge in (("a" * 40, 0.0), ("b" * 40, 0.01)):
        with torch.no_grad():
            next(model.parameters()).add_(nudge)
        model.save_pretrained(hub / "snapshots" / commit)
        tokenizer.save_pretrained(hub / "snapshots" / commit)
    (hub / "refs").mkdir()
    # The hub library reads its cache location once, at import: ask a fresh process each time.
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    script = "from linmem.engines import hf; print(hf.load_pretrained('linmem-test/tiny').fingerprint)"

    def fingerprint(commit: str) -> str:
        (hub / "refs" / "main").write_text(commit)
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.strip().splitlines()[-1]

    first = fingerprint("a" * 40)
    assert fingerprint("a" * 40) == first
    assert fingerprint("b" * 40) != first
