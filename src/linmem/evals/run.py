"""`linmem eval CONFIG`: run an experiment config, resumably, and write its report.

Results go to ``OUT/results.jsonl``, one line per (task, system, example), flushed as they come;
a rerun skips what is there. Examples read with one reader call each (everything but QA through a
controller) are read `[run] batch` at a time with `read_many` / `rank_many`, which answer as
one-by-one reads do. Memories are built under ``OUT/home``: examples that read growing
prefixes of one source (M3-Bench robot questions asked at increasing times) share one memory that
only grows, so each clip is written once and state snapshots are extended, not rebuilt.

Everything that can be checked before the run starts (the config, the annotation files, every
memory file the selected examples need) is checked first: bad input fails before a results file
exists. An engine failure (an unreachable endpoint) is not recorded, so a rerun retries it; a
memory that does not fit a model's context is a recorded outcome and counts as a miss.

Local models run in the calling thread, so that Ctrl-C (KeyboardInterrupt) lands at once, in a
prefill too; remote ones in daemon threads, which an interrupt stops at their next example and
never waits on long. Either way the journal keeps what finished and a partial report is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engines.base import StatefulEngine
from ..errors import BadInput, ContextOverflow, EmptyMemory, EngineError
from ..journal import Appender
from ..memory import Memory, open_memory
from ..types import Item
from .config import Config, SystemConfig, TaskConfig
from .tasks.base import Example, Task

RESULTS = "results.jsonl"
# What building each reader's keep of a memory cost (an LM's snapshot, an embedder's vectors),
# once per memory and model: {task, system, model, source, tokens, seconds}. Readers of one model
# share what was built (the first builds it), and reports divide its cost among the questions
# each system read from it.
PREFILLS = "prefill.jsonl"
BATCH = 8


@dataclass
class Outcome:
    """What a run did: records written now, records found from earlier runs, failures to retry."""

    written: int = 0
    skipped: int = 0
    failed: int = 0
    out: Path | None = None


def run_eval(
    config: Config,
    *,
    out: Path,
    limit: int | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
) -> Outcome:
    """Run every (task, system, example) of `config` not yet in `out`, then write the report.

    An interrupt (Ctrl-C: KeyboardInterrupt) stops the run within moments: what is finished stays
    in the journal, a partial report is written, and the KeyboardInterrupt goes on to the caller.
    `progress=False` shows no progress (else a bar on a terminal, lines in a log, see
    `linmem.progress`)."""
    from .report import write_report
    from .tasks import load_task

    say = echo or (lambda _msg: None)
    batch_size(config)
    tasks = [(tc, load_task(tc.name, **tc.options)) for tc in config.tasks]
    plan = [(tc, task, select(task, limit)) for tc, task in tasks]
    for _, task, examples in plan:
        _prefetch_memories(task, examples)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(config.text, encoding="utf-8")
    done = finished(out / RESULTS)
    outcome = Outcome(out=out)
    # Examples a system leaves out by its own `limit` are never run (nor counted as skipped).
    beyond = {
        (tc.label, s.name, e.id)
        for tc, _, examples in plan
        for s in config.systems
        if s.limit
        for e in examples[s.limit :]
    }
    keys = {(tc.label, s.name, e.id) for tc, _, examples in plan for e in examples for s in config.systems}
    outcome.skipped = len(keys & (done - beyond))
    done |= beyond
    jobs = []
    for tc, task, examples in plan:
        todo = [e for e in examples if any((tc.label, s.name, e.id) not in done for s in config.systems)]
        for source, group in _by_source(todo).items():
            jobs.append((tc, task, source, group))
    todo_n = len(keys - done)
    say(f"{todo_n} results to run, {outcome.skipped} already in {out / RESULTS}")
    evaluator = Evaluator(config, out / "home", done, out, progress=_progress(todo_n, progress))
    workers = config.run.get("concurrency", 4) if _all_remote(config) else 1
    try:
        _run_jobs(evaluator, jobs, workers)
    except KeyboardInterrupt:
        evaluator.close()
        outcome.written, outcome.failed = evaluator.written, evaluator.failed
        have, want = len(keys & finished(out / RESULTS)), len(keys - beyond)
        write_report(config, out, status=f"Interrupted: {have} of {want} results; rerun to resume.")
        say(
            f"interrupted: {outcome.written} results written ({have} of {want} there), "
            f"partial report in {out / 'report.md'}; rerun the same command to resume"
        )
        raise
    finally:
        evaluator.close()
    outcome.written, outcome.failed = evaluator.written, evaluator.failed
    write_report(config, out)
    say(f"{outcome.written} results written, {outcome.skipped} already there, {outcome.failed} failed")
    return outcome


# After an interrupt, how long worker threads get to finish the example in hand (their reads of a
# remote model may take minutes: they are left behind, as daemon threads, after that).
GRACE_S = 3.0


def _run_jobs(evaluator: Evaluator, jobs: list[tuple[Any, ...]], workers: int) -> None:
    """Run `jobs` (run_group's arguments): in this thread when one worker runs them (local models),
    so that an interrupt lands at once, even in a prefill; else in `workers` daemon threads that
    stop at the next example once `evaluator.stop` is set, and never hold the process at exit.
    A worker's error (a bug) is raised here."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            evaluator.run_group(*job)
        return
    queue = iter(jobs)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        while not evaluator.stop.is_set():
            with lock:
                job = next(queue, None)
            if job is None:
                return
            try:
                evaluator.run_group(*job)
            except BaseException as e:  # noqa: BLE001 (handed to the main thread)
                errors.append(e)
                evaluator.stop.set()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(jobs)))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:
        evaluator.stop.set()
        deadline = time.monotonic() + GRACE_S
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        raise
    if errors:
        raise errors[0]


def _progress(total: int, show: bool | None) -> Any:
    if show is False or total == 0:
        return None
    from .. import progress

    return progress.Task("eval", total, "results")


def batch_size(config: Config) -> int:
    """`[run] batch`: how many examples one batched read answers (default BATCH)."""
    size = config.run.get("batch", BATCH)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise BadInput(f"{config.path}: [run] batch must be a positive integer, found {size!r}")
    return size


def select(task: Task, limit: int | None) -> list[Example]:
    """The examples to run: all, or the first `limit` of the task, in its order (for M3-Bench,
    the first video's first questions; for a synthetic task, the smallest context first)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BadInput(f"--limit must be a positive integer, found {limit!r}")
    examples = list(task)
    return examples if limit is None else examples[:limit]


def finished(results: Path) -> set[tuple[str, str, str]]:
    """Keys of the records already written; a torn last line (a crash mid-write) is ignored."""
    return {(r["task"], r["system"], r["id"]) for r in _read_lines(results)}


def load_records(out: Path) -> list[dict[str, Any]]:
    return _read_lines(out / RESULTS)


def load_prefills(out: Path) -> list[dict[str, Any]]:
    """The builds recorded in OUT/prefill.jsonl (a torn last line is ignored)."""
    return _read_lines(out / PREFILLS)


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a journal file, one a line; a line that does not parse (the torn
    last line of a crash mid-write) is skipped. No file: no records."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _prefetch_memories(task: Task, examples: Iterable[Example]) -> None:
    # Reads (and so validates) every memory file the run needs before anything is written.
    for source in dict.fromkeys(e.source for e in examples):
        task.items(source)


def _by_source(examples: list[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        groups[e.source].append(e)
    for group in groups.values():
        group.sort(key=lambda e: (e.upto is None, e.upto or 0))
    return dict(groups)


def _all_remote(config: Config) -> bool:
    specs = [s.options.get("model") for s in config.systems if s.backend == "lm"]
    specs += [(s.agent or {}).get("controller") for s in config.systems]
    specs += [(config.judge or {}).get("model")]
    return all(spec is None or str(spec).startswith("openai:") for spec in specs)


class Evaluator:
    """Runs the examples of one source for every system, on a memory that only grows, and writes
    their records to OUT's journals; `stop` ends every `run_group` at its next example."""

    def __init__(
        self, config: Config, home: Path, done: set[tuple[str, str, str]], out: Path, *, progress: Any
    ):
        self.config = config
        self.home = home
        self.done = done
        self.writer = Appender(out / RESULTS)
        self.prefills = Appender(out / PREFILLS)
        self.progress = progress
        self.stop = threading.Event()
        self.written = self.failed = 0
        self._judge: Any = None
        # Worker threads count and write under it; once closed, a straggler's record is dropped
        # (its example is redone by the next run), never written to a closed file.
        self._lock = threading.Lock()
        self._closed = False

    def run_group(self, tc: TaskConfig, task: Task, source: str, examples: list[Example]) -> None:
        memory = open_memory(_memory_name(tc.label, source), home=self.home, create=True)
        try:
            for _, batch in _by_upto(examples):
                _ensure(memory, task.memory(batch[0]))
                for system in self.config.systems:
                    todo = [e for e in batch if (tc.label, system.name, e.id) not in self.done]
                    if todo and not self.stop.is_set():
                        self._prepare(tc, memory, system, source)
                    for chunk in self._chunks(todo, system):
                        if self.stop.is_set():
                            return
                        for record in self._many(tc, task, memory, system, chunk):
                            self._finish(record)
        finally:
            memory.close()
            # A memory assembled for one synthetic example is never read again: free its disk.
            if all(e.source == e.id for e in examples):
                shutil.rmtree(memory.path, ignore_errors=True)

    def _finish(self, record: dict[str, Any] | None) -> None:
        with self._lock:
            if self._closed:
                return
            if record is None:
                self.failed += 1
            else:
                self.writer.write(record)
                self.written += 1
            if self.progress is not None:
                self.progress.step()

    def _write_prefill(self, record: dict[str, Any]) -> None:
        with self._lock:
            if not self._closed:
                self.prefills.write(record)

    def close(self) -> None:
        """Stop the run and close the journals (the progress bar too)."""
        self.stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.writer.close()
            self.prefills.close()
            if self.progress is not None:
                self.progress.close()

    def _prepare(self, tc: TaskConfig, memory: Memory, system: SystemConfig, source: str) -> None:
        """Build what the system's reader keeps of this memory (an LM's snapshot, an embedder's
        vectors) before its questions, and record what that cost (nothing when it was built
        already, by another system or an earlier run)."""
        try:
            reader = memory.reader(system.backend, **self._reader_options(system))
            update = reader.prepare() if hasattr(reader, "prepare") else None
        except (EmptyMemory, EngineError):
            return  # each question records (or retries) it
        if update is not None and update.tokens:
            # Keyed by what was built: a snapshot is the LM's, vectors are the embedder's (and
            # shared with every reader of that embedder, the hybrid's dense half included).
            embedder = getattr(reader, "embedder", None)
            self._write_prefill(
                {
                    "task": tc.label,
                    "system": system.name,
                    "model": embedder.id if embedder is not None else reader.model_id,
                    "source": source,
                    "tokens": update.tokens,
                    "seconds": update.seconds,
                }
            )

    def _chunks(self, examples: list[Example], system: SystemConfig) -> list[list[Example]]:
        """Runs of consecutive examples asked with the same kind of reader call, at most `[run]
        batch` long; a controller dialogue runs alone. Order is kept, so each read finds the
        reader's caches as one-by-one reads would."""
        from .score import call

        size = batch_size(self.config)
        chunks: list[list[Example]] = []
        for e in examples:
            last = chunks[-1] if chunks else None
            mode = call(e, system)
            if last and mode != "agent" and call(last[0], system) == mode and len(last) < size:
                last.append(e)
            else:
                chunks.append([e])
        return chunks

    def _many(
        self, tc: TaskConfig, task: Task, memory: Memory, system: SystemConfig, examples: list[Example]
    ) -> list[dict[str, Any] | None]:
        """The records of `examples`, read in one batch; on an error, one by one, so that each
        example records its own outcome."""
        from .score import score_many

        if len(examples) == 1:
            return [self._one(tc, task, memory, system, examples[0])]
        try:
            reader = memory.reader(system.backend, **self._reader_options(system))
            results = score_many(
                examples, reader, self.config, self._get_judge(), task_name=tc.name, system=system
            )
        except (ContextOverflow, EmptyMemory, EngineError):
            return [self._one(tc, task, memory, system, e) for e in examples]
        return [self._record(tc, system, e) | r for e, r in zip(examples, results, strict=True)]

    def _one(
        self, tc: TaskConfig, task: Task, memory: Memory, system: SystemConfig, example: Example
    ) -> dict[str, Any] | None:
        from .score import score

        record = self._record(tc, system, example)
        try:
            reader = memory.reader(system.backend, **self._reader_options(system))
            record |= score(example, reader, self.config, self._get_judge(), task_name=tc.name, system=system)
        except (ContextOverflow, EmptyMemory) as e:
            record |= {"error": {"code": e.code, "message": str(e)}, "metrics": _misses(example, self.config)}
        except EngineError as e:
            print(f"linmem eval: {system.name} on {example.id}: {e} (will retry on rerun)", file=sys.stderr)
            return None
        return record

    @staticmethod
    def _record(tc: TaskConfig, system: SystemConfig, example: Example) -> dict[str, Any]:
        return {
            "task": tc.label,
            "system": system.name,
            "id": example.id,
            "source": example.source,
            "kind": example.kind,
            "types": list(example.types),
            "question": example.question,
            "gold": example.answer,
            "gold_clips": list(example.gold_clips),
            "meta": example.meta,
        }

    def _reader_options(self, system: SystemConfig) -> dict[str, Any]:
        options = dict(system.options)
        if system.memory_budget_mb is not None and system.backend == "lm":
            from ..engines import load_engine

            cap = tokens_under_budget(load_engine(options.get("model")), system.memory_budget_mb * 2**20)
            options["context_length"] = min(cap, options.get("context_length") or cap)
        return options

    def _get_judge(self) -> Any:
        if self.config.judge and self._judge is None:
            from .judge import Judge

            self._judge = Judge(**self.config.judge)
        return self._judge


def _misses(example: Example, config: Config) -> dict[str, float]:
    from .score import empty_metrics

    return empty_metrics(example, config)


def _by_upto(examples: list[Example]) -> list[tuple[int | None, list[Example]]]:
    batches: list[tuple[int | None, list[Example]]] = []
    for e in examples:
        if batches and batches[-1][0] == e.upto:
            batches[-1][1].append(e)
        else:
            batches.append((e.upto, [e]))
    return batches


def _memory_name(label: str, source: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{label}-{source}").strip("._-")[:40] or "m"
    digest = hashlib.sha256(f"{label}\0{source}".encode()).hexdigest()[:10]
    return f"{readable}-{digest}"


def _ensure(memory: Memory, items: list[Item]) -> None:
    """Make the memory hold exactly `items`: append when it holds a prefix, else rewrite it."""
    have = memory.items()
    key = [(i.text, i.clip, i.time, i.source) for i in items]
    current = [(i.text, i.clip, i.time, i.source) for i in have]
    if current == key[: len(current)]:
        if len(current) < len(key):
            memory.write(items[len(current) :])
        return
    memory.clear()
    memory.write(items)


def tokens_under_budget(engine: Any, budget_bytes: float) -> int:
    """The longest memory whose model cache fits `budget_bytes`, from two measured prefills.

    A cache costs a constant (linear-attention states) plus a per-token amount (attention keys
    and values); both are measured on this model, so the cap is the model's own, not a guess.
    """
    if not isinstance(engine, StatefulEngine):
        raise BadInput(f"{engine.id}: memory_budget_mb needs a local model (hf:, gguf: or tiny:)")
    sizes = []
    for n in (96, 224):
        cache = engine.new_cache()
        engine.advance(cache, [0] * n)
        sizes.append(engine.state_bytes(cache))
    per_token = (sizes[1] - sizes[0]) / 128
    constant = sizes[0] - 96 * per_token
    limit = engine.context_length or 10**9
    if per_token <= 0:
        return int(limit) if budget_bytes >= constant else 0
    return int(max(0, min(limit, (budget_bytes - constant) // per_token)))


__all__ = [
    "PREFILLS",
    "Outcome",
    "load_records",
    "load_prefills",
    "run_eval",
    "select",
    "tokens_under_budget",
]
