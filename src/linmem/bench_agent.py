"""`linmem bench --agent SPEC`: the M3 controller with and without the state it keeps between rounds.

The memory is the packaged robot day (66 items), read by hybrid search or (`--backend lm`) by the
LM reader with the controller's own model; each question is run by the M3 agent twice with the
controller `SPEC`: once re-reading its whole dialogue every round (`reuse_state=False`, the
reference) and once from its kept state (`ChatSession`), in alternating order so that neither
always runs on a warmer machine. Reported per question: rounds, the controller's prompt tokens
run both ways, seconds both ways, and whether the two traces are identical (every turn's text,
action, query and clips). The target: identical traces, and at least 3x fewer controller prompt
tokens run on questions of 3 or more rounds.

The arithmetic bounds the gain: if round k adds a_k tokens, the reference runs sum_k (a_1 + ... +
a_k) and the kept state sum_k a_k; with equal a_k that is (n + 1) / 2 for n rounds (2x at 3,
3x at 5), more when the first prompt (the system message, the instruction) dominates.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .agent import Agent, Trace
from .demo import QUESTIONS, sample_path
from .engines.base import threads
from .itemfile import read_items
from .memory import open_memory

EXTRA_QUESTIONS = (
    "What did the robot do right after lunch?",
    "Who came to the door in the afternoon?",
)
MIN_ROUNDS = 3
TARGET = 3.0


def run_agent_bench(
    controller: str, *, backend: str = "hybrid", questions: int = 5, rounds: int = 5, echo: bool = True
) -> dict[str, Any]:
    say: Callable[[str], None] = print if echo else (lambda _m: None)
    asked = [*QUESTIONS, *EXTRA_QUESTIONS][: max(1, questions)]
    with tempfile.TemporaryDirectory(prefix="linmem-bench-agent-") as home:
        memory = open_memory("robot-day", home=Path(home), create=True)
        memory.write(read_items(sample_path()))
        # An LM reader reads with the controller's model: one model in RAM, as in the evals.
        reader = (
            memory.reader("lm", model=controller, max_new_tokens=96)
            if backend == "lm"
            else memory.reader(backend)
        )
        say(f"controller {controller}, reader {backend}, {threads()} thread(s), {len(asked)} questions")
        rows = []
        for i, question in enumerate(asked):
            order = (False, True) if i % 2 == 0 else (True, False)
            traces: dict[bool, Trace] = {}
            seconds: dict[bool, float] = {}
            for reuse in order:
                agent = Agent(reader, controller=controller, rounds=rounds, reuse_state=reuse)
                t0 = time.perf_counter()
                traces[reuse] = agent.run(question)
                seconds[reuse] = time.perf_counter() - t0
            rows.append(_row(question, traces, seconds))
            r = rows[-1]
            say(
                f"  {r['rounds']} rounds, controller tokens run {r['stateless_tokens']:,} -> "
                f"{r['kept_tokens']:,} ({r['ratio']:.2f}x), {r['stateless_s']:.1f} -> {r['kept_s']:.1f} s, "
                f"{'identical' if r['identical'] else 'TRACES DIFFER'}: {question}"
            )
        memory.close()
    long = [r for r in rows if r["rounds"] >= MIN_ROUNDS]
    summary: dict[str, Any] = {
        "identical": all(r["identical"] for r in rows),
        "ratio_all": _ratio(rows),
        f"ratio_{MIN_ROUNDS}_rounds_or_more": _ratio(long) if long else None,
        "questions_3_rounds_or_more": len(long),
    }
    met = summary["identical"] and long and (_ratio(long) or 0) >= TARGET
    summary["target"] = (
        f"identical traces and >= {TARGET}x at >= {MIN_ROUNDS} rounds: {'met' if met else 'missed'}"
    )
    say(json.dumps(summary))
    return {
        "bench": "linmem-agent",
        "controller": controller,
        "reader": backend,
        "threads": threads(),
        "machine": platform.processor() or platform.machine(),
        "questions": rows,
        **summary,
    }


def _row(question: str, traces: dict[bool, Trace], seconds: dict[bool, float]) -> dict[str, Any]:
    kept, fresh = traces[True], traces[False]
    return {
        "question": question,
        "answer": kept.answer,
        "rounds": kept.rounds,
        "identical": _turns(kept) == _turns(fresh) and kept.answer == fresh.answer,
        "stateless_tokens": fresh.controller_tokens.processed,
        "kept_tokens": kept.controller_tokens.processed,
        "ratio": fresh.controller_tokens.processed / max(1, kept.controller_tokens.processed),
        "stateless_s": seconds[False],
        "kept_s": seconds[True],
        "controller_stateless_s": fresh.controller_s,
        "controller_kept_s": kept.controller_s,
    }


def _turns(trace: Trace) -> list[tuple[Any, ...]]:
    return [(t.role, t.content, t.action, t.query, t.clips) for t in trace.turns]


def _ratio(rows: list[dict[str, Any]]) -> float | None:
    kept = sum(r["kept_tokens"] for r in rows)
    return sum(r["stateless_tokens"] for r in rows) / kept if kept else None


__all__ = ["run_agent_bench"]
