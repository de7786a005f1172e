"""Sliding-window attention (+ StreamingLLM sinks) as Triton kernels that visit only the band's tiles.

Query i (at key position p_i = i + Tk - Tq, bottom-right as everywhere in attnlab) sees key j when

    (|p_i - j| <= window  or  j < sinks)  and  (not causal or j <= p_i)  and  key j is not padding,

the mask of `patterns.WindowPattern`. FlashAttention-2's algorithm (Dao 2023: online softmax over key tiles,
the log-sum-exp kept for the backward, no T x T matrix) with the key loop bounded to the band: a query tile
[m0, m0 + BM) walks the key tiles from (m0 + off - window) rounded down to a tile edge up to the tile's last
visible key, plus the tiles holding the sinks below the band. Work is O(T (window + sinks) d) and memory
O(T d), where FlexAttention's generic kernel walks the same band through a BlockMask of 128 x 128 blocks. In the
band (no sinks there) only the tiles that some row of the query tile does not see whole are masked, a pair's mask
two compares against its row's first and last visible key (`BAND`; the sinks' tiles and block patterns keep the
whole rule). The scale goes into exp2's argument (one FMA a pair, FlashAttention's form).

Block patterns (`block_tables`, global_sparse's blocks + band + sinks, or a layout alone): the same kernels with
the key loop over the key tiles a query tile's row of the tables lists (the tiles the layout keeps, and those the
band or the sinks reach; tiles of the block size), a kept tile visible whole and any other pair by the window's
rule; the backward's key-tile programs walk the transposed lists. Self-attention only (a query tile is a layout
row). Work is O(visited tiles x tile^2 x d), what FlexAttention's BlockMask walks, without its per-element
mask_mod on partial blocks.

Backward as FlashAttention-2's, in two launches as FlexAttention's: `_bwd_prep` (delta_i = do_i . o_i - dlse_i; the
log-sum-exp output has a gradient too, d lse_i / d s_ij = p_ij), then `_bwd`, whose programs are either a key
tile's dk, dv (`_dkdv_program`, looping over the query tiles whose band reaches it) or a query tile's dq
(`_dq_program`, the forward's key loop); from 2^20 query rows each kind in a launch of its own (`bwd_launches`).
A tile that holds sinks is reached by every later query: past SINK_CHUNK_TILES query tiles, those outside its band
are taken by `_bwd_prep`'s programs, one per chunk of queries, as fp32 partials that the tile's program adds.

Precision: scores and p @ v in the inputs' dtype with fp32 accumulation (fp32 inputs: IEEE fp32, as
torch.matmul), softmax statistics in fp32. A row with no visible key returns zeros and lse = -inf, and no NaN
in any gradient. Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (how the CPU tests check it).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import limits as _limits
from .limits import check_call, in_batch_pieces, piece
from .triton_common import concurrently, dot, interpreted, kernel_reasons, precision, row_base, strides, to, unit_stride

LOG2E = 1.4426950408889634
# Tile sizes and launch settings (fwd, dkdv, dq) for head_dim <= 64 on the GPU: the fastest of
# benchmarks/tune_window.py's grid on an H200 at 16k and 64k tokens, causal and not (benchmarks/results/window/);
# the interpreter gets small tiles. The forward's registers are capped at 128 a thread (Triton's maxnreg): compiled
# freely it took 144 (causal) to 157, so that 3 blocks fit an SM (Nsight Compute: 18.75% occupancy, issue slots 55%
# busy, benchmarks/results/window/h200_ncu/); capped, 4 fit, and window 256 at 64k ran 0.324 vs 0.362 ms causal,
# 0.471 vs 0.522 non-causal (-10% both, 16k likewise; benchmarks/results/window/h200_maxnreg/, one process).
# The backward's dk, dv programs (key tiles of "dkdv" BN walking query tiles of its BM) and dq programs (query tiles
# of "dq" BM walking key tiles of its BN) run in one launch (`_bwd`) with "bwd"'s launch settings, its registers
# capped at 168 a thread: window 256 at 64k, fwd+bwd, 1.490 vs 1.617 ms causal (-7.9%), 2.235 vs 2.256 non-causal;
# with 4 sinks 1.860 vs 2.010 causal, 2.573 vs 2.571 non-causal (benchmarks/results/window/h200_bwd_caps/, one
# process each; a cap of 128 was slower).
CONFIG = {"fwd": dict(BM=64, BN=64, num_warps=4, num_stages=3, maxnreg=128),
          "dkdv": dict(BM=64, BN=64), "dq": dict(BM=64, BN=64), "bwd": dict(num_warps=4, num_stages=2, maxnreg=168)}
CONFIG_WIDE = {"fwd": dict(BM=128, BN=32, num_warps=8, num_stages=2),  # head_dim 65..256: smaller key tiles
               "dkdv": dict(BM=32, BN=64), "dq": dict(BM=64, BN=32), "bwd": dict(num_warps=8, num_stages=1)}
INTERPRETED = {"fwd": dict(BM=16, BN=16), "dkdv": dict(BM=16, BN=16), "dq": dict(BM=16, BN=16), "bwd": {}}
MAX_HEAD_DIM = 256
# How the kernels mask the band's tiles (the sinks' tiles and block patterns always take the whole rule):
# "edges", the bounds below only in the tiles that reach outside the keys every row of the query tile sees
# (`_edge`: causal window 256 in 64-token tiles, two of five; with padding every tile is masked, as "bounds");
# "bounds", each pair of every band tile two compares against its row's first and last visible key
# (`_band_bounds`); "rule", the whole rule of `_visible` (the first kernel). On an H200, window 256 at 64k, fwd:
# "bounds" 0.378 vs "rule" 0.459 ms causal (benchmarks/results/window/h200_band_masks/; the unmasked tiles as a
# separate loop between masked edge tiles ran 0.417 ms there and was not kept: three short loops), then "edges"
# 0.356 vs 0.372 ms causal, 0.520 vs 0.583 non-causal, with fwd+bwd 1.72 vs 1.73 and 2.58 vs 2.67 ms
# (benchmarks/results/window/h200_edges/, one process). Timed at head dim 64 only: CONFIG_WIDE's settings (head
# dim 65-256) run "edges" untimed.
BAND_MODES = {"rule": 2, "bounds": 1, "edges": 3}  # each mode's `_masked` MASK, the kernels' BAND_MASK
BAND = "edges"
# The backward's programs for the key tiles that hold sinks (seen by every later query; every query when not
# causal) walk only their band's queries when there are more than this many query tiles; the rest come from
# `_bwd_dkdv_sinks`, one program per chunk of this many query tiles (before, one program per sink tile walked all T
# queries: at 64k, 1,024 query tiles in a row while the other programs walk 5, causal, or 9).
SINK_CHUNK_TILES = 16
# The backward's dk, dv and dq programs (`_bwd`): "one" launch holding both kinds, "two" launches (each kind compiled
# alone, with its own registers), "streams" (the two on two streams, side by side), or "auto", `bwd_launches`'s
# rule. Tests and benchmarks/tune_window.py set the others.
BWD_LAUNCHES = "auto"
BWD_TWO_MIN_ROWS = 1 << 20  # B x H x Tq from which "auto" takes two launches


def bwd_launches(rows: int) -> str:
    """The backward's launches `BWD_LAUNCHES = "auto"` takes for `rows` = B x H x Tq query rows: two where the device
    time decides, one where the host's launch cost does. Measured on an H200 (benchmarks/results/window/
    h200_bwd_launches/, window 256, 16 heads, batch 1, bf16, fwd+bwd eagerly): 64k tokens (2^20 rows) one / two /
    streams 1.72 / 1.65 / 1.64 ms causal, 2.59 / 2.29 / 2.28 non-causal; 16k 0.73 / 0.84 / 1.08 and 0.85 / 0.86 / 1.04
    (a call's host time decides); a SmolLM2 step in CUDA graphs at 1k-16k the same in one launch or on two streams."""
    if BWD_LAUNCHES != "auto":
        return BWD_LAUNCHES
    return "two" if rows >= BWD_TWO_MIN_ROWS else "one"


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# what backend="auto" sends here: in fp32 the kernel is far slower than FlexAttention's (H200, causal, 9 heads,
# 8192 tokens, window 395 + 4 sinks, one `attnlab bench` run: fwd 13.4 vs 1.9 ms, fwd+bwd 104 vs 11.3 ms;
# benchmarks/results/window/h200_fp32_triton_vs_flex/), so fp32 goes to flex; explicit backend="triton" still runs it
AUTO_DTYPES = (torch.bfloat16, torch.float16)


def unsupported_reasons(device, *, head_dim: int, need_col_sums: bool = False, dtype=None) -> list[str]:
    """Why the kernel cannot serve a request on `device` (empty: it can)."""
    why = kernel_reasons(device, dtype=dtype, dtypes=DTYPES, head_dim=head_dim, max_head_dim=MAX_HEAD_DIM,
                         fallback="torch")
    if need_col_sums:
        why.append("backend='triton' cannot compute col_sums (use backend='torch' or 'auto')")
    return why


@triton.jit
def _visible(pos, kj, Tk, W, S, CAUSAL: tl.constexpr):
    """[BM, BN] bool: the window pattern at query positions `pos` [BM] and keys `kj` [BN]."""
    d = pos[:, None] - kj[None, :]
    ok = (tl.abs(d) <= W) | (kj[None, :] < S)
    if CAUSAL:
        ok = ok & (d >= 0)
    return ok & (kj[None, :] < Tk)


@triton.jit
def _visible_sel(pos, kj, Tk, W, S, sel, CAUSAL: tl.constexpr):
    """_visible, or every pair of the tile where the block layout keeps it (sel != 0; causal and the key count
    still apply): a block pattern's tile united with the window and the sinks."""
    ok = _visible(pos, kj, Tk, W, S, CAUSAL)
    keep = (kj[None, :] < Tk) & (sel != 0)
    if CAUSAL:
        keep = keep & (pos[:, None] >= kj[None, :])
    return ok | keep


@triton.jit
def _pattern_ok(pos, kj, Tk, W, S, sel, CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr):
    """The tile's [BM, BN] mask: the window's rule, united with the layout's tile (sel) for a block pattern."""
    if HAS_BLOCKS:
        return _visible_sel(pos, kj, Tk, W, S, sel, CAUSAL)
    return _visible(pos, kj, Tk, W, S, CAUSAL)


@triton.jit
def _tile_ok(pos, kj, Tk, W, S, sel, PAD, pad_base, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
             HAS_BLOCKS: tl.constexpr):
    """_pattern_ok without the padded keys."""
    ok = _pattern_ok(pos, kj, Tk, W, S, sel, CAUSAL, HAS_BLOCKS)
    if HAS_PAD:
        real = tl.load(PAD + pad_base + kj, mask=kj < Tk, other=0)
        ok = ok & (real != 0)[None, :]
    return ok


@triton.jit
def _key_range(m0, BM, off, Tk, W, S, CAUSAL: tl.constexpr, BN: tl.constexpr):
    """For the query tile starting at m0: the sink tiles [0, sink_end) (every tile holding a sink, wherever the
    band is: a sink above the band is visible too when not causal) and the band's key tiles [lo, hi) from the
    first tile past them (lo on a tile edge), so the two loops never visit a tile twice."""
    sink_end = ((tl.minimum(S, Tk) + BN - 1) // BN) * BN
    lo = tl.maximum(m0 + off - W, 0)
    lo = tl.maximum((lo // BN) * BN, sink_end)
    if CAUSAL:
        hi = tl.minimum(m0 + BM - 1 + off + 1, Tk)
    else:
        hi = tl.minimum(m0 + BM - 1 + off + W + 1, Tk)
    return lo, hi, sink_end


@triton.jit
def _band_bounds(pos, Tk, W, CAUSAL: tl.constexpr):
    """Per query position, the band's first and last visible key (sinks aside): the window's rule as two bounds,
    so a band tile's mask is two compares a pair."""
    if CAUSAL:
        return pos - W, tl.minimum(pos, Tk - 1)
    return pos - W, tl.minimum(pos + W, Tk - 1)


@triton.jit
def _masked(s, fill, pos, kj, blo, bhi, edge, Tk, W, S, sel, PAD, pad_base, HAS_PAD: tl.constexpr,
            CAUSAL: tl.constexpr, HAS_BLOCKS: tl.constexpr, MASK: tl.constexpr):
    """s [BM, BN] with `fill` where the pattern hides a pair. MASK 1: a band tile (no sinks there), the window's rule
    as the per-row bounds [blo, bhi] of `_band_bounds`, and the padding; 3: the same without padding, only where
    `edge` (the tile reaches outside the keys every row of the query tile sees, `_edge`); 2: the whole rule (sinks'
    tiles, block layouts)."""
    if MASK == 3:
        if edge:
            s = tl.where((kj[None, :] >= blo[:, None]) & (kj[None, :] <= bhi[:, None]), s, fill)
    elif MASK == 1:
        ok = (kj[None, :] >= blo[:, None]) & (kj[None, :] <= bhi[:, None])
        if HAS_PAD:
            ok = ok & (tl.load(PAD + pad_base + kj, mask=kj < Tk, other=0) != 0)[None, :]
        s = tl.where(ok, s, fill)
    else:
        s = tl.where(_tile_ok(pos, kj, Tk, W, S, sel, PAD, pad_base, HAS_PAD, CAUSAL, HAS_BLOCKS), s, fill)
    return s


@triton.jit
def _edge(n0, BN, m0, BM, off, Tk, W, CAUSAL: tl.constexpr):
    """Whether the key tile [n0, n0 + BN) reaches outside the keys [flo, fhi] every row of the query tile [m0, m0 +
    BM) sees in the band (rows past Tq included: more tiles masked, never fewer)."""
    if CAUSAL:
        fhi = tl.minimum(m0 + off, Tk - 1)
    else:
        fhi = tl.minimum(m0 + off + W, Tk - 1)
    return (n0 < m0 + BM - 1 + off - W) | (n0 + BN - 1 > fhi)


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, s0, sel, pos, blo, bhi, edge,
              offs_n, offs_d, Tk, D, W, S, qk_scale, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
              HAS_BLOCKS: tl.constexpr, MASK: tl.constexpr):
    """One key tile [s0, s0 + BN) of the online softmax, masked as `_masked` says. The scores stay unscaled
    (qk_scale > 0, so max(s) * qk_scale is the max of the scaled scores) and the scale goes into exp2's argument,
    one FMA a pair (FlashAttention's form)."""
    kj = s0 + offs_n
    kmask = (kj < Tk)[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + k_base + kj[:, None] * s_kt + offs_d[None, :], mask=kmask, other=0.0)
    s = dot(q, tl.trans(k), PREC)
    s = _masked(s, float("-inf"), pos, kj, blo, bhi, edge, Tk, W, S, sel, PAD, pad_base, HAS_PAD, CAUSAL, HAS_BLOCKS,
                MASK)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + v_base + kj[:, None] * s_vt + offs_d[None, :], mask=kmask, other=0.0)
    acc = acc * alpha[:, None] + dot(to(p, v.dtype, PREC), v, PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, start, end, m0, off, pos, blo, bhi,
               offs_n, offs_d, Tk, D, W, S, qk_scale, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr):
    for s0 in range(start, end, BN):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, s0, 0, pos, blo,
                                  bhi, _edge(s0, BN, m0, BM, off, Tk, W, CAUSAL), offs_n, offs_d, Tk, D, W, S,
                                  qk_scale, HAS_PAD, CAUSAL, PREC, False, MASK)
    return acc, m_i, l_i


@triton.jit
def _fwd(Q, K, V, PAD, O, LSE, LAY, IDX, CNT, H, G, Tq, Tk, D, W, S, qk_scale, NB, MAXN, HL,
         s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
         HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, HAS_BLOCKS: tl.constexpr,
         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BAND_MASK: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // G  # the kv head this query head reads (GQA: G query heads per kv head)
    off = Tk - Tq
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    qmask = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :], mask=qmask, other=0.0)
    pos = offs_m + off
    k_base, v_base, pad_base = b * s_kb + hk * s_kh, b * s_vb + hk * s_vh, b * Tk
    acc = tl.zeros([BM, BD], tl.float32)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    if HAS_BLOCKS:  # the key tiles this query tile's row of the block tables lists (BM = BN = the block size)
        row = (h * HL) * NB + pid_m
        for i in range(0, tl.load(CNT + row)):
            kb = tl.load(IDX + row * MAXN + i)
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, kb * BN,
                                      tl.load(LAY + row * NB + kb), pos, pos, pos, True, offs_n, offs_d, Tk, D, W,
                                      S, qk_scale, HAS_PAD, CAUSAL, PREC, True, 2)
    else:
        lo, hi, sink_end = _key_range(m0, BM, off, Tk, W, S, CAUSAL, BN)
        blo, bhi = _band_bounds(pos, Tk, W, CAUSAL)
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, 0, sink_end,
                                   m0, off, pos, blo, bhi, offs_n, offs_d, Tk, D, W, S, qk_scale, HAS_PAD, CAUSAL,
                                   PREC, BM, BN, 2)
        # the band: each pair two compares against its row's bounds ("bounds"; "edges": only in the tiles not
        # every row sees whole), or the whole rule ("rule")
        acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, lo, hi, m0, off,
                                   pos, blo, bhi, offs_n, offs_d, Tk, D, W, S, qk_scale, HAS_PAD, CAUSAL, PREC, BM, BN,
                                   BAND_MASK)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptr = O + b * s_ob + h * s_oh + offs_m[:, None] * s_ot + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=qmask)
    # log2-domain log-sum-exp (-inf for a row with no visible key)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh * Tq + offs_m, lse, mask=offs_m < Tq)


@triton.jit
def _delta_rows(O, DO, DLSE, DELTA, bh, offs_m, H, Tq, D, s_ob, s_oh, s_ot, s_db, s_dh, s_dt, HAS_DLSE: tl.constexpr,
                BD: tl.constexpr):
    """delta_i = do_i . o_i - dlse_i for the rows offs_m, in fp32, without materialising fp32 copies of o and do
    (each in its own layout: o the forward's, do the caller's)."""
    offs_d = tl.arange(0, BD)
    mask = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + row_base(bh, H, s_ob, s_oh) + offs_m[:, None] * s_ot + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + row_base(bh, H, s_db, s_dh) + offs_m[:, None] * s_dt + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    tl.store(DELTA + bh * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _dkdv_tile(dk, dv, k, v, real, Q, DO, LSE, DELTA, b, h, bh, s_qb, s_qh, s_qt,
               do_base, s_dt, m0, sel, edge, kj, offs_m, offs_d, Tq,
               Tk, D, W, S, off, qk_scale, CAUSAL: tl.constexpr, PREC: tl.constexpr, HAS_BLOCKS: tl.constexpr,
               HAS_PAD: tl.constexpr, MASK: tl.constexpr):
    """One query tile [m0, m0 + BM)'s contribution to a key tile's dk, dv, masked as `_masked` says (rows past Tq
    read lse = inf, so p = 0 there under either mask)."""
    qi = m0 + offs_m
    qmask = (qi < Tq)[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + qi[:, None] * s_qt + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + do_base + qi[:, None] * s_dt + offs_d[None, :], mask=qmask, other=0.0)
    lse = tl.load(LSE + bh * Tq + qi, mask=qi < Tq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # a row with no visible key: p = 0
    delta = tl.load(DELTA + bh * Tq + qi, mask=qi < Tq, other=0.0)
    s = dot(q, tl.trans(k), PREC) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if MASK == 3:  # no padding here
        if edge:
            blo, bhi = _band_bounds(qi + off, Tk, W, CAUSAL)
            p = tl.where((kj[None, :] >= blo[:, None]) & (kj[None, :] <= bhi[:, None]), p, 0.0)
    elif MASK == 1:
        blo, bhi = _band_bounds(qi + off, Tk, W, CAUSAL)
        p = tl.where((kj[None, :] >= blo[:, None]) & (kj[None, :] <= bhi[:, None]) & real[None, :], p, 0.0)
    else:
        ok = _pattern_ok(qi + off, kj, Tk, W, S, sel, CAUSAL, HAS_BLOCKS) & real[None, :] & (qi < Tq)[:, None]
        p = tl.where(ok, p, 0.0)
    dv += dot(tl.trans(to(p, do.dtype, PREC)), do, PREC)
    dp = dot(do, tl.trans(v), PREC)
    ds = p * (dp - delta[:, None])
    dk += dot(tl.trans(to(ds, q.dtype, PREC)), q, PREC)
    return dk, dv


@triton.jit
def _dkdv_tiles(dk, dv, k, v, real, Q, DO, LSE, DELTA, b, h, bh, s_qb, s_qh, s_qt,
                do_base, s_dt, start, end, n0, kj, offs_m, offs_d, Tq,
                Tk, D, W, S, off, qk_scale, CAUSAL: tl.constexpr, PREC: tl.constexpr, HAS_PAD: tl.constexpr,
                MASK: tl.constexpr, BM: tl.constexpr):
    """The query tiles [start, end) of a key tile's dk, dv (start on a tile edge), as `_fwd_tiles` for the forward."""
    for m0 in range(start, end, BM):
        dk, dv = _dkdv_tile(dk, dv, k, v, real, Q, DO, LSE, DELTA, b, h, bh, s_qb, s_qh, s_qt,
                            do_base, s_dt, m0, 0, _edge(n0, kj.shape[0], m0, BM, off, Tk, W, CAUSAL), kj, offs_m,
                            offs_d, Tq, Tk, D, W, S, off, qk_scale, CAUSAL, PREC, False, HAS_PAD, MASK)
    return dk, dv


@triton.jit
def _dkdv_band(n0, off, W, Tq, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The query range [q_lo, q_hi) whose band reaches the key tile [n0, n0 + BN) (q_lo on a tile edge), and hb,
    the first query tile edge past the tiles a loop `range(q_lo, q_hi, BM)` visits."""
    if CAUSAL:
        q_lo = tl.maximum(n0 - off, 0)
    else:
        q_lo = tl.maximum(n0 - W - off, 0)
    q_hi = tl.minimum(n0 + BN - 1 + W - off + 1, Tq)
    q_lo = (q_lo // BM) * BM
    hb = tl.maximum(q_lo, ((tl.maximum(q_hi, 0) + BM - 1) // BM) * BM)
    return q_lo, q_hi, hb


@triton.jit
def _dkdv_key_tile(K, V, PAD, bh, tile, H, G, Tq, Tk, D, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, HAS_PAD: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    """A dk / dv program's key tile [n0, n0 + BN): its batch and query head, k, v (of the kv head the query head
    reads), which keys are real, and the offsets the query loop needs."""
    b, h = bh // H, bh % H
    hk = h // G  # the kv head this query head reads (GQA: G query heads per kv head)
    n0 = tile * BN
    kj = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    kmask = (kj < Tk)[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + b * s_kb + hk * s_kh + kj[:, None] * s_kt + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + kj[:, None] * s_vt + offs_d[None, :], mask=kmask, other=0.0)
    real = tl.full([BN], 1, tl.int1)
    if HAS_PAD:
        real = tl.load(PAD + b * Tk + kj, mask=kj < Tk, other=0) != 0
    return b, h, Tk - Tq, n0, kj, tl.arange(0, BM), offs_d, k, v, real, kmask


@triton.jit
def _bwd_prep(O, DO, DLSE, DELTA, Q, K, V, PAD, LSE, DKP, DVP, H, G, Tq, Tk, D, W, S, qk_scale, NST, NCH,
              s_ob, s_oh, s_ot, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt,
              HAS_DLSE: tl.constexpr, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
              BMD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CH: tl.constexpr):
    """The backward's first launch, one program per (chunk of CH queries, batch x head): delta for the chunk's rows
    (`_delta_rows`, BMD at a time), then, when sink tiles take partials (NST > 0), each sink tile's dk, dv from the
    chunk's queries that its band does not reach (every later query sees a sink; every query when not causal), so
    that no program walks all T queries alone: fp32 partials [B*H, NST, NCH, BN, BD] that `_bwd`'s sink-tile
    programs add to their band's share. The partials read the chunk's delta this program wrote (a barrier between:
    every thread's stores are visible to the whole program after it). Without sink partials CH = BMD: a plain delta
    pass."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    c0 = c * CH
    c1 = tl.minimum(c0 + CH, Tq)
    for r0 in range(c0, c1, BMD):
        _delta_rows(O, DO, DLSE, DELTA, bh, r0 + tl.arange(0, BMD), H, Tq, D, s_ob, s_oh, s_ot, s_db, s_dh, s_dt,
                    HAS_DLSE, BD)
    if NST > 0:
        tl.debug_barrier()
        for st in range(0, NST):
            b, h, off, n0, kj, offs_m, offs_d, k, v, real, kmask = _dkdv_key_tile(
                K, V, PAD, bh, st, H, G, Tq, Tk, D, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, HAS_PAD, BM, BN, BD)
            do_base = b * s_db + h * s_dh
            dk = tl.zeros([BN, BD], tl.float32)
            dv = tl.zeros([BN, BD], tl.float32)
            q_lo, q_hi, hb = _dkdv_band(n0, off, W, Tq, CAUSAL, BM, BN)
            if not CAUSAL:  # queries before the band (causal: they see none of this tile's keys)
                dk, dv = _dkdv_tiles(dk, dv, k, v, real, Q, DO, LSE, DELTA, b, h, bh, s_qb, s_qh, s_qt, do_base, s_dt,
                                     c0, tl.minimum(c1, q_lo), n0, kj, offs_m, offs_d, Tq, Tk, D, W, S, off, qk_scale,
                                     CAUSAL, PREC, HAS_PAD, 2, BM)
            # queries after the band
            dk, dv = _dkdv_tiles(dk, dv, k, v, real, Q, DO, LSE, DELTA, b, h, bh, s_qb, s_qh, s_qt,
                                 do_base, s_dt, tl.maximum(c0, hb), c1,
                                 n0, kj, offs_m, offs_d, Tq, Tk, D, W, S, off, qk_scale, CAUSAL, PREC, HAS_PAD, 2, BM)
            p_off = (((bh * NST + st) * NCH + c) * BN + tl.arange(0, BN)[:, None]) * BD + offs_d[None, :]
            tl.store(DKP + p_off, dk)
            tl.store(DVP + p_off, dv)


@triton.jit
def _dkdv_program(pid_n, bh, Q, K, V, PAD, DO, LSE, DELTA, DK, DV, LAY, IDXT, CNTT, DKP, DVP, H, G, Tq, Tk, D, W, S,
                  qk_scale, scale, NB, MAXNT, HL, NST, NCH, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                  s_db, s_dh, s_dt, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
                  HAS_BLOCKS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                  BAND_MASK: tl.constexpr):
    """Key tile pid_n's dk, dv (of query head bh's row): the query tiles whose band reaches it, BM at a time."""
    b, h, off, n0, kj, offs_m, offs_d, k, v, real, kmask = _dkdv_key_tile(
        K, V, PAD, bh, pid_n, H, G, Tq, Tk, D, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, HAS_PAD, BM, BN, BD)
    do_base = b * s_db + h * s_dh
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    if HAS_BLOCKS:  # the query tiles whose rows of the block tables list this key tile (the transposed tables)
        base = (h * HL) * NB
        for i in range(0, tl.load(CNTT + base + pid_n)):
            qb = tl.load(IDXT + (base + pid_n) * MAXNT + i)
            dk, dv = _dkdv_tile(dk, dv, k, v, real, Q, DO, LSE, DELTA, b, h, bh, s_qb, s_qh, s_qt,
                                do_base, s_dt, qb * BM,
                                tl.load(LAY + (base + qb) * NB + pid_n), True, kj, offs_m, offs_d, Tq, Tk, D, W, S, off,
                                qk_scale, CAUSAL, PREC, True, HAS_PAD, 2)
    else:
        # the queries whose band reaches this key tile; a tile holding sinks is seen by every later query too:
        # those outside its band came from `_bwd_prep`, in chunks, as fp32 partials added here
        q_lo, q_hi, _ = _dkdv_band(n0, off, W, Tq, CAUSAL, BM, BN)
        if n0 < S and NST == 0:  # no partials (the queries fit one chunk): the sink tile walks them all itself
            q_hi = Tq
            if not CAUSAL:
                q_lo = 0
        if n0 < S:  # a tile that holds sinks: the whole rule
            dk, dv = _dkdv_tiles(dk, dv, k, v, real, Q, DO, LSE, DELTA, b, h, bh, s_qb, s_qh, s_qt,
                                 do_base, s_dt, q_lo, q_hi, n0, kj,
                                 offs_m, offs_d, Tq, Tk, D, W, S, off, qk_scale, CAUSAL, PREC, HAS_PAD, 2, BM)
        else:
            dk, dv = _dkdv_tiles(dk, dv, k, v, real, Q, DO, LSE, DELTA, b, h, bh, s_qb, s_qh, s_qt,
                                 do_base, s_dt, q_lo, q_hi, n0, kj,
                                 offs_m, offs_d, Tq, Tk, D, W, S, off, qk_scale, CAUSAL, PREC, HAS_PAD, BAND_MASK, BM)
        if pid_n < NST:
            p_base = ((bh * NST + pid_n) * NCH * BN + tl.arange(0, BN)[:, None]) * BD + offs_d[None, :]
            for c in range(0, NCH):
                dk += tl.load(DKP + p_base + c * BN * BD)
                dv += tl.load(DVP + p_base + c * BN * BD)
    dk = dk * scale
    o_off = bh * Tk * D + kj[:, None] * D + offs_d[None, :]
    tl.store(DK + o_off, dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + o_off, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, s0, sel, pos, blo, bhi, edge,
             offs_n, offs_d, Tk, D, W, S, qk_scale, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr,
             HAS_BLOCKS: tl.constexpr, MASK: tl.constexpr):
    kj = s0 + offs_n
    kmask = (kj < Tk)[:, None] & (offs_d < D)[None, :]
    k = tl.load(K + k_base + kj[:, None] * s_kt + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + v_base + kj[:, None] * s_vt + offs_d[None, :], mask=kmask, other=0.0)
    s = dot(q, tl.trans(k), PREC) * qk_scale
    p = _masked(tl.exp2(s - lse[:, None]), 0.0, pos, kj, blo, bhi, edge, Tk, W, S, sel, PAD, pad_base, HAS_PAD, CAUSAL,
                HAS_BLOCKS, MASK)
    dp = dot(do, tl.trans(v), PREC)
    ds = p * (dp - delta[:, None])
    dq += dot(to(ds, k.dtype, PREC), k, PREC)
    return dq


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, start, end, m0, off, pos, blo,
              bhi, offs_n, offs_d, Tk, D, W, S, qk_scale, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr,
              PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr):
    for s0 in range(start, end, BN):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, s0, 0, pos, blo, bhi,
                      _edge(s0, BN, m0, BM, off, Tk, W, CAUSAL), offs_n, offs_d, Tk, D, W, S, qk_scale, HAS_PAD,
                      CAUSAL, PREC, False, MASK)
    return dq


@triton.jit
def _dq_program(pid_m, bh, Q, K, V, PAD, DO, LSE, DELTA, DQ, LAY, IDX, CNT, H, G, Tq, Tk, D, W, S, qk_scale, scale, NB,
                MAXN, HL, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt,
                HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, HAS_BLOCKS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BAND_MASK: tl.constexpr):
    """Query tile pid_m's dq (query head bh's row): the forward's key loop, BN at a time."""
    b, h = bh // H, bh % H
    hk = h // G  # the kv head this query head reads (GQA: G query heads per kv head)
    off = Tk - Tq
    m0 = pid_m * BM
    offs_m = m0 + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    qmask = (offs_m < Tq)[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qt + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_dt + offs_d[None, :], mask=qmask, other=0.0)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    pos = offs_m + off
    k_base, v_base, pad_base = b * s_kb + hk * s_kh, b * s_vb + hk * s_vh, b * Tk
    dq = tl.zeros([BM, BD], tl.float32)
    if HAS_BLOCKS:
        row = (h * HL) * NB + pid_m
        for i in range(0, tl.load(CNT + row)):
            kb = tl.load(IDX + row * MAXN + i)
            dq = _dq_tile(dq, q, do, lse, delta, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, kb * BN,
                          tl.load(LAY + row * NB + kb), pos, pos, pos, True, offs_n, offs_d, Tk, D, W, S, qk_scale,
                          HAS_PAD, CAUSAL, PREC, True, 2)
    else:
        lo, hi, sink_end = _key_range(m0, BM, off, Tk, W, S, CAUSAL, BN)
        blo, bhi = _band_bounds(pos, Tk, W, CAUSAL)
        dq = _dq_tiles(dq, q, do, lse, delta, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, 0, sink_end, m0, off,
                       pos, blo, bhi, offs_n, offs_d, Tk, D, W, S, qk_scale, HAS_PAD, CAUSAL, PREC, BM, BN, 2)
        dq = _dq_tiles(dq, q, do, lse, delta, K, V, PAD, k_base, v_base, pad_base, s_kt, s_vt, lo, hi, m0, off, pos,
                       blo, bhi, offs_n, offs_d, Tk, D, W, S, qk_scale, HAS_PAD, CAUSAL, PREC, BM, BN, BAND_MASK)
    tl.store(DQ + bh * Tq * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=qmask)


@triton.jit
def _bwd(Q, K, V, PAD, DO, LSE, DELTA, DQ, DK, DV, LAY, IDX, CNT, IDXT, CNTT, DKP, DVP, H, G, Tq, Tk, D, W, S,
         qk_scale, scale, NB, MAXN, MAXNT, HL, NST, NCH, NKT, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
         s_db, s_dh, s_dt, HAS_PAD: tl.constexpr, CAUSAL: tl.constexpr, PREC: tl.constexpr, HAS_BLOCKS: tl.constexpr,
         KV_BM: tl.constexpr, KV_BN: tl.constexpr, Q_BM: tl.constexpr, Q_BN: tl.constexpr, BD: tl.constexpr,
         BAND_MASK: tl.constexpr, PART: tl.constexpr):
    """The backward's second launch, as FlexAttention's: programs [0, NKT) are the key tiles' dk, dv
    (`_dkdv_program`, key tiles of KV_BN walking query tiles of KV_BM), the rest the query tiles' dq (`_dq_program`,
    Q_BM walking Q_BN); they read only what `_bwd_prep` wrote before, so one launch serves both (on the H200's host a
    Triton launch costs tens of microseconds: at a few thousand tokens the call is the host's). PART 1 / 2: only the
    dk, dv / only the dq programs (pid their tile), each compiled alone (`BWD_LAUNCHES`)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    if PART == 0:
        is_kv, q_tile = pid < NKT, pid - NKT
    else:  # is_kv a constant: the other kind's code is dropped when the kernel is compiled
        is_kv, q_tile = PART == 1, pid
    if is_kv:
        _dkdv_program(pid, bh, Q, K, V, PAD, DO, LSE, DELTA, DK, DV, LAY, IDXT, CNTT, DKP, DVP, H, G, Tq, Tk, D, W, S,
                      qk_scale, scale, NB, MAXNT, HL, NST, NCH, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                      s_db, s_dh, s_dt, HAS_PAD, CAUSAL, PREC, HAS_BLOCKS, KV_BM, KV_BN, BD, BAND_MASK)
    else:
        _dq_program(q_tile, bh, Q, K, V, PAD, DO, LSE, DELTA, DQ, LAY, IDX, CNT, H, G, Tq, Tk, D, W,
                    S, qk_scale, scale, NB, MAXN, HL, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh,
                    s_dt, HAS_PAD, CAUSAL, PREC, HAS_BLOCKS, Q_BM, Q_BN, BD, BAND_MASK)


CUDA_ONLY = ("maxnreg",)  # launch settings only Triton's CUDA backend takes (its HIP one raises on them)


def _config(stage: str, d: int) -> dict:
    if interpreted():
        return INTERPRETED[stage]
    cfg = (CONFIG if d <= 64 else CONFIG_WIDE)[stage]
    return cfg if torch.version.hip is None else {k: v for k, v in cfg.items() if k not in CUDA_ONLY}


def _launch(cfg: dict, blocks=None) -> tuple[dict, dict]:
    """(tile sizes, launch settings) of a CONFIG entry; a block pattern's tiles are its blocks."""
    tiles = {k: cfg[k] for k in ("BM", "BN")}
    if blocks is not None:
        tiles = {"BM": blocks.block_size, "BN": blocks.block_size}
    return tiles, {k: v for k, v in cfg.items() if k not in ("BM", "BN")}


class BlockTables(NamedTuple):
    """A block pattern's tables for the kernels (`block_tables`): per layout head and block row, the key tiles to
    visit (those the layout keeps, and those the window's band or the sinks reach) and, transposed, the query tiles
    that visit each key tile; `lay` says which tiles the layout keeps whole (the rest: the window's mask)."""
    lay: torch.Tensor  # int8 [Hl, nb, nb]
    idx: torch.Tensor  # int32 [Hl, nb, maxn]: the visited key tiles of each query tile, ascending
    cnt: torch.Tensor  # int32 [Hl, nb]
    idxt: torch.Tensor  # int32 [Hl, nb, maxnt]: the query tiles that visit each key tile
    cntt: torch.Tensor  # int32 [Hl, nb]
    block_size: int


BLOCK_SIZES = (16, 32, 64)  # the tile sizes the kernels run a block pattern with (BM = BN = the block size)


def block_tables(visit: torch.Tensor, layout: torch.Tensor, block_size: int, device) -> BlockTables:
    """BlockTables from Bool[Hl, nb, nb] tables: `visit`, the tiles holding any visible pair (causal applied), and
    `layout`, the tiles the block part keeps."""
    def lists(t):
        cnt = t.sum(-1).to(torch.int32)
        width = max(1, int(cnt.max()))
        idx = torch.argsort((~t).to(torch.int8), dim=-1, stable=True)[..., :width].to(torch.int32)  # True first
        return idx.contiguous().to(device), cnt.contiguous().to(device)

    idx, cnt = lists(visit)
    idxt, cntt = lists(visit.transpose(-1, -2))
    return BlockTables(layout.to(torch.int8).contiguous().to(device), idx, cnt, idxt, cntt, int(block_size))


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pad, window, sinks, causal, scale, blocks, need_lse):
        q, k, v = unit_stride(q, k, v)
        b, h, tq, d = q.shape
        tk = k.shape[2]
        groups = h // k.shape[1]
        # [B, H, Tq, D] with [B, Tq, H, D] memory: what transformers turns it into next (out.transpose(1, 2)) is then
        # contiguous already, no copy
        out = torch.empty(b, tq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse2 = torch.empty(b, h, tq, dtype=torch.float32, device=q.device)
        pad_arg = pad if pad is not None else out  # never read when HAS_PAD is False
        band = BAND_MODES[BAND]
        if band == 3 and pad is not None:  # padding can hide any key: every band tile is masked
            band = 1
        meta = dict(HAS_PAD=pad is not None, CAUSAL=bool(causal), PREC=precision(q), HAS_BLOCKS=blocks is not None,
                    BD=max(16, triton.next_power_of_2(d)), BAND_MASK=band)
        tiles, launch = _launch(_config("fwd", d), blocks)
        grid = (triton.cdiv(tq, tiles["BM"]), b * h)
        tab = _table_args(blocks, lse2)
        _fwd[grid](q, k, v, pad_arg, out, lse2, tab.lay, tab.idx, tab.cnt, h, groups, tq, tk, d, int(window),
                   int(sinks), scale * LOG2E, tab.nb, tab.maxn, tab.hl, *strides(q, k, v, out), **meta, **tiles,
                   **launch)
        ctx.save_for_backward(q, k, v, pad, out, lse2)
        ctx.args = (int(window), int(sinks), float(scale), meta, blocks)
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None: no zeros filled, none read
        return out, (lse2 * math.log(2.0) if need_lse else None)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, pad, out, lse2 = ctx.saved_tensors
        window, sinks, scale, meta, blocks = ctx.args
        b, h, tq, d = q.shape
        hkv, tk = k.shape[1], k.shape[2]
        if dout is None:
            dout = torch.zeros_like(out)
        # read in the caller's layout (no copy), unless wider than 32-bit offsets reach (`limits.narrowed`)
        (dout,) = unit_stride(_limits.narrowed(dout))
        delta = torch.empty(b, h, tq, dtype=torch.float32, device=q.device)
        dlse_arg = dlse.float().contiguous() if dlse is not None else delta
        dq = torch.empty(b, h, tq, d, dtype=q.dtype, device=q.device)
        # one dk, dv per query head (each program owns its tile: no atomics); GQA sums each group's in fp32 below
        dk = torch.empty(b, h, tk, d, dtype=k.dtype if hkv == h else torch.float32, device=q.device)
        dv = torch.empty(b, h, tk, d, dtype=v.dtype if hkv == h else torch.float32, device=q.device)
        pad_arg = pad if pad is not None else out
        tab = _table_args(blocks, lse2)
        qkv_do = strides(q, k, v, dout)
        kv_tiles, _ = _launch(_config("dkdv", d), blocks)
        q_tiles, _ = _launch(_config("dq", d), blocks)
        launch = _config("bwd", d)
        # the sink tiles' dk, dv from the queries outside their band, in chunks of SINK_CHUNK_TILES query tiles, in
        # the launch that writes delta (queries that fit one chunk: the sink tiles' own programs walk them)
        chunk = SINK_CHUNK_TILES * kv_tiles["BM"]
        nch = triton.cdiv(tq, chunk)
        nst = 0 if blocks is not None or nch == 1 else triton.cdiv(min(sinks, tk), kv_tiles["BN"])
        bmd = 16 if interpreted() else 64  # delta's rows at a time
        if nst:
            bmd = min(bmd, chunk & -chunk)  # a power of two dividing the chunk
        else:
            chunk = bmd  # a plain delta pass
            nch = triton.cdiv(tq, chunk)
        dkp = dvp = delta  # never read when there is no sink tile
        if nst:
            dkp, dvp = torch.empty(2, b * h, nst, nch, kv_tiles["BN"], meta["BD"], dtype=torch.float32,
                                   device=q.device).unbind(0)
        _bwd_prep[(nch, b * h)](out, dout, dlse_arg, delta, q, k, v, pad_arg, lse2, dkp, dvp, h, h // hkv, tq, tk, d,
                                window, sinks, scale * LOG2E, nst, nch, *strides(out), *qkv_do,
                                HAS_DLSE=dlse is not None, HAS_PAD=meta["HAS_PAD"], CAUSAL=meta["CAUSAL"],
                                PREC=meta["PREC"], BMD=bmd, BD=meta["BD"], CH=chunk, **kv_tiles, **launch)
        nkt, nqt = triton.cdiv(tk, kv_tiles["BN"]), triton.cdiv(tq, q_tiles["BM"])

        def bwd(part: int, programs: int):
            _bwd[(programs, b * h)](
                q, k, v, pad_arg, dout, lse2, delta, dq, dk, dv, tab.lay, tab.idx, tab.cnt, tab.idxt, tab.cntt, dkp,
                dvp, h, h // hkv, tq, tk, d, window, sinks, scale * LOG2E, scale, tab.nb, tab.maxn, tab.maxnt, tab.hl,
                nst, nch, nkt, *qkv_do, **meta, KV_BM=kv_tiles["BM"], KV_BN=kv_tiles["BN"], Q_BM=q_tiles["BM"],
                Q_BN=q_tiles["BN"], PART=part, **launch)
        launches = bwd_launches(b * h * tq)
        if launches == "one":
            bwd(0, nkt + nqt)
        elif launches == "two":
            bwd(1, nkt)
            bwd(2, nqt)
        else:  # dq's programs on a second stream beside dk, dv's (they write different tensors)
            concurrently(lambda: bwd(2, nqt), lambda: bwd(1, nkt), q.device)
        if hkv != h:
            dk = dk.view(b, hkv, h // hkv, tk, d).sum(2).to(k.dtype)
            dv = dv.view(b, hkv, h // hkv, tk, d).sum(2).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None


class _TableArgs(NamedTuple):
    lay: torch.Tensor
    idx: torch.Tensor
    cnt: torch.Tensor
    idxt: torch.Tensor
    cntt: torch.Tensor
    nb: int
    maxn: int
    maxnt: int
    hl: int


def _table_args(blocks: BlockTables | None, dummy: torch.Tensor) -> _TableArgs:
    """The kernels' table arguments (a dummy tensor, never read, for the plain window)."""
    if blocks is None:
        return _TableArgs(dummy, dummy, dummy, dummy, dummy, 1, 1, 1, 0)
    return _TableArgs(blocks.lay, blocks.idx, blocks.cnt, blocks.idxt, blocks.cntt, blocks.lay.shape[-1],
                      blocks.idx.shape[-1], blocks.idxt.shape[-1], int(blocks.lay.shape[0] > 1))


def window_attention(q, k, v, *, window: int, sinks: int = 0, causal: bool = False, scale: float | None = None,
                     key_padding_mask: torch.Tensor | None = None, blocks: BlockTables | None = None,
                     need_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out [B, H, Tq, D], lse [B, H, Tq] fp32, natural log; None unless need_lse) of sliding-window attention with
    sinks.
    q [B, H, Tq, D], k, v [B, Hkv, Tk, D] with Hkv dividing H (grouped-query attention: each query head reads its
    kv head in the kernel, no expanded copies), key_padding_mask Bool[B, Tk] (True: real key).
    Differentiable in q, k, v and through lse.

    `blocks` (`block_tables`): a block pattern united with the window and the sinks (`window=-1, sinks=0`: the
    blocks alone), for self-attention (Tq == Tk) in tiles of the block size (16, 32 or 64): each query tile visits
    only the key tiles its row lists, a tile the layout keeps is visible whole (causal still applies), any other
    pair by the window's rule."""
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] or v.shape[1] != k.shape[1]:
        raise ValueError(f"window_attention: kv heads ({k.shape[1]}, v {v.shape[1]}) must be equal and divide the "
                         f"query heads ({q.shape[1]})")
    check_call("window_attention", max(q.shape[-2], k.shape[-2]), q, k, v, heads=q.shape[1], head_dim=q.shape[-1])
    split = in_batch_pieces("window_attention", q.shape[0], q.shape[1], lambda lo, hi: window_attention(
        q[lo:hi], k[lo:hi], v[lo:hi], window=window, sinks=sinks, causal=causal, scale=scale,
        key_padding_mask=piece(key_padding_mask, lo, hi), blocks=blocks, need_lse=need_lse))
    if split is not None:
        return split
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # the kernels take max(s) * scale for the max of s * scale: true for a positive scale only
    if scale < 0:
        q, scale = -q, -scale
    if scale * LOG2E < torch.finfo(torch.float32).tiny:  # zero, or zero once the kernels hold it in fp32
        q, scale = q * 0, 1.0
    window = min(int(window), max(q.shape[-2], k.shape[-2]))  # the same mask; keeps the kernel's int32 sums in range
    if blocks is not None:
        nb = -(-k.shape[-2] // blocks.block_size)
        if q.shape[-2] != k.shape[-2] or blocks.lay.shape[-1] != nb or blocks.block_size not in BLOCK_SIZES:
            raise ValueError(f"window_attention: block tables of {blocks.lay.shape[-1]} blocks of "
                             f"{blocks.block_size} tokens serve self-attention of {nb} blocks (block sizes "
                             f"{BLOCK_SIZES}); got Tq={q.shape[-2]}, Tk={k.shape[-2]}")
        if blocks.lay.shape[0] not in (1, q.shape[1]):
            raise ValueError(f"window_attention: block tables for {blocks.lay.shape[0]} heads, the query has "
                             f"{q.shape[1]}")
    pad = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    return _WindowAttention.apply(q, k, v, pad, window, sinks, causal, scale, blocks, bool(need_lse))
