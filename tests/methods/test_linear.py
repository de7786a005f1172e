"""linear: the chunked / one-pass forms equal the method's own quadratic form (its exact limit)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab
from tests.helpers import check_vs_quadratic, grads, make, max_err, rand_qkv


def quadratic(m, q, k, v, **kw):
    """The implied-matrix path of the same module (need_probs=True)."""
    return m(q, k, v, need_probs=True, **kw)[0]


def test_quadratic_form_is_the_paper_formula():
    # independent of the core: elu(x)+1 features, masked, normalised, by hand in fp64
    q, k, v = rand_qkv(b=1, h=2, tq=5, tk=7, d=4, dtype=torch.float64)
    m = make("linear", q, k)
    out, probs = m(q, k, v, causal=True, need_probs=True)
    s = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)  # (B, H, 5, 7)
    s = s.masked_fill(~torch.ones(5, 7, dtype=torch.bool).tril(2), 0.0)  # bottom-right: query i sees j <= i + 2
    want = s / s.sum(-1, keepdim=True)
    torch.testing.assert_close(probs, want)
    torch.testing.assert_close(out, want @ v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,chunk", [(32, 8), (33, 8), (17, 64), (1, 4), (45, 16)])
def test_matches_quadratic(dtype, feature_map, causal, t, chunk):
    q, k, v = rand_qkv(b=2, h=2, tq=t, d=8, dtype=dtype, seed=t)
    m = make("linear", q, k, feature_map=feature_map, chunk_size=chunk)
    out, probs = m(q, k, v, causal=causal)
    assert probs is None and out.dtype == dtype and out.shape == q.shape
    check_vs_quadratic(out, q, k, v, m, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,tq,tk", [(True, 5, 23), (True, 1, 9), (True, 23, 5), (False, 7, 19), (False, 19, 7)])
def test_cross_lengths(dtype, causal, tq, tk):
    # causal with Tq != Tk is bottom-right aligned (decode); Tq > Tk leaves the first rows with no key
    q, k, v = rand_qkv(b=2, h=2, tq=tq, tk=tk, d=8, dtype=dtype, seed=tq + tk)
    m = make("linear", q, k, chunk_size=4)
    out, _ = m(q, k, v, causal=causal)
    check_vs_quadratic(out, q, k, v, m, causal=causal)
    if causal and tq > tk:
        assert (out[:, :, : tq - tk] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_gqa(causal):
    q, k, v = rand_qkv(b=2, h=4, hkv=2, tq=13, d=8)
    m = make("linear", q, k, chunk_size=4)
    out, _ = m(q, k, v, causal=causal)
    check_vs_quadratic(out, q, k, v, m, causal=causal)
    # each kv head serves 2 query heads: same as running on explicitly repeated k, v
    full = make("linear", q, q, chunk_size=4)
    torch.testing.assert_close(out, full(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=causal)[0])


@pytest.mark.parametrize("causal", [False, True])
def test_key_padding(causal):
    q, k, v = rand_qkv(b=3, h=2, tq=11, d=8, seed=3)
    lens = [11, 6, 0]  # row 2: every key padded
    kpm = torch.arange(11)[None, :] < torch.tensor(lens)[:, None]  # (B, Tk)
    pad = ~kpm[:, None, :, None]
    k, v = k.masked_fill(pad, 1e3), v.masked_fill(pad, 1e3)  # garbage in padded slots must not matter
    m = make("linear", q, k, chunk_size=4)
    out, _ = m(q, k, v, causal=causal, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    check_vs_quadratic(out, q, k, v, m, causal=causal, key_padding_mask=kpm)
    assert (out[2] == 0).all()  # no real key: exact zeros, never NaN
    # real query positions equal the unpadded run (causal: queries < len; non-causal: all queries)
    n = lens[1]
    alone, _ = m(q[1:2, :, :n] if causal else q[1:2], k[1:2, :, :n], v[1:2, :, :n], causal=causal)
    got = out[1:2, :, :n] if causal else out[1:2]
    torch.testing.assert_close(got, alone, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_quadratic(causal):
    q, k, v = rand_qkv(b=1, h=2, tq=19, d=8, dtype=torch.float64, seed=5)
    m = make("linear", q, k, chunk_size=4)
    kpm = torch.ones(1, 19, dtype=torch.bool)
    kpm[0, -3:] = False
    g_fast = grads(lambda a, b, c: m(a, b, c, causal=causal, key_padding_mask=kpm)[0], q, k, v)
    g_quad = grads(lambda a, b, c: quadratic(m, a, b, c, causal=causal, key_padding_mask=kpm), q, k, v)
    for a, b in zip(g_fast, g_quad):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    g32 = grads(lambda a, b, c: m(a, b, c, causal=causal)[0], q.float(), k.float(), v.float())
    g64 = grads(lambda a, b, c: quadratic(m, a, b, c, causal=causal), q, k, v)
    for a, b in zip(g32, g64):
        assert max_err(a, b) < 1e-5


def test_causal_no_leak():
    q, k, v = rand_qkv(b=2, h=2, tq=29, d=8, seed=7)
    m = make("linear", q, k, chunk_size=8)
    out, _ = m(q, k, v, causal=True)
    for t in (0, 7, 8, 20):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t + 1 :] = torch.randn_like(k2[:, :, t + 1 :]) * 5
        v2[:, :, t + 1 :] = torch.randn_like(v2[:, :, t + 1 :]) * 5
        out2, _ = m(q, k2, v2, causal=True)
        assert max_err(out[:, :, : t + 1], out2[:, :, : t + 1]) < 1e-6
        assert max_err(out[:, :, t + 1 :], out2[:, :, t + 1 :]) > 1e-2  # the change does reach later rows


def test_probs_are_a_distribution():
    q, k, v = rand_qkv(b=1, h=2, tq=9, d=8)
    out, probs = make("linear", q, k)(q, k, v, causal=True, need_probs=True)
    assert probs.shape == (1, 2, 9, 9) and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 9))
    assert (probs.triu(1) == 0).all()
    torch.testing.assert_close(out, probs @ v)


def test_scale_is_ignored():
    q, k, v = rand_qkv(b=1, h=2, tq=9, d=8)
    m = make("linear", q, k)
    torch.testing.assert_close(m(q, k, v, scale=0.01)[0], m(q, k, v, scale=3.0)[0], atol=0, rtol=0)


def test_relu_zero_normaliser_gives_zeros():
    q, k, v = rand_qkv(b=1, h=1, tq=4, d=8)
    q = -q.abs()  # all relu features of q are 0: normaliser exactly 0
    out, _ = make("linear", q, k, feature_map="relu")(q, k, v)
    assert (out == 0).all()


def test_errors():
    q, k, v = rand_qkv(b=1, h=2, tq=4, d=8)
    m = make("linear", q, k)
    with pytest.raises(attnlab.UnsupportedError, match="attn_mask"):
        m(q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(attnlab.OptionError, match="feature_map"):
        make("linear", q, k, feature_map="tanh")
    with pytest.raises(attnlab.OptionError, match="chunk_size"):
        make("linear", q, k, chunk_size=0)


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_causal_earlier_outputs_bit_identical_when_future_changes(feature_map):
    # Exact, not approximately: an exclusive prefix computed as (inclusive - own chunk) rounds differently
    # when a later chunk changes (it leaked ~1e-7 on CUDA); the shifted inclusive prefix does not.
    q, k, v = rand_qkv(b=2, h=2, tq=96, d=8, seed=5)
    m = make("linear", q, k, feature_map=feature_map, chunk_size=8)
    out, _ = m(q, k, v, causal=True)
    for t0 in (7, 8, 30, 64):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t0 + 1:] = k2[:, :, t0 + 1:] * 3.7 + 1.3
        v2[:, :, t0 + 1:] = v2[:, :, t0 + 1:] * -2.1 + 0.7
        out2, _ = m(q, k2, v2, causal=True)
        assert torch.equal(out[:, :, : t0 + 1], out2[:, :, : t0 + 1]), t0
