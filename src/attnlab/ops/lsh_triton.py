"""Reformer LSH's chunk attention as Triton kernels: the sort's gather and unsort fused into the attention.

`methods.lsh` hashes and sorts in PyTorch (argsort of bucket * Tp + position per round). The PyTorch form then
gathers q, k, v into sorted order per round (R copies of each), builds each chunk's look-one-back window by
concatenating chunk c with chunk c-1 (two more copies of k, v), computes [L, 2L] score blocks in memory, and
unsorts the rounds' outputs with two more gathers. Here one program per (batch x head x round, chunk) reads its
L query rows and the 2L key / value rows straight from q, k, v through the sort's index lists, runs the window's
softmax in registers (FlashAttention's online form over the two key chunks), and writes its rows' output and
log-sum-exp at their ORIGINAL positions: no sorted copies, no score blocks in memory.

The rounds are combined as in `methods.lsh`: out = sum_r w_r out_r with w = softmax_r(lse_r), which is softmax
attention over the multiset union of the rounds' key windows (the probability of key j in round r's window is
w_r exp(s_ij - lse_r)). So the backward is FlashAttention's with those probabilities and delta = rowsum(dout *
out): one program per (b h r, chunk) recomputes its [L, 2L] probabilities from the saved lse_r and w_r, and writes dq for its queries and dk, dv for the two key chunks at original
positions, into per-round buffers (own chunk and look-back kept apart, so every element has one writer: no
atomics, deterministic), summed over rounds after.

Masks, as `methods.lsh._chunk_scores`: a key counts when it is in the query's bucket, real (not padding; the caller
gives padded keys bucket -1) and, causal, at an original position <= the query's; with shared QK a key at the
query's own position scores SELF_SCORE (-1e5, finite: the last resort) before the masks, and that score has no
gradient. A query with no key in a round has lse -inf there; with none in any round its output and gradients are 0.
Runs on CPU tensors under TRITON_INTERPRET=1 (the CPU tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .limits import in_batch_pieces
from .triton_common import dot as _dot
from .triton_common import kernel_reasons
from .triton_common import precision as _precision
from .triton_common import to as _to

SELF_SCORE = -1e5
_SELF = tl.constexpr(SELF_SCORE)  # a jit function reads only constexpr globals
MAX_CHUNK = 128  # the largest bucket_size the kernels take (an [L, 2L] score block per program)
MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported_reasons(device, *, chunk: int, head_dim: int, dtype=None, need_probs: bool = False) -> list[str]:
    """Why the kernels cannot serve a request (empty: they can)."""
    why = kernel_reasons(device, dtype=dtype, dtypes=DTYPES, head_dim=head_dim, max_head_dim=MAX_HEAD_DIM,
                         fallback="eager")
    if chunk > MAX_CHUNK:
        why.append(f"backend='triton' takes chunks of up to {MAX_CHUNK} tokens, got min(bucket_size, T) = {chunk}")
    elif dtype == torch.float32 and chunk > 64 and head_dim > 64:
        # the fp32 backward's tiles would need more shared memory than an H100 / H200 has (sm_90 compiles, triton 3.6)
        why.append(f"backend='triton' in fp32 with head_dim > 64 takes chunks of up to 64 tokens, got {chunk}")
    if need_probs:
        why.append("backend='triton' does not build the probability matrix (need_probs: use backend='eager')")
    return why


@triton.jit
def _query_block(Q, QO, QB, z, bh, c, T, Tp, D, L, BL: tl.constexpr, BD: tl.constexpr):
    """Chunk c of round z's sorted queries: (q [BL, BD], original positions, buckets, validity)."""
    offs = tl.arange(0, BL)
    offs_d = tl.arange(0, BD)
    rows_ok = offs < L
    qpos = tl.load(QO + z * Tp + c * L + offs, mask=rows_ok, other=T)
    qb = tl.load(QB + z * Tp + c * L + offs, mask=rows_ok, other=-2)
    qvalid = rows_ok & (qpos < T)  # positions >= T: the internal padding of the last chunk
    q = tl.load(Q + bh * T * D + qpos.to(tl.int64)[:, None] * D + offs_d[None, :],
                mask=qvalid[:, None] & (offs_d < D)[None, :], other=0.0)
    return q, qpos, qb, qvalid


@triton.jit
def _key_block(K, V, KO, KB, z, bh, kc, T, Tp, D, L, BL: tl.constexpr, BD: tl.constexpr):
    """Chunk kc of round z's sorted keys (none when kc < 0): (k, v, original positions, buckets, validity)."""
    offs = tl.arange(0, BL)
    offs_d = tl.arange(0, BD)
    kslot = kc * L + offs
    kmask = (offs < L) & (kslot >= 0)  # kc >= 0
    kpos = tl.load(KO + z * Tp + kslot, mask=kmask, other=T)
    kb = tl.load(KB + z * Tp + kslot, mask=kmask, other=-1)
    kvalid = kmask & (kpos < T)
    off = bh * T * D + kpos.to(tl.int64)[:, None] * D + offs_d[None, :]
    lmask = kvalid[:, None] & (offs_d < D)[None, :]
    return tl.load(K + off, mask=lmask, other=0.0), tl.load(V + off, mask=lmask, other=0.0), kpos, kb, kvalid


@triton.jit
def _scores(q, qpos, qb, qvalid, k, kpos, kb, kvalid, scale, CAUSAL: tl.constexpr, SHARED: tl.constexpr,
            PREC: tl.constexpr):
    """The masked fp32 scores [BL, BL] (-inf where not allowed) and where a key is the query itself."""
    s = _dot(q, tl.trans(k), PREC) * scale
    allowed = (qb[:, None] == kb[None, :]) & kvalid[None, :] & qvalid[:, None]
    if CAUSAL:
        allowed = allowed & (kpos[None, :] <= qpos[:, None])  # by original positions
    is_self = kpos[None, :] == qpos[:, None]
    if SHARED:
        s = tl.where(is_self, _SELF, s)  # before the masks: a hidden self key stays hidden
    return tl.where(allowed, s, float("-inf")), is_self


@triton.jit
def _fwd_kernel(Q, K, V, QO, QB, KO, KB, O, LSE, T, Tp, D, R, scale,
                CAUSAL: tl.constexpr, SHARED: tl.constexpr, L, BL: tl.constexpr, BD: tl.constexpr,
                PREC: tl.constexpr):
    c = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)  # (batch x head) x R + round
    bh = z // R
    q, qpos, qb, qvalid = _query_block(Q, QO, QB, z, bh, c, T, Tp, D, L, BL, BD)
    m_i = tl.full([BL], float("-inf"), tl.float32)
    l_i = tl.zeros([BL], tl.float32)
    acc = tl.zeros([BL, BD], tl.float32)
    for j in tl.static_range(2):  # the chunk's own keys, then the previous chunk's (look one back)
        k, v, kpos, kb, kvalid = _key_block(K, V, KO, KB, z, bh, c - j, T, Tp, D, L, BL, BD)
        s, is_self = _scores(q, qpos, qb, qvalid, k, kpos, kb, kvalid, scale, CAUSAL, SHARED, PREC)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(_to(p, v.dtype, PREC), v, PREC)
        m_i = m_new
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    offs_d = tl.arange(0, BD)
    rows = z * T + qpos.to(tl.int64)
    tl.store(O + rows[:, None] * D + offs_d[None, :], out, mask=qvalid[:, None] & (offs_d < D)[None, :])
    tl.store(LSE + rows, lse, mask=qvalid)


@triton.jit
def _bwd_kernel(Q, K, V, QO, QB, KO, KB, DO, LSE, W, DELTA, DQ, DK, DV, DKB, DVB, T, Tp, D, R, scale,
                CAUSAL: tl.constexpr, SHARED: tl.constexpr, L, BL: tl.constexpr, BD: tl.constexpr,
                PREC: tl.constexpr):
    """Round z's share of dq for the chunk's queries and of dk, dv for its own key chunk (DK, DV) and the one
    before (DKB, DVB), each at the rows' original positions."""
    c = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    bh = z // R
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    q, qpos, qb, qvalid = _query_block(Q, QO, QB, z, bh, c, T, Tp, D, L, BL, BD)
    qrow = bh * T + qpos.to(tl.int64)
    rrow = z * T + qpos.to(tl.int64)
    lse = tl.load(LSE + rrow, mask=qvalid, other=float("-inf"))  # this round's
    w = tl.load(W + rrow, mask=qvalid, other=0.0)  # this round's weight in the combination (0: no key anywhere)
    delta = tl.load(DELTA + qrow, mask=qvalid, other=0.0)
    do = tl.load(DO + qrow[:, None] * D + offs_d[None, :], mask=qvalid[:, None] & dmask[None, :], other=0.0)
    ok = lse > float("-inf")
    lse = tl.where(ok, lse, 0.0)
    w = tl.where(ok, w, 0.0)
    dq = tl.zeros([BL, BD], tl.float32)
    for j in tl.static_range(2):
        k, v, kpos, kb, kvalid = _key_block(K, V, KO, KB, z, bh, c - j, T, Tp, D, L, BL, BD)
        s, is_self = _scores(q, qpos, qb, qvalid, k, kpos, kb, kvalid, scale, CAUSAL, SHARED, PREC)
        p = w[:, None] * tl.exp(s - lse[:, None])  # the probability over all rounds' windows (0 where masked)
        dv = _dot(tl.trans(_to(p, do.dtype, PREC)), do, PREC)
        ds = p * (_dot(do, tl.trans(v), PREC) - delta[:, None])
        if SHARED:
            ds = tl.where(is_self, 0.0, ds)  # the self score is a constant
        ds = _to(ds, q.dtype, PREC)
        dq += _dot(ds, k, PREC) * scale
        dk = _dot(tl.trans(ds), q, PREC) * scale
        krow = (z * T + kpos.to(tl.int64))[:, None] * D + offs_d[None, :]
        kst = kvalid[:, None] & dmask[None, :]
        if j == 0:
            tl.store(DK + krow, dk, mask=kst)
            tl.store(DV + krow, dv, mask=kst)
        else:
            tl.store(DKB + krow, dk, mask=kst)
            tl.store(DVB + krow, dv, mask=kst)
    tl.store(DQ + (z * T + qpos.to(tl.int64))[:, None] * D + offs_d[None, :], dq, mask=qvalid[:, None] & dmask[None, :])


@triton.jit
def _hash_kernel(X, W, KEYS, T, Tp, D, HALF, R, NB, PREC: tl.constexpr, SPLIT: tl.constexpr, BN: tl.constexpr,
                 BD: tl.constexpr, BM: tl.constexpr):
    """Sort keys bucket * Tp + t of a block of rows of X [BH, T, D] for every round: bucket = argmax over [x.w_r, -x.w_r]
    (first index on ties, as torch's argmax) with w_r = W[:, r, :] [D, HALF]; rows T.. (the internal padding) get
    bucket NB. The projections never reach memory. SPLIT 3: x is exact in its half dtype and w is cut into three
    half-precision parts (hi + mid + lo, |w - hi - mid - lo| ~ 2^-24 |w| in bf16), three tensor-core dots with fp32
    accumulation: the fp32 projection's accuracy; SPLIT 1: one dot at PREC (fp32 inputs, or the interpreter)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = pid * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    x = tl.load(X + bh * T * D + rows.to(tl.int64)[:, None] * D + offs_d[None, :],
                mask=(rows < T)[:, None] & dmask[None, :], other=0.0)
    for r in range(R):
        best_hi = tl.full([BN], float("-inf"), tl.float32)
        best_lo = tl.full([BN], float("inf"), tl.float32)
        arg_hi = tl.zeros([BN], tl.int32)
        arg_lo = tl.zeros([BN], tl.int32)
        for mb in range(0, tl.cdiv(HALF, BM)):
            offs_m = mb * BM + tl.arange(0, BM)
            mmask = offs_m < HALF
            w = tl.load(W + offs_d[:, None] * (R * HALF) + r * HALF + offs_m[None, :],
                        mask=dmask[:, None] & mmask[None, :], other=0.0)
            if SPLIT == 3:
                hi = w.to(x.dtype)
                rest = w - hi.to(tl.float32)
                mid = rest.to(x.dtype)
                lo = (rest - mid.to(tl.float32)).to(x.dtype)
                xw = _dot(x, hi, PREC) + _dot(x, mid, PREC) + _dot(x, lo, PREC)
            elif PREC == "tf32":  # half inputs on tensor cores without the split: one dot, w rounded to x's dtype
                xw = _dot(x, w.to(x.dtype), PREC)
            else:
                xw = _dot(x, w, PREC)
            cand_hi = tl.where(mmask[None, :], xw, float("-inf"))
            cand_lo = tl.where(mmask[None, :], xw, float("inf"))
            m_hi = tl.max(cand_hi, 1)
            m_lo = tl.min(cand_lo, 1)
            a_hi = tl.argmax(cand_hi, 1, tie_break_left=True).to(tl.int32) + mb * BM
            a_lo = tl.argmin(cand_lo, 1, tie_break_left=True).to(tl.int32) + mb * BM
            up_hi = m_hi > best_hi  # strictly: an earlier block keeps a tie
            up_lo = m_lo < best_lo
            arg_hi = tl.where(up_hi, a_hi, arg_hi)
            arg_lo = tl.where(up_lo, a_lo, arg_lo)
            best_hi = tl.where(up_hi, m_hi, best_hi)
            best_lo = tl.where(up_lo, m_lo, best_lo)
        bucket = tl.where(best_hi >= -best_lo, arg_hi, arg_lo + HALF).to(tl.int64)
        bucket = tl.where(rows < T, bucket, NB)
        tl.store(KEYS + (bh * R + r) * Tp + rows, bucket * Tp + rows, mask=rows < Tp)


def hash_sort(x: torch.Tensor, rotations: torch.Tensor, n_buckets: int, tp: int, split: bool | None = None):
    """(order, sorted buckets), each [B, H, R, Tp] int64, of `methods.lsh`'s angular hash and its stable sort by
    (bucket, position), with x [B, H, T, D] (fp32 / bf16 / fp16, the projections computed as in fp32 by
    `_hash_kernel`) and rotations [D, R, n_buckets / 2] fp32; n_buckets > 1. split: the three-part projection (default:
    on the GPU's tensor cores, i.e. half inputs on CUDA; the tests force it under the interpreter, whose dots then
    multiply the parts exactly in fp32)."""
    b, h, t, d = x.shape
    r, half = rotations.shape[1], rotations.shape[2]
    joined = in_batch_pieces("lsh hash_sort", b, h, lambda lo, hi: hash_sort(x[lo:hi], rotations, n_buckets, tp, split))
    if joined is not None:
        return joined
    keys = torch.empty(b, h, r, tp, dtype=torch.int64, device=x.device)
    prec = _precision(x)
    bn, bm = 64, 64
    _hash_kernel[(triton.cdiv(tp, bn), b * h)](x.contiguous(), rotations.float().contiguous(), keys, t, tp, d, half, r,
                                               n_buckets, PREC=prec, SPLIT=3 if (prec == "tf32" if split is None else split) else 1, BN=bn,
                                               BD=max(16, triton.next_power_of_2(d)), BM=bm, num_warps=4)
    skeys, order = keys.sort(dim=-1)  # keys are unique: the sort is stable by construction
    return order, torch.div(skeys, tp, rounding_mode="floor")


def _launch(chunk: int, d: int) -> dict:
    return dict(BL=max(16, triton.next_power_of_2(chunk)), BD=max(16, triton.next_power_of_2(d)),
                num_warps=4 if chunk <= 64 else 8, num_stages=1)


def _combine(o_r: torch.Tensor, lse_r: torch.Tensor):
    """(out [B, H, T, D], the rounds' weights w [B, H, R, T]) from o_r [B, H, R, T, D] and lse_r [B, H, R, T], fp32:
    w = softmax over the rounds of lse_r (as `methods.lsh`: normalised as a softmax, not as exp(lse_r - LSE), which
    loses the weights' sum in fp32 when a query's only key is its own at -1e5), 0 where no round has a key."""
    any_key = (lse_r > float("-inf")).any(dim=2, keepdim=True)
    w = torch.softmax(lse_r.masked_fill(~any_key, 0.0), dim=2).mul_(any_key)
    return torch.einsum("bhrt,bhrtd->bhtd", w, o_r), w


class _LSHChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_order, q_sbkt, k_order, k_sbkt, scale, causal, shared, chunk):
        b, h, t, d = q.shape
        r, tp = q_order.shape[2], q_order.shape[3]
        o_r = q.new_empty(b, h, r, t, d, dtype=torch.float32)
        lse_r = q.new_empty(b, h, r, t, dtype=torch.float32)
        grid = (tp // chunk, b * h * r)
        args = (q_order, q_sbkt, k_order, k_sbkt)
        _fwd_kernel[grid](q, k, v, *args, o_r, lse_r, t, tp, d, r, scale, CAUSAL=causal, SHARED=shared, L=chunk,
                          PREC=_precision(q), **_launch(chunk, d))
        out, w = _combine(o_r, lse_r)
        ctx.save_for_backward(q, k, v, *args, out, lse_r, w)
        ctx.consts = (scale, causal, shared, chunk)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, q_order, q_sbkt, k_order, k_sbkt, out, lse_r, w = ctx.saved_tensors
        scale, causal, shared, chunk = ctx.consts
        b, h, t, d = q.shape
        r, tp = q_order.shape[2], q_order.shape[3]
        dout = dout.contiguous()
        do = dout.to(q.dtype)
        delta = (do.float() * out).sum(-1)  # fp32, from the same (rounded) dout as the kernel's dp
        dq_r, dk_r, dv_r = (q.new_empty(b, h, r, t, d, dtype=torch.float32) for _ in range(3))
        dkb_r, dvb_r = (q.new_zeros(b, h, r, t, d, dtype=torch.float32) for _ in range(2))  # the last chunk: no writer
        grid = (tp // chunk, b * h * r)
        _bwd_kernel[grid](q, k, v, q_order, q_sbkt, k_order, k_sbkt, do, lse_r, w, delta, dq_r, dk_r, dv_r, dkb_r, dvb_r,
                          t, tp, d, r, scale, CAUSAL=causal, SHARED=shared, L=chunk, PREC=_precision(q),
                          **_launch(chunk, d))
        dq = dq_r.sum(2).to(q.dtype)
        dk = dk_r.add_(dkb_r).sum(2).to(k.dtype)
        dv = dv_r.add_(dvb_r).sum(2).to(v.dtype)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def lsh_chunk_attention(q, k, v, q_order, q_sbkt, k_order, k_sbkt, *, scale: float, causal: bool, shared: bool,
                        chunk: int) -> torch.Tensor:
    """LSH attention's output [B, H, T, D] in fp32, rounds combined, from q, k, v [B, H, T, D] (one dtype) and
    per round the sort: q_order / k_order [B, H, R, Tp] (sorted slot -> original position, >= T for the internal
    padding that fills the last chunk) and the sorted buckets q_sbkt / k_sbkt (keys that may not be attended to,
    padding, with bucket -1); Tp a multiple of `chunk`. The caller checked `unsupported_reasons`."""
    split = in_batch_pieces("lsh_chunk_attention", q.shape[0], q.shape[1] * q_order.shape[2], lambda lo, hi: (
        lsh_chunk_attention(q[lo:hi], k[lo:hi], v[lo:hi], q_order[lo:hi], q_sbkt[lo:hi], k_order[lo:hi],
                            k_sbkt[lo:hi], scale=scale, causal=causal, shared=shared, chunk=chunk)))
    if split is not None:
        return split
    i32 = [x.to(torch.int32).contiguous() for x in (q_order, q_sbkt, k_order, k_sbkt)]
    return _LSHChunks.apply(q.contiguous(), k.contiguous(), v.contiguous(), *i32, float(scale), bool(causal),
                            bool(shared), int(chunk))
