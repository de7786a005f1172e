"""attnlab.patterns: mask_mod factories, composition, block patterns from tensors (per head too), key chunks,
and the BlockMask cache keyed by identity and data version (never stale when the data change)."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab import patterns
from attnlab.ops import sparse
from tests.helpers import assert_matches_reference, rand_qkv


def test_factories_match_hand_written_masks():
    i, j = torch.arange(9)[:, None], torch.arange(12)[None, :]
    off = 12 - 9
    dm = patterns.dense_mask
    torch.testing.assert_close(dm(patterns.causal_mod(off), 9, 12)[0], j <= i + off)
    torch.testing.assert_close(dm(patterns.sliding_window_mod(2, off), 9, 12)[0], (i + off - j).abs() <= 2)
    torch.testing.assert_close(dm(patterns.sinks_mod(3), 9, 12)[0], (j < 3).expand(9, 12))
    lay = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    want = lay.repeat_interleave(4, 0).repeat_interleave(4, 1)[off: off + 9, :12]  # rows by position
    torch.testing.assert_close(dm(patterns.block_layout_mod(lay, 4, off), 9, 12)[0], want)
    win = patterns.WindowPattern(2, sinks=1)
    torch.testing.assert_close(win.dense(9, 12, causal=True)[0], (((i + off - j).abs() <= 2) | (j < 1)) & (j <= i + off))


def test_block_pattern_from_tensor_equals_dense_masked_reference():
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(5, 5, generator=g) < 0.5
    blocks.fill_diagonal_(True)
    pat = patterns.BlockPattern.from_blocks(blocks, block_size=8)
    q, k, v = rand_qkv(tq=37, seed=1)
    mask = blocks.repeat_interleave(8, 0).repeat_interleave(8, 1)[:37, :37]
    for causal in (False, True):
        res, kernel = sparse.sparse_attention(q, k, v, pat, causal=causal, key_padding_mask=None, scale=16 ** -0.5,
                                              backend="torch")
        assert kernel == "torch"
        assert_matches_reference(res.out, q, k, v, attn_mask=mask, causal=causal)
    assert "layout" in pat.state_dict()  # the data is a buffer: saved, loaded, moved with .to()


@pytest.mark.flex
def test_changing_the_blocks_changes_the_output_without_a_stale_block_mask():
    """The BlockMask cache is keyed by the pattern's identity and its buffers' versions: an in-place edit of the
    layout (as a learned mask's training step makes) builds a new BlockMask; equal data reuses the cached one."""
    blocks = torch.ones(5, 5, dtype=torch.bool)
    pat = patterns.BlockPattern.from_blocks(blocks, block_size=8)
    q, k, v = rand_qkv(b=2, h=2, tq=37, d=16, seed=2)  # the flex shape the other flex tests compile for

    def run():
        with torch.no_grad():
            res, kernel = sparse.sparse_attention(q, k, v, pat, causal=False, key_padding_mask=None,
                                                  scale=16 ** -0.5, backend="flex", flex_block_size=128)
        assert kernel == "flex"
        return res.out

    first = run()
    bm = pat.block_mask(37, 37, False, "cpu", 128)
    assert run() is not None and pat.block_mask(37, 37, False, "cpu", 128) is bm  # cached while nothing changes
    assert_matches_reference(first, q, k, v)
    new = torch.eye(5, dtype=torch.bool)
    pat.layout.copy_(new)  # in place, no touch(): the buffer's version changes
    second = run()
    assert pat.block_mask(37, 37, False, "cpu", 128) is not bm
    mask = new.repeat_interleave(8, 0).repeat_interleave(8, 1)[:37, :37]
    assert_matches_reference(second, q, k, v, attn_mask=mask)
    pat.set_blocks(torch.ones(5, 5, dtype=torch.bool))  # through the API: same result as the first run
    torch.testing.assert_close(run(), first)


def test_version_key_changes_with_data_not_with_reads():
    pat = patterns.BlockPattern(torch.ones(3, 3, dtype=torch.bool), 4)
    key = pat.version_key()
    pat.dense(12, 12)
    assert pat.version_key() == key
    pat.layout[0, 1] = False
    assert pat.version_key() != key
    key = pat.version_key()
    pat.touch()
    assert pat.version_key() != key


def test_modules_made_under_inference_mode_run_outside_it():
    """Tensors made under torch.inference_mode have no version counter: the version-keyed caches (a pattern's
    BlockMasks, learned_mask's pattern, linformer's row check) must neither crash on them nor serve a stale entry
    (`types.data_version`: a key that equals nothing). A learned mask built inside, its scores then changed inside
    inference mode (no version bump), must follow the new scores."""
    from attnlab.types import data_version

    q, k, v = rand_qkv(tq=64, d=16, seed=2)
    with torch.inference_mode():
        t = torch.ones(3)
        m = attnlab.make("learned_mask", head_dim=16, num_heads=q.shape[1], block_size=16)
        pat = patterns.BlockPattern(torch.ones(4, 4, dtype=torch.bool), 16)
    assert data_version(t) != data_version(t)
    assert pat.version_key() != pat.version_key()
    first = m(q, k, v, causal=True).out
    torch.testing.assert_close(m(q, k, v, causal=True).out, first, rtol=0, atol=0)
    with torch.inference_mode():
        m.scores.neg_()  # a different mask, and no version counter moved
        inside = m(q, k, v, causal=True).out
    fresh = attnlab.make("learned_mask", head_dim=16, num_heads=q.shape[1], block_size=16)
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(inside, fresh(q, k, v, causal=True).out, rtol=0, atol=1e-5)
    assert (inside - first).abs().max() > 0.1  # the case exercises a changed mask


@pytest.mark.parametrize("tq,tk,window,sinks,causal", [(200, 200, 5, 3, True), (200, 200, 70, 0, False),
                                                       (30, 200, 4, 2, True), (200, 30, 4, 0, True)])
def test_window_key_chunks_reach_every_visible_key_and_stay_small(tq, tk, window, sinks, causal):
    pat = patterns.WindowPattern(window, sinks)
    full = pat.dense(tq, tk, causal)[0]
    seen = torch.zeros(tq, tk, dtype=torch.bool)
    covered = 0
    for s, e, kidx in pat.key_chunks(tq, tk, causal):
        assert s == covered  # chunks tile the query rows in order
        covered = e
        assert len(set(kidx.tolist())) == len(kidx)  # no key twice (it would be double counted)
        assert len(kidx) <= (e - s) + 2 * window + sinks + 1  # O(chunk + window), not O(T)
        seen[s:e, kidx] = True
    assert covered == tq and not (full & ~seen).any()


@pytest.mark.parametrize("tq,tk,causal", [(10, 10, False), (10, 10, True), (4, 10, True), (13, 10, False)])
def test_block_key_chunks_cover_kept_blocks(tq, tk, causal):
    lay = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    pat = patterns.BlockPattern(lay, 4)
    full = pat.dense(tq, tk, causal)[0]
    seen, covered = torch.zeros(tq, tk, dtype=torch.bool), 0
    for s, e, kidx in pat.key_chunks(tq, tk, causal):
        assert s == covered
        covered = e
        seen[s:e, kidx] = True
    assert covered == tq and not (full & ~seen).any()
    chunks = list(pat.key_chunks(10, 10, False))
    assert chunks[0][2].tolist() == [0, 1, 2, 3, 8, 9] and chunks[1][2].tolist() == [4, 5, 6, 7]


def test_patterns_are_parts_of_the_sparse_methods():
    w = attnlab.make("window", head_dim=8, num_heads=2, window=3, sinks=1)
    b = attnlab.make("block_sparse", head_dim=8, num_heads=2, block_size=4, layout=torch.eye(3, dtype=torch.bool))
    assert isinstance(w.pattern, patterns.WindowPattern) and isinstance(b.pattern, patterns.BlockPattern)
    assert "pattern.layout" in b.state_dict()
    assert b.to(torch.float64).pattern.layout.dtype == torch.bool  # .to(dtype) leaves the bool data alone
    assert 0 < w.pattern.density(12, 12, causal=True) < 1


def test_auto_sends_only_bf16_and_fp16_windows_to_the_triton_kernel(monkeypatch):
    """On CUDA (a stand-in q: resolve reads its device, head dim and dtype): fp32 goes to flex, where the window
    kernel is 7-9x slower than flex (H200 measurement in window_triton.AUTO_DTYPES)."""
    import types

    monkeypatch.setattr(sparse, "triton_importable", lambda: True)
    monkeypatch.setattr(sparse, "flex_unavailable_reason", lambda device: None)
    pat = patterns.WindowPattern(8, 4)
    for dtype, want in ((torch.bfloat16, "triton"), (torch.float16, "triton"), (torch.float32, "flex")):
        q = types.SimpleNamespace(device=torch.device("cuda"), shape=(1, 2, 16, 64), dtype=dtype)
        assert sparse.resolve("auto", q, need_lse=False, need_col_sums=False, pattern=pat) == want, dtype


def test_flex_availability(monkeypatch):
    assert sparse.resolve("auto", torch.zeros(1), need_lse=False, need_col_sums=False) == "torch"
    assert sparse.flex_unavailable_reason(torch.device("cpu")) is None
    monkeypatch.setattr(sparse, "TORCH_VERSION", (2, 5))
    assert "torch >= 2.6" in sparse.flex_unavailable_reason(torch.device("cpu"))
    assert sparse.unsupported_reasons("flex", "cpu", need_col_sums=True)


def _true_tables(pat, t, bs, causal):
    nb, pad = -(-t // bs), -(-t // bs) * bs - t
    d = torch.nn.functional.pad(pat.dense(t, t, causal), (0, pad, 0, pad)).reshape(-1, nb, bs, nb, bs)
    valid = torch.nn.functional.pad(torch.ones(t, t, dtype=torch.bool), (0, pad, 0, pad)).reshape(nb, bs, nb, bs)
    return (d & valid).any(4).any(2), (d | ~valid).all(4).all(2)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t", [64, 61])
def test_block_tables_never_claim_a_full_block_wrongly_nor_miss_a_pair(causal, t):
    """BlockMasks built from block tables (no token-level evaluation): a block marked full skips the mask, so it
    must really be full; a block left out skips the keys, so it must really be empty."""
    lay = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.4
    pats = [patterns.WindowPattern(5), patterns.WindowPattern(20, 3), patterns.WindowPattern(0, 4),
            patterns.BlockPattern(lay, 4), patterns.UnionPattern(patterns.BlockPattern(lay, 4), patterns.WindowPattern(6, 4))]
    for pat in pats:
        any_, full = pat.block_tables(-(-t // 8), 8, causal)
        true_any, true_full = _true_tables(pat, t, 8, causal)
        assert not (full & ~true_full).any(), pat
        assert not (true_any & ~any_).any(), pat
        if isinstance(pat, patterns.WindowPattern) and not pat.sinks and t % 8 == 0:  # else conservative, not exact
            assert torch.equal(any_.expand_as(true_any), true_any) and torch.equal(full.expand_as(true_full), true_full)


@pytest.mark.flex
@pytest.mark.parametrize("causal", [False, True])
def test_flex_through_a_table_built_block_mask_equals_dense(causal):
    q, k, v = rand_qkv(b=2, h=3, tq=37, d=16, seed=1)
    lay = torch.rand(3, 10, 10, generator=torch.Generator().manual_seed(1)) < 0.4
    pat = patterns.UnionPattern(patterns.BlockPattern(lay, 4), patterns.WindowPattern(5, 4))
    assert pat.block_tables(3, 16, causal) is not None  # the path under test
    with torch.no_grad():
        res, kernel = sparse.sparse_attention(q, k, v, pat, causal=causal, key_padding_mask=None, scale=0.25,
                                              backend="flex", flex_block_size=16)
    assert kernel == "flex"
    assert_matches_reference(res.out, q, k, v, attn_mask=pat.dense(37, 37, False)[None], causal=causal, scale=0.25)


@pytest.mark.parametrize("window,sinks,tq,tk,causal", [
    (3, 0, 20, 20, True), (3, 2, 20, 20, False), (5, 3, 10, 30, True), (5, 3, 30, 10, True), (100, 0, 12, 12, False),
    (4, 50, 20, 20, True), (0, 1, 9, 9, False), (2, 40, 48, 48, False), (2, 3, 40, 20, False), (2, 3, 40, 20, True),
    (1, 5, 12, 12, True),
])
def test_visible_pairs_count_the_mask(window, sinks, tq, tk, causal):
    """The window's closed form and the generic count (mask_mod over key_chunks) both equal the dense mask's sum."""
    from attnlab.patterns.base import Pattern

    pat = patterns.WindowPattern(window, sinks)
    want = float(pat.dense(tq, tk, causal).sum())
    assert pat.visible_pairs(tq, tk, causal) == want
    assert Pattern.visible_pairs(pat, tq, tk, causal) == want


def test_flex_block_follows_the_pattern_block_where_the_kernel_tiles_divide_it():
    # a 64-token pattern at 128-wide Flex blocks makes every block it touches partial (mask_mod per element)
    assert [sparse.flex_block_for(b) for b in (64, 128, 192, 256, 32, 96, 16)] == [64, 128, 64, 256, 128, 128, 128]
    from attnlab.methods import block_sparse, global_sparse

    gs = global_sparse.GlobalSparse(16, 2, pattern=[[1.0] * 4] * 4, block_size=64, sparsity=0.0)
    assert gs.flex_block_size == 64
    assert block_sparse.BlockSparse(16, 2, block_size=64).flex_block_size == 64


def test_tile_options_divide_the_mask_blocks_on_cuda_only():
    class Mask:  # what tile_options reads of a BlockMask
        BLOCK_SIZE = (64, 64)

    assert sparse.tile_options(Mask, "cpu") is None  # the CPU template has no tiles to set
    assert sparse.tile_options(Mask, "cuda") == {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}
    Mask.BLOCK_SIZE = (128, 128)
    assert sparse.tile_options(Mask, "cuda") is None  # the defaults fit


def test_call_block_size_keeps_narrow_blocks_only_where_a_kernel_fits(monkeypatch):
    monkeypatch.setattr(sparse, "_torch_version", lambda: (2, 11))
    assert sparse.call_block_size(64, "cuda", backward=False, tq=4096) == 64  # inference: the pattern's blocks
    assert sparse.call_block_size(64, "cuda", backward=True, tq=4096) == 128  # no backward kernel for them
    assert sparse.call_block_size(64, "cuda", backward=False, tq=100) == 128  # flex's decoding kernel
    assert sparse.call_block_size(64, "cpu", backward=True, tq=16) == 64  # the CPU template takes any block
    assert sparse.call_block_size(256, "cuda", backward=True, tq=16) == 256
    monkeypatch.setattr(sparse, "_torch_version", lambda: (2, 8))
    assert sparse.call_block_size(64, "cuda", backward=False, tq=4096) == 128  # not measured there


@pytest.mark.parametrize("grad", [False, True])
def test_sparse_attention_tells_the_block_choice_whether_a_backward_follows(monkeypatch, grad):
    seen = []

    class Stop(Exception):
        pass

    def spy(flex_block_size, device, backward, tq):
        seen.append((flex_block_size, backward, tq))
        raise Stop  # the choice is what is under test, not the kernel

    monkeypatch.setattr(sparse, "call_block_size", spy)
    monkeypatch.setattr(sparse, "resolve", lambda *a, **kw: "flex")  # as on CUDA (CPU flex refuses a backward)
    q, k, v = rand_qkv(b=1, h=2, tq=20, d=8, seed=0)
    q.requires_grad_(grad)
    pat = patterns.BlockPattern(torch.ones(2, 2, dtype=torch.bool), 16)
    with pytest.raises(Stop):
        sparse.sparse_attention(q, k, v, pat, causal=True, key_padding_mask=None, scale=0.3, backend="flex",
                                flex_block_size=64)
    assert seen == [(64, grad, 20)]


def test_narrow_backward_is_opt_in_and_adds_a_fitting_configuration(monkeypatch):
    """A 64-token BlockMask reaches flex's backward only after enable_narrow_backward (inductor's sm90 default
    backward tiles, 64 x 128, divide no 64-token block); the added configuration is one that divides it, and none
    is added where one already fits."""
    from attnlab.ops import sparse

    monkeypatch.setattr(sparse, "NARROW_SIZES", set())
    assert sparse.call_block_size(64, "cuda", backward=True, tq=4096) == 128

    class Conf:
        def __init__(self, m1, n1, m2, n2, stages, warps):
            self.block_m1, self.block_n1, self.block_m2, self.block_n2 = m1, n1, m2, n2

    sm90 = [Conf(64, 128, 128, 64, 3, 8)]
    added = sparse.with_narrow(sm90, Conf, {64})
    assert len(added) == 2 and (added[1].block_m1, added[1].block_n1, added[1].block_m2, added[1].block_n2) == (64,) * 4
    assert len(sparse.with_narrow([Conf(32, 64, 64, 32, 1, 4)], Conf, {64})) == 1  # one fits already
    from torch._inductor import config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    if not hasattr(inductor_config, "inductor_choices_class"):  # torch 2.6
        assert not sparse.enable_narrow_backward(64) and not sparse.NARROW_SIZES
        pytest.skip("this torch has no inductor choices hook (refused: checked)")
    monkeypatch.setattr(inductor_config, "inductor_choices_class", None)
    try:
        if not sparse.enable_narrow_backward(64):
            pytest.skip("this torch has no inductor choices hook")
        assert sparse.call_block_size(64, "cuda", backward=True, tq=4096) == 64
        assert getattr(inductor_config.inductor_choices_class, "attnlab_narrow", False)
        import pickle  # inductor pickles its config into cache keys

        assert pickle.loads(pickle.dumps(inductor_config.inductor_choices_class)) is inductor_config.inductor_choices_class
        assert sparse.enable_narrow_backward(64)  # again: the same class, still picklable
        assert pickle.loads(pickle.dumps(inductor_config.inductor_choices_class)) is inductor_config.inductor_choices_class
        x = torch.randn(8)  # inductor still compiles with the class in its config (torch 2.13 asks it for a uuid)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(lambda t: t.sin() + 1)(x), x.sin() + 1)
    finally:
        V.set_choices_handler(InductorChoices())  # this thread's handler back to inductor's own


def _block_mask_pairs(bm, tq, tk, heads):
    """Bool[H, Tq, Tk]: what FlexAttention computes under `bm`: every pair of a full block, and the pairs of a
    partial block where bm.mask_mod says True (out-of-range pairs dropped, as the kernel's bounds check does)."""
    bs = bm.BLOCK_SIZE[0] if isinstance(bm.BLOCK_SIZE, tuple) else bm.BLOCK_SIZE
    nq, nk = bm.kv_num_blocks.shape[-1], -(-tk // bs)
    qi, kj = torch.arange(tq)[:, None], torch.arange(tk)[None, :]
    out = torch.zeros(heads, tq, tk, dtype=torch.bool)
    for h in range(heads):
        hb = min(h, bm.kv_num_blocks.shape[1] - 1)
        inside = bm.mask_mod(torch.zeros((), dtype=torch.long), torch.tensor(h), qi, kj).expand(tq, tk)
        for a in range(nq):
            rows = slice(a * bs, min((a + 1) * bs, tq))
            for num, idx, full in ((bm.kv_num_blocks, bm.kv_indices, False),
                                   (bm.full_kv_num_blocks, bm.full_kv_indices, True)):
                for b in idx[0, hb, a, : num[0, hb, a]].tolist():
                    assert b < nk
                    cols = slice(b * bs, min((b + 1) * bs, tk))
                    out[h, rows, cols] |= True if full else inside[rows, cols]
    return out


@pytest.mark.parametrize("tq,tk", [(256, 256), (200, 200), (64, 256), (100, 228)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_masks_partial_blocks_evaluate_only_what_can_cut_them(tq, tk, causal):
    """A block layout aligned with the BlockMask's blocks hands flex only the causal diagonal for its partial
    blocks (no table lookup); unaligned ones (BlockMask blocks wider than the layout's, or a query offset that is
    not a whole number of layout blocks) keep the whole mask_mod. Either way the pairs the kernel computes are the
    pattern's exactly: full blocks, plus partial blocks filtered by the mask_mod the BlockMask carries."""
    g = torch.Generator().manual_seed(3)
    per_head = (torch.rand(2, 8, 8, generator=g) < 0.4) | torch.eye(8, dtype=torch.bool)
    cheap_seen = 0
    for pat, heads in ((patterns.BlockPattern.from_blocks(per_head, 32), 2),
                       (patterns.BlockPattern.from_blocks(per_head[0], 64), 1),
                       (patterns.BigBirdPattern(32, num_global=1, num_window=3, num_random=2, seed=1), 1)):
        for bs in (16, 32, 64):
            bm = pat.block_masks(tq, tk, causal, "cpu", bs)[1]
            aligned = causal and pat.block_size % bs == 0 and (tk - tq) % pat.block_size == 0
            cheap = pat.partial_mask_mod(tq, tk, causal, "cpu", bs)
            assert (cheap is not None) == aligned
            cheap_seen += aligned
            want = pat.dense(tq, tk, causal).expand(heads, tq, tk)
            assert torch.equal(_block_mask_pairs(bm, tq, tk, heads), want), (type(pat).__name__, bs)
            whole = pat.block_mask(tq, tk, causal, "cpu", bs)  # what eager flex runs: the mask_mod on every pair
            assert torch.equal(patterns.dense_mask(whole.mask_mod, tq, tk, heads=heads), want)
    assert cheap_seen or not causal or (tk - tq) % 32


@pytest.mark.parametrize("tq,tk", [(256, 256), (200, 200), (64, 256), (100, 228)])
@pytest.mark.parametrize("causal", [False, True])
def test_a_union_with_a_wide_band_hands_partial_blocks_the_band_alone(tq, tk, causal):
    """learned_mask's and global_sparse's patterns: an aligned block layout OR a band (+ sinks). Where the band admits
    every causal pair of a diagonal block (window >= block - 1), the union's partial blocks get the band, the sinks
    and causal, never the layout's table; a narrower band, an unaligned layout or non-causal keep the whole
    mask_mod. Either way the pairs the kernel computes are the pattern's exactly."""
    g = torch.Generator().manual_seed(7)
    per_head = (torch.rand(2, 8, 8, generator=g) < 0.3) | torch.eye(8, dtype=torch.bool)
    cheap_seen = 0
    for window, sinks in ((31, 0), (32, 4), (63, 2), (15, 4), (0, 4)):
        for layout_bs in (32, 64):
            pat = patterns.UnionPattern(patterns.BlockPattern.from_blocks(per_head, layout_bs),
                                        patterns.WindowPattern(window, sinks))
            for bs in (16, 32, 64):
                bm, kbm = pat.block_masks(tq, tk, causal, "cpu", bs)
                # ragged lengths need the BlockMask built from block tables (Tq == Tk, block >= layout block)
                whole_blocks = (tq % bs == 0 and tk % bs == 0) or (tq == tk and bs % layout_bs == 0)
                expect = (causal and layout_bs % bs == 0 and (tk - tq) % layout_bs == 0 and window >= bs - 1
                          and whole_blocks)
                assert (kbm is not bm) == expect, (window, layout_bs, bs)
                cheap_seen += expect
                want = pat.dense(tq, tk, causal).expand(2, tq, tk)
                assert torch.equal(_block_mask_pairs(kbm, tq, tk, 2), want), (window, sinks, layout_bs, bs)
    assert cheap_seen or not causal or (tq, tk) == (100, 228)  # ragged decoding shapes: the whole mask_mod


def test_union_partial_mask_mod_reads_no_layout():
    """The kernel mod of an aligned layout OR a wide band is the band's: changing the layout leaves its verdict on
    every pair unchanged (the whole mask_mod's moves)."""
    a = torch.eye(4, dtype=torch.bool)
    b = a | torch.tril(torch.ones(4, 4, dtype=torch.bool), -2)
    mods = []
    for lay in (a, b):
        pat = patterns.UnionPattern(patterns.BlockPattern.from_blocks(lay, 16), patterns.WindowPattern(16, 2))
        cheap = pat.block_masks(64, 64, True, "cpu", 16)[1].mask_mod
        mods.append((patterns.dense_mask(cheap, 64, 64), pat.dense(64, 64, True)))
    assert torch.equal(mods[0][0], mods[1][0]) and not torch.equal(mods[0][1], mods[1][1])


@pytest.mark.flex
@pytest.mark.parametrize("band", [None, (16, 2)])
def test_aligned_causal_block_layout_on_flex_matches_the_reference(band):
    """The cheap partial-block mask_mod through the compiled kernel (per-head layout of 16-token blocks under a
    16-token BlockMask, a ragged length; the flex shape of the test above): causal alone for the layout, the band
    and sinks with causal for the layout OR a band (learned_mask's pattern)."""
    blocks = (torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(4)) < 0.5) | torch.eye(3, dtype=torch.bool)
    pat = patterns.BlockPattern.from_blocks(blocks, block_size=16)
    if band:
        pat = patterns.UnionPattern(pat, patterns.WindowPattern(*band))
    bm, kbm = pat.block_masks(37, 37, True, "cpu", 16)
    assert kbm is not bm  # the path under test: the kernel BlockMask carries the cheap mask_mod
    q, k, v = rand_qkv(b=2, h=3, tq=37, d=16, seed=5)
    with torch.no_grad():
        res, kernel = sparse.sparse_attention(q, k, v, pat, causal=True, key_padding_mask=None, scale=0.25,
                                              backend="flex", flex_block_size=16)
    assert kernel == "flex"
    assert_matches_reference(res.out, q, k, v, attn_mask=pat.dense(37, 37, False)[None], causal=True, scale=0.25)


@pytest.mark.flex
def test_the_kernel_block_mask_reaches_only_the_compiled_kernel(monkeypatch):
    """The kernel BlockMask (causal alone inside partial blocks) is right only where the block tables are read: in the
    compiled kernel. Made visible with a poisoned kernel mask (nothing visible inside partial blocks): compiled, the
    rows whose only visited blocks are partial come back zero; run eagerly (a force-eager stance, as past dynamo's
    recompile limit), flex_with takes the whole mask; traced into another backend's graph, flex stays outside it."""
    from torch.nn.attention.flex_attention import BlockMask

    blocks = (torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(4)) < 0.5) | torch.eye(3, dtype=torch.bool)
    pat = patterns.BlockPattern.from_blocks(blocks, block_size=16)
    bm, kbm = pat.block_masks(37, 37, True, "cpu", 16)
    assert kbm is not bm
    monkeypatch.setattr(type(pat), "partial_mask_mod", lambda *a: pytest.fail("rebuilt on a cache hit"))
    assert pat.block_masks(37, 37, True, "cpu", 16)[1] is kbm  # (on CUDA a rebuilt mask_mod's constants sync)
    monkeypatch.undo()
    poison = BlockMask.from_kv_blocks(kbm.kv_num_blocks, kbm.kv_indices, kbm.full_kv_num_blocks, kbm.full_kv_indices,
                                      BLOCK_SIZE=16, mask_mod=lambda b, h, q, kv: kv < 0, seq_lengths=(37, 37))
    q, k, v = rand_qkv(b=2, h=3, tq=37, d=16, seed=5)
    want = pat.dense(37, 37, False)[None]
    with torch.no_grad():
        out = sparse.flex(q, k, v, bm, scale=0.25, kernel_block_mask=poison)
        if sparse.kernel_reads_tables(q.device):
            assert out[:, :, :16].abs().max() == 0  # query block 0 visits only its partial diagonal block
        else:  # CPU before torch 2.8: the kernel reads no block table, so flex_with gives it the whole mask
            assert_matches_reference(out, q, k, v, attn_mask=want, causal=True, scale=0.25)
        with torch.compiler.set_stance("force_eager"):
            eager = sparse.flex(q, k, v, bm, scale=0.25, kernel_block_mask=poison)
        assert_matches_reference(eager, q, k, v, attn_mask=want, causal=True, scale=0.25)
        outer = torch.compile(lambda *x: sparse.flex(*x, bm, scale=0.25, kernel_block_mask=poison), backend="aot_eager")
        torch.testing.assert_close(outer(q, k, v), out)  # flex compiled on its own inside, not run by aot_eager
