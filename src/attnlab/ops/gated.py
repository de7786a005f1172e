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
