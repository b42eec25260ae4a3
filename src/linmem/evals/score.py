"""Scoring one example with one reader: what was asked, what came back, and its metrics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..types import Answer
from . import metrics as M
from .config import Config, SystemConfig
from .tasks.base import Example


def score(
    example: Example, reader: Any, config: Config, judge: Any, *, task_name: str, system: SystemConfig
) -> dict[str, Any]:
    """Run `example` against `reader` (the reader of `system`) and score it by its kind."""
    mode = call(example, system)
    if mode == "rank":
        return _retrieval(example, reader.rank(example.question, max(config.k)), config)
    if mode == "read":
        return _answered(example, reader.read(example.question), config, judge, task_name)
    from ..agent import Agent

    assert system.agent
    trace = Agent(reader, **system.agent).run(example.question)
    result: dict[str, Any] = {
        "prediction": trace.answer,
        "trace": trace.to_dict(),
        "model": trace.reader,
        "controller": trace.controller,
        "rounds": trace.rounds,
        "tokens": _tokens(trace.reader_tokens),
        "controller_tokens": _tokens(trace.controller_tokens),
        "timings": {
            "total_s": trace.total_s,
            "controller_s": trace.controller_s,
            "reader_s": trace.reader_s,
        },
    }
    return _finish(example, trace.answer, result, judge, task_name)


def score_many(
    examples: Sequence[Example],
    reader: Any,
    config: Config,
    judge: Any,
    *,
    task_name: str,
    system: SystemConfig,
) -> list[dict[str, Any]]:
    """`[score(e, ...) for e in examples]` for examples asked by one kind of reader call (`call`
    gives the same "rank" or "read" for all), with the calls batched: `rank_many`, `read_many`."""
    modes = {call(e, system) for e in examples}
    questions = [e.question for e in examples]
    if modes == {"rank"}:
        ranked = reader.rank_many(questions, max(config.k))
        return [_retrieval(e, a, config) for e, a in zip(examples, ranked, strict=True)]
    if modes == {"read"}:
        read = reader.read_many(questions)
        return [_answered(e, a, config, judge, task_name) for e, a in zip(examples, read, strict=True)]
    raise ValueError(f"score_many needs examples of one batchable kind of call, found {sorted(modes)}")


def call(example: Example, system: SystemConfig) -> str:
    """How an example asks its system's reader: "rank" (retrieval), "read" (one answer), or
    "agent" (a controller dialogue of reads, which cannot be batched with other examples)."""
    if example.kind == "retrieval":
        return "rank"
    return "agent" if example.kind == "qa" and system.agent else "read"


def _answered(example: Example, answer: Answer, config: Config, judge: Any, task_name: str) -> dict[str, Any]:
    result = {"prediction": answer.text, "clips": list(answer.clips)} | _accounting(answer)
    return _finish(example, answer.text, result, judge, task_name)


def _finish(
    example: Example, prediction: str | None, result: dict[str, Any], judge: Any, task_name: str
) -> dict[str, Any]:
    metrics: dict[str, float] = {}
    if example.kind == "qa":
        metrics |= _qa_metrics(example, prediction, task_name)
    else:
        metrics["keyword_recall"] = M.keyword_recall(prediction or "", example.keywords)
        metrics["keyword_accuracy"] = M.keyword_accuracy(prediction or "", example.keywords)
    if judge is not None and example.answer is not None:
        verdict = judge.evaluate(example.question, example.answer, prediction)
        metrics["judge"] = float(verdict.correct)
        result["judge_raw"] = verdict.raw
    return result | {"metrics": metrics}


def _retrieval(example: Example, answer: Answer, config: Config) -> dict[str, Any]:
    top = max(config.k)
    ranked, gold = list(answer.clips), list(example.gold_clips)
    metrics = {f"hit@{k}": M.exact_hit(ranked, gold, k) for k in config.k}
    metrics |= {f"recall@{k}": M.recall_at_k(ranked, gold, k) for k in config.k}
    metrics |= {"near_hit": M.near_hit(ranked, gold, top), "mrr": M.reciprocal_rank(ranked, gold)}
    return {"prediction": answer.text[:2000], "clips": ranked, "metrics": metrics} | _accounting(answer)


def _qa_metrics(example: Example, prediction: str | None, task_name: str) -> dict[str, float]:
    gold = example.answer or ""
    text = prediction or ""
    category = _category(example)
    if task_name == "locomo" and category is not None:
        f1 = M.locomo_f1(text, gold, category)
    else:
        f1 = M.token_f1(text, gold)
    return {"answered": float(prediction is not None), "em": M.exact_match(text, gold), "f1": f1}


def _category(example: Example) -> int | None:
    for t in example.types:
        if t.startswith("category "):
            return int(t.split()[1])
    return None


def _tokens(t: Any) -> dict[str, Any]:
    return {"memory": t.memory, "processed": t.processed, "cached": t.cached, "generated": t.generated}


def _accounting(answer: Answer) -> dict[str, Any]:
    t, tm = answer.tokens, answer.timings
    return {
        "model": answer.model,
        "tokens": _tokens(t),
        "timings": {
            "total_s": tm.total_s,
            "prefill_s": tm.prefill_s,
            "query_s": tm.query_s,
            "generate_s": tm.generate_s,
        },
    }


def empty_metrics(example: Example, config: Config) -> dict[str, float]:
    """The metrics of an example that could not be read at all: every one a miss."""
    if example.kind == "retrieval":
        names = [f"hit@{k}" for k in config.k] + [f"recall@{k}" for k in config.k] + ["near_hit", "mrr"]
    elif example.kind == "qa":
        names = ["answered", "em", "f1"]
    else:
        names = ["keyword_recall", "keyword_accuracy"]
    if config.judge and example.answer is not None:
        names.append("judge")
    return dict.fromkeys(names, 0.0)
