"""`attnlab harness`: lm-evaluation-harness on the original and swapped model through its Python API, offline on the
local tasks written from the held-out text; bad input is one line before the model loads."""
from __future__ import annotations

import json

import pytest

from attnlab import data
from attnlab.eval import harness
from tests.helpers import assert_cli_one_line_error

lm_eval = pytest.importorskip("lm_eval")


def test_local_task_documents_are_well_formed():
    text = data.moby_dick()
    tail = text[int(len(text) * (1 - data.HELD_OUT)):]
    cloze = harness.cloze_docs(tail)
    assert len(cloze) > 100 and all(len(d["choices"]) == 4 and 0 <= d["gold"] < 4 for d in cloze)
    assert {d["gold"] for d in cloze} == {0, 1, 2, 3}  # the true sentence's place is shuffled
    assert all(d["context"] and d["choices"][d["gold"]] not in d["context"] for d in cloze)
    words = harness.lastword_docs(tail)
    assert len(words) > 100
    for d in words:
        assert d["target"].startswith(" ") and d["target"][1:].replace("'", "").replace("-", "").isalpha()
        assert len(d["context"].split()) == 80
    assert harness.cloze_docs(tail) == cloze  # seeded


def test_harness_runs_original_and_swapped(tiny_lm_dir, tmp_path, capfd, monkeypatch):
    import attnlab.cli

    monkeypatch.chdir(tmp_path)  # outside a git checkout: lm-eval's `git describe` printed "fatal: ..." there
    out = tmp_path / "out"
    assert attnlab.cli.main(["harness", "--model", str(tiny_lm_dir), "--methods", "window", "--set",
                             "window.window=16", "--limit", "8", "--batch-size", "4", "--no-progress",
                             "--out", str(out)]) == 0
    res = json.loads((out / "harness.json").read_text())
    rows = {(r["variant"], r["task"], r["metric"]): r for r in res["rows"]}
    for variant in ("original", "window"):
        assert 0 <= rows[(variant, "attnlab_moby_cloze", "acc")]["value"] <= 1
        assert rows[(variant, "attnlab_moby_cloze", "acc")]["samples"] == 8
        assert rows[(variant, "attnlab_moby_lastword", "perplexity")]["value"] > 1
    # a window narrower than the 80-word contexts changes the log-likelihoods
    assert (rows[("original", "attnlab_moby_lastword", "perplexity")]["value"]
            != rows[("window", "attnlab_moby_lastword", "perplexity")]["value"])
    assert res["lm_eval_version"] == lm_eval.__version__
    stdout, stderr = capfd.readouterr()
    assert "not a git repository" not in stderr, stderr
    assert "it/s]" not in stderr, stderr  # lm-eval's own bars under --no-progress
    assert (out / "harness.png").stat().st_size > 5_000 and "moby_cloze" in stdout
    assert "\nwindow (window=16, sinks=4) " in stdout, stdout  # the variant's options, as in the README's table


@pytest.mark.parametrize("args,match", [
    (["--tasks", ""], "--tasks is empty"),
    (["--limit", "0"], "--limit"),
    (["--methods", "nosuch"], "unknown attention method 'nosuch'"),
    (["--methods", "linformer"], None),  # refused when swapped into a causal LM: checked in test_hf
    (["--model", "minilm"], "not a causal LM"),
])
def test_bad_input_is_one_line(args, match, tmp_path, capsys, monkeypatch):
    if match is None:
        return
    import attnlab.models

    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    assert_cli_one_line_error(["harness", *args, "--out", str(tmp_path / "out")], match, capsys, tmp_path / "out")
