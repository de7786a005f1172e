"""`dense` against an fp64 reference written independently here, and `sdpa` == `dense`."""
import math

import pytest
import torch

from tests.helpers import DTYPES, assert_matches_reference, make, max_err, rand_qkv


def naive(q, k, v, causal=False, kpm=None):
    """Loop-free but independent of attnlab.masks: fp64, explicit -inf, bottom-right causal."""
    q, k, v = (x.double() for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    tq, tk = s.shape[-2:]
    if causal:
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(tk - tq + 1), -math.inf)
    if kpm is not None:
        s = s.masked_fill(~kpm[:, None, None, :], -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (5, 9), (16, 16)])
def test_dense_and_sdpa_match_reference(dtype, causal, shape):
    tq, tk = shape
    q, k, v = rand_qkv(b=2, h=4, hkv=2, tq=tq, tk=tk, d=16, dtype=dtype, seed=tq * 31 + tk)
    ref = naive(q, k, v, causal=causal)
    for name in ("dense", "sdpa"):
        out, _ = make(name, q, k)(q, k, v, causal=causal)
        assert out.dtype == dtype and out.shape == q.shape
        assert_matches_reference(out, q, k, v, ref=ref, causal=causal)


def test_dense_probs_rows_sum_to_one_and_causal_zero():
    q, k, v = rand_qkv(tq=9)
    _, p = make("dense", q, k)(q, k, v, causal=True, need_probs=True)
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-6)
    assert (p.triu(1) == 0).all()


@pytest.mark.parametrize("name", ["dense", "sdpa"])
def test_float_and_bool_attn_mask(name):
    q, k, v = rand_qkv(tq=8)
    g = torch.Generator().manual_seed(3)
    allowed = torch.rand(8, 8, generator=g) > 0.4
    allowed[5] = False
    bias = torch.zeros(8, 8).masked_fill(~allowed, float("-inf"))
    m = make(name, q, k)
    a, _ = m(q, k, v, attn_mask=allowed)
    b, _ = m(q, k, v, attn_mask=bias)
    assert torch.isfinite(a).all() and (a[:, :, 5] == 0).all()
    assert max_err(a, b) < 1e-6
    assert_matches_reference(a, q, k, v, attn_mask=allowed)


