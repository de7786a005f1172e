"""Bad input from the command line: one clear line (exit code 2) before any heavy work, never a traceback and never a
silent substitute. The cases a fuzz of every subcommand found getting through: a local model folder whose weights,
type or tokenizer are wrong, a spec with a misspelt key, a saved attention of another model, empty lists, unchecked
numbers, a text that is not UTF-8 and an --out nothing can be written in."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import attnlab
import attnlab.cli
import attnlab.models
from attnlab.types import AttnlabError


def refused(capsys, *args) -> str:
    capsys.readouterr()
    with torch.random.fork_rng():
        rc = attnlab.cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err[-1500:]
    assert "Traceback" not in err, err[-1500:]
    return err


def no_load(monkeypatch):
    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))


@pytest.fixture
def model_copy(tiny_lm_dir, tmp_path):
    """A writable copy of the tiny random Llama folder, to damage."""
    def make(name="m"):
        dst = tmp_path / name
        shutil.copytree(tiny_lm_dir, dst)
        return dst
    return make


def test_a_model_folder_with_corrupt_weights_an_unknown_type_or_no_tokenizer_is_one_line(model_copy, tmp_path,
                                                                                        capsys, monkeypatch):
    out = tmp_path / "out"
    trunc = model_copy("trunc")
    st = trunc / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    garbage = model_copy("garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 300)
    badtype = model_copy("badtype")
    cfg = json.loads((badtype / "config.json").read_text())
    (badtype / "config.json").write_text(json.dumps({**cfg, "model_type": "nosuchtype"}))
    no_load(monkeypatch)
    for folder, match in ((trunc, "model.safetensors is corrupt or truncated"),
                          (garbage, "model.safetensors is corrupt or truncated"),
                          (badtype, "model_type 'nosuchtype' is not one transformers")):
        err = refused(capsys, "compare", "--quick", "--methods", "sdpa", "--model", folder, "--out", out)
        assert match in err, err
    assert not out.exists()


def test_weights_that_do_not_match_the_config_are_refused_not_run_at_random(model_copy):
    """from_pretrained fills what a checkpoint lacks with its random initialisation and goes on: attnlab refuses."""
    more = model_copy("more")
    cfg = json.loads((more / "config.json").read_text())
    (more / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}))
    with pytest.raises(AttnlabError, match=r"its weights do not match its config.json \(\d+ of \d+ tensors missing.*"
                                           r"layers\.2\."):
        attnlab.models.load(str(more))
    wide = model_copy("wide")  # a tensor of another shape: transformers' own error pointed at a hidden report
    (wide / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] + 8}))
    with pytest.raises(AttnlabError, match=r"its weights do not match its config.json .*mlp"):
        attnlab.models.load(str(wide))
    notok = model_copy("notok")
    for f in notok.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(AttnlabError, match="transformers cannot build its tokenizer"):
        attnlab.models.load(str(notok))
    model, _ = attnlab.models.load(str(model_copy("fine")))  # the intact folder loads
    assert type(model).__name__ == "LlamaForCausalLM"


def test_an_encoder_saved_from_a_task_class_without_a_pooler_loads(tmp_path, tiny_lm_dir):
    """An MLM or classifier checkpoint often has no pooler; AutoModel reports it missing, and attnlab never reads it."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    folder = tmp_path / "mlm"
    BertForMaskedLM(cfg).save_pretrained(folder)
    for f in Path(tiny_lm_dir).glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    model, _ = attnlab.models.load(str(folder))
    assert type(model).__name__ == "BertModel"


def test_a_causal_lm_saved_without_its_architectures_is_still_a_causal_lm(model_copy):
    """A config written by AutoConfig alone (no `architectures`, as attnlab's own SmolLM2 cache) is read by its type."""
    bare = model_copy("bare")
    cfg = json.loads((bare / "config.json").read_text())
    cfg.pop("architectures", None)
    (bare / "config.json").write_text(json.dumps(cfg))
    assert attnlab.models.resolve(str(bare))[1] is True


@pytest.mark.parametrize("spec, match", [
    ([], "not a swap spec (a JSON list)"),
    ("hello", "not a swap spec (a JSON str)"),
    ({"rules": [{"layer": "0", "method": "window"}]}, "swap spec rule 1: unknown key 'layer'"),
    ({"rules": [], "sed": 1}, "swap spec: unknown key 'sed'"),
    ({"rules": {"0": "window"}}, "'rules' is dict, not a list"),
])
def test_a_spec_file_with_a_misspelt_key_or_the_wrong_json_is_refused(spec, match, tmp_path, capsys, monkeypatch,
                                                                       tiny_lm_dir):
    """A misspelt rule key once became the default (`layer` read as every layer): every unknown key is an error."""
    f = tmp_path / "s.json"
    f.write_text(json.dumps(spec))
    no_load(monkeypatch)
    err = refused(capsys, "compare", "--quick", "--spec", f, "--model", tiny_lm_dir, "--out", tmp_path / "out")
    assert match in err, err


def test_distill_refuses_a_spec_that_swaps_no_layer_before_the_load(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    no_load(monkeypatch)
    for i, rules in enumerate(([], [{"layers": "*", "method": "original"}],
                               [{"layers": "0", "method": "hybrid"}, {"layers": "*", "method": "original"}])):
        f = tmp_path / f"s{i}.json"
        f.write_text(json.dumps({"rules": rules}))
        err = refused(capsys, "distill", "--model", tiny_lm_dir, "--spec", f, "--seq-len", "32", "--out",
                      tmp_path / "out")
        assert "leaves every layer its original attention, so there is nothing to distil" in err, err


def test_compare_refuses_a_spec_that_swaps_no_layer_before_the_load(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """Its row was the original's again, under the spec's name."""
    no_load(monkeypatch)
    for i, rules in enumerate(([], [{"layers": "*", "method": "original"}])):
        f = tmp_path / f"s{i}.json"
        f.write_text(json.dumps({"rules": rules}))
        err = refused(capsys, "compare", "--quick", "--model", tiny_lm_dir, "--spec", f, "--out", tmp_path / "out")
        assert f"spec:s{i}: the spec leaves every layer its original attention" in err, err


def test_a_saved_attention_of_another_model_is_refused_before_the_load(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """The layer count and head shapes are in the saved metadata: checked against the model's skeleton."""
    from tests.adapters import tiny_model

    other = tiny_model("llama", num_hidden_layers=3)
    attnlab.swap(other, "hedgehog", feature_dim=8)
    saved = attnlab.save(other, tmp_path / "att")
    no_load(monkeypatch)
    for argv in (["compare", "--quick", "--methods", "sdpa", "--load", saved],
                 ["distill", "--init", saved, "--seq-len", "32"]):
        err = refused(capsys, *argv, "--model", tiny_lm_dir, "--out", tmp_path / "out")
        assert "was saved for a model with number of attention layers 3; this model has 2" in err, err


@pytest.mark.parametrize("argv, match", [
    (["compare", "--methods", ""], "--methods is empty"),
    (["compare", "--methods", ","], "--methods is empty"),
    (["harness", "--methods", ","], "--methods is empty"),
    (["harness", "--seq-len", "0"], "--seq-len must be an integer >= 2"),
    (["prune", "--seq-len", "0"], "--seq-len must be an integer >= 4"),
    (["sparsify", "--data", ","], "--data is empty"),  # was refused only after the model loaded, naming --train
    (["compress", "train", "--data", ","], "--data is empty"),
    (["bench", "--methods", ","], "--methods is empty"),
    (["bench", "--methods", "sdpa", "--lengths", ""], "--lengths must be positive integers"),
    (["bench", "--methods", "sdpa", "--peers", "nosuch"], "--peers: unknown peer 'nosuch'"),
    (["bench", "--methods", "sdpa", "--peers", ","], "--peers is empty"),
    (["compare", "--task", "spam", "--model", "minilm", "--num-tokens", "512"], "--num-tokens applies to --task lm"),
    (["bench", "--methods", "sdpa", "--time-budget", "-5"], "--time-budget must be a positive number"),
    (["bench", "--methods", "sdpa", "--max-row-seconds", "0"], "--max-row-seconds must be a positive number"),
    (["bench", "--methods", "sdpa", "--name", "a/b"], "--name 'a/b': a file stem"),
])
def test_empty_lists_and_unchecked_numbers_are_refused(argv, match, tmp_path, capsys, monkeypatch):
    """Each once ran the default (every method, the default length) or ran on, in silence."""
    pytest.importorskip("lm_eval") if argv[0] == "harness" else None
    no_load(monkeypatch)
    err = refused(capsys, *argv, "--out", tmp_path / "out")
    assert match in err, err


def test_a_text_that_is_not_utf8_or_is_a_folder_is_refused(tmp_path):
    from attnlab import data

    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(AttnlabError, match=r"is not UTF-8 text \(byte 0xe9 at offset 3\)"):
        data.read_text(str(f))
    with pytest.raises(AttnlabError, match="is a folder, not a text file"):
        data.read_text(str(tmp_path))
    with pytest.raises(AttnlabError, match="is not UTF-8 text"):  # as a training corpus: before any model loads
        data.check_corpora([str(f)])
    f.write_text("café au lait", encoding="utf-8")
    assert data.read_text(str(f)) == "café au lait"


@pytest.mark.skipif(not Path("/proc/self").is_dir() or os.geteuid() != 0,
                    reason="needs Linux's /proc, as root (for whom os.access says yes there)")
def test_an_out_folder_nothing_can_be_written_in_is_refused_even_for_root():
    """os.access says yes to root everywhere: the check writes (and removes) a file to know."""
    from attnlab.cli.common import check_out_folder

    with pytest.raises(AttnlabError, match="nothing can be written in /proc"):
        check_out_folder("/proc/attnlab-out")


def test_quick_says_which_given_lengths_it_does_not_use(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """--quick runs 2 windows of 64 tokens; an explicit longer --seq-len or --num-tokens is named, not dropped in
    silence (the run is stopped at the load here)."""
    def stop(*a, **k):
        raise AttnlabError("stopped at the load")

    monkeypatch.setattr(attnlab.models, "load", stop)
    err = refused(capsys, "compare", "--quick", "--methods", "sdpa", "--seq-len", "512", "--num-tokens", "4096",
                  "--model", tiny_lm_dir, "--out", tmp_path / "out")
    assert "--quick runs 2 windows of 64 tokens, not --seq-len 512 and --num-tokens 4096" in err, err
    err = refused(capsys, "compare", "--quick", "--methods", "sdpa", "--seq-len", "32", "--model", tiny_lm_dir,
                  "--out", tmp_path / "out")
    assert "--quick runs" not in err and "stopped at the load" in err, err


@pytest.mark.parametrize("name", ["sdpa", "performer", "rfa", "window"])
def test_a_call_with_a_bad_scale_or_causal_flag_is_one_error(name):
    """scale=-1 was a math domain error 9 frames down in the random-feature methods and scale=nan all-NaN outputs;
    causal="yes" was truthy for some methods and a TypeError inside SDPA for others."""
    m = attnlab.make(name, head_dim=8, num_heads=2)
    q = k = v = torch.randn(1, 2, 16, 8)
    positive = name in ("performer", "rfa")  # random features take sqrt(scale); softmax takes any finite scale
    for scale in (float("nan"), float("inf"), "x", True) + ((-1.0, 0.0) if positive else ()):
        with pytest.raises(AttnlabError, match=f"{name}: scale must be a finite number{' > 0' * positive}, got"):
            m(q, k, v, scale=scale)
    if not positive:
        assert torch.isfinite(m(q, k, v, scale=-1.0).out).all()
    with pytest.raises(AttnlabError, match=f"{name}: causal must be True or False, got 'yes'"):
        m(q, k, v, causal="yes")
    ref = m(q, k, v, causal=True).out
    for flag in (1, np.bool_(True), torch.tensor(True)):  # booleans of another type run as True, in every method
        assert torch.equal(m(q, k, v, causal=flag).out, ref)
    assert torch.isfinite(m(q, k, v, scale=0.5, causal=True).out).all()


def test_vision_refuses_a_max_len_shorter_than_the_patch_length():
    """It once trained nothing and exited 0 with a "not run" row: the length is known from the patch size."""
    from attnlab.vision.train import VisionConfig, check_methods

    cfg = VisionConfig(patches=(4,), epochs=1, train_size=1024, test_size=64)
    with pytest.raises(AttnlabError, match="linformer with max_len=10 cannot take patch 4's 50 tokens"):
        check_methods(["linformer"], cfg, {"linformer": {"max_len": 10}})
    check_methods(["linformer"], cfg, {"linformer": {"max_len": 50}})
