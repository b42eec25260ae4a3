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
)
SYSTEM_KEYS = {
    "name", "backend", "model", "embedder", "top_k", "threshold", "max_new_tokens",
    "context_length", "overflow", "stateless", "memory_budget_mb", "lexical_weight", "second_line",
    "rerank", "rerank_depth",
}  # fmt: skip
BACKENDS = ("lm", "embedding", "hybrid")
AGENT_KEYS = {"controller", "policy", "rounds", "max_new_tokens", "temperature"}
JUDGE_KEYS = {"model"}
RUN_KEYS = {"batch", "concurrency", "k", "seed"}
TOP_KEYS = {"title", "table", "description", "tasks", "task", "systems", "agent", "judge", "run"}
_PATHLIKE = ("annotations", "memory_dir", "path")


@dataclass(frozen=True)
class TaskConfig:
    label: str
    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class SystemConfig:
    name: str
    backend: str
    options: dict[str, Any]
    memory_budget_mb: float | None = None


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
    # How this run departs from the file's text (--set overrides, --offline): shown in reports.
    changes: tuple[str, ...] = ()

    @property
    def k(self) -> tuple[int, ...]:
        return tuple(self.run.get("k", (1, 5, 10)))


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read and check a config; `overrides` are ``dotted.key=TOML value`` strings applied first."""
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
    raw = _expand(raw, path.parent)
    return replace(_check(raw, path, text), changes=tuple(f"--set {o}" for o in overrides or []))


OFFLINE_LM = "tiny:qwen3.5"
OFFLINE_CONTROLLER = "tiny:qwen3"
OFFLINE_EMBEDDER = "hash"


def offline(config: Config) -> Config:
    """The same experiment with every remote model swapped for a local stand-in: LM readers
    become tiny:qwen3.5 (and so does the hybrid reader's re-ranking LM, even a local file, which
    a machine without it could not load), the controller and the judge tiny:qwen3, remote
    embedders the hash embedder. The numbers are noise; the run proves the pipeline end to end
    without servers."""

    def swap(spec: Any, local: str) -> Any:
        return local if isinstance(spec, str) and spec.startswith("openai:") else spec

    systems = []
    for s in config.systems:
        options = dict(s.options)
        if s.backend == "lm":
            options["model"] = swap(options.get("model") or "openai:", OFFLINE_LM)
            options.setdefault("max_new_tokens", 32)
        else:
            if "embedder" in options:
                options["embedder"] = swap(options["embedder"], OFFLINE_EMBEDDER)
            if "model" in options:  # the hybrid reader's re-ranking LM, a remote or local file
                options["model"] = OFFLINE_LM
        systems.append(SystemConfig(s.name, s.backend, options, s.memory_budget_mb))
    agent = dict(config.agent) if config.agent else None
    if agent:
        agent["controller"] = swap(agent.get("controller"), OFFLINE_CONTROLLER)
        agent.setdefault("max_new_tokens", 48)
    judge = {"model": swap(config.judge["model"], OFFLINE_CONTROLLER)} if config.judge else None
    note = (
        f"--offline: remote LM readers replaced by {OFFLINE_LM}, the controller and judge by "
        f"{OFFLINE_CONTROLLER}, remote embedders by {OFFLINE_EMBEDDER} (numbers are noise)"
    )
    return replace(config, systems=tuple(systems), agent=agent, judge=judge, changes=(*config.changes, note))


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
    systems = []
    for i, entry in enumerate(raw.get("systems") or []):
        _known(entry, SYSTEM_KEYS, f"{where}: systems[{i}]")
        s = dict(entry)
        backend = s.pop("backend", "lm")
        if backend not in BACKENDS:
            raise BadInput(
                f"{where}: systems[{i}].backend must be one of {', '.join(BACKENDS)}, found {backend!r}"
            )
        name = str(s.pop("name", s.get("model") or s.get("embedder") or backend))
        budget = s.pop("memory_budget_mb", None)
        systems.append(SystemConfig(name=name, backend=backend, options=s, memory_budget_mb=budget))
    if not systems:
        raise BadInput(f"{where}: no [[systems]] given")
    if len({s.name for s in systems}) != len(systems):
        raise BadInput(f"{where}: system names must be distinct")
    for key, allowed in (("agent", AGENT_KEYS), ("judge", JUDGE_KEYS), ("run", RUN_KEYS)):
        if key in raw:
            _known(raw[key], allowed, f"{where}: [{key}]")
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
    )


def _known(section: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise BadInput(f"{where}: unknown key {unknown[0]!r} (expected one of {', '.join(sorted(allowed))})")
