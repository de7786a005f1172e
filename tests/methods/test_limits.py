"""The Triton kernels' 32-bit row offsets (`ops.limits`): calls whose rows would pass 2^31 elements are refused with
one clear line before any launch, by the methods' checks (shape level) and by the kernels' entry points (the tensors
they are handed). Without them a wide enough row wraps its offsets: a segfault under the interpreter (a window call on
a view with a 35M-element token stride, 2026-12-04), an illegal address or wrong rows on the GPU. The tests lower
`limits.OFFSET_LIMIT` so that tiny inputs cross it."""
from __future__ import annotations

import math

import pytest
import torch

import attnlab
from attnlab import UnsupportedError
from attnlab.ops import limits

TRITON_METHODS = ["linear", "performer", "rfa", "hedgehog", "window", "block_sparse", "learned_mask", "lsh", "nystrom"]


def test_row_span_follows_the_layout():
    assert limits.row_span(torch.empty(2, 3, 10, 4)) == 40  # contiguous [B, H, T, D]: T x D a row
    hf = torch.empty(2, 10, 3, 4).transpose(1, 2)  # transformers' [B, T, H, D] memory: T x H x D a row
    assert limits.row_span(hf) == 9 * 12 + 3 + 1
    assert limits.row_span(torch.empty(6, 10, 4), lead=1) == 40
    assert limits.row_span(torch.empty(2, 3, 0, 4)) == 0


def test_the_limit_is_a_row_of_2_31_elements():
    """524,288 tokens of 32 heads of 128 in transformers' layout are the first to reach it; feature maps and a chunked
    form's states count too (T x F, T / 64 x F x D)."""
    assert limits.OFFSET_LIMIT == 2**31
    assert limits.span_reasons(524_287, heads=32, head_dim=128) == []
    why = limits.span_reasons(524_288, heads=32, head_dim=128, fallback="compiled")
    assert len(why) == 1 and "32-bit offsets" in why[0] and "backend='compiled'" in why[0]
    assert limits.span_reasons(2**31 // 256, heads=1, head_dim=64, feature_dim=256) != []  # T x F
    assert limits.span_reasons(2**31 // 256 - 1, heads=1, head_dim=64, feature_dim=256) == []
    assert limits.span_reasons(2**31 // 512, heads=1, head_dim=128, feature_dim=256) != []  # T / 64 x F x D
    assert limits.span_reasons(None, heads=32, head_dim=128) == []


@pytest.mark.parametrize("name", TRITON_METHODS)
def test_backend_triton_refuses_rows_past_the_offsets_before_compute(name, monkeypatch):
    """Each method with a Triton backend: refused in one line by check() at a length whose rows reach the limit,
    served at a length below it (the limit set between the two)."""
    t, h, d = 64, 2, 16
    opts = {**attnlab.defaults(name, t), "backend": "triton"}
    if name == "block_sparse":  # a layout (its default pattern, BigBird's, runs on flex)
        opts["layout"] = [[True] * 4] * 4
    m = attnlab.make(name, head_dim=d, num_heads=h, **opts)
    f = m.feature_dim() if hasattr(m, "feature_dim") else 0
    heads = 1 if name in ("lsh", "nystrom") else h  # these take contiguous copies: a row is T x D
    per_token = max(heads * d, f, math.ceil(f * d / 64))
    monkeypatch.setattr(limits, "OFFSET_LIMIT", t * per_token)
    q = torch.randn(1, h, t, d)
    with pytest.raises(UnsupportedError, match="32-bit offsets") as err:
        m.check(q, q, q, causal=name != "nystrom")
    assert "\n" not in str(err.value)
    short = q[:, :, : t // 2]
    m.check(short, short, short, causal=name != "nystrom")  # half the row: below the limit


def _wide(b, h, t, d, dtype):
    """q, k, v sliced from one fused projection [B, T, 3 H D] (a token stride of 3 H D) and their contiguous copies."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, t, 3, h, d, generator=g).to(dtype)
    wide = [qkv[:, :, i].transpose(1, 2) for i in range(3)]
    return wide, [x.contiguous() for x in wide]


def test_kernel_entry_points_refuse_inputs_wider_than_the_methods_count(monkeypatch):
    """The methods count transformers' layout (T x H x D a row); a slice of a fused qkv is three times wider. With the
    limit between the two, each entry point refuses the slices and serves their contiguous copies."""
    from attnlab.ops import linear_triton, performer_triton, window_triton

    b, h, t, d = 1, 2, 32, 16
    wide, dense = _wide(b, h, t, d, torch.bfloat16)
    assert limits.row_span(wide[0]) > t * h * d
    monkeypatch.setattr(limits, "OFFSET_LIMIT", limits.row_span(wide[0]))
    features = torch.randn(32, d)
    calls = {
        "window_attention": lambda q, k, v: window_triton.window_attention(q, k, v, window=4, causal=True),
        "causal_linear": lambda q, k, v: linear_triton.causal_linear(q, k, v, feature_map="elu"),
        "causal_favor": lambda q, k, v: performer_triton.causal_favor(q, k, v, features, d ** -0.25, d ** -0.5 / 2,
                                                                      -0.5 * math.log(32)),
    }
    for op, call in calls.items():
        with torch.no_grad():
            with pytest.raises(UnsupportedError, match=f"{op}: .*32-bit offsets"):
                call(*wide)
            call(*dense)


def test_lsh_and_nystrom_entry_points_count_their_contiguous_rows(monkeypatch):
    from attnlab.ops import lsh_triton, nystrom_triton

    b, h, t, d = 1, 2, 32, 16
    x = torch.randn(b, h, t, d)
    monkeypatch.setattr(limits, "OFFSET_LIMIT", t * d)
    with pytest.raises(UnsupportedError, match="nystrom b_side"):
        nystrom_triton.b_side(torch.randn(b, h, 4, d), x, x, None)
    with pytest.raises(UnsupportedError, match="lsh hash_sort"):
        lsh_triton.hash_sort(x, torch.randn(d, 2, 2), 4, t)
    order = torch.arange(t).expand(b, h, 1, t)
    with pytest.raises(UnsupportedError, match="lsh_chunk_attention"):
        lsh_triton.lsh_chunk_attention(x, x, x, order, order * 0, order, order * 0, scale=d ** -0.5, causal=False,
                                       shared=False, chunk=t)
