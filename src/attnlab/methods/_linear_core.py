"""The kernelised (linear) attention core shared by `linear`, `performer` and `rfa`.

Given feature maps phi(q) [B, H, Tq, F] and phi(k) [B, H, Tk, F]:

    out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)      (j <= i when causal)

Non-causal: one pass, O(T F D). Causal: the chunked form (as in flash-linear-attention): within a chunk
of C tokens the masked C x C quadratic form, across chunks a prefix sum of per-chunk states
phi(K_c)^T V_c, so memory is O(T F D / C) instead of the O(T F D) of a per-token cumulative sum.
A row whose normaliser is exactly 0 (no visible key) returns zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import masks


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    zero = den == 0
    return torch.where(zero.unsqueeze(-1), torch.zeros_like(num), num / den.masked_fill(zero, 1.0).unsqueeze(-1))


def linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> torch.Tensor:
    out_dtype = v.dtype
    ct = _compute_dtype(phi_q.dtype)
    phi_q, phi_k, v = phi_q.to(ct), phi_k.to(ct), v.to(ct)
    if key_padding_mask is not None:
        phi_k = phi_k * key_padding_mask[:, None, :, None].to(ct)  # padded keys contribute nothing
    if not causal:
        kv = torch.einsum("bhkf,bhkd->bhfd", phi_k, v)  # (B, H, F, D)
        z = phi_k.sum(dim=-2)  # (B, H, F)
        num = torch.einsum("bhqf,bhfd->bhqd", phi_q, kv)
        den = torch.einsum("bhqf,bhf->bhq", phi_q, z)
        return _safe_div(num, den).to(out_dtype)
    return _causal_chunked(phi_q, phi_k, v, chunk_size).to(out_dtype)


def _causal_chunked(phi_q, phi_k, v, chunk: int) -> torch.Tensor:
    b, h, tq, f = phi_q.shape
    tk, d = phi_k.shape[-2], v.shape[-1]
    offset = tk - tq  # bottom-right alignment: query i sits at key position i + offset
    init_kv = init_z = None
    if offset > 0:  # keys before the first query: one state every query sees
        init_kv = torch.einsum("bhkf,bhkd->bhfd", phi_k[:, :, :offset], v[:, :, :offset])
        init_z = phi_k[:, :, :offset].sum(-2)
        phi_k, v = phi_k[:, :, offset:], v[:, :, offset:]
    elif offset < 0:  # the first -offset queries see no key at all
        phi_q = phi_q[:, :, -offset:]
    t = phi_q.shape[-2]
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        phi_q, phi_k, v = (F.pad(x, (0, 0, 0, pad)) for x in (phi_q, phi_k, v))
    qc = phi_q.reshape(b, h, n, chunk, f)
    kc = phi_k.reshape(b, h, n, chunk, f)
    vc = v.reshape(b, h, n, chunk, d)
    kv = torch.einsum("bhncf,bhncd->bhnfd", kc, vc)  # per-chunk states (B, H, N, F, D)
    z = kc.sum(dim=-2)  # (B, H, N, F)
    kv = kv.cumsum(dim=2) - kv  # exclusive prefix: what chunk n sees from chunks < n
    z = z.cumsum(dim=2) - z
    if init_kv is not None:
        kv = kv + init_kv[:, :, None]
        z = z + init_z[:, :, None]
    num = torch.einsum("bhncf,bhnfd->bhncd", qc, kv)
    den = torch.einsum("bhncf,bhnf->bhnc", qc, z)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=qc.device).tril()
    scores = torch.einsum("bhncf,bhnmf->bhncm", qc, kc).masked_fill(~tri, 0.0)  # (B, H, N, C, C)
    num = num + torch.einsum("bhncm,bhnmd->bhncd", scores, vc)
    den = den + scores.sum(-1)
    out = _safe_div(num, den).reshape(b, h, n * chunk, d)[:, :, :t]
    if offset < 0:
        out = F.pad(out, (0, 0, -offset, 0))
    return out


def linear_attention_quadratic(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function in its O(T^2) form; returns (out, implied probs). Reference and need_probs path."""
    ct = _compute_dtype(phi_q.dtype)
    scores = torch.einsum("bhqf,bhkf->bhqk", phi_q.to(ct), phi_k.to(ct))
    allowed, _ = masks.combine(
        phi_q.shape[-2], phi_k.shape[-2], causal=causal, key_padding_mask=key_padding_mask, device=phi_q.device
    )
    if allowed is not None:
        scores = scores.masked_fill(~allowed, 0.0)
    den = scores.sum(-1, keepdim=True)
    probs = torch.where(den == 0, torch.zeros_like(scores), scores / den.masked_fill(den == 0, 1.0))
    out = torch.matmul(probs, v.to(ct)).to(v.dtype)
    return out, probs
