"""lsh with backend="triton" (`ops.lsh_triton`), run on CPU by Triton's interpreter.

Checked against test_lsh's independent references: `loop_lsh` (a per-query fp64 transcription of hash, sort,
chunk, look one back, combine rounds) with several buckets, and the dense references in the exact limit (one
bucket); gradients against the PyTorch form (`backend="eager"`, itself held to the references by test_lsh), shared
and separate QK, causal and not, several rounds, T not a multiple of the bucket, key padding with a fully padded row
(zeros, no NaN), bf16, bit-exact causal no-leak, and the clear refusals. The same kernels run compiled on CUDA
(benchmarks/gpu_checks.py checks them there).
"""
from __future__ import annotations

import pytest
import torch

from attnlab import UnsupportedError
from tests.helpers import assert_matches_reference, make, max_err, rand_qkv
from tests.methods.test_window_triton import pytestmark  # noqa: F401 (the interpreter's marks)

from tests.methods.test_lsh import assert_shared_rule, loop_lsh

CASES = [  # (t, bucket_size, n_hashes, shared_qk, causal)
    (48, 8, 2, False, False),
    (48, 8, 2, True, True),
    (45, 8, 3, False, True),  # T not a multiple of the bucket: the last chunk padded inside
    (37, 16, 1, True, False),
    (40, 4, 2, False, False),  # 10 chunks of 4 (a 16-row tile, 12 rows masked)
]


@pytest.mark.parametrize("t,bucket,n_hashes,shared,causal", CASES)
def test_several_buckets_match_the_loop_transcription(t, bucket, n_hashes, shared, causal):
    q, k, v = rand_qkv(b=2, h=2, tq=t, d=16, seed=t + bucket)
    kpm = torch.ones(2, t, dtype=torch.bool)
    kpm[1, -5:] = False
    m = make("lsh", q, k, bucket_size=bucket, n_hashes=n_hashes, shared_qk=shared, backend="triton")
    out = m(q, k, v, causal=causal, key_padding_mask=kpm).out
    assert m.kernel == "triton"
    want, _ = loop_lsh(m, q, k, v, causal=causal, key_padding_mask=kpm)
    assert max_err(out, want) < 1e-5


@pytest.mark.parametrize("t,bucket,n_hashes,shared,causal", CASES)
def test_gradients_match_the_pytorch_form(t, bucket, n_hashes, shared, causal):
    q, k, v = rand_qkv(b=2, h=2, tq=t, d=16, seed=3 * t + bucket)
    kpm = torch.ones(2, t, dtype=torch.bool)
    kpm[0, -6:] = False
    w = torch.randn(2, 2, t, 16, generator=torch.Generator().manual_seed(1))
    got = []
    for backend in ("triton", "eager"):
        m = make("lsh", q, k, bucket_size=bucket, n_hashes=n_hashes, shared_qk=shared, backend=backend)
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        (m(qq, kk, vv, causal=causal, key_padding_mask=kpm).out * w).sum().backward()
        got.append((qq.grad, kk.grad, vv.grad))
    for name, a, b in zip("qkv", *got):
        if shared and name == "k":
            assert a is None or not a.any()  # k is ignored with shared QK
            continue
        assert max_err(a, b) < 2e-5 * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_one_bucket_is_dense_attention(shared, causal):
    """The exact limit (bucket_size >= T: one bucket, one chunk; the chunk of 40 in a 64-row tile)."""
    q, k, v = rand_qkv(b=2, h=3, tq=40, d=16, seed=7)
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[1, 30:] = False
    m = make("lsh", q, k, bucket_size=64, n_hashes=2, shared_qk=shared, backend="triton")
    out = m(q, k, v, causal=causal, key_padding_mask=kpm).out
    if shared:
        assert_shared_rule(out, q, v, causal=causal, key_padding_mask=kpm)
    else:
        assert_matches_reference(out, q, k, v, causal=causal, key_padding_mask=kpm)


def test_fully_padded_row_is_zero_with_finite_gradients():
    q, k, v = rand_qkv(b=2, h=2, tq=32, d=16, seed=2, requires_grad=True)
    kpm = torch.ones(2, 32, dtype=torch.bool)
    kpm[0] = False  # no key at all in the first sequence
    m = make("lsh", q, k, bucket_size=8, shared_qk=False, backend="triton")
    out = m(q, k, v, key_padding_mask=kpm).out
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    out.sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.isfinite(g).all() and not g[0].any()


def test_bf16_close_to_fp32():
    q, k, v = rand_qkv(b=1, h=2, tq=64, d=32, seed=4)
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        m = make("lsh", q, k, bucket_size=16, shared_qk=False, backend="triton")
        outs.append(m(q.to(dtype), k.to(dtype), v.to(dtype), causal=True).out.float())
    # the same buckets (hashed in fp32 from the bf16-rounded inputs: a token or two may move bucket)
    assert (outs[0] - outs[1]).abs().mean() < 2e-2


@pytest.mark.parametrize("shared", [False, True])
def test_causal_no_leak_bit_exact(shared):
    """Changing future values (which moves no bucket) leaves every earlier output bit-identical."""
    q, k, v = rand_qkv(b=1, h=2, tq=48, d=16, seed=9)
    m = make("lsh", q, k, bucket_size=8, n_hashes=2, shared_qk=shared, backend="triton")
    out = m(q, k, v, causal=True).out
    v2 = v.clone()
    v2[:, :, 30:] += 1.0
    out2 = m(q, k, v2, causal=True).out
    assert torch.equal(out[:, :, :30], out2[:, :, :30])
    assert not torch.equal(out[:, :, 30:], out2[:, :, 30:])


def test_refusals_are_one_clear_line():
    q, k, v = rand_qkv(b=1, h=1, tq=300, d=16)
    with pytest.raises(UnsupportedError, match="chunks of up to 128"):
        make("lsh", q, k, bucket_size=256, backend="triton")(q, k, v)
    q2, k2, v2 = rand_qkv(b=1, h=1, tq=300, d=128)
    with pytest.raises(UnsupportedError, match="fp32 with head_dim > 64 takes chunks of up to 64"):
        make("lsh", q2, k2, bucket_size=128, backend="triton")(q2, k2, v2)
    m = make("lsh", q, k, bucket_size=32, backend="triton")
    with pytest.raises(UnsupportedError, match="need_probs"):
        m(q, k, v, need_probs=True)
    with pytest.raises(UnsupportedError, match="fp32, bf16 and fp16"):
        m(q.double(), k.double(), v.double())


def test_auto_keeps_the_pytorch_form_on_cpu():
    q, k, v = rand_qkv(b=1, h=1, tq=32, d=16)
    m = make("lsh", q, k, bucket_size=8)
    m(q, k, v)
    assert m.kernel == "chunked"


@pytest.mark.parametrize("dtype,split", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_hash_kernel_gives_the_pytorch_hash_and_sort(dtype, split):
    """`lsh_triton.hash_sort` (projections, argmax over [xR, -xR] and the sort key in one kernel) against `_hash` + argsort:
    the same order and sorted buckets, with 75 rotations per round (two column blocks of the kernel), all-zero rows
    (ties everywhere: bucket 0, as argmax's first index) and internal padding (T = 297 in chunks of 2). split: the
    GPU's three-part projection of bf16 inputs (w = hi + mid + lo in bf16), its parts multiplied exactly here."""
    from attnlab.ops.lsh_triton import hash_sort

    x = torch.randn(1, 2, 297, 16, generator=torch.Generator().manual_seed(8)).to(dtype)
    x[:, :, :5] = 0.0
    m = make("lsh", x, x, bucket_size=2, n_hashes=2)
    nb, tp = m.n_buckets(297), 298
    assert nb // 2 > 64
    bkt = m._hash(x, nb, tp)
    order = (bkt * tp + torch.arange(tp)).argsort(dim=-1)
    got_order, got_sbkt = hash_sort(x, m.rotations(nb, x.device, torch.float32), nb, tp, split=split)
    assert torch.equal(got_order, order)
    assert torch.equal(got_sbkt, bkt.gather(-1, order))
    assert (bkt[..., :5] == 0).all() and (bkt[..., 297:] == nb).all()
