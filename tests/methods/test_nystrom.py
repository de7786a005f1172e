"""Nystromformer: with m = T landmarks and the exact pinv it is dense attention (also under padding and in
its gradients), the iterative pinv converges to the exact one, the approximation improves as m grows,
padding is honoured, implied probs are consistent, and refusals come before compute."""
from __future__ import annotations

import pytest
import torch

from attnlab.methods.base import repeat_kv
from attnlab.methods.dense import dense_attention
from attnlab.methods.nystrom import iterative_pinv, paper_pinv, segment_means
from tests.helpers import DTYPES, assert_matches_reference, grads, make, max_err, rand_qkv, reference

# The exact limit computes S pinv(S) S V in fp32; its rounding grows with cond(S), which grows with T and
# with the q/k scale. T <= 16 at std 1 keeps it under the shared fp32 FLOOR (measured up to ~6e-6 at T=16;
# T=32 reaches ~1.5e-5, T=64 ~2.5e-5, which would exceed it). Gradients are far more sensitive: the
# backward of S pinv(S) S cancels terms of size ~cond(S), and through torch.linalg.pinv in fp32 dq is
# already off by ~2e-3 at cond(S) ~ 250 (T=8) and by ~1 at cond ~ 2000 (T=12, std 1). So the gradient
# test uses keys near the queries (S diagonally dominant, cond ~ 15), where fp32 meets the shared rule.


def _well_conditioned(t, seed):
    q, k, v = rand_qkv(tq=t, seed=seed)
    return q, q + 0.3 * k, v


def _exact(q, k, **opts):
    return make("nystrom", q, k, num_landmarks=64, pinv="exact", **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,hkv", [(16, 4), (13, 2), (8, 1), (40, None)])
def test_exact_limit_is_dense(dtype, t, hkv):
    if hkv is None:  # a longer sequence, fine when S is well conditioned
        q, k, v = (x.to(dtype) for x in _well_conditioned(t, seed=t))
    else:
        q, k, v = rand_qkv(tq=t, hkv=hkv, dtype=dtype, seed=t)
    out, probs = _exact(q, k)(q, k, v)
    assert probs is None and out.dtype == dtype
    err = assert_matches_reference(out, q, k, v)
    print(f"nystrom exact pinv m=T={t} {dtype}: max err {err:.2e}")


def test_iterative_pinv_converges_to_exact():
    q, k, v = rand_qkv(tq=16, hkv=2, seed=2)
    exact = _exact(q, k)(q, k, v)[0]
    errs = [max_err(make("nystrom", q, k, num_landmarks=64, pinv_iters=n)(q, k, v)[0], exact) for n in (1, 3, 6, 10, 16)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # enough iterations reach dense attention; a looser bound than the exact pinv's, since the iteration's
    # own fp32 rounding accumulates (measured ~1-2e-5 at 30 iterations)
    out = make("nystrom", q, k, num_landmarks=64, pinv_iters=30)(q, k, v)[0]
    assert max_err(out, reference(q, k, v)) < 1e-4


def test_iterative_pinv_is_moore_penrose():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 12, 12, generator=g, dtype=torch.float64).softmax(-1)
    a[1, 8:], a[1, :, 8:] = 0, 0  # the block-zero shape padding produces: pinv, not inverse
    a[2] = 0  # all padded: Z must stay 0, not NaN
    z = iterative_pinv(a, 40)
    torch.testing.assert_close(z, torch.linalg.pinv(a), rtol=0, atol=1e-8)


@pytest.mark.parametrize("iters", [0, 1, 6])
def test_iterative_pinv_backward_matches_autograd_of_the_paper_form(iters):
    g = torch.Generator().manual_seed(iters)
    a = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64).softmax(-1).requires_grad_(True)
    w = torch.randn(2, 3, 9, 9, generator=g, dtype=torch.float64)
    z, ref = iterative_pinv(a, iters), paper_pinv(a, iters)
    torch.testing.assert_close(z, ref, rtol=1e-12, atol=1e-12)
    ga, = torch.autograd.grad((z * w).sum(), a)
    gr, = torch.autograd.grad((ref * w).sum(), a)
    assert gr.abs().max() > 1  # a gradient that says something
    torch.testing.assert_close(ga, gr, rtol=1e-10, atol=1e-10)
    # and against finite differences, on a matrix without the row-sum ties of a softmax (max is not smooth there)
    b = (torch.randn(2, 5, 5, generator=g, dtype=torch.float64) + 3 * torch.eye(5, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda x: iterative_pinv(x, iters), (b.requires_grad_(True),))


def test_iterative_pinv_under_autocast_runs_in_fp32_and_differentiates():
    """bf16 autocast (distillation's and the ViT's training loops) must not reach the iteration: its bmm would run
    in bf16 and its subtractions in fp32, and the backward (outside autocast) could not multiply the mix."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(2, 3, 8, 8, generator=g).softmax(-1).requires_grad_(True)
    w = torch.randn(2, 3, 8, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = iterative_pinv(a, 6)
    assert z.dtype == torch.float32
    ga, = torch.autograd.grad((z * w).sum(), a)
    gr, = torch.autograd.grad((paper_pinv(a, 6) * w).sum(), a)
    torch.testing.assert_close(ga, gr, rtol=1e-4, atol=1e-4)
    q, k, v = rand_qkv(tq=32, hkv=2, seed=6)
    qq = q.clone().requires_grad_(True)
    m = make("nystrom", q, k, num_landmarks=8, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(qq, k, v).out
    out.float().sum().backward()
    assert torch.isfinite(qq.grad).all() and qq.grad.abs().max() > 0


def _padding_mask():
    kpm = torch.ones(4, 14, dtype=torch.bool)
    kpm[0, 10:] = False  # right padding
    kpm[1, :3] = False  # left padding
    kpm[2, 1::4] = False  # holes
    kpm[3] = False  # all padded
    return kpm


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_limit_with_padding(dtype):
    q, k, v = rand_qkv(b=4, tq=14, hkv=2, dtype=dtype, seed=7)
    kpm = _padding_mask()
    out, _ = _exact(q, k)(q, k, v, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert_matches_reference(out[:3], q[:3], k[:3], v[:3], key_padding_mask=kpm[:3])
    assert out[3].abs().max() == 0
    g = grads(lambda a, b, c: _exact(q, k)(a, b, c, key_padding_mask=kpm)[0], q, k, v)
    assert all(torch.isfinite(x).all() for x in g)


@pytest.mark.parametrize("pinv", ["iterative", "exact"])
def test_padding_ignored_in_approximate_regime(pinv):
    # m < T: landmarks average real tokens only, so whatever sits at padded positions cannot matter
    q, k, v = rand_qkv(b=4, tq=30, hkv=2, seed=9)
    kpm = torch.ones(4, 30, dtype=torch.bool)
    kpm[0, 21:], kpm[1, :7], kpm[2, 3::5], kpm[3] = False, False, False, False
    method = make("nystrom", q, k, num_landmarks=6, pinv=pinv, conv_kernel=3)
    out, _ = method(q, k, v, key_padding_mask=kpm)
    pad = ~kpm[:, None, :, None]
    q2, k2, v2 = (x.masked_fill(pad, 1e2) for x in (q, k, v))
    out2, _ = method(q2, k2, v2, key_padding_mask=kpm)
    real = kpm[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out2[real], out[real], rtol=0, atol=1e-5)
    assert out[3].abs().max() == 0 and torch.isfinite(out).all()


def test_segments_need_not_divide():
    avg, real = segment_means(4, 10, None, torch.float64, "cpu")  # floor(i * 4 / 10)
    seg = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    want = torch.zeros(4, 10, dtype=torch.float64)
    for i, s in enumerate(seg):
        want[s, i] = 1 / seg.count(s)
    torch.testing.assert_close(avg[0, 0], want)
    assert real.all()
    kpm = torch.tensor([[True] * 5 + [False] * 5])
    avg, real = segment_means(4, 10, kpm, torch.float64, "cpu")
    assert real.tolist() == [[True, True, False, False]] and avg[0, 0, 1, 3:5].tolist() == [0.5, 0.5]


def _smooth(b, t, d, seed):
    # random walks: neighbouring tokens are alike, the structure segment-mean landmarks are built for
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 4, t, d, generator=g, dtype=torch.float64).cumsum(-2) / t**0.5).float()


@pytest.mark.parametrize("seed", [0, 1])
def test_error_falls_as_landmarks_grow(seed):
    q, k, v = _smooth(2, 64, 16, 3 * seed), _smooth(2, 64, 16, 3 * seed + 1), rand_qkv(2, 4, 64, seed=seed)[2]
    ref = reference(q, k, v)

    def rms(m, **opts):
        out = make("nystrom", q, k, num_landmarks=m, **opts)(q, k, v)[0]
        return (out.double() - ref).pow(2).mean().sqrt().item()

    # the paper's default (6 Newton-Schulz steps) improves at every step (measured ~0.015 -> 0.004)
    errs = [rms(m) for m in (2, 4, 8, 16, 32)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 2 * errs[-1]
    # the exact pinv is not monotone in between (A is ill-conditioned at some m), but coarse vs fine holds
    assert rms(32, pinv="exact") < rms(4, pinv="exact") / 10


def test_implied_probs():
    q, k, v = rand_qkv(tq=12, hkv=2, seed=4)
    out, probs = _exact(q, k)(q, k, v, need_probs=True)
    _, dense_probs = dense_attention(q.double(), repeat_kv(k.double(), 2), repeat_kv(v.double(), 2))
    assert probs.shape == (2, 4, 12, 12) and max_err(probs, dense_probs) < 2e-5
    q, k, v = rand_qkv(tq=40, hkv=2, seed=4)  # approximate regime: out is exactly probs @ v
    out, probs = make("nystrom", q, k, num_landmarks=8)(q, k, v, need_probs=True)
    assert max_err(out, probs @ repeat_kv(v, 2)) < 1e-5
    assert max_err(probs.sum(-1), torch.ones(())) < 0.1  # rows of F pinv(A) B sum to ~1, not exactly


def test_conv_is_trainable_residual():
    q, k, v = rand_qkv(tq=20, seed=6)
    base = make("nystrom", q, k, num_landmarks=5)
    assert list(base.parameters()) == []  # off by default: nothing that breaks the exact limit
    method = make("nystrom", q, k, num_landmarks=5, conv_kernel=3)
    assert method.conv.weight.shape == (4, 1, 3, 1) and "conv.weight" in method.state_dict()
    with torch.no_grad():
        method.conv.weight.zero_()
    torch.testing.assert_close(method(q, k, v)[0], base(q, k, v)[0])
    with torch.no_grad():
        method.conv.weight.zero_()
        method.conv.weight[:, :, 1] = 1.0  # centre tap: residual is v itself
    torch.testing.assert_close(method(q, k, v)[0], base(q, k, v)[0] + v)
    method(q, k, v)[0].sum().backward()
    assert method.conv.weight.grad.abs().max() > 0


def _no_compute(method):
    method._attend = lambda *a, **kw: pytest.fail("_attend ran for a request that should be refused")
    return method




@pytest.mark.parametrize("padded", [False, True])
def test_precision_input_keeps_the_query_side_in_bf16(padded):
    """precision='input': bf16 F and F X, fp32 B side and pinv. Exact limit with padding within 2x dense's own
    bf16 error (measured 1.2-1.6x; B's side in bf16 was 13-24x, which is why it stays fp32); fp32 inputs give the
    default's output bit for bit; gradients reach q, k and v; at m << T (4096 tokens, 64 landmarks) it stays
    within 1.5x of the fp32 path's bf16 error against the same method in fp64."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 60, 32, generator=g, dtype=torch.float64) for _ in range(3))
    pad = torch.ones(2, 60, dtype=torch.bool)
    if padded:
        pad[1, 45:] = False
    want = reference(q, k, v, key_padding_mask=pad)
    dense_err = max_err(reference(*(x.bfloat16() for x in (q, k, v)), key_padding_mask=pad), want)
    low = make("nystrom", q, k, num_landmarks=64, pinv="exact", precision="input")
    out = low(*(x.bfloat16() for x in (q, k, v)), key_padding_mask=pad).out
    assert out.dtype == torch.bfloat16 and low.kernel == "torch[input]"
    assert max_err(out, want) < 2 * dense_err
    full = make("nystrom", q, k, num_landmarks=64, pinv="exact")
    f32 = [x.float() for x in (q, k, v)]
    assert torch.equal(low(*f32, key_padding_mask=pad).out, full(*f32, key_padding_mask=pad).out)
    qb, kb, vb = (x.bfloat16().requires_grad_() for x in (q, k, v))
    low(qb, kb, vb, key_padding_mask=pad).out.float().square().sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (qb, kb, vb))
    q, k, v = (torch.randn(1, 2, 4096, 64, generator=g, dtype=torch.float64) for _ in range(3))
    ref = make("nystrom", q, k, num_landmarks=64)(q, k, v).out
    errs = [max_err(make("nystrom", q, k, num_landmarks=64, precision=p)(*(x.bfloat16() for x in (q, k, v))).out, ref)
            for p in ("fp32", "input")]
    assert errs[1] < 1.5 * errs[0], errs


@pytest.mark.parametrize("precision", ["fp32", "input"])
@pytest.mark.parametrize("padded,t", [(False, 64), (True, 64), (True, 60)])
def test_token_chunks_change_nothing(monkeypatch, precision, padded, t):
    """From SPLIT_FROM tokens on the T-long products run as chunks (split-K: one m x D tile per head reducing over
    all T left most of the GPU idle). Chunked and whole agree in the output and every gradient, with padding,
    with T that the landmarks do not divide (segment means), and a landmark that holds only padding."""
    import attnlab.methods.nystrom as ny

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    q, k, v = (x.to(dtype) for x in rand_qkv(tq=t, seed=3))
    pad = None
    if padded:
        pad = torch.ones(q.shape[0], t, dtype=torch.bool)
        pad[0, -24:] = False  # the last landmarks of row 0 hold only padding
    m = make("nystrom", q, k, num_landmarks=8, precision=precision)

    def run(dt=dtype):
        qq, kk, vv = (x.to(dt).detach().clone().requires_grad_() for x in (q, k, v))
        out, _ = m(qq, kk, vv, key_padding_mask=pad)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [out.float()] + [x.grad.float() for x in (qq, kk, vv)]

    whole, truth = run(), run(torch.float32)
    monkeypatch.setattr(ny, "SPLIT_FROM", 16)
    monkeypatch.setattr(ny, "CHUNK", 16 if t % 16 == 0 else 15)  # 64 = 4 x 16, 60 = 4 x 15
    assert ny.token_chunks(t) == 4
    chunked = run()
    for a, b, ref in zip(whole, chunked, truth):
        assert torch.isfinite(b).all()
        if dtype == torch.float32:
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        else:  # bf16 sums in another order: as far from the fp32 result as the whole products (3-4% in dq, dk)
            err = lambda x: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
            assert err(b) <= 1.5 * err(a) + 1e-3, (err(b), err(a))
    if padded:
        assert (chunked[0][0, :, -24:] != 0).any()  # padded queries still get outputs; their keys got no weight
        assert chunked[3][0, :, -24:].abs().max() == 0  # no gradient reaches padded values


def test_token_chunks():
    from attnlab.methods.nystrom import token_chunks

    assert token_chunks(1024) == 1 and token_chunks(4096) == 4 and token_chunks(65536) == 64
    assert token_chunks(3000) == 1 and token_chunks(2048 + 64) == 33  # 2112 = 33 x 64
