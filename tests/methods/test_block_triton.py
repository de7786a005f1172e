"""Block patterns (alone, or united with a window and sinks: global_sparse's shape) through the Triton kernels
(`ops.window_triton` with block tables), run on CPU by Triton's interpreter.

Checked against the fp64 dense reference under a mask written out here from the layout, the window and the sinks
(not the pattern's own mask_mod): forward, log-sum-exp, gradients through out and lse (against the torch kernel of
the same pattern), causal and not, per-head and shared layouts, GQA, lengths that are not a multiple of the block,
key padding with a fully padded row (zeros, no NaN), bf16, bit-exact causal no-leak, the global_sparse method on
it, and the refusals. benchmarks/gpu_checks.py runs the same kernels compiled on CUDA.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from attnlab import UnsupportedError
from attnlab.ops import sparse as sparse_ops
from attnlab.patterns import BlockPattern, UnionPattern, WindowPattern
from tests.helpers import assert_grads_agree, assert_matches_reference, grads, make, max_err, rand_qkv
from tests.methods.test_window_triton import pytestmark  # noqa: F401 (the interpreter's marks)


def _layout(heads, nb, seed, density=0.35):
    g = torch.Generator().manual_seed(seed)
    lay = torch.rand(heads, nb, nb, generator=g) < density
    return lay | torch.eye(nb, dtype=torch.bool)  # the diagonal, as global_sparse keeps it


def _allowed(layout, bs, t, window, sinks, causal):
    """Bool[H|1, T, T] written out from the definitions: the layout's blocks, |i - j| <= window, j < sinks."""
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    m = layout[:, i // bs, j // bs]
    if window >= 0:
        m = m | ((i - j).abs() <= window)
    m = m | (j < sinks)
    if causal:
        m = m & (j <= i)
    return m


def _pattern(layout, bs, window, sinks):
    blk = BlockPattern(layout if layout.shape[0] > 1 else layout[0], bs)
    return blk if window < 0 and not sinks else UnionPattern(blk, WindowPattern(max(window, 0), sinks))


def _run(pattern, q, k, v, *, causal, kpm=None, backend="triton", need_lse=True):
    res, kernel = sparse_ops.sparse_attention(q, k, v, pattern, causal=causal, key_padding_mask=kpm,
                                              scale=q.shape[-1] ** -0.5, backend=backend, need_lse=need_lse)
    return res, kernel


CASES = [  # (b, h, hkv, t, d, heads of the layout, window, sinks, causal, block size)
    (2, 2, 2, 40, 16, 2, 15, 4, True, 16),  # global_sparse's shape: per-head blocks, a band of one block, sinks
    (1, 2, 2, 48, 16, 1, 15, 0, False, 16),  # a shared layout, not causal
    (1, 4, 2, 37, 16, 4, 15, 2, True, 16),  # GQA and a length that is not a multiple of the block
    (1, 2, 2, 33, 24, 2, -1, 0, True, 16),  # the blocks alone (a plain BlockPattern)
    (1, 2, 1, 32, 16, 1, 3, 20, False, 16),  # sinks over more than one block, a narrow window
    (1, 2, 1, 70, 16, 2, 31, 4, True, 32),  # 32-token tiles, GQA, a partial last block
    (1, 1, 1, 130, 16, 1, 63, 2, False, 64),  # 64-token tiles (the measured patterns' size), not causal
]


@pytest.mark.parametrize("b,h,hkv,t,d,lh,window,sinks,causal,bs", CASES)
def test_forward_lse_and_grads_match_the_reference(b, h, hkv, t, d, lh, window, sinks, causal, bs):
    nb = -(-t // bs)
    layout = _layout(lh, nb, seed=t + lh)
    pat = _pattern(layout, bs, window, sinks)
    q, k, v = rand_qkv(b=b, h=h, hkv=hkv, tq=t, d=d, seed=t)
    kpm = torch.ones(b, t, dtype=torch.bool)
    kpm[0, -5:] = False
    res, kernel = _run(pat, q, k, v, causal=causal, kpm=kpm)
    assert kernel == "triton"
    allowed = _allowed(layout, bs, t, window, sinks, causal)
    err = assert_matches_reference(res.out, q, k, v, attn_mask=allowed[None], key_padding_mask=kpm)
    k2 = k.repeat_interleave(h // hkv, 1)
    s = (q.double() @ k2.double().transpose(-1, -2)) * d ** -0.5
    lse_ref = s.masked_fill(~(allowed[None] & kpm[:, None, None, :]), float("-inf")).logsumexp(-1)
    fin = lse_ref.isfinite()
    assert torch.equal(res.lse.isfinite(), fin)
    assert max_err(res.lse[fin], lse_ref[fin]) < 1e-5
    w_lse = torch.randn(b, h, t, generator=torch.Generator().manual_seed(5))

    def loss_fn(backend):
        def fn(q, k, v):
            r, _ = _run(pat, q, k, v, causal=causal, kpm=kpm, backend=backend)
            return r.out + (r.lse.masked_fill(~fin, 0) * w_lse)[..., None] / d
        return fn

    assert_grads_agree(loss_fn, q, k, v)
    print(f"block triton t={t} w={window} s={sinks} causal={causal}: out {err:.1e}")


def test_a_tile_the_layout_keeps_is_visible_whole_and_one_it_drops_only_by_the_window():
    """Two key tiles out of the band: the one the layout keeps changes the output, the one it drops does not."""
    bs, t = 16, 64
    layout = torch.zeros(1, 4, 4, dtype=torch.bool)
    layout[0, 3, 0] = True  # query block 3 keeps key block 0; key block 1 is dropped (and out of the band)
    pat = _pattern(layout, bs, 15, 0)
    q, k, v = rand_qkv(b=1, h=1, tq=t, d=16, seed=3)
    base, _ = _run(pat, q, k, v, causal=True)
    for blk, moves in ((0, True), (1, False)):
        v2 = v.clone()
        v2[:, :, blk * bs:(blk + 1) * bs] += 3.0
        out, _ = _run(pat, q, k, v2, causal=True)
        assert (not torch.equal(out.out[:, :, 48:], base.out[:, :, 48:])) == moves


def test_tables_follow_a_layout_changed_in_place():
    """The kernel's tables are cached per pattern version: set_blocks (a learned mask's step) must rebuild them."""
    bs, t = 16, 48
    layout = torch.zeros(1, 3, 3, dtype=torch.bool)
    layout[0] |= torch.eye(3, dtype=torch.bool)
    blk = BlockPattern(layout[0], bs)
    pat = UnionPattern(blk, WindowPattern(0, 0))
    q, k, v = rand_qkv(b=1, h=1, tq=t, d=16, seed=9)
    before, _ = _run(pat, q, k, v, causal=True, need_lse=False)
    layout[0, 2, 0] = True
    blk.set_blocks(layout[0])
    after, _ = _run(pat, q, k, v, causal=True, need_lse=False)
    assert not torch.equal(after.out[:, :, 32:], before.out[:, :, 32:])
    assert_matches_reference(after.out, q, k, v, attn_mask=_allowed(layout, bs, t, 0, 0, True)[None])


def test_fully_padded_row_gives_zeros_and_finite_grads():
    layout = _layout(1, 2, seed=1)
    pat = _pattern(layout, 16, 15, 0)
    q, k, v = rand_qkv(b=2, h=2, tq=32, d=16, seed=4)
    kpm = torch.ones(2, 32, dtype=torch.bool)
    kpm[1] = False
    out, _ = _run(pat, q, k, v, causal=True, kpm=kpm, need_lse=False)
    assert out.out[1].abs().max() == 0
    g = grads(lambda q, k, v: _run(pat, q, k, v, causal=True, kpm=kpm, need_lse=False)[0].out, q, k, v)
    assert all(torch.isfinite(x).all() for x in g)
    assert g[0][1].abs().max() == 0 and g[2][1].abs().max() == 0


def test_bf16_within_tolerance():
    layout = _layout(2, 3, seed=2)
    pat = _pattern(layout, 16, 15, 4)
    q, k, v = rand_qkv(b=1, h=2, tq=48, d=32, dtype=torch.bfloat16, seed=6)
    out, _ = _run(pat, q, k, v, causal=True, need_lse=False)
    assert out.out.dtype == torch.bfloat16
    assert_matches_reference(out.out, q, k, v, attn_mask=_allowed(layout, 16, 48, 15, 4, True)[None])


def test_causal_no_leak_bit_exact():
    pat = _pattern(_layout(2, 3, seed=3, density=0.9), 16, 15, 4)
    q, k, v = rand_qkv(b=1, h=2, tq=48, d=16, seed=7)
    base, _ = _run(pat, q, k, v, causal=True, need_lse=False)
    t = 29
    k2, v2 = k.clone(), v.clone()
    k2[:, :, t + 1:] += 5.0
    v2[:, :, t + 1:] -= 3.0
    out, _ = _run(pat, q, k2, v2, causal=True, need_lse=False)
    assert torch.equal(out.out[:, :, : t + 1], base.out[:, :, : t + 1])
    assert not torch.equal(out.out[:, :, t + 1:], base.out[:, :, t + 1:])


def test_global_sparse_runs_the_kernel_and_matches_its_torch_backend():
    scores = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)).tril()
    q, k, v = rand_qkv(b=1, h=2, tq=64, d=16, seed=8)
    outs = {}
    for backend in ("triton", "torch"):
        m = make("global_sparse", q, k, pattern=scores.tolist(), block_size=16, sparsity=0.5, backend=backend)
        outs[backend] = m(q, k, v, causal=True).out
        assert m.kernel == backend
    assert max_err(outs["triton"], outs["torch"]) < 1e-5


def test_auto_routing_and_refusals():
    """auto sends a block pattern united with a window to the kernel on CUDA in bf16 (self-attention only); a
    plain layout stays on flex; explicit triton refuses what it cannot run, in one line each."""
    lay = _layout(1, 2, seed=0)[0]
    union = _pattern(lay[None], 16, 15, 4)
    q = torch.zeros(1, 2, 32, 16, dtype=torch.bfloat16)

    fake = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=q.shape)  # resolve reads only these
    assert sparse_ops.resolve("auto", fake, need_lse=False, need_col_sums=False, pattern=union, tk=32) == "triton"
    # q, k, v whose rows pass 32-bit offsets (`ops.limits.rows_fit`): flex
    assert sparse_ops.resolve("auto", fake, need_lse=False, need_col_sums=False, pattern=union, tk=32,
                              rows_fit=False) != "triton"
    from attnlab.patterns.window import WindowPattern

    for t, want in ((524_287, True), (524_288, False)):  # 32 heads of 128: T x H x D reaches 2^31 at 524,288 tokens
        big = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, shape=(1, 32, t, 128))
        got = sparse_ops.resolve("auto", big, need_lse=False, need_col_sums=False, pattern=WindowPattern(256), tk=t)
        assert (got == "triton") == want, (t, got)
    assert sparse_ops.resolve("auto", fake, need_lse=False, need_col_sums=False, pattern=union, tk=48) != "triton"
    assert sparse_ops.resolve("auto", fake, need_lse=False, need_col_sums=False, pattern=BlockPattern(lay, 16),
                              tk=32) != "triton"
    qf, kf, vf = rand_qkv(b=1, h=2, tq=16, tk=24, d=16)
    with pytest.raises(UnsupportedError, match="self-attention"):
        make("block_sparse", qf, kf, layout=[[True] * 4] * 4, block_size=8, backend="triton")(qf, kf, vf)
    qf, kf, vf = rand_qkv(b=1, h=2, tq=32, d=16)
    with pytest.raises(UnsupportedError, match="16, 32, 64-token blocks, not 8"):
        make("block_sparse", qf, kf, layout=[[True] * 4] * 4, block_size=8, backend="triton")(qf, kf, vf)
    with pytest.raises(UnsupportedError, match="not BigBirdPattern"):
        make("block_sparse", qf, kf, block_size=16, backend="triton")(qf, kf, vf)
