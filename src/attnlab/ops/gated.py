"""Softmax attention whose weights are multiplied by gates, for training learned sparsity:

    out_i = sum_j g_ij e^{s_ij - m_i} v_j / sum_j g_ij e^{s_ij - m_i}     (j visible: causal, padding)

g_ij comes from `gate_fn(start, end, kidx)` -> Float[B|1, H|1, C, K] for query rows [start, end) and the key
indices kidx. A straight-through gate (value 0/1: the hard mask; gradient: a soft relaxation) makes the forward
exactly the hard-masked attention while the gradient reaches the parameters behind the gate. m_i is the max
over the keys whose gate is nonzero (the kept keys), so kept weights never underflow; for dropped keys
e^{s - m} is capped at e^20 (their value is multiplied by a zero gate; only their gradient sees it).

One query chunk at a time, each chunk under activation checkpointing: memory O(chunk x Tk) per step in the
forward and the backward, never Tq x Tk. Compute is O(Tq x Tk): this is the training path; inference runs the
hard mask through ops.sparse (FlexAttention BlockMasks skip the dropped blocks).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

CAP = 20.0


def _chunk(q, k, v, gate, allowed, scale):
    """(out [B, H, C, D], den [B, H, C]) for one query chunk; gate/allowed broadcast to [B, H, C, K]."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).to(acc)  # (B, H, C, K)
    kept = allowed & (gate.detach() > 0)
    m = scores.masked_fill(~kept, float("-inf")).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp((scores - m).clamp(max=CAP)).masked_fill(~allowed, 0.0)
    w = gate.to(acc) * e
    den = w.sum(-1)
    num = torch.matmul(w.to(v.dtype), v).to(acc)
    zero = den == 0
    out = torch.where(zero.unsqueeze(-1), torch.zeros_like(num), num / den.masked_fill(zero, 1.0).unsqueeze(-1))
    return out.to(v.dtype)


def gated_attention(q, k, v, gate_fn, *, scale: float, causal: bool, key_padding_mask=None, chunk: int = 64,
                    use_checkpoint: bool = True) -> torch.Tensor:
    """q [B, H, Tq, D], k/v [B, H, Tk, D] (heads expanded). Returns out [B, H, Tq, D]."""
    tq, tk = q.shape[-2], k.shape[-2]
    off = tk - tq
    outs = []
    for s in range(0, tq, chunk):
        e = min(s + chunk, tq)
        hi = min(tk, e - 1 + off + 1) if causal else tk
        if hi <= 0:
            outs.append(torch.zeros_like(q[:, :, s:e]))
            continue
        def step(qc, kc, vc, s=s, e=e, hi=hi):
            # the gate and the mask are rebuilt inside, so the backward recomputes them instead of storing C x K
            kidx = torch.arange(hi, device=q.device)
            allowed = torch.ones(1, 1, e - s, hi, dtype=torch.bool, device=q.device)
            if causal:
                allowed = allowed & (kidx[None, :] <= torch.arange(s, e, device=q.device)[:, None] + off)
            if key_padding_mask is not None:
                allowed = allowed & key_padding_mask[:, None, None, :hi]
            return _chunk(qc, kc, vc, gate_fn(s, e, kidx), allowed, scale)

        args = (q[:, :, s:e], k[:, :, :hi], v[:, :, :hi])
        if use_checkpoint and torch.is_grad_enabled():
            outs.append(checkpoint(step, *args, use_reentrant=False))
        else:
            outs.append(step(*args))
    return torch.cat(outs, dim=2)


def block_gate_grads(q, k, v, out, lse, dout, *, scale: float, causal: bool, key_padding_mask, block_size: int,
                     exclude=None, chunk: int | None = None) -> torch.Tensor:
    """dL/dg summed over block pairs, for a gate g multiplying the softmax weights (the straight-through gates
    above), evaluated at the hard gate the forward ran with: [B, H, nbq, nbk] (fp32; fp64 for fp64 inputs) of, per
    token pair,

        dL/dg_ij = exp(s_ij - lse_i) * (dO_i . v_j - dO_i . O_i)

    (lse over the kept keys, the forward's normaliser). It holds for dropped keys too: that is what tells a
    dropped block it would help. Query block = (i + Tk - Tq) // block_size (bottom-right positions); rows with no
    kept key (lse = -inf) give 0; exp(s - lse) is capped at e^CAP as in `gated_attention`. `exclude(pos, kidx)` ->
    Bool[C, K]: token pairs whose gate is constant (always kept: no gradient). Dense maths one chunk of query
    rows at a time (O(Tq Tk) compute, O(chunk Tk) memory), no autograd graph."""
    b, h, tq, _ = q.shape
    tk = k.shape[-2]
    off = tk - tq
    bs = int(block_size)
    nbk = -(-tk // bs)
    nbq = -(-(tq + off) // bs)
    if chunk is None:  # about 16M scores a step; causal: at least 4 steps, so the keys past each step are skipped
        chunk = max(1, min(tq, (1 << 24) // max(1, b * h * tk)))
        if causal:
            chunk = min(chunk, max(bs, -(-tq // 4)))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    grads = torch.zeros(b, h, nbq, nbk, dtype=acc, device=q.device)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # (B, H, Tq)
    kidx = torch.arange(tk, device=q.device)
    kf, vf = k.to(acc), v.to(acc)
    for s in range(0, tq, chunk):
        e = min(s + chunk, tq)
        pos = torch.arange(s, e, device=q.device) + off
        hi = min(tk, e + off) if causal else tk  # keys past the chunk's last query: none visible
        if hi <= 0:
            continue
        ki = kidx[:hi]
        allowed = torch.ones(1, 1, e - s, hi, dtype=torch.bool, device=q.device)
        if causal:
            allowed = allowed & (ki[None, :] <= pos[:, None])
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, :hi].bool()
        if exclude is not None:
            allowed = allowed & ~exclude(pos, ki)
        lse_c = lse[:, :, s:e].to(acc).unsqueeze(-1)
        finite = torch.isfinite(lse_c)
        w = torch.matmul(q[:, :, s:e].to(acc), kf[:, :, :hi].transpose(-1, -2)).mul_(scale)  # (B, H, C, hi)
        w = w.sub_(torch.where(finite, lse_c, torch.zeros_like(lse_c))).clamp_(max=CAP).exp_()
        w = w.masked_fill_(~(allowed & finite), 0.0)
        g = torch.matmul(dout[:, :, s:e].to(acc), vf[:, :, :hi].transpose(-1, -2)).sub_(delta[:, :, s:e, None]).mul_(w)
        g = torch.nn.functional.pad(g, (0, nbk * bs - hi)).unflatten(-1, (nbk, bs)).sum(-1)  # (B, H, C, nbk)
        grads.index_add_(2, pos.clamp(min=0) // bs, g)
    return grads


class _BlockGate(torch.autograd.Function):
    """Identity on `out` in the forward; in the backward, besides passing dO on, the gradient of the gate
    parameters `theta` from `block_gate_grads` mapped by `to_theta(block_grads [B, H, nbq, nbk]) -> dL/dtheta`."""

    @staticmethod
    def forward(ctx, out, theta, q, k, v, lse, spec):
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out.view_as(out)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        spec = ctx.spec
        grads = block_gate_grads(q, k, v, out, lse, dout, scale=spec["scale"], causal=spec["causal"],
                                 key_padding_mask=spec["key_padding_mask"], block_size=spec["block_size"],
                                 exclude=spec.get("exclude"))
        return dout, spec["to_theta"](grads), None, None, None, None, None


def straight_through_blocks(out, lse, theta, q, k, v, *, to_theta, scale: float, causal: bool, key_padding_mask,
                            block_size: int, exclude=None):
    """`out` (the hard-masked attention with its row lse over the kept keys, from any kernel: FlexAttention,
    the gathered one) with the straight-through gradient of block gates attached: the same gradient as running
    `gated_attention` with gates of value = the hard mask (and d gate / d theta given by `to_theta`), at the
    cost of the sparse forward plus one dense pass in the backward, instead of a checkpointed dense forward
    and backward in query chunks. q, k, v: the attention's inputs (heads expanded; detached here: their own
    gradient flows through `out`)."""
    spec = {"scale": scale, "causal": causal, "key_padding_mask": key_padding_mask, "block_size": block_size,
            "exclude": exclude, "to_theta": to_theta}
    return _BlockGate.apply(out, theta, q.detach(), k.detach(), v.detach(), lse.detach(), spec)
