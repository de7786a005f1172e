"""`attnlab advise`: the greedy path on a hand-made scan, the spec it writes, verification on a tiny model, CLI."""
from __future__ import annotations

import json

import pytest

import attnlab
from attnlab.advice.advise import advise, attention_costs, greedy_path, spec_of
from tests.helpers import assert_cli_one_line_error

COSTS = {"original": {"ms": 4.0}, "a": {"ms": 1.0}, "b": {"ms": 2.0}}
KL = {(0, "a"): 0.5, (0, "b"): 0.1, (1, "a"): 0.01, (1, "b"): 0.005, (2, "a"): 2.0, (2, "b"): 0.0}


def test_greedy_path_takes_the_most_time_saved_per_kl_first():
    rows = [{"layer": layer, "method": m, "kl": k} for (layer, m), k in KL.items()]
    path = greedy_path(rows, COSTS, 3)
    moves = []
    for prev, step in zip(path, path[1:]):
        (layer,) = [i for i in range(3) if prev["assign"][i] != step["assign"][i]]
        moves.append((layer, step["assign"][layer]))
    # free first (layer 2 -> b adds no KL), then 2/0.005 = 400 per nat, 1/0.005 = 200, 2/0.1 = 20, 1/0.4, 1/2
    assert moves == [(2, "b"), (1, "b"), (1, "a"), (0, "b"), (0, "a"), (2, "a")]
    assert [round(p["ms"], 6) for p in path] == [12, 10, 8, 7, 5, 4, 3]
    assert path[3]["kl_est"] == pytest.approx(0.01) and path[-1]["kl_est"] == pytest.approx(2.51)


def test_costs_from_committed_rows(tmp_path):
    from attnlab.advice.advise import costs_from_rows

    row = {"impl": "attnlab", "causal": True, "mode": "fwd", "status": "ok", "batch": 4, "heads": 16, "head_dim": 64,
           "device_name": "NVIDIA H200"}
    rows = [{**row, "method": "sdpa", "seq_len": 8192, "ms": 1.2}, {**row, "method": "window", "seq_len": 8192, "ms": 0.6,
             "options": {"window": 256}}, {**row, "method": "window", "seq_len": 8192, "ms": 9.0, "causal": False},
            {**row, "method": "linear", "seq_len": 4096, "ms": 1.4}]
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps({"rows": rows}))
    got = costs_from_rows(f, ["window"], seq_len=8192)
    assert got["original"]["ms"] == 1.2 and got["window"]["ms"] == 0.6  # the causal row, sdpa for the original
    assert got["window"]["options"] == {"window": 256} and got["window"]["device_name"] == "NVIDIA H200"
    with pytest.raises(attnlab.AttnlabError, match=r"no causal fwd row for linear at 8192 tokens \(lengths there: \[4096\]\)"):
        costs_from_rows(f, ["window", "linear"], seq_len=8192)


def test_spec_of_names_each_methods_layers():
    spec = spec_of({0: "a", 1: "original", 2: "a", 3: "b"}, {"a": {"x": 1}, "b": {}}, seed=5)
    d = spec.to_dict()
    assert [(r["layers"], r["method"], r["options"]) for r in d["rules"]] == [("0,2", "a", {"x": 1}), ("3", "b", {})]
    assert d["seed"] == 5


def test_advise_on_a_tiny_model_verifies_and_keeps_within_the_budget():
    import torch

    from attnlab.advice.scan import scan
    from tests.adapters import tiny_model

    model = tiny_model("llama", num_hidden_layers=3)
    windows = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    methods = {"window": {"window": 4, "sinks": 1}, "linear": {}}
    rows = scan(model, windows, methods, progress=False)
    measured = attention_costs(model, methods, seq_len=32, repeats=2)
    assert set(measured) == {"original", "window", "linear"} and all(c["ms"] > 0 for c in measured.values())
    costs = {"original": {"ms": 3.0}, "window": {"ms": 1.0}, "linear": {"ms": 2.0}}  # as at a long length
    budget = sorted(r["kl"] for r in rows)[2] + 1e-9  # a budget a few layers fit
    res = advise(model, windows, rows, costs, methods, max_kl=budget, points=3, progress=False)
    assert len(res["path"]) >= 4 and res["path"][0]["kl_est"] == 0
    assert {s["method"] for s in res["singles"]} == {"window", "linear"}
    rec = res["recommended"]
    if rec is not None:
        assert rec["kl"] <= budget and rec["switched"] >= 1
        spec = attnlab.SwapSpec.from_json(json.dumps(rec["spec"]))
        with attnlab.swapped(model, spec):
            assert sum(p.method != "original" for p in attnlab.swapped_layers(model)) == rec["switched"]
    assert all(v["kl"] > budget for v in res["verified"] if v["step"] > 0 and (rec is None or v["ms"] < rec["ms"]))


@pytest.mark.parametrize("args,match", [
    (["--max-kl", "0"], "--max-kl must be > 0"),
    (["--methods", "nope"], "unknown attention method"),
    (["--methods", "linformer"], "cannot do causal"),
    (["--points", "0"], "--points must be an integer >= 1"),
    (["--scan", "/no/such.json"], "not a readable scan.json"),
    (["--num-tokens", "8", "--seq-len", "16"], "less than one window"),
    (["--cost-from", "/no/such.json"], "not a readable JSON file"),
    (["--cost-len", "0"], "--cost-len must be an integer >= 2"),  # not silently --seq-len
    (["--seq-len", "9000", "--num-tokens", "9000"], "exceeds the model's max_position_embeddings=8192"),
])
def test_cli_bad_input_is_one_line(args, match, tmp_path, capsys, monkeypatch):
    import attnlab.models

    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    assert_cli_one_line_error(["advise", *args, "--out", str(tmp_path / "out")], match, capsys, tmp_path / "out")


def test_cli_scan_from_another_model_is_refused(tmp_path, capsys, monkeypatch):
    import attnlab.models

    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    f = tmp_path / "scan.json"
    row = {"method": "window", "options": {"window": 128, "sinks": 4}, "layer": 0, "kl": 0.01}
    f.write_text(json.dumps({"model": "other", "seq_len": 512, "rows": [row]}))
    assert_cli_one_line_error(["advise", "--scan", str(f), "--out", str(tmp_path / "out")], "was made for model",
                              capsys, tmp_path / "out")
    # a scan of another text or seed measured other KLs than advise verifies: refused, naming what differs
    f.write_text(json.dumps({"model": "smollm2", "seq_len": 512, "text": "other.txt", "seed": 3, "rows": [row]}))
    assert_cli_one_line_error(["advise", "--scan", str(f), "--out", str(tmp_path / "out")],
                              "measured with text 'other.txt' (here 'moby (held-out tail)'), seed 3 (here 0)",
                              capsys, tmp_path / "out")


@pytest.mark.parametrize("rows", [[{"method": "window"}], 5, [], [{"method": "window", "options": {}, "layer": 0}]])
def test_cli_malformed_scan_rows_are_one_line(rows, tmp_path, capsys, monkeypatch):
    import attnlab.models

    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    f = tmp_path / "scan.json"
    f.write_text(json.dumps({"model": "smollm2", "seq_len": 512, "rows": rows}))
    assert_cli_one_line_error(["advise", "--scan", str(f), "--out", str(tmp_path / "out")], "not a readable scan.json",
                              capsys, tmp_path / "out")


def test_cli_end_to_end_on_a_tiny_model(tiny_lm_dir, tmp_path, capsys):
    import attnlab.cli

    out = tmp_path / "out"
    out.mkdir()
    (out / "spec.json").write_text("an earlier run's")  # replaced by this run's, or removed if it recommends none
    assert attnlab.cli.main(["advise", "--model", str(tiny_lm_dir), "--methods", "window,linear", "--set",
                             "window.window=8", "--seq-len", "64", "--num-tokens", "128", "--max-kl", "1000",
                             "--points", "2", "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "advise.json").read_text())
    assert res["singles"] and res["costs"]["original"]["ms"] > 0 and (out / "advise.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    if res["recommended"] is None:  # at 64 tokens on a CPU the original may be the cheapest: then it says so
        assert len(res["path"]) == 1 and "cheaper than the original" in printed and not (out / "spec.json").exists()
    else:
        spec = attnlab.SwapSpec.from_json((out / "spec.json").read_text())
        assert {r.method for r in spec.rules} <= {"window", "linear"} and "Recommendation:" in printed
