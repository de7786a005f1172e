"""FAVOR+'s Triton feature map (`ops.favor_triton`), run on CPU by Triton's interpreter: the same features and
key log-scales as the fp32 PyTorch map (`feature_maps.favor_features`), gradients included, for bf16 and fp16."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from tests.helpers import max_err

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's CPU interpreter (conftest)"),
]

M, D = 96, 64  # two feature blocks of the kernel's 64, the second partial


@pytest.fixture(scope="module")
def ft():
    from attnlab.ops import favor_triton

    return favor_triton


@pytest.fixture(params=["one", "two"], ids=["one-sweep", "two-sweeps"])
def sweep(ft, request, monkeypatch):
    """Both forms of the forward: every feature in one tile (M = 96 <= ONE_SWEEP_MAX_M), or two sweeps of BM = 64
    features (the second block partial), as maps wider than ONE_SWEEP_MAX_M run (the backward walks BM-feature
    blocks in both)."""
    if request.param == "two":
        monkeypatch.setattr(ft, "ONE_SWEEP_MAX_M", 64)
    return request.param


def _inputs(dtype, seed=0, rows=70):
    from attnlab.feature_maps import orthogonal_gaussian

    g = torch.Generator().manual_seed(seed)
    feat = orthogonal_gaussian(M, D, g)
    x = (torch.randn(2, 3, rows, D, generator=g, dtype=torch.float64) * 1.5).to(dtype)  # |x.w| up to ~15
    return x, feat


def _ref(x, feat, scale):
    from attnlab.feature_maps import favor_features

    return favor_features(x, feat.to(x.dtype if x.dtype == torch.float64 else torch.float32) * math.sqrt(scale),
                          scale / 2, -0.5 * math.log(M))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_features_and_log_scales_match_the_fp32_map(ft, sweep, dtype):
    """Only the output's rounding to the half dtype may differ from fp64: the split hi + lo projection is as good as
    the fp32 GEMM (without lo, bf16 rounding of w moves x.w by ~0.05 and every feature by ~5%: this fails)."""
    scale = D ** -0.5
    x, feat = _inputs(dtype)
    phi, b = ft.favor_features(x, feat, math.sqrt(scale), scale / 2, -0.5 * math.log(M))
    phi64, b64 = _ref(x.double(), feat.double(), scale)
    phi32, b32 = _ref(x, feat, scale)  # the PyTorch map in this dtype: fp32 exponents, rounded output
    assert phi.dtype == dtype and b.dtype == torch.float32 and phi.shape == phi64.shape and b.shape == b64.shape
    assert max_err(phi, phi64) <= 1.01 * max_err(phi32, phi64)
    assert max_err(b, b64) <= 1e-5 * b64.abs().max().item()
    rel = ((phi.double() - phi64).abs() / phi64.clamp_min(1e-3)).max().item()
    assert rel <= (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10)  # within the dtype's rounding


def test_row_maxima_span_every_feature_block(ft, sweep):
    """A feature in the second block that is the largest: the row's max must include it (each row's largest feature
    is exactly exp(log_inv) = m^-1/2 before rounding); a per-block max would give the first block's rows a different
    scale and break that identity."""
    scale = D ** -0.5
    x, feat = _inputs(torch.bfloat16, seed=3)
    feat = feat.clone()
    feat[80] = x[0, 0, 5].float() * 4  # feature 80 (block 2) aligned with row 5 of the first head
    phi, b = ft.favor_features(x, feat, math.sqrt(scale), scale / 2, -0.5 * math.log(M))
    top = phi.float().amax(-1)
    assert torch.allclose(top, torch.full_like(top, M ** -0.5), rtol=2.0 ** -8)
    assert phi[0, 0, 5].float().argmax().item() == 80


@pytest.mark.parametrize("dtype,learn", [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, False)],
                         ids=["bf16-kernel", "bf16-trained", "fp16"])
def test_gradients_match_the_pytorch_map(ft, dtype, learn):
    """dx (and d(features) for a trained projection) vs autograd through the fp64 map; b carries none. bf16 with drawn
    features runs the backward kernel, the others the fp32 PyTorch form: both as accurate as dx's own rounding."""
    scale = D ** -0.5
    x, feat = _inputs(dtype, seed=1, rows=40)
    x.requires_grad_(True)
    feat = feat.requires_grad_(learn)
    phi, b = ft.favor_features(x, feat, math.sqrt(scale), scale / 2, -0.5 * math.log(M))
    assert not b.requires_grad
    w = torch.randn(phi.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = torch.autograd.grad((phi.double() * w).sum(), (x, feat) if learn else (x,))
    x64, f64 = x.detach().double().requires_grad_(True), feat.detach().double().requires_grad_(True)
    phi64, _ = _ref(x64, f64, scale)
    rx, rf = torch.autograd.grad((phi64 * w).sum(), (x64, f64))
    dx = got[0]
    assert dx.dtype == dtype
    rounding = max_err(rx.to(dtype), rx)  # dx's own rounding to the half dtype
    assert max_err(dx, rx) <= 2 * rounding + 1e-4 * rx.abs().max().item()
    if learn:
        assert got[1].dtype == torch.float32
        assert max_err(got[1], rf) <= 1e-2 * rf.abs().max().item()  # phi's rounding in the forward's output


def test_performer_runs_the_kernel_for_half_inputs_only(ft, monkeypatch):
    """A performer built with backend="triton" maps bf16 q and k with the kernel (the group's kv head once), fp32
    with the PyTorch map; CPU tensors without the interpreter never reach it (favor_triton_reasons)."""
    import attnlab
    from attnlab.feature_maps import favor_triton_reasons

    calls = []
    real = ft.favor_features
    monkeypatch.setattr(ft, "favor_features", lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 70, 32, generator=g)
    k, v = torch.randn(1, 2, 70, 32, generator=g), torch.randn(1, 2, 70, 32, generator=g)
    m = attnlab.make("performer", head_dim=32, num_heads=4, num_kv_heads=2, num_features=48, backend="triton")
    m(q, k, v, causal=True)
    assert calls == []
    out = m(*(t.bfloat16() for t in (q, k, v)), causal=True)[0]
    assert calls == [(1, 4, 70, 32), (1, 2, 70, 32)] and torch.isfinite(out.float()).all()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert favor_triton_reasons(q.bfloat16()) == ["the kernel needs a CUDA device"]
    assert "half-precision" in favor_triton_reasons(q)[-1]


def test_rows_read_where_they_lie_in_memory(ft, sweep):
    """q as transformers hands it over ([B, H, T, D] seen in [B, T, H, D] memory) is mapped where it lies: the same
    features and log-scales as a contiguous copy's (to fp32 rounding: a row's dots run in another block), phi and b
    contiguous [B, H, T, *] whatever x's layout (the rows the causal kernels' backward reads without a copy). The
    backward reads dphi with its strides and writes dx in x's layout (the caller's projection gets its gradient
    without a copy), the same gradient as the contiguous input's. Rows that do not lie densely (every other token)
    give the same result too. A wrong batch, head or token stride in either kernel reads other rows and fails."""
    scale = D ** -0.5
    consts = (math.sqrt(scale), scale / 2, -0.5 * math.log(M))
    x, feat = _inputs(torch.bfloat16, seed=3)
    held = x.transpose(1, 2).contiguous().transpose(1, 2)  # [2, 3, 70, D] values, [2, 70, 3, D] memory
    cycled = x.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # [70, 2, 3, D] memory
    sparse = torch.zeros(2, 3, 140, D, dtype=x.dtype)
    sparse[:, :, ::2] = x
    sparse = sparse[:, :, ::2]  # [2, 3, 70, D] values, every other row of a longer tensor
    want_phi, want_b = ft.favor_features(x, feat, *consts)
    w = torch.randn(want_phi.shape, generator=torch.Generator().manual_seed(2)).to(want_phi.dtype)
    x0 = x.detach().clone().requires_grad_(True)
    want_dx = torch.autograd.grad((ft.favor_features(x0, feat, *consts)[0] * w).float().sum(), x0)[0]
    for y in (held, cycled):  # rows in other blocks of the kernel: fp32 dots may round differently
        y = y.detach()
        phi, b = ft.favor_features(y, feat, *consts)
        assert phi.is_contiguous() and b.is_contiguous()
        assert max_err(b, want_b) <= 1e-6 * want_b.abs().max().item()
        assert max_err(phi, want_phi) <= 2.0 ** -8 * want_phi.abs().max().item()
        yg = y.requires_grad_(True)
        for wl in (w, w.transpose(1, 2).contiguous().transpose(1, 2)):  # dphi contiguous and in another layout
            dx = torch.autograd.grad((ft.favor_features(yg, feat, *consts)[0] * wl).float().sum(), yg)[0]
            assert max_err(dx, want_dx) <= 2.0 ** -7 * want_dx.abs().max().item()
        assert dx.stride() == y.stride()  # x's layout
    y = sparse.detach().requires_grad_(True)  # not dense: read with its strides
    phi, _ = ft.favor_features(y, feat, *consts)
    assert max_err(phi, want_phi) <= 2.0 ** -8 * want_phi.abs().max().item()
    dx = torch.autograd.grad((phi * w).float().sum(), y)[0]
    assert max_err(dx, want_dx) <= 2.0 ** -7 * want_dx.abs().max().item()


def test_other_ranks_map_as_rows(ft):
    """x of another rank than 4 ([N, D], [B, T, D]) is mapped as one row of tokens: phi [..., m] and b [...] as the
    4-dim input's, gradients too."""
    scale = D ** -0.5
    consts = (math.sqrt(scale), scale / 2, -0.5 * math.log(M))
    x, feat = _inputs(torch.bfloat16, seed=4)
    want_phi, want_b = ft.favor_features(x, feat, *consts)
    for shape in ((-1, D), (6, 70, D)):
        y = x.reshape(shape).detach().requires_grad_(True)
        phi, b = ft.favor_features(y, feat, *consts)
        assert phi.shape == (*y.shape[:-1], M) and b.shape == y.shape[:-1]
        assert max_err(phi.reshape(want_phi.shape), want_phi) <= 2.0 ** -8 * want_phi.abs().max().item()
        assert max_err(b.reshape(want_b.shape), want_b) <= 1e-6 * want_b.abs().max().item()
        dx = torch.autograd.grad(phi.float().sum(), y)[0]
        assert dx.shape == y.shape and torch.isfinite(dx.float()).all()
