"""`linmem demo`: a household robot's day written to a memory, then questions to both readers."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

from .engines import DEFAULT_MODEL
from .errors import LinmemError, ModelUnavailable
from .itemfile import read_items
from .memory import delete_memory, memories, open_memory

SAMPLE = "robot_day.jsonl"
MAX_DEMO_BYTES = 4 << 30
QUESTIONS = (
    "Where did Bob put his car keys?",
    "What did Alice cook for lunch?",
    "When does Helen's flight arrive, and who will pick her up?",
)


def _lm_reader(memory: Any, model: str | None, say: Any) -> Any:
    """The LM reader for `model`; with none given, the default model when it is at hand, else
    the largest local GGUF under MAX_DEMO_BYTES (see `linmem.engines.llama.local_models`)."""
    candidates = [model] if model else [DEFAULT_MODEL, *_local_ggufs()]
    error: ModelUnavailable | None = None
    for spec in candidates:
        try:
            reader = memory.reader("lm", model=spec, max_new_tokens=96)
        except ModelUnavailable as e:
            error = error or e
            continue
        if error is not None:
            say(f"\n({DEFAULT_MODEL} is not available offline here; using the local GGUF {spec})")
        kind = getattr(reader.engine, "attention", "unknown")
        say(f"\n== LM reader ({reader.model_id}, {kind} attention) ==")
        return reader
    assert error is not None
    raise error


def _local_ggufs() -> list[str]:
    from .engines.llama import local_models

    found = [
        (p.stat().st_size, name) for name, p in local_models().items() if p.stat().st_size <= MAX_DEMO_BYTES
    ]
    # The largest that fits answers best; a 1.5B model reads the demo in about a minute on one core.
    return [f"gguf:{name}" for _, name in sorted(found, reverse=True)]


def sample_path() -> Path:
    return Path(str(resources.files("linmem") / "data" / SAMPLE))


def run_demo(
    *, home: str | Path | None = None, model: str | None = None, echo: bool = True
) -> dict[str, Any]:
    """Write the sample memory (replacing an earlier demo memory) and answer QUESTIONS."""
    say = print if echo else (lambda *a: None)
    if "demo" in memories(home):
        delete_memory("demo", home=home)
    memory = open_memory("demo", home=home, create=True)
    items = memory.write(read_items(sample_path()))
    clips = len({i.clip for i in items if i.clip is not None})
    say(
        f"Wrote {len(items)} caption lines ({clips} clips) of a household robot's day to memory 'demo' "
        f"({memory.path}).\n"
    )
    result: dict[str, Any] = {"memory": "demo", "items": len(items), "embedding": [], "lm": []}

    say("== Embedding reader (all-MiniLM-L6-v2, exact cosine, top clips verbatim) ==")
    for q in QUESTIONS:
        a = memory.ask(q, backend="embedding", top_k=1)
        result["embedding"].append(a.to_dict() | {"question": q})
        say(f"\nQ: {q}\n{a.text}\n  [clips {list(a.clips)}, {a.timings.total_s:.2f} s]")

    try:
        reader = _lm_reader(memory, model, say)
    except ModelUnavailable as e:
        say(f"\nThe LM reader is not available here: {e}\n")
        say("The embedding reader answered above. To get a real model for the LM reader:")
        repo = DEFAULT_MODEL.removeprefix("hf:")
        say(f"  hf download {repo}      (a linear hybrid; on a machine with internet)")
        say("  ollama pull qwen2.5:1.5b                  (then: linmem demo --model gguf:qwen2.5:1.5b)")
        say("  ../shared/models/get-models               (offline GGUFs, where that folder exists)")
        say("A GGUF model needs llama.cpp: pip install 'linmem[gguf]'. To run the LM reader's whole")
        say("pipeline with a random-weights model (noise answers; real prefill, snapshots and timings):")
        say("  linmem demo --model tiny:qwen3.5")
        result["lm_error"] = str(e)
        return result
    result["model"] = reader.model_id
    result["attention"] = getattr(reader.engine, "attention", None)
    for q in QUESTIONS:
        try:
            a = reader.read(q)
        except LinmemError as e:
            say(f"\nQ: {q}\n  error: {e}")
            result["lm"].append({"question": q, "error": str(e)})
            continue
        result["lm"].append(a.to_dict() | {"question": q})
        t = a.tokens
        say(f"\nQ: {q}\nA: {a.text}")
        tokens = f"tokens: memory {t.memory}, processed {t.processed}, cached {t.cached}"
        say(f"  [clips {list(a.clips)} | {tokens} | {a.timings.total_s:.2f} s]")
        for note in a.notes:
            say(f"  note: {note}")
    if echo:
        sys.stdout.flush()
    return result
