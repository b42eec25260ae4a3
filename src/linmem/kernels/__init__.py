"""Fast, exact CPU kernels for the chunked gated delta rule, and `install()`, which puts them in place of
transformers' pure-PyTorch fallbacks.

What is patched: in every `transformers.models.*.modeling_*` module of the installed transformers that
defines one of them (found by reading the sources, so new model families are covered),

* `torch_chunk_gated_delta_rule` (Gated DeltaNet: Qwen3-Next, Qwen3.5, Qwen3.5-MoE, OLMo-hybrid, ...)
  becomes `linmem.kernels.gdn.chunk_gated_delta_rule`;
* `chunk_kimi_delta_attention` (KDA: Kimi-Linear, and the models that copy its layer)
  becomes `linmem.kernels.kda.chunk_kimi_delta_attention`.

Why this works: the layers' forward passes look these names up in their module's globals at call time
(`core_attn_out, ... = torch_chunk_gated_delta_rule(...)`), so rebinding the module attribute swaps the
kernel for every model, loaded before or after. Only the multi-token (prefill / extend) path is replaced;
single-token decoding keeps transformers' recurrent step, and calls that autograd records (training) still
go to the reference. Nothing is patched when `fla` (flash-linear-
attention) is importable, because transformers then routes these names to fla's GPU kernels, nor when
`LINMEM_KERNELS=reference` (for A/B runs).

Why it is exact: both kernels compute the same function as the references (same signature, layouts,
L2 normalisation formula, query scaling, fp32 arithmetic and state) through an algebraically identical
factorisation of each chunk (see `gdn.py` and `kda.py`). Only rounding differs, plus two changes below
anything fp32 can show: exponentials that would land below fp32's normal range (< 1.2e-38) are raised to
about 1.6e-38, and KDA's per-token log decays are floored at -87. The tests check both kernels against the
token-by-token recurrence (`naive.py`), which they match more closely than the references do, and against
the references, on fresh random inputs of odd lengths; `install()` itself runs each function it replaces
once on a small probe and leaves it alone if the results differ.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import pathlib
import types
from collections.abc import Callable
from typing import Any

import torch

from .gdn import chunk_gated_delta_rule
from .kda import chunk_kimi_delta_attention
from .naive import naive_gated_delta_rule

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_kimi_delta_attention",
    "install",
    "installed",
    "naive_gated_delta_rule",
    "uninstall",
]

ENV = "LINMEM_KERNELS"
REPLACEMENTS: dict[str, Callable[..., Any]] = {
    "torch_chunk_gated_delta_rule": chunk_gated_delta_rule,
    "chunk_kimi_delta_attention": chunk_kimi_delta_attention,
}
_originals: dict[tuple[str, str], Callable[..., Any]] = {}


def _fla_importable() -> bool:
    # The same test transformers makes when it picks fla's kernels over its torch fallbacks.
    try:
        importlib.import_module("fla")
    except Exception:
        return False
    return True


def _candidate_modules() -> list[types.ModuleType]:
    """The installed transformers' modeling modules that define a function we replace."""
    import transformers

    root = pathlib.Path(transformers.__file__).parent / "models"
    names = [
        f"transformers.models.{path.parent.name}.{path.stem}"
        for path in sorted(root.glob("*/modeling_*.py"))
        if any(f"def {fn}(" in path.read_text(encoding="utf-8") for fn in REPLACEMENTS)
    ]
    return [importlib.import_module(name) for name in names]


def _probe(name: str, reference: Callable[..., Any]) -> bool:
    """Whether our kernel reproduces `reference` (the unwrapped torch fallback) on a small random input."""
    gen = torch.Generator().manual_seed(0)
    length, heads, dim = 70, 2, 8
    shape = (1, length, heads, dim)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    beta = torch.rand(1, length, heads, generator=gen)
    g_shape = shape if name == "chunk_kimi_delta_attention" else shape[:-1]
    g = -torch.nn.functional.softplus(torch.randn(g_shape, generator=gen))
    state = torch.randn(1, heads, dim, dim, generator=gen)
    args = (q, k, v, g, beta)
    kw = {"initial_state": state, "output_final_state": True, "use_qk_l2norm_in_kernel": True}
    try:
        want, ours = reference(*args, **kw), REPLACEMENTS[name](*args, **kw)
    except Exception:
        return False
    return all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(want, ours, strict=True))


def _source(fn: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return repr(fn)


def _dispatch(ours: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """Our kernel, except where autograd is recording (training): the references are differentiable, and
    ours, with its in-place intermediates, are not meant to be."""

    @functools.wraps(ours)
    def kernel(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and any(
            isinstance(x, torch.Tensor) and x.requires_grad for x in (*args, *kwargs.values())
        ):
            return original(*args, **kwargs)
        return ours(*args, **kwargs)

    return kernel


def _install_one(module: types.ModuleType, name: str, verified: dict[str, bool]) -> bool:
    """Patch module.name unless it is patched already or fails the probe; whether it is patched now."""
    current = getattr(module, name)
    if (module.__name__, name) in _originals:
        return True
    reference = inspect.unwrap(current)
    source = _source(reference)
    if source not in verified:
        verified[source] = _probe(name, reference)
    if verified[source]:
        _originals[(module.__name__, name)] = current
        setattr(module, name, _dispatch(REPLACEMENTS[name], current))
    return verified[source]


def install() -> list[str]:
    """Replace transformers' torch fallbacks with these kernels; returns the patched 'module.function'
    names (empty when fla is importable or LINMEM_KERNELS=reference). Idempotent."""
    if os.environ.get(ENV, "").strip().lower() == "reference" or _fla_importable():
        return []
    verified: dict[str, bool] = {}
    return [
        f"{module.__name__}.{name}"
        for module in _candidate_modules()
        for name in REPLACEMENTS
        if hasattr(module, name) and _install_one(module, name, verified)
    ]


def uninstall() -> list[str]:
    """Put back what `install()` replaced; returns the restored names."""
    restored = []
    for (module_name, name), original in list(_originals.items()):
        setattr(importlib.import_module(module_name), name, original)
        restored.append(f"{module_name}.{name}")
        del _originals[(module_name, name)]
    return restored


def installed() -> list[str]:
    """The 'module.function' names currently patched."""
    return [f"{module}.{name}" for module, name in _originals]
