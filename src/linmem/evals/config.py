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

String values may use ``${VAR}`` (environment). A relative path written in the file resolves
against the file's folder (a config and its data travel together); one that comes from the shell,
an environment value such as ``LINMEM_DATA=../data`` or a ``--set`` value, resolves against the
working directory, where it was typed. Unknown keys, and values of the wrong kind, are errors that
name the file, the key, what was expected and what was found: all before any work starts.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..agent import POLICIES
from ..errors import BadInput
from ..readers.hybrid import RERANKERS
from ..readers.lm import OVERFLOW_MODES

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
    # What an --offline run reads in place of the real models and data: shown atop its report.
    stand_ins: tuple[str, ...] = ()

    @property
    def k(self) -> tuple[int, ...]:
        return tuple(self.run.get("k", (1, 5, 10)))


def load_config(
    path: str | Path,
    overrides: list[str] | None = None,
    unset: list[str] | None = None,
    *,
    offline: bool = False,
) -> Config:
    """Read and check a config; `overrides` are ``dotted.key=TOML value`` strings applied first,
    and `unset` names dotted keys to remove (a subset's filter, to run the whole set) or list
    entries (``systems.4``: a system left out; the highest index of a list goes first, so each
    index names the entry of the config as written).

    `offline` (for ``--offline``): a ``${VAR}`` the environment lacks stays as written instead of
    failing; it names no file, so `offline` puts stand-in data in its place."""
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
        _override(raw, item)
    for key in sorted(unset or [], key=_later_entries_first):
        _remove(raw, key)
    raw = _expand(raw, path.parent, strict_env=not offline)
    changes = [f"--set {o}" for o in overrides or []] + [f"--unset {k}" for k in unset or []]
    return replace(_check(raw, path, text), changes=tuple(changes))


OFFLINE_LM = "tiny:qwen3.5"
OFFLINE_CONTROLLER = "tiny:qwen3"
OFFLINE_EMBEDDER = "hash"
# Offline, NIAH memory budgets and the systems' context limits shrink by this factor: the tiny
# stand-ins read bytes as tokens (about 4 per real token), and a smoke run must take minutes, not
# hours. Which system runs out of context at which budget stays as in the full run.
OFFLINE_SCALE = 16
# The most tokens an offline stand-in reader writes per answer.
OFFLINE_MAX_NEW = 32


def offline(config: Config, data: Path | None = None) -> Config:
    """The same experiment with every model swapped for a tiny local stand-in: LM readers (and
    the hybrid reader's re-ranking LM) become tiny:qwen3.5, controllers and the judge tiny:qwen3,
    remote embedders the hash embedder. Local model files are swapped too: a machine without
    them could not run the config, and a 1.5B model is not a smoke test. The numbers are noise;
    the run proves the pipeline end to end, in minutes, without servers or weights.

    A system whose models were swapped is renamed for them (``Kimi → tiny:qwen3.5 (offline)``),
    so that a report's table names what ran and its records never pass for the real system's.
    With `data`, a task whose real data is absent reads stand-in data generated there
    (`linmem.evals.standin`)."""

    tasks, scaled = _offline_budgets(config.tasks)
    data_notes: tuple[str, ...] = ()
    if data is not None:
        from .standin import stand_in

        tasks, data_notes = stand_in(tasks, data)
    systems = tuple(_offline_system(s, scaled) for s in config.systems)
    names = {real.name: ran.name for real, ran in zip(config.systems, systems, strict=True)}
    judge = None
    if config.judge:
        judge = dict(config.judge) | {"model": _swap(config.judge["model"], OFFLINE_CONTROLLER)}
    note = (
        f"--offline: LM readers replaced by {OFFLINE_LM}, the controller and judge by "
        f"{OFFLINE_CONTROLLER}, remote embedders by {OFFLINE_EMBEDDER} (numbers are noise)"
    )
    if scaled:
        note += f"; memory budgets and context limits divided by {OFFLINE_SCALE}"
    return replace(
        config,
        tasks=tasks,
        systems=systems,
        agent=_swap_agent(config.agent),
        judge=judge,
        compare=tuple((names[a], names[b]) for a, b in config.compare),
        changes=(*config.changes, note),
        stand_ins=(note, *data_notes),
    )


def _swap(spec: Any, local: str) -> Any:
    return spec if isinstance(spec, str) and spec.startswith("tiny:") else local


def _swap_agent(agent: dict[str, Any] | None) -> dict[str, Any] | None:
    if not agent:
        return agent
    agent = dict(agent)
    if agent.get("controller") is not None:
        agent["controller"] = _swap(agent["controller"], OFFLINE_CONTROLLER)
    agent.setdefault("max_new_tokens", 48)
    return agent


def _offline_system(s: SystemConfig, scaled: bool) -> SystemConfig:
    options = dict(s.options)
    if scaled and options.get("context_length"):
        options["context_length"] = max(1, int(options["context_length"]) // OFFLINE_SCALE)
    if s.backend == "lm":
        options["model"] = _swap(options.get("model"), OFFLINE_LM)
        # A random-weights reader never stops early: each token it writes attends the whole
        # memory, and its words are noise, so a smoke run writes a few.
        options["max_new_tokens"] = min(int(options.get("max_new_tokens", OFFLINE_MAX_NEW)), OFFLINE_MAX_NEW)
    else:
        embedder = options.get("embedder")
        if isinstance(embedder, str) and embedder.startswith("openai:"):
            options["embedder"] = OFFLINE_EMBEDDER
        if "model" in options:  # the hybrid reader's re-ranking LM
            options["model"] = _swap(options["model"], OFFLINE_LM)
    ran = replace(s, options=options, agent=_swap_agent(s.agent))
    return replace(ran, name=_offline_name(s, ran))


def _offline_name(real: SystemConfig, ran: SystemConfig) -> str:
    """`real`'s name with the stand-ins `ran` reads with: ``NAME → tiny:qwen3.5 (offline)``."""
    swapped = []
    for key in ("model", "embedder"):
        if ran.options.get(key) != real.options.get(key):
            role = "re-rank " if key == "model" and real.backend == "hybrid" else ""
            swapped.append(f"{role}{ran.options[key]}")
    controller = (ran.agent or {}).get("controller")
    if controller != (real.agent or {}).get("controller"):
        swapped.append(f"controller {controller}")
    return f"{real.name} → {', '.join(swapped)} (offline)" if swapped else real.name


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


def _override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``--set dotted.key=value``: list entries are named by index (``systems.0``) and
    must exist; missing tables are made. The value's kind is checked with the rest of the config."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or "" in key.split("."):
        raise BadInput(f"--set {item!r}: expected dotted.key=value, e.g. systems.0.model=tiny:qwen3.5")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string
    parts = key.split(".")
    if isinstance(parsed, str) and parts[-1] in _PATHLIKE and "${" not in parsed:
        # Typed in the shell, so relative to where it was typed (see the module docstring).
        parsed = str(Path(parsed).expanduser().resolve())
    node: Any = raw
    for depth in range(len(parts) - 1):
        node = _child(node, parts, depth, key)
    if isinstance(node, list):
        node[_index(node, parts, len(parts) - 1, key)] = parsed
    elif isinstance(node, dict):
        node[parts[-1]] = parsed
    else:
        here = ".".join(parts[:-1])
        raise BadInput(f"--set {key}: {here} is the value {node!r}, expected a table or a list")


def _child(node: Any, parts: list[str], depth: int, key: str) -> Any:
    """The entry `parts[depth]` of `node` on the way to ``--set key``: a list's must exist, a
    missing table is made (but not a missing list: ``tasks.0`` needs a tasks list)."""
    part = parts[depth]
    if isinstance(node, list):
        return node[_index(node, parts, depth, key)]
    if not isinstance(node, dict):
        here = ".".join(parts[:depth])
        raise BadInput(f"--set {key}: {here} is the value {node!r}, expected a table or a list")
    if part not in node and parts[depth + 1].isdigit():
        raise BadInput(f"--set {key}: the config has no list {'.'.join(parts[: depth + 1])}")
    return node.setdefault(part, {})


def _index(node: list[Any], parts: list[str], depth: int, key: str) -> int:
    part = parts[depth]
    if not part.isdigit() or int(part) >= len(node):
        raise BadInput(
            f"--set {key}: {'.'.join(parts[:depth])} is a list of {len(node)} entries, so expected "
            f"an index from 0 to {len(node) - 1}, found {part!r}"
        )
    return int(part)


def _remove(raw: dict[str, Any], key: str) -> None:
    node: Any = raw
    parts = key.split(".")
    try:
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[int(parts[-1]) if isinstance(node, list) else parts[-1]]
    except (KeyError, IndexError, ValueError, TypeError):
        raise BadInput(f"--unset {key}: the config has no such key") from None


def _later_entries_first(key: str) -> list[tuple[int, str]]:
    """Sort key for --unset: of two entries of one list, the higher index first."""
    return [(-int(p), "") if p.isdigit() else (0, p) for p in key.split(".")]


def _expand(value: Any, base: Path, key: str = "", *, strict_env: bool = True) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, base, k, strict_env=strict_env) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, base, key, strict_env=strict_env) for v in value]
    if isinstance(value, str):
        path = key in _PATHLIKE

        def env(m: re.Match[str]) -> str:
            found = _env(m.group(1), strict_env)
            if found is None:
                return m.group()
            # A path's root from the environment was typed in the shell: relative to the working
            # directory, not to the config's folder.
            if path and m.start() == 0 and not Path(found).expanduser().is_absolute():
                return str(Path(found).expanduser().resolve())
            return found

        value = _ENV_RE.sub(env, value)
        if path and not Path(value).is_absolute() and not _ENV_RE.search(value):
            value = str((base / value).resolve())
    return value


_ENV_RE = re.compile(r"\$\{(\w+)\}")


def _env(name: str, strict: bool = True) -> str | None:
    if name not in os.environ:
        if not strict:
            return None
        hint = " (the folder holding m3bench/ and locomo/, see the README)" if name == "LINMEM_DATA" else ""
        raise BadInput(f"the config uses ${{{name}}}, which is not set in the environment{hint}")
    return os.environ[name]


def _check(raw: dict[str, Any], path: Path, text: str) -> Config:
    where = str(path)
    _known(raw, TOP_KEYS, where)
    table = raw.get("table")
    if table not in TABLES:
        raise BadInput(f"{where}: table must be one of {', '.join(TABLES)}, found {table!r}")
    _values(raw, _TOP_RULES, where, "")
    tasks_raw = raw.get("tasks") or ([raw["task"]] if "task" in raw else [])
    if not tasks_raw:
        raise BadInput(f"{where}: no [[tasks]] (or [task]) given")
    _tables(tasks_raw, where, "tasks")
    tasks = []
    for i, entry in enumerate(tasks_raw):
        t = dict(entry)
        if "name" not in t:
            raise BadInput(f"{where}: tasks.{i} has no 'name'")
        _values(t, {"name": _STRING, "label": _STRING}, where, f"tasks.{i}.")
        name = t.pop("name")
        tasks.append(TaskConfig(label=str(t.pop("label", name)), name=name, options=t))
    for key, allowed in (("agent", AGENT_KEYS), ("judge", JUDGE_KEYS), ("run", RUN_KEYS)):
        if key in raw:
            if not isinstance(raw[key], dict):
                raise BadInput(f"{where}: {key} must be a table, found {raw[key]!r}")
            _known(raw[key], allowed, f"{where}: [{key}]")
            _values(raw[key], _RULES[key], where, f"{key}.")
    systems_raw = raw.get("systems") or []
    _tables(systems_raw, where, "systems")
    systems = [
        _system(entry, where, i, raw.get("agent"), "agent" in raw) for i, entry in enumerate(systems_raw)
    ]
    if not systems:
        raise BadInput(f"{where}: no [[systems]] given")
    names = [s.name for s in systems]
    if len(set(names)) != len(systems):
        raise BadInput(f"{where}: system names must be distinct")
    compare = raw.get("compare", [])
    pairs = [pair for pair in compare if isinstance(pair, list)] if isinstance(compare, list) else []
    unknown = [n for pair in pairs for n in pair if n not in names]
    if unknown:
        raise BadInput(
            f"{where}: compare names {unknown[0]!r}, which is not a system of this config "
            f"({', '.join(names)}); a system left out with --unset needs its compare entries left out too"
        )
    if not isinstance(compare, list) or any(not isinstance(pair, list) or len(pair) != 2 for pair in compare):
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


def _system(entry: dict[str, Any], where: str, i: int, shared_agent: Any, shared: bool) -> SystemConfig:
    at = f"{where}: systems.{i}"
    _known(entry, SYSTEM_KEYS | RUN_SYSTEM_KEYS, at)
    _values(entry, _RULES["system"], where, f"systems.{i}.")
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
        if "agent" in entry or not shared:  # the shared [agent] is checked once, as [agent]
            _known(agent, AGENT_KEYS, f"{at}.agent")
            _values(agent, _RULES["agent"], where, f"systems.{i}.agent.")
    limit = s.pop("limit", None)
    return SystemConfig(name, backend, s, budget, agent or None, limit)


def _known(section: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise BadInput(f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(sorted(allowed))})")


def _tables(entries: Any, where: str, key: str) -> None:
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadInput(f"{where}: {key} must be a list of tables ([[{key}]]), found {entries!r}")


# What each value must be. Checked when the config is read, so that a wrong value (a slip in a
# --set) fails before any work starts, not in a worker thread halfway through a run.
Rule = tuple[str, Callable[[Any], bool]]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_STRING: Rule = ("a non-empty string", lambda v: isinstance(v, str) and v != "")
_INT: Rule = ("an integer", _is_int)
_POSITIVE: Rule = ("a positive integer", lambda v: _is_int(v) and v >= 1)
_NUMBER: Rule = ("a number", _is_number)
_BOOL: Rule = ("true or false", lambda v: isinstance(v, bool))


def _one_of(*choices: str) -> Rule:
    return (f"one of {', '.join(map(repr, choices))}", lambda v: v in choices)


_TOP_RULES: dict[str, Rule] = {"title": _STRING, "description": ("a string", lambda v: isinstance(v, str))}
_RULES: dict[str, dict[str, Rule]] = {
    "run": {
        "batch": _POSITIVE,
        "concurrency": _POSITIVE,
        "k": (
            "a non-empty list of positive integers, e.g. [1, 5, 10]",
            lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) and x >= 1 for x in v),
        ),
        "seed": _INT,
    },
    "system": {
        "name": _STRING,
        "model": _STRING,
        "embedder": _STRING,
        "top_k": _POSITIVE,
        "threshold": _NUMBER,
        "max_new_tokens": _POSITIVE,
        "context_length": _POSITIVE,
        "overflow": _one_of(*OVERFLOW_MODES),
        "stateless": _BOOL,
        "memory_budget_mb": ("a positive number", lambda v: _is_number(v) and v > 0),
        "lexical_weight": _NUMBER,
        "second_line": _NUMBER,
        "rerank": _one_of(*RERANKERS),
        "rerank_depth": _POSITIVE,
        "limit": _POSITIVE,
    },
    "agent": {
        "controller": _STRING,
        "policy": _one_of(*POLICIES),
        "rounds": _POSITIVE,
        "max_new_tokens": _POSITIVE,
        "temperature": ("a number, 0 or more", lambda v: _is_number(v) and v >= 0),
        "reuse_state": _BOOL,
    },
    "judge": {"model": _STRING, "max_new_tokens": _POSITIVE},
}


def _values(section: dict[str, Any], rules: dict[str, Rule], where: str, prefix: str) -> None:
    for key, (expected, ok) in rules.items():
        if key in section and not ok(section[key]):
            raise BadInput(f"{where}: {prefix}{key} must be {expected}, found {section[key]!r}")
