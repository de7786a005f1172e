"""attnlab vision and python -m attnlab.vision.report: bad input is one line on stderr and exit code 2, before any
data is read (the dataset readers are replaced by ones that fail the test if called)."""
from __future__ import annotations

import json

import pytest

from tests.helpers import assert_cli_one_line_error

TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32", "--no-progress"]


@pytest.fixture
def no_data(monkeypatch):
    """Reading Fashion-MNIST fails the test: every check below must come first."""
    import attnlab.vision.data as vdata

    def refuse(*a, **k):
        raise AssertionError("the dataset was read before the bad input was refused")

    monkeypatch.setattr(vdata, "fashion_mnist_dir", refuse)
    monkeypatch.setattr(vdata, "fashion_mnist", refuse)


@pytest.mark.parametrize("args,match", [
    (["--methods", "reduce", "--epochs", "1", "--warmup-epochs", "0", "--train-size", "512", "--test-size", "10"],
     "method 'reduce' changes the sequence length"),
    (["--methods", "sdpa,reduce", "--patch", "7,4"], "method 'reduce' changes the sequence length"),
    (["--heads", "0"], "heads must be an integer >= 1, got 0"),
    (["--warmup-epochs", "5", "--epochs", "1"], "warmup_epochs 5.0 must be less than epochs 1"),
    (["--train-size", "70000"], "train_size 70000 exceeds the 60000 Fashion-MNIST training images"),
    (["--test-size", "99999"], "test_size 99999 exceeds the 10000 Fashion-MNIST test images"),
    (["--train-size", "100"], "batch_size 512 exceeds the 100 training images"),
])
def test_vision_refuses_in_one_line_before_the_data(args, match, tmp_path, capsys, no_data):
    assert_cli_one_line_error(["vision", *TINY, *args, "--out", str(tmp_path / "out")], match, capsys,
                              tmp_path / "out")


@pytest.mark.parametrize("args,warmup", [(["--epochs", "1"], 0.0), (["--epochs", "3"], 1.0),
                                         (["--epochs", "3", "--warmup-epochs", "0.5"], 0.5)])
def test_vision_default_warmup_ends_before_the_run(args, warmup, tmp_path, monkeypatch):
    """Left out, the warmup is one epoch, none in a one-epoch run (the README's CPU command): never refused."""
    import attnlab.cli
    import attnlab.vision.data as vdata
    import attnlab.vision.train as vtrain

    seen = {}
    monkeypatch.setattr(vdata, "fashion_mnist_dir", lambda: tmp_path)
    monkeypatch.setattr(vtrain, "run_vision", lambda methods, cfg, **kw: seen.setdefault("cfg", cfg) and [])
    attnlab.cli.main(["vision", *TINY, *args, "--methods", "sdpa", "--no-plot", "--out", str(tmp_path / "out")])
    assert seen["cfg"].warmup_epochs == warmup


def test_batch_size_error_comes_before_the_banner(tmp_path, capsys, no_data):
    import attnlab.cli

    assert attnlab.cli.main(["vision", "--train-size", "100", *TINY, "--out", str(tmp_path / "o")]) == 2
    out, err = capsys.readouterr()
    assert "attnlab vision:" not in out and "batch_size 512 exceeds the 100 training images" in err


@pytest.mark.parametrize("under", [False, True])
def test_vision_out_that_is_a_file_is_one_line(under, tmp_path, capsys, no_data):
    """--out naming an existing file (or a folder under one): vision's run() checks it (it may be called without
    main), and through the CLI (main checks every command's --out)."""
    import attnlab.cli
    from attnlab.cli import vision as cli_vision
    from attnlab.types import AttnlabError

    f = tmp_path / "f"
    f.write_text("x")
    out = f / "sub" if under else f
    args = attnlab.cli.build_parser().parse_args(["vision", "--methods", "sdpa", *TINY, "--out", str(out)])
    with pytest.raises(AttnlabError, match="is a file, so the folder cannot be made" if under else "is a file, not"):
        cli_vision.run(args)
    assert_cli_one_line_error(["vision", *TINY, "--out", str(out)], "is a file", capsys)
    assert f.read_text() == "x"


def test_help_says_peak_memory_is_cuda_only_and_what_decays(capsys):
    import attnlab.cli

    with pytest.raises(SystemExit):
        attnlab.cli.main(["vision", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(on CUDA) peak memory" in text
    assert "not biases, norms, the position embedding or the CLS token" in text


# ---- python -m attnlab.vision.report -----------------------------------------------------------------
def _report_error(argv, match, capsys):
    from attnlab.vision.report import main

    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and match in lines[0], err


def _good_file(tmp_path):
    row = {"method": "sdpa", "patch": 4, "seq_len": 50, "epochs": 1, "test_accuracy": 0.5, "epoch_s": 1.0,
           "train_images": 64, "test_images": 16, "batch_size": 64, "device": "cpu", "dtype": "float32", "seed": 0}
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(row) + "\n")
    return good


@pytest.mark.parametrize("content,match", [
    (None, "no such file"), ("", "is empty"), ("{}", "has no 'rows'"), ('{"rows": []}', "holds no result rows"),
    ("not json", "is not JSON"), ('{"rows": [{"x": 1}]}', "is not an attnlab vision row"),
])
def test_report_bad_files_are_one_line(content, match, tmp_path, capsys):
    p = tmp_path / "r.json"
    if content is not None:
        p.write_text(content)
    _report_error([str(_good_file(tmp_path)), str(p)], match, capsys)


def test_report_bad_jsonl_line_is_one_line(tmp_path, capsys):
    p = tmp_path / "r.jsonl"
    p.write_text('{"method": "sdpa", "patch": 4, "error": "x"}\n{oops\n')
    _report_error([str(p)], "line 2 is not JSON", capsys)


@pytest.mark.parametrize("where,match", [("file/x.png", "is a file, not a folder"), ("dir", "is a folder"),
                                         ("x.txt", "matplotlib writes no '.txt' files"),
                                         ("plot", "with its extension (e.g.")])
def test_report_bad_out_is_one_line_before_reading(where, match, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    _report_error([str(tmp_path / "missing.json"), "--out", str(tmp_path / where)], match, capsys)  # --out first


def test_report_argparse_errors_are_one_line(capsys):
    from attnlab.vision.report import main

    with pytest.raises(SystemExit) as exc:
        main([])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1


def test_report_writes_table_and_plot(tmp_path, capsys):
    from attnlab.vision.report import main

    assert main([str(_good_file(tmp_path)), "--out", str(tmp_path / "new" / "p.png"), "--markdown"]) == 0
    assert (tmp_path / "new" / "p.png").stat().st_size > 1000
    assert "| sdpa | 4 | 50 |" in capsys.readouterr().out
