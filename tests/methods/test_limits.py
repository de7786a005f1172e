"""The Triton kernels' size limits (`ops.limits`). 32-bit row offsets: calls whose rows would pass 2^31 elements are
refused with one clear line before any launch, by the methods' checks (shape level) and by the kernels' entry points
(the tensors they are handed). Without them a wide enough row wraps its offsets: a segfault under the interpreter (a
window call on a view with a 35M-element token stride, 2026-12-04), an illegal address or wrong rows on the GPU. Grid
rows: batches past CUDA's 65,535 programs along y / z run in pieces. The tests lower `limits.OFFSET_LIMIT` and
`limits.MAX_GRID_ROWS` so that tiny inputs cross them."""
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


ENTRIES = {"window_triton": ["window_attention"], "linear_triton": ["causal_linear"],
           "performer_triton": ["causal_favor"], "favor_triton": ["favor_features"],
           "lsh_triton": ["hash_sort", "lsh_chunk_attention"], "nystrom_triton": ["b_side", "f_side", "solve"]}


@pytest.mark.parametrize("name", ["window", "linear", "performer", "performer+learn", "lsh", "nystrom"])
def test_batches_past_the_grid_rows_run_in_pieces(name, monkeypatch):
    """CUDA grids hold 65,535 programs along y and z, where the kernels put batch x heads (x LSH's rounds): a larger
    batch runs in pieces that fit, each item computed as in one launch. With the limit at 4 rows, a batch of 3 with 2
    heads runs every entry point it reaches in pieces (2 + 1 items, or 1 + 1 + 1 for 4 rows an item: each entry then
    runs more often than with the whole batch): outputs and gradients equal the whole batch's; at 1 row a single item
    does not fit and is refused in one line. performer: its one node (drawn features); +learn: the map's kernel and
    causal_linear (trained features)."""
    import importlib
    from collections import Counter

    from attnlab.ops import linear_triton

    monkeypatch.setattr(linear_triton, "PARALLEL_MAX_T", 0)  # the chunked form: FAVOR+'s one node serves it
    calls = Counter()
    for mod_name, fns in ENTRIES.items():
        mod = importlib.import_module(f"attnlab.ops.{mod_name}")
        for fn in fns:
            def counted(*a, _fn=getattr(mod, fn), _key=fn, **kw):
                calls[_key] += 1
                return _fn(*a, **kw)
            monkeypatch.setattr(mod, fn, counted)  # the entries' own recursive calls go through the module too
    b, h, t, d = 3, 2, 64, 16
    name, learn = name.split("+")[0], name.endswith("+learn")
    opts = {**attnlab.defaults(name, t), "backend": "triton"}
    if learn:
        opts["learn_features"] = True
    if name == "lsh":
        opts.update(bucket_size=16, n_hashes=2)
    if name == "nystrom":
        opts.update(num_landmarks=8)
    m = attnlab.make(name, head_dim=d, num_heads=h, **opts)
    causal = name != "nystrom"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))
    pad = None
    if name in ("window", "nystrom"):
        pad = torch.ones(b, t, dtype=torch.bool)
        pad[1, -5:] = False

    def run():
        out = m(q, k, v, causal=causal, key_padding_mask=pad).out
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        return out.detach(), grads

    def infer():  # nystrom: the solve kernel's entry
        with torch.no_grad():
            return m(q, k, v, causal=causal, key_padding_mask=pad).out

    want, want_grads = run()
    want_infer = infer()
    whole = Counter(calls)
    assert whole, "no Triton entry point ran"
    calls.clear()
    monkeypatch.setattr(limits, "MAX_GRID_ROWS", 4)
    got, got_grads = run()
    got_infer = infer()
    assert set(calls) == set(whole) and all(calls[fn] > whole[fn] for fn in whole), (whole, calls)
    assert torch.equal(got, want)
    for a, e in zip(got_grads, want_grads):
        assert torch.equal(a, e)
    assert torch.equal(got_infer, want_infer)
    monkeypatch.setattr(limits, "MAX_GRID_ROWS", 1)
    with pytest.raises(UnsupportedError, match="grid rows") as err:
        run()
    assert "\n" not in str(err.value)
