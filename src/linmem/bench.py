"""`linmem bench`: what a linear-attention memory costs, measured on this machine in one run.

Sections, each a table (and the whole run one JSON line at the end):

- reads: time to the first answer token for a stateless re-read of the memory and for a read
  from the state snapshot, for a Gated DeltaNet hybrid (tiny Qwen3.5), a KDA hybrid (tiny
  Kimi-Linear) and a softmax model of the same shape (tiny Qwen3, whose snapshot is a prefix KV
  cache), plus the embedding reader, at memories of 1k to 64k tokens. A length's speed is
  reported only if, in the same run, the cached read gave exactly the stateless read's answer.
- appends: writing ~500 tokens to each memory (the snapshot is extended by the new tokens only),
  with the time split between the linear-attention and the full-attention layers.
- bytes: snapshot size vs memory length per architecture, and the same arithmetic for the
  full-size configs (Kimi-Linear-48B-A3B, Qwen3.5-0.8B, Qwen3-30B-A3B).
- budget: the longest memory each architecture's cache holds under one RAM budget.
- rss: peak resident memory of a chunked prefill at 4k and 64k tokens (a fresh process each).
- kernels: the delta-rule kernels against transformers' references and the matmul roofline.

Random weights: speed and memory do not depend on the values. `--quick` keeps to 1k and 4k
tokens. `--targets` adds the project's own targets, each met or not. `--endpoint URL#MODEL`
instead times reads against a live OpenAI-compatible server. `--embedding` instead times the
first embedding of a memory of 20,000 lines, and what its speed depends on.

Every run checks the machine's load before and after (the load average and a small matmul's
timing spread), warns when other work shares the cores, and puts both checks in its JSON.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .memory import Memory, open_memory
from .types import Item

ARCHS = {"qwen3.5": "tiny:qwen3.5", "kimi-linear": "tiny:kimi-linear", "qwen3": "tiny:qwen3"}
LINEAR = ("qwen3.5", "kimi-linear")
LENGTHS = (1024, 4096, 16384, 65536)
QUICK_LENGTHS = (1024, 4096)
APPEND_TOKENS = 500
TINY_BUDGET_MB = 16
FULL_BUDGET_GIB = 2
WORDS = (
    "Alice Bob Clara Helen robot kitchen hallway study garden mug keys drawer cabinet fern window "
    "desk laptop coat umbrella bicycle parcel risotto spaghetti basil tea milk fridge sofa cat "
    "puts takes opens closes waters cooks carries finds leaves says asks moves hides red blue green"
).split()
QUESTIONS = ("Where are the keys?", "What did Alice cook?", "Who moved the fern?", "What is in the parcel?")

# Published configs of the full-size models (config.json on the hub), for the arithmetic tables.
FULL_SIZE: dict[str, dict[str, Any]] = {
    "Kimi-Linear-48B-A3B": {
        "linear_layers": 20, "linear_heads": 32, "dk": 128, "dv": 128, "conv_channels": 3 * 32 * 128,
        "attention": "mla", "attention_layers": 7, "kv_lora_rank": 512, "rope_dim": 64,
    },
    "Qwen3.5-0.8B": {
        "linear_layers": 18, "linear_heads": 16, "dk": 128, "dv": 128, "conv_channels": 3 * 16 * 128,
        "attention": "gqa", "attention_layers": 6, "kv_heads": 2, "head_dim": 256,
    },
    "Qwen3-30B-A3B": {
        "linear_layers": 0, "linear_heads": 0, "dk": 0, "dv": 0, "conv_channels": 0,
        "attention": "gqa", "attention_layers": 48, "kv_heads": 4, "head_dim": 128,
    },
}  # fmt: skip


def run_bench(
    *,
    quick: bool = False,
    out: Path | None = None,
    endpoint: str | None = None,
    with_targets: bool = False,
    echo: bool = True,
) -> dict[str, Any]:
    import torch

    say: Callable[[str], None] = print if echo else (lambda _m: None)
    result: dict[str, Any] = {"bench": "linmem", "quick": quick, "machine": _machine(torch)}
    threads = result["machine"]["threads"]
    result["load"] = {"before": load_check(threads)}
    _warn_if_busy(result["load"]["before"], "before", say)
    if endpoint:
        result["endpoint"] = endpoint_bench(endpoint, QUICK_LENGTHS if quick else LENGTHS, say)
    else:
        lengths = QUICK_LENGTHS if quick else LENGTHS
        result["reads"], result["appends"], result["bytes"] = _reads(lengths, say)
        result["full_size"] = full_size_table()
        result["budget"] = _budget()
        result["rss"] = _rss((1024, 4096) if quick else (4096, 65536))
        result["kernels"] = _kernels(quick)
    _finish_load(result, threads, say)
    return present(result, out=out, with_targets=with_targets, echo=echo)


def present(
    result: dict[str, Any], *, out: Path | None = None, with_targets: bool = False, echo: bool = True
) -> dict[str, Any]:
    """What a run measured, for people: the tables (the project's targets only `with_targets`),
    the plots in `out`, then the JSON line. Returns `result` with the targets and plots added."""
    say: Callable[[str], None] = print if echo else (lambda _m: None)
    if "reads" in result:
        if with_targets:
            result["targets"] = targets(result)
        _print_tables(result, say)
        if out is not None:
            result["plots"] = [str(p) for p in _plots(result, out)]
    if echo:
        print(json.dumps(result))
    return result


def _machine(torch: Any) -> dict[str, Any]:
    from .engines.base import threads

    # The engines and the embedder set this too: stated and set once, before anything is timed.
    torch.set_num_threads(threads())
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


# The machine's load

# A probe is "noisy" when its slower runs take this much longer than its fastest (30 runs of a
# 0.3-GFLOP matmul, 90th percentile over the fastest). Measured on 2 cores: 2.2 to 11.7 with
# other work running on them.
NOISY_SPREAD = 1.5
# Load an idle machine's own chores add (the 1-minute load average counts every runnable task).
IDLE_LOAD = 0.5


def load_check(threads: int) -> dict[str, Any]:
    """The machine's load now: the 1-minute load average, and the spread of a small matmul's
    timings on `threads` threads (`busy` reads them)."""
    import torch

    a, b = torch.randn(256, 384), torch.randn(384, 1536)
    times = []
    for i in range(33):
        t0 = time.perf_counter()
        a @ b
        if i >= 3:  # warm-up runs first
            times.append(time.perf_counter() - t0)
    times.sort()
    spread = times[int(0.9 * len(times))] / times[0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "load_1m": None if load is None else round(load, 2),
        "cores": os.cpu_count() or 1,
        "threads": threads,
        "probe_spread": round(spread, 2),
    }


def busy(
    load_1m: float | None, cores: int, threads: int, spread: float | None = None, own: float = 0.0
) -> str | None:
    """Why timings taken now are unreliable, or None: other work (the load average less `own`,
    this process's share of it, and less IDLE_LOAD) leaves fewer free cores than the `threads`
    timed, or a probe's timings spread more than NOISY_SPREAD. Sharing a core costs far more
    than its share: each multi-threaded op waits for its slowest thread."""
    reasons = []
    if load_1m is not None and max(0.0, load_1m - own) + threads > cores + IDLE_LOAD:
        reasons.append(f"load average {load_1m:.2f} on {cores} cores, {threads} thread(s) timed")
    if spread is not None and spread > NOISY_SPREAD:
        reasons.append(f"a small matmul's time varied {spread:.1f}x between runs")
    return "; ".join(reasons) or None


def _busy(check: dict[str, Any], own: float = 0.0) -> str | None:
    return busy(check["load_1m"], check["cores"], check["threads"], check["probe_spread"], own)


def _warn_if_busy(check: dict[str, Any], when: str, say: Callable[[str], None]) -> None:
    reason = _busy(check)
    if reason:
        say(f"WARNING: this machine is busy {when} the benchmark ({reason}): its figures are unreliable")


def _finish_load(result: dict[str, Any], threads: int, say: Callable[[str], None]) -> None:
    """The load after the run, less the run's own threads, and one verdict (printed last)."""
    load = result["load"]
    load["after"] = load_check(threads)
    found = (("before", _busy(load["before"])), ("after", _busy(load["after"], own=threads)))
    reasons = [f"{when}: {reason}" for when, reason in found if reason]
    load["busy"] = bool(reasons)
    load["warning"] = "; ".join(reasons) or None


# Reads and appends


def _items(rng: random.Random, n_chars: int, first_clip: int) -> list[Item]:
    items, size, clip = [], 0, first_clip
    while size < n_chars:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16))).capitalize() + "."
        items.append(Item(text, clip=clip, time=f"{clip // 2:02d}:{30 * (clip % 2):02d}"))
        size += len(text) + 1
        clip += rng.random() < 0.3
    return items


def _memory_items(tokens: int, seed: int) -> list[Item]:
    """Items whose rendered memory is about `tokens` tokens for the tiny models' byte-level
    tokenizer (a token per UTF-8 byte), counting the prompt head before it (~300 bytes)."""
    from .render import render

    rng = random.Random(seed)
    items: list[Item] = []
    while len(render(items).encode()) < tokens - 300:
        items += _items(rng, 200, (items[-1].clip or 0) + 1 if items else 0)
    return items


def _build_memory(home: Path, name: str, items: list[Item]) -> Memory:
    memory = open_memory(name, home=home, create=True)
    memory.write(items)
    return memory


def _reads(lengths: tuple[int, ...], say: Callable[[str], None]) -> tuple[list[Any], list[Any], list[Any]]:
    rng = random.Random(1)
    reads, appends, sizes = [], [], []
    with tempfile.TemporaryDirectory() as home:
        for length in lengths:
            # The same items for every architecture, each in a memory of its own: a write to a
            # memory extends the snapshots of every reader open on it.
            items = _memory_items(length, seed=length)
            for arch, spec in ARCHS.items():
                say(f"bench: {arch} at {length} tokens ...")
                memory = _build_memory(Path(home), f"{arch}-{length}", items)
                row, append, size = _one_memory(memory, arch, spec, rng)
                reads.append(row | {"arch": arch, "target_tokens": length})
                appends.append(append | {"arch": arch, "target_tokens": length})
                sizes.append(size | {"arch": arch, "target_tokens": length})
                memory.close()
            memory = _build_memory(Path(home), f"embedding-{length}", items)
            reads.append(_embedding_row(memory, length))
            memory.close()
    return reads, appends, sizes


def _median_of(fn: Callable[[str], Any], repeat: int) -> tuple[float, Any]:
    times, answer = [], None
    for i in range(repeat):
        answer = fn(QUESTIONS[i % len(QUESTIONS)])
        times.append(_ttft(answer))
    return statistics.median(times), answer


def _ttft(answer: Any) -> float:
    """Seconds to the first answer token: the prompt's forward pass (the first token is its argmax)."""
    t = answer.timings
    return (t.prefill_s or 0.0) + (t.query_s or 0.0)


def _one_memory(memory: Memory, arch: str, spec: str, rng: random.Random) -> tuple[dict, dict, dict]:
    cached = memory.reader("lm", model=spec, max_new_tokens=8)
    stateless = memory.reader("lm", model=spec, max_new_tokens=8, stateless=True)
    # The first read builds the snapshot (cold); the rest build every kind's state once.
    cold = _ttft(cached.read(QUESTIONS[0]))
    for q in QUESTIONS[1:]:
        cached.read(q)
    t_cached, a_cached = _median_of(cached.read, 5)
    full_cached = statistics.median(cached.read(q).timings.total_s for q in QUESTIONS[:3])
    n_slow = 1 if a_cached.tokens.memory > 20000 else 2
    t_full, a_full = _median_of(stateless.read, n_slow)
    same = [cached.read(q).text == stateless.read(q).text for q in QUESTIONS[: 1 if n_slow == 1 else 2]]
    exact = all(same) and a_cached.tokens.memory == a_full.tokens.memory
    row = {
        "memory_tokens": a_cached.tokens.memory,
        "query_tokens": a_cached.tokens.processed,
        "stateless_ttft_s": round(t_full, 5),
        "cached_ttft_s": round(t_cached, 5),
        "first_read_ttft_s": round(cold, 5),
        "speedup": round(t_full / t_cached, 1) if exact else None,
        "cached_read_s": round(full_cached, 5),
        "exact": exact,
    }
    append = _append(memory, cached, rng, exact)
    snap = cached.store.current()
    disk = cached.store.disk_bytes()
    size = {
        "memory_tokens": snap.tokens,
        "state_bytes": cached.engine.state_bytes(snap.cache),
        "disk_bytes": disk,
    }
    return row, append, size


def _append(memory: Memory, reader: Any, rng: random.Random, exact: bool) -> dict[str, Any]:
    """Write ~APPEND_TOKENS tokens; the live reader extends its snapshot by them."""
    clip = (memory.items()[-1].clip or 0) + 1
    before = reader.store.current().tokens
    with _LayerClock(reader.engine) as clock:
        t0 = time.perf_counter()
        memory.write(_items(rng, APPEND_TOKENS, clip))
        seconds = time.perf_counter() - t0
    added = reader.store.current().tokens - before
    return {
        "memory_tokens": before,
        "added_tokens": added,
        "append_s": round(seconds, 5) if exact else None,
        "linear_layers_s": round(clock.seconds.get("linear_attention", 0.0), 5),
        "attention_layers_s": round(clock.seconds.get("full_attention", 0.0), 5),
    }


class _LayerClock:
    """Wall time spent inside decoder layers, by layer type, while active (forward hooks)."""

    def __init__(self, engine: Any) -> None:
        model = engine.model
        self.layers = list(model.model.layers)
        types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(self.layers)
        self.types = ["linear_attention" if t == "linear_attention" else "full_attention" for t in types]
        self.seconds: dict[str, float] = {}
        self._handles: list[Any] = []
        self._start: dict[int, float] = {}

    def __enter__(self) -> _LayerClock:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre(i)))
            self._handles.append(layer.register_forward_hook(self._post(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            self._start[i] = time.perf_counter()

        return hook

    def _post(self, i: int) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            kind = self.types[i]
            self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - self._start[i]

        return hook


def _embedding_row(memory: Memory, length: int) -> dict[str, Any]:
    reader = memory.reader("embedding")
    reader.read(QUESTIONS[0])  # embed the memory once
    times = []
    for i, q in enumerate(QUESTIONS):
        t0 = time.perf_counter()
        reader.read(f"{q} ({length}.{i})")  # a new text: the query is embedded, not remembered
        times.append(time.perf_counter() - t0)
    return {"arch": "embedding", "target_tokens": length, "read_s": round(statistics.median(times), 5)}


# Bytes and budgets


def full_size_table() -> list[dict[str, Any]]:
    """Cache bytes of the full-size models from their configs: recurrent state (fp32, as both
    transformers and vLLM keep it), conv state and attention cache (bf16) per token."""
    rows = []
    budget = FULL_BUDGET_GIB * 2**30
    for name, c in FULL_SIZE.items():
        state = c["linear_layers"] * (c["linear_heads"] * c["dk"] * c["dv"] * 4 + c["conv_channels"] * 4 * 2)
        if c["attention"] == "mla":
            per_token = c["attention_layers"] * (c["kv_lora_rank"] + c["rope_dim"]) * 2
        else:
            per_token = c["attention_layers"] * 2 * c["kv_heads"] * c["head_dim"] * 2
        rows.append(
            {
                "model": name,
                "state_bytes": state,
                "bytes_per_token": per_token,
                "total_131k_bytes": state + per_token * 131072,
                "total_262k_bytes": state + per_token * 262144,
                f"tokens_in_{FULL_BUDGET_GIB}GiB": int((budget - state) // per_token),
            }
        )
    return rows


def _budget() -> dict[str, Any]:
    from .engines import load_engine
    from .evals.run import tokens_under_budget

    budget = TINY_BUDGET_MB * 2**20
    tokens = {arch: tokens_under_budget(load_engine(spec), budget) for arch, spec in ARCHS.items()}
    context = {arch: load_engine(spec).context_length for arch, spec in ARCHS.items()}
    return {"budget_mb": TINY_BUDGET_MB, "tokens": tokens, "context": context}


def _rss(lengths: tuple[int, int]) -> dict[str, Any]:
    """Peak RSS of a chunked prefill, each in a fresh process so nothing else counts (VmHWM:
    getrusage's maximum would carry over the parent's across exec)."""
    script = (
        "import sys, warnings, random\n"
        "warnings.filterwarnings('ignore')\n"
        "from linmem.engines import load_engine\n"
        "e = load_engine(sys.argv[1]); n = int(sys.argv[2])\n"
        "e.advance(e.new_cache(), [random.randrange(256) for _ in range(n)])\n"
        "hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0]\n"
        "print(int(hwm.split()[1]) * 1024)\n"
    )
    rows = {}
    for arch in LINEAR:
        peaks = []
        for n in lengths:
            done = subprocess.run(
                [sys.executable, "-c", script, ARCHS[arch], str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks.append(int(done.stdout.strip().splitlines()[-1]))
        rows[arch] = {
            "tokens": list(lengths),
            "peak_rss_bytes": peaks,
            "ratio": round(peaks[1] / peaks[0], 3),
        }
    return rows


def _kernels(quick: bool) -> dict[str, Any]:
    try:
        from .kernels.bench import kernel_bench
    except ImportError as e:  # the kernels are optional to the rest of the suite
        return {"error": str(e)}
    return kernel_bench(tokens=2048 if quick else 8192, heads=16, dim=128, repeat=2 if quick else 3)


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with its measured value and whether it was met."""
    reads = {(r["arch"], r["target_tokens"]): r for r in result["reads"]}
    appends = {(r["arch"], r["target_tokens"]): r for r in result["appends"]}
    out: dict[str, Any] = {}
    at16k = reads.get(("qwen3.5", 16384))
    if at16k:
        out["cached_read_50x_at_16k"] = {"value": at16k["speedup"], "met": (at16k["speedup"] or 0) >= 50}
    big = max((k[1] for k in appends if k[0] == "qwen3.5"), default=None)
    if big and big >= 16384:
        ratio = appends[("qwen3.5", big)]["append_s"] / appends[("qwen3.5", 1024)]["append_s"]
        out[f"append_500_at_{big // 1024}k_vs_1k_le_1.3x"] = {"value": round(ratio, 2), "met": ratio <= 1.3}
    rss = result.get("rss", {})
    if rss:
        worst = max(r["ratio"] for r in rss.values())
        out["prefill_peak_rss_ratio_le_1.5"] = {"value": worst, "met": worst <= 1.5}
    b = result["budget"]["tokens"]
    out["linear_holds_2x_softmax_under_budget"] = {
        "value": round(min(b["qwen3.5"], b["kimi-linear"]) / max(1, b["qwen3"]), 2),
        "met": min(b["qwen3.5"], b["kimi-linear"]) >= 2 * b["qwen3"],
    }
    k = result.get("kernels", {})
    for name, need in (("kda", 10.0), ("gdn", 2.0)):
        sub = k.get(name, {}) if isinstance(k, dict) else {}
        if "speedup" in sub:
            speed = sub["speedup"]
            met = (speed or 0) >= need
            out[f"{name}_kernel_{need:g}x_reference"] = {"value": _round(speed, 1), "met": met}
        if "roofline_fraction" in sub:
            frac = sub["roofline_fraction"]
            out[f"{name}_kernel_40pct_roofline"] = {"value": _round(frac, 3), "met": (frac or 0) >= 0.4}
    return out


# Output


def _print_tables(r: dict[str, Any], say: Callable[[str], None]) -> None:
    m = r["machine"]
    say(f"\nlinmem bench: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads")
    say("(random weights: speed and memory do not depend on them)\n")
    say("reads: seconds to the first answer token (stateless re-read vs snapshot); embedding: whole read")
    say(
        _table(
            ["arch", "memory tok", "query tok", "stateless s", "cached s", "speedup", "exact"],
            [
                [
                    x["arch"],
                    x["memory_tokens"],
                    x["query_tokens"],
                    x["stateless_ttft_s"],
                    x["cached_ttft_s"],
                    f"{x['speedup']}x" if x["speedup"] else "REFUSED",
                    x["exact"],
                ]
                if x["arch"] != "embedding"
                else ["embedding", f"~{x['target_tokens']}", "", "", x["read_s"], "", ""]
                for x in r["reads"]
            ],
        )
    )
    say(f"\nappends: ~{APPEND_TOKENS} tokens written to each memory (snapshot extended by them only)")
    say(
        _table(
            ["arch", "memory tok", "added tok", "append s", "linear layers s", "attention layers s"],
            [
                [
                    x["arch"],
                    x["memory_tokens"],
                    x["added_tokens"],
                    x["append_s"],
                    x["linear_layers_s"],
                    x["attention_layers_s"],
                ]
                for x in r["appends"]
            ],
        )
    )
    say("\nsnapshot bytes")
    say(
        _table(
            ["arch", "memory tok", "state bytes", "on disk"],
            [[x["arch"], x["memory_tokens"], x["state_bytes"], x["disk_bytes"]] for x in r["bytes"]],
        )
    )
    say(f"\nfull-size models (arithmetic from their configs; {FULL_BUDGET_GIB} GiB budget)")
    say(
        _table(
            [
                "model",
                "state MiB",
                "bytes/token",
                "at 131k GiB",
                "at 262k GiB",
                f"tokens in {FULL_BUDGET_GIB} GiB",
            ],
            [
                [
                    x["model"],
                    round(x["state_bytes"] / 2**20, 1),
                    x["bytes_per_token"],
                    round(x["total_131k_bytes"] / 2**30, 2),
                    round(x["total_262k_bytes"] / 2**30, 2),
                    x[f"tokens_in_{FULL_BUDGET_GIB}GiB"],
                ]
                for x in r["full_size"]
            ],
        )
    )
    b = r["budget"]
    say(f"\nlongest memory whose cache fits {b['budget_mb']} MiB (tiny models; capped at their context)")
    say(_table(["arch", "tokens", "context"], [[a, t, b["context"][a]] for a, t in b["tokens"].items()]))
    say("\npeak RSS of a chunked prefill (fresh process each)")
    say(
        _table(
            ["arch", "tokens", "peak RSS MiB", "ratio"],
            [
                [a, x["tokens"], [round(p / 2**20) for p in x["peak_rss_bytes"]], x["ratio"]]
                for a, x in r["rss"].items()
            ],
        )
    )
    k = r.get("kernels", {})
    if isinstance(k, dict) and "kda" in k:
        say(
            f"\ndelta-rule kernels at {k['tokens']} tokens x {k['heads']} heads x {k['dim']}; "
            f"fp32 matmul rate {k['matmul_gflops']:.0f} GFLOP/s"
        )
        say(_table(
            ["kernel", "ours ms", "reference ms", "speedup", "GFLOP/s", "of roofline", "err", "exact"],
            [
                [name, _r(x.get("ours_ms")), _r(x.get("reference_ms")), _r(x.get("speedup")),
                 _r(x.get("gflops")), _pct(x.get("roofline_fraction")), f"{x['err_ours_vs_naive']:.1e}",
                 x["exact"]]
                for name, x in (("GDN", k["gdn"]), ("KDA", k["kda"]))
            ],
        ))  # fmt: skip
    if "targets" in r:
        say("\ntargets (the project's own)")
        say(_table(["target", "value", "met"], [[t, v["value"], v["met"]] for t, v in r["targets"].items()]))
    if r["load"]["busy"]:
        say(f"\nWARNING: figures measured on a busy machine ({r['load']['warning']}): unreliable")


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def _plots(r: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arch in ARCHS:
        rows = [x for x in r["reads"] if x["arch"] == arch]
        xs = [x["memory_tokens"] for x in rows]
        line = ax.plot(xs, [x["cached_ttft_s"] for x in rows], "-o", label=f"{arch} snapshot, warm read")
        # The cold read builds the snapshot first: what a memory's first question costs.
        ax.plot(xs, [x.get("first_read_ttft_s") for x in rows], ":^", color=line[0].get_color(),
                mfc="none", label=f"{arch} snapshot, first read (builds it)")  # fmt: skip
        ax.plot(xs, [x["stateless_ttft_s"] for x in rows], "--o", color=line[0].get_color(), alpha=0.6,
                label=f"{arch} stateless re-read")  # fmt: skip
    emb = [x for x in r["reads"] if x["arch"] == "embedding"]
    ax.plot([x["target_tokens"] for x in emb], [x["read_s"] for x in emb], ":s", label="embedding reader")
    ax.set(xscale="log", yscale="log", xlabel="memory tokens", ylabel="seconds (to first answer token)")
    ax.set_title(f"Time to the first answer token ({r['machine']['threads']} threads)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    latency = out / "latency_vs_memory.png"
    fig.tight_layout()
    fig.savefig(latency, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for arch in ARCHS:
        rows = [x for x in r["bytes"] if x["arch"] == arch]
        ax.plot(
            [x["memory_tokens"] for x in rows], [x["state_bytes"] / 2**20 for x in rows], "-o", label=arch
        )
    ax.set(xscale="log", yscale="log", xlabel="memory tokens", ylabel="snapshot size (MiB)")
    ax.set_title("State snapshot size against memory length", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    sizes = out / "bytes_vs_memory.png"
    fig.tight_layout()
    fig.savefig(sizes, dpi=120)
    plt.close(fig)
    return [latency, sizes]


# Against a live server


def endpoint_bench(
    endpoint: str, lengths: tuple[int, ...], say: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Read latency vs memory length against an OpenAI-compatible server: per length, a first
    (cold) read and two more with other questions, whose prompt prefix the server may cache."""
    spec = endpoint if endpoint.startswith("openai:") else f"openai:{endpoint}"
    rng = random.Random(0)
    rows = []
    with tempfile.TemporaryDirectory() as home:
        for length in lengths:
            # A server tokenizer averages ~4 characters per token on this text.
            memory = open_memory(f"ep{length}", home=Path(home), create=True)
            memory.write(_items(rng, length * 4, 0))
            reader = memory.reader("lm", model=spec, max_new_tokens=16)
            answers = [reader.read(q) for q in QUESTIONS[:3]]
            rows.append(
                {
                    "target_tokens": length,
                    "memory_tokens": answers[0].tokens.memory,
                    "cold_s": round(answers[0].timings.total_s, 4),
                    "warm_s": round(statistics.median(a.timings.total_s for a in answers[1:]), 4),
                    "cached_tokens": [a.tokens.cached for a in answers],
                }
            )
            say(f"endpoint: {rows[-1]}")
            memory.close()
    return rows


# Embedding a memory

EMBED_ITEMS = 20_000
QUICK_EMBED_ITEMS = 2_000
EMBED_SAMPLE = 1024  # lines timed for each thread count and batch size
EMBED_BATCHES = (16, 32, 64, 128)
OLD_CHUNK = 4096  # lines per embedder call (and per progress bar) in the index's former loop
EMBED_ATOL = 1e-5  # float32 rounding from different padding is ~1e-7


def run_embedding_bench(
    *,
    items: int | None = None,
    quick: bool = False,
    echo: bool = True,
    batches: tuple[int, ...] = EMBED_BATCHES,
    sample: int = EMBED_SAMPLE,
) -> dict[str, Any]:
    """The first embedding of a memory of `items` short lines with MiniLM (the default embedder):
    the index's whole job, against the same lines embedded in 4,096-line calls on every core (as
    the index did before); a sample timed per thread count and batch size, sorted by length and
    not; the padding each batching costs; and the largest difference of the job's vectors from
    the former job's and from lines embedded one at a time (speeds are refused if it is too big).
    """
    import torch

    from .embedders import SentenceTransformerEmbedder, load_embedder

    say: Callable[[str], None] = print if echo else (lambda _m: None)
    n = items or (QUICK_EMBED_ITEMS if quick else EMBED_ITEMS)
    result: dict[str, Any] = {"bench": "linmem-embedding", "items": n, "machine": _machine(torch)}
    threads = result["machine"]["threads"]
    result["load"] = {"before": load_check(threads)}
    _warn_if_busy(result["load"]["before"], "before", say)
    memo = load_embedder(None)
    embedder = getattr(memo, "inner", memo)  # the model itself: the process's memo would skip work
    assert isinstance(embedder, SentenceTransformerEmbedder)
    texts = _lines(random.Random(0), n)
    result["padding"] = _padding(embedder.count_tokens(texts), embedder.batch_size)
    say(f"bench: {min(n, sample)} lines per thread count and batch size ...")
    result["sweep"] = _embed_sweep(embedder, texts[:sample], batches, threads)
    say(f"bench: {n} lines in {OLD_CHUNK}-line calls on {os.cpu_count()} threads ...")
    old, result["former"] = _former_job(embedder, texts)
    torch.set_num_threads(threads)
    say(f"bench: {n} lines through the index on {threads} thread(s) ...")
    new, result["index"] = _index_job(embedder, texts)
    result["exactness"] = _embed_exactness(embedder, texts, old, new)
    if not result["exactness"]["exact"]:
        for row in (result["former"], result["index"], *result["sweep"]):
            row["lines_per_s"] = None
    _finish_load(result, threads, say)
    _print_embedding(result, say)
    if echo:
        print(json.dumps(result))
    return result


def _lines(rng: random.Random, n: int) -> list[str]:
    """Short memory lines, most of 6 to 20 words, a few of 50 or more."""
    return [
        " ".join(rng.choice(WORDS) for _ in range(max(2, int(rng.lognormvariate(2.4, 0.6))))).capitalize()
        + "."
        for _ in range(n)
    ]


def _padding(tokens: list[int], batch: int) -> dict[str, Any]:
    """Tokens a padded batching runs per real token: in the given order, longest first within
    each former call of OLD_CHUNK lines, and longest first over all."""
    real = sum(tokens)

    def padded(lengths: list[int]) -> int:
        return sum(
            max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch)
        )

    return {
        "batch": batch,
        "tokens_mean": round(real / max(1, len(tokens)), 1),
        "tokens_max": max(tokens, default=0),
        "padded_per_token_unsorted": round(padded(tokens) / max(1, real), 3),
        "padded_per_token_sorted_per_call": round(
            sum(
                padded(sorted(tokens[i : i + OLD_CHUNK], reverse=True))
                for i in range(0, len(tokens), OLD_CHUNK)
            )
            / max(1, real),
            3,
        ),
        "padded_per_token_sorted": round(padded(sorted(tokens, reverse=True)) / max(1, real), 3),
    }


def _embed_sweep(
    embedder: Any, texts: list[str], batches: tuple[int, ...], threads: int
) -> list[dict[str, Any]]:
    import torch

    model, rows = embedder.model, []
    model.encode(texts[:8])  # warm-up
    for t in sorted({1, threads, os.cpu_count() or 1}):
        torch.set_num_threads(t)
        for batch in batches:
            seconds = _timed(model.encode, texts, batch_size=batch, show_progress_bar=False)
            rows.append(
                {"threads": t, "batch": batch, "sorted": True, "lines_per_s": round(len(texts) / seconds)}
            )
        seconds = _timed(_in_given_order, model, texts, embedder.batch_size)
        rows.append(
            {
                "threads": t,
                "batch": embedder.batch_size,
                "sorted": False,
                "lines_per_s": round(len(texts) / seconds),
            }
        )
    torch.set_num_threads(threads)
    return rows


def _in_given_order(model: Any, texts: list[str], batch: int) -> None:
    """One call per batch, so that no call can reorder its lines by length."""
    for i in range(0, len(texts), batch):
        model.encode(texts[i : i + batch], batch_size=batch)


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def _former_job(embedder: Any, texts: list[str]) -> tuple[Any, dict[str, Any]]:
    """The index's former loop: 4,096 lines per call, each sorted only within itself, on torch's
    default of every core (the embedder set no thread count)."""
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    parts = []
    for lo in range(0, len(texts), OLD_CHUNK):
        chunk = texts[lo : lo + OLD_CHUNK]
        parts.append(embedder.model.encode(chunk, batch_size=64, normalize_embeddings=True))
        embedder.count_tokens(chunk)
    seconds = time.perf_counter() - t0
    row = {"calls": len(parts), "threads": torch.get_num_threads(), "batch": 64, "seconds": round(seconds, 2)}
    return np.concatenate(parts), row | {"lines_per_s": round(len(texts) / seconds)}


def _index_job(embedder: Any, texts: list[str]) -> tuple[Any, dict[str, Any]]:
    """A memory of `texts` and its first embedding read's sync: embedding, token counts and the
    vector cache's writes, as a user's first read pays them."""
    import torch

    from .readers.embedding import EmbeddingReader

    with tempfile.TemporaryDirectory() as home:
        memory = open_memory("embedding", home=home, create=True)
        memory.write([Item(t, clip=i // 20) for i, t in enumerate(texts)])
        reader = EmbeddingReader(memory, embedder=embedder)
        t0 = time.perf_counter()
        reader.prepare()
        seconds = time.perf_counter() - t0
        vectors = reader.index.vectors()
        assert [i.text for i in vectors.items] == texts  # rows in the items' order
        matrix = vectors.matrix().copy()
        memory.close()
    row = {"threads": torch.get_num_threads(), "batch": embedder.batch_size, "seconds": round(seconds, 2)}
    return matrix, row | {"lines_per_s": round(len(texts) / seconds)}


def _embed_exactness(embedder: Any, texts: list[str], old: Any, new: Any) -> dict[str, Any]:
    """The index's vectors against the former job's, and both against 64 lines (every length)
    embedded alone: no padding, the reference."""
    import numpy as np

    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    picks = sorted({by_length[round(k * (len(texts) - 1) / 63)] for k in range(64)})
    alone = np.stack([embedder.embed([texts[i]])[0] for i in picks])
    diffs = {
        "index_vs_former": float(np.abs(new - old).max()),
        "index_vs_alone": float(np.abs(new[picks] - alone).max()),
        "former_vs_alone": float(np.abs(old[picks] - alone).max()),
    }
    return {f"max_abs_{k}": float(f"{v:.2e}") for k, v in diffs.items()} | {
        "atol": EMBED_ATOL,
        "exact": all(v <= EMBED_ATOL for v in diffs.values()),
    }


def _print_embedding(r: dict[str, Any], say: Callable[[str], None]) -> None:
    m, p = r["machine"], r["padding"]
    say(f"\nlinmem bench --embedding: {r['items']} lines, all-MiniLM-L6-v2, {m['cpu']}, {m['cores']} cores")
    say(
        f"tokens per line: mean {p['tokens_mean']}, max {p['tokens_max']}; padded tokens run per real "
        f"token in batches of {p['batch']}: {p['padded_per_token_unsorted']} in the given order, "
        f"{p['padded_per_token_sorted_per_call']} longest first per {OLD_CHUNK} lines, "
        f"{p['padded_per_token_sorted']} longest first"
    )
    f, i = r["former"], r["index"]
    say(
        _table(
            ["job", "threads", "seconds", "lines/s"],
            [
                [
                    f"{f['calls']} call(s) of up to {OLD_CHUNK} lines (former)",
                    f["threads"],
                    f["seconds"],
                    f["lines_per_s"],
                ],
                ["the index, longest first (now)", i["threads"], i["seconds"], i["lines_per_s"]],
            ],
        )
    )
    say("\na sample, lines/s by thread count and batch size")
    say(
        _table(
            ["threads", "batch", "sorted", "lines/s"],
            [[x["threads"], x["batch"], x["sorted"], x["lines_per_s"]] for x in r["sweep"]],
        )
    )
    e = r["exactness"]
    say(
        f"\nlargest difference: index vs former {e['max_abs_index_vs_former']}, vs lines embedded alone "
        f"{e['max_abs_index_vs_alone']} (former: {e['max_abs_former_vs_alone']}); "
        + ("exact" if e["exact"] else f"NOT EXACT (tolerance {e['atol']}): speeds refused")
    )
    if r["load"]["busy"]:
        say(f"\nWARNING: figures measured on a busy machine ({r['load']['warning']}): unreliable")
