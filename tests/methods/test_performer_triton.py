"""Performer's one-node causal path (`ops.performer_triton`: FAVOR+'s map and the causal kernels, independent launches
on two streams on CUDA), run on CPU by Triton's interpreter, where the branches run one after the other: the same
numbers as the composition it replaces (map q, map k, core), bit for bit, and the inputs it leaves to it."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import attnlab

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's CPU interpreter (conftest)"),
]

H, HKV, D, M = 4, 2, 32, 96  # 96 features: over 64, so the chunked form at every length (parallel_max_t)


@pytest.fixture(scope="module")
def pt():
    from attnlab.ops import performer_triton

    return performer_triton


def _inputs(t, seed=0, layout="hf"):
    """q [2, H, t, D], k, v [2, HKV, t, D] in bf16: views of one [2, t, (H + 2 HKV) D] projection (transformers'
    layout) or contiguous."""
    g = torch.Generator().manual_seed(seed)
    row = torch.randn(2, t, (H + 2 * HKV) * D, generator=g).bfloat16()
    q, k, v = (x.unflatten(-1, (-1, D)).transpose(1, 2) for x in row.split([H * D, HKV * D, HKV * D], dim=-1))
    if layout == "contiguous":
        q, k, v = (x.contiguous() for x in (q, k, v))
    return [x.detach().requires_grad_(True) for x in (q, k, v)]


def _run(m, ins, w):
    out = m(*ins, causal=True).out
    grads = torch.autograd.grad((out.float() * w).sum(), ins)
    return m.kernel, [out.detach(), *grads]


@pytest.mark.parametrize("walk,layout", [("kv", "hf"), ("query", "contiguous")])
def test_one_node_equals_the_composition_bit_for_bit(pt, walk, layout, monkeypatch):
    """Outputs and the gradients of q, k, v against the composition (FUSED off) on the same module, 130 tokens (three
    chunks, the last partial), GQA, each reverse walk, q, k, v as transformers hands them over and contiguous: the
    same kernels on the same inputs, so equal bits. A gradient of the wrong map (q's taken with k's log-scales), a
    branch reading a buffer before it is written or a wrong view of dq / dk fails it. dq, dk come back with q's and
    k's order of dims, and dv with v's."""
    from attnlab.ops import linear_triton

    monkeypatch.setattr(linear_triton, "REVERSE_WALK", walk)
    m = attnlab.make("performer", head_dim=D, num_heads=H, num_kv_heads=HKV, num_features=M, backend="triton")
    ins = _inputs(130, layout=layout)
    w = torch.randn(2, H, 130, D, generator=torch.Generator().manual_seed(1))
    kern, got = _run(m, ins, w)
    monkeypatch.setattr(pt, "FUSED", False)
    ref_kern, want = _run(m, ins, w)
    assert (kern, ref_kern) == ("triton+favor", "triton+compiled")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    for dx in got[1:4]:  # dq, dk, dv in the inputs' order of dims: [B, T, H, D] memory for transformers' views
        assert (dx.transpose(1, 2) if layout == "hf" else dx).is_contiguous()


def test_close_to_the_fp64_composition(pt):
    """Against the eager fp64 path of the same features (a bound, not bits): within a few bf16 roundings."""
    m = attnlab.make("performer", head_dim=D, num_heads=H, num_kv_heads=HKV, num_features=M, backend="triton")
    ref = attnlab.make("performer", head_dim=D, num_heads=H, num_kv_heads=HKV, num_features=M, backend="eager")
    ins = _inputs(130, seed=3)
    w = torch.randn(2, H, 130, D, generator=torch.Generator().manual_seed(2))
    kern, got = _run(m, ins, w)
    ins64 = [x.detach().double().requires_grad_(True) for x in ins]
    _, want = _run(ref.double(), ins64, w.double())
    assert kern == "triton+favor"
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert (a.double() - b).abs().max().item() <= 2e-2 * b.abs().max().item(), name


@pytest.mark.parametrize("case", ["fp16", "fp32", "learned", "padding", "parallel", "probs"])
def test_what_it_leaves_to_the_composition(pt, case, monkeypatch):
    """Inputs the one node does not take run the composition, with the same answer as FUSED off: fp16 (its map's
    backward is PyTorch), fp32 (the map's kernel takes half inputs), learned features (their gradient), a padding
    mask, the parallel form (short inputs of narrow maps; forced here), the implied matrix."""
    from attnlab.ops import linear_triton

    opts = dict(head_dim=D, num_heads=H, num_kv_heads=HKV, num_features=M, backend="triton")
    if case == "learned":
        opts["learn_features"] = True
    if case == "parallel":
        monkeypatch.setattr(linear_triton, "PARALLEL_MAX_T", 1 << 30)
    m = attnlab.make("performer", **opts)
    q, k, v = (x.detach() for x in _inputs(70))
    if case in ("fp16", "fp32"):
        q, k, v = (x.to(torch.float16 if case == "fp16" else torch.float32) for x in (q, k, v))
    kw = dict(causal=True)
    if case == "padding":
        kw["key_padding_mask"] = torch.ones(2, 70, dtype=torch.bool)
    if case == "probs":
        kw["need_probs"] = True
    with torch.no_grad():
        out = m(q, k, v, **kw).out
        assert m.kernel != "triton+favor"
        monkeypatch.setattr(pt, "FUSED", False)
        assert torch.equal(out, m(q, k, v, **kw).out)


def test_inference_runs_the_one_node(pt):
    """Without gradients the one node runs too (nothing saved is read), with the composition's output."""
    m = attnlab.make("performer", head_dim=D, num_heads=H, num_kv_heads=HKV, num_features=M, backend="triton")
    q, k, v = (x.detach() for x in _inputs(90, seed=5))
    with torch.no_grad():
        out = m(q, k, v, causal=True).out
        assert m.kernel == "triton+favor"
        pt.FUSED = False
        try:
            assert torch.equal(out, m(q, k, v, causal=True).out)
        finally:
            pt.FUSED = True


def test_narrow_maps_take_the_one_node_where_the_chunked_form_runs(pt, monkeypatch):
    """With 64 features or fewer the composition runs the quadratic pass on short inputs (`parallel_max_t`), which
    the one node has not: it serves inputs past that limit, the shorter one when gradients are recorded (limits set
    around the 130 tokens here), whichever of q, k, v records them."""
    from attnlab.ops import linear_triton

    monkeypatch.setattr(linear_triton, "PARALLEL_INFER_MAX_T", 200)
    monkeypatch.setattr(linear_triton, "PARALLEL_GRAD_MAX_T", 100)
    ins = _inputs(130)
    for i in range(3):
        assert pt.serves(*[x.detach().requires_grad_(j == i) for j, x in enumerate(ins)], False, 64), i
    plain = [x.detach() for x in ins]
    assert not pt.serves(*plain, False, 64)  # inference: the composition's quadratic pass
    with torch.no_grad():
        assert not pt.serves(*ins, False, 64)
    assert pt.serves(*plain, False, M)  # wider maps: the chunked form at every length
    m = attnlab.make("performer", head_dim=D, num_heads=H, num_kv_heads=HKV, num_features=64, backend="triton")
    m(*ins, causal=True)
    assert m.kernel == "triton+favor"
    with torch.no_grad():
        m(*ins, causal=True)
    assert m.kernel != "triton+favor"
