"""Experiment configs: one TOML file per table of the paper, parsed strictly.

A config names the table layout, one or more tasks (the table's columns or row groups), the
systems compared (memory readers), and optionally the controller and the judge::

    title = "M3-Bench end-to-end QA accuracy"
    table = "main_qa"

    [[tasks]]
    label = "Robot"
    name = "m3bench"
    annotations = "${LINMEM_DATA}/m3bench/robot.json"
    memory_dir = "${LINMEM_DATA}/m3bench/captions/robot"

    [[systems]]
    name = "Kimi-Linear-48B-A3B"
    backend = "lm"
    model = "openai:http://127.0.0.1:8000/v1#moonshotai/Kimi-Linear-48B-A3B-Instruct"

    [agent]
    controller = "openai:http://127.0.0.1:8001/v1#M3-Agent-Control"

    [judge]
    model = "openai:http://127.0.0.1:8002/v1#gpt-4o-2024-11-20"

String values may use ``${VAR}`` (environment) and relative paths are resolved against the
config file's folder. Unknown keys are errors that name the file and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import BadInput

TABLES = (
    "main_qa",
    "hit_vs_context",
    "summarization",
    "linear_models",
    "memory_format",
    "scalability",
    "locomo_qa",
    "locomo_retrieval",
    "locomo_answers",
)
SYSTEM_KEYS = {
    "name", "backend", "model", "embedder", "top_k", "threshold", "max_new_tokens",
    "context_length", "overflow", "stateless", "memory_budget_mb", "lexical_weight", "second_line",
    "rerank", "rerank_depth",
}  # fmt: skip
# Keys of a system that steer the run, not its reader.
RUN_SYSTEM_KEYS = {"agent", "limit"}
BACKENDS = ("lm", "embedding", "hybrid")
AGENT_KEYS = {"controller", "policy", "rounds", "max_new_tokens", "temperature", "reuse_state"}
JUDGE_KEYS = {"model", "max_new_tokens"}
RUN_KEYS = {"batch", "concurrency", "k", "seed"}
TOP_KEYS = {"title", "table", "description", "tasks", "task", "systems", "agent", "judge", "run", "compare"}
_PATHLIKE = ("annotations", "memory_dir", "path")


@dataclass(frozen=True)
class TaskConfig:
    label: str
    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class SystemConfig:
    """One compared system: a reader (`backend` and its `options`), and how QA examples reach it.

    `agent` is the controller loop the system answers QA through (its own ``agent = {...}``, else
    the config's ``[agent]``; ``agent = false`` makes the reader answer by itself); `limit` caps
    the examples it runs per task (an expensive reference run on a few)."""

    name: str
    backend: str
    options: dict[str, Any]
    memory_budget_mb: float | None = None
    agent: dict[str, Any] | None = None
    limit: int | None = None


@dataclass(frozen=True)
class Config:
    path: Path
    text: str
    title: str
    table: str
    description: str
    tasks: tuple[TaskConfig, ...]
    systems: tuple[SystemConfig, ...]
    agent: dict[str, Any] | None
    judge: dict[str, Any] | None
    run: dict[str, Any] = field(default_factory=dict)
    # Pairs of systems whose paired difference (first minus second) the report gives an interval.
    compare: tuple[tuple[str, str], ...] = ()
    # How this run departs from the file's text (--set overrides, --offline): shown in reports.
    changes: tuple[str, ...] = ()

    @property
    def k(self) -> tuple[int, ...]:
        return tuple(self.run.get("k", (1, 5, 10)))


def load_config(
    path: str | Path, overrides: list[str] | None = None, unset: list[str] | None = None
) -> Config:
    """Read and check a config; `overrides` are ``dotted.key=TOML value`` strings applied first,
    and `unset` names dotted keys to remove (a subset's filter, to run the whole set)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except OSError as e:
        raise BadInput(f"{path}: cannot read config ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{path}: invalid TOML ({e})") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8") from None
    for item in overrides or []:
        _override(raw, item, path)
    for key in unset or []:
        _remove(raw, key)
    raw = _expand(raw, path.parent)
    changes = [f"--set {o}" for o in overrides or []] + [f"--unset {k}" for k in unset or []]
    return replace(_check(raw, path, text), changes=tuple(changes))


OFFLINE_LM = "tiny:qwen3.5"
OFFLINE_CONTROLLER = "tiny:qwen3"
OFFLINE_EMBEDDER = "hash"
# Offline, NIAH memory budgets and the systems' context limits shrink by this factor: the tiny
# stand-ins read bytes as tokens (about 4 per real token), and a smoke run must take minutes, not
# hours. Which system runs out of context at which budget stays as in the full run.
OFFLINE_SCALE = 16


def offline(config: Config) -> Config:
    """The same experiment with every model swapped for a tiny local stand-in: LM readers (and
    the hybrid reader's re-ranking LM) become tiny:qwen3.5, controllers and the judge tiny:qwen3,
    remote embedders the hash embedder. Local model files are swapped too: a machine without
    them could not run the config, and a 1.5B model is not a smoke test. The numbers are noise;
    the run proves the pipeline end to end, in minutes, without servers or weights."""

    def swap(spec: Any, local: str) -> Any:
        return spec if isinstance(spec, str) and spec.startswith("tiny:") else local

    def swap_agent(agent: dict[str, Any] | None) -> dict[str, Any] | None:
        if not agent:
            return agent
        agent = dict(agent)
        if agent.get("controller") is not None:
            agent["controller"] = swap(agent["controller"], OFFLINE_CONTROLLER)
        agent.setdefault("max_new_tokens", 48)
        return agent

    tasks, scaled = _offline_budgets(config.tasks)
    systems = []
    for s in config.systems:
        options = dict(s.options)
        if scaled and options.get("context_length"):
            options["context_length"] = max(1, int(options["context_length"]) // OFFLINE_SCALE)
        if s.backend == "lm":
            options["model"] = swap(options.get("model"), OFFLINE_LM)
            options.setdefault("max_new_tokens", 32)
        else:
            embedder = options.get("embedder")
            if isinstance(embedder, str) and embedder.startswith("openai:"):
                options["embedder"] = OFFLINE_EMBEDDER
            if "model" in options:  # the hybrid reader's re-ranking LM
                options["model"] = swap(options["model"], OFFLINE_LM)
        systems.append(replace(s, options=options, agent=swap_agent(s.agent)))
    judge = None
    if config.judge:
        judge = dict(config.judge) | {"model": swap(config.judge["model"], OFFLINE_CONTROLLER)}
    note = (
        f"--offline: LM readers replaced by {OFFLINE_LM}, the controller and judge by "
        f"{OFFLINE_CONTROLLER}, remote embedders by {OFFLINE_EMBEDDER} (numbers are noise)"
    )
    if scaled:
        note += f"; memory budgets and context limits divided by {OFFLINE_SCALE}"
    return replace(
        config,
        tasks=tasks,
        systems=tuple(systems),
        agent=swap_agent(config.agent),
        judge=judge,
        changes=(*config.changes, note),
    )


def _offline_budgets(tasks: tuple[TaskConfig, ...]) -> tuple[tuple[TaskConfig, ...], bool]:
    """The tasks with NIAH budgets divided by OFFLINE_SCALE, and whether any were."""
    from .tasks.synthetic import DEFAULT_BUDGETS

    out, scaled = [], False
    for task in tasks:
        if task.name == "niah":
            budgets = [max(1, int(b) // OFFLINE_SCALE) for b in task.options.get("budgets", DEFAULT_BUDGETS)]
            out.append(replace(task, options=task.options | {"budgets": budgets}))
            scaled = True
        else:
            out.append(task)
    return tuple(out), scaled


def _override(raw: dict[str, Any], item: str, path: Path) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise BadInput(f"--set {item!r}: expected dotted.key=value, e.g. systems.0.model=tiny:qwen3.5")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string
    node: Any = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = parsed
    else:
        node[last] = parsed


def _remove(raw: dict[str, Any], key: str) -> None:
    node: Any = raw
    parts = key.split(".")
    try:
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[parts[-1]]
    except (KeyError, IndexError, ValueError, TypeError):
        raise BadInput(f"--unset {key}: the config has no such key") from None


def _expand(value: Any, base: Path, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, base, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, base, key) for v in value]
    if isinstance(value, str):
        value = re.sub(r"\$\{(\w+)\}", lambda m: _env(m.group(1)), value)
        if key in _PATHLIKE and not Path(value).is_absolute():
            value = str((base / value).resolve())
    return value


def _env(name: str) -> str:
    if name not in os.environ:
        hint = " (the folder holding m3bench/ and locomo/, see the README)" if name == "LINMEM_DATA" else ""
        raise BadInput(f"the config uses ${{{name}}}, which is not set in the environment{hint}")
    return os.environ[name]


def _check(raw: dict[str, Any], path: Path, text: str) -> Config:
    where = str(path)
    _known(raw, TOP_KEYS, where)
    table = raw.get("table")
    if table not in TABLES:
        raise BadInput(f"{where}: table must be one of {', '.join(TABLES)}, found {table!r}")
    tasks_raw = raw.get("tasks") or ([raw["task"]] if "task" in raw else [])
    if not tasks_raw:
        raise BadInput(f"{where}: no [[tasks]] (or [task]) given")
    tasks = []
    for i, entry in enumerate(tasks_raw):
        t = dict(entry)
        if "name" not in t:
            raise BadInput(f"{where}: tasks[{i}] has no 'name'")
        name = t.pop("name")
        tasks.append(TaskConfig(label=str(t.pop("label", name)), name=name, options=t))
    for key, allowed in (("agent", AGENT_KEYS), ("judge", JUDGE_KEYS), ("run", RUN_KEYS)):
        if key in raw:
            _known(raw[key], allowed, f"{where}: [{key}]")
    systems = [
        _system(entry, f"{where}: systems[{i}]", raw.get("agent"))
        for i, entry in enumerate(raw.get("systems") or [])
    ]
    if not systems:
        raise BadInput(f"{where}: no [[systems]] given")
    names = [s.name for s in systems]
    if len(set(names)) != len(systems):
        raise BadInput(f"{where}: system names must be distinct")
    compare = raw.get("compare", [])
    if not isinstance(compare, list) or any(
        not isinstance(pair, list) or len(pair) != 2 or any(n not in names for n in pair) for pair in compare
    ):
        raise BadInput(
            f"{where}: compare must be a list of [system, system] pairs naming systems of this "
            f"config ({', '.join(names)}), found {compare!r}"
        )
    return Config(
        path=path,
        text=text,
        title=str(raw.get("title", path.stem)),
        table=table,
        description=str(raw.get("description", "")),
        tasks=tuple(tasks),
        systems=tuple(systems),
        agent=raw.get("agent"),
        judge=raw.get("judge"),
        run=raw.get("run", {}),
        compare=tuple((a, b) for a, b in compare),
    )


def _system(entry: dict[str, Any], at: str, shared_agent: Any) -> SystemConfig:
    _known(entry, SYSTEM_KEYS | RUN_SYSTEM_KEYS, at)
    s = dict(entry)
    backend = s.pop("backend", "lm")
    if backend not in BACKENDS:
        raise BadInput(f"{at}.backend must be one of {', '.join(BACKENDS)}, found {backend!r}")
    name = str(s.pop("name", s.get("model") or s.get("embedder") or backend))
    budget = s.pop("memory_budget_mb", None)
    agent = s.pop("agent", shared_agent)
    if agent is False:
        agent = None
    elif agent is not None:
        if not isinstance(agent, dict):
            raise BadInput(f"{at}.agent must be a table of agent settings or false, found {agent!r}")
        _known(agent, AGENT_KEYS, f"{at}.agent")
    limit = s.pop("limit", None)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BadInput(f"{at}.limit must be a positive integer, found {limit!r}")
    return SystemConfig(name, backend, s, budget, agent or None, limit)


def _known(section: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise BadInput(f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(sorted(allowed))})")
