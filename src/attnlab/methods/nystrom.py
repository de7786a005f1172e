"""Nystromformer (Xiong et al. 2021, "Nystromformer: A Nystrom-Based Algorithm for Approximating
Self-Attention", arXiv:2102.03902).

With m landmarks Q~, K~ (segment means of q and k):

    F = softmax(Q K~^T s)   A = softmax(Q~ K~^T s)   B = softmax(Q~ K^T s)
    out = F pinv(A) (B V)                             # multiplied right to left: no T x T matrix

pinv is the paper's Newton-Schulz iteration or torch.linalg.pinv. With m = T (T <= num_landmarks) each
landmark is one token, so F = A = B = S and, with the exact pinv, S pinv(S) S V = S V: dense attention.
Padding: landmarks average real tokens only and a landmark with none is dropped (masked out of F's and
A's columns, its A and B rows zeroed), so that limit holds under padding too. Non-causal and Tq == Tk
only: landmarks summarise the whole sequence, and q and k landmarks must pair up segment by segment.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import masks
from ..ops.fused import triton_importable
from ..registry import register
from ..types import Capabilities, OptionError, opt, records_grad
from .base import AttentionMethod

_PINV = ("iterative", "exact")
_PRECISION = ("fp32", "input")


class _NewtonSchulz(torch.autograd.Function):
    """`iters` steps Z <- Z (13 I - X (15 I - X (7 I - X))) / 4, X = A Z, on [N, m, m] batches, with a hand-written
    backward: per step two bmm and two baddbmm forward (c I - X Y in one call) and eight bmm / baddbmm backward, the
    steps' X, 7 I - X, 15 I - X (7 I - X) and polynomial kept (m x m each). Autograd of the same ops launched ~3x
    as many kernels: at m = 64 the call is host-bound (measured on an H200 with the Triton kernels)."""

    @staticmethod
    def forward(ctx, a, z, iters):
        # in a's dtype whatever autocast says (its bmm would run in bf16 and its subtractions in fp32: mixed
        # saved tensors the backward, which autocast does not cover, could not multiply)
        with torch.autocast(a.device.type, enabled=False):
            z = z.to(a.dtype)
            eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            e7, e15, e13q = 7 * eye, 15 * eye, 3.25 * eye
            saved = []
            for _ in range(iters):
                x = torch.bmm(a, z)
                t1 = e7 - x
                t2 = torch.baddbmm(e15, x, t1, alpha=-1)  # 15 I - X t1
                p = torch.baddbmm(e13q, x, t2, alpha=-0.25)  # (13 I - X t2) / 4
                saved += [z, x, t1, t2, p]
                z = torch.bmm(z, p)
        ctx.save_for_backward(a, *saved)
        ctx.iters = iters
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward (the paper's form, autograd's, had one)
    def backward(ctx, g):
        a, *saved = ctx.saved_tensors
        g = g.to(a.dtype)
        ga = torch.zeros_like(a)
        at = a.transpose(-1, -2)
        for i in reversed(range(ctx.iters)):
            z, x, t1, t2, p = saved[5 * i:5 * i + 5]
            xt = x.transpose(-1, -2)
            h = torch.bmm(z.transpose(-1, -2), g).mul_(-0.25)  # -dP / 4
            gz = torch.bmm(g, p.transpose(-1, -2))  # through Z' = Z P
            gt2 = torch.bmm(xt, h)  # through P = (13 I - X t2) / 4
            gx = torch.bmm(h, t2.transpose(-1, -2))
            gx = torch.baddbmm(gx, gt2, t1.transpose(-1, -2), alpha=-1)  # through t2 = 15 I - X t1
            gx = torch.baddbmm(gx, xt, gt2)  # through t1 = 7 I - X (dt1 = -X^T dt2)
            ga = torch.baddbmm(ga, gx, z.transpose(-1, -2))  # through X = A Z
            g = torch.baddbmm(gz, at, gx)
        return ga, g, None


def paper_pinv(a: torch.Tensor, iters: int) -> torch.Tensor:
    """The paper's iteration as written (4-D matmuls, `c * eye` terms, autograd's backward): what `iterative_pinv`
    ran before `_NewtonSchulz`, kept as its yardstick (tests) and for host-time comparisons (benchmarks)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    col = a.abs().sum(-2).amax(-1, keepdim=True)[..., None]
    row = a.abs().sum(-1).amax(-1, keepdim=True)[..., None]
    z = a.transpose(-1, -2) / (col * row).clamp_min(torch.finfo(a.dtype).tiny)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def iterative_pinv(a: torch.Tensor, iters: int) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of [..., m, m] by the paper's cubic Newton-Schulz iteration (`_NewtonSchulz`)."""
    m = a.shape[-1]
    a3 = a.reshape(-1, m, m)
    col = a3.abs().sum(-2).amax(-1)  # (N,) max column sum, ||A||_1
    row = a3.abs().sum(-1).amax(-1)  # (N,) max row sum, ||A||_inf
    # Z0 = A^T / (||A||_1 ||A||_inf) makes ||I - A Z0|| < 1, so the iteration converges; clamp keeps an
    # all-zero A (all-padded row) at Z = 0 instead of NaN
    z = a3.transpose(-1, -2) / (col * row).clamp_min(torch.finfo(a.dtype).tiny)[:, None, None]  # (N, m, m)
    return _NewtonSchulz.apply(a3, z, iters).reshape(a.shape)


def segment_means(m: int, t: int, key_padding_mask: torch.Tensor | None, dtype, device):
    """Averaging matrix [B|1, 1, m, T] (token i in segment floor(i*m/T), real tokens only) and which
    landmarks hold a real token, Bool[B|1, m]."""
    seg = torch.arange(t, device=device) * m // t  # (T,) segment of each token; T need not divide by m
    member = (seg[None, :] == torch.arange(m, device=device)[:, None])[None]  # (1, m, T)
    if key_padding_mask is not None:
        member = member & key_padding_mask[:, None, :]  # (B, m, T)
    counts = member.sum(-1)  # (B|1, m)
    avg = member.to(dtype) / counts.clamp_min(1)[..., None].to(dtype)  # (B|1, m, T)
    return avg[:, None], counts > 0


CHUNK = 1024  # tokens per chunk of the T-long products; T below SPLIT_FROM stays one chunk
SPLIT_FROM = 2048


def token_chunks(t: int) -> int:
    """How many chunks the T-long products run as: T / L for the largest L in CHUNK, CHUNK/2, ... 64 dividing T
    (from SPLIT_FROM tokens on), else 1. An m x T by T x D product with m = D = 64 is one output tile per head
    reducing over all T (a few CTAs on the whole GPU, fp32); as c chunks it is c x heads tiles and a small sum."""
    if t < SPLIT_FROM:
        return 1
    size = CHUNK
    while size >= min(64, CHUNK):
        if t % size == 0 and t // size >= 2:
            return t // size
        size //= 2
    return 1


def long_matmul(a: torch.Tensor, b: torch.Tensor, c: int) -> torch.Tensor:
    """a [..., M, T] @ b [..., T, N] as c partial products over T / c tokens each, summed (split-K)."""
    if c == 1:
        return a @ b
    t = a.shape[-1]
    parts = a.unflatten(-1, (c, t // c)).movedim(-2, -3) @ b.unflatten(-2, (c, t // c))  # (..., c, M, N)
    return parts.sum(-3, dtype=torch.promote_types(parts.dtype, torch.float32))  # summed in fp32 at least


def per_chunk(x: torch.Tensor, c: int, dtype) -> torch.Tensor:
    """x [B, H, M, N] (fp32) as [B, H, c, M, N] in `dtype` for a product with every chunk: expanded before the
    cast, so the backward sums the chunks' gradients in x's precision, not in a half-precision dtype."""
    return x[:, :, None].expand(-1, -1, c, -1, -1).to(dtype)


def chunked_softmax(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """softmax of [B, H, c, M, L] scores over a row's c x L keys (dims 2 and 4) in fp32; rows with nothing
    allowed give zeros, not NaN (as masks.masked_softmax)."""
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    top = s.amax(dim=(2, 4), keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=s.dtype, device=s.device))
    e = torch.exp(s - top)
    return e / e.sum(dim=(2, 4), keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


@register("nystrom")
class Nystrom(AttentionMethod):
    """Nystrom approximation of the softmax matrix through m segment-mean landmarks (O(T m))."""
    complexity = ("O(n m d + m³)", "O(n m + m²)", "m: num_landmarks")

    capabilities = Capabilities(causal=False, padding=True, probs=True, cross=False)

    @dataclasses.dataclass
    class Options:
        num_landmarks: int = opt(64, "m: landmarks (segment means); T <= m uses every token, exact with pinv='exact'",
                                 low=1)
        pinv_iters: int = opt(6, "Newton-Schulz iterations for pinv='iterative'", low=0)
        pinv: str = opt("iterative", "iterative (the paper's Newton-Schulz) | exact (torch.linalg.pinv)", choices=_PINV)
        conv_kernel: int = opt(0, "odd size of the paper's depthwise residual conv on V (trainable); 0 = off", low=0)
        precision: str = opt("fp32", "fp32: every product in fp32 at least | input: the query side's T-long "
                                     "products (F's scores and F X) in the input dtype (bf16 tensor cores, fp32 "
                                     "accumulation); B's side (its scores and B V, whose rounding pinv(A) magnifies), "
                                     "softmaxes, landmarks, A and pinv(A) in fp32", choices=_PRECISION)
        backend: str = opt("auto", "auto (triton on CUDA in bf16 where it can, else torch) | triton "
                                   "(ops/nystrom_triton.py: the two T-long softmax products as flash-style kernels, no "
                                   "T x m matrix in memory) | torch", choices=("auto", "triton", "torch"))

        def __post_init__(self):
            if isinstance(self.conv_kernel, int) and self.conv_kernel % 2 == 0 and self.conv_kernel:
                raise OptionError(f"nystrom: conv_kernel must be odd (same-length output), got {self.conv_kernel}")

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        c = self.opts.conv_kernel
        # off by default: the residual conv is not attention, and would break the exact limit
        self.conv = (
            nn.Conv2d(num_heads, num_heads, (c, 1), padding=(c // 2, 0), groups=num_heads, bias=False) if c else None
        )

    @classmethod
    def defaults(cls, seq_len):
        return {"num_landmarks": max(8, min(64, seq_len // 4))}

    @classmethod
    def exact_limit(cls, tq, tk):
        return {"num_landmarks": max(tq, tk), "pinv": "exact"}

    @classmethod
    def test_options(cls, seq_len):
        return {"num_landmarks": max(2, seq_len // 4)}

    def flops(self, tq, tk, causal, *, grad=False):
        """F = softmax(Q K~^T), B = softmax(Q~ K^T), B V and F X (T x m x D each), A (m x m x D), pinv (the
        Newton-Schulz iteration's four m x m x m products per step; the exact pinv counted as 6 steps)."""
        m, d = min(self.opts.num_landmarks, tk), self.head_dim
        steps = self.opts.pinv_iters if self.opts.pinv == "iterative" else 6
        return 2.0 * m * d * (2 * tq + 2 * tk) + 4.0 * m * m * d + 8.0 * steps * m ** 3

    def _triton_reasons(self, device, m, dtype, need_probs) -> list[str]:
        if not triton_importable():
            return ["backend='triton' needs triton, which is not installed"]
        from ..ops import nystrom_triton

        return nystrom_triton.unsupported_reasons(device, landmarks=m, head_dim=self.head_dim, dtype=dtype,
                                                  need_probs=need_probs, conv=self.conv is not None)

    def _unsupported_reasons(self, *, causal, tq, tk, dtype, device, need_probs=False, **extras):
        if self.opts.backend == "triton":
            return self._triton_reasons(device, min(self.opts.num_landmarks, tk), dtype, need_probs)
        return []

    def _landmarks(self, q, k, pad, m, ct, ft, c):
        """(q_lm, k_lm [B, H, m, D] in ct, which landmarks hold a real token Bool[B|1, m] or None without padding)."""
        t = k.shape[-2]
        if pad is None and t % m == 0:  # equal segments: a reshape-mean, no m x T averaging matrix
            return (*(x.unflatten(-2, (m, t // m)).mean(-2, dtype=ct) for x in (q, k)), None)
        avg, lm_real = segment_means(m, t, pad, ct, q.device)  # (B|1, 1, m, T), (B|1, m)
        return long_matmul(avg.to(ft), q.to(ft), c).to(ct), long_matmul(avg, k.to(ct), c), (
            None if pad is None else lm_real)

    def _pinv(self, a):
        return torch.linalg.pinv(a) if self.opts.pinv == "exact" else iterative_pinv(a, self.opts.pinv_iters)

    def _use_triton(self, q, m, need_probs) -> bool:
        if self.opts.backend != "auto":
            return self.opts.backend == "triton"
        # measured in bf16 on an H200 (benchmarks/results/bench_h200/nystrom/); fp32 stays on torch
        return (q.is_cuda and q.dtype == torch.bfloat16
                and not self._triton_reasons(q.device, m, q.dtype, need_probs))

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        m = min(self.opts.num_landmarks, k.shape[-2])
        if self._use_triton(q, m, need_probs):
            return self._attend_triton(q, k, v, key_padding_mask, scale, m), None
        self.kernel = "torch"
        out_dtype = v.dtype
        # fp32 at least by default: X = pinv(A) B V is ~cond(A) larger than the output, so bf16 rounding of B or
        # B V is magnified by cond(A) (measured: in the bf16 exact limit with padding, B's scores or B V in bf16
        # lost 0.1, F's side in bf16 0.004). precision='input' keeps the query side (F's scores, F X) in the
        # input dtype, so half the T-long products run on tensor cores and q is never copied to fp32.
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        low = self.opts.precision == "input" and q.dtype in (torch.float16, torch.bfloat16)
        ft = q.dtype if low else ct  # the query side's dtype
        if low:
            self.kernel = "torch[input]"
        q, k, v = q.to(ft), k.to(ct), v.to(ct)
        t = k.shape[-2]
        m = min(self.opts.num_landmarks, t)
        pad = key_padding_mask
        if pad is not None:
            v = v.masked_fill(~pad[:, None, :, None], 0.0)
        c = token_chunks(t)  # the T-long products as c chunks of T / c tokens (see token_chunks)
        q_lm, k_lm, lm_real = self._landmarks(q, k, pad, m, ct, ft, c)  # (B, H, m, D)
        # without padding every landmark and key is real: plain softmaxes, no masks
        lm_cols = None if pad is None else lm_real[:, None, None, :]  # (B|1, 1, 1, m): landmarks usable as keys
        k_lm = k_lm * scale  # the scale folded into the m landmark keys, not into T x m scores
        # F chunk by chunk, [B, H, c, T/c, m], against the landmarks broadcast over the chunks: the backward's
        # gradients of the landmarks then come out as c partial products summed (split-K), not one m x T x D
        # product with T as its reduction (one small tile per head: measured 2x slower than the peer at 64k)
        qc = q.unflatten(-2, (c, t // c))  # (B, H, c, T/c, D), a view
        kernel_f = masks.masked_softmax(qc @ per_chunk(k_lm.transpose(-1, -2), c, ft),
                                        None if lm_cols is None else lm_cols[:, :, None]).to(ft)  # (B, H, c, T/c, m)
        kernel_a = masks.masked_softmax(q_lm @ k_lm.transpose(-1, -2), lm_cols)  # (B, H, m, m)
        # B the same way, [B, H, c, m, T/c], softmax over (c, T/c): B V is c partial m x D products summed
        kernel_b = chunked_softmax((q_lm * scale)[:, :, None] @ k.unflatten(-2, (c, t // c)).transpose(-1, -2),
                                   None if pad is None else pad.unflatten(-1, (c, t // c))[:, None, :, None, :])
        if pad is not None:  # landmarks holding no real token are no query either
            lm_rows = lm_real[:, None, :, None].to(ct)  # (B|1, 1, m, 1)
            kernel_a, kernel_b = kernel_a * lm_rows, kernel_b * lm_rows[:, :, None]
        a_inv = self._pinv(kernel_a)  # (B, H, m, m)
        x = a_inv @ (kernel_b @ v.unflatten(-2, (c, t // c))).sum(2)  # (B, H, m, D): c partial B V summed
        out = (kernel_f @ per_chunk(x, c, ft)).flatten(2, 3)  # (B, H, T, D), right to left: O(T m D)
        if self.conv is not None:
            ck = self.opts.conv_kernel
            out = out + nn.functional.conv2d(v, self.conv.weight.to(ct), padding=(ck // 2, 0), groups=v.shape[1]).to(ft)  # (B, H, T, D)
        if need_probs:  # (B, H, T, T), only when asked
            kb = kernel_b.movedim(2, 3).flatten(-2)  # (B, H, m, T)
            probs = kernel_f.flatten(2, 3).to(ct) @ (a_inv @ kb.to(ct))
        else:
            probs = None
        return out.to(out_dtype), probs

    def _attend_triton(self, q, k, v, pad, scale, m):
        """The same maths with B V and F X as `ops.nystrom_triton` kernels (no [T, m] matrix in memory); the landmarks
        in PyTorch, fp32; A, pinv(A) and X in PyTorch when autograd records (fp32, `_NewtonSchulz`), else in one
        kernel (`solve`)."""
        from ..ops.nystrom_triton import SOLVE_MAX_LANDMARKS, b_side, f_side, solve

        low = self.opts.precision == "input" and q.dtype == torch.bfloat16
        self.kernel = "triton[input]" if low else "triton"
        ct = torch.float32
        t = k.shape[-2]
        q_lm, k_lm, lm_real = self._landmarks(q, k, pad, m, ct, ct, token_chunks(t))
        kl = k_lm * scale
        real = None if lm_real is None else lm_real.expand(q.shape[0], m)
        if (self.opts.pinv == "iterative" and m <= SOLVE_MAX_LANDMARKS
                and not records_grad(q, k, v)):
            # inference: A, pinv(A) and X in one kernel (`solve`); the launches of the PyTorch ops bound the call
            x = solve(q_lm, kl, q_lm * scale, k, v, pad, real, self.opts.pinv_iters)
            return f_side(q, kl, x, real, low=low).to(v.dtype)
        lm_cols = None if lm_real is None else lm_real[:, None, None, :]
        kernel_a = masks.masked_softmax(q_lm @ kl.transpose(-1, -2), lm_cols)  # (B, H, m, m)
        bv = b_side(q_lm * scale, k, v, pad)  # (B, H, m, D) fp32
        if lm_real is not None:  # landmarks holding no real token are no query either
            lm_rows = lm_real[:, None, :, None].to(ct)
            kernel_a, bv = kernel_a * lm_rows, bv * lm_rows
        x = self._pinv(kernel_a) @ bv  # (B, H, m, D)
        return f_side(q, kl, x, real, low=low).to(v.dtype)
