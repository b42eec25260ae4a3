"""Chunked KDA (Kimi Delta Attention: per-channel decay) in matmul form, exact in fp32, for CPU.

Drop-in for transformers' `chunk_kimi_delta_attention` (Kimi-Linear, and the modules that copy it). The scan
is shared with Gated DeltaNet (`gdn.run`); this module computes the intra-chunk matrices

    M_ij = sum_c q_ic k_jc exp(G_ic - G_jc)  (j <= i)
    A_ij = beta_i sum_c k_ic k_jc exp(G_ic - G_jc)  (j < i)

as matmuls, without a tokens x chunk x k_dim decay tensor and without overflow. Each chunk is split into
sub-chunks of SUB tokens; r_a is the cumulative log decay just before sub-chunk a, e_a the one at its end,
m_a its midpoint (or r_a - SAFE_SPAN / 2 if that is higher).

* Every decay factor is a running product of the per-token exp(g) from a sub-chunk boundary, like the
  recurrence itself, so long sums of strong decays never lose precision in a subtraction.
* Rows in sub-chunk a against columns in an earlier sub-chunk b: exp(G_i - G_j) is
  exp(G_i - m_a) * exp(m_a - e_b) * exp(e_b - G_j), where the first factor is at most exp(SAFE_SPAN / 2)
  and the others are <= 1 (decays only shrink): one fp32 matmul of scaled rows and scaled columns.
* The diagonal block (a, a) joins that matmul with columns k_j exp(m_a - G_j). When the sub-chunk decays
  by less than SAFE_SPAN on every channel, both factors lie within exp(+-SAFE_SPAN / 2) and fp32 holds them.
* Sub-chunks that decay more get their diagonal block recomputed (`_exact_blocks`): halving recursively,
  the second half against the first is a product of factors <= 1 around the boundary between them, and
  blocks of 8 tokens use their own midpoint, in fp32 if they decay by less than SAFE_SPAN, else in fp64,
  where |G - midpoint| <= 4 |G_FLOOR| = 348 fits easily.

G_FLOOR floors every per-token log decay at exp(G_FLOOR) ~ 1.6e-38, fp32's smallest normal number: a decay
factor that small changes nothing a float32 can show, and it bounds every exponent above.
"""

from __future__ import annotations

from typing import Any

import torch

from . import gdn

SUB = 16
SAFE_SPAN = 120.0
G_FLOOR = gdn.EXP_MIN


def kda_norm(x: torch.Tensor) -> torch.Tensor:
    """KDA's l2norm is x / sqrt(|x|^2 + 1e-6) (sqrt and divide, unlike GDN's rsqrt)."""
    return torch.linalg.vecdot(x, x).add_(1e-6).sqrt_().reciprocal_().unsqueeze(-1)


def _between(block_decay: torch.Tensor, i: int) -> torch.Tensor:
    """For each sub-chunk b < i, the decay over the sub-chunks strictly between b and i: [..., i, dk]."""
    return _exclusive_cumprod(block_decay[..., :i, :].flip(-2)).flip(-2)


def _decay_factors(g: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From per-token log decays [..., SUB, dk]: shift * exp(G_i - r_a) (decay from the sub-chunk's start
    through token i) and exp(e_a - G_j) (decay after token j to the sub-chunk's end), as running products
    of exp(g): one exp per token, and no differences of cumulative sums to lose precision."""
    after = torch.empty_like(g)
    decay = g.exp()  # in range: g >= G_FLOOR
    after[..., -1, :] = 1.0
    for j in range(g.shape[-2] - 2, -1, -1):
        torch.mul(after[..., j + 1, :], decay[..., j + 1, :], out=after[..., j, :])
    decay[..., 0, :].mul_(shift)
    for j in range(1, g.shape[-2]):
        decay[..., j, :].mul_(decay[..., j - 1, :])
    return decay, after


def _intra(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> gdn.Parts:
    n, batch, heads, size, k_dim = q.shape
    nsub = size // SUB
    blocks = (n, batch, heads, nsub, SUB, k_dim)
    q, k, g = q.view(blocks), k.view(blocks), g.view(blocks)
    total = g.sum(-2)  # e_a - r_a: [n, B, H, nsub, dk]
    block_decay = gdn.exp_ftz(total)  # exp(e_a - r_a)
    e_start = _exclusive_cumprod(block_decay)  # exp(r_a)
    # Rows refer to the sub-chunk's midpoint m_a (or r_a - SAFE_SPAN / 2 if lower): shift = exp(r_a - m_a).
    shift = total.mul(-0.5).clamp_(max=SAFE_SPAN / 2).exp_()
    e_mid = e_start / shift  # exp(m_a) <= 1
    # exp(G_i - m_a), within exp(+-SAFE_SPAN / 2) in safe sub-chunks; k_j exp(e_b - G_j) <= 1
    row_scale, cols = _decay_factors(g, shift)
    cols.mul_(k)
    rows = torch.empty(n, batch, heads, nsub, 2, SUB, k_dim, device=q.device)
    torch.mul(q, row_scale, out=rows[..., 0, :, :])
    torch.mul(k, row_scale, out=rows[..., 1, :, :])
    flat = (n, batch, heads, size, k_dim)
    parts = gdn.Parts(
        m=torch.empty(n, batch, heads, size, size, device=q.device),
        a=torch.empty(n, batch, heads, size, size, device=q.device),
        q_read=(rows[..., 0, :, :] * e_mid.unsqueeze(-2)).view(flat),
        k_gamma=(rows[..., 1, :, :] * e_mid.unsqueeze(-2)).view(flat),
        k_write=(cols * _between(block_decay, nsub).unsqueeze(-2)).view(flat),  # k_j exp(G_C - G_j)
        chunk_decay=e_start[..., -1, :] * block_decay[..., -1, :],
    )
    c = torch.empty_like(k)  # the columns of row block i: sub-chunks 0..i, scaled for it
    for i in range(nsub):
        if i:
            link = _between(block_decay, i).div_(shift[..., i : i + 1, :]).unsqueeze(-2)  # exp(m_i - e_b)
            torch.mul(cols[..., :i, :, :], link, out=c[..., :i, :, :])
        # k_j exp(m_i - G_j) on the diagonal block: within exp(+-SAFE_SPAN / 2) in safe sub-chunks
        torch.div(k[..., i, :, :], row_scale[..., i, :, :], out=c[..., i, :, :])
        columns = c[..., : i + 1, :, :].flatten(-3, -2)
        block = rows[..., i, :, :, :].flatten(-3, -2) @ columns.transpose(-1, -2)
        rs, cs = slice(i * SUB, (i + 1) * SUB), slice(0, (i + 1) * SUB)
        parts.m[..., rs, cs], parts.a[..., rs, cs] = block[..., :SUB, :], block[..., SUB:, :]
    upper = torch.ones(size, size, dtype=torch.bool, device=q.device).triu_(1)
    parts.m.masked_fill_(upper, 0.0)
    unsafe = total.amin(-1) < -SAFE_SPAN
    if unsafe.any():
        _exact_diagonal(q, k, g, unsafe, parts)
    parts.a.mul_(beta.unsqueeze(-1))
    return parts


def _exclusive_cumprod(x: torch.Tensor) -> torch.Tensor:
    """Products of the entries before each one along dim -2 (1 for the first)."""
    out = torch.ones_like(x)
    for i in range(1, x.shape[-2]):
        torch.mul(out[..., i - 1, :], x[..., i - 1, :], out=out[..., i, :])
    return out


def _exact_diagonal(
    q: torch.Tensor, k: torch.Tensor, g: torch.Tensor, unsafe: torch.Tensor, parts: gdn.Parts
) -> None:
    """Recompute the diagonal blocks of the unsafe sub-chunks ([n, B, H, nsub] mask) of parts.m and parts.a
    (A still without beta): q, k, g are [n, B, H, nsub, SUB, dk]."""
    nsub, sub, k_dim = q.shape[-3:]
    idx = unsafe.flatten().nonzero().squeeze(1)
    q, k = (x.reshape(-1, sub, k_dim)[idx] for x in (q, k))
    local = g.reshape(-1, sub, k_dim)[idx].double().cumsum(1)
    out = _exact_blocks(q, k, local, torch.zeros_like(local[:, 0]))
    rows, which = idx // nsub, idx % nsub
    shape = (-1, nsub, sub, nsub, sub)
    parts.m.view(shape)[rows, which, :, which, :] = out[:, 0]
    parts.a.view(shape)[rows, which, :, which, :] = out[:, 1]


def _exact_blocks(
    q: torch.Tensor, k: torch.Tensor, local: torch.Tensor, before: torch.Tensor
) -> torch.Tensor:
    """[N, 2, s, s]: M's and A's (without beta) lower triangles for N blocks of s tokens, exactly: q, k
    [N, s, dk]; local [N, s, dk] the fp64 cumulative log decay, `before` [N, dk] its value before the first
    token. Halves recursively: the second half against the first is a product of factors <= 1 around the
    boundary, and blocks of up to 8 tokens are computed around their midpoint (fp32 or fp64)."""
    n, size, k_dim = q.shape
    if size <= 8:
        mid = (before + local[:, -1]).mul_(0.5).unsqueeze(1)
        # exp(G - m) is within exp(+-SAFE_SPAN / 2) if the blocks decay by less than SAFE_SPAN (fp32 will
        # do), and always within exp(+-4 |G_FLOOR|) (fp64 will do).
        dtype = torch.float32 if (before - local[:, -1]).max() <= SAFE_SPAN else torch.float64
        scale = (local - mid).to(dtype).exp_()
        # (copies in the working dtype first: mixed-dtype elementwise ops are many times slower)
        rows = torch.empty(n, 2, size, k_dim, dtype=dtype, device=q.device)
        rows[:, 0], rows[:, 1] = q, k
        rows.mul_(scale.unsqueeze(1))
        prod = rows.view(n, 2 * size, k_dim) @ k.to(dtype).div_(scale).transpose(1, 2)  # [N, 2 s, s]
        lower = torch.ones(size, size, dtype=torch.bool, device=q.device).tril_().repeat(2, 1)
        # Above the diagonal the products are exp(positive) and may be inf: select, never multiply.
        return torch.where(lower, prod, 0.0).float().view(n, 2, size, size)
    half = size // 2
    out = torch.zeros(n, 2, size, size, device=q.device)
    ref = local[:, half - 1 : half, :]
    row = gdn.exp_ftz((local[:, half:] - ref).float())
    col = gdn.exp_ftz((ref - local[:, :half]).float())
    cross = torch.cat((q[:, half:] * row, k[:, half:] * row), 1) @ (k[:, :half] * col).transpose(1, 2)
    out[:, :, half:, :half] = cross.view(n, 2, half, half)
    inner = _exact_blocks(
        q.reshape(2 * n, half, k_dim),
        k.reshape(2 * n, half, k_dim),
        local.reshape(2 * n, half, k_dim),
        torch.stack((before, local[:, half - 1]), 1).view(2 * n, k_dim),
    ).view(n, 2, 2, half, half)
    out[:, :, :half, :half], out[:, :, half:, half:] = inner[:, 0], inner[:, 1]
    return out


def chunk_kimi_delta_attention(  # noqa: PLR0917 - the positional signature of the function it replaces
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
    """Same arguments and results as transformers' `chunk_kimi_delta_attention`: q, k [B, T, H, dk];
    v [B, T, H, dv]; g [B, T, H, dk] (per-channel log decay); beta [B, T, H]; state [B, H, dk, dv] fp32;
    output in the input dtype. `chunk_size` is accepted and ignored: the result does not depend on it."""
    if key.shape[2] != value.shape[2]:
        raise ValueError("KDA needs as many key heads as value heads")
    return gdn.run(
        _intra,
        (query, key, value, g, beta),
        initial_state=initial_state,
        output_final_state=output_final_state,
        norm=kda_norm if use_qk_l2norm_in_kernel else None,
        kwargs=kwargs,
        g_floor=G_FLOOR,
    )
