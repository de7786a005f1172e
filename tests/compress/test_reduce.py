"""The `reduce` method: n rows in, ceil(ratio * n) rows out (the conformance suite covers its exact limit, padding,
bf16, gradients and state; these check what is its own)."""
import math

import pytest
import torch

import attnlab
from attnlab.methods.reduce import out_length
from attnlab.types import OptionError, ShapeError, UnsupportedError
from tests.helpers import rand_qkv, reference

D = 8


def make(**opts):
    return attnlab.make("reduce", head_dim=D, num_heads=4, **opts)


@pytest.mark.parametrize("mixing", ["relative", "absolute"])
@pytest.mark.parametrize("ratio", [0.5, 1 / 3, 0.25, 0.125, 1.0, 2.0])
@pytest.mark.parametrize("n", [1, 7, 16, 33])
def test_shapes_for_every_length_and_ratio(n, ratio, mixing):
    m = make(ratio=ratio, mixing=mixing, max_len=33, radius=9, bias="distance")
    q, k, v = rand_qkv(b=2, h=4, hkv=4, tq=n, tk=n, d=D, seed=n)
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[1, n // 2 + 1:] = False
    out = m(q, k, v, key_padding_mask=kpm).out
    assert out.shape == (2, 4, out_length(n, ratio), D) and torch.isfinite(out).all()
    assert out_length(n, ratio) == max(1, math.ceil(n * ratio - 1e-9))
    # a masked key changes nothing
    junk = m(q, k.masked_fill(~kpm[:, None, :, None], 5.0), v.masked_fill(~kpm[:, None, :, None], 1e3),
             key_padding_mask=kpm).out
    torch.testing.assert_close(out, junk, atol=1e-5, rtol=1e-5)


def test_out_len_sets_one_calls_length():
    m = make(ratio=2.0, max_len=16, radius=4)
    q, k, v = rand_qkv(b=1, h=4, hkv=4, tq=8, tk=8, d=D)
    assert m(q, k, v).out.shape[2] == 16
    assert m(q, k, v, out_len=15).out.shape[2] == 15
    assert m(q, k, v).out.shape[2] == 16  # the override does not stick
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ShapeError, match="out_len"):
            m(q, k, v, out_len=bad)


def test_equals_the_papers_formula_at_max_len():
    """absolute mixing at n == max_len: softmax((W_S Q) K^T * scale) V with W_S the stored matrix, per head."""
    m = make(ratio=0.5, mixing="absolute", max_len=12, init="normal", seed=3)
    q, k, v = rand_qkv(b=2, h=4, hkv=4, tq=12, tk=12, d=D, dtype=torch.float64, seed=1)
    m = m.double()
    out = m(q, k, v).out
    qm = torch.einsum("hmn,bhnd->bhmd", m.W, q)
    torch.testing.assert_close(out, reference(qm, k, v), atol=1e-10, rtol=1e-10)
    # and its own implied-matrix form agrees
    res = m(q, k, v, need_probs=True)
    torch.testing.assert_close(res.out, out, atol=1e-10, rtol=1e-10)
    assert res.probs.shape == (2, 4, 6, 12)
    torch.testing.assert_close(res.probs.sum(-1), torch.ones(2, 4, 6, dtype=torch.float64))


def test_pool_init_rows_average_their_stretch_and_relative_is_translation_invariant():
    for mixing in ("relative", "absolute"):
        m = make(ratio=0.25, mixing=mixing, max_len=64, radius=4)
        w = m.mixing_matrix(16, 64)[0]
        inner = w[2:-2]  # away from the edges every row has mass 1
        torch.testing.assert_close(inner.sum(-1), torch.ones(len(inner)), atol=1e-5, rtol=0)
        assert (w[5].argmax() - 4 * 5).abs() <= 2  # centred on its own stretch
    rel = make(ratio=0.5, max_len=64, radius=4, init="normal")
    w = rel.mixing_matrix(20, 40)
    torch.testing.assert_close(w[:, 4, 4:30], w[:, 5, 6:32])  # one row later = two input rows later


def test_absolute_mixing_serves_shorter_inputs_by_area_resampling():
    m = make(ratio=0.5, mixing="absolute", max_len=32)
    full = m.mixing_matrix(16, 32)
    torch.testing.assert_close(full, m.W)
    half = m.mixing_matrix(8, 16)
    assert half.shape == (4, 8, 16)
    torch.testing.assert_close(half[:, 2:-2].sum(-1), full[:, 4:-4].sum(-1)[:, ::2], atol=1e-5, rtol=0)


def test_distance_bias_makes_heads_read_their_own_rows():
    """At init with bias="distance" and ratio 1/4, head h's attention peaks inside its quarter of the stretch."""
    m = make(ratio=0.25, max_len=64, radius=4, bias="distance")
    q = torch.zeros(1, 4, 64, D)
    k, v = torch.zeros(1, 4, 64, D), torch.randn(1, 4, 64, D)
    probs = m(q, k, v, need_probs=True).probs[0]  # [H, 16, 64]
    row = 7  # covers input rows 28..31
    peaks = probs[:, row].argmax(-1).tolist()
    assert peaks == [28, 29, 30, 31]


def test_errors_are_one_line_before_compute():
    q, k, v = rand_qkv(b=1, h=4, hkv=4, tq=20, tk=20, d=D)
    with pytest.raises(UnsupportedError, match="cannot do causal"):
        make(max_len=32)(q, k, v, causal=True)
    with pytest.raises(UnsupportedError, match="max_len=16"):
        make(max_len=16)(q, k, v)
    with pytest.raises(UnsupportedError, match="absolute W_S has 10 rows"):
        make(mixing="absolute", max_len=20)(q, k, v, out_len=12)
    with pytest.raises(OptionError, match="identity' needs ratio=1"):
        make(init="identity", ratio=0.5)
    with pytest.raises(OptionError, match="narrower than the stretch"):
        make(ratio=0.125, radius=2)
    with pytest.raises(OptionError, match="ratio must be"):
        make(ratio=0.0)
