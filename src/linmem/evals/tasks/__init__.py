"""Evaluation tasks by name: ``load_task("locomo", path="locomo10.json")``.

Tasks:

- ``m3bench``: M3-Bench robot/web QA over clip captions or memory graphs (`M3BenchTask`);
- ``locomo``: LoCoMo long-conversation QA or session retrieval (`LoCoMoTask`);
- ``clip_retrieval``: find the one clip a query comes from among N (`ClipRetrievalTask`);
- ``niah``: a QA's evidence hidden in a haystack of other memories (`NIAHTask`);
- ``summarization``: factual QA over only the relevant sessions (`SummarizationTask`).

Task modules are imported on first use. Options are checked against the task's constructor, so
a misspelt option is a `BadInput` naming it, never a silently ignored keyword.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

from ...errors import BadInput
from .base import KINDS, Example, Task

_REGISTRY = {
    "m3bench": ("m3bench", "M3BenchTask"),
    "locomo": ("locomo", "LoCoMoTask"),
    "clip_retrieval": ("synthetic", "ClipRetrievalTask"),
    "niah": ("synthetic", "NIAHTask"),
    "summarization": ("synthetic", "SummarizationTask"),
}
TASKS = tuple(_REGISTRY)
# Tasks that hold real memories; the synthetic tasks are built on one of them (option `base`).
BASE_TASKS = ("locomo", "m3bench")


def load_task(name: str, **options: Any) -> Task:
    """The task `name` built with `options`; unknown names and options raise `BadInput`."""
    _check_options(name, options)
    return task_class(name)(**options)


def task_class(name: str) -> type[Task]:
    if name not in _REGISTRY:
        raise BadInput(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    module, cls = _REGISTRY[name]
    found: type[Task] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)
    return found


def task_options(name: str) -> tuple[str, ...]:
    """The options task `name` itself accepts (synthetic tasks also pass their base's on)."""
    return tuple(_parameters(task_class(name)))


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p for n, p in inspect.signature(cls).parameters.items() if p.kind in named}


def _check_options(name: str, options: dict[str, Any]) -> None:
    cls = task_class(name)
    own = _parameters(cls)
    passed_on: dict[str, inspect.Parameter] = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(cls).parameters.values()):
        base = options.get("base", own["base"].default)
        if base is inspect.Parameter.empty:
            raise BadInput(f"task {name!r} needs option 'base' (one of {', '.join(BASE_TASKS)})")
        if base not in BASE_TASKS:
            raise BadInput(f"task {name!r}: unknown base {base!r}: expected one of {', '.join(BASE_TASKS)}")
        passed_on = {n: p for n, p in _parameters(task_class(base)).items() if n not in own}
    unknown = [k for k in options if k not in own and k not in passed_on]
    if unknown:
        listed = ", ".join(own) + (f"; and for its base task: {', '.join(passed_on)}" if passed_on else "")
        raise BadInput(f"unknown option {unknown[0]!r} for task {name!r}: accepted options are {listed}")
    required = [n for n, p in {**own, **passed_on}.items() if p.default is inspect.Parameter.empty]
    missing = [n for n in required if n not in options]
    if missing:
        raise BadInput(f"task {name!r} needs option {missing[0]!r}")


def read_json(path: str | Path) -> Any:
    """A JSON file's content; unreadable or invalid files raise `BadInput` naming the file."""
    if not isinstance(path, str | Path):
        raise BadInput(f"expected a file path, found {path!r}")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


__all__ = [
    "BASE_TASKS",
    "KINDS",
    "TASKS",
    "Example",
    "Task",
    "load_task",
    "read_json",
    "task_class",
    "task_options",
]
