"""`attnlab compress`: a tiny autoencoder overfits a short text; the codec file round-trips to exactly the model's own
reconstruction and refuses damaged or foreign files; a killed training run resumes onto the same loss curve; two
gloo processes equal one; bad input is one line before any work."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attnlab.cli
from attnlab.compress import codec, store
from attnlab.compress.model import AutoencoderConfig, SequenceAutoencoder
from attnlab.compress.train import TrainConfig, cut, token_accuracy, train
from attnlab.train.data import TrainWindows
from tests.helpers import run_killed

REPO = Path(__file__).resolve().parents[2]
TEXT = ("Call me Ishmael. Some years ago - never mind how long precisely - having little or no money in my purse, "
        "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
        "part of the world. ") * 3
TINY = dict(dim=64, heads=2, enc_layers=1, dec_layers=1, mlp_dim=128, latent_dim=8, radius=2)
TINY_ARGS = ["--dim", "32", "--heads", "2", "--enc-layers", "1", "--dec-layers", "1", "--mlp-dim", "64",
             "--latent-dim", "8", "--radius", "2", "--seq-len", "32", "--min-len", "16", "--batch-size", "2",
             "--eval-lengths", "16,32", "--no-progress"]


@pytest.fixture(scope="session")
def short_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "short.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="session")
def trained(short_text, tmp_path_factory):
    """A tiny model trained on one short text at one length (32 tokens) until it reconstructs it exactly."""
    out = tmp_path_factory.mktemp("ae") / "run"
    cfg = TrainConfig(ratio=0.5, max_len=32, min_len=32, steps=120, batch_size=4, lr=3e-3, min_lr=3e-3, warmup=10,
                      decay_steps=120, data=(str(short_text),), eval_lengths=(32,), eval_tokens=64, eval_every=1000,
                      checkpoint_every=1000, progress=False, **TINY)
    result = train(cfg, out=out)
    return out, result


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnlab", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def test_a_tiny_model_overfits_a_short_text(trained, short_text):
    out, result = trained
    model, tok, meta = store.load(out / "model")
    windows = TrainWindows(tok, [str(short_text)], 32, needed=1).windows
    assert token_accuracy(model, windows) == 1.0
    assert token_accuracy(model, windows, bits=8) == 1.0
    assert meta["held_out"] and result["parameters"] == model.num_parameters()
    assert (out / "curve.png").stat().st_size > 0 and (out / "result.json").exists()
    losses = [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]
    assert losses[-1] < losses[0] / 100


def test_codec_round_trip_is_the_models_reconstruction(trained, short_text, tmp_path):
    out, _ = trained
    model, tok, _ = store.load(out / "model")
    ids = codec.text_ids(tok, TEXT)
    for bits in (8, 4, 3):
        buf = codec.encode(model, tok, TEXT, bits=bits)
        text, got = codec.decode(model, tok, buf)
        want = codec.reconstruct(model, ids, bits)
        assert got == want and text == tok.decode(want) and len(got) == len(ids)
    # the CLI writes and reads the same files
    alc, txt = tmp_path / "t.alc", tmp_path / "new" / "t.txt"  # -o's folder is made
    assert attnlab.cli.main(["compress", "encode", str(short_text), "--model", str(out / "model"), "-o", str(alc)]) == 0
    assert attnlab.cli.main(["compress", "decode", str(alc), "--model", str(out / "model"), "-o", str(txt)]) == 0
    assert txt.read_text() == tok.decode(codec.reconstruct(model, ids, 8))


def test_damaged_truncated_or_foreign_files_are_refused(trained):
    out, _ = trained
    model, tok, _ = store.load(out / "model")
    buf = codec.encode(model, tok, TEXT)
    flipped = bytearray(buf)
    flipped[len(buf) // 2] ^= 0x40
    for bad, match in ((bytes(flipped), "CRC-32"), (buf[: len(buf) - 9], "CRC-32"), (buf[:6], "truncated"),
                       (b"hello world, not a codec file", "no ALC1 magic"), (b"", "no ALC1 magic")):
        with pytest.raises(codec.CodecError, match=match):
            codec.decode(model, tok, bad)
    other = SequenceAutoencoder(model.cfg).eval()
    with pytest.raises(codec.CodecError, match="encoded by another model"):
        codec.decode(other, tok, buf)


@pytest.mark.parametrize("bits", [1, 3, 4, 7, 8, 12, 16])
def test_bit_packing_round_trips(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=1001)
    packed = codec.pack(codes, bits)
    assert len(packed) == -(-1001 * bits // 8)
    assert (codec.unpack(packed, bits, 1001) == codes).all()
    with pytest.raises(codec.CodecError):
        codec.unpack(packed + b"\0", bits, 1001)


def test_quantisation_error_is_half_a_step():
    x = torch.rand(1000) * 2 - 1
    for bits in (2, 4, 8):
        err = (codec.dequantise(codec.quantise(x, bits), bits) - x).abs().max()
        assert err <= 1 / (2**bits - 1) + 1e-6


def test_chunks_are_as_equal_as_possible():
    for total, max_len in ((0, 8), (1, 8), (8, 8), (9, 8), (1000, 512), (1025, 512)):
        ch = codec.chunk_lengths(total, max_len)
        assert sum(ch) == total and all(1 <= c <= max_len for c in ch)
        assert not ch or max(ch) - min(ch) <= 1


def test_one_model_serves_every_length():
    cfg = AutoencoderConfig(vocab_size=50, max_len=40, ratio=1 / 3, dim=16, heads=2, enc_layers=1, dec_layers=1,
                            mlp_dim=16, latent_dim=4, radius=3)
    model = SequenceAutoencoder(cfg).eval()
    for n in (1, 2, 3, 17, 40):
        ids = torch.randint(0, 50, (2, n))
        lat = model.encode(ids)
        assert lat.shape == (2, -(-n // 3), 4) and lat.abs().max() <= 1
        assert model.decode(lat, n).shape == (2, n, 50)
    with pytest.raises(attnlab.OptionError, match="outside 1..40"):
        model.encode(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(attnlab.OptionError, match="vocabulary"):
        model.encode(torch.full((1, 4), 50))
    assert cut(torch.arange(20).view(2, 10), 3).shape == (6, 3)


def test_killed_run_resumes_onto_the_same_loss_curve(short_text, tmp_path):
    args = ["compress", "train", *TINY_ARGS, "--data", short_text, "--steps", "12", "--checkpoint-every", "4",
            "--eval-every", "1000"]
    ref = cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    run_killed(args, out, "step-000004", REPO)
    resumed = cli(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def losses(p):
        return [r["loss"] for r in map(json.loads, (p / "log.jsonl").read_text().splitlines())]

    assert losses(out) == losses(tmp_path / "ref") and len(losses(out)) == 12
    from safetensors.torch import load_file

    a, b = (load_file(str(p / "model" / "model.safetensors")) for p in (out, tmp_path / "ref"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another run's arguments cannot resume it, and nothing is written
    other = cli(*[x if x != "12" else "16" for x in map(str, args)], "--out", out, "--resume")
    assert other.returncode == 2 and "belongs to another run" in other.stderr and "Traceback" not in other.stderr
    occupied = cli(*args, "--out", out)
    assert occupied.returncode == 2 and "already holds a run" in occupied.stderr


def test_two_gloo_processes_equal_one(short_text, tmp_path):
    """torchrun --nproc_per_node 2: each rank reads half of every step's windows; the result equals one process
    reading them all (no quantisation noise, which draws from each process's own generator)."""
    common = ["compress", "train", *TINY_ARGS, "--data", str(short_text), "--steps", "3", "--eval-every", "1000",
              "--checkpoint-every", "1000", "--quant-bits", "0", "--batch-size", "4"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "attnlab", *common, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         cwd=REPO, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = cli(*common, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / p / "model" / "model.safetensors")) for p in ("two", "one"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert json.loads((tmp_path / "two" / "result.json").read_text())["world"] == 2


@pytest.mark.parametrize("args,match", [
    (["train", "--ratio", "0", "--out", "X"], "ratio must be in"),
    (["train", "--ratio", "0.125", "--radius", "4", "--out", "X"], "narrower than the 8 tokens"),
    (["train", "--min-len", "600", "--out", "X"], "--min-len 600"),
    (["train", "--eval-lengths", "64,1024", "--out", "X"], "--eval-lengths"),
    (["train", "--data", "nosuch", "--out", "X"], "unknown corpus 'nosuch'"),
    (["train", "--tokenizer", "nosuch", "--out", "X"], "--tokenizer 'nosuch'"),
    (["train", "--device", "cuda:7", "--out", "X"], "cuda"),
    (["encode", "README.md", "--model", "nosuch", "-o", "X"], "is not a folder"),
    (["decode", "nosuch.alc", "--model", "nosuch", "-o", "X"], "is not a file"),
    (["eval", "--models", "nosuch"], "is not a folder"),
    (["eval", "--models", "nosuch", "--bits", "0"], "--bits"),
])
def test_bad_input_is_one_line(args, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    assert attnlab.cli.main(["compress", *args]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err
    assert not (tmp_path / "X").exists()


def test_damaged_model_folder_is_one_line(trained, tmp_path, capsys):
    import shutil

    out, _ = trained
    bad = tmp_path / "model"
    shutil.copytree(out / "model", bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert attnlab.cli.main(["compress", "encode", str(REPO / "README.md"), "--model", str(bad), "-o",
                             str(tmp_path / "x.alc")]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
    (bad / "config.json").write_text("{not json")
    with pytest.raises(attnlab.AttnlabError, match="config.json is corrupt"):
        store.load(bad)
