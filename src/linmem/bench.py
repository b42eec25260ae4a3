"""`linmem bench`: what state caching buys, measured in one run on this machine.

For each memory length it times a stateless full re-read against a read from the state
snapshot, and an append of ~500 tokens (a write that extends the snapshot by the new tokens
only). Speed is reported only when the cached read gave exactly the stateless read's answer in
the same run. Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from .memory import open_memory
from .types import Item

WORDS = (
    "Alice Bob Clara Helen robot kitchen hallway study garden mug keys drawer cabinet fern window "
    "desk laptop coat umbrella bicycle parcel risotto spaghetti basil tea milk fridge sofa cat "
    "puts takes opens closes waters cooks carries finds leaves says asks moves hides red blue green"
).split()
QUESTIONS = ("Where are the keys?", "What did Alice cook?", "Who moved the fern?", "What is in the parcel?")


def _items(rng: random.Random, n_chars: int, first_clip: int) -> list[Item]:
    items, size, clip = [], 0, first_clip
    while size < n_chars:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."
        items.append(Item(text, clip=clip, time=f"{clip // 2:02d}:{30 * (clip % 2):02d}"))
        size += len(text) + 1
        clip += rng.random() < 0.3
    return items


def _grow_to(memory: Any, reader: Any, tokens: int, rng: random.Random) -> None:
    """Write items until the memory prefix holds about `tokens` tokens."""
    engine = reader.engine
    while True:
        have = engine.count_tokens(reader_prompt(memory)) if memory.state().count else 0
        if have >= tokens:
            return
        last = memory.items()[-1].clip + 1 if memory.state().count else 0
        memory.log.append(_items(rng, max(64, tokens - have), last))


def reader_prompt(memory: Any) -> Any:
    from . import prompts, render

    return prompts.read_prompt(render.segments(memory.items()), "")


def _median(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run_bench(
    *,
    model: str = "tiny:qwen3.5",
    lengths: tuple[int, ...] = (1024, 4096, 16384),
    append_tokens: int = 500,
    repeat: int = 3,
    echo: bool = True,
) -> dict[str, Any]:
    import torch

    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as home:
        for length in lengths:
            memory = open_memory(f"bench{length}", home=Path(home), create=True)
            cached_reader = memory.reader("lm", model=model, max_new_tokens=8)
            stateless_reader = memory.reader("lm", model=model, max_new_tokens=8, stateless=True)
            _grow_to(memory, cached_reader, length, rng)
            cached_reader.read(QUESTIONS[0])  # build the snapshot once
            t_cached, a_cached = _median(partial(cached_reader.read, QUESTIONS[1]), repeat + 2)
            t_full, a_full = _median(partial(stateless_reader.read, QUESTIONS[1]), repeat)
            exact = a_cached.text == a_full.text and a_cached.tokens.memory == a_full.tokens.memory
            before = a_cached.tokens.memory
            new = _items(rng, append_tokens, (memory.items()[-1].clip or 0) + 1)
            t0 = time.perf_counter()
            memory.write(new)
            t_append = time.perf_counter() - t0
            after = cached_reader.read(QUESTIONS[2])
            rows.append(
                {
                    "memory_tokens": a_cached.tokens.memory,
                    "query_tokens": a_cached.tokens.processed,
                    "stateless_processed": a_full.tokens.processed,
                    "stateless_s": round(t_full, 4),
                    "cached_s": round(t_cached, 4),
                    "speedup": round(t_full / t_cached, 1) if exact else None,
                    "exact": exact,
                    "append_tokens": after.tokens.memory - before,
                    "append_s": round(t_append, 4) if exact else None,
                }
            )
            memory.close()
    base = rows[0]["append_s"]
    for r in rows:
        r["append_vs_first"] = round(r["append_s"] / base, 2) if base and r["append_s"] else None
    result = {
        "bench": "state-cache",
        "model": model,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "rows": rows,
        "all_exact": all(r["exact"] for r in rows),
    }
    if echo:
        _table(result)
        print(json.dumps(result))
    return result


def _table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(
        f"state caching, {result['model']} (random weights), {m['cores']} cores, torch {m['torch']}, "
        f"{m['threads']} threads"
    )
    head = (
        "memory tok",
        "query tok",
        "stateless s",
        "cached s",
        "speedup",
        "exact",
        "+tok",
        "append s",
        "vs first",
    )
    print(" | ".join(f"{h:>11}" for h in head))
    for r in result["rows"]:
        cells = (
            r["memory_tokens"],
            r["query_tokens"],
            r["stateless_s"],
            r["cached_s"],
            f"{r['speedup']}x" if r["speedup"] else "REFUSED",
            r["exact"],
            r["append_tokens"],
            r["append_s"],
            r["append_vs_first"],
        )
        print(" | ".join(f"{c!s:>11}" for c in cells))
    if not result["all_exact"]:
        print("a cached read differed from the stateless read: speed not reported for that length")
