"""Performer's causal attention on CUDA as one autograd node: FAVOR+'s map (`ops.favor_triton`) and the causal linear
kernels' chunked form (`ops.linear_triton`), with the launches that do not wait on each other on two streams
(`triton_common.concurrently`).

Composed of three autograd nodes (the map of q, the map of k, the core), every launch waits for the one before. At
SmolLM2's shapes and a few thousand tokens each pass fills a few of the GPU's SMs (a chunked walk runs one program
per head and block, one chunk after another), so the order of the launches is the cost. Here:

    forward:   map k -> [ map q  ||  state walk ] -> outputs   (the walk finds the chunk maxima: `linear_triton.OWN_P`)
    backward:  division's gradient -> [ dq -> map q's gradient  ||  reverse walk -> dk, dv -> map k's gradient ]

The same kernels on the same inputs as the composition: the same numbers, bit for bit (tests/methods/
test_performer_triton.py; benchmarks/gpu_checks.py on the GPU, where the streams run). Served: bf16 inputs on CUDA
(or under Triton's interpreter), drawn (not trained) features, the chunked form (`linear_triton.parallel_max_t`), no
padding mask; anything else takes the composition.
"""
from __future__ import annotations

import torch
import triton

from ..types import records_grad
from .limits import call_reasons, check_call, in_batch_pieces
from . import favor_triton as ft
from . import linear_triton as lt
from .triton_common import concurrently, unit_stride

FUSED = True  # False: performer runs the composition (benchmarks/short_calls.py's `performer+unfused`)


def serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, learn: bool, num_features: int) -> bool:
    """Whether `causal_favor` serves these inputs (the caller checked the map's kernel, `favor_triton_reasons`): the
    chunked form only, so inputs longer than `linear_triton.parallel_max_t` (its limit with gradients where they
    are recorded: the composition would run the chunked form there too)."""
    t = q.shape[-2]
    return (FUSED and q.dim() == 4 and q.dtype == k.dtype == torch.bfloat16 and ft.grad_kernel_serves(q, learn)
            and t > lt.parallel_max_t(num_features, records_grad(q, k, v))
            and not call_reasons(t, q, k, v, heads=q.shape[1], head_dim=q.shape[-1], feature_dim=num_features))


class _CausalFavor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, features, sqrt_scale, half_scale, log_inv):
        consts = (sqrt_scale, half_scale, log_inv)
        x4q, x4k = ft.as_rows(q), ft.as_rows(k)
        (v,) = unit_stride(v)
        b, nh, t, _ = x4q.shape
        nkv, f, d = x4k.shape[1], features.shape[0], v.shape[-1]
        n_chunks = triton.cdiv(t, lt.BT)
        pk, bk = ft.map_rows(x4k, features, consts)  # the key features and log-scales first: the walk reads them
        lkf, pex = lt.chunk_tables(bk, b, nkv, t, n_chunks, q.device)  # pex None: the walk finds it (OWN_P)
        meta = lt.kernel_meta(pk, d, True)
        (pq, bq), (h, z, pex) = concurrently(lambda: ft.map_rows(x4q, features, consts),
                                             lambda: lt._states(pk, v, lkf, pex, meta, n_chunks), q.device)
        out, den = lt.out_pass(pq, pk, v, lkf, pex, h, z, meta)
        ctx.save_for_backward(x4q, x4k, v, features, pq, pk, bq, lkf, pex, out, den, h, z)
        ctx.consts, ctx.meta, ctx.shape = consts, meta, (b, nh, nkv, t, f, d, n_chunks)
        return out

    @staticmethod
    def backward(ctx, dout):
        x4q, x4k, v, features, pq, pk, bq, lkf, pex, out, den, h, z = ctx.saved_tensors
        b, nh, nkv, t, f, d, n_chunks = ctx.shape
        dnum, dden = lt.grad_prep(dout, out, den, ctx.meta, ctx.shape)
        dxq, dxk = torch.empty_like(x4q), torch.empty_like(x4k)  # in q's and k's layouts

        def then_dq(dpq):  # on the dq branch's stream: the map's gradient of q as soon as its dq is written
            ft.grad_rows(x4q, features, dpq.view(b, nh, t, f), bq, dxq, ctx.consts)

        def then_dk(dpk):  # on the dk, dv branch's stream, after it
            ft.grad_rows(x4k, features, dpk.view(b, nkv, t, f), lkf, dxk, ctx.consts)

        # the key log-scales carry no gradient (FAVOR+'s b is detached): no db
        _, _, dv, _ = lt._chunked_backward(pq, pk, v, lkf, pex, dnum, dden, ctx.meta, ctx.shape, h, z, then_dq, then_dk,
                                           need_db=False)
        return dxq, dxk, dv, None, None, None, None


def causal_favor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, features: torch.Tensor, sqrt_scale: float,
                 half_scale: float, log_inv: float) -> torch.Tensor:
    """out [B, H, T, D]: causal FAVOR+ attention of raw q [B, H, T, D], k, v [B, Hkv, T, D] (bf16, any layout with
    unit last stride) with the drawn features [m, D], what `feature_maps.FAVOR` followed by
    `linear_triton.causal_linear` compute (the caller checked `serves`)."""
    check_call("causal_favor", q.shape[-2], q, k, v, heads=q.shape[1], head_dim=q.shape[-1],
               feature_dim=features.shape[0])
    split = in_batch_pieces("causal_favor", q.shape[0], q.shape[1] + k.shape[1], lambda lo, hi: causal_favor(
        q[lo:hi], k[lo:hi], v[lo:hi], features, sqrt_scale, half_scale, log_inv))
    if split is not None:
        return split
    return _CausalFavor.apply(q, k, v, features, float(sqrt_scale), float(half_scale), float(log_inv))
