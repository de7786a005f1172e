"""window with backend="triton" (`ops.window_triton`), run on CPU by Triton's interpreter.

Checked against the fp64 dense reference under the window mask written out independently (test_window's
`window_mask`): forward, log-sum-exp, gradients (through out and lse), causal and not, sinks, Tq != Tk,
GQA, key padding with a fully padded row (zeros, no NaN), shapes that are not multiples of the tiles, bf16,
bit-exact causal no-leak, and the clear refusals. The same kernels run compiled on CUDA
(benchmarks/gpu_checks.py checks them there).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from attnlab import OptionError, UnsupportedError
from tests.helpers import assert_grads_agree, assert_matches_reference, grads, make, max_err, rand_qkv
from tests.methods.test_window import window_mask

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's CPU interpreter (conftest)"),
]


def _allowed(tq, tk, window, sinks, causal):
    m = window_mask(tq, tk, window, sinks)
    if causal:
        m = m & (torch.arange(tk)[None, :] <= torch.arange(tq)[:, None] + (tk - tq))
    return m


def _lse_reference(q, k, allowed, kpm, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    m = allowed.expand_as(s)
    if kpm is not None:
        m = m & kpm[:, None, None, :]
    return s.masked_fill(~m, float("-inf")).logsumexp(-1)


CASES = [  # (b, h, hkv, tq, tk, d, window, sinks, causal)
    (2, 2, 2, 37, 37, 16, 5, 0, True),
    (1, 2, 2, 50, 50, 24, 7, 3, False),
    (2, 2, 1, 20, 45, 16, 6, 2, True),  # Tq < Tk (bottom-right) and GQA
    (1, 6, 2, 30, 30, 16, 4, 1, False),  # GQA with two kv heads of three query heads each: the kernel's kv head index
    (1, 1, 1, 33, 33, 16, 100, 0, False),  # the exact limit: window >= T
    (1, 1, 1, 40, 40, 16, 3, 18, True),  # sinks spanning more than one tile
    (1, 1, 1, 48, 48, 16, 2, 40, False),  # sinks reaching above the band (non-causal: visible there too)
    (1, 1, 1, 40, 20, 16, 2, 3, False),  # Tq > Tk: the first rows' band is empty, the sinks are not
]


@pytest.mark.parametrize("b,h,hkv,tq,tk,d,window,sinks,causal", CASES)
def test_forward_lse_and_grads_match_the_reference(b, h, hkv, tq, tk, d, window, sinks, causal):
    q, k, v = rand_qkv(b=b, h=h, hkv=hkv, tq=tq, tk=tk, d=d, seed=tq + window)
    kpm = torch.ones(b, tk, dtype=torch.bool)
    kpm[0, -7:] = False
    m = make("window", q, k, window=window, sinks=sinks, backend="triton")
    allowed = _allowed(tq, tk, window, sinks, causal)
    res = m(q, k, v, causal=causal, key_padding_mask=kpm, need_lse=True)
    assert m.kernel == "triton"
    assert res.out.transpose(1, 2).is_contiguous()  # written as [B, Tq, H, D]: the caller's transpose back is free
    err = assert_matches_reference(res.out, q, k, v, attn_mask=allowed, key_padding_mask=kpm)
    k2, v2 = (x.repeat_interleave(h // hkv, 1) for x in (k, v))
    lse_ref = _lse_reference(q, k2, allowed, kpm, d ** -0.5)
    fin = lse_ref.isfinite()
    assert torch.equal(res.lse.isfinite(), fin)
    assert max_err(res.lse[fin], lse_ref[fin]) < 1e-5
    # gradients, through out and through lse, against torch's kernel of the same pattern (its own tests hold it
    # to the reference)
    w_lse = torch.randn(b, h, tq, generator=torch.Generator().manual_seed(5))

    def loss_fn(backend):
        mm = make("window", q, k, window=window, sinks=sinks, backend=backend)

        def fn(q, k, v):
            r = mm(q, k, v, causal=causal, key_padding_mask=kpm, need_lse=True)
            return r.out + (r.lse.masked_fill(~fin, 0) * w_lse)[..., None] / d
        return fn

    assert_grads_agree(loss_fn, q, k, v)
    print(f"window triton {tq}x{tk} w={window} s={sinks} causal={causal}: out {err:.1e}")


BAND_CASES = [  # (tq, tk, window, sinks, causal, padded, tiles): windows of several tiles, the band's mask in each
    (100, 100, 40, 0, True, False, (16, 16)),
    (100, 100, 40, 3, False, False, (16, 16)),
    (90, 120, 37, 0, True, True, (32, 16)),  # Tq < Tk, padding inside the band, query tiles twice the key tiles
    (120, 90, 33, 2, False, False, (16, 32)),  # Tq > Tk, key tiles twice the query tiles
    (97, 97, 50, 0, False, True, (32, 16)),
    (40, 20, 3, 0, True, False, (16, 16)),  # Tq > Tk without sinks: negative positions, the first rows' band empty
    (40, 20, 3, 0, False, False, (16, 16)),
    (33, 33, 0, 0, False, True, (16, 16)),  # window 0: each query its own key (padded ones: zeros)
]


@pytest.mark.parametrize("band", ["edges", "bounds", "rule"])
@pytest.mark.parametrize("tq,tk,window,sinks,causal,padded,tiles", BAND_CASES)
def test_band_masks_match_the_reference(monkeypatch, tq, tk, window, sinks, causal, padded, tiles, band):
    from attnlab.ops import window_triton

    monkeypatch.setattr(window_triton, "BAND", band)
    bm, bn = tiles
    monkeypatch.setattr(window_triton, "INTERPRETED", {**window_triton.INTERPRETED, "fwd": dict(BM=bm, BN=bn),
                                                      "dkdv": dict(BM=bm, BN=bn), "dq": dict(BM=bn, BN=bm)})
    q, k, v = rand_qkv(b=1, h=2, tq=tq, tk=tk, d=16, seed=tq + window)
    kpm = None
    if padded:
        kpm = torch.ones(1, tk, dtype=torch.bool)
        kpm[0, 5:9] = False  # padded keys inside the band
        kpm[0, -6:] = False
    allowed = _allowed(tq, tk, window, sinks, causal)
    m = make("window", q, k, window=window, sinks=sinks, backend="triton")
    res = m(q, k, v, causal=causal, key_padding_mask=kpm, need_lse=True)
    assert_matches_reference(res.out, q, k, v, attn_mask=allowed, key_padding_mask=kpm)
    lse_ref = _lse_reference(q, k, allowed, kpm, 16 ** -0.5)
    fin = lse_ref.isfinite()
    assert torch.equal(res.lse.isfinite(), fin) and max_err(res.lse[fin], lse_ref[fin]) < 1e-5

    def loss_fn(backend):
        mm = make("window", q, k, window=window, sinks=sinks, backend=backend)
        return lambda q, k, v: mm(q, k, v, causal=causal, key_padding_mask=kpm).out
    assert_grads_agree(loss_fn, q, k, v)


@pytest.mark.parametrize("causal,shift,band", [(c, s, "edges") for c in (True, False) for s in (0, 7, 30)]
                         + [(c, 7, band) for c in (True, False) for band in ("bounds", "rule")])
def test_band_edges_at_every_window_residue(monkeypatch, causal, shift, band):
    """Every window length modulo the 16-token tiles, at three query/key offsets: each of the band mask's bounds
    (forward, dq and dk / dv programs) falls at every place in a tile in some case, where a bound one token off
    would show a pair the window hides (or hide one it shows), and so does each edge of the keys a query tile sees
    whole ("edges": a tile inside them runs unmasked; one token off unmasks a tile that hides a pair). The mask on
    every band tile ("bounds") and the first kernel's ("rule") too."""
    from attnlab.ops import window_triton

    monkeypatch.setattr(window_triton, "BAND", band)
    torch.manual_seed(shift)
    tq = 48
    tk = tq + shift
    q, k, v = (torch.randn(1, 1, t, 16, dtype=torch.float64) for t in (tq, tk, tk))
    g = torch.randn(1, 1, tq, 16, dtype=torch.float64)
    from attnlab.ops.window_triton import window_attention

    for window in range(16, 32):
        allowed = _allowed(tq, tk, window, 0, causal)
        qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
        s = (qr @ kr.transpose(-1, -2) * 16 ** -0.5).masked_fill(~allowed, float("-inf"))
        ref = s.softmax(-1) @ vr
        ref.backward(g)
        qt, kt, vt = (x.float().requires_grad_(True) for x in (q, k, v))
        out, _ = window_attention(qt, kt, vt, window=window, causal=causal)
        out.backward(g.float())
        for name, a, r in (("out", out, ref), ("dq", qt.grad, qr.grad), ("dk", kt.grad, kr.grad),
                           ("dv", vt.grad, vr.grad)):
            assert max_err(a, r) < 2e-5, (window, name, max_err(a, r))


@pytest.mark.parametrize("scale", [-0.3, 0.0, 1e-46])
def test_non_positive_scales_match_the_reference(scale):
    """The kernels take max(s) * scale for the max of the scaled scores (the scale folded into exp2's FMA), true for
    a positive scale: a negative one runs as -q with -scale, zero (or one that is zero in fp32) as a zero q (uniform
    weights over the band)."""
    q, k, v = rand_qkv(b=1, h=2, tq=40, tk=40, d=16, seed=5)
    allowed = _allowed(40, 40, 20, 2, True)
    m = make("window", q, k, window=20, sinks=2, backend="triton")
    out = m(q, k, v, causal=True, scale=scale).out
    assert_matches_reference(out, q, k, v, attn_mask=allowed, scale=scale)

    def loss_fn(backend):
        mm = make("window", q, k, window=20, sinks=2, backend=backend)
        return lambda q, k, v: mm(q, k, v, causal=True, scale=scale).out
    assert_grads_agree(loss_fn, q, k, v)


def test_backward_launches_give_the_same_bits(monkeypatch):
    """The backward's dk, dv and dq programs in one launch, in two (each kind compiled alone) or on two streams (one
    after the other here): each program computes the same, so the gradients are equal bit for bit (sinks in chunks,
    grouped kv heads); and the rule picks two launches from 2^20 query rows."""
    from attnlab.ops import window_triton

    monkeypatch.setattr(window_triton, "SINK_CHUNK_TILES", 1)
    q, k, v = rand_qkv(b=1, h=4, hkv=2, tq=40, tk=70, d=16, seed=9)  # fewer query tiles than key tiles
    g = torch.randn_like(q)
    for causal in (True, False):
        got = {}
        for mode in ("one", "two", "streams"):
            monkeypatch.setattr(window_triton, "BWD_LAUNCHES", mode)
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            out, _ = window_triton.window_attention(*leaves, window=20, sinks=3, causal=causal)
            got[mode] = torch.autograd.grad(out, leaves, g)
        assert all(torch.equal(a, b) for m in ("two", "streams") for a, b in zip(got["one"], got[m])), causal
    monkeypatch.setattr(window_triton, "BWD_LAUNCHES", "auto")
    assert window_triton.bwd_launches(16 * 65536) == "two" and window_triton.bwd_launches(16 * 65536 - 1) == "one"


SINK_CASES = [  # (tq, tk, window, sinks, causal, padded)
    (100, 100, 20, 3, True, False),
    (100, 100, 20, 20, False, True),  # sinks over two 16-token tiles, padding among them
    (60, 90, 10, 5, False, False),  # Tq < Tk
    (90, 60, 10, 5, True, False),  # Tq > Tk: the first 30 queries see nothing (causal)
    (70, 40, 10, 20, False, False),  # Tq > Tk, not causal: the first queries see only the sinks
    (100, 100, 5, 40, False, False),  # the third sink tile's band starts past query 0: queries before it see it
]


@pytest.mark.parametrize("case,chunk_tiles,tiles", [(c, 1, (16, 16)) for c in SINK_CASES]
                         + [(SINK_CASES[i], 3, (16, 16)) for i in (1, 3)]  # chunks that hold the band too
                         + [(SINK_CASES[i], 1, (32, 16)) for i in (0, 4)])  # query tiles twice the key tiles
def test_sink_tiles_backward_in_chunks(monkeypatch, case, chunk_tiles, tiles):
    """A sink tile's dk, dv: its band's queries in its `_bwd` program, the rest from `_bwd_prep`'s programs (which
    write delta first and read it back) in chunks of `SINK_CHUNK_TILES` query tiles (several chunks here, and chunks that hold the band itself; query tiles twice the
    key tiles too), batch 2 with grouped kv heads, against the PyTorch form's gradients and the fp64 reference's
    output."""
    from attnlab.ops import window_triton

    tq, tk, window, sinks, causal, padded = case
    monkeypatch.setattr(window_triton, "SINK_CHUNK_TILES", chunk_tiles)
    bm, bn = tiles
    monkeypatch.setattr(window_triton, "INTERPRETED", {**window_triton.INTERPRETED, "fwd": dict(BM=16, BN=16),
                                                      "dkdv": dict(BM=bm, BN=bn), "dq": dict(BM=16, BN=16)})
    q, k, v = rand_qkv(b=2, h=2, hkv=1, tq=tq, tk=tk, d=16, seed=tq + sinks)
    kpm = None
    if padded:
        kpm = torch.ones(2, tk, dtype=torch.bool)
        kpm[0, 2] = False
        kpm[0, 17] = False
    m = make("window", q, k, window=window, sinks=sinks, backend="triton")
    out = m(q, k, v, causal=causal, key_padding_mask=kpm).out
    assert_matches_reference(out, q, k, v, attn_mask=_allowed(tq, tk, window, sinks, causal), key_padding_mask=kpm)

    def loss_fn(backend):
        mm = make("window", q, k, window=window, sinks=sinks, backend=backend)
        return lambda q, k, v: mm(q, k, v, causal=causal, key_padding_mask=kpm).out
    assert_grads_agree(loss_fn, q, k, v)


@pytest.mark.parametrize("sinks", [0, 3])
def test_lse_only_when_asked(monkeypatch, sinks):
    """need_lse=False returns no log-sum-exp (no scaling launch) and the same gradients, bit for bit, as asking for
    it and leaving it unused (whose gradient then comes as None: no zeros filled or read); the sink chunks' path
    (SINK_CHUNK_TILES = 1) and the plain delta pass both."""
    from attnlab.ops import window_triton

    monkeypatch.setattr(window_triton, "SINK_CHUNK_TILES", 1)
    q, k, v = rand_qkv(b=1, h=2, hkv=1, tq=70, tk=70, d=16, seed=21)

    def run(need_lse):
        qq, kk, vv = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        out, lse = window_triton.window_attention(qq, kk, vv, window=9, sinks=sinks, causal=True, need_lse=need_lse)
        out.backward(torch.ones_like(out))
        return lse, out, qq.grad, kk.grad, vv.grad

    lse, *without = run(False)
    lse2, *with_lse = run(True)
    assert lse is None and lse2 is not None and lse2.shape == (1, 2, 70)
    for a, b in zip(without, with_lse):
        assert torch.equal(a, b)


def test_fully_padded_row_gives_zeros_and_finite_grads():
    q, k, v = rand_qkv(b=2, h=2, tq=24, d=16, seed=4)
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[1] = False
    kpm[0, :10] = False  # window 3: queries 0..6 of batch 0 see only padded keys
    m = make("window", q, k, window=3, sinks=0, backend="triton")
    out = m(q, k, v, key_padding_mask=kpm).out
    assert out[1].abs().max() == 0 and out[0, :, :7].abs().max() == 0
    g = grads(lambda q, k, v: m(q, k, v, key_padding_mask=kpm).out, q, k, v)
    assert all(torch.isfinite(x).all() for x in g)
    assert g[0][1].abs().max() == 0 and g[2][1].abs().max() == 0


def test_bf16_within_tolerance():
    q, k, v = rand_qkv(b=1, h=2, tq=40, d=32, dtype=torch.bfloat16, seed=6)
    m = make("window", q, k, window=9, sinks=2, backend="triton")
    out = m(q, k, v, causal=True).out
    assert out.dtype == torch.bfloat16
    assert_matches_reference(out, q, k, v, attn_mask=_allowed(40, 40, 9, 2, True))


def test_causal_no_leak_bit_exact():
    q, k, v = rand_qkv(b=1, h=2, tq=48, d=16, seed=7)
    m = make("window", q, k, window=10, sinks=2, backend="triton")
    base = m(q, k, v, causal=True).out
    t = 29
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1:] += 5.0
    v2[:, :, t + 1:] -= 3.0
    out = m(q, k2, v2, causal=True).out
    assert torch.equal(out[:, :, : t + 1], base[:, :, : t + 1])
    assert not torch.equal(out[:, :, t + 1:], base[:, :, t + 1:])


def test_refusals_are_one_clear_line(monkeypatch):
    q, k, v = rand_qkv(b=1, h=2, tq=16, d=16)
    q64, k64, v64 = (x.double() for x in (q, k, v))
    with pytest.raises(UnsupportedError, match="runs fp32, bf16 and fp16"):
        make("window", q64, k64, window=3, backend="triton")(q64, k64, v64)
    out = make("window", q, k, window=2 ** 31 - 1, backend="triton")(q, k, v).out  # a window past int32 sums
    assert_matches_reference(out, q, k, v)
    with pytest.raises(OptionError, match="backend must be one of"):
        make("window", q, k, window=3, backend="cuda")
    with pytest.raises(UnsupportedError, match="col_sums"):
        make("window", q, k, window=3, backend="triton")(q, k, v, need_col_sums=True)
    from attnlab.ops import triton_common

    monkeypatch.setattr(triton_common, "interpreted", lambda: False)  # the kernels' shared device check
    with pytest.raises(UnsupportedError, match="runs on CUDA"):
        make("window", q, k, window=3, backend="triton")(q, k, v)


def test_register_cap_only_on_cuda_builds(monkeypatch):
    """The forward's register cap (`maxnreg`, a launch setting of Triton's CUDA backend only: its HIP backend raises
    on it) is passed on CUDA builds of torch and left out on ROCm ones; the other settings are the same."""
    from attnlab.ops import window_triton

    monkeypatch.setattr(window_triton, "interpreted", lambda: False)
    monkeypatch.setattr(torch.version, "hip", None)
    cuda = window_triton._config("fwd", 64)
    assert cuda["maxnreg"] == 128 and cuda is window_triton.CONFIG["fwd"]
    monkeypatch.setattr(torch.version, "hip", "6.2")
    rocm = window_triton._config("fwd", 64)
    assert "maxnreg" not in rocm and rocm == {k: v for k, v in cuda.items() if k != "maxnreg"}


def test_kv_heads_that_do_not_divide_the_query_heads_are_refused():
    from attnlab.ops.window_triton import window_attention

    q, _, _ = rand_qkv(b=1, h=6, tq=16, d=16, seed=1)
    _, k, v = rand_qkv(b=1, h=4, tq=16, d=16, seed=2)
    with pytest.raises(ValueError, match="divide the query heads"):
        window_attention(q, k, v, window=3)


@pytest.mark.parametrize("sinks", [0, 3])
def test_output_gradient_read_in_its_own_layout(monkeypatch, sinks):
    """The output is written as [B, Tq, H, D] memory, and the gradient coming back (transformers: through the
    adapter's transpose; the bench: randn_like(out)) is read where it lies, in that layout or any other with unit
    last stride, with no copy: the same dq, dk, dv bit for bit as from a contiguous gradient (sink tiles in chunks
    too: 2 query tiles a chunk). A kernel reading the gradient with the wrong strides fails."""
    from attnlab.ops import window_triton

    monkeypatch.setattr(window_triton, "SINK_CHUNK_TILES", 2)
    q, k, v = rand_qkv(b=2, h=4, hkv=2, tq=90, tk=90, d=16, seed=31)
    m = make("window", q, k, window=20, sinks=sinks, backend="triton")
    g = torch.randn(2, 4, 90, 16, generator=torch.Generator().manual_seed(6))
    layouts = {"contiguous": g.contiguous(), "out's": g.transpose(1, 2).contiguous().transpose(1, 2),
               "every other row": torch.stack([g, g], 3).flatten(2, 3)[:, :, ::2]}
    got = {}
    for name, grad in layouts.items():
        xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        out = m(*xs, causal=True).out
        got[name] = torch.autograd.grad(out, xs, grad)
    for name in ("out's", "every other row"):  # the contiguous gradient's path: the reference tests above
        for a, b in zip(got[name], got["contiguous"]):
            assert torch.equal(a, b), name
