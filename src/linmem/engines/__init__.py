"""LM engines, chosen by a short spec string and loaded once per process.

Specs:

- ``hf:Qwen/Qwen3.5-0.8B`` or ``hf:/path/to/dir``: a local transformers causal LM (state snapshots);
- ``openai:http://127.0.0.1:8000/v1#model-name``: any OpenAI-compatible chat endpoint
  (vLLM, SGLang, OpenAI), with the memory as a byte-identical prompt prefix;
- ``tiny:kimi-linear``, ``tiny:qwen3.5``, ``tiny:qwen3``: tiny random-weights models of real
  architectures, for tests and smoke runs.
"""

from __future__ import annotations

from typing import Any

from .._registry import Registry
from ..errors import UnknownSpec
from .base import Engine, Generation, Prompt

DEFAULT_MODEL = "hf:Qwen/Qwen3.5-0.8B"
SCHEMES = ("hf", "openai", "tiny")

# Loaded once per spec; a slow load (a download, an endpoint slow to list its models) never holds
# up another spec's lookup.
_loaded: Registry[str, Any] = Registry()


def load_engine(spec: str | None = None) -> Any:
    """The engine for `spec` (default: DEFAULT_MODEL), loaded on first use and shared afterwards."""
    spec = spec or DEFAULT_MODEL
    scheme, sep, target = spec.partition(":")
    if not sep or scheme not in SCHEMES or not target:
        raise UnknownSpec(
            f"unknown model spec {spec!r}: expected hf:REPO_OR_PATH, openai:URL#MODEL or "
            "tiny:NAME (e.g. hf:Qwen/Qwen3.5-0.8B, openai:http://127.0.0.1:8000/v1#my-model, tiny:qwen3.5)"
        )
    return _loaded.get(spec, lambda: _load(scheme, target))


def _load(scheme: str, target: str) -> Any:
    if scheme == "tiny":
        from .hf import load_tiny

        return load_tiny(target)
    if scheme == "hf":
        from .hf import load_pretrained

        return load_pretrained(target)
    from .openai import OpenAIEngine

    return OpenAIEngine.from_spec(target)


__all__ = ["DEFAULT_MODEL", "Engine", "Generation", "Prompt", "load_engine"]
