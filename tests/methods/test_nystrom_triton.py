"""nystrom with backend="triton" (`ops.nystrom_triton`), run on CPU by Triton's interpreter.

Against the PyTorch form (`backend="torch"`, held to the dense reference and the paper's maths by test_nystrom):
outputs and gradients with equal and unequal segments, key padding that empties a landmark and a whole batch row
(zeros, no NaN), the split-K passes over several programs (T past one split), both precisions, bf16; the exact limit
against the dense reference; and the clear refusals.
"""
from __future__ import annotations

import pytest
import torch

from attnlab import UnsupportedError
from tests.helpers import assert_matches_reference, make, max_err, rand_qkv
from tests.methods.test_window_triton import pytestmark  # noqa: F401 (the interpreter's marks)


def _run(backend, q, k, v, kpm, w, **opts):
    m = make("nystrom", q, k, backend=backend, **opts)
    qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
    out = m(qq, kk, vv, key_padding_mask=kpm).out
    (out.float() * w).sum().backward()
    return m.kernel, out.detach().float(), [x.grad.float() for x in (qq, kk, vv)]


CASES = [  # (t, landmarks, pad)
    (64, 8, False),  # equal segments, no padding
    (70, 8, True),  # unequal segments and padding
    (1100, 16, False),  # past one split of the keys / rows (several programs' partials summed)
]


@pytest.mark.parametrize("t,landmarks,pad", CASES)
@pytest.mark.parametrize("precision", ["fp32", "input"])
def test_matches_the_pytorch_form_with_gradients(t, landmarks, pad, precision):
    q, k, v = rand_qkv(b=2, h=2, tq=t, d=16, seed=t)
    kpm = None
    if pad:
        kpm = torch.ones(2, t, dtype=torch.bool)
        kpm[0, -20:] = False  # the last landmark of the first row holds no real token
        kpm[1] = False  # no real key at all
    w = torch.randn(2, 2, t, 16, generator=torch.Generator().manual_seed(2))
    kern, out, g = _run("triton", q, k, v, kpm, w, num_landmarks=landmarks, precision=precision)
    _, ref, gref = _run("torch", q, k, v, kpm, w, num_landmarks=landmarks, precision=precision)
    assert kern == "triton"
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in g)
    assert max_err(out, ref) < 1e-5 * max(1.0, ref.abs().max().item())
    for name, a, b in zip("qkv", g, gref):
        assert max_err(a, b) < 1e-4 * max(1.0, b.abs().max().item()), name
    if pad:
        assert not out[1].any() and not g[0][1].any()


def test_bf16_close_to_the_pytorch_form(monkeypatch):
    """bf16 inputs against the PyTorch form (fp32 inside), with the kernels' fp32 dots and with the GPU's split products
    (bf16 hi + lo parts of every fp32 operand, `nystrom_triton._mm`; the parts multiplied exactly here): the split is
    as close as the fp32 dots (measured equal; keeping only the hi parts doubles the output's error and triples the
    gradients')."""
    from attnlab.ops import nystrom_triton

    q, k, v = (x.bfloat16() for x in rand_qkv(b=1, h=2, tq=1100, d=32, seed=5))
    w = torch.randn(1, 2, 1100, 32, generator=torch.Generator().manual_seed(3))
    _, ref, gref = _run("torch", q, k, v, None, w, num_landmarks=16)
    errs = {}
    for split in (False, True):
        monkeypatch.setattr(nystrom_triton, "FORCE_SPLIT", split)
        kern, out, g = _run("triton", q, k, v, None, w, num_landmarks=16)
        assert kern == "triton"
        errs[split] = [max_err(out, ref) / ref.abs().max().item()] + [
            max_err(a, b) / b.abs().max().item() for a, b in zip(g, gref)]
    assert max(errs[False]) < 1e-2  # the outputs and gradients rounded to bf16, in different orders
    for e_split, e_fp32 in zip(errs[True], errs[False]):
        assert e_split <= 1.25 * e_fp32 + 1e-6


def test_exact_limit_is_dense_attention():
    q, k, v = rand_qkv(b=2, h=2, tq=24, d=16, seed=1)
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[1, 18:] = False
    m = make("nystrom", q, k, num_landmarks=24, pinv="exact", backend="triton")
    out = m(q, k, v, key_padding_mask=kpm).out
    assert m.kernel == "triton"
    assert_matches_reference(out, q, k, v, key_padding_mask=kpm)


def test_refusals_are_one_clear_line():
    q, k, v = rand_qkv(b=1, h=1, tq=300, d=16)
    with pytest.raises(UnsupportedError, match="up to 128 landmarks"):
        make("nystrom", q, k, num_landmarks=256, backend="triton")(q, k, v)
    m = make("nystrom", q, k, num_landmarks=16, backend="triton")
    with pytest.raises(UnsupportedError, match="need_probs"):
        m(q, k, v, need_probs=True)
    with pytest.raises(UnsupportedError, match="fp32 and bf16"):
        m(q.half(), k.half(), v.half())
    q2, k2, v2 = rand_qkv(b=1, h=1, tq=300, d=128)
    with pytest.raises(UnsupportedError, match="head_dim > 64 takes up to 64 landmarks"):
        make("nystrom", q2, k2, num_landmarks=128, backend="triton")(q2, k2, v2)
    with pytest.raises(UnsupportedError, match="residual conv"):
        make("nystrom", q, k, num_landmarks=16, conv_kernel=3, backend="triton")(q, k, v)


def test_auto_keeps_the_pytorch_form_on_cpu():
    q, k, v = rand_qkv(b=1, h=1, tq=32, d=16)
    m = make("nystrom", q, k, num_landmarks=8)
    m(q, k, v)
    assert m.kernel == "torch"


@pytest.mark.parametrize("t,landmarks,pad,iters", [(64, 8, False, 6), (70, 12, True, 6), (1100, 16, False, 6),
                                                   (70, 12, True, 0), (40, 40, True, 3)])
def test_inference_solve_matches_the_autograd_path(t, landmarks, pad, iters, monkeypatch):
    """Without autograd, A, pinv(A) and X run as one kernel (`nystrom_triton.solve`): against the PyTorch ops between
    the two kernels (the path with gradients) and the PyTorch form; landmark counts that are not a power of two (the
    kernel's padded rows and columns must stay out of A and the pinv), an empty landmark, a fully padded row."""
    from attnlab.ops import nystrom_triton

    calls = []
    real_solve = nystrom_triton.solve
    monkeypatch.setattr(nystrom_triton, "solve", lambda *a, **kw: calls.append(1) or real_solve(*a, **kw))
    q, k, v = rand_qkv(b=2, h=2, tq=t, d=16, seed=t + landmarks)
    kpm = None
    if pad:
        kpm = torch.ones(2, t, dtype=torch.bool)
        kpm[0, -20:] = False
        kpm[1] = False
    opts = dict(num_landmarks=landmarks, pinv_iters=iters)
    with torch.no_grad():
        out = make("nystrom", q, k, backend="triton", **opts)(q, k, v, key_padding_mask=kpm).out
        ref = make("nystrom", q, k, backend="torch", **opts)(q, k, v, key_padding_mask=kpm).out
    assert calls == [1]
    qq = q.clone().requires_grad_(True)
    grad_path = make("nystrom", q, k, backend="triton", **opts)(qq, k, v, key_padding_mask=kpm).out.detach()
    for i in (1, 2):  # k or v alone asking for a gradient takes the autograd path too
        kv = [k, v]
        kv[i - 1] = kv[i - 1].clone().requires_grad_(True)
        out_kv = make("nystrom", q, k, backend="triton", **opts)(q, *kv, key_padding_mask=kpm).out
        assert out_kv.requires_grad
    assert calls == [1]  # the paths with gradients did not take it
    assert torch.isfinite(out).all()
    scale = max(1.0, ref.abs().max().item())
    assert max_err(out, grad_path) < 1e-5 * scale
    assert max_err(out, ref) < 1e-5 * scale
    if pad:
        assert not out[1].any()


def test_inference_past_the_solve_kernels_landmarks_runs_the_pytorch_ops(monkeypatch):
    """More than SOLVE_MAX_LANDMARKS landmarks (its one program's m x m tiles would need more shared memory than an
    H200 has: 288 KB at 128, compiled for sm_90) take the PyTorch ops between the kernels without autograd too."""
    from attnlab.ops import nystrom_triton

    calls = []
    real_solve = nystrom_triton.solve
    monkeypatch.setattr(nystrom_triton, "solve", lambda *a, **kw: calls.append(1) or real_solve(*a, **kw))
    q, k, v = rand_qkv(b=1, h=2, tq=200, d=16, seed=9)
    for m, expect in ((64, [1]), (100, [1])):
        with torch.no_grad():
            out = make("nystrom", q, k, num_landmarks=m, backend="triton")(q, k, v).out
            ref = make("nystrom", q, k, num_landmarks=m, backend="torch")(q, k, v).out
        assert calls == expect
        assert max_err(out, ref) < 1e-5 * max(1.0, ref.abs().max().item())
    with pytest.raises(ValueError, match="up to 64 landmarks"):
        real_solve(*(torch.zeros(1, 1, 65, 16),) * 3, torch.zeros(1, 1, 200, 16), torch.zeros(1, 1, 200, 16), None,
                   None, 6)
