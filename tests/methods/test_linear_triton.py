"""The causal linear-attention Triton kernels (`ops.linear_triton`), run on CPU by Triton's interpreter.

The same kernels run compiled on CUDA (benchmarks/gpu_checks.py checks them there against the CPU path).
Every check is against the method's own quadratic form or the PyTorch chunked path: forward, gradients
(key log-scales included), padding, all-masked rows, shapes that are not multiples of the tile sizes,
and bit-exact causal no-leak.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.helpers import check_vs_quadratic, grads, make, max_err, rand_qkv

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's CPU interpreter (conftest)"),
]


@pytest.fixture(scope="module")
def interpreted():
    """The kernel module, run by Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest before triton
    is imported); methods built with backend="triton" run CPU tensors through it."""
    from attnlab.ops import linear_triton

    return linear_triton


@pytest.fixture(params=["chunked", "parallel"])
def kernels(interpreted, request, monkeypatch):
    """The module in one form: the chunked passes (state walks) or the quadratic passes that short inputs take
    (`parallel_max_t`; the backward's too where F <= PARALLEL_BWD_MAX_F, which every shape here is)."""
    monkeypatch.setattr(interpreted, "PARALLEL_MAX_T", 0 if request.param == "chunked" else 1 << 30)
    return interpreted


@pytest.fixture
def chunked(interpreted, monkeypatch):
    """The chunked forward only (the segment tests: the parallel pass has no state walk)."""
    monkeypatch.setattr(interpreted, "PARALLEL_MAX_T", 0)
    return interpreted


def _features(b, h, t, f, d, dtype, seed, scale):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, h, t, f, generator=g, dtype=torch.float64)
    k = torch.rand(b, h, t, f, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    lk = torch.randn(b, h, t, generator=g, dtype=torch.float64) * 4 if scale else None
    return [x.to(dtype) for x in (q, k, v)] + [None if lk is None else lk.float()]


def _quadratic(q, k, v, lk):
    from attnlab.ops.linear import linear_attention_quadratic

    return linear_attention_quadratic(q, k, v, causal=True, key_log_scale=lk)[0]


def _kernel_out(kernels, q, k, v, lk):
    return kernels.causal_linear(q, k, v, lk)


def _assert_matches_quadratic(out, ins, want, ref_ins):
    """out, and the gradients of ins under one random weighting of it, against the quadratic form's fp64 want and the
    gradients of its inputs ref_ins (q, k, v, and b when given: the same shapes)."""
    assert max_err(out, want) <= 1e-5 * want.abs().max().item()
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), ins)
    ref = torch.autograd.grad((want * w).sum(), ref_ins)
    for name, a, b in zip("q k v b".split(), got, ref):
        assert a.shape == b.shape, name
        assert max_err(a, b) <= 1e-4 * b.abs().max().item(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [False, True], ids=["plain", "log-scale"])
@pytest.mark.parametrize("t,f,d", [(130, 64, 64), (64, 40, 24), (77, 96, 32)])
def test_kernel_matches_quadratic_with_gradients(kernels, dtype, scale, t, f, d):
    # t not a multiple of the 64-token chunk, f of the 64-feature block (96: two blocks, partial sums), d < 64
    q, k, v, lk = _features(2, 2, t, f, d, dtype, seed=t + f, scale=scale)
    ins = [q, k, v] + ([lk] if scale else [])
    for x in ins:
        x.requires_grad_(True)
    out = _kernel_out(kernels, q, k, v, lk)
    want = _quadratic(*(x.double() for x in (q, k, v)), None if lk is None else lk.double())
    low = _quadratic(q, k, v, lk)  # the same form in the inputs' dtype: the yardstick
    tol = 2 * max_err(low, want) + (2e-5 if dtype == torch.float32 else 2e-3 + 2.0**-7 * want.abs().max().item())
    assert max_err(out, want) <= tol
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), ins)
    ref = torch.autograd.grad((want * w).sum(), ins)
    lref = torch.autograd.grad((low.double() * w).sum(), ins)
    for name, a, b, c in zip("q k v b".split(), got, ref, lref):
        assert torch.isfinite(a).all(), name
        rel = max_err(a, b) / b.abs().max().item()
        rel_low = max_err(c, b) / b.abs().max().item()
        assert rel <= 2 * rel_low + (1e-5 if dtype == torch.float32 else 1e-2), (name, rel, rel_low)


@pytest.mark.parametrize("scale", [False, True], ids=["plain", "log-scale"])
def test_kernel_causal_no_leak_bit_identical(kernels, scale):
    q, k, v, lk = _features(1, 2, 150, 32, 16, torch.float32, seed=5, scale=scale)
    out = _kernel_out(kernels, q, k, v, lk)
    cut = 70  # inside the second chunk: the rest of that chunk and all later chunks change
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, cut:] = torch.rand_like(x[:, :, cut:]) * 5
    lk2 = None
    if scale:
        lk2 = lk.clone()
        lk2[:, :, cut:] = 60.0  # a huge later key log-scale: must not underflow the earlier keys' weights
    out2 = _kernel_out(kernels, q2, k2, v2, lk2)
    assert torch.equal(out[:, :, :cut], out2[:, :, :cut])
    assert not torch.equal(out[:, :, cut:], out2[:, :, cut:])


@pytest.mark.parametrize("seg", [None, 1])
@pytest.mark.parametrize("scale", [False, True], ids=["plain", "log-scale"])
def test_grouped_query_heads_read_their_kv_head(kernels, seg, scale, monkeypatch):
    """GQA: q with 4 heads, k, v (and key log-scales) with 2. Each query head h must read kv head h // 2 (a kernel
    indexing h % 2 fails the output), and each kv head's gradient is the sum over its two query heads (a sum over
    the wrong heads, or none, fails the k / v / b gradients); in one segment and in segments of one chunk."""
    from attnlab.methods.base import repeat_kv

    monkeypatch.setattr(kernels, "SEGMENT_LEN", seg)
    g = torch.Generator().manual_seed(11)
    q = torch.rand(2, 4, 130, 32, generator=g, dtype=torch.float64)
    k = torch.rand(2, 2, 130, 32, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 130, 16, generator=g, dtype=torch.float64)
    lk = torch.randn(2, 2, 130, generator=g, dtype=torch.float64) * 4 if scale else None
    ins = [x.float().requires_grad_(True) for x in (q, k, v)] + ([lk.float().requires_grad_(True)] if scale else [])
    out = _kernel_out(kernels, ins[0], ins[1], ins[2], ins[3] if scale else None)
    ref_ins = [x.clone().requires_grad_(True) for x in (q, k, v)] + ([lk.clone().requires_grad_(True)] if scale else [])
    want = _quadratic(ref_ins[0], repeat_kv(ref_ins[1], 2), repeat_kv(ref_ins[2], 2),
                      repeat_kv(ref_ins[3][..., None], 2)[..., 0] if scale else None)
    assert out.shape == (2, 4, 130, 16)
    _assert_matches_quadratic(out, ins, want, ref_ins)
    with pytest.raises(ValueError, match="must agree and divide"):
        kernels.causal_linear(ins[0].detach()[:, :3], ins[1].detach(), ins[2].detach())
    with pytest.raises(ValueError, match="key_log_scale must be"):  # log-scales per query head next to kv-head keys
        kernels.causal_linear(ins[0].detach(), ins[1].detach(), ins[2].detach(), torch.zeros(2, 4, 130))
    with pytest.raises(ValueError, match="must agree in"):
        kernels.causal_linear(ins[0].detach()[:, :, :64], ins[1].detach(), ins[2].detach())


@pytest.mark.parametrize("walk", ["kv", "query"])
@pytest.mark.parametrize("bv", [None, 16, 64])
def test_state_walks_in_value_blocks(chunked, bv, walk, monkeypatch):
    """The state walks with `state_bv`'s value columns a program and with 16 and 64 forced, for values 64 wide (one
    block or four), 96 features (two feature blocks, the last partial: the rule's forward takes 64
    columns), GQA, key log-scales, each reverse walk, in segments of 2 chunks: the quadratic form's outputs and
    gradients. A block offset or mask wrong for some block width fails it."""
    from attnlab.methods.base import repeat_kv

    monkeypatch.setattr(chunked, "STATE_BV", bv)
    monkeypatch.setattr(chunked, "REVERSE_WALK", walk)
    monkeypatch.setattr(chunked, "SEGMENT_LEN", 2)
    widths = []  # (pass, value columns a program) as the walks are launched
    real = chunked._segmented
    monkeypatch.setattr(chunked, "_segmented", lambda kernel, *a, **kw: widths.append((kernel.fn.__name__, a[8]))
                        or real(kernel, *a, **kw))
    g = torch.Generator().manual_seed(12)
    q = torch.rand(1, 4, 150, 96, generator=g, dtype=torch.float64)
    k = torch.rand(1, 2, 150, 96, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 150, 64, generator=g, dtype=torch.float64)
    lk = torch.randn(1, 2, 150, generator=g, dtype=torch.float64) * 4
    ins = [x.float().requires_grad_(True) for x in (q, k, v, lk)]
    out = _kernel_out(chunked, *ins)
    ref_ins = [x.clone().requires_grad_(True) for x in (q, k, v, lk)]
    want = _quadratic(ref_ins[0], repeat_kv(ref_ins[1], 2), repeat_kv(ref_ins[2], 2),
                      repeat_kv(ref_ins[3][..., None], 2)[..., 0])
    _assert_matches_quadratic(out, ins, want, ref_ins)
    rule = [("_state_kernel", 64), ("_grad_state_kernel", 64 if walk == "kv" else 32)]  # `state_bv`: 96 > BK features
    assert widths == (rule if bv is None else [("_state_kernel", bv), ("_grad_state_kernel", bv)])


@pytest.mark.parametrize("seg", [None, 1])
def test_reverse_walk_per_query_head(chunked, seg, monkeypatch):
    """REVERSE_WALK = "query": the chunked backward's reverse walk per query head (its kv head's log-scales and chunk
    maxima), the dk, dv pass summing each kv head's walks as it reads them: the same gradients as the walk per kv head
    and as the quadratic form (GQA, 4 query heads on 2, 3 and 2 when expanded; key log-scales; in one segment and in
    segments of one chunk)."""
    from attnlab.methods.base import repeat_kv

    monkeypatch.setattr(chunked, "SEGMENT_LEN", seg)
    g = torch.Generator().manual_seed(23)
    q = torch.rand(2, 4, 150, 32, generator=g, dtype=torch.float64)
    k = torch.rand(2, 2, 150, 32, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 150, 16, generator=g, dtype=torch.float64)
    lk = torch.randn(2, 2, 150, generator=g, dtype=torch.float64) * 4
    w = torch.randn(2, 4, 150, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_ins = [x.clone().requires_grad_(True) for x in (q, k, v, lk)]
    want = _quadratic(ref_ins[0], repeat_kv(ref_ins[1], 2), repeat_kv(ref_ins[2], 2),
                      repeat_kv(ref_ins[3][..., None], 2)[..., 0])
    ref = torch.autograd.grad((want * w).sum(), ref_ins)
    got = {}
    for walk in ("kv", "query"):
        monkeypatch.setattr(chunked, "REVERSE_WALK", walk)
        ins = [x.float().requires_grad_(True) for x in (q, k, v, lk)]
        out = _kernel_out(chunked, *ins)
        got[walk] = torch.autograd.grad((out.double() * w).sum(), ins)
    for name, a, b, r in zip("q k v b".split(), got["query"], got["kv"], ref):
        assert max_err(a, r) <= 1e-4 * r.abs().max().item(), name
        assert max_err(a, b) <= 1e-5 * b.abs().max().item(), name


def test_reverse_walk_rule(chunked, monkeypatch):
    """REVERSE_WALK = "auto" takes the walk per query head for narrow maps and for wide ones up to 16 chunks (the
    measured rule), per kv head for wide maps beyond; "kv" and "query" are taken as set."""
    assert chunked.REVERSE_WALK == "auto"
    assert [chunked.reverse_walk(f, n) for f, n in ((64, 16), (64, 1024), (256, 16), (256, 17), (96, 64))] == \
        ["query", "query", "query", "kv", "kv"]
    for walk in ("kv", "query"):
        monkeypatch.setattr(chunked, "REVERSE_WALK", walk)
        assert chunked.reverse_walk(256, 16) == walk and chunked.reverse_walk(64, 1024) == walk


@pytest.mark.parametrize("scale", [False, True], ids=["plain", "log-scale"])
def test_inputs_read_and_output_written_in_the_callers_layout(kernels, scale, monkeypatch):
    """q, k, v as transformers hands them over (one fused projection [B, T, H F + Hkv F + Hkv D] split and seen as
    [B, H, T, *]: token stride the whole row, head stride F) are read where they lie, with the same result bit for
    bit as contiguous copies, gradients included (batch 2, 4 query heads on 2 kv heads); the output is [B, H, T, D]
    with [B, T, H, D] memory, so the caller's transpose back is contiguous without a copy. A kernel taking a wrong
    stride (batch, head or token of any tensor) reads other rows and fails the comparison. The gradients of q, k, v
    come back in that layout too ([B, T, H, *] memory, `torch.empty_like`: through transformers' transpose and view with
    no copy), and contiguous for contiguous inputs."""
    b, h, hkv, t, f, d = 2, 4, 2, 130, 32, 16
    g = torch.Generator().manual_seed(21)
    row = torch.rand(b, t, h * f + hkv * f + hkv * d, generator=g)
    row[..., -hkv * d:] -= 0.5  # values of both signs
    q, k, v = row.split([h * f, hkv * f, hkv * d], dim=-1)
    q, k, v = (x.unflatten(-1, (n, w)).transpose(1, 2) for x, n, w in ((q, h, f), (k, hkv, f), (v, hkv, d)))
    lk = torch.randn(b, hkv, t, generator=g) * 4 if scale else None
    assert not any(x.is_contiguous() for x in (q, k, v))
    ins = [x.requires_grad_(True) for x in (q, k, v)] + ([lk.requires_grad_(True)] if scale else [])
    copies = [x.detach().contiguous().requires_grad_(True) for x in ins]
    out = kernels.causal_linear(*ins[:3], ins[3] if scale else None)
    want = kernels.causal_linear(*copies[:3], copies[3] if scale else None)
    assert out.shape == (b, h, t, d) and out.transpose(1, 2).is_contiguous()
    assert torch.equal(out, want)
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), ins)
    grads_of_copies = torch.autograd.grad((want * w).sum(), copies)
    for name, x, y in zip("q k v b".split(), grads, grads_of_copies):
        assert torch.equal(x, y), name
    for x, y in zip(grads[:3], grads_of_copies[:3]):
        assert x.transpose(1, 2).is_contiguous() and y.is_contiguous()
    monkeypatch.setattr(kernels, "REVERSE_WALK", "kv")  # the other reverse walk (chunked form): within fp32 rounding
    kv_walk = torch.autograd.grad((kernels.causal_linear(*ins[:3], ins[3] if scale else None) * w).sum(), ins)
    for name, x, y in zip("q k v b".split(), kv_walk, grads_of_copies):
        assert max_err(x, y) <= 1e-5 * y.abs().max().item(), name
    with torch.no_grad():  # the inference path that maps raw q and k inside the kernels
        assert torch.equal(kernels.causal_linear(q, k, v, feature_map="elu"),
                           kernels.causal_linear(*(x.contiguous() for x in (q, k, v)), feature_map="elu"))
    # with gradients: the backward maps the raw q, k into contiguous features, and dq, dk take the raw ones' layout
    mapped = kernels.causal_linear(*ins[:3], feature_map="elu")
    want = kernels.causal_linear(*copies[:3], feature_map="elu")
    grads = torch.autograd.grad((mapped * w).sum(), ins[:3])
    for name, x, y in zip("q k v".split(), grads, torch.autograd.grad((want * w).sum(), copies[:3])):
        assert torch.equal(x, y) and x.transpose(1, 2).is_contiguous(), name


def test_grouped_query_gradients_in_bf16_match_the_expanded_kernels(kernels):
    """bf16 GQA: each kv head's dk, dv (and key log-scale gradient) equal the expanded call's gradients summed
    through repeat_kv, within bf16 rounding (the group's per-head parts are summed in fp32 before one rounding)."""
    from attnlab.methods.base import repeat_kv

    g = torch.Generator().manual_seed(12)
    q = torch.rand(1, 4, 100, 32, generator=g).bfloat16().requires_grad_(True)
    k = torch.rand(1, 2, 100, 32, generator=g).bfloat16().requires_grad_(True)
    v = torch.randn(1, 2, 100, 16, generator=g).bfloat16().requires_grad_(True)
    lk = (torch.randn(1, 2, 100, generator=g) * 4).requires_grad_(True)
    w = torch.randn(1, 4, 100, 16, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((kernels.causal_linear(q, k, v, lk).float() * w).sum(), (q, k, v, lk))
    out = kernels.causal_linear(q, repeat_kv(k, 2), repeat_kv(v, 2), repeat_kv(lk[..., None], 2)[..., 0])
    want = torch.autograd.grad((out.float() * w).sum(), (q, k, v, lk))
    for name, a, b in zip("q k v b".split(), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert max_err(a, b) <= 2.0 ** -7 * b.abs().max().item(), name


@pytest.mark.parametrize("seg", [1, 2, 4])
@pytest.mark.parametrize("scale", [False, True], ids=["plain", "log-scale"])
def test_segmented_state_pass_matches_quadratic_and_does_not_leak(chunked, seg, scale, monkeypatch):
    """The state pass split into segments of `seg` chunks (330 tokens: 6 chunks, the last partial; 4: uneven
    segments) gives the quadratic form's outputs and gradients, with a later huge key log-scale unable to reach
    earlier outputs (bit-identical), as the one-segment walk."""
    monkeypatch.setattr(chunked, "SEGMENT_LEN", seg)
    assert chunked.segment_len(6) == seg
    q, k, v, lk = _features(1, 2, 330, 32, 16, torch.float32, seed=seg, scale=scale)
    ins = [q, k, v] + ([lk] if scale else [])
    for x in ins:
        x.requires_grad_(True)
    out = _kernel_out(chunked, q, k, v, lk)
    want = _quadratic(*(x.double() for x in (q, k, v)), None if lk is None else lk.double())
    _assert_matches_quadratic(out, ins, want, ins)
    cut = 200  # inside chunk 3: later segments change
    q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, cut:] = torch.rand_like(x[:, :, cut:]) * 5
    lk2 = None
    if scale:
        lk2 = lk.detach().clone()
        lk2[:, :, cut:] = 60.0
    with torch.no_grad():
        a = _kernel_out(chunked, q.detach(), k.detach(), v.detach(), None if lk is None else lk.detach())
        b2 = _kernel_out(chunked, q2, k2, v2, lk2)
    assert torch.equal(a[:, :, :cut], b2[:, :, :cut])
    assert not torch.equal(a[:, :, cut:], b2[:, :, cut:])


@pytest.mark.parametrize("seg", [None, 1, 2])
def test_state_pass_finds_the_chunk_maxima(chunked, seg, monkeypatch):
    """OWN_P (the state pass finds P from b as it walks, no `_exclusive_chunk_max` launch): the P it writes for the
    output pass equals that launch's, with keys at -inf, a whole chunk of them, two leading chunks of them (segments
    that start from P = -inf after others) and a partial last chunk, in one
    segment and in segments of 1 and 2 chunks (each segment's sum with its own stabiliser, the walk starting from
    the earlier segments' maxima). Outputs: equal bits to OWN_P off in one segment (the same factors at every step),
    within fp32 rounding in segments (sums scaled by another max)."""
    monkeypatch.setattr(chunked, "SEGMENT_LEN", seg)
    q, k, v, lk = _features(1, 2, 330, 32, 16, torch.float32, seed=5, scale=True)
    lk[0, 0, ::3] = float("-inf")
    lk[0, 0, 64:128] = float("-inf")
    lk[0, 1, :128] = float("-inf")  # no key in the first two chunks: later segments start from P = -inf
    lk[0, 1, 300:] += 10.0  # the last chunk's keys dominate: P grows at the end
    seen = {}
    real = chunked.out_pass

    def spy(q_, k_, v_, lkf, pex, *a, **kw):
        seen[chunked.OWN_P] = pex.clone()
        return real(q_, k_, v_, lkf, pex, *a, **kw)

    monkeypatch.setattr(chunked, "out_pass", spy)
    with torch.no_grad():
        own = chunked.causal_linear(q, k, v, lk)
        monkeypatch.setattr(chunked, "OWN_P", False)
        launched = chunked.causal_linear(q, k, v, lk)
    assert torch.equal(seen[True], seen[False])
    assert torch.equal(seen[True], chunked._exclusive_chunk_max(lk.reshape(2, 330).contiguous(), 6))
    if seg is None:
        assert chunked.segment_len(6, 2) == 6 and torch.equal(own, launched)
    else:
        assert max_err(own, launched) <= 1e-5 * launched.abs().max().item()


@pytest.mark.parametrize("t", [1, 130, 64 * 70 + 5])
def test_exclusive_chunk_maxima(interpreted, t):
    """P_c = the max of b over the keys before chunk c (P_0 = -inf) from the one-launch kernel, against PyTorch's
    pad / amax / cummax: a partial last chunk, keys at -inf (ignored keys), a whole chunk of them, and more chunks than
    one step of the kernel takes (71 > 64: the running max carried across steps). A max that skipped the previous
    steps, or an inclusive P, fails it."""
    g = torch.Generator().manual_seed(t)
    b = torch.randn(3, t, generator=g) * 5
    b[1, ::3] = float("-inf")
    b[2, : min(t, 64)] = float("-inf")
    n = -(-t // 64)
    padded = torch.nn.functional.pad(b, (0, n * 64 - t), value=float("-inf"))
    want = torch.nn.functional.pad(padded.reshape(3, n, 64).amax(-1).cummax(-1).values, (1, 0), value=float("-inf"))
    got = interpreted._exclusive_chunk_max(b.contiguous(), n)
    assert got.shape == (3, n + 1) and torch.equal(got, want)


def test_segment_length_choice():
    from attnlab.ops.linear_triton import segment_len

    assert segment_len(4) == 4 and segment_len(8, 24) == 8  # short: one segment
    assert segment_len(16, 24) == 2 and segment_len(64, 18) == 4  # sqrt(n / 4)
    assert segment_len(1024, 18) == 35 and segment_len(256, 72) == 35  # ~4 programs per SM
    assert segment_len(16, 72) == 16  # half the GPU's walks, 16 chunks: one segment
    assert segment_len(1024, 128) == 1024  # the walks alone nearly fill the GPU: one segment


@pytest.mark.parametrize("bv", [16, 32, 64])
def test_segments_do_not_depend_on_the_value_columns(chunked, bv, monkeypatch):
    """`segment_len` weighs the walks in 32-column units (`walk_count`), the unit its rule was measured in, whatever
    value columns a program takes (`STATE_BV` / `state_bv`): the forward's and the backward's walks ask it about the
    same count at every width (FAVOR+-like 96 features, values 64 wide, 2 kv heads: 2 x 2 x 2 = 8 walks)."""
    monkeypatch.setattr(chunked, "STATE_BV", bv)
    asked = []
    real = chunked.segment_len
    monkeypatch.setattr(chunked, "segment_len",
                        lambda n, programs=1, sms=132: asked.append(programs) or real(n, programs, sms))
    q, k, v, lk = _features(1, 2, 150, 96, 64, torch.float32, seed=3, scale=True)
    ins = [x.requires_grad_(True) for x in (q, k, v, lk)]
    torch.autograd.grad(chunked.causal_linear(*ins).sum(), ins)
    assert chunked.walk_count(96, 64, 2) == 8 and asked == [8, 8]


def test_short_inputs_take_the_parallel_pass(interpreted, monkeypatch):
    """Up to `parallel_max_t` tokens the forward is one quadratic pass (no state walk launched), beyond it the
    chunked passes; both give the same outputs and the same DEN (the backward's input) within fp32 rounding."""
    monkeypatch.setattr(interpreted, "PARALLEL_MAX_T", None)
    assert interpreted.parallel_max_t(64) == 1024 and interpreted.parallel_max_t(256) == 0  # FAVOR+: chunked
    walks = []
    real = interpreted._states
    monkeypatch.setattr(interpreted, "_states", lambda *a, **kw: walks.append(1) or real(*a, **kw))
    q, k, v, lk = _features(1, 2, 200, 32, 16, torch.float32, seed=9, scale=True)
    monkeypatch.setattr(interpreted, "PARALLEL_MAX_T", 199)
    chunk_out, saved, *_ = interpreted._forward(q, k, v, lk)
    assert walks == [1]
    monkeypatch.setattr(interpreted, "PARALLEL_MAX_T", 200)
    assert interpreted.parallel_max_t(interpreted.PARALLEL_MAX_F + 1) == 0  # one tile holds every feature: wider, chunked
    par_out, par_saved, *_ = interpreted._forward(q, k, v, lk)
    assert walks == [1]  # no state walk
    assert max_err(par_out, chunk_out) <= 1e-5 * chunk_out.abs().max().item()
    den, par_den = saved[6], par_saved[6]  # DEN, whose M_i must agree
    assert max_err(par_den, den) <= 1e-5 * den.abs().max().item()
    assert par_saved[7] is None and saved[7] is not None  # the states: only the chunked passes write them
    # the backward: two quadratic passes up to the same length (and F <= PARALLEL_BWD_MAX_F), the chunked walks
    # beyond; the same gradients (GQA: 4 query heads on 2 kv heads, key log-scales)
    g = torch.Generator().manual_seed(4)
    ins = [torch.rand(1, 4, 200, 32, generator=g), torch.rand(1, 2, 200, 32, generator=g),
           torch.randn(1, 2, 200, 16, generator=g), torch.randn(1, 2, 200, generator=g) * 4]
    w = torch.randn(1, 4, 200, 16, generator=g)
    got = {}
    for limit in (199, 200):
        monkeypatch.setattr(interpreted, "PARALLEL_MAX_T", limit)
        xs = [x.clone().requires_grad_(True) for x in ins]
        walks.clear()
        got[limit] = torch.autograd.grad((interpreted.causal_linear(*xs) * w).sum(), xs)
        assert walks == ([] if limit == 200 else [1])  # the forward's (the backward reads its states), or none
    for name, a, b in zip("q k v b".split(), got[200], got[199]):
        assert max_err(a, b) <= 1e-4 * b.abs().max().item(), name


def test_the_rule_takes_the_chunked_form_with_gradients(interpreted, monkeypatch):
    """`parallel_max_t`'s rule: 64 features or fewer take the quadratic pass up to PARALLEL_INFER_MAX_T tokens
    without gradients (inference) and up to the shorter PARALLEL_GRAD_MAX_T when a backward follows (the chunked
    backward measured faster beyond), whichever of q, k, v or the log-scales asks for gradients; PARALLEL_MAX_T
    overrides both. The limits are set around the 200 tokens here."""
    monkeypatch.setattr(interpreted, "PARALLEL_MAX_T", None)
    assert interpreted.PARALLEL_GRAD_MAX_T < interpreted.PARALLEL_INFER_MAX_T
    assert interpreted.parallel_max_t(64, grad=True) == interpreted.PARALLEL_GRAD_MAX_T
    assert interpreted.parallel_max_t(65, grad=True) == interpreted.parallel_max_t(65) == 0
    monkeypatch.setattr(interpreted, "PARALLEL_GRAD_MAX_T", 199)
    monkeypatch.setattr(interpreted, "PARALLEL_INFER_MAX_T", 200)
    assert interpreted.parallel_max_t(32) == 200 and interpreted.parallel_max_t(32, grad=True) == 199
    walks, par_bwd = [], []
    real, real_pb = interpreted._states, interpreted._parallel_backward
    monkeypatch.setattr(interpreted, "_states", lambda *a, **kw: walks.append(1) or real(*a, **kw))
    monkeypatch.setattr(interpreted, "_parallel_backward", lambda *a, **kw: par_bwd.append(1) or real_pb(*a, **kw))
    g = torch.Generator().manual_seed(5)
    ins = [torch.rand(1, 4, 200, 32, generator=g), torch.rand(1, 2, 200, 32, generator=g),
           torch.randn(1, 2, 200, 16, generator=g), torch.randn(1, 2, 200, generator=g) * 4]
    with torch.no_grad():
        ref = interpreted.causal_linear(*ins)
    assert walks == []  # inference: the quadratic pass
    for i in range(4):  # gradients for one input only are enough to take the chunked form
        xs = [x.clone().requires_grad_(j == i) for j, x in enumerate(ins)]
        walks.clear()
        out = interpreted.causal_linear(*xs)
        assert walks == [1], i
        assert max_err(out, ref) <= 1e-5 * ref.abs().max().item()
        out.sum().backward()
        assert par_bwd == [] and xs[i].grad is not None
    with torch.no_grad():  # inputs that ask for gradients under no_grad: inference
        walks.clear()
        interpreted.causal_linear(*[x.clone().requires_grad_(True) for x in ins])
        assert walks == []
    monkeypatch.setattr(interpreted, "PARALLEL_GRAD_MAX_T", 200)  # up to the limit: the parallel passes with gradients
    xs = [x.clone().requires_grad_(True) for x in ins]
    walks.clear()
    interpreted.causal_linear(*xs).sum().backward()
    assert walks == [] and par_bwd == [1]
    monkeypatch.setattr(interpreted, "PARALLEL_GRAD_MAX_T", 199)
    monkeypatch.setattr(interpreted, "PARALLEL_MAX_T", 1 << 30)  # the override: the parallel passes with gradients
    xs = [x.clone().requires_grad_(True) for x in ins]
    walks.clear()
    interpreted.causal_linear(*xs).sum().backward()
    assert walks == [] and par_bwd == [1, 1]


@pytest.mark.parametrize("method,opts", [("linear", {}), ("performer", {"num_features": 48}), ("rfa", {"num_features": 48})])
@pytest.mark.parametrize("dtype,hkv", [(torch.float32, 2), (torch.bfloat16, 2), (torch.float32, 1)],
                         ids=["fp32", "bf16", "fp32-gqa"])
def test_methods_run_the_kernels_and_match(kernels, method, opts, dtype, hkv, monkeypatch):
    # each path's output and gradients vs the fp64 quadratic form: the kernels' error at most 2x the larger of
    # the PyTorch path's and the quadratic form's in the same dtype (rfa's normalisers cancel: its gradients
    # reach 1e5 here, so two exact-order paths differ by more than a fixed fraction; the yardsticks scale).
    # GQA (2 query heads, 1 kv head): a map shared by the heads hands the kernels the kv head's features unexpanded
    q, k, v = rand_qkv(b=2, h=2, hkv=hkv, tq=80, d=16, dtype=dtype, seed=3)
    m = make(method, q, k, backend="triton", **opts)
    eager = make(method, q, k, backend="eager", **opts)
    seen = []
    real = kernels.causal_linear
    monkeypatch.setattr(kernels, "causal_linear", lambda *a, **kw: seen.append(a[1].shape[1]) or real(*a, **kw))

    def run(*a):
        return m(*a, causal=True)[0]

    def quad(*a):
        return m(*a, causal=True, need_probs=True)[0]

    truth = quad(q.double(), k.double(), v.double())
    g_truth = grads(quad, q.double(), k.double(), v.double())
    out = run(q, k, v)
    assert m.kernel.startswith("triton")
    check_vs_quadratic(out, q, k, v, m, causal=True)
    g_kernel = grads(run, q, k, v)

    def run_torch(*a):
        return eager(*a, causal=True)[0]

    torch_out, g_torch = run_torch(q, k, v), grads(run_torch, q, k, v)
    assert eager.kernel == "chunked"
    if m.kernel == "triton+favor":  # bf16 FAVOR+ in the chunked form: the one node (ops/performer_triton.py), which
        assert seen == []  # maps the kv heads' keys itself and calls the kernels' pieces, not causal_linear
    else:
        assert set(seen) == {hkv if m.maps()[1].head_shared else 2}, seen
    low_out, g_low = quad(q, k, v), grads(quad, q, k, v)
    rel = 1e-4 if dtype == torch.float32 else 1e-3  # of the largest true value: a real bug is O(1)
    for got, other, low, t in zip([out, *g_kernel], [torch_out, *g_torch], [low_out, *g_low], [truth, *g_truth]):
        assert max_err(got, t) <= 2 * max(max_err(other, t), max_err(low, t)) + rel * t.abs().max().item()


@pytest.mark.parametrize("method", ["linear", "performer"])
def test_padding_and_all_masked_rows(kernels, method):
    q, k, v = rand_qkv(b=3, h=2, tq=70, d=16, seed=4)
    lens = [70, 33, 0]  # row 2: every key padded -> zeros and finite gradients
    kpm = torch.arange(70)[None, :] < torch.tensor(lens)[:, None]
    pad = ~kpm[:, None, :, None]
    k, v = k.masked_fill(pad, 1e3), v.masked_fill(pad, 1e3)  # garbage in padded slots must not matter
    m = make(method, q, k, backend="triton", **({"num_features": 32} if method == "performer" else {}))
    out, _ = m(q, k, v, causal=True, key_padding_mask=kpm)
    assert m.kernel.startswith("triton")
    check_vs_quadratic(out, q, k, v, m, causal=True, key_padding_mask=kpm)
    assert (out[2] == 0).all()
    g = grads(lambda *a: m(*a, causal=True, key_padding_mask=kpm)[0], q, k, v)
    assert all(torch.isfinite(x).all() for x in g)
    assert all((x[2] == 0).all() for x in g)


def test_shapes_the_kernels_cannot_take_are_refused_when_asked_and_named_under_auto(kernels):
    """backend="triton" refuses, before compute, what the kernels cannot take; "auto" runs the PyTorch form there
    (the same maths) and says so in `kernel`."""
    import attnlab

    q, k, v = rand_qkv(b=1, h=2, tq=20, d=8)  # D = 8: below the kernels' 16-wide tiles
    with pytest.raises(attnlab.UnsupportedError, match="head dims 16..128"):
        make("linear", q, k, backend="triton")(q, k, v, causal=True)
    q, k, v = rand_qkv(b=1, h=2, tq=5, tk=20, d=16)  # Tq != Tk (decode)
    with pytest.raises(attnlab.UnsupportedError, match="Tq == Tk"):
        make("linear", q, k, backend="triton")(q, k, v, causal=True)
    m = make("linear", q, k)
    out = m(q, k, v, causal=True)[0]
    assert m.kernel == "chunked"
    check_vs_quadratic(out, q, k, v, m, causal=True)


def test_shape_only_tables_are_built_once_and_left_untouched(kernels):
    """Maps without key log-scales share one (b = 0, chunk maxima) pair per shape across layers and calls: the
    second call must reuse it, and neither a forward nor a backward may write into it."""
    kernels.no_scale_tables.cache_clear()
    q, k, v, _ = _features(1, 2, 130, 32, 16, torch.float32, seed=3, scale=False)
    first = _kernel_out(kernels, q, k, v, None)
    lkf, pex = kernels.no_scale_tables(2, 130, 3, q.device)
    want_lkf, want_pex = lkf.clone(), pex.clone()
    assert torch.equal(want_pex, torch.tensor([[float("-inf"), 0.0, 0.0, 0.0]] * 2))
    for x in (q, k, v):
        x.requires_grad_(True)
    again = _kernel_out(kernels, q, k, v, None)
    again.sum().backward()
    assert torch.equal(again.detach(), first)
    assert kernels.no_scale_tables(2, 130, 3, q.device)[0] is lkf
    assert kernels.no_scale_tables.cache_info().currsize == 1
    assert torch.equal(lkf, want_lkf) and torch.equal(pex, want_pex)
    kernels.no_scale_tables(2, 64, 1, q.device)  # another shape: its own entry
    assert kernels.no_scale_tables.cache_info().currsize == 2


@pytest.mark.parametrize("fmap", ["elu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_map_applied_in_the_kernels(kernels, fmap, dtype):
    """feature_map= maps raw q and k inside the kernels: the same output as mapping them first (130 tokens: a partial
    last chunk; GQA with 2 kv heads), and it is refused with key log-scales or for an unknown map."""
    from attnlab.feature_maps import ELU, ReLU

    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 130, 32, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 130, 32, generator=g).to(dtype) for _ in range(2))
    m = ELU() if fmap == "elu" else ReLU()
    with torch.no_grad():
        want = kernels.causal_linear(m(q, scale=1.0, is_query=True)[0], m(k, scale=1.0, is_query=False)[0], v)
        got = kernels.causal_linear(q, k, v, feature_map=fmap)
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7
    assert max_err(got, want) <= tol * want.abs().max().item()
    assert not torch.equal(got, kernels.causal_linear(q, k, v))  # the map matters (relu: negative parts dropped)
    with torch.no_grad(), pytest.raises(ValueError, match="log-scales"):
        kernels.causal_linear(q, k, v, torch.zeros(2, 2, 130), feature_map=fmap)
    with torch.no_grad(), pytest.raises(ValueError, match="one of"):
        kernels.causal_linear(q, k, v, feature_map="favor")


@pytest.mark.parametrize("fmap", ["elu", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_map_gradients_in_the_kernels(kernels, fmap, dtype):
    """With gradients, feature_map= keeps q and k raw (the forward's kernels map them on load), the backward maps them
    once (`_map_features`) and its kernels apply the map's slope to dq and dk: the raw q's, k's and v's gradients equal
    autograd's through the PyTorch map then the kernels (GQA, 4 query heads
    on 2 kv heads: dk sums the group's; 130 tokens: a partial last chunk; q and k both signs, so both branches of
    elu's derivative and relu's zeros are taken). fp32 to 1e-5, bf16 to the kernels' own rounding."""
    from attnlab.feature_maps import ELU, ReLU

    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 130, 32, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 130, 32, generator=g).to(dtype) for _ in range(2))
    m = ELU() if fmap == "elu" else ReLU()

    def mapped_first(q, k, v):
        return kernels.causal_linear(m(q, scale=1.0, is_query=True)[0], m(k, scale=1.0, is_query=False)[0], v)

    want = grads(mapped_first, q, k, v)
    got = grads(lambda q, k, v: kernels.causal_linear(q, k, v, feature_map=fmap), q, k, v)
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -6
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert max_err(a, b) <= tol * b.abs().max().item(), (name, max_err(a, b), b.abs().max().item())
    assert (q < 0).any() and (k < 0).any()


def test_linear_maps_in_the_kernels_unless_padded(kernels, monkeypatch):
    """A linear layer (backend="triton") runs "triton+map" with and without gradients, with the same output and
    gradients as the eager PyTorch form; with a padding mask (padded keys must become zero features), or with
    gradients when `MAP_WITH_GRAD` is off, it maps first."""
    q, k, v = rand_qkv(b=2, h=4, hkv=2, tq=70, d=16, seed=8)
    m = make("linear", q, k, backend="triton")
    ref = make("linear", q, k, backend="eager")
    with torch.no_grad():
        fused = m(q, k, v, causal=True)[0]
        assert m.kernel == "triton+map"
        kpm = torch.ones(2, 70, dtype=torch.bool)
        kpm[1, 50:] = False
        m(q, k, v, causal=True, key_padding_mask=kpm)
        assert m.kernel.startswith("triton+compiled") or m.kernel == "triton"
    got = grads(lambda q, k, v: m(q, k, v, causal=True)[0], q, k, v)
    assert m.kernel == "triton+map"
    want = grads(lambda q, k, v: ref(q, k, v, causal=True)[0], q, k, v)
    for a, b in zip(got, want):
        assert max_err(a, b) <= 1e-5 * b.abs().max().item()
    check_vs_quadratic(fused, q.detach(), k, v, m, causal=True)
    monkeypatch.setattr(kernels, "MAP_WITH_GRAD", False)  # the switch short_calls.py's linear+premap measures
    premapped = grads(lambda q, k, v: m(q, k, v, causal=True)[0], q, k, v)
    assert m.kernel != "triton+map"
    for a, b in zip(premapped, want):
        assert max_err(a, b) <= 1e-5 * b.abs().max().item()


@pytest.mark.parametrize("bn", [32, 128])
@pytest.mark.parametrize("scale", [False, True], ids=["plain", "log-scale"])
def test_parallel_pass_key_tiles_other_than_its_query_blocks(interpreted, monkeypatch, bn, scale):
    """The parallel pass walks key tiles of CONFIG["parallel"]["BN"] (unmasked below a query block's first row, masked
    from there): tiles half and twice the 64-row query blocks give the quadratic form's output and DEN, with key
    log-scales (-inf ones among them) and 4 query heads on 2 kv heads, 200 tokens (a partial last tile)."""
    from attnlab.methods.base import repeat_kv

    monkeypatch.setattr(interpreted, "PARALLEL_MAX_T", 1 << 30)
    monkeypatch.setitem(interpreted.CONFIG, "parallel", dict(interpreted.CONFIG["parallel"], BN=bn))
    g = torch.Generator().manual_seed(17)
    q = torch.rand(1, 4, 200, 32, generator=g)
    k = torch.rand(1, 2, 200, 32, generator=g)
    v = torch.randn(1, 2, 200, 16, generator=g)
    lk = None
    if scale:
        lk = torch.randn(1, 2, 200, generator=g) * 4
        lk[0, 0, 70:75] = float("-inf")
    out, saved, *_ = interpreted._forward(q, k, v, lk)
    want = _quadratic(q.double(), repeat_kv(k.double(), 2), repeat_kv(v.double(), 2),
                      None if lk is None else repeat_kv(lk.double()[..., None], 2)[..., 0])
    assert max_err(out, want) <= 1e-5 * want.abs().max().item()
    monkeypatch.setitem(interpreted.CONFIG, "parallel", dict(interpreted.CONFIG["parallel"], BN=64))
    den64 = interpreted._forward(q, k, v, lk)[1][6]  # DEN
    assert max_err(saved[6], den64) <= 1e-5 * den64.abs().max().item()


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("scale", [False, True], ids=["plain", "log-scale"])
def test_chunked_backward_reads_the_forwards_states(chunked, hkv, scale, monkeypatch):
    """The chunked backward reads the states the forward wrote (per kv head: query head h reads row h // G) instead
    of walking the chunks again: no second state walk, and gradients bit-identical to the recomputed states' (the
    same kernel on the same keys and values), GQA and key log-scales included."""
    g = torch.Generator().manual_seed(21)
    ins = [torch.rand(2, 4, 150, 32, generator=g), torch.rand(2, hkv, 150, 32, generator=g),
           torch.randn(2, hkv, 150, 16, generator=g)]
    ins.append(torch.randn(2, hkv, 150, generator=g) * 4 if scale else None)
    w = torch.randn(2, 4, 150, 16, generator=g)
    walks = []
    real_states, real_backward = chunked._states, chunked._chunked_backward
    monkeypatch.setattr(chunked, "_states", lambda *a, **kw: walks.append(a[0].shape) or real_states(*a, **kw))

    def grads_of():
        xs = [x if x is None else x.clone().requires_grad_(True) for x in ins]
        out = chunked.causal_linear(*xs)
        return torch.autograd.grad((out * w).sum(), [x for x in xs if x is not None])

    kept = grads_of()
    assert len(walks) == 1  # the forward's walk only
    monkeypatch.setattr(chunked, "_chunked_backward", lambda *a, **kw: real_backward(*a[:9], **kw))  # states dropped
    walks.clear()
    recomputed = grads_of()
    assert len(walks) == 2
    for name, a, b in zip("q k v b".split(), kept, recomputed):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("hkv", [4, 2], ids=["mha", "gqa"])
def test_parallel_forward_with_the_chunked_backward(interpreted, hkv, monkeypatch):
    """Features wider than PARALLEL_BWD_MAX_F: the parallel forward (which keeps no chunk maxima) followed by the
    chunked backward (which must build them): gradients equal to the chunked form's, key log-scales included (-inf
    keys among them), batch 2 with v in transformers' layout (its states rebuilt from v read where it lies)."""
    g = torch.Generator().manual_seed(13)
    f = interpreted.PARALLEL_BWD_MAX_F + 32
    ins = [torch.rand(2, 4, 100, f, generator=g), torch.rand(2, hkv, 100, f, generator=g),
           torch.randn(2, 100, hkv, 16, generator=g).transpose(1, 2), torch.randn(2, hkv, 100, generator=g) * 4]
    ins[3][:, :, ::7] = float("-inf")
    w = torch.randn(2, 4, 100, 16, generator=g)
    got = {}
    for limit in (0, 1 << 30):
        monkeypatch.setattr(interpreted, "PARALLEL_MAX_T", limit)
        xs = [x.clone().requires_grad_(True) for x in ins]
        got[limit] = torch.autograd.grad((interpreted.causal_linear(*xs) * w).sum(), xs)
    for name, a, b in zip("q k v b".split(), got[1 << 30], got[0]):
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a)), name
        assert max_err(a[fin], b[fin]) <= 1e-4 * b[fin].abs().max().item(), name
    assert got[1 << 30][2].transpose(1, 2).is_contiguous()  # dv in v's layout
