"""`attnlab compress`: bad input is one line (exit 2) before any model loads: an empty or token-less --text, --lengths
no model can evaluate, an -o path that cannot be written, a training run folder given as --model. And the library
under them: no ZeroDivisionError on an empty text, no crash in the report plot for a model with no (or other)
lengths. A tiny untrained model folder (MiniLM's tokenizer) serves them all; nothing is trained."""
from __future__ import annotations

import json

import pytest

import attnlab.cli
from attnlab.compress import codec, store
from attnlab.compress.model import AutoencoderConfig, SequenceAutoencoder
from attnlab.types import AttnlabError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder inside a run folder like `compress train --out RUN` writes, model, tokenizer); max_len 32."""
    import attnlab.models

    if not attnlab.models.is_installed("minilm"):
        pytest.skip("the minilm tokenizer is not installed")
    tok = store.load_tokenizer("minilm")
    cfg = AutoencoderConfig(vocab_size=len(tok), ratio=0.5, max_len=32, dim=16, heads=2, enc_layers=1, dec_layers=1,
                            mlp_dim=32, latent_dim=4, radius=2)
    model = SequenceAutoencoder(cfg).eval()
    run = tmp_path_factory.mktemp("ae") / "run"
    path = store.save(model, tok, run / "model")
    (run / "config.json").write_text(json.dumps({"ratio": 0.5, "max_len": 32}))  # the run's TrainConfig, as train writes
    return path, model, tok


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: every refusal here must come before it."""
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(store, "load", boom)


def one_line_error(argv, capsys, match: str) -> str:
    assert attnlab.cli.main(["compress", *map(str, argv)]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1 and err.startswith("attnlab: error:"), err
    return err


@pytest.mark.parametrize("content,match", [("", "is empty"), ("  \n\t \n", "has no tokens")])
def test_eval_text_with_nothing_to_encode_is_one_line(tiny, content, match, tmp_path, capsys, no_model_load):
    text = tmp_path / "t.txt"
    text.write_text(content)
    err = one_line_error(["eval", "--models", tiny[0], "--text", text, "--lengths", "16", "--out", tmp_path / "out"],
                         capsys, match)
    assert f"--text {str(text)!r}" in err
    assert not (tmp_path / "out" / "compress.json").exists()


def test_codec_library_refuses_an_empty_text_clearly(tiny):
    _, model, tok = tiny
    with pytest.raises(ValueError, match="empty"):  # AttnlabError is a ValueError
        codec.lossless_baselines("")
    with pytest.raises(ValueError, match="no tokens"):
        codec.report(model, tok, "   \n\t", bits_list=(8,))
    assert [r["codec"] for r in codec.lossless_baselines("a")] == ["gzip", "bz2", "xz"]


def test_eval_lengths_beyond_the_trained_length_is_one_line(tiny, tmp_path, capsys, no_model_load):
    text = tmp_path / "t.txt"
    text.write_text("call me ishmael.")
    err = one_line_error(["eval", "--models", tiny[0], "--text", text, "--lengths", "1024", "--out", tmp_path / "out"],
                         capsys, "trained up to 32 tokens")
    assert "1..32" in err
    assert not (tmp_path / "out").exists()


def test_report_plot_skips_models_without_a_shared_length(tmp_path):
    """One model evaluated at no length, two at different lengths: the plot draws what there is, no max() of
    nothing, no KeyError for the length one model lacks."""
    from attnlab.compress import report

    def row(name, ratio, by_length):
        return {"codec": "attnlab", "model": name, "ratio": ratio, "bits": 8, "bytes_per_char": 1.0,
                "char_accuracy": 0.5, "token_accuracy": 0.5, "seed": 0, "steps": 6, "latent_dim": 8,
                "bias": "distance", "by_length": {str(n): {"token_accuracy": 0.5} for n in by_length}}

    rows = [{"codec": "gzip", "bytes_per_char": 0.4}, row("none", 0.5, []), row("short", 0.5, [32, 64]),
            row("long", 0.25, [32, 64, 512])]
    report.plot([rows[0], row("none", 0.5, [])], tmp_path / "b.png")  # was: max() of an empty sequence
    report.plot(rows, tmp_path / "a.png")  # was: KeyError '512' for the model trained to 64
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0
    assert report.longest_length([r for r in rows if r["codec"] == "attnlab"]) == 64  # the longest shared length


@pytest.mark.parametrize("cmd", ["encode", "decode"])
@pytest.mark.parametrize("where,match", [("file/x", "is a file, not a folder"), (".", "is a folder")])
def test_output_path_is_checked_before_the_model(tiny, cmd, where, match, tmp_path, capsys, no_model_load):
    src = tmp_path / "in.txt"
    src.write_text("call me ishmael.")
    (tmp_path / "file").write_text("")
    out = tmp_path / where
    one_line_error([cmd, src, "--model", tiny[0], "-o", out], capsys, match)
    assert (tmp_path / "file").read_text() == ""


def test_run_folder_as_model_names_its_model_folder(tiny, tmp_path, capsys, no_model_load):
    path = tiny[0]
    run = path.parent
    with pytest.raises(AttnlabError, match="training run folder"):
        store.read_config(run)
    err = one_line_error(["encode", run / "config.json", "--model", run, "-o", tmp_path / "x.alc"], capsys,
                         "training run folder")
    assert str(path) in err
    assert not (tmp_path / "x.alc").exists()
    store.read_config(path)  # the model folder itself is fine
