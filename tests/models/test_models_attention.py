"""Attention kernels: every registered variant, and the equivalences with the reference normalisers."""

import math

import pytest
import torch
from entmax import entmax15, entmax_bisect, sparsemax

from models import hooks
from models.attention import ATTENTION_REGISTRY, MultiHeadAttention, alpha_entmax, build_kernel, mask_value
from models.attention.softmax import cast_mask, softmax_lastdim
from models.attention.span import SpanMask
from models.config import AttentionConfig

H, D = 4, 8
# Small ramp and half span so that the span mask really cuts keys (and z gets a gradient).
CFG = AttentionConfig(span_ramp=2, span_init=0.5, alpha_init=1.3)


def kernel(name, cfg=CFG, span_max=6):
    torch.manual_seed(0)
    return build_kernel(name, H, cfg, span_max=span_max, dropout=0.0)


def qkv(b=3, q_len=5, k_len=7, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, H, n, D, generator=g) * 2 for n in (q_len, k_len, k_len))
    keep = torch.ones(b, k_len)
    keep[0, 4:] = 0  # padding keys
    keep[-1, 1:] = 0  # only the first key left
    mask = ((1 - keep) * mask_value(torch.float32))[:, None, None, :]
    return q.to(dtype), k.to(dtype), v.to(dtype), mask, keep


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_shapes_rows_sum_to_one_and_masked_keys_get_zero(name):
    q, k, v, mask, keep = qkv()
    kern = kernel(name)
    out, probs = kern(q, k, v, mask, need_probs=True)
    assert out.shape == (3, H, 5, D) and probs.shape == (3, H, 5, 7)
    torch.testing.assert_close(probs.float().sum(-1), torch.ones(3, H, 5), atol=1e-5, rtol=0)
    assert (probs.float()[keep[:, None, None, :].expand_as(probs) == 0] == 0).all()
    assert (probs >= 0).all()
    # The fast path (no probabilities requested; SDPA where the kernel can) computes the same.
    fast, none = kern(q, k, v, mask)
    assert none is None
    torch.testing.assert_close(fast, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    mha = MultiHeadAttention(H * D, H, kernel(name))
    x, ctx = torch.randn(2, 5, H * D), torch.randn(2, 6, H * D)
    mask = torch.zeros(2, 1, 1, 6)
    mask[1, ..., 4:] = mask_value(torch.float32)
    (mha(x, ctx, mask)[0] * torch.randn(2, 5, H * D)).sum().backward()
    for pname, p in mha.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"zero gradient for {pname}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_low_precision_and_fully_masked_rows_stay_finite(name, dtype):
    q, k, v, mask, _ = qkv(dtype=dtype)
    mask = mask.clone()
    mask[1] = mask_value(torch.float32)  # a row with every key masked
    q.requires_grad_(True)
    kern = kernel(name)
    for need_probs in (False, True):
        out, probs = kern(q, k, v, cast_mask(mask, dtype), need_probs=need_probs)
        assert out.dtype == dtype and torch.isfinite(out).all()
        if probs is not None:
            assert torch.isfinite(probs).all()
            torch.testing.assert_close(probs.float().sum(-1), torch.ones(3, H, 5), atol=1e-2, rtol=0)
        out.float().sum().backward()
        assert torch.isfinite(q.grad).all()
        q.grad = None


def test_unknown_kernel_lists_the_valid_ones():
    with pytest.raises(ValueError, match="softmax") as err:
        build_kernel("flash", H, CFG, span_max=4, dropout=0.0)
    assert all(n in str(err.value) for n in ATTENTION_REGISTRY)


# ------------------------------------------------------------------------------------------------
# Equivalences


def test_span_at_full_span_equals_softmax():
    q, k, v, mask, _ = qkv(q_len=6, k_len=9)
    span = kernel("span", AttentionConfig(span_init=1.0, span_ramp=2), span_max=9)
    soft = kernel("softmax")
    for need_probs in (False, True):
        a, pa = span(q, k, v, mask, need_probs)
        b, pb = soft(q, k, v, mask, need_probs)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-6)


def test_span_mask_matches_its_formula_and_cuts_far_keys():
    sm = SpanMask(num_heads=3, span_max=10, ramp=4, init=0.3, penalty=0.01)
    with torch.no_grad():
        sm.z.copy_(torch.tensor([0.0, 0.3, 1.0]))
    m = sm(5, 12, torch.device("cpu"))
    x = (torch.arange(5)[:, None] - torch.arange(12)[None, :]).abs().float()
    for h, z in enumerate([0.0, 0.3, 1.0]):
        torch.testing.assert_close(m[h], ((4 + z * 10 - x) / 4).clamp(0, 1))
    q, k, v, _, _ = qkv(b=2, q_len=5, k_len=12)  # no mask used below
    kern = kernel("span", AttentionConfig(span_ramp=4, span_init=0.3), span_max=10)
    with torch.no_grad():
        kern.span.z.copy_(torch.tensor([0.0, 0.3, 1.0, 0.5]))
    _, probs = kern(q, k, v, None, need_probs=True)
    m = kern.span(5, 12, torch.device("cpu"))
    assert (probs[:, :3][m[None, :3].expand(2, -1, -1, -1) == 0] == 0).all()
    # softmax(score + log m) == m * exp(score) renormalised
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    ref = m * torch.exp(scores - scores.amax(-1, keepdim=True))
    torch.testing.assert_close(probs, ref / ref.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    assert torch.isclose(sm.aux_loss(), torch.tensor(0.01 * 10 * (1.3 / 3)))


def test_learned_entmax_at_alpha_2_is_sparsemax_and_at_1_5_is_entmax15():
    q, k, v, mask, _ = qkv()
    scores = (q @ k.transpose(-1, -2) / math.sqrt(D)) + mask
    kern = kernel("entmax")
    with torch.no_grad():
        kern.alpha_logit.fill_(40.0)  # 1 + sigmoid(40) == 2 in float32
    assert (kern.alpha() == 2).all()
    torch.testing.assert_close(kern(q, k, v, mask, True)[1], sparsemax(scores, dim=-1), atol=1e-6, rtol=0)
    with torch.no_grad():
        kern.alpha_logit.fill_(0.0)
    assert (kern.alpha() == 1.5).all()
    torch.testing.assert_close(kern(q, k, v, mask, True)[1], entmax15(scores, dim=-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode, ref", [("entmax15", entmax15), ("sparsemax", sparsemax)])
def test_fixed_alpha_modes_match_the_entmax_package(mode, ref):
    x = torch.randn(4, 3, 6, 11, dtype=torch.float64).float() * 3
    x[0, :, :, 5:] = mask_value(torch.float32)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    alpha = 1.5 if mode == "entmax15" else 2.0
    a, b = alpha_entmax(x1, alpha), ref(x2, dim=-1)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    w = torch.randn_like(a)
    (a * w).sum().backward()
    (b * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    kern = kernel("entmax", AttentionConfig(alpha_mode=mode))
    assert kern.alpha_logit is None and (kern.alpha() == alpha).all()


def test_learned_alpha_matches_entmax_bisect_forward_and_gradients():
    torch.manual_seed(1)
    x = torch.randn(5, H, 6, 13) * 4
    x[1, :, :, 7:] = mask_value(torch.float32)
    alpha0 = torch.tensor([1.05, 1.3, 1.7, 1.95]).view(1, H, 1, 1)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a1, a2 = alpha0.clone().requires_grad_(True), alpha0.clone().requires_grad_(True)
    p1 = alpha_entmax(x1, a1, tol=1e-6)
    p2 = entmax_bisect(x2, a2, dim=-1, n_iter=80)
    torch.testing.assert_close(p1, p2, atol=2e-6, rtol=0)
    w = torch.randn_like(p1)
    (p1 * w).sum().backward()
    (p2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    assert a1.grad.shape == (1, H, 1, 1)
    torch.testing.assert_close(a1.grad, a2.grad.reshape(1, H, 1, 1), atol=1e-4, rtol=1e-3)


def test_span_entmax_is_entmax_then_span_mask_then_renormalise():
    q, k, v, mask, _ = qkv(q_len=6, k_len=9)
    kern = kernel("span_entmax", AttentionConfig(span_ramp=3, span_init=0.4, alpha_init=1.2), span_max=8)
    _, probs = kern(q, k, v, mask, need_probs=True)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D) + mask
    ent = entmax_bisect(scores, kern.entmax.alpha().view(1, H, 1, 1).detach(), dim=-1, n_iter=80)
    masked = ent * kern.span(6, 9, torch.device("cpu"))
    total = masked.sum(-1, keepdim=True)
    ref = torch.where(total > 0, masked / total.clamp_min(1e-30), ent)
    torch.testing.assert_close(probs, ref, atol=2e-6, rtol=0)


def test_bounds_hold_after_large_learning_rate_steps():
    torch.manual_seed(0)
    cfg = AttentionConfig(span_ramp=2, span_init=0.5, alpha_init=1.5)
    mha = MultiHeadAttention(H * D, H, build_kernel("span_entmax", H, cfg, span_max=6, dropout=0.0))
    kernel_params = [mha.kernel.entmax.alpha_logit, mha.kernel.span.z]
    opt = torch.optim.SGD([{"params": kernel_params, "lr": 1e4}, {"params": mha.qkv.parameters(), "lr": 1.0}])
    x = torch.randn(2, 6, H * D)
    for step in range(6):
        sign = 1.0 if step < 3 else -1.0  # push alpha and z up, then down
        opt.zero_grad()
        out, probs = mha(x, need_probs=True)
        loss = sign * (mha.kernel.entmax.alpha().sum() + mha.kernel.span.z.sum()) + out.square().mean()
        loss.backward()
        opt.step()
        hooks.post_step(mha)
        alpha = mha.kernel.entmax.alpha()
        assert ((alpha >= cfg.alpha_min) & (alpha <= cfg.alpha_max)).all()
        assert ((mha.kernel.span.z >= 0) & (mha.kernel.span.z <= 1)).all()
        assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    # Still trainable at the lower bound: the clamp keeps w where alpha has a gradient.
    opt.zero_grad()
    mha.kernel.entmax.alpha().sum().backward()
    assert (mha.kernel.entmax.alpha_logit.grad != 0).all()


def test_softmax_kernel_matches_explicit_attention_with_dropout_off_in_eval():
    q, k, v, mask, _ = qkv()
    kern = build_kernel("softmax", H, CFG, span_max=4, dropout=0.5).eval()
    out, _ = kern(q, k, v, mask)
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + mask, -1) @ v
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_bidirectional_cross_attention_equals_two_one_way_calls(name):
    torch.manual_seed(0)
    mha = MultiHeadAttention(H * D, H, kernel(name)).eval()
    a, b = torch.randn(2, 5, H * D), torch.randn(2, 7, H * D)
    mask_a, mask_b = torch.zeros(2, 1, 1, 5), torch.zeros(2, 1, 1, 7)
    mask_a[0, ..., 3:] = mask_b[1, ..., 6:] = mask_value(torch.float32)
    (out_a, p_a), (out_b, p_b) = mha.forward_both(a, b, mask_a, mask_b, need_probs=True)
    torch.testing.assert_close(out_a, mha(a, b, mask_b)[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_b, mha(b, a, mask_a)[0], atol=1e-6, rtol=1e-5)
    assert p_a.shape == (2, H, 5, 7) and p_b.shape == (2, H, 7, 5)


def test_full_span_skip_is_exact_and_keeps_the_boundary_gradient():
    q, k, v, mask, _ = qkv(q_len=6, k_len=9)
    # S_max = 8 = max |i - j|: at z = 1 the farthest key sits exactly on the clamp's edge, where the
    # mask still passes gradient to z, so it must be computed, not skipped.
    edge = kernel("span", AttentionConfig(span_init=1.0, span_ramp=2), span_max=8)
    assert not edge.span.is_full(6, 9)
    edge(q, k, v, mask)[0].square().sum().backward()
    assert (edge.span.z.grad != 0).any()
    inside = kernel("span", AttentionConfig(span_init=1.0, span_ramp=2), span_max=9)
    assert inside.span.is_full(6, 9)
    torch.testing.assert_close(inside(q, k, v, mask)[0], edge(q, k, v, mask)[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k_len", [5, 12, 16, 37])
def test_softmax_lastdim_equals_torch_softmax_with_gradients(k_len):
    x = (torch.randn(3, 4, 6, k_len) * 5).requires_grad_(True)
    y = x.detach().clone().requires_grad_(True)
    w = torch.randn(3, 4, 6, k_len)
    a, b = softmax_lastdim(x), torch.softmax(y, -1)
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    (a * w).sum().backward()
    (b * w).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)
    assert softmax_lastdim(x.detach().bfloat16()).dtype == torch.bfloat16
