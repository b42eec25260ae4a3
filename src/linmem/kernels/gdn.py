"""Chunked gated delta rule in matmul form, exact in fp32, for CPU: the scan shared by both kernels, and
Gated DeltaNet (scalar per-token decay).

`chunk_gated_delta_rule` is a drop-in for transformers' `torch_chunk_gated_delta_rule` (Qwen3-Next, Qwen3.5,
OLMo-hybrid, ...): same signature, layouts, normalisation and scaling. `run` is the part shared with KDA
(`kda.py`), which only supplies its own intra-chunk matrices.

Per chunk of C tokens, with G the in-chunk cumulative log decay (a scalar per token for GDN, a k_dim
vector for KDA) and Gamma = exp(G) (always <= 1):

    A_ij = beta_i sum_c k_ic k_jc exp(G_ic - G_jc)   (j < i)      T = (I + A)^-1
    M_ij =        sum_c q_ic k_jc exp(G_ic - G_jc)   (j <= i)
    W = T diag(beta) (K * Gamma),   U0 = T diag(beta) V,   K' = K * exp(G_C - G)

and the sequential scan over chunks, from the state S at the chunk's start, is

    U = U0 - W S,   O = (Q * Gamma) S + M U,   S <- exp(G_C) * S + K'^T U.

Per segment (SEGMENT chunks at a time, so intermediates stay in cache and memory stays bounded at any
length), everything except `U` and `S` is computed with a few large batched matmuls over all chunks and
heads; T comes blockwise from one batched unit-triangular solve on 16 x 16 blocks; the scan keeps each
chunk's starting state, so the outputs of a whole segment are again one batched matmul. Only `W S` and
`K'^T U` run chunk by chunk. For GDN the decay ratio exp(G_i - G_j) is one C x C matrix per head, from
fp64 cumulative sums (so long sums of strong decays keep their precision), and the query and key products
are computed once per key head and shared by the value heads of its group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

CHUNK = 64
SEGMENT = 8  # chunks per segment (4 and 16 measured slower or no faster for KDA on a 2-core CPU)
EXP_MIN = -87.0  # exp(EXP_MIN) ~ 1.6e-38, about fp32's smallest normal number


@dataclass(frozen=True)
class Parts:
    """What a kernel's intra-chunk step hands the shared scan, per chunk and value head.

    m, a: [n, B, Hv, C, C]: M (lower triangle with the diagonal, zero above) and A including beta (only its
    strict lower triangle is read). q_read = Q * Gamma and k_write = K * exp(G_C - G): [n, B, Hv, C, dk].
    chunk_decay = exp(G_C): [n, B, Hv, 1 or dk]. Then either k_gamma = K * Gamma [n, B, Hv, C, dk]
    or, for a scalar decay, gamma = Gamma [n, B, Hv, C], which is folded into T instead.
    """

    m: torch.Tensor
    a: torch.Tensor
    q_read: torch.Tensor
    k_write: torch.Tensor
    chunk_decay: torch.Tensor
    k_gamma: torch.Tensor | None = None
    gamma: torch.Tensor | None = None


# (q, k, g, beta) -> Parts, with q, k: [n, B, Hk, C, dk] (normalised, scaled), g: [n, B, Hv, C] or
# [n, B, Hv, C, dk] (per-token log decay), beta: [n, B, Hv, C].
Intra = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Parts]
# The factor [..., 1] that L2-normalises fp32 vectors along the last dim.
Norm = Callable[[torch.Tensor], torch.Tensor]


def gdn_norm(x: torch.Tensor) -> torch.Tensor:
    """GDN's l2norm is x * rsqrt(|x|^2 + 1e-6)."""
    return torch.linalg.vecdot(x, x).add_(1e-6).rsqrt_().unsqueeze(-1)


def exp_ftz(x: torch.Tensor) -> torch.Tensor:
    """exp, with results below fp32's normal range raised to exp(EXP_MIN) (an absolute change under 2e-38 to
    a factor <= 1): CPU exp leaves its fast vector path for any lane that would be subnormal, and runs ~20x
    slower."""
    return x.clamp(min=EXP_MIN).exp_()


def _to_chunks(
    x: torch.Tensor, n: int, *, norm: Norm | None = None, scale: float = 1.0, floor: float | None = None
) -> torch.Tensor:
    """[B, L, H, *rest] (any dtype, L <= n*CHUNK) -> fp32 [n, B, H, CHUNK, *rest], zero-padded, and either
    L2-normalised along the last dim and scaled, or scaled, or raised to at least `floor`, in the same pass
    over the data."""
    pad = n * CHUNK - x.shape[1]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    src = x.unflatten(1, (n, CHUNK)).transpose(2, 3).movedim(1, 0)
    out = torch.empty(src.shape, dtype=torch.float32, device=x.device)
    if x.dtype != torch.float32:  # convert first: elementwise ops across dtypes are slow
        src = out.copy_(src)
    if norm is not None:
        return torch.mul(src, norm(src).mul_(scale), out=out)
    if floor is not None:
        return torch.clamp(src, min=floor, out=out)
    if scale != 1.0:
        return torch.mul(src, scale, out=out)
    return out if src is out else out.copy_(src)


def _from_chunks(o: torch.Tensor, dst: torch.Tensor) -> None:
    """Write [n, B, H, CHUNK, d] into dst [B, L, H, d] (L <= n*CHUNK), dropping the padding."""
    src = o.permute(1, 0, 3, 2, 4)
    full, rest = divmod(dst.shape[1], CHUNK)
    if full:
        dst[:, : full * CHUNK].unflatten(1, (full, CHUNK)).copy_(src[:, :full])
    if rest:
        dst[:, full * CHUNK :].copy_(src[:, full, :rest])


def pairwise_decay(cum: torch.Tensor) -> torch.Tensor:
    """exp(G_i - G_j) for j <= i, 0 above the diagonal, in fp32: [..., C] -> [..., C, C]; never overflows."""
    size = cum.shape[-1]
    upper = torch.ones(size, size, dtype=torch.bool, device=cum.device).triu_(1)
    diff = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).clamp_(max=0.0).float()
    return exp_ftz(diff).masked_fill_(upper, 0.0)


def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """(I + strictly_lower(a))^-1 for a batch [..., C, C]; a's diagonal and upper triangle are not read.

    Blockwise: [[L11, 0], [L21, L22]]^-1 = [[X11, 0], [-X22 L21 X11, X22]], recursing on both halves at
    once down to 16 x 16 blocks, which one batched unit-triangular solve inverts (much faster than one
    solve at 64 x 64 on CPU)."""
    size = a.shape[-1]
    if size <= 16:
        eye = torch.eye(size, device=a.device).expand_as(a).contiguous()
        # (I + A^T)^-1 comes back column-major, so its transpose is T, row-major, without a copy.
        return torch.linalg.solve_triangular(a.mT, eye, upper=True, unitriangular=True).mT
    h = size // 2
    x11, x22 = unit_lower_inverse(torch.stack((a[..., :h, :h], a[..., h:, h:])))
    t = torch.empty_like(a)
    t[..., :h, :h] = x11
    t[..., :h, h:] = 0
    t[..., h:, h:] = x22
    t[..., h:, :h] = x22 @ a[..., h:, :h] @ x11
    t[..., h:, :h].neg_()
    return t


def _gdn_intra(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> Parts:
    n, batch, num_k_heads, size, k_dim = q.shape
    num_v_heads = g.shape[2]
    # value heads grouped under their key head
    per_key = (n, batch, num_k_heads, num_v_heads // num_k_heads, size, -1)
    # fp64 cumulative sums, so that differences of long sums of strong decays keep their precision.
    cum = g.double().cumsum(-1)
    decay = pairwise_decay(cum).view(per_key[:-1] + (size,))
    # q.k and k.k once per key head, shared by the value heads of its group.
    m = decay * (q @ k.transpose(-1, -2)).unsqueeze(3)
    a = decay.mul_((k @ k.transpose(-1, -2)).unsqueeze(3)).mul_(beta.view(per_key[:-1] + (1,)))
    gamma = exp_ftz(cum).float()
    ratio = exp_ftz(cum[..., -1:] - cum).float()
    heads = (n, batch, num_v_heads, size, k_dim)
    return Parts(
        m=m.view(heads[:-1] + (size,)),
        a=a.view(heads[:-1] + (size,)),
        q_read=(q.unsqueeze(3) * gamma.view(per_key)).view(heads),
        k_write=(k.unsqueeze(3) * ratio.view(per_key)).view(heads),
        chunk_decay=gamma[..., -1:],
        gamma=gamma,
    )


def _scan(
    w: torch.Tensor, u: torch.Tensor, k_write: torch.Tensor, chunk_decay: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """The sequential part: for each chunk, U = U0 - W S (in place in u) and S <- exp(G_C) S + K'^T U.
    w, k_write: [n, BH, C, dk]; u: [n, BH, C, dv]; chunk_decay: [n, BH, 1 or dk, 1]; state [BH, dk, dv].
    Returns the states at the start of each chunk and after the last: [n + 1, BH, dk, dv]."""
    n = w.shape[0]
    starts = torch.empty((n + 1,) + state.shape, device=state.device)
    starts[0] = state
    for i in range(n):
        u[i].baddbmm_(w[i], starts[i], alpha=-1)
        torch.mul(starts[i], chunk_decay[i], out=starts[i + 1])
        starts[i + 1].baddbmm_(k_write[i].transpose(1, 2), u[i])
    return starts


def _segment(
    intra: Intra,
    inputs: tuple[torch.Tensor, ...],
    state: torch.Tensor,
    norm: Norm | None,
    g_floor: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment: inputs (q, k, v, g, beta) as given by the caller ([B, L, H, ...]), state [B*Hv, dk, dv]
    fp32. Returns (output [n, B, Hv, C, dv] fp32, state after the segment)."""
    n = -(-inputs[1].shape[1] // CHUNK)
    k_dim = inputs[1].shape[-1]
    q = _to_chunks(inputs[0], n, norm=norm, scale=k_dim**-0.5)
    k = _to_chunks(inputs[1], n, norm=norm)
    v, g, beta = _to_chunks(inputs[2], n), _to_chunks(inputs[3], n, floor=g_floor), _to_chunks(inputs[4], n)
    _, batch, num_k_heads, size, _ = k.shape
    num_v_heads, v_dim = v.shape[2], v.shape[-1]
    group, bh = num_v_heads // num_k_heads, batch * num_v_heads
    p = intra(q, k, g, beta)
    t = unit_lower_inverse(p.a)
    if p.gamma is not None:  # a scalar decay folds into T's columns, and k is read once per key head
        t_g = t * (beta * p.gamma).unsqueeze(-2)
        w = t_g.view(n, batch, num_k_heads, group * size, size) @ k
    t_b = t.mul_(beta.unsqueeze(-2))
    if p.k_gamma is not None:
        w = t_b @ p.k_gamma
    u = t_b.view(n, bh, size, size) @ v.view(n, bh, size, v_dim)
    chunk_decay = p.chunk_decay.reshape(n, bh, -1, 1)
    starts = _scan(w.view(n, bh, size, k_dim), u, p.k_write.view(n, bh, size, k_dim), chunk_decay, state)
    out = p.m.view(n * bh, size, size) @ u.view(n * bh, size, v_dim)
    out.baddbmm_(p.q_read.view(n * bh, size, k_dim), starts[:n].view(n * bh, k_dim, v_dim))
    return out.view(n, batch, num_v_heads, size, v_dim), starts[n].clone()


def run(
    intra: Intra,
    inputs: tuple[torch.Tensor, ...],
    *,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    norm: Norm | None,
    kwargs: dict[str, Any],
    g_floor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked delta rule over segments, given the kernel's intra-chunk matrices and l2norm, on inputs
    (query, key, value, g, beta); per-token log decays below g_floor are raised to it."""
    if kwargs.get("cu_seqlens") is not None:
        raise ValueError("these kernels can't keep packed sequences (cu_seqlens) apart")
    query, key, value = inputs[:3]
    batch, length, _, k_dim = key.shape
    num_v_heads, v_dim = value.shape[-2:]
    if initial_state is None:
        state = torch.zeros(batch * num_v_heads, k_dim, v_dim, device=value.device)
    else:
        state = initial_state.reshape(batch * num_v_heads, k_dim, v_dim)
    out = torch.empty(batch, length, num_v_heads, v_dim, dtype=query.dtype, device=value.device)
    step = SEGMENT * CHUNK
    for t0 in range(0, length, step):
        seg = slice(t0, t0 + step)
        o, state = _segment(intra, tuple(x[:, seg] for x in inputs), state, norm, g_floor)
        _from_chunks(o, out[:, seg])
    final = state.float().view(batch, num_v_heads, k_dim, v_dim) if output_final_state else None
    return out, final


def chunk_gated_delta_rule(  # noqa: PLR0917 - the positional signature of the function it replaces
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same arguments and results as transformers' `torch_chunk_gated_delta_rule`: q, k [B, T, Hk, dk];
    v [B, T, Hv, dv] with Hv a multiple of Hk (value head h reads key head h // (Hv // Hk)); g, beta
    [B, T, Hv]; state [B, Hv, dk, dv] fp32; output in the input dtype. `chunk_size` is accepted and ignored:
    the result does not depend on it."""
    return run(
        _gdn_intra,
        (query, key, value, g, beta),
        initial_state=initial_state,
        output_final_state=output_final_state,
        norm=gdn_norm if use_qk_l2norm_in_kernel else None,
        kwargs=kwargs,
    )
