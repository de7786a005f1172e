"""Data-informed global sparsity: blockwise attention mass vs the dense matrix, block selection on hand-made
scores, the method's pattern vs the dense masked reference, save/load, and the CLI's one-line errors."""
from __future__ import annotations

import json

import pytest
import torch

import attnlab
from attnlab.ops.reference import block_mass
from attnlab.reduction import GlobalPattern, load_pattern, make_pattern, save_pattern, select_blocks
from attnlab.reduction import global_sparse as gs
from attnlab.reduction.global_sparse import PatternError
from attnlab.types import OptionError, UnsupportedError
from tests.helpers import assert_cli_one_line_error


@pytest.mark.parametrize("causal,t,bs", [(True, 24, 8), (True, 21, 8), (False, 20, 6)])
def test_block_mass_equals_the_dense_matrix_summed(causal, t, bs):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, t, 8, generator=g), torch.randn(2, 3, t, 8, generator=g)
    scores = q @ k.transpose(-1, -2) * 8 ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    probs = scores.softmax(-1)
    nb = -(-t // bs)
    pad = torch.nn.functional.pad(probs, (0, nb * bs - t, 0, nb * bs - t))
    want = pad.view(2, 3, nb, bs, nb, bs).sum((3, 5))
    got, sink = block_mass(q, k, block_size=bs, scale=8 ** -0.5, causal=causal, sinks=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sink, torch.nn.functional.pad(probs[..., :3].sum(-1), (0, nb * bs - t)).view(2, 3, nb, bs).sum(-1))
    if causal:
        assert got.triu(1).abs().max() == 0


def test_selection_on_known_scores():
    """Column masses 0.6, 0.4, 1.9-like: the heaviest block is kept first, the diagonal always, the budget exact."""
    mass = torch.tensor([[1.0, 0, 0, 0],
                         [0.5, 0.5, 0, 0],
                         [0.1, 0.6, 0.3, 0],
                         [0.05, 0.05, 0.8, 0.1]])
    keep = select_blocks(mass, 0.0)
    assert torch.equal(keep, mass > 0)  # nothing pruned: every block that received attention
    keep = select_blocks(mass, 0.6)  # 10 causal blocks -> 4 kept: the 4 diagonal ones
    assert torch.equal(keep, torch.eye(4, dtype=torch.bool))
    keep = select_blocks(mass, 0.4)  # 6 kept: the diagonal + the two with the largest log gain
    assert int(keep.sum()) == 6 and keep.diagonal().all()
    assert keep[3, 2] and keep[2, 1]  # 0.8 in a row whose diagonal holds 0.1; 0.6 beside 0.3
    assert not keep[3, 0] and not keep[3, 1]
    with pytest.raises(OptionError, match=r"sparsity must be in \[0, 1\)"):
        select_blocks(mass, 1.0)


def test_log_selection_does_not_starve_late_rows():
    """Raw-mass greedy would give row 3's far block to row 1; the log objective balances rows."""
    mass = torch.tensor([[1.0, 0, 0, 0],
                         [0.3, 0.7, 0, 0],
                         [0.2, 0.2, 0.6, 0],
                         [0.28, 0.24, 0.24, 0.24]])
    keep = select_blocks(mass, 0.5)  # 5 of 10: diagonal + 1
    assert keep[3, 0] and not keep[1, 0]


def test_sinks_and_band_count_as_kept():
    mass = torch.tensor([[1.0, 0, 0], [0.6, 0.4, 0], [0.5, 0.2, 0.3]])
    sink = torch.tensor([1.0, 0.6, 0.5])  # all of block 0's mass goes to the sink tokens
    keep = select_blocks(mass, 0.34, sink_mass=sink)  # 6 causal -> 4 kept: diagonal + 1
    assert not keep[1, 0] and not keep[2, 0] and keep[2, 1]


def _scores(l=2, h=2, nb=4):
    g = torch.Generator().manual_seed(1)
    m = torch.rand(l, h, nb, nb, generator=g).tril()
    return m / m.sum(-1, keepdim=True)


def test_shared_budget_goes_to_the_heads_whose_attention_is_spread():
    """Head 0 looks at its own block only, head 1 spreads evenly: with the layer's budget shared, head 1 takes
    the blocks head 0 does not need; the total is the same and exact, every diagonal kept. 'model' shares one
    budget across layers the same way."""
    nb = 6
    causal = torch.ones(nb, nb).tril()
    focused = torch.eye(nb) * 0.99 + causal * 0.002  # nearly all on its own block
    spread = causal / causal.sum(-1, keepdim=True)
    mass = torch.stack([focused, spread])  # [H=2, nb, nb], 21 candidate blocks each
    own = select_blocks(mass, 0.5, share="head")
    shared = select_blocks(mass, 0.5, share="layer")
    assert int(own[0].sum()) == int(own[1].sum()) == round(0.5 * 21)
    assert int(shared.sum()) == round(0.5 * 42) and shared.diagonal(dim1=-2, dim2=-1).all()
    assert int(shared[0].sum()) < int(own[0].sum()) and int(shared[1].sum()) > int(own[1].sum())
    both = torch.stack([mass, mass.flip(0)])  # [L=2, H=2, nb, nb]
    model = select_blocks(both, 0.5, share="model")
    assert int(model.sum()) == round(0.5 * 84)
    torch.testing.assert_close(select_blocks(both, 0.5, share="layer")[0], shared)
    with pytest.raises(OptionError, match="share must be one of"):
        select_blocks(mass, 0.5, share="everyone")
    with pytest.raises(OptionError, match=r"share='model' needs every layer's scores"):
        select_blocks(mass, 0.5, share="model")
    with pytest.raises(OptionError, match="share='model' needs every layer's scores"):
        attnlab.make("global_sparse", head_dim=8, num_heads=2, pattern=mass.tolist(), block_size=4, share="model")


def test_the_selection_cache_is_neither_shared_nor_confused(tmp_path):
    """A swapped layer's blocks are its own copy (loading a state into one layer changes no other layer and no
    later swap); patterns that share a mass but differ in sinks or band get their own selections."""
    from attnlab.reduction.global_sparse import selected_blocks

    mass = _scores()
    save_pattern(tmp_path / "p", GlobalPattern(mass, 4, {}))
    kw = dict(head_dim=8, num_heads=2, pattern=str(tmp_path / "p"), layer=1, sparsity=0.5)
    a, b = attnlab.make("global_sparse", **kw), attnlab.make("global_sparse", **kw)
    before = b.pattern.parts[0].layout.clone()
    state = {k: torch.ones_like(v) if v.dtype == torch.bool else v for k, v in a.state_dict().items()}
    a.load_state_dict(state)
    assert a.pattern.parts[0].layout.all() and not before.all()
    assert torch.equal(b.pattern.parts[0].layout, before)
    assert torch.equal(attnlab.make("global_sparse", **kw).pattern.parts[0].layout, before)
    plain, banded = GlobalPattern(mass, 4, {}, band=False), GlobalPattern(mass, 4, {}, torch.full(mass.shape[:3], 0.3), 2)
    for pat in (plain, banded, plain):
        torch.testing.assert_close(selected_blocks(pat, 0.5), select_blocks(mass, 0.5, pat.sink_mass, pat.band, share="layer"))


@pytest.mark.parametrize("sinks,band,share", [(0, False, "head"), (2, True, "head"), (2, True, "layer"),
                                              (0, False, "model")])
def test_method_equals_dense_masked_reference(sinks, band, share, tmp_path):
    """The method over a saved pattern == softmax attention under the pattern's dense mask (fp64)."""
    mass = _scores()
    sink_mass = torch.full(mass.shape[:3], 0.1) if sinks else None
    save_pattern(tmp_path / "p", GlobalPattern(mass, 4, {"sparsity": 0.5}, sink_mass, sinks, band))
    m = attnlab.make("global_sparse", head_dim=8, num_heads=2, pattern=str(tmp_path / "p"), layer=1, sparsity=0.5,
                     share=share)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = m(q, k, v, causal=True).out
    pat = make_pattern(select_blocks(mass, 0.5, sink_mass, band, share=share)[1], 4, sinks, band)
    allowed = pat.dense(16, 16, causal=True)
    scores = (q @ k.transpose(-1, -2) * 8 ** -0.5).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ v)
    assert m.sparsity == 0.5
    dense = attnlab.make("dense", head_dim=8, num_heads=2)
    assert not torch.allclose(out, dense(q, k, v, causal=True).out)  # the pattern really prunes


@pytest.mark.parametrize("sinks,band,t", [(0, False, 48), (2, True, 45), (3, False, 30), (1, True, 17)])
def test_blocks_density_counts_the_dense_union(sinks, band, t):
    """The per-block count equals the dense mask's count of the union make_pattern runs (blocks, band, sinks),
    also for a window shorter than the pattern and not a multiple of the block."""
    from attnlab.reduction.global_sparse import blocks_density

    mass = _scores(l=2, h=3, nb=6)
    pat = GlobalPattern(mass, 8, {}, torch.full(mass.shape[:3], 0.1) if sinks else None, sinks, band)
    for p in (0.0, 0.5, 0.8):
        keep = select_blocks(mass, p, pat.sink_mass, band, share="layer")
        want = sum(make_pattern(b, 8, pat.sinks, band).density(t, t, causal=True) for b in keep.reshape(-1, 6, 6)) / 6
        assert blocks_density(pat, keep, t) == pytest.approx(float(want), abs=1e-12)


def test_per_layer_sparsities_select_each_layer_alone():
    mass = _scores(l=3, h=2, nb=5)
    got = select_blocks(mass, [0.0, 0.5, 0.8], share="layer")
    for i, p in enumerate((0.0, 0.5, 0.8)):
        assert torch.equal(got[i], select_blocks(mass[i], p, share="layer"))
    assert got[0].sum() > got[1].sum() > got[2].sum()
    with pytest.raises(OptionError, match="one value per layer"):
        select_blocks(mass, [0.5, 0.5], share="layer")
    with pytest.raises(OptionError, match="per-layer sparsities contradict it"):
        select_blocks(mass, [0.5] * 3, share="model")
    with pytest.raises(OptionError, match=r"sparsity must be in \[0, 1\)"):
        select_blocks(mass, [0.5, 1.0, 0.5], share="layer")


def test_sensitivity_budget_moves_blocks_to_sensitive_layers_at_equal_density(tmp_path):
    """Layer 1 is 100x as sensitive as layer 0: it keeps more blocks, layer 0 fewer, the mean causal density stays
    the uniform budget's; alpha 0 is the uniform budget; the probe survives save/load; the method takes its layer's
    slice of that selection; and without a probe the budget is refused in one line."""
    from attnlab.reduction.global_sparse import layer_sparsities, pattern_density, selected_blocks

    nb = 12
    causal = torch.ones(nb, nb).tril()
    spread = (causal / causal.sum(-1, keepdim=True)).expand(2, 2, nb, nb).contiguous()
    pat = GlobalPattern(spread, 4, {}, sensitivity=torch.tensor([0.001, 0.1]))
    ps = layer_sparsities(pat, 0.7, "layer", alpha=1.0)
    assert ps[0] > 0.7 > ps[1]
    uniform = pattern_density(pat, 0.7, pat.max_len)
    assert pattern_density(pat, 0.7, pat.max_len, "layer", "sensitivity", 1.0) == pytest.approx(uniform, rel=0.03)
    sel = selected_blocks(pat, 0.7, "layer", "sensitivity", 1.0)
    assert sel[1].sum() > selected_blocks(pat, 0.7)[1].sum() > sel[0].sum()
    assert layer_sparsities(pat, 0.7, "layer", alpha=0.0) == pytest.approx([0.7, 0.7], abs=0.02)
    save_pattern(tmp_path / "p", pat)
    back = load_pattern(tmp_path / "p")
    assert torch.equal(back.sensitivity, pat.sensitivity)
    m = attnlab.make("global_sparse", head_dim=8, num_heads=2, pattern=str(tmp_path / "p"), layer=1, sparsity=0.7,
                     budget="sensitivity", alpha=1.0)
    assert torch.equal(m.pattern.parts[0].layout, sel[1])
    save_pattern(tmp_path / "plain", GlobalPattern(spread, 4, {}))
    with pytest.raises(OptionError, match="needs the pattern's per-layer sensitivity"):
        attnlab.make("global_sparse", head_dim=8, num_heads=2, pattern=str(tmp_path / "plain"), layer=0, sparsity=0.7,
                     budget="sensitivity")
    with pytest.raises(OptionError, match="needs a pattern folder with a sensitivity probe"):
        attnlab.make("global_sparse", head_dim=8, num_heads=2, pattern=spread[0].tolist(), block_size=4,
                     sparsity=0.7, budget="sensitivity")
    with pytest.raises(OptionError, match="use share='layer' or 'head'"):
        layer_sparsities(pat, 0.7, "model")
    with pytest.raises(OptionError, match="budget must be one of uniform, sensitivity"):
        selected_blocks(pat, 0.7, "layer", "tight")


def test_pattern_errors(tmp_path):
    mass = _scores()
    save_pattern(tmp_path / "p", GlobalPattern(mass, 4, {}))
    with pytest.raises(OptionError, match="2 heads per layer, this layer 3"):
        attnlab.make("global_sparse", head_dim=8, num_heads=3, pattern=str(tmp_path / "p"), layer=0)
    with pytest.raises(OptionError, match="layer 5 is outside the pattern's 2 layers"):
        attnlab.make("global_sparse", head_dim=8, num_heads=2, pattern=str(tmp_path / "p"), layer=5)
    with pytest.raises(OptionError, match="measured with 4-token blocks"):
        attnlab.make("global_sparse", head_dim=8, num_heads=2, pattern=str(tmp_path / "p"), layer=0, block_size=8)
    with pytest.raises(PatternError, match="not a global-sparse pattern folder"):
        attnlab.make("global_sparse", head_dim=8, num_heads=2, pattern=str(tmp_path), layer=0)
    with pytest.raises(OptionError, match="sparsity must be in"):
        attnlab.make("global_sparse", head_dim=8, num_heads=2, pattern=str(tmp_path / "p"), layer=0, sparsity=1.5)
    with pytest.raises(OptionError, match="records no sparsity; give one"):  # not a silent dense mask
        attnlab.make("global_sparse", head_dim=8, num_heads=2, pattern=str(tmp_path / "p"), layer=0)
    m = attnlab.make("global_sparse", head_dim=8, num_heads=2, pattern=str(tmp_path / "p"), layer=0, sparsity=0.5)
    q = torch.randn(1, 2, 17, 8)  # the pattern covers 16 tokens
    with pytest.raises(UnsupportedError, match="covers positions up to 16"):
        m(q, q, q, causal=True)
    (tmp_path / "p" / "pattern.safetensors").write_bytes(b"garbage")
    with pytest.raises(PatternError, match="damaged"):
        load_pattern(tmp_path / "p")
    save_pattern(tmp_path / "q", GlobalPattern(mass, 4, {}))
    meta = json.loads((tmp_path / "q" / "pattern.json").read_text())
    (tmp_path / "q" / "pattern.json").write_text(json.dumps({**meta, "num_heads": 3}))
    with pytest.raises(PatternError, match="pattern.json says"):
        load_pattern(tmp_path / "q")
    for bad, msg in (([], "pattern format 'list'"), ({k: v for k, v in meta.items() if k != "block_size"},
                                                     "block_size is None, not a positive integer"),
                     ({**meta, "block_size": 0}, "block_size is 0, not a positive integer")):
        (tmp_path / "q" / "pattern.json").write_text(json.dumps(bad))
        with pytest.raises(PatternError, match=msg):
            load_pattern(tmp_path / "q")


def test_on_the_real_model_no_leak_per_layer_and_save_load(smollm2, tmp_path):
    """Measured on SmolLM2: rows sum to 1; the swap gives each layer its own slice; a later token never changes
    an earlier logit; saved with attnlab.save and loaded into a fresh swap, outputs are identical."""
    from attnlab.reduction import measure_block_mass

    model, tok = smollm2
    ids = tok("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
              "want of a wife. However little known the feelings or views of such a man may be", return_tensors="pt")["input_ids"][:, :32]
    pat = measure_block_mass(model, ids, block_size=8, sinks=2, progress=False)
    assert pat.mass.shape == (30, 9, 4, 4)
    torch.testing.assert_close(pat.mass.sum(-1), torch.ones(30, 9, 4), rtol=1e-4, atol=1e-4)
    save_pattern(tmp_path / "p", pat)
    with attnlab.swapped(model, "global_sparse", pattern=str(tmp_path / "p"), sparsity=0.5):
        from attnlab.adapters.swap import method_modules

        layers = [m.opts.layer for _, m in method_modules(model)]
        assert layers == list(range(30))
        with torch.no_grad():
            full = model(ids).logits
            changed = ids.clone()
            changed[0, 20:] = (changed[0, 20:] + 7) % 1000
            part = model(changed).logits
        torch.testing.assert_close(part[0, :20], full[0, :20], rtol=0, atol=0)
        attnlab.save(model, tmp_path / "saved")
    with attnlab.swapped(model, "global_sparse", pattern=str(tmp_path / "p"), sparsity=0.5):
        attnlab.load(model, tmp_path / "saved")
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, full, rtol=0, atol=0)


@pytest.mark.parametrize("args,match", [
    (["--sparsity", "1.0"], "--sparsity values must be in [0, 1)"),
    (["--sparsity", "x"], "--sparsity expects numbers"),
    (["--block-size", "0"], "--block-size must be an integer >= 1"),
    (["--seq-len", "64", "--block-size", "128"], "exceeds --seq-len"),
    (["--data", "nosuch"], "unknown corpus"),
    (["--pattern", "/no/such"], "not a global-sparse pattern folder"),
    (["--model", "/no/such/folder"], "neither a packaged model"),
    (["--eval", "/no/such.txt"], "no such file"),
    (["--share", "layer,everyone"], "--share 'layer,everyone': each must be one of head, layer, model"),
    (["--budget", "uniform,tight"], "--budget 'uniform,tight': each must be one of uniform, sensitivity"),
    (["--budget", "sensitivity", "--share", "model"], "cannot go with --share model"),
    (["--budget", "sensitivity", "--probe", "1.5"], "--probe must be in (0, 1)"),
    (["--budget", "sensitivity", "--alpha", "-1"], "--alpha must be in [0, 4]"),
    (["--alpha", "1"], "--alpha applies to --budget sensitivity only"),  # each was ignored in silence
    (["--budget", "uniform", "--probe", "0.9"], "--probe applies to --budget sensitivity only"),
    (["--probe-windows", "3"], "--probe-windows applies to --budget sensitivity only"),
    (["--narrow-backward"], "add --cost"),
    (["--cost", "--narrow-backward", "--device", "cpu"], "use it with --device cuda"),
    (["--cuda-graph"], "--cuda-graph changes only the --cost rows: add --cost"),
    (["--eager-reference"], "--eager-reference changes only the --cost rows: add --cost"),
    (["--cost", "--cuda-graph", "--device", "cpu"], "--cuda-graph captures CUDA graphs: use it with --device cuda"),
    (["--out", "FILE"], "is a file, not a folder"),  # before measuring, not at the end
    (["--pattern", "/no/such", "--windows", "4"], "--windows: the --pattern is measured already"),
    (["--pattern", "/no/such", "--data", "moby"], "--data: the --pattern is measured already"),
])
def test_cli_bad_input_is_one_line(args, match, tmp_path, capsys, monkeypatch):
    import attnlab.models

    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    (tmp_path / "FILE").write_text("")
    args = [str(tmp_path / a) if a == "FILE" else a for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    assert_cli_one_line_error(["sparsify", *args, *out], match, capsys, tmp_path / "out")


def test_cli_end_to_end_on_a_tiny_model(tiny_lm_dir, tmp_path, capsys):
    """Measure, save, evaluate (global sparse and the window baseline), JSON rows in the issue's schema, a plot;
    then evaluate the saved pattern again without measuring."""
    import attnlab.cli

    out = tmp_path / "out"
    base = ["sparsify", "--model", str(tiny_lm_dir), "--seq-len", "64", "--block-size", "16", "--eval-windows", "1",
            "--sparsity", "0,0.5", "--no-progress"]
    assert attnlab.cli.main([*base, "--data", "moby", "--windows", "2", "--out", str(out)]) == 0
    res = json.loads((out / "sparsify.json").read_text())
    rows = {(r["technique"], r["fraction"]): r for r in res["rows"]}
    assert set(rows) == {("global_sparse", 0.0), ("global_sparse", 0.5), ("window_sinks", 0.0), ("window_sinks", 0.5)}
    assert rows[("global_sparse", 0.0)]["kl"] < 1e-5 and rows[("global_sparse", 0.0)]["density"] == 1.0
    assert rows[("global_sparse", 0.5)]["density"] < 0.9 and rows[("global_sparse", 0.5)]["kl"] > 0
    assert abs(rows[("window_sinks", 0.5)]["density"] - rows[("global_sparse", 0.5)]["density"]) < 0.1
    flat = res["result_rows"]
    assert len(flat) == 8 and {"technique", "impl", "fraction", "metric", "value", "baseline_value", "ms",
                               "peak_mem_bytes", "kv_bytes", "device"} <= flat[0].keys()
    assert (out / "sparsify.png").stat().st_size > 10_000
    meta = json.loads((out / "pattern" / "pattern.json").read_text())
    assert meta["num_layers"] == 2 and meta["block_size"] == 16 and meta["corpora"] == ["moby"]
    again = tmp_path / "again"
    assert attnlab.cli.main([*base, "--pattern", str(out / "pattern"), "--out", str(again), "--cost"]) == 0
    res2 = json.loads((again / "sparsify.json").read_text())
    assert [r["kl"] for r in res2["rows"]] == [r["kl"] for r in res["rows"]]  # the same pattern, the same numbers
    # --cost: the original, each sparsity and its window, fwd and fwd+bwd; the model's grad flags put back
    cost = {(c["technique"], c["fraction"], c["mode"]): c for c in res2["cost"]}
    assert len(cost) == 2 + 2 * 2 * 2 and all(c["status"] == "ok" and c["ms"] > 0 for c in cost.values())
    assert cost[("window_sinks", 0.5, "fwd")]["options"]["sinks"] == 4
    import statistics

    for c in cost.values():  # interleaved rounds, one timed step each, merged into the median
        assert c["interleaved"] and c["repeats"] == len(c["ms_rounds"]) == 5
        assert c["ms"] == statistics.median(c["ms_rounds"])
    assert all(r["ms"] == cost[(r["technique"], r["fraction"], "fwd")]["ms"] for r in res2["result_rows"])
    assert "x orig" in capsys.readouterr().out
    capsys.readouterr()


def test_cli_window_baseline_keeps_the_patterns_sinks(tiny_lm_dir, tmp_path, capsys):
    """The baseline is window + the same sinks the pattern keeps (it was always 4, whatever --sinks said);
    --sinks against a pattern measured with others is refused."""
    import attnlab.cli

    out = tmp_path / "out"
    base = ["sparsify", "--model", str(tiny_lm_dir), "--seq-len", "64", "--block-size", "16", "--eval-windows", "1",
            "--sparsity", "0.5", "--no-progress", "--no-plot"]
    assert attnlab.cli.main([*base, "--sinks", "0", "--windows", "1", "--out", str(out)]) == 0
    res = json.loads((out / "sparsify.json").read_text())
    assert [r["options"]["sinks"] for r in res["rows"] if r["technique"] == "window_sinks"] == [0]
    assert json.loads((out / "pattern" / "pattern.json").read_text())["sinks"] == 0
    capsys.readouterr()
    assert_cli_one_line_error([*base, "--pattern", str(out / "pattern"), "--sinks", "4", "--out", str(tmp_path / "x")],
                              "the pattern was measured with 0 sinks", capsys, tmp_path / "x")


def test_cost_eager_reference_runs_the_original_with_eager_attention_and_puts_its_own_back(tiny_lm_dir, tmp_path,
                                                                                          monkeypatch):
    import attnlab
    import attnlab.adapters.hf as hf
    from attnlab.reduction import global_sparse as gs

    model, tok = attnlab.models.load(str(tiny_lm_dir))
    own = model.config._attn_implementation
    windows = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    pattern = gs.save_pattern(tmp_path / "pattern", gs.measure_block_mass(model, windows, block_size=16, progress=False))
    seen, real = [], hf.set_implementation

    def spy(m, name):
        seen.append(name)
        real(m, name)
    monkeypatch.setattr(hf, "set_implementation", spy)
    rows = gs.cost(model, 64, pattern, [0.5], baseline=False, modes=("fwd",), repeats=1, progress=False,
                   eager_reference=True)
    assert [r["technique"] for r in rows] == ["original", "original_eager", "global_sparse"]
    assert all(r["status"] == "ok" and r["ms"] > 0 and not r["cuda_graph"] for r in rows)
    assert seen[:2] == ["eager", own] and "eager" not in seen[2:]  # the swap sets its own after
    assert model.config._attn_implementation == own
    with pytest.raises(attnlab.AttnlabError, match="cuda_graph needs the model on a CUDA device"):
        gs.cost(model, 64, pattern, [0.5], progress=False, cuda_graph=True)


def test_cli_sensitivity_budget_probes_calibration_windows_and_reuses_the_probe(tiny_lm_dir, tmp_path, capsys):
    """--budget uniform,sensitivity: the probe runs on calibration windows and is stored in the pattern, rows come
    for both budgets at about equal density; --pattern with the same probe settings reuses it and leaves the given
    folder as it was."""
    import attnlab.cli

    out = tmp_path / "out"
    base = ["sparsify", "--model", str(tiny_lm_dir), "--seq-len", "64", "--block-size", "8", "--eval-windows", "1",
            "--sparsity", "0.7", "--no-progress", "--no-plot", "--no-baseline", "--data", "moby",
            "--budget", "uniform,sensitivity", "--alpha", "1", "--probe-windows", "1"]
    assert attnlab.cli.main([*base, "--windows", "2", "--out", str(out)]) == 0
    assert "stored in" in capsys.readouterr().out
    res = json.loads((out / "sparsify.json").read_text())
    rows = {r["budget"]: r for r in res["rows"]}
    assert set(rows) == {"uniform", "sensitivity"}
    assert rows["sensitivity"]["density"] == pytest.approx(rows["uniform"]["density"], rel=0.05)
    assert len(rows["sensitivity"]["options"]["layer_sparsity"]) == 2
    pat = load_pattern(out / "pattern")
    assert pat.sensitivity is not None and pat.sensitivity.shape == (2,) and (pat.sensitivity > 0).all()
    assert pat.meta["sensitivity_probe"]["windows"] == 1
    before = (out / "pattern" / "pattern.safetensors").read_bytes()
    again = tmp_path / "again"
    assert attnlab.cli.main([*base, "--pattern", str(out / "pattern"), "--out", str(again)]) == 0
    assert "reusing the probe" in capsys.readouterr().out
    assert (out / "pattern" / "pattern.safetensors").read_bytes() == before
    res2 = json.loads((again / "sparsify.json").read_text())
    assert [r["kl"] for r in res2["rows"]] == [r["kl"] for r in res["rows"]]
    assert res2["block_size"] == 8
    wrong = [a if a != "8" else "16" for a in base]  # --block-size 16 beside a pattern of 8-token blocks
    assert_cli_one_line_error([*wrong, "--pattern", str(out / "pattern"), "--out", str(tmp_path / "w")],
                              "the pattern was measured with 8-token blocks", capsys, tmp_path / "w")
    # a new probe (another --probe) would be written into the given folder itself: refused before any compute
    assert_cli_one_line_error([*base, "--probe", "0.9", "--pattern", str(out / "pattern"), "--out", str(out)],
                              "would write its probe into the --pattern folder itself", capsys, None)
    assert (out / "pattern" / "pattern.safetensors").read_bytes() == before
    # a short --seq-len over a pattern of small blocks is fine without --block-size (it defaulted to 64 and was
    # compared with --seq-len before the pattern's own block was known)
    short = [a for a in base if a not in ("--block-size", "8")]
    short[short.index("--seq-len") + 1] = "32"
    assert attnlab.cli.main([*short, "--pattern", str(out / "pattern"), "--out", str(tmp_path / "short")]) == 0


def test_merge_rounds_takes_the_median_time_the_largest_peak_and_a_failure_first():
    ok = [{"status": "ok", "ms": m, "peak_mem_bytes": p, "extra_mem_bytes": None} for m, p in ((3.0, 10), (1.0, 30),
                                                                                               (2.0, 20))]
    row = gs.merge_rounds(ok)
    assert row["ms"] == 2.0 and row["peak_mem_bytes"] == 30 and row["ms_rounds"] == [3.0, 1.0, 2.0]
    assert row["repeats"] == 3 and row["extra_mem_bytes"] is None
    bad = gs.merge_rounds(ok[:1] + [{"status": "oom", "error": "out of memory"}] + ok[1:])
    assert bad["status"] == "oom" and bad["error"] == "out of memory"


def test_sparsify_notes_the_floor_of_the_band_and_sinks():
    """sparsify's notes: a global sparse sparsity whose mask keeps well over what was asked (the band and sinks every
    mask keeps) is named (window_sinks is matched to its density: no note of its own), and a run of equal masks is
    named once; a run on target gets no note."""
    from attnlab.cli.sparsify import floor_notes

    def row(tech, fraction, density):
        share, budget = ("layer", "uniform") if tech == "global_sparse" else (None, None)
        return {"technique": tech, "share": share, "budget": budget, "fraction": fraction, "density": density}

    on_target = [row("global_sparse", 0.5, 0.4999), row("window_sinks", 0.5, 0.4997)]
    assert floor_notes(on_target) == []
    floor = [*on_target, row("global_sparse", 0.9, 0.2478), row("window_sinks", 0.9, 0.2478)]
    notes = floor_notes(floor)
    assert len(notes) == 1 and notes[0].startswith("note: global sparse (layer, uniform) could not prune as asked at "
                                                   "90% (keeps 0.248, not 0.100)"), notes
    again = floor_notes([*floor, row("global_sparse", 0.95, 0.2478)])  # one note for the run of equal masks
    assert len(again) == 1 and "keeps the same 0.248 of the causal pairs from 90% on" in again[0], again
