"""window: sliding-window attention (+ sinks) vs the dense fp64 reference under the equivalent bool mask, written
out independently. Generic checks (exact limit, causal, padding, GQA, state, options) are in the conformance
suite."""
from __future__ import annotations

import pytest
import torch

from attnlab import UnsupportedError
from attnlab.ops import sparse
from tests.helpers import assert_matches_reference, grads, make, max_err, rand_qkv, reference

# One shape for every flex test, so the compiled kernels are shared between them.
FLEX_SHAPE = dict(b=2, h=2, tq=37, d=16)


def window_mask(tq, tk, window, sinks=0):
    """The pattern written out independently: |pos(i) - j| <= window or j < sinks, pos(i) = i + Tk - Tq."""
    pos = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    return ((pos - j).abs() <= window) | (j < sinks)


@pytest.mark.flex
def test_exact_limit_flex_fp32():
    q, k, v = rand_qkv(**FLEX_SHAPE, seed=2)
    with torch.no_grad():
        out, _ = make("window", q, k, window=40, backend="flex")(q, k, v)
    err = assert_matches_reference(out, q, k, v)
    print(f"window flex exact limit fp32: {err:.2e}")


@pytest.mark.flex
def test_flex_padding_pattern_and_empty_rows():
    # Same structure as the exact-limit flex test (non-causal, no sinks) plus padding: one more compile.
    q, k, v = rand_qkv(**FLEX_SHAPE, seed=3)
    kpm = torch.ones(2, 37, dtype=torch.bool)
    kpm[1, :12] = False  # left padding: with window 3, queries 0..8 of batch 1 see only padded keys
    with torch.no_grad():
        out, _ = make("window", q, k, window=3, backend="flex")(q, k, v, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert out[1, :, :9].abs().max() == 0
    assert_matches_reference(out, q, k, v, attn_mask=window_mask(37, 37, 3), key_padding_mask=kpm)


@pytest.mark.flex
def test_flex_gqa_reads_the_kv_heads_itself():
    # k, v keep their one kv head into flex (enable_gqa, no expanded copies): each query head must read it
    q, _, _ = rand_qkv(**FLEX_SHAPE, seed=5)
    _, k, v = rand_qkv(**{**FLEX_SHAPE, "h": 1}, seed=6)
    kpm = torch.ones(2, 37, dtype=torch.bool)
    kpm[0, 30:] = False
    with torch.no_grad():
        m = make("window", q, k, window=3, sinks=2, backend="flex")
        out, _ = m(q, k, v, causal=True, key_padding_mask=kpm)
    assert m.kernel == "flex"
    causal = torch.ones(37, 37, dtype=torch.bool).tril()
    assert_matches_reference(out, q, k.expand_as(q), v.expand_as(q), attn_mask=window_mask(37, 37, 3, 2) & causal,
                             key_padding_mask=kpm)


@pytest.mark.parametrize(
    "window,sinks,tq,tk,causal",
    [
        (3, 0, 37, 37, False),
        (3, 2, 37, 37, True),
        (0, 1, 37, 37, True),  # window 0: each query sees itself and the sink
        (5, 3, 17, 29, True),  # Tq < Tk: bottom-right alignment (KV-cache decoding)
        (4, 0, 29, 17, True),  # Tq > Tk: the first 12 queries see nothing -> zeros
        (5, 0, 17, 29, False),
        (5, 3, 150, 150, True),  # several 64-query chunks: band edges and sinks before the band
        (70, 2, 151, 151, False),  # window > 64: chunk = window
    ],
)
def test_pattern_matches_dense_with_mask(window, sinks, tq, tk, causal):
    q, k, v = rand_qkv(b=1, h=2, tq=tq, tk=tk, seed=4)
    out, _ = make("window", q, k, window=window, sinks=sinks, backend="torch")(q, k, v, causal=causal)
    assert_matches_reference(out, q, k, v, attn_mask=window_mask(tq, tk, window, sinks), causal=causal)


def test_pattern_bf16():
    q, k, v = rand_qkv(tq=101, dtype=torch.bfloat16, seed=5)
    out, _ = make("window", q, k, window=7, sinks=2, backend="torch")(q, k, v, causal=True)
    err = assert_matches_reference(out, q, k, v, attn_mask=window_mask(101, 101, 7, 2), causal=True)
    print(f"window torch pattern bf16: {err:.2e}")


def test_window_actually_drops_far_keys():
    q, k, v = rand_qkv(tq=40, seed=6)
    out, _ = make("window", q, k, window=3, backend="torch")(q, k, v)
    assert max_err(out, reference(q, k, v)) > 1e-2  # a test that could not tell window from dense is useless


def test_need_probs():
    q, k, v = rand_qkv(tq=23, seed=7)
    kpm = torch.ones(2, 23, dtype=torch.bool)
    kpm[0, -4:] = False
    out, probs = make("window", q, k, window=4, sinks=1)(q, k, v, causal=True, key_padding_mask=kpm, need_probs=True)
    allowed = window_mask(23, 23, 4, 1) & torch.ones(23, 23, dtype=torch.bool).tril() & kpm[:, None, None, :]
    assert probs.shape == (2, 4, 23, 23)
    assert probs.masked_select(~allowed.expand_as(probs)).abs().max() == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 23))
    assert_matches_reference(out, q, k, v, attn_mask=window_mask(23, 23, 4, 1), causal=True, key_padding_mask=kpm)


def test_key_padding_matches_unpadded_and_empty_rows_are_zero():
    q, k, v = rand_qkv(tq=80, seed=9)
    m = make("window", q, k, window=5, sinks=1, backend="torch")
    # right padding on batch 1: real outputs must equal running the unpadded 60 tokens alone
    kpm = torch.ones(2, 80, dtype=torch.bool)
    kpm[1, 60:] = False
    out, _ = m(q, k, v, causal=False, key_padding_mask=kpm)
    alone, _ = m(q[1:, :, :60], k[1:, :, :60], v[1:, :, :60], causal=False)
    torch.testing.assert_close(out[1, :, :60], alone[0], rtol=0, atol=1e-6)
    # left padding longer than the window: the padded queries see nothing; the sink is the row's first real key,
    # so the real queries equal the row alone (StreamingLLM's sinks are a sequence's first tokens)
    kpm = torch.ones(2, 80, dtype=torch.bool)
    kpm[0, :20] = False
    for causal in (True, False):
        out, _ = m(q, k, v, causal=causal, key_padding_mask=kpm)
        assert torch.isfinite(out).all()
        assert out[0, :, :20].abs().max() == 0
        alone, _ = m(q[:1, :, 20:], k[:1, :, 20:], v[:1, :, 20:], causal=causal)
        torch.testing.assert_close(out[0, :, 20:], alone[0], rtol=0, atol=1e-6)
        mask = torch.zeros(2, 1, 80, 80, dtype=torch.bool)
        mask[0, 0, 20:, 20:], mask[1, 0] = window_mask(60, 60, 5, 1), window_mask(80, 80, 5, 1)
        assert_matches_reference(out[1:], q[1:], k[1:], v[1:], attn_mask=mask[1:], causal=causal)
        assert_matches_reference(out[:, :, 20:], q[:, :, 20:], k, v, attn_mask=mask[:, :, 20:], causal=causal,
                                 key_padding_mask=kpm)


def test_single_token_and_gqa():
    q, k, v = rand_qkv(tq=1, seed=10)
    out, _ = make("window", q, k, window=0, backend="torch")(q, k, v, causal=True)
    assert_matches_reference(out, q, k, v, causal=True)
    q, k, v = rand_qkv(h=4, hkv=2, tq=1, tk=30, seed=11)  # one decoding step against a cache, GQA
    out, _ = make("window", q, k, window=4, sinks=2, backend="torch")(q, k, v, causal=True)
    assert_matches_reference(out, q, k, v, attn_mask=window_mask(1, 30, 4, 2), causal=True)
    q, k, v = rand_qkv(h=6, hkv=2, tq=45, seed=12)
    out, _ = make("window", q, k, window=5, backend="torch")(q, k, v, causal=True)
    assert_matches_reference(out, q, k, v, attn_mask=window_mask(45, 45, 5), causal=True)


@pytest.mark.parametrize("window", [33, 4])
def test_gradients_match_dense(window):
    q, k, v = rand_qkv(tq=33, h=4, hkv=2, seed=13)
    m = make("window", q, k, window=window, sinks=1, backend="torch")
    dense = make("dense", q, k)
    mask = window_mask(33, 33, window, 1)
    got = grads(lambda q, k, v: m(q, k, v, causal=True)[0], q, k, v)
    want = grads(lambda q, k, v: dense(q, k, v, causal=True, attn_mask=mask)[0], q, k, v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_flex_unavailable_is_a_clear_error_before_compute(monkeypatch):
    q, k, v = rand_qkv()
    m = make("window", q, k, window=3, backend="flex")

    def boom(*a, **kw):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(sparse, "compiled_flex_attention", boom)
    monkeypatch.setattr(sparse, "TORCH_VERSION", (2, 4))
    with pytest.raises(UnsupportedError, match="torch >= 2.6"):
        m(q, k, v)
    monkeypatch.setattr(sparse, "TORCH_VERSION", (2, 13))
    q.requires_grad_(True)  # CPU flex is inference-only: refuse instead of failing inside inductor
    with pytest.raises(UnsupportedError, match="inference-only"):
        m(q, k, v)


