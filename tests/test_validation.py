"""Bad input gets one clear attnlab error before any compute."""
import pytest
import torch

import attnlab
from tests.helpers import make, rand_qkv


@pytest.fixture
def qkv():
    return rand_qkv(b=2, h=4, tq=8, d=16, hkv=2)


def test_wrong_rank(qkv):
    q, k, v = qkv
    m = make("dense", q, k)
    with pytest.raises(attnlab.ShapeError, match="4D"):
        m(q[0], k, v)


def test_head_dim_mismatch(qkv):
    q, k, v = qkv
    m = make("dense", q, k)
    with pytest.raises(attnlab.ShapeError, match="head_dim"):
        m(q, k[..., :8], v)


def test_kv_heads_must_divide():
    q, k, v = rand_qkv(h=4, hkv=3)
    m = attnlab.make("dense", head_dim=16, num_heads=4)
    with pytest.raises(attnlab.ShapeError, match="must divide"):
        m(q, k, v)


def test_num_heads_checked(qkv):
    q, k, v = qkv
    m = attnlab.make("dense", head_dim=16, num_heads=8)
    with pytest.raises(attnlab.ShapeError, match="num_heads=8"):
        m(q, k, v)


def test_padding_mask_shape_and_dtype(qkv):
    q, k, v = qkv
    m = make("dense", q, k)
    with pytest.raises(attnlab.ShapeError, match="key_padding_mask"):
        m(q, k, v, key_padding_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(attnlab.ShapeError, match="must be bool"):
        m(q, k, v, key_padding_mask=torch.ones(2, 8))


def test_attn_mask_must_broadcast(qkv):
    q, k, v = qkv
    m = make("dense", q, k)
    with pytest.raises(attnlab.ShapeError, match="broadcast"):
        m(q, k, v, attn_mask=torch.ones(3, 8, 8, dtype=torch.bool))


def test_mixed_dtypes(qkv):
    q, k, v = qkv
    m = make("dense", q, k)
    with pytest.raises(attnlab.ShapeError, match="dtypes differ"):
        m(q.double(), k, v)


def test_probs_not_available_is_an_error(qkv):
    q, k, v = qkv
    with pytest.raises(attnlab.UnsupportedError, match="cannot return attention probabilities"):
        make("sdpa", q, k)(q, k, v, need_probs=True)


def test_error_is_raised_before_compute(qkv, monkeypatch):
    q, k, v = qkv
    m = make("sdpa", q, k)
    called = []
    monkeypatch.setattr(type(m), "_attend", lambda *a, **kw: called.append(1))
    with pytest.raises(attnlab.UnsupportedError):
        m(q, k, v, need_probs=True)
    assert not called


def test_every_cli_flag_has_help():
    """Every option of every subcommand says what it does in --help (a newcomer reads nothing else)."""
    import argparse

    from attnlab.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or isinstance(a, argparse._SubParsersAction):
                continue
            if not (a.help or "").strip():
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        for n in nested:
            for sname, sp in n.choices.items():
                missing += [f"{name} {sname} {'/'.join(a.option_strings) or a.dest}" for a in sp._actions
                            if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
        assert (p.description or "").strip(), f"{name} has no description"
    assert not missing, missing


@pytest.mark.parametrize("argv,match", [
    (["nosuchcmd"], "invalid choice: 'nosuchcmd'"),
    (["compare", "--seq-len", "x"], "invalid int value: 'x'"),
    (["vision", "--nosuch"], "unrecognized arguments: --nosuch"),
    (["data", "nosuch"], "invalid choice: 'nosuch'"),
    ([], "the following arguments are required"),
])
def test_argparse_errors_are_one_line(argv, match, capsys):
    """argparse's own errors (unknown flag, bad choice, wrong type) are one line too, not usage + error."""
    from attnlab.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and match in err and "--help" in err, err


def test_an_error_after_a_progress_bar_starts_a_line_of_its_own(monkeypatch, capsys):
    """A bar's carriage returns would put the error on the bar's line (in a pipe too): open bars are closed first."""
    import attnlab.cli.scan
    from tqdm.auto import tqdm

    bars = []  # held, as a running command holds its bar

    def run(args):
        bars.append(tqdm(total=3, desc="working"))
        bars[0].update()
        raise attnlab.AttnlabError("late refusal")

    monkeypatch.setattr(attnlab.cli.scan, "run", run)
    assert attnlab.cli.main(["scan"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "attnlab: error: late refusal", err


def test_check_is_cached_per_request_and_still_refuses(qkv, monkeypatch):
    """A passed request is remembered (the full check is not redone for the same shapes), but anything that
    changes the verdict (another flag, a padding mask of the wrong dtype, a pattern that no longer covers the
    length) is checked again and refused."""
    q, k, v = qkv
    m = make("window", q, k, window=2, backend="torch")
    calls = []
    orig = type(m)._check_uncached
    monkeypatch.setattr(type(m), "_check_uncached", lambda self, *a, **kw: (calls.append(1), orig(self, *a, **kw))[1])
    m(q, k, v, causal=True)
    m(q, k, v, causal=True)
    assert len(calls) == 1
    m(q, k, v, causal=False)
    assert len(calls) == 2
    with pytest.raises(attnlab.ShapeError, match="bool"):
        m(q, k, v, key_padding_mask=torch.ones(2, 8, dtype=torch.int64))
    m(q, k, v, causal=True)
    assert len(calls) == 3  # the refused request was not remembered; the passed ones still are


def test_check_cache_follows_the_pattern_state(qkv):
    """A pattern's coverage can change after a call passed (global_sparse loading a pattern made for a shorter
    length): the pattern's version is part of the cache key, so the same call is checked again and refused."""
    q, k, v = qkv
    m = make("window", q, k, window=2, backend="torch")
    m(q, k, v, causal=True)
    m.pattern.covers = lambda tq, tk: "too long for the pattern"  # what a reloaded, shorter pattern reports
    m.pattern.touch()
    with pytest.raises(attnlab.UnsupportedError, match="too long"):
        m(q, k, v, causal=True)


def test_results_name_the_commit_and_whether_the_sources_differed(tmp_path, monkeypatch):
    """git_commit: HEAD's short hash, with +dirty when attnlab's sources differ from it (a throwaway repository)."""
    import shutil
    import subprocess

    from attnlab.cli import common

    if shutil.which("git") is None:
        pytest.skip("no git")
    pkg = tmp_path / "src" / "attnlab" / "cli"
    pkg.mkdir(parents=True)
    (pkg / "common.py").write_text("x = 1\n")
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    run("add", "-A")
    run("-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "x")
    monkeypatch.setattr(common, "__file__", str(pkg / "common.py"))
    clean = common.git_commit()
    assert clean and "+" not in clean and len(clean) >= 7
    (pkg / "new_method.py").write_text("y = 1\n")  # a new, untracked source file
    assert common.git_commit() == clean + "+dirty"
    (pkg / "new_method.py").unlink()
    (tmp_path / "notes.txt").write_text("outside attnlab's sources: not dirty\n")
    assert common.git_commit() == clean
    (pkg / "common.py").write_text("x = 2\n")
    assert common.git_commit() == clean + "+dirty"


def test_a_backend_that_cannot_run_here_is_refused_naming_the_method():
    q = torch.randn(1, 4, 16, 16)
    for backend in ("efficient", "cudnn"):  # CUDA's kernels: torch's own error was "No viable backend"
        with pytest.raises(attnlab.UnsupportedError, match=f"'sdpa'.*backend='{backend}' runs on CUDA only"):
            attnlab.make("sdpa", head_dim=16, num_heads=4, backend=backend)(q, q, q, causal=True)
    attnlab.make("sdpa", head_dim=16, num_heads=4, backend="math")(q, q, q, causal=True)
    lm = attnlab.make("learned_mask", head_dim=16, num_heads=4, block_size=8, max_blocks=16, backend="flex")
    with pytest.raises(attnlab.UnsupportedError, match="^learned_mask: backend='flex' on CPU cannot train"):
        lm(q, q, q, causal=True)  # training mode: was torch's InductorError
    w = attnlab.make("window", head_dim=16, num_heads=4, window=4, backend="flex")
    with pytest.raises(attnlab.UnsupportedError, match="^window: backend='flex' on CPU is inference-only"):
        w(q.requires_grad_(), q, q, causal=True)


def test_check_out_folder_refuses_what_could_not_take_results(tmp_path, monkeypatch):
    """--out (every command's, checked by main before any work): a file, a file on its way up and a link to nothing
    are one error each; a folder to be made, an existing one and '.' pass."""
    from attnlab.cli.common import check_out_folder
    from attnlab.types import AttnlabError

    (tmp_path / "f").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for bad, match in (("f", "is a file, not a folder"), ("f/sub", "is a file, so the folder cannot be made"),
                       ("dangling", "is a link to nothing")):
        with pytest.raises(AttnlabError, match=match):
            check_out_folder(tmp_path / bad)
    monkeypatch.chdir(tmp_path)
    for good in ("new/deeper", ".", str(tmp_path)):
        check_out_folder(good)
