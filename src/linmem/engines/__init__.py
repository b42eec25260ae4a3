"""LM engines, chosen by a short spec string and loaded once per process.

Specs:

- ``hf:Qwen/Qwen3.5-0.8B`` or ``hf:/path/to/dir``: a local transformers causal LM (state snapshots);
- ``openai:http://127.0.0.1:8000/v1#model-name``: any OpenAI-compatible chat endpoint
  (vLLM, SGLang, OpenAI), with the memory as a byte-identical prompt prefix;
- ``gguf:/path/to/model.gguf`` or ``gguf:NAME``: a GGUF model run in process by llama.cpp;
- ``tiny:kimi-linear``, ``tiny:qwen3.5``, ``tiny:qwen3``: tiny random-weights models of real
  architectures, for tests and smoke runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import _spec
from .._registry import Registry
from ..errors import ModelUnavailable
from .base import BatchedEngine, Engine, Generation, Prompt, StatefulEngine

DEFAULT_MODEL = "hf:Qwen/Qwen3.5-0.8B"
FORMS = _spec.Forms(
    "model spec",
    {
        "hf": "hf:REPO_OR_PATH",
        "openai": "openai:URL#MODEL",
        "gguf": "gguf:PATH_OR_NAME",
        "tiny": "tiny:NAME",
    },
    examples=("hf:Qwen/Qwen3.5-0.8B", "openai:http://127.0.0.1:8000/v1#my-model", "tiny:qwen3.5"),
)
SCHEMES = tuple(FORMS.kinds)

# Loaded once per spec; a slow load (a download, an endpoint slow to list its models) never holds
# up another spec's lookup.
_loaded: Registry[str, Any] = Registry()


def load_engine(spec: str | None = None) -> Any:
    """The engine for `spec` (default: DEFAULT_MODEL), loaded on first use and shared afterwards."""
    parsed = FORMS.parse(spec or DEFAULT_MODEL)
    return _loaded.get(str(parsed), lambda: _load(parsed))


def _load(spec: _spec.Spec) -> Any:
    # Each backend is imported only when named: torch, llama.cpp and httpx are heavy or optional.
    # A spec that cannot load is refused before that import, which takes seconds.
    if spec.scheme == "tiny":
        from . import tiny

        tiny.check_name(spec.target)
        from .hf import load_tiny

        return load_tiny(spec.target)
    if spec.scheme == "hf":
        check_local_path(spec.target, "--model hf:/path/to/dir")
        from .hf import load_pretrained

        return load_pretrained(spec.target)
    if spec.scheme == "gguf":
        from .llama import load_gguf

        return load_gguf(spec.target)
    from .openai import OpenAIEngine

    return OpenAIEngine.from_spec(spec.target)


def check_local_path(target: str, form: str) -> None:
    """Refuse a target written as a path (absolute, ~, ./ or ../) that does not exist, which
    would otherwise be taken for a hub repo id and sent there."""
    if target.startswith(("/", "~", "./", "../", ".\\", "..\\")) or (len(target) > 1 and target[1] == ":"):
        path = Path(target).expanduser()
        if not path.exists():
            raise ModelUnavailable(
                f"model folder {path} does not exist (expected {form}, a transformers model folder)"
            )


__all__ = [
    "DEFAULT_MODEL",
    "BatchedEngine",
    "Engine",
    "Generation",
    "Prompt",
    "StatefulEngine",
    "load_engine",
]
