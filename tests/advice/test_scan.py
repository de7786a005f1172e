"""attnlab scan: one method in one layer at a time. An exact-limit swap in any layer moves nothing, a harsh one
moves the model, each layer's seed is the one a whole-model swap gives it, and the CLI checks its input."""
from __future__ import annotations

import json

import pytest
import torch

from attnlab.adapters.spec import SwapSpec
from attnlab.advice import scan
from tests.helpers import assert_cli_one_line_error


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    g = torch.Generator().manual_seed(0)
    return model, torch.randint(0, 1000, (2, 24), generator=g)


def test_exact_limit_moves_nothing_and_a_narrow_window_moves_the_model(tiny):
    model, windows = tiny
    rows = scan(model, windows, {"window": {"window": 64}, "sdpa": {}}, progress=False)
    assert [(r["method"], r["layer"]) for r in rows] == [("window", 0), ("window", 1), ("sdpa", 0), ("sdpa", 1)]
    assert all(r["kl"] < 1e-6 and r["top1"] == 1.0 for r in rows)
    narrow = scan(model, windows, {"window": {"window": 1, "sinks": 0}}, layers=[1], progress=False)
    assert len(narrow) == 1 and narrow[0]["layer"] == 1 and narrow[0]["kl"] > 1e-4
    assert narrow[0]["ppl_original"] == pytest.approx(rows[0]["ppl_original"])


def test_a_layer_gets_the_seed_it_gets_in_a_whole_model_swap():
    names = [f"layers.{i}.self_attn" for i in range(4)]
    whole = SwapSpec.of("performer").with_seed(3).plan(names)
    for i in range(4):
        one = SwapSpec.of({str(i): ("performer", {})}).with_seed(3).plan(names)
        assert one[i].options["seed"] == whole[i].options["seed"]
        assert all(p.method == "original" for j, p in enumerate(one) if j != i)


@pytest.mark.parametrize("args,match", [
    (["--layers", "a"], "--layers expects indices"),
    (["--layers", "-1"], "--layers expects"),
    (["--methods", "nosuch"], "unknown attention method"),
    (["--methods", "linformer"], "cannot do causal attention"),
    (["--seq-len", "0"], "--seq-len must be an integer >= 2"),
    (["--seq-len", "64", "--num-tokens", "32"], "less than one window"),
    (["--set", "window.nosuch=1", "--methods", "window"], "has no option"),
    (["--model", "/no/such/folder"], "neither a packaged model"),
    (["--layers", "5-2"], "the range '5-2' runs backwards (write 2-5)"),
    (["--layers", "0-99"], "the model has 30 attention layers"),
    (["--seq-len", "9000", "--num-tokens", "9000"], "exceeds the model's max_position_embeddings=8192"),
    (["--out", "FILE"], "is a file, not a folder"),  # before the scan, not after it
])
def test_cli_bad_input_is_one_line(args, match, tmp_path, capsys, monkeypatch):
    import attnlab.models

    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    (tmp_path / "FILE").write_text("")
    args = [str(tmp_path / a) if a == "FILE" else a for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "out")]
    assert_cli_one_line_error(["scan", *args, *out], match, capsys, tmp_path / "out")


def test_cli_end_to_end_on_a_tiny_model(tiny_lm_dir, tmp_path, capsys):
    import attnlab.cli

    out = tmp_path / "out"
    argv = ["scan", "--model", str(tiny_lm_dir), "--methods", "window,linear", "--seq-len", "32", "--num-tokens", "64",
            "--no-progress", "--out", str(out)]
    assert attnlab.cli.main(argv) == 0
    res = json.loads((out / "scan.json").read_text())
    assert len(res["rows"]) == 4 and {r["method"] for r in res["rows"]} == {"window", "linear"}
    assert res["rows"][0]["options"] == {"window": 8, "sinks": 4} or "window" in res["rows"][0]["options"]
    assert (out / "scan.png").stat().st_size > 5_000
    assert "most sensitive layers" in capsys.readouterr().out
    assert_cli_one_line_error([*argv[:-2], "--layers", "5", "--out", str(tmp_path / "o2")], "has 2 attention layers",
                              capsys)
