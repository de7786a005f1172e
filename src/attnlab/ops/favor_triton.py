"""Performer's FAVOR+ feature map as one Triton kernel, for half-precision inputs (bf16, fp16) on CUDA.

    phi(x) = exp(x.w - max_f x.w_f + log_inv)   [N, m] in x's dtype,   b(x) = max_f x.w_f - scale |x|^2 / 2   [N] fp32

with w = sqrt(scale) * W [m, D], the same function as `feature_maps.favor_features` (the true feature is
exp(b) phi; `ops.linear` stabilises b). Why a kernel of its own: the exponent needs fp32 precision (|x.w| reaches
10-20, and bf16 rounding of it would move every feature by several percent), so the PyTorch form runs an fp32
GEMM (no tensor cores for the H200's bf16 rate) and writes the fp32 [N, m] exponents before a fused exp pass
reads them back. Here x is already exact in its half dtype, and w is split into two half-precision parts, w = hi +
lo (hi = w rounded, lo = the rest rounded: |w - hi - lo| <= 2^-16 |w| in bf16), so x.w = x.hi + x.lo is two
tensor-core dots with fp32 accumulation, as accurate as the fp32 GEMM for the exponent and never written to
memory: each program holds a block of rows, takes the row maxima over the features in a first sweep and writes
the exponentials in a second (the dots are recomputed; with D = 64 they are cheap next to the [N, m] store).

The backward of bf16 inputs with drawn (untrained) features is a kernel too (`_favor_grad_kernel`): phi recomputed
in fp32 from the saved b, g = dphi * phi, dx = g w - scale x sum_f g with g w as split-precision dots; fp16 inputs
and a trained projection take `favor_backward`, PyTorch in fp32 (also dW = sqrt(scale) g^T x). b carries no gradient (its total
derivative cancels: see `feature_maps.FAVOR`). Runs on CPU tensors under TRITON_INTERPRET=1 (the CPU tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused import fused
from .triton_common import dot as _dot
from .triton_common import precision as _precision
from .triton_common import to as _to

BN = 64  # rows per program
BM = 64  # features per dot


def _launch(d: int) -> dict:
    """Tile sizes and launch settings for head dim d: with head dims above 64 (128-wide tiles) two pipeline stages, so
    that the shared memory (~80 / 96 KiB forward / backward, against 112 / 128 with three) fits the ~99 KiB of
    sm_86 / sm_89 GPUs too."""
    return dict(BN=BN, BD=max(16, triton.next_power_of_2(d)), BM=BM, num_warps=4, num_stages=3 if d <= 64 else 2)


@triton.jit
def _favor_kernel(X, FEAT, PHI, B, N, D, M, sqrt_scale, half_scale, log_inv,
                  PREC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    rows, rmask, offs_d, dmask, x = _row_block(X, N, D, BN, BD)
    xf = x.to(tl.float32)
    sq = tl.sum(xf * xf, 1) * half_scale
    mx = tl.full([BN], float("-inf"), tl.float32)
    for mb in range(0, tl.cdiv(M, BM)):  # first sweep: the row maxima of x.w
        offs_m = mb * BM + tl.arange(0, BM)
        mmask = offs_m < M
        xw = _xw(x, FEAT, offs_m, offs_d, mmask, dmask, D, sqrt_scale, PREC)
        mx = tl.maximum(mx, tl.max(tl.where(mmask[None, :], xw, float("-inf")), 1))
    for mb in range(0, tl.cdiv(M, BM)):  # second sweep: the features (the dots recomputed)
        offs_m = mb * BM + tl.arange(0, BM)
        mmask = offs_m < M
        xw = _xw(x, FEAT, offs_m, offs_d, mmask, dmask, D, sqrt_scale, PREC)
        phi = tl.exp(xw - mx[:, None] + log_inv)
        tl.store(PHI + rows[:, None] * M + offs_m[None, :], _to(phi, PHI.dtype.element_ty, PREC),
                 mask=rmask[:, None] & mmask[None, :])
    tl.store(B + rows, mx - sq, mask=rmask)


@triton.jit
def _favor_grad_kernel(X, FEAT, DPHI, B, DX, N, D, M, sqrt_scale, half_scale, log_inv,
                       PREC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """dx for a block of rows: g = dphi * phi with phi recomputed in fp32 from the saved b (the row max of x.w is
    b + scale |x|^2 / 2), then dx = g w - scale x sum_f g, g w as three split-precision dots (g = g_hi + g_lo,
    w = w_hi + w_lo; the lo x lo term, ~2^-16 of the rest, left out)."""
    rows, rmask, offs_d, dmask, x = _row_block(X, N, D, BN, BD)
    xf = x.to(tl.float32)
    mx = tl.load(B + rows, mask=rmask, other=0.0) + tl.sum(xf * xf, 1) * half_scale
    acc = tl.zeros([BN, BD], tl.float32)
    gs = tl.zeros([BN], tl.float32)
    for mb in range(0, tl.cdiv(M, BM)):
        offs_m = mb * BM + tl.arange(0, BM)
        mmask = offs_m < M
        hi, lo = _w_parts(FEAT, offs_m, offs_d, mmask, dmask, D, sqrt_scale, x.dtype, PREC)
        xw = _dot(x, tl.trans(hi), PREC) + _dot(x, tl.trans(lo), PREC)  # as the forward's
        dphi = tl.load(DPHI + rows[:, None] * M + offs_m[None, :], mask=rmask[:, None] & mmask[None, :],
                       other=0.0).to(tl.float32)
        g = dphi * tl.exp(xw - mx[:, None] + log_inv)  # 0 in masked columns (dphi 0)
        gs += tl.sum(g, 1)
        g_hi = _to(g, x.dtype, PREC)
        g_lo = _to(g - g_hi.to(tl.float32), x.dtype, PREC)
        acc += _dot(g_hi, hi, PREC) + _dot(g_lo, hi, PREC) + _dot(g_hi, lo, PREC)
    dx = acc - (2.0 * half_scale) * xf * gs[:, None]
    tl.store(DX + rows[:, None] * D + offs_d[None, :], _to(dx, DX.dtype.element_ty, PREC),
             mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _row_block(X, N, D, BN: tl.constexpr, BD: tl.constexpr):
    """This program's block of rows of X [N, D]: (rows, row mask, column offsets, column mask, x)."""
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    rmask = rows < N
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    x = tl.load(X + rows[:, None] * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    return rows, rmask, offs_d, dmask, x


@triton.jit
def _w_parts(FEAT, offs_m, offs_d, mmask, dmask, D, sqrt_scale, dtype: tl.constexpr, PREC: tl.constexpr):
    """A block of w = sqrt_scale * W as hi + lo in the half dtype (hi: w rounded; lo: the rest, rounded)."""
    w = tl.load(FEAT + offs_m[:, None] * D + offs_d[None, :], mask=mmask[:, None] & dmask[None, :],
                other=0.0).to(tl.float32) * sqrt_scale
    hi = _to(w, dtype, PREC)
    return hi, _to(w - hi.to(tl.float32), dtype, PREC)


@triton.jit
def _xw(x, FEAT, offs_m, offs_d, mmask, dmask, D, sqrt_scale, PREC: tl.constexpr):
    """x . w for a block of features with w split as hi + lo (two dots, fp32 accumulation)."""
    hi, lo = _w_parts(FEAT, offs_m, offs_d, mmask, dmask, D, sqrt_scale, x.dtype, PREC)
    return _dot(x, tl.trans(hi), PREC) + _dot(x, tl.trans(lo), PREC)


@fused
def favor_backward(x, features, dphi, b, sqrt_scale: float, half_scale: float, log_inv: float):
    """(dx in x's dtype, dfeatures in fp32) of phi = exp(x.w - |x|^2 scale / 2 - b + log_inv), w = sqrt_scale *
    features, with b held constant (see the module doc); phi recomputed in fp32."""
    xf = x.float()
    w = features.float() * sqrt_scale
    lx = xf @ w.T - xf.pow(2).sum(-1, keepdim=True) * half_scale
    g = dphi.float() * torch.exp(lx - b.unsqueeze(-1) + log_inv)  # d loss / d lx
    dx = g @ w - (2.0 * half_scale) * xf * g.sum(-1, keepdim=True)
    dfeat = (g.reshape(-1, g.shape[-1]).T @ xf.reshape(-1, xf.shape[-1])) * sqrt_scale
    return dx.to(x.dtype), dfeat


def _memory_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """x [..., D] as rows [N, D] in the order they lie in memory, and the order of x's leading dims (outer to inner)
    that puts them back (`_shaped_like`). The map takes each row alone, so rows that lie densely in any order
    (transformers' q [B, H, T, D] is a view of [B, T, H, D] memory) are read where they are; anything else is copied
    first (logical order)."""
    lead = list(range(x.dim() - 1))
    if x.stride(-1) == 1:
        order = sorted(lead, key=lambda i: -x.stride(i))
        p = x.permute(*order, x.dim() - 1)
        if p.is_contiguous():
            return p.view(-1, x.shape[-1]), order
    return x.reshape(-1, x.shape[-1]).contiguous(), lead


def _shaped_like(rows: torch.Tensor, x: torch.Tensor, order: list[int]) -> torch.Tensor:
    """rows [N, *tail] (in x's memory order, `_memory_rows`) as [*x.shape[:-1], *tail], no copy."""
    tail = list(rows.shape[1:])
    inverse = sorted(range(len(order)), key=order.__getitem__)
    held = rows.view(*(x.shape[i] for i in order), *tail)
    return held.permute(*inverse, *range(len(order), len(order) + len(tail)))


class _Favor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, features, sqrt_scale, half_scale, log_inv):
        d, m = x.shape[-1], features.shape[0]
        x2, order = _memory_rows(x)
        n = x2.shape[0]
        phi = x2.new_empty(n, m)
        b = x2.new_empty(n, dtype=torch.float32)
        _favor_kernel[(triton.cdiv(n, BN),)](x2, features.contiguous(), phi, b, n, d, m, sqrt_scale, half_scale,
                                             log_inv, PREC=_precision(x2), **_launch(d))
        b = _shaped_like(b, x, order)
        ctx.mark_non_differentiable(b)
        ctx.save_for_backward(x, features, b)
        ctx.consts = (sqrt_scale, half_scale, log_inv)
        return _shaped_like(phi, x, order), b

    @staticmethod
    def backward(ctx, dphi, _db):
        x, features, b = ctx.saved_tensors
        if x.dtype == torch.bfloat16 and not ctx.needs_input_grad[1]:  # dx only (drawn features): the kernel
            d, m = x.shape[-1], features.shape[0]
            x2, dphi2 = x.reshape(-1, d).contiguous(), dphi.reshape(-1, m).contiguous()
            n = x2.shape[0]
            dx = torch.empty_like(x2)
            _favor_grad_kernel[(triton.cdiv(n, BN),)](x2, features.contiguous(), dphi2, b.reshape(-1).contiguous(), dx,
                                                      n, d, m, *ctx.consts, PREC=_precision(x2), **_launch(d))
            return dx.reshape(x.shape), None, None, None, None
        # fp16 (whose narrow range would flush a split gradient's low part) and trained features: PyTorch, fp32
        dx, dfeat = favor_backward(x, features, dphi, b, *ctx.consts, compiled=x.is_cuda)
        return (dx if ctx.needs_input_grad[0] else None,
                dfeat.to(features.dtype) if ctx.needs_input_grad[1] else None, None, None, None)


def favor_features(x: torch.Tensor, features: torch.Tensor, sqrt_scale: float, half_scale: float, log_inv: float):
    """(phi [..., m] in x's dtype, b [...] fp32) for x [..., D] (bf16 / fp16) and features [m, D] (the drawn W,
    any dtype: scaled by sqrt_scale and split in the kernel). The caller checked
    `feature_maps.favor_triton_reasons`."""
    return _Favor.apply(x, features, float(sqrt_scale), float(half_scale), float(log_inv))
