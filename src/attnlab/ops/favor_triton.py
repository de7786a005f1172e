"""Performer's FAVOR+ feature map as one Triton kernel, for half-precision inputs (bf16, fp16) on CUDA.

    phi(x) = exp(x.w - max_f x.w_f + log_inv)   [N, m] in x's dtype,   b(x) = max_f x.w_f - scale |x|^2 / 2   [N] fp32

with w = sqrt(scale) * W [m, D], the same function as `feature_maps.favor_features` (the true feature is
exp(b) phi; `ops.linear` stabilises b). Why a kernel of its own: the exponent needs fp32 precision (|x.w| reaches
10-20, and bf16 rounding of it would move every feature by several percent), so the PyTorch form runs an fp32
GEMM (no tensor cores for the H200's bf16 rate) and writes the fp32 [N, m] exponents before a fused exp pass
reads them back. Here x is already exact in its half dtype, and w is split into two half-precision parts, w = hi +
lo (hi = w rounded, lo = the rest rounded: |w - hi - lo| <= 2^-16 |w| in bf16), so x.w = x.hi + x.lo is two
tensor-core dots with fp32 accumulation, as accurate as the fp32 GEMM for the exponent and never written to
memory. Each program holds a block of one head's tokens: up to ONE_SWEEP_MAX_M features (FAVOR+'s 256) in one tile,
the projection computed once and its row maxima and exponentials taken from the same registers; wider maps in two
sweeps of BM features (the row maxima, then the exponentials, the dots recomputed).

Layouts: x is read with its strides (transformers' q [B, H, T, D] is a view of [B, T, H, D] memory) and phi written
contiguous [B, H, T, m], the rows the causal kernels' chunked backward reads (no copy there); the backward writes dx
in x's layout (the caller's projection gets its gradient without a copy) and reads dphi with its strides.

The backward of bf16 inputs with drawn (untrained) features is a kernel too (`_favor_grad_kernel`): phi recomputed
in fp32 from the saved b, g = dphi * phi, dx = g w - scale x sum_f g with g w as split-precision dots; fp16 inputs
and a trained projection take `favor_backward`, PyTorch in fp32 (also dW = sqrt(scale) g^T x). b carries no gradient (its total
derivative cancels: see `feature_maps.FAVOR`). Runs on CPU tensors under TRITON_INTERPRET=1 (the CPU tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..types import UnsupportedError
from .limits import in_batch_pieces, map_fits, narrowed
from .fused import fused
from .triton_common import dot as _dot
from .triton_common import precision as _precision
from .triton_common import row_base as _row
from .triton_common import to as _to

BM = 64  # features per dot of the two-sweep form (more features than ONE_SWEEP_MAX_M)
ONE_SWEEP_MAX_M = 256  # up to this many features (padded to a power of two) a row block's projection is one tile,
# computed once: its max and its exponentials from the same registers (FAVOR+'s default 256 features)
# launch settings (rows per program BN, num_warps, num_stages): "fwd" / "bwd" over BM-feature blocks, "fwd_one" the
# one-sweep forward. The backward always walks BM-feature blocks: every feature in one tile ([32, 256] fp32 gradients
# and three dots over 256) was slower on the H200 at SmolLM2's shapes (`benchmarks/short_calls.py`, 9 query heads on
# 3: 33 against 27 us at 1024 tokens, 105 against 54 at 4096, both maps' backwards)
CONFIG = {"fwd": dict(BN=64, num_warps=4, num_stages=3), "bwd": dict(BN=64, num_warps=4, num_stages=3),
          "fwd_one": dict(BN=32, num_warps=4, num_stages=2)}


def _launch(d: int, m: int, stage: str) -> dict:
    """Tile sizes and launch settings for head dim d and m features: the forward takes every feature in one tile up
    to ONE_SWEEP_MAX_M (`CONFIG["fwd_one"]`); otherwise, and in the backward, BM-feature blocks. Head dims above 64
    (128-wide tiles) take at most two pipeline stages, so that the shared memory fits the ~99 KiB of sm_86 / sm_89
    GPUs too."""
    bm = max(16, triton.next_power_of_2(m))
    one = stage == "fwd" and bm <= ONE_SWEEP_MAX_M
    cfg = dict(CONFIG["fwd_one" if one else stage])
    if d > 64:
        cfg["num_stages"] = min(cfg["num_stages"], 2)
    cfg.update(BD=max(16, triton.next_power_of_2(d)), BM=bm if one else BM)
    return {**cfg, "ONE": one} if stage == "fwd" else cfg


@triton.jit
def _favor_kernel(X, FEAT, PHI, B, T, D, M, NH, s_b, s_h, s_t, sqrt_scale, half_scale, log_inv,
                  PREC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, ONE: tl.constexpr):
    """A block of BN tokens of one row bh of x [B, NH, T, D] (read with its strides): phi [B NH, T, M] and b [B NH, T],
    contiguous. ONE: every feature in one tile (BM >= M), the projection computed once; otherwise two sweeps over
    BM-feature blocks, the row maxima first, the dots recomputed in the second."""
    bh = tl.program_id(1).to(tl.int64)
    t, rmask, offs_d, dmask, x = _row_block(X, bh, NH, s_b, s_h, s_t, T, D, BN, BD)
    rows = bh * T + t
    xf = x.to(tl.float32)
    sq = tl.sum(xf * xf, 1) * half_scale
    if ONE:
        offs_m = tl.arange(0, BM)
        mmask = offs_m < M
        xw = tl.where(mmask[None, :], _xw(x, FEAT, offs_m, offs_d, mmask, dmask, D, sqrt_scale, PREC), float("-inf"))
        mx = tl.max(xw, 1)
        phi = tl.exp(xw - mx[:, None] + log_inv)  # 0 in the padded columns
        tl.store(PHI + rows[:, None] * M + offs_m[None, :], _to(phi, PHI.dtype.element_ty, PREC),
                 mask=rmask[:, None] & mmask[None, :])
    else:
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
def _favor_grad_kernel(X, FEAT, DPHI, B, DX, T, D, M, NH, s_b, s_h, s_t, s_pb, s_ph, s_pt, s_db, s_dh, s_dt,
                       sqrt_scale, half_scale, log_inv,
                       PREC: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr):
    """dx for a block of BN tokens of row bh: g = dphi * phi with phi recomputed in fp32 from the saved b (the row max
    of x.w is b + scale |x|^2 / 2), then dx = g w - scale x sum_f g, g w as three split-precision dots (g = g_hi +
    g_lo, w = w_hi + w_lo; the lo x lo term, ~2^-16 of the rest, left out). x, dphi and dx are read and written with
    their own strides (dx in x's layout: the caller's projection gets its gradient without a copy); b contiguous
    [B NH, T]."""
    bh = tl.program_id(1).to(tl.int64)
    t, rmask, offs_d, dmask, x = _row_block(X, bh, NH, s_b, s_h, s_t, T, D, BN, BD)
    xf = x.to(tl.float32)
    mx = tl.load(B + bh * T + t, mask=rmask, other=0.0) + tl.sum(xf * xf, 1) * half_scale
    acc = tl.zeros([BN, BD], tl.float32)
    gs = tl.zeros([BN], tl.float32)
    dphi_row = _row(bh, NH, s_pb, s_ph)
    for mb in range(0, tl.cdiv(M, BM)):
        offs_m = mb * BM + tl.arange(0, BM)
        mmask = offs_m < M
        hi, lo = _w_parts(FEAT, offs_m, offs_d, mmask, dmask, D, sqrt_scale, x.dtype, PREC)
        xw = _dot(x, tl.trans(hi), PREC) + _dot(x, tl.trans(lo), PREC)  # as the forward's
        dphi = tl.load(DPHI + dphi_row + t[:, None] * s_pt + offs_m[None, :], mask=rmask[:, None] & mmask[None, :],
                       other=0.0).to(tl.float32)
        g = dphi * tl.exp(xw - mx[:, None] + log_inv)  # 0 in masked columns (dphi 0)
        gs += tl.sum(g, 1)
        g_hi = _to(g, x.dtype, PREC)
        g_lo = _to(g - g_hi.to(tl.float32), x.dtype, PREC)
        acc += _dot(g_hi, hi, PREC) + _dot(g_lo, hi, PREC) + _dot(g_hi, lo, PREC)
    dx = acc - (2.0 * half_scale) * xf * gs[:, None]
    tl.store(DX + _row(bh, NH, s_db, s_dh) + t[:, None] * s_dt + offs_d[None, :], _to(dx, DX.dtype.element_ty, PREC),
             mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _row_block(X, bh, NH, s_b, s_h, s_t, T, D, BN: tl.constexpr, BD: tl.constexpr):
    """This program's BN tokens of row bh of X [B, NH, T, D] (any strides, unit last): (tokens, their mask, column
    offsets, column mask, x)."""
    t = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = t < T
    offs_d = tl.arange(0, BD)
    dmask = offs_d < D
    x = tl.load(X + _row(bh, NH, s_b, s_h) + t[:, None] * s_t + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0)
    return t, rmask, offs_d, dmask, x


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


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] as a [B, NH, T, D] view the kernels read with its strides (unit last stride): 4-dim x as it is
    (transformers' q [B, H, T, D] is a view of [B, T, H, D] memory: read where it lies), other ranks as one row of
    tokens (reshaped, a copy only where the leading dims do not merge)."""
    if x.dim() != 4:
        x = x.reshape(1, 1, -1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def map_rows(x4: torch.Tensor, features: torch.Tensor, consts: tuple[float, float, float]):
    """(phi [B, NH, T, m] contiguous in x's dtype, b [B, NH, T] fp32) of x4 [B, NH, T, D] (`as_rows`): the forward
    kernel's launch, outside autograd (consts: sqrt_scale, half_scale, log_inv)."""
    b_, nh, t, d = x4.shape
    m = features.shape[0]
    phi = x4.new_empty(b_, nh, t, m)  # contiguous: the causal kernels' backward reads it as rows
    b = x4.new_empty(b_, nh, t, dtype=torch.float32)
    cfg = _launch(d, m, "fwd")
    _favor_kernel[(triton.cdiv(t, cfg["BN"]), b_ * nh)](x4, features.contiguous(), phi, b, t, d, m, nh, *x4.stride()[:3],
                                                        *consts, PREC=_precision(x4), **cfg)
    return phi, b


def grad_rows(x4: torch.Tensor, features: torch.Tensor, dphi4: torch.Tensor, b: torch.Tensor, dx: torch.Tensor,
              consts: tuple[float, float, float]) -> torch.Tensor:
    """dx (in place, any layout with unit last stride; returned) of the map of x4 [B, NH, T, D] (bf16, drawn features)
    for dphi4 [B, NH, T, m] (unit last stride) and the forward's b: the backward kernel's launch, outside autograd."""
    b_, nh, t, d = x4.shape
    cfg = _launch(d, features.shape[0], "bwd")
    _favor_grad_kernel[(triton.cdiv(t, cfg["BN"]), b_ * nh)](
        x4, features.contiguous(), dphi4, b.reshape(b_ * nh, t), dx, t, d, features.shape[0], nh, *x4.stride()[:3],
        *dphi4.stride()[:3], *dx.stride()[:3], *consts, PREC=_precision(x4), **cfg)
    return dx


def grad_kernel_serves(x: torch.Tensor, learn: bool) -> bool:
    """Whether the backward kernel serves the map of x: bf16 with drawn features (fp16, whose narrow range would flush
    a split gradient's low part, and a trained projection take `favor_backward`)."""
    return x.dtype == torch.bfloat16 and not learn


class _Favor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, features, sqrt_scale, half_scale, log_inv):
        ctx.consts = (sqrt_scale, half_scale, log_inv)
        phi, b = map_rows(as_rows(x), features, ctx.consts)
        b = b.reshape(x.shape[:-1])
        ctx.mark_non_differentiable(b)
        ctx.save_for_backward(x, features, b)
        return phi.reshape(*x.shape[:-1], features.shape[0]), b

    @staticmethod
    def backward(ctx, dphi, _db):
        x, features, b = ctx.saved_tensors
        if grad_kernel_serves(x, ctx.needs_input_grad[1]):  # dx only (drawn features): the kernel
            x4 = as_rows(x)
            dphi4 = narrowed(dphi.reshape(*x4.shape[:3], features.shape[0]))  # wider than 32-bit offsets: a copy
            dx = grad_rows(x4, features, dphi4 if dphi4.stride(-1) == 1 else dphi4.contiguous(), b,
                           torch.empty_like(x4), ctx.consts)  # dx in x's layout (strides kept for dense x)
            return dx.reshape(x.shape), None, None, None, None
        dx, dfeat = favor_backward(x, features, dphi, b, *ctx.consts, compiled=x.is_cuda)
        return (dx if ctx.needs_input_grad[0] else None,
                dfeat.to(features.dtype) if ctx.needs_input_grad[1] else None, None, None, None)


def favor_features(x: torch.Tensor, features: torch.Tensor, sqrt_scale: float, half_scale: float, log_inv: float):
    """(phi [..., m] in x's dtype, b [...] fp32) for x [..., D] (bf16 / fp16) and features [m, D] (the drawn W,
    any dtype: scaled by sqrt_scale and split in the kernel). The caller checked
    `feature_maps.favor_triton_reasons`."""
    if not map_fits(x, features.shape[0]):
        raise UnsupportedError(f"favor_features: x {tuple(x.shape)} (strides {x.stride()}) mapped to "
                               f"{features.shape[0]} features passes the kernel's 32-bit row offsets (2^31 elements); "
                               "use a non-Triton backend, or split the input")
    if x.dim() == 4:  # [B, H, T, D]: B x H grid rows (other ranks map as one row)
        split = in_batch_pieces("favor_features", x.shape[0], x.shape[1], lambda lo, hi: favor_features(
            x[lo:hi], features, sqrt_scale, half_scale, log_inv))
        if split is not None:
            return split
    return _Favor.apply(x, features, float(sqrt_scale), float(half_scale), float(log_inv))
