"""`kernel_bench`: our GDN and KDA kernels against transformers' reference fallbacks and the fp32 matmul
rate of this machine, with exactness checks first (no speed is reported for a kernel that fails them).

Run `python -m linmem.kernels.bench [tokens] [heads] [dim]`: it prints a table, then one JSON line.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import gdn, kda
from .naive import gdn_l2norm, kda_l2norm, naive_gated_delta_rule

TOLERANCE = 1e-4  # max |difference|, relative to max(1, magnitude of the compared tensor)
CHECK_TOKENS = 1000  # the token-by-token oracle is slow: exactness is checked on this many tokens


def matmul_flops(
    kind: str, tokens: int, heads: int, k_dim: int, v_dim: int, *, k_heads: int | None = None
) -> int:
    """Matmul FLOPs our kernel executes (2 per multiply-add), with C = gdn.CHUNK and s = kda.SUB.

    Per token and value head:
        scan and outputs (W S, K'^T U, (Q*Gamma) S)      6 dk dv
        W = T(K...), U0 = T(V beta), M U                 2 C (dk + 2 dv)
        (I + A)^-1, blockwise                            F(C) / C, F(16) = 16^3 / 3, F(2h) = 2 F(h) + 4 h^3
        GDN: Q K^T and K K^T, once per key head          4 C dk Hk / Hv
        KDA: sub-chunk row blocks against columns        2 s dk (C / s + 1)
    For C = 64, s = 16, dk = dv = 128: 182.9k (GDN) and 170.6k (KDA) per token and head. KDA's exact
    fallback for sub-chunks that decay by more than kda.SAFE_SPAN is not counted.
    """
    c = gdn.CHUNK
    per_token = 6 * k_dim * v_dim + 2 * c * (k_dim + 2 * v_dim) + _inverse_flops(c) / c
    if kind == "gdn":
        per_token += 4 * c * k_dim * (k_heads or heads) / heads
    else:
        s = kda.SUB
        per_token += 2 * s * k_dim * (c // s + 1)
    return int(per_token * tokens * heads)


def _inverse_flops(size: int) -> float:
    if size <= 16:
        return size**3 / 3
    return 2 * _inverse_flops(size // 2) + 2 * 2 * (size // 2) ** 3


def matmul_rate(n: int = 2048, repeat: int = 10) -> float:
    """Best fp32 GFLOP/s of torch.mm on n x n matrices: the roofline."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = min(_seconds(lambda: torch.mm(a, b, out=out)) for _ in range(repeat))
    return 2 * n**3 / best / 1e9


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _max_err(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> float:
    """Largest |difference| over outputs and states, each relative to max(1, its magnitude)."""
    return max(
        ((a.float() - b.float()).abs().max() / max(1.0, b.float().abs().max().item())).item()
        for a, b in zip(got, want, strict=True)
    )


def _inputs(
    kind: str, tokens: int, heads: int, dim: int, *, strong: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random inputs; decays g = -softplus(x), or with `strong` scaled by 1 to 16 across heads like
    Kimi-Linear's initial decay rates exp(A_log) (strong decays exercise KDA's exact fallback)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, tokens, heads, dim)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    g_shape = shape if kind == "kda" else shape[:-1]
    g = -F.softplus(torch.randn(g_shape, generator=gen))
    if strong:
        g = g * torch.linspace(1, 16, heads).view((1, 1, heads) + (1,) * (len(g_shape) - 3))
    return {
        "query": q,
        "key": k,
        "value": v,
        "g": g,
        "beta": torch.rand(shape[:-1], generator=gen),
        "initial_state": torch.randn(1, heads, dim, dim, generator=gen) * 0.1,
    }


def _call(
    fn: Callable[..., Any], inputs: dict[str, torch.Tensor], tokens: int | None = None
) -> tuple[Any, ...]:
    sliced = {n: (x if n == "initial_state" or tokens is None else x[:, :tokens]) for n, x in inputs.items()}
    return tuple(fn(**sliced, output_final_state=True, use_qk_l2norm_in_kernel=True))


def _references() -> dict[str, Callable[..., Any]]:
    """transformers' torch fallbacks themselves: `__wrapped__` skips the dispatch to fla and any patch."""
    from transformers.models.kimi_linear import modeling_kimi_linear
    from transformers.models.qwen3_5 import modeling_qwen3_5

    from . import _originals

    found = {}
    for kind, module, name in (
        ("gdn", modeling_qwen3_5, "torch_chunk_gated_delta_rule"),
        ("kda", modeling_kimi_linear, "chunk_kimi_delta_attention"),
    ):
        fn = _originals.get((module.__name__, name), getattr(module, name))
        found[kind] = inspect.unwrap(fn)
    return found


def _kda_reference_bytes(tokens: int, heads: int, dim: int) -> int:
    """Peak memory of the KDA reference: a few [tokens, 64, dim] fp32 tensors per head (its decay mask and
    its products with it)."""
    padded = -(-tokens // 64) * 64
    return 3 * padded * 64 * dim * heads * 4


def _available_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _naive(kind: str) -> Callable[..., Any]:
    norm = kda_l2norm if kind == "kda" else gdn_l2norm
    return lambda **kw: naive_gated_delta_rule(**kw, norm=norm)


def _timed(fn: Callable[..., Any], inputs: dict[str, torch.Tensor], repeat: int) -> tuple[float, float]:
    """(median, best) milliseconds of `repeat` calls after a warm-up."""
    _call(fn, inputs)
    times = [_seconds(lambda: _call(fn, inputs)) for _ in range(repeat)]
    return statistics.median(times) * 1e3, min(times) * 1e3


def _reference_run(
    kind: str, reference: Callable[..., Any], inputs: dict[str, torch.Tensor], repeat: int
) -> tuple[dict[str, Any], tuple[Any, ...] | None]:
    tokens, heads, dim = inputs["key"].shape[1:]
    if kind == "kda" and _kda_reference_bytes(tokens, heads, dim) > 0.8 * _available_bytes():
        needed, available = _kda_reference_bytes(tokens, heads, dim), _available_bytes()
        return {
            "reference_skipped": f"needs ~{needed / 2**30:.1f} GiB, {available / 2**30:.1f} available"
        }, None
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = _call(reference, inputs)
        times.append(time.perf_counter() - start)
    return {"reference_ms": statistics.median(times) * 1e3}, out


def _bench_kernel(
    kind: str,
    kernels: tuple[Callable[..., Any], Callable[..., Any]],
    shape: tuple[int, int, int],
    *,
    repeat: int,
    reference_repeat: int,
    roofline: float,
) -> dict[str, Any]:
    """Exactness, then timings, of (ours, reference) for one kernel on `shape` = (tokens, heads, dim)."""
    ours, reference = kernels
    tokens, heads, dim = shape
    inputs = _inputs(kind, tokens, heads, dim)
    check = min(tokens, CHECK_TOKENS)
    naive = _call(_naive(kind), inputs, check)
    result: dict[str, Any] = {
        "check_tokens": check,
        "err_ours_vs_naive": _max_err(_call(ours, inputs, check), naive),
        "err_reference_vs_naive": _max_err(_call(reference, inputs, check), naive),
        "gflop": matmul_flops(kind, tokens, heads, dim, dim) / 1e9,
    }
    result["ours_ms"], result["ours_best_ms"] = _timed(ours, inputs, repeat)
    timing, ref_out = _reference_run(kind, reference, inputs, reference_repeat)
    result |= timing
    if ref_out is not None:
        result["err_ours_vs_reference"] = _max_err(_call(ours, inputs), ref_out)
    if kind == "kda":  # the exact fallback for sub-chunks that decay strongly
        strong = _inputs(kind, tokens, heads, dim, strong=True)
        err = _max_err(_call(ours, strong, check), _call(_naive(kind), strong, check))
        result["err_strong_decay_vs_naive"] = err
        result["ours_strong_decay_ms"] = _timed(ours, strong, repeat)[0] if err <= TOLERANCE else None
    result["exact"] = (
        result["err_ours_vs_naive"] <= TOLERANCE and result.get("err_ours_vs_reference", 0) <= TOLERANCE
    )
    if not result["exact"]:
        speeds = ("ours_ms", "ours_best_ms", "ours_strong_decay_ms")
        return result | {key: None for key in speeds if key in result}
    result["gflops"] = result["gflop"] / (result["ours_ms"] / 1e3)
    result["roofline_fraction"] = result["gflops"] / roofline
    if "reference_ms" in result:
        result["speedup"] = result["reference_ms"] / result["ours_ms"]
    return result


def kernel_bench(
    tokens: int = 8192, heads: int = 16, dim: int = 128, repeat: int = 5, reference_repeat: int = 1
) -> dict[str, Any]:
    """Time our GDN and KDA kernels and transformers' references on the same random inputs (batch 1,
    `heads` heads of `dim`, l2norm on, an initial state) after checking exactness against the token-by-token
    recurrence on the first CHECK_TOKENS tokens and against the reference at full size. Times are medians;
    a kernel that fails a check gets no speed (None)."""
    refs = _references()
    roofline = matmul_rate()
    result: dict[str, Any] = {
        "tokens": tokens,
        "heads": heads,
        "dim": dim,
        "threads": torch.get_num_threads(),
        "matmul_gflops": roofline,
    }
    ours = {"gdn": gdn.chunk_gated_delta_rule, "kda": kda.chunk_kimi_delta_attention}
    for kind, fn in ours.items():
        result[kind] = _bench_kernel(
            kind,
            (fn, refs[kind]),
            (tokens, heads, dim),
            repeat=repeat,
            reference_repeat=reference_repeat,
            roofline=roofline,
        )
    return result


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> None:
    args = [int(a) for a in (sys.argv[1:] if argv is None else argv)]
    result = kernel_bench(*args)
    print(
        f"{result['tokens']} tokens x {result['heads']} heads x {result['dim']}, "
        f"{result['threads']} threads, fp32 matmul {result['matmul_gflops']:.0f} GFLOP/s"
    )
    print(
        f"{'kernel':6} {'ours ms':>9} {'ref ms':>10} {'speedup':>8} {'GFLOP/s':>8} {'roofline':>8} "
        f"{'err naive':>10} {'err ref':>10}"
    )
    for kind in ("gdn", "kda"):
        r = result[kind]
        print(
            f"{kind:6} {_fmt(r['ours_ms'], '9.1f')} {_fmt(r.get('reference_ms'), '10.1f')} "
            f"{_fmt(r.get('speedup'), '7.1f')}x {_fmt(r.get('gflops'), '8.1f')} "
            f"{_fmt(r.get('roofline_fraction'), '8.0%')} {r['err_ours_vs_naive']:10.1e} "
            f"{_fmt(r.get('err_ours_vs_reference'), '10.1e')}"
        )
        if "reference_skipped" in r:
            print(f"       reference skipped: {r['reference_skipped']}")
    kda = result["kda"]
    print(
        f"kda with strong decays (Kimi-Linear's initial rates, exact fallback): "
        f"{_fmt(kda.get('ours_strong_decay_ms'), '.1f')} ms, err {kda['err_strong_decay_vs_naive']:.1e}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
