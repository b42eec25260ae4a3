"""The token-by-token gated delta rule: the slow, obviously-correct spec the fast kernels are tested against.

For each value head, with state S (k_dim x v_dim, fp32) and per token t:

    S   <- diag(exp(g_t)) S                 (exp(g_t) is a scalar for Gated DeltaNet, a k_dim vector for KDA)
    u_t  = beta_t * (v_t - S^T k_t)          (the delta rule reads the decayed state)
    S   <- S + k_t u_t^T
    o_t  = S^T q_t

with q scaled by k_dim ** -0.5 after the optional L2 normalisation, all in fp32, and the output returned in
the input dtype. Written from the math above, not from the chunked references.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Norm = Callable[[torch.Tensor], torch.Tensor]


def gdn_l2norm(x: torch.Tensor) -> torch.Tensor:
    """Gated DeltaNet's (Qwen3-Next / Qwen3.5) normalisation: x * rsqrt(|x|^2 + 1e-6)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def kda_l2norm(x: torch.Tensor) -> torch.Tensor:
    """KDA's (Kimi-Linear) normalisation: x / sqrt(|x|^2 + 1e-6), matching fla's Triton kernel."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def naive_gated_delta_rule(  # noqa: PLR0917 - the positional signature of the kernels it checks
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    norm: Norm = gdn_l2norm,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Recurrent reference. q, k: [B, T, Hk, dk]; v: [B, T, Hv, dv]; beta: [B, T, Hv];
    g: [B, T, Hv] (scalar decay) or [B, T, Hv, dk] (per-channel decay). Hv must be a multiple of Hk
    (value head h reads query/key head h // (Hv // Hk)). Returns ([B, T, Hv, dv], [B, Hv, dk, dv] or None)."""
    q, k, v, g, beta = (x.float() for x in (query, key, value, g, beta))
    batch, length, num_k_heads, k_dim = k.shape
    num_v_heads, v_dim = v.shape[-2:]
    group = num_v_heads // num_k_heads
    q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    if use_qk_l2norm_in_kernel:
        q, k = norm(q), norm(k)
    q = q * k_dim**-0.5
    decay = g.exp() if g.dim() == 4 else g.exp().unsqueeze(-1).expand(-1, -1, -1, k_dim)
    state = (
        torch.zeros(batch, num_v_heads, k_dim, v_dim, device=v.device)
        if initial_state is None
        else initial_state.float()
    )
    out = torch.empty(batch, length, num_v_heads, v_dim, device=v.device)
    for t in range(length):
        state = state * decay[:, t, :, :, None]
        k_t = k[:, t, :, :, None]
        u_t = beta[:, t, :, None] * (v[:, t] - (state * k_t).sum(-2))
        state = state + k_t * u_t[:, :, None, :]
        out[:, t] = (state * q[:, t, :, :, None]).sum(-2)
    return out.to(query.dtype), state if output_final_state else None
