"""The fast delta-rule kernels against the token-by-token recurrence and transformers' references, on fresh
random inputs of odd lengths; install() against real tiny models."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from transformers.models.kimi_linear import modeling_kimi_linear
from transformers.models.qwen3_5 import modeling_qwen3_5

from linmem import kernels
from linmem.kernels import gdn, kda
from linmem.kernels.naive import gdn_l2norm, kda_l2norm, naive_gated_delta_rule

LENGTHS = [1, 63, 65, 130, 257, 577]  # 577: past a segment of gdn.SEGMENT chunks
GDN_REFERENCE = modeling_qwen3_5.torch_chunk_gated_delta_rule.__wrapped__
KDA_REFERENCE = modeling_kimi_linear.chunk_kimi_delta_attention.__wrapped__


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation, which stalls badly on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(length, k_heads, v_heads, *, per_channel, l2norm=True, with_state=True, decay="mild", seed=0):
    gen = torch.Generator().manual_seed(seed)
    k_dim, v_dim = 16, 24
    q = torch.randn(2, length, k_heads, k_dim, generator=gen)
    k = torch.randn(2, length, k_heads, k_dim, generator=gen)
    if not l2norm:  # keep the delta rule stable without the in-kernel normalisation
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(2, length, v_heads, v_dim, generator=gen)
    g_shape = (2, length, v_heads, k_dim) if per_channel else (2, length, v_heads)
    g = -F.softplus(torch.randn(g_shape, generator=gen) * 2 - 1)
    if decay == "weak":  # long memory: errors in how the state decays show
        g = g * 0.02
    if decay == "strong":  # cumulative decays far beyond exp(-87): an exp(-G) factor would overflow fp32
        g = g * torch.where(torch.rand(g_shape, generator=gen) < 0.3, 40.0, 1.0)
        g[:, length // 2] = -1e4
    beta = torch.rand(2, length, v_heads, generator=gen)
    state = torch.randn(2, v_heads, k_dim, v_dim, generator=gen) if with_state else None
    return (q, k, v, g, beta), {
        "initial_state": state,
        "output_final_state": True,
        "use_qk_l2norm_in_kernel": l2norm,
    }


def _gdn(length, k_heads=2, **options):
    return _inputs(length, k_heads, 4, per_channel=False, **options)


def _kda(length, **options):
    return _inputs(length, 3, 3, per_channel=True, **options)


def _assert_close(got, want, tol=1e-4):
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize(
    ("k_heads", "with_state", "l2norm", "decay"),
    [(4, True, True, "mild"), (2, False, True, "mild"), (2, True, False, "mild"), (2, True, True, "weak")],
)
def test_gdn_matches_recurrence_and_reference(length, k_heads, with_state, l2norm, decay):
    args, kw = _gdn(length, k_heads, l2norm=l2norm, with_state=with_state, decay=decay, seed=length)
    ours = kernels.chunk_gated_delta_rule(*args, **kw)
    _assert_close(ours, naive_gated_delta_rule(*args, **kw, norm=gdn_l2norm))
    _assert_close(ours, GDN_REFERENCE(*args, **kw))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize(
    ("with_state", "l2norm", "decay"),
    [(True, True, "mild"), (False, True, "mild"), (True, False, "mild"), (True, True, "weak")],
)
def test_kda_matches_recurrence_and_reference(length, with_state, l2norm, decay):
    args, kw = _kda(length, l2norm=l2norm, with_state=with_state, decay=decay, seed=length)
    ours = kernels.chunk_kimi_delta_attention(*args, **kw)
    _assert_close(ours, naive_gated_delta_rule(*args, **kw, norm=kda_l2norm))
    _assert_close(ours, KDA_REFERENCE(*args, **kw))


@pytest.mark.parametrize("segment", [1, 3])
def test_segment_boundaries_carry_the_state_exactly(segment, monkeypatch):
    """Long inputs go segment by segment; any segment size gives the recurrence's answer."""
    monkeypatch.setattr(gdn, "SEGMENT", segment)
    args, kw = _gdn(449, 2, with_state=True, seed=segment)
    _assert_close(
        kernels.chunk_gated_delta_rule(*args, **kw), naive_gated_delta_rule(*args, **kw, norm=gdn_l2norm)
    )
    args, kw = _kda(449, with_state=True, seed=segment)
    _assert_close(
        kernels.chunk_kimi_delta_attention(*args, **kw), naive_gated_delta_rule(*args, **kw, norm=kda_l2norm)
    )


@pytest.mark.parametrize("length", [65, 257])
def test_strong_decay_stays_exact(length, monkeypatch):
    args, kw = _gdn(length, decay="strong", seed=7)
    _assert_close(kernels.chunk_gated_delta_rule(*args, **kw), naive_gated_delta_rule(*args, **kw))
    args, kw = _kda(length, decay="strong", seed=7)
    want = naive_gated_delta_rule(*args, **kw, norm=kda_l2norm)
    _assert_close(kernels.chunk_kimi_delta_attention(*args, **kw), want)
    # the exact fallback for every sub-chunk (its 8-token blocks in fp64), for some (fp32), and for none
    for span in (0.0, 12.0, float("inf")):
        monkeypatch.setattr(kda, "SAFE_SPAN", span)
        args, kw = _kda(length, seed=8)
        want = naive_gated_delta_rule(*args, **kw, norm=kda_l2norm)
        _assert_close(kernels.chunk_kimi_delta_attention(*args, **kw), want)


def test_bf16_inputs_round_trip():
    args, kw = _gdn(130, seed=3)
    half = tuple(x.bfloat16() for x in args)
    out, state = kernels.chunk_gated_delta_rule(*half, **kw)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    want_out, want_state = GDN_REFERENCE(*half, **kw)
    torch.testing.assert_close(out, want_out, rtol=0, atol=2e-2)
    torch.testing.assert_close(state, want_state, rtol=0, atol=1e-4)
    args, kw = _kda(130, seed=3)
    half = tuple(x.bfloat16() for x in args)
    out, state = kernels.chunk_kimi_delta_attention(*half, **kw)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.float32
    _assert_close((out.float(), state), (x.float() for x in KDA_REFERENCE(*half, **kw)), tol=2e-2)


def test_inputs_untouched_and_chunk_size_ignored():
    args, kw = _gdn(100, seed=5)
    before = [x.clone() for x in args] + [kw["initial_state"].clone()]
    first = kernels.chunk_gated_delta_rule(*args, **kw)
    second = kernels.chunk_gated_delta_rule(*args, chunk_size=16, **kw)
    for a, b in zip(before, list(args) + [kw["initial_state"]], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cu_seqlens"):
        kernels.chunk_gated_delta_rule(*args, cu_seqlens=torch.tensor([0, 50, 100]))


def _skip_with_fla():
    if kernels._fla_importable():
        pytest.skip("fla is importable: transformers uses its kernels, and install() leaves them alone")


@pytest.fixture
def patched():
    _skip_with_fla()
    names = kernels.install()
    yield names
    kernels.uninstall()


def test_install_patches_and_uninstall_restores(patched, monkeypatch):
    assert "transformers.models.qwen3_5.modeling_qwen3_5.torch_chunk_gated_delta_rule" in patched
    assert "transformers.models.kimi_linear.modeling_kimi_linear.chunk_kimi_delta_attention" in patched
    assert modeling_qwen3_5.torch_chunk_gated_delta_rule.__wrapped__ is kernels.chunk_gated_delta_rule
    assert modeling_kimi_linear.chunk_kimi_delta_attention.__wrapped__ is kernels.chunk_kimi_delta_attention
    assert sorted(kernels.installed()) == sorted(patched)
    # where autograd records, the patched name still runs the (differentiable) reference
    args, kw = _gdn(70, seed=4)
    query = args[0].clone().requires_grad_()
    out, _ = modeling_qwen3_5.torch_chunk_gated_delta_rule(query, *args[1:], **kw)
    out.sum().backward()
    assert query.grad is not None
    assert kernels.install() == patched  # idempotent
    assert sorted(kernels.uninstall()) == sorted(patched)
    assert modeling_qwen3_5.torch_chunk_gated_delta_rule.__wrapped__ is GDN_REFERENCE
    assert modeling_kimi_linear.chunk_kimi_delta_attention.__wrapped__ is KDA_REFERENCE
    monkeypatch.setenv("LINMEM_KERNELS", "reference")
    assert kernels.install() == []


@pytest.mark.parametrize("name", ["kimi-linear", "qwen3.5"])
def test_tiny_models_give_the_same_logits(name):
    from linmem.engines.tiny import build

    _skip_with_fla()
    model, _ = build(name)
    ids = torch.randint(0, 256, (1, 211), generator=torch.Generator().manual_seed(0))
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
    with torch.no_grad():
        want = model(ids).logits
        try:
            assert kernels.install()
            got = model(ids).logits
            # a prefix with its cache, then the rest from that state (the kernels' initial_state path)
            cache = model(ids[:, :100], use_cache=True).past_key_values
            rest = model(ids[:, 100:], **{cache_kw: cache}).logits
        finally:
            kernels.uninstall()
        again = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    torch.testing.assert_close(rest, want[:, 100:], rtol=0, atol=1e-4)
    assert torch.equal(again, want)
