"""block_sparse: fixed layouts (one for all heads or per head) and BigBird's recipe vs the dense fp64 reference
under the expanded mask. Generic checks (exact limit, causal, padding, GQA, gradients in the limit, state,
options) are in the conformance suite."""
from __future__ import annotations

import pytest
import torch

from attnlab import OptionError, UnsupportedError
from attnlab.ops import sparse
from attnlab.patterns import bigbird_layout
from tests.helpers import DTYPES, assert_matches_reference, grads, make, max_err, rand_qkv, reference

FLEX_SHAPE = dict(b=2, h=2, tq=37, d=16)  # the same shape as test_window's flex tests


def expand(layout, tq, tk, block_size):
    """Bool[(H,) nq, nk] block layout -> Bool[(H,) Tq, Tk] token mask, written out independently of attnlab:
    rows by query position, bottom-right (query i sits at position max(0, i + Tk - Tq))."""
    layout = torch.as_tensor(layout, dtype=torch.bool)
    rows = (torch.arange(tq) + tk - tq).clamp(min=0) // block_size
    cols = torch.arange(tk) // block_size
    return layout[..., rows[:, None], cols[None, :]]


def holey_layout(nq, nk, seed=0):
    g = torch.Generator().manual_seed(seed)
    lay = torch.rand(nq, nk, generator=g) < 0.4
    lay[0, 1] = lay[2, 2] = False  # some holes for sure, and a full row and column
    lay[:, 0] = True
    lay[nq - 1] = True
    return lay


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("how", ["layout", "recipe"])
def test_exact_limit_torch(dtype, causal, how):
    q, k, v = rand_qkv(tq=37, dtype=dtype, seed=1)
    opts = dict(layout=[[True] * 5] * 5) if how == "layout" else dict(num_window_blocks=20)
    out, _ = make("block_sparse", q, k, block_size=8, backend="torch", **opts)(q, k, v, causal=causal)
    err = assert_matches_reference(out, q, k, v, causal=causal)
    print(f"block_sparse torch exact limit ({how}) {dtype} causal={causal}: {err:.2e}")


@pytest.mark.flex
def test_exact_limit_flex_fp32(causal=True):
    # Run after test_window's flex tests this is also the regression test for the CPU flex template failing
    # to build under automatic dynamic shapes (see sparse.compiled_flex_attention). One compile only.
    q, k, v = rand_qkv(**FLEX_SHAPE, seed=2)
    with torch.no_grad():
        m = make("block_sparse", q, k, block_size=8, layout=torch.ones(5, 5, dtype=torch.bool), backend="flex")
        out, _ = m(q, k, v, causal=causal)
    err = assert_matches_reference(out, q, k, v, causal=causal)
    print(f"block_sparse flex exact limit fp32 causal={causal}: {err:.2e}")


@pytest.mark.parametrize("tq,tk,causal", [(37, 37, False), (37, 37, True), (21, 37, True), (37, 30, False)])
def test_layout_with_holes_matches_dense(tq, tk, causal):
    lay = holey_layout(10, 10)
    q, k, v = rand_qkv(tq=tq, tk=tk, seed=3)
    out, _ = make("block_sparse", q, k, block_size=4, layout=lay.tolist(), backend="torch")(q, k, v, causal=causal)
    mask = expand(lay, tq, tk, 4)
    assert_matches_reference(out, q, k, v, attn_mask=mask, causal=causal)
    assert max_err(out, reference(q, k, v, causal=causal)) > 1e-2  # the holes really change the output


@pytest.mark.parametrize("dtype", DTYPES)
def test_recipe_matches_dense_with_its_layout(dtype):
    q, k, v = rand_qkv(tq=150, dtype=dtype, seed=4)
    m = make("block_sparse", q, k, block_size=16, seed=3, backend="torch")
    out, _ = m(q, k, v, causal=True)
    lay = m.pattern.layout_for(150, 150, True)
    assert not lay.tril().all()  # the recipe leaves holes at this length
    assert_matches_reference(out, q, k, v, attn_mask=expand(lay, 150, 150, 16), causal=True)


def test_bigbird_recipe_structure():
    lay = bigbird_layout(200, 200, 16, False, 1, 3, 2, 0)  # 13 x 13 blocks
    assert lay.shape == (13, 13)
    assert lay[:, 0].all() and lay[0].all()  # global block: sees and is seen by everything
    for qb in range(1, 13):
        band = range(max(0, qb - 1), min(13, qb + 2))
        assert all(lay[qb, kb] for kb in band)
        extra = int(lay[qb].sum()) - len(set(band) | {0})
        assert extra == 2  # exactly num_random_blocks random blocks on top of global + band
    assert torch.equal(lay, bigbird_layout(200, 200, 16, False, 1, 3, 2, 0))  # seeded: same layout again
    assert not torch.equal(lay, bigbird_layout(200, 200, 16, False, 1, 3, 2, 1))
    causal = bigbird_layout(200, 200, 16, True, 1, 3, 2, 0)
    future = torch.ones(13, 13, dtype=torch.bool).triu(2)
    future[0] = False  # the global row keeps every block; causal masks its future inside the kernel
    assert not (causal & future).any()  # causal: no random block wasted beyond the band


def test_need_probs():
    lay = holey_layout(6, 6, seed=5)
    q, k, v = rand_qkv(tq=23, seed=5)
    kpm = torch.ones(2, 23, dtype=torch.bool)
    kpm[1, :3] = False
    out, probs = make("block_sparse", q, k, block_size=4, layout=lay)(q, k, v, causal=True, key_padding_mask=kpm,
                                                                      need_probs=True)
    grid = torch.zeros(2, 1, 23, 23, dtype=torch.bool)  # the layout counts positions from a row's first real key
    grid[0, 0], grid[1, 0, 3:, 3:] = expand(lay, 23, 23, 4), expand(lay, 20, 20, 4)
    allowed = grid & torch.ones(23, 23, dtype=torch.bool).tril() & kpm[:, None, None, :]
    assert probs.masked_select(~allowed.expand_as(probs)).abs().max() == 0
    rows = allowed.any(-1).expand(2, 4, 23)
    torch.testing.assert_close(probs.sum(-1), rows.float())
    assert_matches_reference(out, q, k, v, attn_mask=grid, causal=True, key_padding_mask=kpm)


def test_key_padding_and_empty_rows():
    lay = torch.eye(10, dtype=torch.bool)  # each query block sees only its own key block
    q, k, v = rand_qkv(tq=37, seed=7)
    m = make("block_sparse", q, k, block_size=4, layout=lay, backend="torch")
    kpm = torch.ones(2, 37, dtype=torch.bool)
    kpm[0, 4:8] = False  # block 1 of batch 0 fully padded: queries 4..7 see nothing
    kpm[1, 30:] = False  # right padding of batch 1
    out, _ = m(q, k, v, causal=False, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert out[0, :, 4:8].abs().max() == 0
    assert_matches_reference(out, q, k, v, attn_mask=expand(lay, 37, 37, 4), key_padding_mask=kpm)
    alone, _ = m(q[1:, :, :30], k[1:, :, :30], v[1:, :, :30])
    torch.testing.assert_close(out[1, :, :30], alone[0], rtol=0, atol=1e-6)


def test_gradients_match_dense_with_holes():
    q, k, v = rand_qkv(tq=29, h=4, hkv=2, seed=10)
    lay = holey_layout(8, 8, seed=10)
    m = make("block_sparse", q, k, block_size=4, layout=lay, backend="torch")
    dense = make("dense", q, k)
    mask = expand(lay, 29, 29, 4)
    got = grads(lambda q, k, v: m(q, k, v, causal=True)[0], q, k, v)
    want = grads(lambda q, k, v: dense(q, k, v, causal=True, attn_mask=mask)[0], q, k, v)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_layout_too_small_is_refused_before_compute(monkeypatch):
    q, k, v = rand_qkv(tq=37, seed=11)
    m = make("block_sparse", q, k, block_size=8, layout=torch.ones(4, 4, dtype=torch.bool), backend="torch")

    def boom(*a, **kw):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(sparse, "gathered_attention", boom)
    with pytest.raises(UnsupportedError, match="covers positions up to 32, got Tk=37"):  # 37 keys > 4 blocks x 8
        m(q, k, v)


def test_per_head_layout_matches_dense_per_head():
    g = torch.Generator().manual_seed(12)
    lay = torch.rand(4, 8, 8, generator=g) < 0.5
    lay[:, torch.arange(8), torch.arange(8)] = True
    q, k, v = rand_qkv(h=4, hkv=2, tq=29, seed=12)
    m = make("block_sparse", q, k, block_size=4, layout=lay, backend="torch")
    assert m.pattern.per_head
    for causal in (False, True):
        out = m(q, k, v, causal=causal).out
        assert_matches_reference(out, q, k, v, attn_mask=expand(lay, 29, 29, 4)[None], causal=causal)
    with pytest.raises(OptionError, match="per-head layout has 4 heads"):
        make("block_sparse", *rand_qkv(h=2, tq=8)[:2], block_size=4, layout=lay)


@pytest.mark.parametrize("opts", [dict(block_size=0), dict(backend="foo"), dict(num_random_blocks=-1),
                                  dict(layout=[True, False]), dict(layout=[[0.5]]), dict(layout="abc"),
                                  dict(layout=[[True]], num_random_blocks=4)])
def test_bad_options(opts):
    q, k, _ = rand_qkv()
    with pytest.raises(OptionError):
        make("block_sparse", q, k, **opts)


def test_flex_unavailable_is_a_clear_error(monkeypatch):
    q, k, v = rand_qkv()
    monkeypatch.setattr(sparse, "TORCH_VERSION", (2, 5))
    with pytest.raises(UnsupportedError, match="block_sparse.*torch >= 2.6"):
        make("block_sparse", q, k, block_size=4, backend="flex")(q, k, v)
