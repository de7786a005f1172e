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

TRITON_METHODS = ["linear", "performer", "rfa", "hedgehog", "window", "block_sparse", "learned_mask"]


def test_row_span_follows_the_layout():
    assert limits.row_span(torch.empty(2, 3, 10, 4)) == 40  # contiguous [B, H, T, D]: T x D a row
    hf = torch.empty(2, 10, 3, 4).transpose(1, 2)  # transformers' [B, T, H, D] memory: T x H x D a row
    assert limits.row_span(hf) == 9 * 12 + 3 + 1
    assert limits.row_span(torch.empty(6, 10, 4), lead=1) == 40
    assert limits.row_span(torch.empty(2, 3, 0, 4)) == 0


def test_the_limit_is_a_row_of_2_31_elements():
    """524,288 tokens of 32 heads of 128 in transformers' layout are the first to reach it; a feature map counts too
    (T x F)."""
    assert limits.OFFSET_LIMIT == 2**31
    assert limits.span_reasons(524_287, heads=32, head_dim=128) == []
    why = limits.span_reasons(524_288, heads=32, head_dim=128, fallback="compiled")
    assert len(why) == 1 and "32-bit offsets" in why[0] and "backend='compiled'" in why[0]
    assert limits.span_reasons(2**31 // 256, heads=1, head_dim=64, feature_dim=256) != []  # T x F
    assert limits.span_reasons(2**31 // 256 - 1, heads=1, head_dim=64, feature_dim=256) == []
    # the chunked states (T / 64 x F x D) index from 64-bit rows: not counted
    assert limits.span_reasons(2**31 // 256 - 1, heads=1, head_dim=128, feature_dim=256) == []
    assert limits.span_reasons(None, heads=32, head_dim=128) == []


@pytest.mark.parametrize("name", TRITON_METHODS)
def test_backend_triton_refuses_rows_past_the_offsets_before_compute(name, monkeypatch):
    """Each method whose Triton kernels index rows with 32-bit offsets: refused in one line by check() at a length
    whose rows reach the limit, served at a length below it (the limit set between the two)."""
    t, h, d = 64, 2, 16
    opts = {**attnlab.defaults(name, t), "backend": "triton"}
    if name == "block_sparse":  # a layout (its default pattern, BigBird's, runs on flex)
        opts["layout"] = [[True] * 4] * 4
    m = attnlab.make(name, head_dim=d, num_heads=h, **opts)
    f = m.feature_dim() if hasattr(m, "feature_dim") else 0
    monkeypatch.setattr(limits, "OFFSET_LIMIT", t * max(h * d, f))
    q = torch.randn(1, h, t, d)
    with pytest.raises(UnsupportedError, match="32-bit offsets") as err:
        m.check(q, q, q, causal=True)
    assert "\n" not in str(err.value)
    short = q[:, :, : t // 2]
    m.check(short, short, short, causal=True)  # half the row: below the limit


@pytest.mark.parametrize("name", ["lsh", "nystrom"])
def test_lsh_and_nystrom_index_with_64_bit_positions(name, monkeypatch):
    """Their kernels take q, k, v contiguous and index tokens from 64-bit positions: no row limit to refuse."""
    t, h, d = 64, 2, 16
    m = attnlab.make(name, head_dim=d, num_heads=h, **{**attnlab.defaults(name, t), "backend": "triton"})
    monkeypatch.setattr(limits, "OFFSET_LIMIT", 16)
    q = torch.randn(1, h, t, d)
    m.check(q, q, q, causal=name == "lsh")


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


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_auto_takes_the_pytorch_core_for_a_layout_wider_than_it_counted(name, monkeypatch):
    """auto decides per shape (cached), counting transformers' layout; a fused qkv's slices are wider. Where they pass
    the limit, the call runs the PyTorch core instead of an entry point's refusal, with the eager module's output.
    (auto takes Triton only on CUDA: its choice is forced here, the fallback after it is what is tested.)"""
    b, h, t, d = 1, 2, 32, 16
    wide, dense = _wide(b, h, t, d, torch.float32)
    m = attnlab.make(name, head_dim=d, num_heads=h, **attnlab.defaults(name, t))
    ref = attnlab.make(name, head_dim=d, num_heads=h, **{**attnlab.defaults(name, t), "backend": "eager"})
    ref.load_state_dict(m.state_dict())
    monkeypatch.setattr(limits, "OFFSET_LIMIT", limits.row_span(wide[0]))
    monkeypatch.setattr(m, "_choose", lambda *a: ("triton", False))
    with torch.no_grad():
        got = m(*wide, causal=True).out
        assert not m.kernel.startswith("triton"), m.kernel
        torch.testing.assert_close(got, ref(*dense, causal=True).out)
        monkeypatch.setattr(limits, "OFFSET_LIMIT", 2**31)
        m(*wide, causal=True)
        assert m.kernel.startswith("triton"), m.kernel  # the forced choice stands where the rows fit


def test_window_auto_hands_the_rows_test_to_resolve(monkeypatch):
    """window on auto passes q, k, v's own rows test to `sparse.resolve` (which takes flex or torch where they do not
    fit: `test_block_triton.py::test_auto_routing_and_refusals`); explicit backends are not asked."""
    from attnlab.ops import sparse as sparse_ops

    b, h, t, d = 1, 2, 32, 16
    wide, dense = _wide(b, h, t, d, torch.float32)
    seen, real = [], sparse_ops.resolve

    def spy(*a, **kw):
        seen.append(kw.get("rows_fit"))
        return real(*a, **kw)
    monkeypatch.setattr(sparse_ops, "resolve", spy)
    monkeypatch.setattr(limits, "OFFSET_LIMIT", limits.row_span(wide[0]))
    m = attnlab.make("window", head_dim=d, num_heads=h, window=4)
    with torch.no_grad():
        m(*wide, causal=True)
        m(*dense, causal=True)
    assert seen == [False, True]


def test_favor_map_takes_the_pytorch_map_past_the_offsets(monkeypatch):
    """FAVOR+'s map kernel (compiled path) hands x it cannot index to the fused PyTorch map (run eagerly here: the
    spy skips torch.compile), for 4-D inputs by their strides and T x m features, for other ranks as one row of
    every token; its entry point refuses such x in one line."""
    import attnlab.feature_maps as fmaps
    from attnlab.ops import favor_triton

    fm = attnlab.make("performer", head_dim=16, num_heads=2, num_features=32).feature_map
    used, fused_map = [], fmaps.favor_features

    def spy(*a, compiled=False, **kw):
        used.append(compiled)
        return fused_map.fn(*a, **kw)  # eagerly: the same maths without the compile
    monkeypatch.setattr(fmaps, "favor_features", spy)
    x = torch.randn(1, 2, 64, 16).to(torch.bfloat16)
    fm(x, scale=0.25, is_query=True, compiled=True)  # fits: the kernel
    assert used == []
    monkeypatch.setattr(limits, "OFFSET_LIMIT", 64 * 32)  # T x m
    fm(x, scale=0.25, is_query=True, compiled=True)
    assert used == [True]
    with pytest.raises(UnsupportedError, match="favor_features: .*32-bit row offsets"):
        favor_triton.favor_features(x, fm.features, 0.5, 0.125, -0.5 * math.log(32))
    flat = torch.randn(4, 16, 16).to(torch.bfloat16)  # mapped as one row of 64 tokens: 64 x 32 features
    assert 16 * 32 < limits.OFFSET_LIMIT
    with pytest.raises(UnsupportedError, match="favor_features"):
        favor_triton.favor_features(flat, fm.features, 0.5, 0.125, -0.5 * math.log(32))


@pytest.mark.parametrize("op", ["window", "linear"])
def test_backwards_copy_a_gradient_wider_than_the_offsets(op, monkeypatch):
    """The backwards read the output's gradient in the layout it arrives in; through a concatenation along features it
    is wider than the output (and than anything the forward checked). Past the limit they read a contiguous copy:
    the same gradients."""
    from attnlab.ops import linear_triton, window_triton

    b, h, t, d, extra = 1, 2, 32, 16, 96
    g = torch.Generator().manual_seed(1)
    base = [torch.randn(b, t, h, d, generator=g).to(torch.bfloat16).transpose(1, 2) for _ in range(3)]

    def grads():
        q, k, v = (x.clone().requires_grad_() for x in base)
        if op == "window":
            out, _ = window_triton.window_attention(q, k, v, window=4, causal=True, need_lse=False)
        else:
            out = linear_triton.causal_linear(q, k, v, feature_map="elu")
        o = out.transpose(1, 2).reshape(b, t, h * d)
        y = torch.cat([o, torch.ones(b, t, extra, dtype=o.dtype)], -1)  # dout: token stride h d + extra
        return torch.autograd.grad(y.float().square().sum(), (q, k, v))

    want = grads()
    seen, real = [], limits.narrowed

    def spy(x):
        y = real(x)
        seen.append((limits.row_span(x), y is not x and y.is_contiguous()))
        return y
    monkeypatch.setattr(limits, "narrowed", spy)
    monkeypatch.setattr(limits, "OFFSET_LIMIT", t * h * d + 1)  # the forward's tensors fit, the gradient does not
    got = grads()
    assert seen and all(span >= limits.OFFSET_LIMIT and copied for span, copied in seen), seen
    for a_, e in zip(got, want):
        assert torch.equal(a_, e)


def test_learned_mask_on_triton_refuses_blocks_the_kernels_do_not_run():
    m = attnlab.make("learned_mask", head_dim=16, num_heads=2, block_size=128, max_blocks=4, backend="triton")
    q = torch.randn(1, 2, 256, 16)
    with pytest.raises(UnsupportedError, match="16, 32, 64-token blocks, not 128"):
        m.check(q, q, q, causal=True)
    m = attnlab.make("learned_mask", head_dim=16, num_heads=2, block_size=16, max_blocks=16, backend="triton")
    with pytest.raises(UnsupportedError, match=r"self-attention \(Tq == Tk\), got Tq=128, Tk=256"):
        m.check(q[:, :, :128], q, q, causal=True)


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
    # in the whole batch's memory layout too (a window output is [B, T, H, D] memory: no copy downstream)
    assert got.stride() == want.stride() and got_infer.stride() == want_infer.stride()
    monkeypatch.setattr(limits, "MAX_GRID_ROWS", 1)
    with pytest.raises(UnsupportedError, match="grid rows") as err:
        run()
    assert "\n" not in str(err.value)


def test_favor_one_node_and_map_count_their_rows(monkeypatch):
    """`performer_triton.serves` declines inputs whose rows (T x H x D, T x m, or wider views) pass the limit, so the
    method composes the map and the core instead; `map_fits` counts a non-4-D x as one row of tokens as wide as its
    token stride."""
    from attnlab.ops import linear_triton, performer_triton

    monkeypatch.setattr(linear_triton, "PARALLEL_MAX_T", 0)  # the chunked form, which the one node serves
    b, h, t, d, m = 1, 2, 32, 16, 64
    wide, dense = _wide(b, h, t, d, torch.bfloat16)
    assert performer_triton.serves(*dense, False, m) and performer_triton.serves(*wide, False, m)
    monkeypatch.setattr(limits, "OFFSET_LIMIT", limits.row_span(wide[0]))  # above T x H x D and T x m
    assert performer_triton.serves(*dense, False, m) and not performer_triton.serves(*wide, False, m)
    monkeypatch.setattr(limits, "OFFSET_LIMIT", t * m)
    assert not performer_triton.serves(*dense, False, m)
    x = torch.randn(64, 48)
    monkeypatch.setattr(limits, "OFFSET_LIMIT", 64 * 40)  # between 64 tokens x 32 features and x 48 (the stride)
    assert limits.map_fits(x[:, :16].contiguous(), 32) and not limits.map_fits(x[:, :16], 32)
