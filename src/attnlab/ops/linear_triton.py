"""Causal linear attention as Triton kernels: flash-linear-attention's chunked form, written for attnlab's
normaliser and key log-scales.

    num_i = sum_{j <= i} w_ij (q_i . k_j) v_j,   den_i = sum_{j <= i} w_ij (q_i . k_j),   w_ij = e^{b_j - M_i}

q, k [BH, T, F] (features), v [BH, T, D]; without key log-scales b, w_ij = 1. GQA: k, v and b may have H / G
heads (query row bh reads kv row bh // G; the states are the kv heads'). The forward kernels can also take raw q, k
and apply an elementwise feature map as they load them (`_feature`, `causal_linear(feature_map=)`: inference).
M_i is query i's running max of b over the keys it sees (the stabiliser of `ops.linear`'s module doc, detached);
out = num / den, and 0 for a row whose den is exactly 0 (no visible key).

Forward, as flash-linear-attention's `chunk` kernels (two passes, so that only the state recurrence is
sequential):
1. `_state_kernel`: one program per (head, 64 features, value block, segment of chunks) walks its chunks in
   order, keeps S = sum_j e^{b_j - P} k_j v_j^T and z = sum_j e^{b_j - P} k_j in registers (fp32; P: the max
   b of the keys in the state) and writes the state entering every chunk, H [BH, N, F, D] in the inputs'
   dtype (the dtype its matmul reads it in) and Z [BH, N, F] in fp32. A segment starts from the sums of the
   segments before it (the same kernel with SUMS first: all segments in parallel, fp32), so that the sequential chain
   is ~2 sqrt(N) steps, not N: with batch 1 and few heads the walk ran on a few SMs, latency-bound
   (0.1 ms a layer at 4k tokens on the H200, longer than cuDNN's whole causal attention there).
   P for the key log-scales: found by this pass itself (`OWN_P`, `_state_kernel`'s docstring), or, with OWN_P off
   and after the parallel forward (the backward's), one launch of `_exclusive_chunk_max`; without log-scales the
   shared tables of b = 0 (`no_scale_tables`).
2. `_out_kernel`: one program per (head, chunk), all in parallel: num = e^{P_c - M_i} q H[c] + the masked
   intra-chunk quadratic form, den likewise.
Short inputs (up to `parallel_max_t` tokens) skip both: `_parallel_kernel` runs the quadratic form in one pass,
one program per (head, query chunk) over the key chunks up to its own (flash attention's walk, with q k^T in place
of the softmax and a running max of b as the stabiliser), writing the same out and den. There the chunked form's
state walk (one program per kv head and value block, one chunk after another) is latency-bound and costs a second
launch. Its backward (`_parallel_dq_kernel`, `_parallel_dkv_kernel`, features up to PARALLEL_BWD_MAX_F) is the
quadratic form's too, dk and dv per kv head over its group's query heads.
Layouts: the forward kernels and the parallel backward read q, k, v with their batch / head / token strides
(transformers hands over [B, H, T, D] views of [B, T, H, D] memory) and the output is written as [B, T, H, D]
memory, so a swapped layer makes no copies; the chunked backward reads v where it lies and copies q, k to
contiguous rows (none for contiguous [B, H, T, F] features, as FAVOR+'s kernel and `_map_features` write them), and
both backwards write dq, dk, dv in the inputs' layouts (`torch.empty_like` keeps their order of strides: no copy on
their way back through transformers' transpose and view, two copy kernels a SmolLM2 layer otherwise,
`benchmarks/results/model_bench/h200/grad_rule/`).
Chunked backward: H, Z as the forward wrote them (per kv head, kept: O(T F D / 64) memory, for a state walk fewer:
performer's fwd+bwd step in a SmolLM2 CUDA graph 4-6% shorter at 1k-16k tokens, its peak 0.05-0.7 GiB higher;
recomputed only after the parallel forward), `_grad_state_kernel` walks the chunks in reverse per kv head or per
query head (`reverse_walk`; in segments, as the forward's) and writes G[c] = sum over its group's query heads (or its
query head) and the rows i after chunk c of e^{P_{c+1} - M_i} q_i dnum_i^T, and GZ[c] (every factor <= 1 since M_i >= P_{c+1}); then `_grad_dq_kernel` computes
dq per query head and `_grad_dkv_kernel` dk per kv head and feature block, dv per kv head (its group summed in
registers: no expanded k, v, no gradient per query head) of every chunk in parallel (and the key log-scales' db_j = k_j . dk_j). The division
out = num / den happens in `_out_kernel`, and its gradient in `_grad_prep_kernel` from out and den
(flash-attention's delta trick), so no fp32 [T, D] tensor is ever stored.

Precision as `ops.linear`: matmuls in the inputs' dtype with fp32 accumulation (fp32 inputs: IEEE fp32,
not TF32, as torch.matmul); states carried in fp32 (stored in the inputs' dtype, which their matmul reads),
normalisers and the weights in fp32. A causal row never reads a later
key: intra-chunk weights are exactly 0 above the diagonal, and the state entering chunk c holds chunks < c.
The kernels also run on CPU tensors under TRITON_INTERPRET=1 (how the CPU tests check them).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..types import records_grad
from . import limits as _limits
from .limits import check_call, in_batch_pieces, piece
from .triton_common import dot as _dot
from .triton_common import precision as _precision
from .triton_common import row_base as _row
from .triton_common import strides as _strides
from .triton_common import concurrently
from .triton_common import unit_stride as _unit_stride
from .triton_common import to as _to

BT = 64  # tokens per chunk
BK = 64  # features per program
# launch settings: the fastest measured on an H100 at 64k tokens (benchmarks/results/history/h100/triton/tune.json);
# the parallel pass's (key tile BN too) on the H200 at 1024 tokens, SmolLM2's shapes (benchmarks/short_calls.py
# --configs: 18.8 us a call against 29.8 with 64-token tiles, 4 warps, 2 stages; SDPA 14.0)
CONFIG = {"state": dict(num_warps=4, num_stages=3), "out": dict(num_warps=4, num_stages=2),
          "grad": dict(num_warps=4, num_stages=2), "parallel": dict(BN=128, num_warps=4, num_stages=3),
          # the parallel pass with more than 64 features (every feature in one tile: FAVOR+'s 256, [64, 256] query
          # tiles), the fastest at 1024 tokens and F = 256 on the H200 (short_calls.py --configs: 72 us a call, 96
          # with 64-key tiles and 8 warps; the chunked passes take 44)
          "parallel_wide": dict(BN=32, num_warps=4, num_stages=2)}
# value columns per program of the sequential passes, forward and backward (None: `state_bv`'s rule); tests and
# benchmarks/tune_triton.py set it
STATE_BV: int | None = None


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _rel_exp(a, m):
    """e^{a - m} for a <= m, and 0 where a is -inf (also when m is: never exp(-inf - -inf))."""
    return tl.where(a == float("-inf"), 0.0, tl.exp(a - tl.where(m == float("-inf"), 0.0, m)))


@triton.jit
def _feature(x, MAP: tl.constexpr, PREC: tl.constexpr):
    """An elementwise feature map applied on load (MAP 1: elu(x) + 1, which is exp(x) for x <= 0; 2: relu(x); the
    kernels call it only with MAP != 0), computed in fp32 and rounded to x's dtype, as `feature_maps.ELU` / `ReLU` do.
    Edge cases differ from PyTorch's: fp32 elu+1 far below -17 (exp(x) here, expm1(x) + 1 = 0 there), relu of NaN."""
    xf = x.to(tl.float32)
    if MAP == 1:
        y = tl.where(xf > 0, xf + 1.0, tl.exp(xf))
    else:
        y = tl.maximum(xf, 0.0)
    return _to(y, x.dtype, PREC)


@triton.jit
def _mapped(x, mask, MAP: tl.constexpr, PREC: tl.constexpr):
    """x mapped on load (`_feature`) where mask holds and 0 elsewhere (the map of a loaded 0 is 1 for elu: rows past
    T and features past F stay 0, as in the unfused path); x itself when MAP is 0."""
    if MAP != 0:
        x = tl.where(mask, _feature(x, MAP, PREC), 0.0)
    return x


@triton.jit
def _feature_grad(phi, MAP: tl.constexpr):
    """d feature / dx of `_feature`'s maps in fp32, from the feature phi itself: elu + 1 is x + 1 > 1 for x > 0
    (slope 1) and e^x <= 1 below (slope e^x = phi), so the slope is min(phi, 1); relu's is 1 where phi > 0, else 0
    (at 0 too, as PyTorch's)."""
    pf = phi.to(tl.float32)
    if MAP == 1:
        return tl.minimum(pf, 1.0)
    return tl.where(pf > 0, 1.0, 0.0)


@triton.jit
def _map_rows(X, Y, row, NH, s_b, s_h, s_t, t, tmask, offs_f, fmask, T, F, MAP: tl.constexpr, PREC: tl.constexpr):
    x = tl.load(X + _row(row, NH, s_b, s_h) + t[:, None] * s_t + offs_f[None, :], mask=tmask[:, None] & fmask[None, :],
                other=0.0)
    tl.store(Y + row * T * F + t[:, None] * F + offs_f[None, :], _feature(x, MAP, PREC),
             mask=tmask[:, None] & fmask[None, :])


@triton.jit
def _map_kernel(Q, K, FQ, FK, T, F, NH, NKV, NQ, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, MAP: tl.constexpr,
                PREC: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    """The backward's features, one launch for both: phi(q) [B NH, T, F] and phi(k) [B NKV, T, F], contiguous, from q
    and k in their callers' layouts; programs (chunk, row), the NQ = B NH query rows first."""
    c = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    t = c * BT + tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    tmask, fmask = t < T, offs_f < F
    if r < NQ:
        _map_rows(Q, FQ, r, NH, s_qb, s_qh, s_qt, t, tmask, offs_f, fmask, T, F, MAP, PREC)
    else:
        _map_rows(K, FK, r - NQ, NKV, s_kb, s_kh, s_kt, t, tmask, offs_f, fmask, T, F, MAP, PREC)


@triton.jit
def _weights(LK, PEX, bh, c, n_chunks, T, offs_t, BT: tl.constexpr):
    """For chunk c: intra-chunk weights w [BT, BT] (0 above the diagonal and past T), the query factor
    e^{P_c - M_i} [BT], the key factor e^{b_j - P_{c+1}} [BT] and the state factor e^{P_c - P_{c+1}}.
    Plain linear attention runs this same path with b = 0: with constant factors Triton 3.6 fed the state
    pass's matmul from the pipelined shared-memory tile of k directly, and on an H100 the state stored for
    chunk c then held later chunks (bf16: a 0.2 causal leak, found by benchmarks/gpu_checks.py)."""
    t = c * BT + offs_t
    tri = (offs_t[:, None] >= offs_t[None, :]) & (t[None, :] < T)
    b = tl.load(LK + bh * T + t, mask=t < T, other=float("-inf"))
    p = tl.load(PEX + bh * (n_chunks + 1) + c)
    pn = tl.load(PEX + bh * (n_chunks + 1) + c + 1)
    m = tl.maximum(tl.associative_scan(b, 0, _max2), p)  # M_i
    w = _rel_exp(tl.where(tri, b[None, :], float("-inf")), m[:, None])  # masked before the exp: no overflow
    qfac = _rel_exp(p + tl.zeros([BT], tl.float32), m)
    kfac = _rel_exp(b, pn + tl.zeros([BT], tl.float32))
    sfac = _rel_exp(p, pn)
    return w, qfac, kfac, sfac


@triton.jit
def _state_kernel(K, V, LK, PEX, H, Z, SEG, SEGZ, T, F, D, n_chunks, seg_len, n_seg,
                  NKV, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, LSEG, SUMS: tl.constexpr, HAS_SCALE: tl.constexpr,
                  PREC: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr = 0,
                  OWN_P: tl.constexpr = False, BSEG: tl.constexpr = 1):
    """The state entering every chunk, H[c] = sum_{j < chunk c} e^{b_j - P_c} k_j v_j^T (in the matmul dtype,
    carried in fp32) and Z[c] (fp32), one (feature block, value block, segment of seg_len chunks) per program.
    SUMS: each segment's own sum only, all in parallel, SEG[g] = sum_{j in chunks [c0, c1)} e^{b_j - P_{c1}}
    k_j v_j^T and SEGZ[g] (fp32). Otherwise a segment starts from the earlier segments' sums brought to P_{c0}
    and walks its chunks, writing H and Z: the sequential chain is ~2 seg_len steps plus n_seg adds instead of n
    (one segment: the plain walk, SEG unread).
    OWN_P: P is not read but found along the way from b (P_{c+1} = max(P_c, max of b over chunk c)), so no launch
    before this pass computes it (`_exclusive_chunk_max`). SUMS then sums each segment with its own stabiliser,
    SEG[g] = sum_{j in segment g} e^{b_j - L_g} k_j v_j^T with L_g = LSEG[g] the max of b over the segment; the walk
    starts a segment from P_{c0} = the max of the earlier L_g (BSEG >= n_seg), adds their sums with e^{L_g - P_{c0}},
    and its program of the first feature and value block writes PEX [BH, N + 1] (the output pass and the backward
    read it after)."""
    ik, iv = tl.program_id(0), tl.program_id(1)
    bh = (tl.program_id(2) // n_seg).to(tl.int64)
    g = tl.program_id(2) % n_seg
    offs_t = tl.arange(0, BT)
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    kmask, vmask = offs_k < F, offs_v < D
    st_mask = kmask[:, None] & vmask[None, :]
    k_row, v_row = _row(bh, NKV, s_kb, s_kh), _row(bh, NKV, s_vb, s_vh)
    c0 = g * seg_len
    c1 = tl.minimum(c0 + seg_len, n_chunks)
    s_kv = tl.zeros([BK, BV], tl.float32)
    s_z = tl.zeros([BK], tl.float32)
    p = tl.max(tl.full([BT], float("-inf"), tl.float32), 0)  # OWN_P: the stabiliser along the walk (SUMS: L_g)
    if not SUMS:
        if OWN_P:
            offs_g = tl.arange(0, BSEG)
            p0 = tl.max(tl.load(LSEG + bh * n_seg + offs_g, mask=offs_g < g, other=float("-inf")), 0)
            p = p0
        else:
            p0 = tl.load(PEX + bh * (n_chunks + 1) + c0)
        for g2 in range(0, g):  # every factor e^{P_{c1(g2)} - P_{c0}} (OWN_P: e^{L_g2 - P_{c0}}) <= 1
            if OWN_P:
                fac = _rel_exp(tl.load(LSEG + bh * n_seg + g2), p0)
            else:
                fac = _rel_exp(tl.load(PEX + bh * (n_chunks + 1) + (g2 + 1) * seg_len), p0)
            row2 = bh * n_seg + g2
            s_kv += fac * tl.load(SEG + (row2 * F + offs_k[:, None]) * D + offs_v[None, :], mask=st_mask, other=0.0)
            s_z += fac * tl.load(SEGZ + row2 * F + offs_k, mask=kmask, other=0.0)
    for c in range(c0, c1):
        if not SUMS:
            row = bh * n_chunks + c
            tl.store(H + (row * F + offs_k[:, None]) * D + offs_v[None, :], _to(s_kv, H.dtype.element_ty, PREC),
                     mask=st_mask)
            if iv == 0:
                tl.store(Z + row * F + offs_k, s_z, mask=kmask)
        t = c * BT + offs_t
        tmask = t < T
        k = tl.load(K + k_row + t[:, None] * s_kt + offs_k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        k = _mapped(k, tmask[:, None] & kmask[None, :], MAP, PREC)  # raw keys: mapped, rows past T kept at 0
        v = tl.load(V + v_row + t[:, None] * s_vt + offs_v[None, :], mask=tmask[:, None] & vmask[None, :], other=0.0)
        if OWN_P:
            b = tl.load(LK + bh * T + t, mask=tmask, other=float("-inf"))
            pn = tl.maximum(p, tl.max(b, 0))
            if not SUMS:
                if (ik == 0) & (iv == 0):
                    tl.store(PEX + bh * (n_chunks + 1) + c, p)
                    if c == n_chunks - 1:
                        tl.store(PEX + bh * (n_chunks + 1) + n_chunks, pn)
            kfac = _rel_exp(b, pn + tl.zeros([BT], tl.float32))
            sfac = _rel_exp(p, pn)
            p = pn
        else:
            _, _, kfac, sfac = _weights(LK, PEX, bh, c, n_chunks, T, offs_t, BT)
        kw = _to(k.to(tl.float32) * kfac[:, None], k.dtype, PREC)
        s_kv = s_kv * sfac + _dot(tl.trans(kw), v, PREC)
        s_z = s_z * sfac + tl.sum(kw.to(tl.float32), 0)
    if SUMS:
        row = bh * n_seg + g
        tl.store(SEG + (row * F + offs_k[:, None]) * D + offs_v[None, :], s_kv, mask=st_mask)
        if iv == 0:
            tl.store(SEGZ + row * F + offs_k, s_z, mask=kmask)
        if OWN_P:
            if (ik == 0) & (iv == 0):
                tl.store(LSEG + row, p)


@triton.jit
def _grad_state_kernel(Q, LK, PEX, DNUM, DDEN, G, GZ, SEG, SEGZ, T, F, D, n_chunks, seg_len, n_seg, WG, NG,
                       SUMS: tl.constexpr, HAS_SCALE: tl.constexpr, PREC: tl.constexpr,
                       BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The reverse pass, one walk per row bh over WG query heads (query rows bh WG + j; NG = G / WG walks per kv head,
    kv head bh // NG: `REVERSE_WALK`): G[c] = sum_j sum_{i after chunk c} e^{P_{c+1} - M_i} q_ji dnum_ji^T (matmul
    dtype) and GZ[c] = the same with dden_ji (fp32); every factor <= 1 since M_i >= P_{c+1} (b, P and M are the kv
    head's). In segments as `_state_kernel`, walked backwards: SUMS writes SEG[g] = the sum over chunks [c0, c1)
    with e^{P_{c0} - M_i} (and SEGZ); otherwise a segment starts from the later segments' sums brought to P_{c1}.
    Which walk runs: `reverse_walk`'s rule (measured there)."""
    ik, iv = tl.program_id(0), tl.program_id(1)
    bh = (tl.program_id(2) // n_seg).to(tl.int64)
    kv = bh // NG
    g = tl.program_id(2) % n_seg
    offs_t = tl.arange(0, BT)
    offs_k = ik * BK + tl.arange(0, BK)
    offs_v = iv * BV + tl.arange(0, BV)
    kmask, vmask = offs_k < F, offs_v < D
    st_mask = kmask[:, None] & vmask[None, :]
    c0 = g * seg_len
    c1 = tl.minimum(c0 + seg_len, n_chunks)
    g_kv = tl.zeros([BK, BV], tl.float32)
    g_z = tl.zeros([BK], tl.float32)
    if not SUMS:
        p1 = tl.load(PEX + kv * (n_chunks + 1) + c1)
        for g2 in range(g + 1, n_seg):  # every factor e^{P_{c1} - P_{c0(g2)}} <= 1
            fac = _rel_exp(p1 + 0.0, tl.load(PEX + kv * (n_chunks + 1) + g2 * seg_len))
            row2 = bh * n_seg + g2
            g_kv += fac * tl.load(SEG + (row2 * F + offs_k[:, None]) * D + offs_v[None, :], mask=st_mask, other=0.0)
            g_z += fac * tl.load(SEGZ + row2 * F + offs_k, mask=kmask, other=0.0)
    for cc in range(0, c1 - c0):
        c = c1 - 1 - cc
        if not SUMS:
            row = bh * n_chunks + c
            tl.store(G + (row * F + offs_k[:, None]) * D + offs_v[None, :], _to(g_kv, G.dtype.element_ty, PREC),
                     mask=st_mask)
            if iv == 0:
                tl.store(GZ + row * F + offs_k, g_z, mask=kmask)
        t = c * BT + offs_t
        tmask = t < T
        _, qfac, _, sfac = _weights(LK, PEX, kv, c, n_chunks, T, offs_t, BT)
        g_kv = g_kv * sfac
        g_z = g_z * sfac
        for j in range(0, WG):
            qh = bh * WG + j
            q = tl.load(Q + qh * T * F + t[:, None] * F + offs_k[None, :], mask=tmask[:, None] & kmask[None, :],
                        other=0.0)
            dnum = tl.load(DNUM + qh * T * D + t[:, None] * D + offs_v[None, :],
                           mask=tmask[:, None] & vmask[None, :], other=0.0)
            dden = tl.load(DDEN + qh * T + t, mask=tmask, other=0.0)
            qw = _to(q.to(tl.float32) * qfac[:, None], q.dtype, PREC)
            g_kv += _dot(tl.trans(qw), dnum, PREC)
            g_z += tl.sum(qw.to(tl.float32) * dden[:, None], 0)
    if SUMS:
        row = bh * n_seg + g
        tl.store(SEG + (row * F + offs_k[:, None]) * D + offs_v[None, :], g_kv, mask=st_mask)
        if iv == 0:
            tl.store(SEGZ + row * F + offs_k, g_z, mask=kmask)


@triton.jit
def _out_kernel(Q, K, V, LK, PEX, H, Z, OUT, DEN, T, F, D, n_chunks, G, NH, NKV,
                s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
                HAS_SCALE: tl.constexpr, PREC: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr = 0):
    """Chunk c's outputs from its entering state, in parallel over chunks: out = num / den (0 where den = 0),
    num = e^{P_c - M_i} q H[c] + (w * q k^T) v, den = e^{P_c - M_i} q . Z[c] + rowsum(w * q k^T) (kept, fp32).
    Query row bh reads key / value / state row bh // G (GQA: G query heads per kv head; 1 without)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kvh = bh // G
    row = kvh * n_chunks + c
    q_row, k_row = _row(bh, NH, s_qb, s_qh), _row(kvh, NKV, s_kb, s_kh)
    offs_t = tl.arange(0, BT)
    offs_v = tl.arange(0, BV)
    vmask = offs_v < D
    t = c * BT + offs_t
    tmask = t < T
    s = tl.zeros([BT, BT], tl.float32)
    num = tl.zeros([BT, BV], tl.float32)
    den = tl.zeros([BT], tl.float32)
    for kb in range(0, tl.cdiv(F, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        kmask = offs_k < F
        q = tl.load(Q + q_row + t[:, None] * s_qt + offs_k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        k = tl.load(K + k_row + t[:, None] * s_kt + offs_k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        q = _mapped(q, tmask[:, None] & kmask[None, :], MAP, PREC)
        k = _mapped(k, tmask[:, None] & kmask[None, :], MAP, PREC)
        h = tl.load(H + (row * F + offs_k[:, None]) * D + offs_v[None, :], mask=kmask[:, None] & vmask[None, :], other=0.0)
        z = tl.load(Z + row * F + offs_k, mask=kmask, other=0.0)
        s += _dot(q, tl.trans(k), PREC)
        num += _dot(q, h, PREC)
        den += tl.sum(q.to(tl.float32) * z[None, :], 1)
    v = tl.load(V + _row(kvh, NKV, s_vb, s_vh) + t[:, None] * s_vt + offs_v[None, :],
                mask=tmask[:, None] & vmask[None, :], other=0.0)
    w, qfac, _, _ = _weights(LK, PEX, kvh, c, n_chunks, T, offs_t, BT)
    s = s * w
    num = num * qfac[:, None] + _dot(_to(s, v.dtype, PREC), v, PREC)
    den = den * qfac + tl.sum(s, 1)
    out = tl.where(den[:, None] == 0, 0.0, num / tl.where(den == 0, 1.0, den)[:, None])  # no visible key: 0
    tl.store(OUT + _row(bh, NH, s_ob, s_oh) + t[:, None] * s_ot + offs_v[None, :], _to(out, OUT.dtype.element_ty, PREC),
             mask=tmask[:, None] & vmask[None, :])
    tl.store(DEN + bh * T + t, den, mask=tmask)


@triton.jit
def _tile(P, base, st, rows, rmask, cols, cmask):
    """Rows x cols of the head starting at P + base with token stride st, 0 outside the masks."""
    return tl.load(P + base + rows[:, None] * st + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _parallel_tile(num, den, m, q1, K, V, LK, k_row, v_row, kvh, s_kt, s_vt, t, s0, T, F, offs_k, offs_v, vmask,
                   HAS_SCALE: tl.constexpr, PREC: tl.constexpr, MASKED: tl.constexpr, BN: tl.constexpr,
                   MAP: tl.constexpr):
    """One key tile [s0, s0 + BN) of `_parallel_kernel`'s walk. MASKED: a tile reaching the diagonal or past T (the
    causal mask and the key count applied); otherwise every key is visible to every row and inside the input, and
    nothing is masked. q1 holds the block's (mapped) queries, every feature, and the tile's keys are one load, so
    the walk has no inner loop and Triton pipelines its loads (a loop inside the walk, even of one pass, left it
    unpipelined)."""
    tk = s0 + tl.arange(0, BN)
    kin = tk < T
    kmask = (offs_k < F)[None, :]
    if MASKED:
        kmask = kin[:, None] & kmask
    k = _mapped(tl.load(K + k_row + tk[:, None] * s_kt + offs_k[None, :], mask=kmask, other=0.0), kmask, MAP, PREC)
    s = _dot(q1, tl.trans(k), PREC)
    if MASKED:
        vis = (t[:, None] >= tk[None, :]) & kin[None, :]  # causal, and keys inside the input
    if HAS_SCALE:
        if MASKED:
            b = tl.where(vis, tl.load(LK + kvh * T + tk, mask=kin, other=float("-inf"))[None, :], float("-inf"))
        else:
            b = tl.load(LK + kvh * T + tk)[None, :] + tl.zeros_like(s)
        m_new = tl.maximum(m, tl.max(b, 1))
        alpha = _rel_exp(m, m_new)
        num = num * alpha[:, None]
        den = den * alpha
        m = m_new
        s = s * _rel_exp(b, m[:, None])  # masked before the exp: 0 for invisible keys and b = -inf
    elif MASKED:
        s = tl.where(vis, s, 0.0)
    if MASKED:
        v = _tile(V, v_row, s_vt, tk, kin, offs_v, vmask)
    else:
        v = tl.load(V + v_row + tk[:, None] * s_vt + offs_v[None, :], mask=vmask[None, :], other=0.0)
    num += _dot(_to(s, v.dtype, PREC), v, PREC)
    den += tl.sum(s, 1)
    return num, den, m


@triton.jit
def _parallel_kernel(Q, K, V, LK, OUT, DEN, T, F, D, G, NH, NKV,
                     s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
                     HAS_SCALE: tl.constexpr, PREC: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BN: tl.constexpr, MAP: tl.constexpr = 0):
    """Short inputs (`parallel_max_t`): the quadratic form in one pass, one program per (query block of BT, head) over
    the key tiles of BN up to its own rows, as flash attention walks them: s = (q k^T) masked causal, times w_ij =
    e^{b_j - m_i} where m_i is the row's running max of b (num and den rescaled when it grows: at the end m_i = M_i,
    the chunked form's stabiliser, so DEN is the same quantity and the backward needs nothing else), num += s v,
    den += rowsum(s). The key tiles wholly below the block's first row take no mask (`_parallel_tile`). No state
    tensors, no second launch: at a few thousand tokens the chunked form's sequential state walk (one program per kv
    head and value block) is latency-bound. Every feature in one tile (F <= BK <= PARALLEL_MAX_F): q is loaded (and
    mapped) once, outside the walk."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kvh = bh // G
    q_row, k_row, v_row = _row(bh, NH, s_qb, s_qh), _row(kvh, NKV, s_kb, s_kh), _row(kvh, NKV, s_vb, s_vh)
    offs_t = tl.arange(0, BT)
    offs_v = tl.arange(0, BV)
    offs_k = tl.arange(0, BK)
    vmask = offs_v < D
    t = c * BT + offs_t
    tmask = t < T
    qmask = tmask[:, None] & (offs_k < F)[None, :]
    q1 = _mapped(tl.load(Q + q_row + t[:, None] * s_qt + offs_k[None, :], mask=qmask, other=0.0), qmask, MAP, PREC)
    num = tl.zeros([BT, BV], tl.float32)
    den = tl.zeros([BT], tl.float32)
    m = tl.full([BT], float("-inf"), tl.float32)
    whole = (c * BT // BN) * BN  # key tiles before this: every key below the block's first row
    for s0 in range(0, whole, BN):
        num, den, m = _parallel_tile(num, den, m, q1, K, V, LK, k_row, v_row, kvh, s_kt, s_vt, t, s0, T, F, offs_k,
                                     offs_v, vmask, HAS_SCALE, PREC, False, BN, MAP)
    for s0 in range(whole, tl.minimum(c * BT + BT, T), BN):
        num, den, m = _parallel_tile(num, den, m, q1, K, V, LK, k_row, v_row, kvh, s_kt, s_vt, t, s0, T, F, offs_k,
                                     offs_v, vmask, HAS_SCALE, PREC, True, BN, MAP)
    out = tl.where(den[:, None] == 0, 0.0, num / tl.where(den == 0, 1.0, den)[:, None])  # no visible key: 0
    tl.store(OUT + _row(bh, NH, s_ob, s_oh) + t[:, None] * s_ot + offs_v[None, :], _to(out, OUT.dtype.element_ty, PREC),
             mask=tmask[:, None] & vmask[None, :])
    tl.store(DEN + bh * T + t, den, mask=tmask)


@triton.jit
def _grad_prep_kernel(DOUT, OUT, DEN, DNUM, DDEN, T, D, NH, s_db, s_dh, s_dt, s_ob, s_oh, s_ot,
                      PREC: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr):
    """The division's gradient (flash-attention's delta trick: no fp32 num is kept): dnum = dout / den in the
    matmul dtype, dden = -(dout . out) / den in fp32; both 0 where den = 0. dout and out in their callers' layouts
    (`triton_common.row_base`), dnum contiguous [BH, T, D]."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    t = c * BT + tl.arange(0, BT)
    offs_v = tl.arange(0, BV)
    tmask = t < T
    mask = tmask[:, None] & (offs_v < D)[None, :]
    off = bh * T * D + t[:, None] * D + offs_v[None, :]
    dout = tl.load(DOUT + _row(bh, NH, s_db, s_dh) + t[:, None] * s_dt + offs_v[None, :], mask=mask,
                   other=0.0).to(tl.float32)
    out = tl.load(OUT + _row(bh, NH, s_ob, s_oh) + t[:, None] * s_ot + offs_v[None, :], mask=mask,
                  other=0.0).to(tl.float32)
    den = tl.load(DEN + bh * T + t, mask=tmask, other=0.0)
    inv = tl.where(den == 0, 0.0, 1.0 / tl.where(den == 0, 1.0, den))
    tl.store(DNUM + off, _to(dout * inv[:, None], DNUM.dtype.element_ty, PREC), mask=mask)
    tl.store(DDEN + bh * T + t, -tl.sum(dout * out, 1) * inv, mask=tmask)


@triton.jit
def _chunk_values(V, v_row, s_vt, c, T, D, BT: tl.constexpr, BV: tl.constexpr):
    """Chunk c of the head of V [B, Hkv, T, D] at offset v_row (`_row`), token stride s_vt: (token offsets in the
    chunk, value offsets, their masks and the two together, tokens t, v [BT, BV]), what the backward's per-chunk
    kernels start from."""
    offs_t = tl.arange(0, BT)
    offs_v = tl.arange(0, BV)
    vmask = offs_v < D
    t = c * BT + offs_t
    tmask = t < T
    tv_mask = tmask[:, None] & vmask[None, :]
    v = tl.load(V + v_row + t[:, None] * s_vt + offs_v[None, :], mask=tv_mask, other=0.0)
    return offs_t, offs_v, vmask, t, tmask, tv_mask, v


@triton.jit
def _dscores(dn, dden, v, w, PREC: tl.constexpr):
    """dA = w * (dnum v^T + dden) [i, j] in v's dtype: the gradient of a chunk's masked weighted scores."""
    return _to((_dot(dn, tl.trans(v), PREC) + dden[:, None]) * w, v.dtype, PREC)


@triton.jit
def _grad_dq_kernel(Q, K, V, LK, PEX, H, Z, DNUM, DDEN, DQ, T, F, D, n_chunks, GRP, NH, NKV,
                    s_vb, s_vh, s_vt, s_gb, s_gh, s_gt, HAS_SCALE: tl.constexpr, PREC: tl.constexpr,
                    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr = 0):
    """Chunk c's dq for one query head, in parallel over chunks, from the state entering the chunk: with dA = w *
    (dnum v^T + dden) (the gradient of the masked weighted scores), dq = dA k + e^{P_c - M_i} (dnum H^T + dden Z^T).
    k, v, the states H, Z and the weights are its kv head's (row bh // GRP); v [B, Hkv, T, D] and dq [B, H, T, F] in
    any layout with unit last stride (s_v*, s_g*). MAP: q and k are the features of an elementwise map, and dq is
    the raw query's, times the map's slope (Q, the query features, read only then)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kv = bh // GRP
    hrow = kv * n_chunks + c
    offs_t, offs_v, vmask, t, tmask, tv_mask, v = _chunk_values(V, _row(kv, NKV, s_vb, s_vh), s_vt, c, T, D, BT, BV)
    dn = tl.load(DNUM + bh * T * D + t[:, None] * D + offs_v[None, :], mask=tv_mask, other=0.0)
    dden = tl.load(DDEN + bh * T + t, mask=tmask, other=0.0)
    w, qfac, _, _ = _weights(LK, PEX, kv, c, n_chunks, T, offs_t, BT)
    da = _dscores(dn, dden, v, w, PREC)
    for kb in range(0, tl.cdiv(F, BK)):
        offs_k = kb * BK + tl.arange(0, BK)
        kmask = offs_k < F
        qk_mask = tmask[:, None] & kmask[None, :]
        k = tl.load(K + kv * T * F + t[:, None] * F + offs_k[None, :], mask=qk_mask, other=0.0)
        h = tl.load(H + (hrow * F + offs_k[:, None]) * D + offs_v[None, :], mask=kmask[:, None] & vmask[None, :],
                    other=0.0)
        z = tl.load(Z + hrow * F + offs_k, mask=kmask, other=0.0)
        dq = _dot(da, k, PREC) + (_dot(dn, tl.trans(h), PREC) + dden[:, None] * z[None, :]) * qfac[:, None]
        if MAP != 0:
            dq = dq * _feature_grad(tl.load(Q + bh * T * F + t[:, None] * F + offs_k[None, :], mask=qk_mask,
                                            other=0.0), MAP)
        tl.store(DQ + _row(bh, NH, s_gb, s_gh) + t[:, None] * s_gt + offs_k[None, :], _to(dq, DQ.dtype.element_ty, PREC),
                 mask=qk_mask)


@triton.jit
def _walk_states(G, GZ, kv, c, n_chunks, NG, F, D, offs_k, offs_v, kmask, st_mask, PREC: tl.constexpr):
    """The reverse states leaving chunk c for kv head kv: its NG walks' rows (kv NG + j) summed, G's in fp32 and rounded
    once to G's dtype (one walk: its row as stored), GZ's fp32."""
    row = kv * NG * n_chunks + c
    g = tl.load(G + (row * F + offs_k[:, None]) * D + offs_v[None, :], mask=st_mask, other=0.0)
    gz = tl.load(GZ + row * F + offs_k, mask=kmask, other=0.0)
    if NG > 1:
        gs = g.to(tl.float32)
        for j in range(1, NG):
            row = (kv * NG + j) * n_chunks + c
            gs += tl.load(G + (row * F + offs_k[:, None]) * D + offs_v[None, :], mask=st_mask, other=0.0).to(tl.float32)
            gz += tl.load(GZ + row * F + offs_k, mask=kmask, other=0.0)
        g = _to(gs, G.dtype.element_ty, PREC)
    return g, gz


@triton.jit
def _grad_dkv_kernel(Q, K, V, LK, PEX, G, GZ, DNUM, DDEN, DK, DV, DB, T, F, D, n_chunks, GRP, NG, s_db, NKV,
                     s_vb, s_vh, s_vt, s_kgb, s_kgh, s_kgt, s_vgb, s_vgh, s_vgt,
                     HAS_SCALE: tl.constexpr, PREC: tl.constexpr,
                     BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr = 0):
    """Chunk c's dk (one feature block per program) and dv for one kv head, in parallel over chunks and feature blocks,
    summed over its GRP query heads (rows kv GRP + j) in fp32 registers and rounded once: dk = sum_j dA_j^T q_j +
    e^{b_j - P_{c+1}} (v G^T + GZ), dv = sum_j (w * q_j k^T)^T dnum_j + e^{b_j - P_{c+1}} k G, with G, GZ the reverse
    states leaving the chunk (the group's: the sum of its NG walks' rows, `_grad_state_kernel`). dv needs every
    feature: the block-0 program computes it (its intra-chunk scores first, then every block's state term); the
    others only their block of dk, so that the dk work runs on F / BK programs side by side (FAVOR+'s 256 features:
    four; one for 64). With key log-scales each program writes its block's part of db_j = k_j . dk_j (fp32) to row
    s_db apart, summed after (no atomics: the same bits every run). No expanded k, v, no gradient per query head. v,
    dk and dv [B, Hkv, T, *] in any layout with unit last stride (s_v*, s_kg*, s_vg*). MAP: q and k are the features
    of an elementwise map, and dk is the raw key's, times the map's slope."""
    c = tl.program_id(0)
    kv = tl.program_id(1).to(tl.int64)
    kb = tl.program_id(2)
    offs_t, offs_v, vmask, t, tmask, tv_mask, v = _chunk_values(V, _row(kv, NKV, s_vb, s_vh), s_vt, c, T, D, BT, BV)
    w, _qfac, kfac, _sfac = _weights(LK, PEX, kv, c, n_chunks, T, offs_t, BT)
    if kb == 0:
        dv = tl.zeros([BT, BV], tl.float32)
        for j in range(0, GRP):  # the intra-chunk part of dv: every feature of the scores first
            qh = kv * GRP + j
            dn = tl.load(DNUM + qh * T * D + t[:, None] * D + offs_v[None, :], mask=tv_mask, other=0.0)
            s = tl.zeros([BT, BT], tl.float32)
            for kb2 in range(0, tl.cdiv(F, BK)):
                offs_k = kb2 * BK + tl.arange(0, BK)
                qk_mask = tmask[:, None] & (offs_k < F)[None, :]
                q = tl.load(Q + qh * T * F + t[:, None] * F + offs_k[None, :], mask=qk_mask, other=0.0)
                k = tl.load(K + kv * T * F + t[:, None] * F + offs_k[None, :], mask=qk_mask, other=0.0)
                s += _dot(q, tl.trans(k), PREC)
            dv += _dot(tl.trans(_to(s * w, dn.dtype, PREC)), dn, PREC)
        for kb2 in range(0, tl.cdiv(F, BK)):  # the state part of dv, every feature block
            offs_k = kb2 * BK + tl.arange(0, BK)
            kmask = offs_k < F
            k = tl.load(K + kv * T * F + t[:, None] * F + offs_k[None, :], mask=tmask[:, None] & kmask[None, :],
                        other=0.0)
            g2, _gz2 = _walk_states(G, GZ, kv, c, n_chunks, NG, F, D, offs_k, offs_v, kmask,
                                kmask[:, None] & vmask[None, :], PREC)
            dv += _dot(_to(k.to(tl.float32) * kfac[:, None], k.dtype, PREC), g2, PREC)
        tl.store(DV + _row(kv, NKV, s_vgb, s_vgh) + t[:, None] * s_vgt + offs_v[None, :], _to(dv, DV.dtype.element_ty, PREC),
                 mask=tv_mask)
    offs_k = kb * BK + tl.arange(0, BK)
    kmask = offs_k < F
    qk_mask = tmask[:, None] & kmask[None, :]
    k = tl.load(K + kv * T * F + t[:, None] * F + offs_k[None, :], mask=qk_mask, other=0.0)
    g, gz = _walk_states(G, GZ, kv, c, n_chunks, NG, F, D, offs_k, offs_v, kmask, kmask[:, None] & vmask[None, :],
                         PREC)
    dk = (_dot(v, tl.trans(g), PREC) + gz[None, :]) * kfac[:, None]
    for j in range(0, GRP):
        qh = kv * GRP + j
        dn = tl.load(DNUM + qh * T * D + t[:, None] * D + offs_v[None, :], mask=tv_mask, other=0.0)
        dden = tl.load(DDEN + qh * T + t, mask=tmask, other=0.0)
        da = _dscores(dn, dden, v, w, PREC)
        q = tl.load(Q + qh * T * F + t[:, None] * F + offs_k[None, :], mask=qk_mask, other=0.0)
        dk += _dot(tl.trans(da), q, PREC)
    if MAP != 0:
        dk = dk * _feature_grad(k, MAP)
    tl.store(DK + _row(kv, NKV, s_kgb, s_kgh) + t[:, None] * s_kgt + offs_k[None, :], _to(dk, DK.dtype.element_ty, PREC),
             mask=qk_mask)
    if HAS_SCALE:  # this block's part of db_j = k_j . dk_j, before dk is rounded
        tl.store(DB + kb * s_db + kv * T + t, tl.sum(dk * k.to(tl.float32), 1), mask=tmask)


@triton.jit
def _parallel_w(LK, M, bh, T, t, tk, tmask, kin, HAS_SCALE: tl.constexpr):
    """w_ij [query rows t, key rows tk] of the parallel backward: 1 where query i sees key j (causal, both inside
    the input), 0 elsewhere; with key log-scales e^{b_j - M_i} (M_i: the max b over the keys query i sees, the
    forward's stabiliser)."""
    vis = (t[:, None] >= tk[None, :]) & kin[None, :] & tmask[:, None]
    if HAS_SCALE:
        b = tl.load(LK + bh * T + tk, mask=kin, other=float("-inf"))
        m = tl.load(M + bh * T + t, mask=tmask, other=float("-inf"))
        return _rel_exp(tl.where(vis, b[None, :], float("-inf")), m[:, None])
    return tl.where(vis, 1.0, 0.0)


@triton.jit
def _parallel_dq_kernel(Q, K, V, LK, M, DNUM, DDEN, DQ, T, F, D, G, NH, NKV, s_qb, s_qh, s_qt, s_kb, s_kh, s_kt,
                        s_vb, s_vh, s_vt, s_gb, s_gh, s_gt, HAS_SCALE: tl.constexpr, PREC: tl.constexpr,
                        BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr = 0):
    """The parallel backward's dq for one (query chunk, query head), over the key chunks up to its own: with
    dA_ij = w_ij (dnum_i . v_j + dden_i), dq_i = sum_j dA_ij k_j (F <= BF: every feature in one tile). k, v (and the
    key log-scales, M) are the head's kv head's, read where the forward read them. MAP: q and k are the features of
    an elementwise map, and dq is the raw query's, times the map's slope (Q, the query features, read only then)."""
    c = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    kvh = bh // G
    k_row, v_row = _row(kvh, NKV, s_kb, s_kh), _row(kvh, NKV, s_vb, s_vh)
    offs_t = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    offs_v = tl.arange(0, BV)
    fmask, vmask = offs_f < F, offs_v < D
    t = c * BT + offs_t
    tmask = t < T
    dn = _tile(DNUM, bh * T * D, D, t, tmask, offs_v, vmask)
    dden = tl.load(DDEN + bh * T + t, mask=tmask, other=0.0)
    dq = tl.zeros([BT, BF], tl.float32)
    for kc in range(0, c + 1):
        tk = kc * BT + offs_t
        kin = tk < T
        k = _tile(K, k_row, s_kt, tk, kin, offs_f, fmask)
        v = _tile(V, v_row, s_vt, tk, kin, offs_v, vmask)
        w = _parallel_w(LK, M, kvh, T, t, tk, tmask, kin, HAS_SCALE)
        da = (_dot(dn, tl.trans(v), PREC) + dden[:, None]) * w
        dq += _dot(_to(da, k.dtype, PREC), k, PREC)
    if MAP != 0:
        dq = dq * _feature_grad(_tile(Q, _row(bh, NH, s_qb, s_qh), s_qt, t, tmask, offs_f, fmask), MAP)
    tl.store(DQ + _row(bh, NH, s_gb, s_gh) + t[:, None] * s_gt + offs_f[None, :], _to(dq, DQ.dtype.element_ty, PREC),
             mask=tmask[:, None] & fmask[None, :])


@triton.jit
def _parallel_dkv_kernel(Q, K, V, LK, M, DNUM, DDEN, DK, DV, DB, T, F, D, n_chunks, G, NH, NKV,
                         s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_kgb, s_kgh, s_kgt, s_vgb, s_vgh, s_vgt,
                         HAS_SCALE: tl.constexpr, PREC: tl.constexpr,
                         BT: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, MAP: tl.constexpr = 0):
    """The parallel backward's dk, dv (and db) for one (key chunk, kv head), over its G query heads and, for each,
    the query chunks from its own on: dv_j = sum_i w_ij (q_i . k_j) dnum_i, dk_j = sum_i dA_ij q_i, db_j = k_j . dk_j
    (fp32, before rounding). A group's sum stays in fp32 registers and is rounded once: no per-query-head copies of
    k and v, no fp32 gradients per query head, no sum afterwards. MAP: q and k are the features of an elementwise
    map, and dk is the raw key's, times the map's slope."""
    kc = tl.program_id(0)
    kvh = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, BT)
    offs_f = tl.arange(0, BF)
    offs_v = tl.arange(0, BV)
    fmask, vmask = offs_f < F, offs_v < D
    tk = kc * BT + offs_t
    kin = tk < T
    k = _tile(K, _row(kvh, NKV, s_kb, s_kh), s_kt, tk, kin, offs_f, fmask)
    v = _tile(V, _row(kvh, NKV, s_vb, s_vh), s_vt, tk, kin, offs_v, vmask)
    dk = tl.zeros([BT, BF], tl.float32)
    dv = tl.zeros([BT, BV], tl.float32)
    for g in range(0, G):
        bh = (kvh // NKV) * NH + (kvh % NKV) * G + g  # the group's query heads
        q_row = _row(bh, NH, s_qb, s_qh)
        for c in range(kc, n_chunks):
            t = c * BT + offs_t
            tmask = t < T
            q = _tile(Q, q_row, s_qt, t, tmask, offs_f, fmask)
            dn = _tile(DNUM, bh * T * D, D, t, tmask, offs_v, vmask)
            dden = tl.load(DDEN + bh * T + t, mask=tmask, other=0.0)
            w = _parallel_w(LK, M, kvh, T, t, tk, tmask, kin, HAS_SCALE)  # [query, key]
            sw = _dot(q, tl.trans(k), PREC) * w
            dv += _dot(tl.trans(_to(sw, dn.dtype, PREC)), dn, PREC)
            da = (_dot(dn, tl.trans(v), PREC) + dden[:, None]) * w
            dk += _dot(tl.trans(_to(da, q.dtype, PREC)), q, PREC)
    if MAP != 0:  # the key features loaded again, not kept in registers through the walk
        dk = dk * _feature_grad(_tile(K, _row(kvh, NKV, s_kb, s_kh), s_kt, tk, kin, offs_f, fmask), MAP)
    tl.store(DK + _row(kvh, NKV, s_kgb, s_kgh) + tk[:, None] * s_kgt + offs_f[None, :], _to(dk, DK.dtype.element_ty, PREC),
             mask=kin[:, None] & fmask[None, :])
    tl.store(DV + _row(kvh, NKV, s_vgb, s_vgh) + tk[:, None] * s_vgt + offs_v[None, :], _to(dv, DV.dtype.element_ty, PREC),
             mask=kin[:, None] & vmask[None, :])
    if HAS_SCALE:
        tl.store(DB + kvh * T + tk, tl.sum(dk * k.to(tl.float32), 1), mask=kin)


@triton.jit
def _chunk_max_kernel(LK, PEX, T, n_chunks, BT: tl.constexpr, BC: tl.constexpr):
    """P [row, N + 1] of one row of b [rows, T] per program: P_0 = -inf, P_{c+1} = max(P_c, max of b over chunk c), BC
    chunks a step (their maxima, then a running max within them and across steps)."""
    row = tl.program_id(0).to(tl.int64)
    base = PEX + row * (n_chunks + 1)
    run = tl.max(tl.full([BC], float("-inf"), tl.float32), 0)
    tl.store(base, run)
    offs_t = tl.arange(0, BT)
    for c0 in range(0, n_chunks, BC):
        offs_c = c0 + tl.arange(0, BC)
        t = offs_c[:, None] * BT + offs_t[None, :]
        b = tl.load(LK + row * T + t, mask=t < T, other=float("-inf"))
        cmax = tl.max(b, 1)
        tl.store(base + 1 + offs_c, tl.maximum(tl.associative_scan(cmax, 0, _max2), run), mask=offs_c < n_chunks)
        run = tl.maximum(run, tl.max(cmax, 0))


def _exclusive_chunk_max(lk: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """[BH, T] fp32 contiguous -> P [BH, N + 1]: P_c = max b over the keys before chunk c (P_0 = -inf), fp32. One
    launch (`_chunk_max_kernel`): PyTorch's pad, amax, cummax and pad took five small kernels on the forward's critical
    path, every layer."""
    bh, t = lk.shape
    pex = lk.new_empty(bh, n_chunks + 1)
    _chunk_max_kernel[(bh,)](lk, pex, t, n_chunks, BT=BT, BC=min(64, max(16, triton.next_power_of_2(n_chunks))))
    return pex


# chunks per segment of the state pass (None: `segment_len`'s choice); tests set it to exercise segments
SEGMENT_LEN: int | None = None


def segment_len(n_chunks: int, programs: int = 1, sms: int = 132) -> int:
    """Chunks per segment of the state passes, for `programs` walks (`walk_count`) on a GPU of
    `sms` multiprocessors. The sequential chain is ~2 L steps (a segment's sum, then its walk) plus n / L adds of
    earlier segments' sums; an add costs about half a step (its loads wait on nothing), so the chain 2 L + n / (2 L)
    is least near L = sqrt(n / 4). Each segment adds `programs` programs, so L grows until they fit about four per
    multiprocessor. One segment (the plain walk, no extra launch) where that chain is not under 3/4 of n (short
    inputs), where the walks alone nearly fill the GPU, or where they fill half of it and the walk is short (16
    chunks or fewer). Measured on the H200 (`benchmarks/short_calls.py --segments`, SmolLM2's shapes, a call's device
    time in CUDA graphs): FAVOR+'s forward (24 walks) at 1024 / 2048 / 4096 tokens took 36 / 53 / 89 us in segments
    of 2 / 2 / 4 chunks, 49 / 54 / 95 us as the rule before chose them (one segment, then sqrt(n / 2): 4 and 6
    chunks); its backward's 72 walks per query head at 1024 tokens were 11-13 us slower in segments of 2 or 4 than
    in one (beside the concurrent dq branch); FAVOR+'s 256 features x 16 heads (128 walks) gained nothing from
    segments at 16k-64k, x 9 heads (72 walks) 1.25-1.5x."""
    if SEGMENT_LEN is not None:
        return max(1, min(SEGMENT_LEN, n_chunks))
    if programs >= 0.75 * sms or (programs >= 0.5 * sms and n_chunks <= 16):
        return n_chunks
    seg = max(1, round((n_chunks / 4) ** 0.5), -(-n_chunks * programs // (4 * sms)))
    chain = 2 * seg + -(-n_chunks // seg) / 2
    return seg if seg < n_chunks and chain < 0.75 * n_chunks else n_chunks


# The chunked backward's reverse walk (`_grad_state_kernel`): "kv", one walk per kv head over its group's query heads
# (each of its N steps takes G dots), "query", one walk per query head (G x the programs, each step one dot) whose rows
# `_grad_dkv_kernel` sums per kv head as it reads them (G x the state writes and reads), or "auto", `reverse_walk`'s
# rule. Tests set "kv" / "query" to exercise each.
REVERSE_WALK = "auto"


def reverse_walk(f: int, n_chunks: int) -> str:
    """The reverse walk `REVERSE_WALK = "auto"` takes for f features and n_chunks chunks. Measured on the H200 at
    SmolLM2's shapes (9 query heads on 3, bf16; `benchmarks/short_calls.py`, fwd+bwd a call, query vs kv walk): F = 64
    (linear) 94.8 vs 97.9 us at 1024 tokens, 92.8 vs 105.6 at 2048, 134.1 vs 152.5 at 4096; F = 256 (FAVOR+) 194.5 vs
    227.7 at 1024 (16 chunks: one segment, where the kv walk's three dots a step are the critical path), but 262.4 vs
    233.4 at 2048 and 408.7 vs 346.0 at 4096 (segmented walks, where the per-query-head states' 3x writes and reads
    cost more than the shorter steps save). So: per query head for narrow maps, and for wide ones up to 16 chunks."""
    if REVERSE_WALK != "auto":
        return REVERSE_WALK
    return "query" if f <= 64 or n_chunks <= 16 else "kv"


PARALLEL_MAX_F = 256  # the parallel passes hold every feature of a row in one tile: wider maps take the chunked form
PARALLEL_BWD_MAX_F = 128  # the parallel backward keeps a [64, F] fp32 accumulator per program: wider maps (FAVOR+'s
# 256 features) take the chunked backward, measured faster there (short_calls.py at 1024 tokens: 240 us against 335
# fwd+bwd a call, the parallel forward in both)

# longest input the forward runs as one quadratic pass (`_parallel_kernel`), with or without gradients; None:
# `parallel_max_t`'s rule. Tests set it (0: always the chunked form) to exercise each form.
PARALLEL_MAX_T: int | None = None
# the rule's limits for maps of up to 64 features: without gradients (inference), and with them (a backward follows)
PARALLEL_INFER_MAX_T = 1024
PARALLEL_GRAD_MAX_T = 512


def parallel_max_t(f: int, grad: bool = False) -> int:
    """The longest input whose forward runs the quadratic passes rather than the chunked ones, for f features;
    `grad`: a backward follows (it then runs the form the forward ran: the parallel backward for f <=
    PARALLEL_BWD_MAX_F). Their work grows as T^2 (F + D), the chunked form's as T F D, so they win only while the
    chunked form's sequential walks and extra launches dominate. Measured on the H200 as device time (each call
    replayed in a CUDA graph, 9 query heads on 3 kv heads, bf16):
    - F = 64 without gradients: 0.018 vs 0.033 ms at 1024 tokens, 0.050 vs 0.025 at 2048
      (`benchmarks/linear_segments.py --compare parallel --graph`); 0.019 vs 0.022 at 1024 in every
      `benchmarks/short_calls.py` run since (`linear+parallel`, `linear+chunked`).
    - F = 64 with gradients (`PARALLEL_GRAD_MAX_T`): the parallel form won at first (0.081 vs 0.120 at 1024), but
      the chunked backward has since lost half its time (segmented walks, `segment_len`): fwd+bwd 0.095 vs 0.064
      at 1024 in one run (`benchmarks/short_calls.py --lengths 256,512,1024,2048`, results/model_bench/h200/
      grad_rule/, as in the six runs before it, performer_1k_experiments/), 0.039 vs 0.048 at 256 and 0.055 vs
      0.067 at 512. The SmolLM2 step in a CUDA graph at 1024 fell from 1.09x to 1.03x SDPA's.
    - F = 256 (FAVOR+, every feature in one tile, CONFIG["parallel_wide"], `benchmarks/short_calls.py`): fwd 0.041
      vs 0.044 at 1024 but 0.095 vs 0.042 at 2048, and with gradients the chunked forward keeps the states its
      backward reads (0.133 vs 0.173 at 1024): chunked throughout.
    Timed as single eager calls the parallel form wins further (one launch instead of three or more), but
    device time is what a model step pays once the host keeps ahead."""
    if f > PARALLEL_MAX_F:
        return 0
    if PARALLEL_MAX_T is not None:
        return PARALLEL_MAX_T
    if f > 64:
        return 0
    return PARALLEL_GRAD_MAX_T if grad else PARALLEL_INFER_MAX_T


def _wide(f: int) -> bool:
    """Whether the parallel pass takes its wide launch settings (`CONFIG["parallel_wide"]`)."""
    return f > 64


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def walk_count(f: int, d: int, rows: int) -> int:
    """The walks `segment_len` weighs for f features, d value columns and `rows` rows of states: (feature block,
    32-column value block, row) triples, the unit its rule was measured in, whatever `state_bv` gives a program
    (a walk of 64 columns counts as two: its segments then stay those measured)."""
    return triton.cdiv(f, BK) * triton.cdiv(d, 32) * rows


def state_bv(f: int, backward: bool = False, per_kv: bool = False) -> int:
    """Value columns per program of a state walk (`STATE_BV` None) for f features: 64 for the forward's walks of maps
    wider than one feature block (f > BK) and for the backward's walk per kv head over its group (per_kv), 32
    otherwise (more programs, each step shorter). Measured on the H200 at SmolLM2's shapes (9 query heads on 3, head
    dim 64, bf16; `benchmarks/short_calls.py`, a call's device time in CUDA graphs, variants interleaved; 32 against
    64 columns, `benchmarks/results/model_bench/h200/performer_1k_experiments/`): FAVOR+'s 256 features, forward, 35.0
    / 52.5 / 88.5 us against 33.8 / 50.5 / 85.0 at 1024 / 2048 / 4096 tokens; linear's 64 features 19.3 / 33.5 /
    44.7 against 19.4 / 34.8 / 46.6. The backward's walk (the forward at 64 in both): FAVOR+ per kv head (2048 and
    4096 tokens, `reverse_walk`) fwd+bwd 171.8 / 280.8 against 157.6 / 258.5, per query head (1024) 112.3 against
    114.5; linear (per query head) 95.6 / 86.9 / 123.6 against 95.7 / 80.2 / 119.6, not taken (-8% / -3% at 2048 /
    4096, nothing at 1024: a rule of its own for one map)."""
    if STATE_BV is not None:
        return STATE_BV
    return 64 if (per_kv if backward else f > BK) else 32


def _segmented(kernel, inputs: tuple, out, out_z, t: int, f: int, d: int, n_chunks: int, meta: dict, bv: int,
               own_p: bool = False, **consts) -> None:
    """Run a sequential pass (`_state_kernel` or `_grad_state_kernel`) into out [BH, N, F, D] and out_z [BH, N, F]
    in segments of `segment_len` chunks, bv value columns a program (`state_bv`): the segments' own sums first (SUMS,
    fp32) when there is more than one. own_p: `_state_kernel` finds P itself (OWN_P), each segment's stabiliser in a
    table of its own."""
    bh = out.shape[0]
    meta = {**meta, "BV": min(meta["BV"], bv)}
    seg = segment_len(n_chunks, walk_count(f, d, bh), _sm_count(out.device))
    n_seg = triton.cdiv(n_chunks, seg)
    grid = (triton.cdiv(f, BK), triton.cdiv(d, meta["BV"]), bh * n_seg)
    if own_p:  # each segment's stabiliser (one segment: none is read, out_z stands in)
        consts.update(OWN_P=True, BSEG=max(2, triton.next_power_of_2(n_seg)),
                      LSEG=out.new_empty(bh, n_seg, dtype=torch.float32) if n_seg > 1 else out_z)
    sums, sums_z = out, out_z  # not read with one segment
    if n_seg > 1:
        sums = out.new_empty(bh, n_seg, f, d, dtype=torch.float32)
        sums_z = out.new_empty(bh, n_seg, f, dtype=torch.float32)
        kernel[grid](*inputs, out, out_z, sums, sums_z, t, f, d, n_chunks, seg, n_seg, SUMS=True, **meta, **consts,
                     **CONFIG["state"])
    kernel[grid](*inputs, out, out_z, sums, sums_z, t, f, d, n_chunks, seg, n_seg, SUMS=False, **meta, **consts,
                 **CONFIG["state"])


def _states(k, v, lkf, pex, meta, n_chunks, fmap: int = 0):
    """(H [BH, N, F, D] (the inputs' dtype), Z [BH, N, F] (fp32), P [BH, N + 1]): the state entering each chunk, for
    k [B, Hkv, T, F] and v [B, Hkv, T, D] in any layout with unit last stride (or contiguous [BH, T, *]); BH = B Hkv
    rows. pex None: P is found by the pass itself (`_state_kernel`'s OWN_P) and returned; otherwise pex is P."""
    bh, t, f, d = lkf.shape[0], k.shape[-2], k.shape[-1], v.shape[-1]
    h = k.new_empty(bh, n_chunks, f, d)
    z = k.new_empty(bh, n_chunks, f, dtype=torch.float32)
    own = pex is None
    if own:
        pex = lkf.new_empty(bh, n_chunks + 1)
    # LSEG: a pointer the kernel reads only with OWN_P, when `_segmented` hands over the segments' own table
    _segmented(_state_kernel, (k, v, lkf, pex), h, z, t, f, d, n_chunks, meta, state_bv(f), own_p=own, MAP=fmap, LSEG=pex,
               NKV=k.shape[1] if k.dim() == 4 else 1,
               **dict(zip(("s_kb", "s_kh", "s_kt", "s_vb", "s_vh", "s_vt"), _strides(k, v))))
    return h, z, pex


@functools.lru_cache(maxsize=8)
def no_scale_tables(bh: int, t: int, n_chunks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(b = 0 [BH, T], its exclusive chunk maxima [BH, N + 1]) for maps without key log-scales: data that depends
    only on the shape, which every layer of a swapped model rebuilt on every call (six small kernels and their
    launches per layer). Read-only in every kernel, so one copy per (shape, device) serves all."""
    lkf = torch.zeros(bh, t, dtype=torch.float32, device=device)
    return lkf, _exclusive_chunk_max(lkf, n_chunks)


# the forward's state pass finds the exclusive chunk maxima P of the key log-scales itself (`_state_kernel`'s OWN_P)
# rather than after a launch of its own (`_exclusive_chunk_max`); False: that launch first. Measured on the H200 at
# SmolLM2's shapes (`benchmarks/short_calls.py`, `performer+chunkmax`, FAVOR+'s forward a call): 35.1 against 36.3 us
# at 1024 tokens, 52.7 against 52.7 at 2048, 89.0 against 90.5 at 4096
# (`benchmarks/results/model_bench/h200/performer_1k_experiments/own_p_short_calls.txt`).
OWN_P = True


def chunk_tables(lk, b: int, nkv: int, t: int, n_chunks: int, device, chunked: bool = True):
    """(b [B Hkv, T] fp32 contiguous, its exclusive chunk maxima P [B Hkv, N + 1] or None) for key log-scales lk [B,
    Hkv, T] (None: b = 0 for every key, the shared `no_scale_tables`). P only for the chunked passes and without
    OWN_P (the state pass finds it then; the parallel pass keeps its running max; the backward builds P itself
    after it)."""
    if lk is None:
        return no_scale_tables(b * nkv, t, n_chunks, device)
    lkf = lk.reshape(b * nkv, t).float().contiguous()
    return lkf, (_exclusive_chunk_max(lkf.detach(), n_chunks) if chunked and not OWN_P else None)


def kernel_meta(q: torch.Tensor, d: int, has_scale: bool) -> dict:
    """The constexprs every causal kernel takes, for query features q and value width d."""
    return dict(HAS_SCALE=has_scale, PREC=_precision(q), BT=BT, BK=BK, BV=max(16, triton.next_power_of_2(d)))


def _outputs(q, v):
    """(out [B, H, T, D] with [B, T, H, D] memory, den [B H, T] fp32), unwritten: the forward passes' outputs. Out in
    that layout: what transformers turns it into next (out.transpose(1, 2)) is then contiguous already, no copy."""
    b, nh, t, _ = q.shape
    return v.new_empty(b, t, nh, v.shape[-1]).transpose(1, 2), q.new_empty(b * nh, t, dtype=torch.float32)


def out_pass(q, k, v, lkf, pex, h, z, meta, fmap: int = 0):
    """The chunked form's second pass (`_out_kernel`): (out, den) as `_outputs` lays them out, from the states
    entering each chunk."""
    b, nh, t, f = q.shape
    nkv, d = k.shape[1], v.shape[-1]
    n_chunks = triton.cdiv(t, BT)
    out, den = _outputs(q, v)
    _out_kernel[(n_chunks, b * nh)](q, k, v, lkf, pex, h, z, out, den, t, f, d, n_chunks, nh // nkv, nh, nkv,
                                    *_strides(q, k, v, out), **meta, MAP=fmap, **CONFIG["out"])
    return out, den


def _forward(q, k, v, lk, fmap: int = 0, grad: bool = False):
    """The forward passes: (out [B, H, T, D], the tensors the backward saves, the kernels' meta, the shapes). fmap:
    an elementwise map applied to q and k on load (`_feature`; 0: they are the features); grad: a backward follows
    (`parallel_max_t`'s rule differs)."""
    b, nh, t, f = q.shape
    nkv, d = k.shape[1], v.shape[-1]
    groups = nh // nkv  # GQA: the states are the kv heads' (a group's query heads read the same ones)
    # read in the caller's layout (transformers' q, k, v are [B, T, H, D] in memory): no copies
    q, k, v = _unit_stride(q, k, v)
    n_chunks = triton.cdiv(t, BT)
    parallel = t <= parallel_max_t(f, grad)
    # without log-scales b = 0 (every weight 1), through the same kernels (see `_weights`)
    lkf, pex = chunk_tables(lk, b, nkv, t, n_chunks, q.device, chunked=not parallel)
    meta = kernel_meta(q, d, lk is not None)
    h = z = None  # the states entering each chunk (the chunked form's), which the backward reads again
    if parallel:  # one quadratic pass (its DEN is the chunked form's: the backward is the same)
        out, den = _outputs(q, v)
        pmeta = {**meta, "BK": max(16, triton.next_power_of_2(f))}  # every feature in one tile
        _parallel_kernel[(n_chunks, b * nh)](q, k, v, lkf, out, den, t, f, d, groups, nh, nkv, *_strides(q, k, v, out),
                                             **pmeta, MAP=fmap, **CONFIG["parallel_wide" if _wide(f) else "parallel"])
    else:
        h, z, pex = _states(k, v, lkf, pex, meta, n_chunks, fmap)
        out, den = out_pass(q, k, v, lkf, pex, h, z, meta, fmap)
    return out, (q, k, v, lkf, pex, out, den, h, z), meta, (b, nh, nkv, t, f, d, n_chunks)


def grad_prep(dout, out, den, meta, shape):
    """(dnum [B H, T, D] in the matmul dtype, dden [B H, T] fp32): the division's gradient (`_grad_prep_kernel`)."""
    b, nh, nkv, t, f, d, n_chunks = shape
    (dout,) = _unit_stride(_limits.narrowed(dout))  # in the caller's layout, unless wider than 32-bit offsets reach
    dnum, dden = out.new_empty(b * nh, t, d), torch.empty_like(den)
    _grad_prep_kernel[(n_chunks, b * nh)](dout, out, den, dnum, dden, t, d, nh, *_strides(dout, out), meta["PREC"],
                                          BT, meta["BV"])
    return dnum, dden


class _CausalLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lk, fmap=0, grad=True):
        out, saved, ctx.meta, ctx.shape = _forward(q, k, v, lk, fmap, grad)
        ctx.meta = {**ctx.meta, "MAP": fmap}  # q, k saved raw: the backward maps them once (`_map_features`)
        ctx.save_for_backward(*saved)  # H, Z kept: O(T F D / 64), a walk fewer in the backward
        # the backward's form is the forward's (no states H after the parallel pass), up to PARALLEL_BWD_MAX_F
        ctx.parallel_bwd = saved[7] is None and q.shape[-1] <= PARALLEL_BWD_MAX_F
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, lkf, pex, out, den, h, z = ctx.saved_tensors
        b, nh, nkv, t, f, d, n_chunks = ctx.shape
        meta = ctx.meta
        like = (q, k, v)  # the gradients in the inputs' layouts
        if meta["MAP"]:  # the forward mapped q and k as it loaded them: the backward's features, one launch for both
            q, k = _map_features(q, k, meta)
        dnum, dden = grad_prep(dout, out, den, meta, ctx.shape)
        if ctx.parallel_bwd:
            dq, dk, dv, db = _parallel_backward(q, k, v, lkf, dnum, dden, meta, ctx.shape, like)
        else:
            dq, dk, dv, db = _chunked_backward(q, k, v, lkf, pex, dnum, dden, meta, ctx.shape, h, z, like=like)
        dlk = db.reshape(b, nkv, t) if meta["HAS_SCALE"] and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dlk, None, None


def _map_features(q, k, meta):
    """(phi(q) [B, H, T, F], phi(k) [B, Hkv, T, F]), contiguous, for the backward of the forward that mapped q and k
    on load (meta["MAP"]). The backward's kernels then read features as without a map and apply its slope to dq and
    dk as they write them. Mapping on load inside their walks instead (each q or k tile mapped every time a walk
    reads it) made linear's SmolLM2 fwd+bwd call 168 us against 96 with PyTorch's maps at 1024 tokens on the H200
    (`benchmarks/short_calls.py`, `_parallel_dkv_kernel` alone 114 us): the mapped tiles no longer fed the dots
    from the pipelined loads."""
    b, nh, t, f = q.shape
    nkv = k.shape[1]
    fq, fk = q.new_empty(b, nh, t, f), k.new_empty(b, nkv, t, f)
    _map_kernel[(triton.cdiv(t, BT), b * (nh + nkv))](q, k, fq, fk, t, f, nh, nkv, b * nh, *_strides(q, k),
                                                      MAP=meta["MAP"], PREC=meta["PREC"], BT=BT,
                                                      BF=max(16, triton.next_power_of_2(f)))
    return fq, fk


def _parallel_backward(q, k, v, lkf, dnum, dden, meta, shape, like=None):
    """The quadratic form's gradients in two passes (dq per query head; dk, dv per kv head over its group), reading
    q, k, v where the forward did: (dq [B, H, T, F], dk [B, Hkv, T, F], dv [B, Hkv, T, D], each laid out as the
    tensor of `like` (q, k, v by default) is, `torch.empty_like`; db [B Hkv, T] | None)."""
    b, nh, nkv, t, f, d, n_chunks = shape
    groups = nh // nkv
    mrow = lkf.cummax(-1).values if meta["HAS_SCALE"] else lkf  # M_i per kv head (unread without log-scales)
    pmeta = dict(HAS_SCALE=meta["HAS_SCALE"], PREC=meta["PREC"], BT=BT, BF=max(16, triton.next_power_of_2(f)),
                 BV=meta["BV"], MAP=meta["MAP"])
    dq, dk, dv = (torch.empty_like(x) for x in (like or (q, k, v)))
    db = lkf.new_empty(b * nkv, t) if meta["HAS_SCALE"] else None
    launch = CONFIG["grad"]
    _parallel_dq_kernel[(n_chunks, b * nh)](q, k, v, lkf, mrow, dnum, dden, dq, t, f, d, groups, nh, nkv,
                                            *_strides(q, k, v, dq), **pmeta, **launch)
    _parallel_dkv_kernel[(n_chunks, b * nkv)](q, k, v, lkf, mrow, dnum, dden, dk, dv, dden if db is None else db, t, f,
                                              d, n_chunks, groups, nh, nkv, *_strides(q, k, v, dk, dv), **pmeta,
                                              **launch)
    return dq, dk, dv, db


def _chunked_backward(q, k, v, lkf, pex, dnum, dden, meta, shape, h=None, z=None, then_dq=None, then_dk=None,
                      need_db=True, like=None):
    """The chunked form's gradients (dq [B, H, T, F], dk, dv, each laid out as the tensor of `like` (q, k, v by
    default) is, `torch.empty_like`; db | None): two branches, run concurrently on CUDA
    (`triton_common.concurrently`: at a few thousand tokens every pass is latency-bound on a few SMs): every chunk's
    dq per query head (`_grad_dq_kernel`, from the forward's states), and the reverse walk (per kv head over its group
    or per query head, `reverse_walk`) followed by every chunk's dk, dv per kv head (its group summed in registers).
    h, z: the states the forward's chunked passes wrote (per kv head); None after the parallel forward, then
    recomputed. then_dq(dq), then_dk(dk): launches that continue each branch on its stream (FAVOR+'s map gradients,
    `ops.performer_triton`); the branches join after them. need_db False: the key log-scales' gradient is not summed
    (None; the kernel's per-block parts are written all the same)."""
    b, nh, nkv, t, f, d, n_chunks = shape
    groups = nh // nkv
    dq, dk, dv = (torch.empty_like(x) for x in (like or (q, k, v)))
    q, k = q.contiguous(), k.contiguous()  # [B, H, T, F] rows, what the kernels index (none copied from FAVOR+)
    (v,) = _unit_stride(v)  # [B, Hkv, T, D] read where it lies
    if pex is None:  # the forward ran the parallel pass
        pex = _exclusive_chunk_max(lkf, n_chunks)
    meta = dict(meta)
    fmap = meta.pop("MAP", 0)  # q and k are an elementwise map's features: dq, dk get its slope (0: no map)
    if h is None:
        h, z, _ = _states(k, v, lkf, pex, meta, n_chunks)
    n_fb = triton.cdiv(f, BK)  # dk's feature blocks, one program each (`_grad_dkv_kernel`)
    # db's part per feature block (one block: db itself), summed after; unwritten without log-scales
    db_parts = lkf.new_empty(n_fb, *lkf.shape) if meta["HAS_SCALE"] else lkf
    wg = groups if reverse_walk(f, n_chunks) == "kv" else 1  # query heads a reverse walk takes
    g = h.new_empty(b * nh // wg, n_chunks, f, d)
    gz = z.new_empty(b * nh // wg, n_chunks, f)

    def dq_branch():
        _grad_dq_kernel[(n_chunks, b * nh)](q, k, v, lkf, pex, h, z, dnum, dden, dq, t, f, d, n_chunks, groups, nh, nkv,
                                            *_strides(v, dq), **meta, MAP=fmap, **CONFIG["grad"])
        if then_dq is not None:
            then_dq(dq)

    def dkv_branch():
        _segmented(_grad_state_kernel, (q, lkf, pex, dnum, dden), g, gz, t, f, d, n_chunks, meta,
                   state_bv(f, backward=True, per_kv=wg > 1), WG=wg,
                   NG=groups // wg)
        _grad_dkv_kernel[(n_chunks, b * nkv, n_fb)](q, k, v, lkf, pex, g, gz, dnum, dden, dk, dv, db_parts, t, f, d,
                                                    n_chunks, groups, groups // wg, lkf.numel(), nkv,
                                                    *_strides(v, dk, dv), **meta, MAP=fmap, **CONFIG["grad"])
        if then_dk is not None:
            then_dk(dk)
        if not (meta["HAS_SCALE"] and need_db):
            return None
        return db_parts[0] if n_fb == 1 else db_parts.sum(0)

    _, db = concurrently(dq_branch, dkv_branch, q.device)
    return dq, dk, dv, db


FEATURE_MAPS = {"elu": 1, "relu": 2}  # elementwise maps the kernels can apply on load (`_feature`)
# whether a method's elementwise map runs inside the kernels while gradients are recorded too (methods/_kernel.py;
# inference always maps there); False maps q and k first, as PyTorch ops with their own backward
MAP_WITH_GRAD = True


def causal_linear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_log_scale: torch.Tensor | None = None,
                  feature_map: str | None = None):
    """out [B, H, T, D] in v's dtype: causal linear attention of features q [B, H, T, F], k [B, Hkv, T, F] (v's
    dtype) and v [B, Hkv, T, D], with optional key log-scales [B, Hkv, T] (fp32; -inf: a key to ignore). Rows with
    no visible key are 0. Hkv < H is grouped-query attention (Hkv divides H; query head h reads kv head h // (H /
    Hkv)): the states are the kv heads', and both backwards sum each group in its kv head's programs.

    feature_map "elu" | "relu": q and k are the raw queries and keys, mapped inside the forward's kernels as they are
    loaded (no feature tensors written or saved); with gradients the backward maps them once, one launch for both
    (`_map_features`), and applies the map's slope to dq and dk as its kernels write them: one launch where mapping
    first takes four (two maps, two map backwards). Without key log-scales (an elementwise map has none)."""
    if q.shape[1] % k.shape[1] or k.shape[1] != v.shape[1]:
        raise ValueError(f"causal_linear: kv heads (k {k.shape[1]}, v {v.shape[1]}) must agree and divide the "
                         f"query heads ({q.shape[1]})")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3] or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"causal_linear: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must agree in "
                         "batch and length, q and k in features")
    if key_log_scale is not None and key_log_scale.shape != k.shape[:3]:
        raise ValueError(f"causal_linear: key_log_scale must be [B, Hkv, T] = {tuple(k.shape[:3])}, got "
                         f"{tuple(key_log_scale.shape)}")
    check_call("causal_linear", q.shape[-2], q, k, v, heads=q.shape[1], head_dim=v.shape[-1], feature_dim=q.shape[-1])
    split = in_batch_pieces("causal_linear", q.shape[0], q.shape[1] + k.shape[1], lambda lo, hi: causal_linear(
        q[lo:hi], k[lo:hi], v[lo:hi], piece(key_log_scale, lo, hi), feature_map=feature_map))
    if split is not None:
        return split
    grad = records_grad(q, k, v, key_log_scale)
    if feature_map is None:
        return _CausalLinear.apply(q, k, v, key_log_scale, 0, grad)
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"causal_linear: feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
    if key_log_scale is not None:
        raise ValueError("causal_linear: feature_map= takes no key log-scales (an elementwise map has none)")
    if grad:
        return _CausalLinear.apply(q, k, v, None, FEATURE_MAPS[feature_map], True)
    return _forward(q, k, v, None, FEATURE_MAPS[feature_map])[0]  # inference: no autograd node, nothing saved
