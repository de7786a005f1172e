"""Nystromformer's two T-long products as Triton kernels, so that neither T x m softmax matrix reaches memory.

`methods.nystrom` computes, with m landmarks Q~, K~ (segment means; K~ carries the scale s):

    B V = softmax(s Q~ K^T) V     [m, D]: m queries over the T keys      (`b_side`)
    out = softmax(Q K~^T) X       [T, D]: T queries over the m landmarks (`f_side`),   X = pinv(A) (B V)

Both are attention, and each runs here as FlashAttention runs it, with the scores and probabilities in registers:

- `b_side`: m landmark queries against all T keys. One program per (split of the keys, batch x head) walks its keys
  in tiles with an online softmax and writes its partial (max, sum, unnormalised m x D product); the partials are
  combined after (split-K: m = 64 queries are one tile per head, which alone would leave most of the GPU idle). The
  backward, per split again, recomputes the probabilities from the saved log-sum-exp and writes dk, dv of its keys
  and a partial dQ~.
- `f_side`: one program per block of T queries does the softmax over the m landmarks in registers and the
  product with X. Its backward writes dq for its rows and partial dX, dK~ (each program sums its own blocks first).

Precision. X = pinv(A) B V is about cond(A) larger than the output, so B's side must not be rounded to bf16
(`methods.nystrom`'s note); on the GPU with bf16 inputs each product whose operand is fp32 (the landmarks, X, the
probabilities) splits that operand into two bf16 parts, a = hi + lo (|a - hi - lo| ~ 2^-16 |a|), and runs a
tensor-core dot per part with fp32 accumulation (`_mm`); `precision="input"` rounds the query side's fp32 operands to
bf16 instead (one dot), as the PyTorch form does in bf16. fp32 inputs run fp32 dots. Padding: keys with
key_padding_mask False are out of B's softmax; landmarks without a real token are out of F's (`LM`, False) and
their rows of B V are zeroed by the caller. A row with nothing allowed gives zeros. Runs on CPU tensors under
TRITON_INTERPRET=1 (the CPU tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .limits import in_batch_pieces, piece
from .triton_common import dot as _dot
from .triton_common import kernel_reasons
from .triton_common import precision as _precision

MAX_LANDMARKS = 128
MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.bfloat16)
BT = 64  # keys (b_side) / queries (f_side) per tile
# `solve` holds A, pinv(A) and its steps' m x m products in one program: compiled for sm_90 (triton 3.6, 8 warps) that is
# 80 KB of shared memory at 64 landmarks and 288-320 KB at 128, more than an H100 / H200 block may use (227 KB)
SOLVE_MAX_LANDMARKS = 64


def unsupported_reasons(device, *, landmarks: int, head_dim: int, dtype=None, need_probs: bool = False,
                        conv: bool = False) -> list[str]:
    why = kernel_reasons(device, dtype=dtype, dtypes=DTYPES, head_dim=head_dim, max_head_dim=MAX_HEAD_DIM,
                         fallback="torch")
    if landmarks > MAX_LANDMARKS:
        why.append(f"backend='triton' takes up to {MAX_LANDMARKS} landmarks, got {landmarks}")
    elif head_dim > 64 and (landmarks > 64 or dtype == torch.float32):
        # the backward's tiles would need more shared memory than an H100 / H200 has (sm_90 compiles, triton 3.6)
        why.append(f"backend='triton' with head_dim > 64 takes up to 64 landmarks in bf16 (got {landmarks} landmarks, "
                   f"{dtype})")
    if need_probs:
        why.append("backend='triton' does not build the probability matrix (need_probs: use backend='torch')")
    if conv:
        why.append("backend='triton' has no residual conv (conv_kernel: use backend='torch')")
    return why


# the split products' mode: None = on the GPU's tensor cores (PREC "tf32", half inputs on CUDA); the tests set True
# to run it under the interpreter, whose dots then multiply the bf16 parts exactly in fp32
FORCE_SPLIT: bool | None = None


def _split_mode(prec: str) -> bool:
    return prec == "tf32" if FORCE_SPLIT is None else FORCE_SPLIT


@triton.jit
def _mm(a, b, SA: tl.constexpr, SB: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """a @ b, fp32 accumulation. SPLIT (bf16 inputs on tensor cores): the operands go to bf16, an fp32 operand marked
    SA / SB as hi + lo (two dots; the lo x lo term, ~2^-16 of the rest, left out); otherwise one dot in fp32."""
    if SPLIT:
        a_hi = a.to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        acc = _dot(a_hi, b_hi, PREC)
        if SA:
            acc += _dot((a.to(tl.float32) - a_hi.to(tl.float32)).to(tl.bfloat16), b_hi, PREC)
        if SB:
            acc += _dot(a_hi, (b.to(tl.float32) - b_hi.to(tl.float32)).to(tl.bfloat16), PREC)
        return acc
    return _dot(a.to(tl.float32), b.to(tl.float32), PREC)


@triton.jit
def _landmarks(L, LM, bh, b, M, D, HAS_LM: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """The m x D fp32 landmark block of (batch x head) bh and which landmarks are usable."""
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    ok = offs_m < M
    if HAS_LM:
        ok = ok & (tl.load(LM + b * M + offs_m, mask=offs_m < M, other=0) != 0)
    x = tl.load(L + bh * M * D + offs_m[:, None] * D + offs_d[None, :], mask=(offs_m < M)[:, None] & (offs_d < D)[None, :],
                other=0.0)
    return x, ok


@triton.jit
def _key_tile(K, V, PAD, bh, b, t0, T, D, HAS_PAD: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    offs_t = t0 + tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    ok = offs_t < T
    if HAS_PAD:
        ok = ok & (tl.load(PAD + b * T + offs_t, mask=offs_t < T, other=0) != 0)
    off = bh * T * D + offs_t.to(tl.int64)[:, None] * D + offs_d[None, :]
    lm = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    return offs_t, ok, tl.load(K + off, mask=lm, other=0.0), tl.load(V + off, mask=lm, other=0.0), off, lm


@triton.jit
def _b_fwd_kernel(QL, K, V, PAD, ACC, MX, SUM, T, D, M, H, SPAN, HAS_PAD: tl.constexpr, PREC: tl.constexpr,
                  SPLIT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    sp = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    ql, ql_ok = _landmarks(QL, QL, bh, b, M, D, False, BM, BD)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for t0 in range(sp * SPAN, tl.minimum(sp * SPAN + SPAN, T), BT):
        offs_t, ok, k, v, kv_off, kv_mask = _key_tile(K, V, PAD, bh, b, t0, T, D, HAS_PAD, BT, BD)
        s = _mm(ql, tl.trans(k), True, False, PREC, SPLIT)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p, v, True, False, PREC, SPLIT)
        m_i = m_new
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    row = (sp * tl.num_programs(1) + bh) * M + offs_m
    tl.store(ACC + row[:, None] * D + offs_d[None, :], acc, mask=(offs_m < M)[:, None] & (offs_d < D)[None, :])
    tl.store(MX + row, m_i, mask=offs_m < M)
    tl.store(SUM + row, l_i, mask=offs_m < M)


@triton.jit
def _b_bwd_kernel(QL, K, V, PAD, LSE, DBV, DELTA, DK, DV, DQL, T, D, M, H, SPAN, HAS_PAD: tl.constexpr,
                  PREC: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    """dk, dv of the split's keys and its partial dQ~ (into DQL[split]); B's probabilities p = exp(s - lse)."""
    sp = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    mrow = bh * M + offs_m
    ql, ql_ok = _landmarks(QL, QL, bh, b, M, D, False, BM, BD)
    dbv, dbv_ok = _landmarks(DBV, DBV, bh, b, M, D, False, BM, BD)
    lse = tl.load(LSE + mrow, mask=offs_m < M, other=float("-inf"))
    delta = tl.load(DELTA + mrow, mask=offs_m < M, other=0.0)
    live = lse > float("-inf")
    lse = tl.where(live, lse, 0.0)
    dql = tl.zeros([BM, BD], tl.float32)
    for t0 in range(sp * SPAN, tl.minimum(sp * SPAN + SPAN, T), BT):
        offs_t, ok, k, v, off, lm = _key_tile(K, V, PAD, bh, b, t0, T, D, HAS_PAD, BT, BD)
        s = _mm(ql, tl.trans(k), True, False, PREC, SPLIT)
        p = tl.where(ok[None, :] & live[:, None], tl.exp(s - lse[:, None]), 0.0)  # [BM, BT]
        dv = _mm(tl.trans(p), dbv, True, True, PREC, SPLIT)
        ds = p * (_mm(dbv, tl.trans(v), True, False, PREC, SPLIT) - delta[:, None])
        dk = _mm(tl.trans(ds), ql, True, True, PREC, SPLIT)
        dql += _mm(ds, k, True, False, PREC, SPLIT)
        tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=lm)
        tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=lm)
    row = (sp * tl.num_programs(1) + bh) * M + offs_m
    tl.store(DQL + row[:, None] * D + offs_d[None, :], dql, mask=(offs_m < M)[:, None] & (offs_d < D)[None, :])


@triton.jit
def _f_probs(Q, KL, LM, bh, b, t0, T, D, M, HAS_LM: tl.constexpr, LOW: tl.constexpr, PREC: tl.constexpr,
             SPLIT: tl.constexpr,
             BM: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    """F's rows t0.. (softmax over the usable landmarks; zeros if none): (q, p, row offsets, row mask)."""
    offs_t = t0 + tl.arange(0, BT)
    offs_d = tl.arange(0, BD)
    off = bh * T * D + offs_t.to(tl.int64)[:, None] * D + offs_d[None, :]
    lm = (offs_t < T)[:, None] & (offs_d < D)[None, :]
    q = tl.load(Q + off, mask=lm, other=0.0)
    kl, ok = _landmarks(KL, LM, bh, b, M, D, HAS_LM, BM, BD)
    s = _mm(q, tl.trans(kl), False, not LOW, PREC, SPLIT)
    s = tl.where(ok[None, :], s, float("-inf"))
    mx = tl.max(s, 1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.exp(s - mx[:, None])
    den = tl.sum(e, 1)
    p = e / tl.where(den > 0.0, den, 1.0)[:, None]
    return q, kl, p, off, lm


@triton.jit
def _f_fwd_kernel(Q, KL, X, LM, O, T, D, M, H, HAS_LM: tl.constexpr, LOW: tl.constexpr, PREC: tl.constexpr,
                  SPLIT: tl.constexpr,
                  BM: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    q, kl, p, off, lm = _f_probs(Q, KL, LM, bh, b, tl.program_id(0) * BT, T, D, M, HAS_LM, LOW, PREC, SPLIT, BM, BD, BT)
    x, x_ok = _landmarks(X, X, bh, b, M, D, False, BM, BD)
    out = _mm(p, x, not LOW, not LOW, PREC, SPLIT)
    tl.store(O + off, out.to(O.dtype.element_ty), mask=lm)


@triton.jit
def _f_bwd_kernel(Q, KL, X, LM, DO, DELTA, DQ, DX, DKL, T, D, M, H, SPAN, HAS_LM: tl.constexpr, LOW: tl.constexpr,
                  PREC: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    """dq of the split's rows and its partial dX, dK~ (into DX[split], DKL[split])."""
    sp = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    x, x_ok = _landmarks(X, X, bh, b, M, D, False, BM, BD)
    dx = tl.zeros([BM, BD], tl.float32)
    dkl = tl.zeros([BM, BD], tl.float32)
    for t0 in range(sp * SPAN, tl.minimum(sp * SPAN + SPAN, T), BT):
        q, kl, p, off, lm = _f_probs(Q, KL, LM, bh, b, t0, T, D, M, HAS_LM, LOW, PREC, SPLIT, BM, BD, BT)
        offs_t = t0 + tl.arange(0, BT)
        do = tl.load(DO + off, mask=lm, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_t, mask=offs_t < T, other=0.0)
        dx += _mm(tl.trans(p), do, True, False, PREC, SPLIT)
        ds = p * (_mm(do, tl.trans(x), False, True, PREC, SPLIT) - delta[:, None])
        tl.store(DQ + off, _mm(ds, kl, True, True, PREC, SPLIT).to(DQ.dtype.element_ty), mask=lm)
        dkl += _mm(tl.trans(ds), q, True, False, PREC, SPLIT)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    row = (sp * tl.num_programs(1) + bh) * M + offs_m
    st = (offs_m < M)[:, None] & (offs_d < D)[None, :]
    tl.store(DX + row[:, None] * D + offs_d[None, :], dx, mask=st)
    tl.store(DKL + row[:, None] * D + offs_d[None, :], dkl, mask=st)


@triton.jit
def _solve_kernel(QL, KL, LM, ACC, MX, SUM, X, NS, M, D, H, ITERS, HAS_LM: tl.constexpr, BM: tl.constexpr,
                  BD: tl.constexpr):
    """X = pinv(A) (B V) for one (batch x head), everything `methods.nystrom` does between the two T-long products in
    one program: B V from `_b_fwd_kernel`'s NS split partials (combined as `_BSide.forward` does), A = softmax(Q~
    K~^T) over the usable landmarks, the rows of unusable ones zeroed, pinv(A) by ITERS Newton-Schulz
    steps (`methods.nystrom._NewtonSchulz`), every product an fp32 dot."""
    bh = tl.program_id(0).to(tl.int64)
    nbh = tl.num_programs(0)
    b = bh // H
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    in_m = offs_m < M
    st = in_m[:, None] & (offs_d < D)[None, :]
    top = tl.full([BM], float("-inf"), tl.float32)
    for sp in range(NS):
        top = tl.maximum(top, tl.load(MX + (sp * nbh + bh) * M + offs_m, mask=in_m, other=float("-inf")))
    top = tl.where(top == float("-inf"), 0.0, top)
    den = tl.zeros([BM], tl.float32)
    num = tl.zeros([BM, BD], tl.float32)
    for sp2 in range(NS):
        row = (sp2 * nbh + bh) * M + offs_m
        w = tl.exp(tl.load(MX + row, mask=in_m, other=float("-inf")) - top)
        den += w * tl.load(SUM + row, mask=in_m, other=0.0)
        num += w[:, None] * tl.load(ACC + row[:, None] * D + offs_d[None, :], mask=st, other=0.0)
    bv = num / tl.maximum(den, 1.1754943508222875e-38)[:, None]
    ql, ql_ok = _landmarks(QL, QL, bh, b, M, D, False, BM, BD)
    kl, usable = _landmarks(KL, LM, bh, b, M, D, HAS_LM, BM, BD)
    s = tl.dot(ql, tl.trans(kl), input_precision="ieee")
    s = tl.where(usable[None, :], s, float("-inf"))
    mx = tl.max(s, 1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    e = tl.exp(s - mx[:, None])
    se = tl.sum(e, 1)
    a = tl.where(usable[:, None], e / tl.where(se > 0.0, se, 1.0)[:, None], 0.0)
    # B V's rows of unusable landmarks need no zeroing: A's row j zero makes pinv(A)'s column j zero at every step
    eye = tl.where((offs_m[:, None] == offs_m[None, :]) & in_m[:, None], 1.0, 0.0)
    col = tl.max(tl.sum(tl.abs(a), 0), 0)
    rsum = tl.max(tl.sum(tl.abs(a), 1), 0)
    z = tl.trans(a) / tl.maximum(col * rsum, 1.1754943508222875e-38)
    for it in range(ITERS):
        az = tl.dot(a, z, input_precision="ieee")
        t1 = 7.0 * eye - az
        t2 = 15.0 * eye - tl.dot(az, t1, input_precision="ieee")
        pz = 3.25 * eye - 0.25 * tl.dot(az, t2, input_precision="ieee")
        z = tl.dot(z, pz, input_precision="ieee")
    x = tl.dot(z, bv, input_precision="ieee")
    tl.store(X + (bh * M + offs_m)[:, None] * D + offs_d[None, :], x, mask=st)


def _split(t: int) -> int:
    """Keys (or rows) per program of the split-K passes: enough programs to fill the GPU at long T, few partials."""
    return BT * max(1, min(16, triton.cdiv(t, 8 * BT)))


def _meta(m: int, d: int) -> dict:
    return dict(BM=max(16, triton.next_power_of_2(m)), BD=max(16, triton.next_power_of_2(d)), BT=BT, num_warps=4)


def _mask_arg(mask, device):
    """(int8 mask, whether there is one) as the kernels take it; a 1-element placeholder when there is none."""
    if mask is None:
        return torch.empty(1, dtype=torch.int8, device=device), False
    return mask.to(torch.int8).contiguous(), True


def _b_partials(ql, k, v, pad):
    """`_b_fwd_kernel`'s split partials of softmax(ql k^T) v: (unnormalised products [n, BH, m, D], maxima and sums
    [n, BH, m], the kernels' mask argument and whether there is one)."""
    bs, h, t, d = k.shape
    m = ql.shape[-2]
    split = _split(t)
    n = triton.cdiv(t, split)
    acc = ql.new_empty(n, bs * h, m, d)
    mx, sm = (ql.new_empty(n, bs * h, m) for _ in range(2))
    padt, has_pad = _mask_arg(pad, k.device)
    _b_fwd_kernel[(n, bs * h)](ql, k, v, padt, acc, mx, sm, t, d, m, h, split, HAS_PAD=has_pad,
                               PREC=_precision(k), SPLIT=_split_mode(_precision(k)), **_meta(m, d))
    return acc, mx, sm, padt, has_pad


class _BSide(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ql, k, v, pad):
        bs, h, t, d = k.shape
        m = ql.shape[-2]
        acc, mx, sm, padt, has_pad = _b_partials(ql, k, v, pad)
        top = mx.amax(0)  # (BH, m)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        w = torch.exp(mx - top)  # 0 for a split with no key
        den = (w * sm).sum(0)
        bv = (w[..., None] * acc).sum(0) / den.clamp_min(torch.finfo(den.dtype).tiny)[..., None]
        lse = torch.where(den > 0, top + den.clamp_min(torch.finfo(den.dtype).tiny).log(),
                          torch.full_like(den, float("-inf")))
        bv = bv.view(bs, h, m, d)
        ctx.save_for_backward(ql, k, v, padt, lse, bv)
        ctx.has_pad = has_pad
        return bv

    @staticmethod
    def backward(ctx, dbv):
        ql, k, v, padt, lse, bv = ctx.saved_tensors
        bs, h, t, d = k.shape
        m = ql.shape[-2]
        split = _split(t)
        n = triton.cdiv(t, split)
        dbv = dbv.float().contiguous()
        delta = (dbv * bv).sum(-1)  # (B, H, m)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dql = ql.new_empty(n, bs * h, m, d)
        _b_bwd_kernel[(n, bs * h)](ql, k, v, padt, lse, dbv, delta, dk, dv, dql, t, d, m, h, split,
                                   HAS_PAD=ctx.has_pad, PREC=_precision(k), SPLIT=_split_mode(_precision(k)), **_meta(m, d))
        return dql.sum(0).view_as(ql), dk, dv, None


class _FSide(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kl, x, lm, low):
        bs, h, t, d = q.shape
        m = kl.shape[-2]
        out = torch.empty_like(q)
        lmt, has_lm = _mask_arg(lm, q.device)
        _f_fwd_kernel[(triton.cdiv(t, BT), bs * h)](q, kl, x, lmt, out, t, d, m, h, HAS_LM=has_lm, LOW=low,
                                                    PREC=_precision(q), SPLIT=_split_mode(_precision(q)), **_meta(m, d))
        ctx.save_for_backward(q, kl, x, lmt, out)
        ctx.flags = (has_lm, low)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kl, x, lmt, out = ctx.saved_tensors
        has_lm, low = ctx.flags
        bs, h, t, d = q.shape
        m = kl.shape[-2]
        split = _split(t)
        n = triton.cdiv(t, split)
        dout = dout.contiguous()
        delta = (dout.float() * out.float()).sum(-1)  # (B, H, T)
        dq = torch.empty_like(q)
        dx, dkl = (kl.new_empty(n, bs * h, m, d) for _ in range(2))
        _f_bwd_kernel[(n, bs * h)](q, kl, x, lmt, dout, delta, dq, dx, dkl, t, d, m, h, split, HAS_LM=has_lm, LOW=low,
                                   PREC=_precision(q), SPLIT=_split_mode(_precision(q)), **_meta(m, d))
        return dq, dkl.sum(0).view_as(kl), dx.sum(0).view_as(x), None, None


def b_side(ql: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """softmax(ql k^T) v [B, H, m, D] in fp32, ql [B, H, m, D] fp32 (the scale folded in), k, v [B, H, T, D],
    pad Bool[B, T] (True: a real key) or None; a landmark row with no real key gives zeros."""
    split = in_batch_pieces("nystrom b_side", k.shape[0], k.shape[1], lambda lo, hi: b_side(
        piece(ql, lo, hi), k[lo:hi], v[lo:hi], piece(pad, lo, hi)))
    if split is not None:
        return split
    return _BSide.apply(ql.float().contiguous(), k.contiguous(), v.contiguous(), pad)


def f_side(q: torch.Tensor, kl: torch.Tensor, x: torch.Tensor, landmarks_real: torch.Tensor | None,
           low: bool = False) -> torch.Tensor:
    """softmax(q kl^T) x [B, H, T, D] in q's dtype, q [B, H, T, D], kl, x [B, H, m, D] fp32 (the scale folded into kl),
    landmarks_real Bool[B, m] (False: out of the softmax) or None; low: kl and x rounded to q's dtype in the dots."""
    split = in_batch_pieces("nystrom f_side", q.shape[0], q.shape[1], lambda lo, hi: f_side(
        q[lo:hi], piece(kl, lo, hi), piece(x, lo, hi), piece(landmarks_real, lo, hi), low))
    if split is not None:
        return split
    return _FSide.apply(q.contiguous(), kl.float().contiguous(), x.float().contiguous(), landmarks_real, bool(low))


def solve(q_lm: torch.Tensor, kl: torch.Tensor, qls: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
          pad: torch.Tensor | None, landmarks_real: torch.Tensor | None, iters: int) -> torch.Tensor:
    """X = pinv(A) B V [B, H, m, D] fp32 without autograd (inference): `b_side`'s kernel for B V's partials, then one
    program per (batch, head) for the rest (`_solve_kernel`: their combination, A, the Newton-Schulz pinv, the
    product), instead of some 70 small PyTorch ops whose launches bound the call at m = 64. q_lm [B, H, m, D] the
    query landmarks, kl the key landmarks with the scale, qls = q_lm x scale (B's queries), all fp32; pad and
    landmarks_real as in `b_side` / `f_side`. Up to SOLVE_MAX_LANDMARKS landmarks."""
    bs, h, t, d = k.shape
    m = q_lm.shape[-2]
    if m > SOLVE_MAX_LANDMARKS:
        raise ValueError(f"nystrom_triton.solve takes up to {SOLVE_MAX_LANDMARKS} landmarks, got {m}")
    split = in_batch_pieces("nystrom solve", bs, h, lambda lo, hi: solve(
        piece(q_lm, lo, hi), piece(kl, lo, hi), piece(qls, lo, hi), k[lo:hi], v[lo:hi], piece(pad, lo, hi),
        piece(landmarks_real, lo, hi), iters))
    if split is not None:
        return split
    acc, mx, sm, _pad, _has = _b_partials(qls.float().contiguous(), k.contiguous(), v.contiguous(), pad)
    lmt, has_lm = _mask_arg(landmarks_real, k.device)
    x = q_lm.new_empty(bs, h, m, d, dtype=torch.float32)
    meta = _meta(m, d)
    meta.pop("BT")
    _solve_kernel[(bs * h,)](q_lm.float().contiguous(), kl.float().contiguous(), lmt, acc, mx, sm, x, acc.shape[0], m,
                             d, h, iters, HAS_LM=has_lm, **dict(meta, num_warps=8))
    return x
