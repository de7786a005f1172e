"""attnlab vision: the Fashion-MNIST reader, the ViT, every registered method inside it, a short real training
run whose loss must fall, determinism, and the CLI's one-line errors."""
from __future__ import annotations

import gzip
import json
import struct

import pytest
import torch

import attnlab
from attnlab import registry
from attnlab.data import DataNotInstalled
from attnlab.types import OptionError
from attnlab.vision import VisionConfig, ViT, ViTConfig, fashion_mnist, train_one
from attnlab.vision import data as vdata
from attnlab.vision.train import _augment, _draws
from tests.helpers import assert_cli_one_line_error

TINY = dict(dim=16, depth=1, heads=2, mlp_dim=32)


def _write_idx(path, tensor, magic):
    head = struct.pack(">II", magic, tensor.shape[0]) + b"".join(struct.pack(">I", s) for s in tensor.shape[1:])
    path.write_bytes(gzip.compress(head + tensor.numpy().tobytes()))


def test_idx_reader_round_trip_and_damaged_files(tmp_path):
    imgs = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    _write_idx(tmp_path / "i.gz", imgs, 2051)
    assert torch.equal(vdata.read_idx(tmp_path / "i.gz"), imgs)
    labels = torch.tensor([1, 9, 0], dtype=torch.uint8)
    _write_idx(tmp_path / "l.gz", labels, 2049)
    assert torch.equal(vdata.read_idx(tmp_path / "l.gz"), labels)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(DataNotInstalled, match="not a readable gzip"):
        vdata.read_idx(tmp_path / "bad.gz")
    raw = gzip.decompress((tmp_path / "i.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(DataNotInstalled, match="its header says"):
        vdata.read_idx(tmp_path / "short.gz")
    (tmp_path / "magic.gz").write_bytes(gzip.compress(struct.pack(">II", 7, 0)))
    with pytest.raises(DataNotInstalled, match="magic 7"):
        vdata.read_idx(tmp_path / "magic.gz")


def test_missing_dataset_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNLAB_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DataNotInstalled, match="lacks train-images-idx3-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        vdata.fashion_mnist_dir()


def test_data_status_reports_the_images(tmp_path, monkeypatch, capsys):
    """`attnlab data status` lists Fashion-MNIST beside the corpora and models: where it is, or the fix."""
    import attnlab.cli

    assert attnlab.cli.main(["data", "status"]) == 0
    assert "images fashion-mnist: ok (" in capsys.readouterr().out
    monkeypatch.setenv("ATTNLAB_FASHION_MNIST", str(tmp_path))
    assert attnlab.cli.main(["data", "status"]) == 0
    assert "images fashion-mnist: missing (ATTNLAB_FASHION_MNIST=" in capsys.readouterr().out


def test_real_fashion_mnist():
    """The Debian package that install.sh installs: 60k / 10k images, 10 balanced classes."""
    x, y = fashion_mnist("train")
    assert x.shape == (60000, 28, 28) and x.dtype == torch.uint8 and y.shape == (60000,)
    assert torch.bincount(y).tolist() == [6000] * 10
    xt, yt = fashion_mnist("test", limit=100)
    assert xt.shape == (100, 28, 28) and int(yt.max()) <= 9
    mean = x[:5000].float().div(255).mean().item()
    assert abs(mean - vdata.MEAN) < 0.01


@pytest.mark.parametrize("patch,tokens", [(4, 50), (7, 17), (1, 785)])
def test_vit_shapes(patch, tokens):
    cfg = ViTConfig(patch=patch, **TINY)
    assert cfg.seq_len == tokens
    assert ViT(cfg)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert ViTConfig(patch=patch, pool="mean", **TINY).seq_len == tokens - 1


@pytest.mark.parametrize("bad,match", [(dict(patch=3), "must divide"), (dict(dim=30, heads=4), "multiple of heads"),
                                       (dict(pool="max"), "pool must be")])
def test_vit_config_errors(bad, match):
    with pytest.raises(OptionError, match=match):
        ViT(ViTConfig(**{**TINY, **bad}))


@pytest.mark.parametrize("method", [n for n in registry.list_methods() if not registry.capabilities(n).resizes])
def test_every_method_trains_inside_the_vit(method):
    """Each registered method swapped into the ViT (sharing its weights): finite output and gradients reaching
    the ViT's projections; methods with an exact limit reproduce torch's own attention in it."""
    torch.manual_seed(0)
    vit = ViT(ViTConfig(patch=7, **TINY)).double()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    ref = vit(x)
    seq = vit.cfg.seq_len
    exact = registry.get(method).exact_limit(seq, seq)
    with attnlab.swapped(vit, method, **(exact if exact is not None else registry.defaults(method, seq))):
        out = vit(x)
        out.sum().backward()
        assert torch.isfinite(out).all()
        grad = vit.blocks[0].attn.in_proj_weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        if exact is not None:
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_methods_trained_from_scratch_take_their_training_form():
    """rfa trains in the paper's unit form here (its plain estimator trained the ViT to chance); --set wins."""
    from attnlab.vision.train import method_options

    from attnlab.vision.train import param_groups

    assert method_options("rfa", 50)["normalize"] is True
    assert method_options("rfa", 50, {"normalize": False})["normalize"] is False
    assert "normalize" not in method_options("performer", 50)
    cfg = VisionConfig(epochs=1, batch_size=64, train_size=64, test_size=32, progress=False, **TINY)
    row = train_one("rfa", {"num_features": 8}, 7, cfg, fashion_mnist("train", 64), fashion_mnist("test", 32))
    assert row["options"]["normalize"] is True and "error" not in row  # what train_one really built
    vit = ViT(ViTConfig(patch=7, **TINY))
    attnlab.swap(vit, "rfa", **method_options("rfa", vit.cfg.seq_len, {"num_features": 8}))
    decay, no_decay = param_groups(vit, 0.05)
    sigmas = [p for n, p in vit.named_parameters() if n.endswith("sigma")]
    assert sigmas and all(p.dim() == 2 for p in sigmas)  # [H, D]: a matrix, yet never decayed
    assert not any(p is s for p in decay["params"] for s in sigmas)
    assert all(any(p is s for p in no_decay["params"]) for s in sigmas)


def test_augmentation_draws_are_fixed_by_the_seed():
    a, b = _draws(8, torch.Generator().manual_seed(3)), _draws(8, torch.Generator().manual_seed(3))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    x = torch.randn(4, 1, 28, 28)
    centre = torch.full((4, 2), 2)
    assert torch.equal(_augment(x, centre, torch.zeros(4, dtype=torch.bool)), x)
    assert torch.equal(_augment(x, centre, torch.ones(4, dtype=torch.bool)), x.flip(-1))
    shifted = _augment(x, torch.tensor([[0, 2]] * 4), torch.zeros(4, dtype=torch.bool))  # two rows down
    assert torch.equal(shifted[:, :, 2:], x[:, :, :-2])


def _tiny_run(method="sdpa", **kw):
    cfg = VisionConfig(epochs=3, batch_size=64, lr=3e-3, warmup_epochs=0.5, train_size=512, test_size=200,
                       progress=False, **{**TINY, "dim": 32, **kw})
    train = fashion_mnist("train", cfg.train_size)
    test = fashion_mnist("test", cfg.test_size)
    return train_one(method, {}, 7, cfg, train, test)


def test_training_loss_falls_and_is_deterministic():
    """A few real steps on 512 Fashion-MNIST images: the loss falls, accuracy beats chance, and the same seed
    gives the same run (weights, data order and augmentation all seeded)."""
    row = _tiny_run()
    losses = [h["train_loss"] for h in row["history"]]
    assert losses[-1] < losses[0] - 0.2, losses
    assert row["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert row["epochs"] == 3 and row["seq_len"] == 17 and row["train_images"] == 512 and "error" not in row
    again = _tiny_run()
    assert [h["train_loss"] for h in again["history"]] == losses
    other = _tiny_run(seed=1)
    assert [h["train_loss"] for h in other["history"]] != losses


def test_every_method_declares_its_complexity():
    for name in registry.list_methods():
        time, mem, _ = registry.get(name).complexity
        assert time.startswith("O(") and mem.startswith("O("), name


@pytest.mark.parametrize("args,match", [
    (["--patch", "3"], "must divide the image size"),
    (["--patch", "a"], "--patch expects integers"),
    (["--methods", "nosuch"], "unknown attention method"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--train-size", "0"], "train_size must be >= 1"),
    (["--set", "window.nosuch=1", "--methods", "window"], "has no option"),
    (["--set", "linear.feature_map=1", "--methods", "window"], "not among the methods"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_cli_bad_input_is_one_line(args, match, tmp_path, capsys):
    assert_cli_one_line_error(["vision", *args, "--out", str(tmp_path / "out")], match, capsys, tmp_path / "out")


def test_cli_without_the_dataset_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ATTNLAB_FASHION_MNIST", str(tmp_path / "nowhere"))
    assert_cli_one_line_error(["vision", "--out", str(tmp_path / "out")], "dataset-fashion-mnist", capsys)


def test_cli_run_writes_json_rows_and_a_plot(tmp_path, capsys):
    import attnlab.cli

    out = tmp_path / "out"
    rc = attnlab.cli.main(["vision", "--methods", "sdpa,window", "--patch", "7", "--epochs", "2", "--train-size", "256",
                           "--test-size", "100", "--batch-size", "64", "--dim", "16", "--depth", "1", "--heads", "2",
                           "--mlp-dim", "32", "--out", str(out), "--no-progress"])
    assert rc == 0
    (result,) = out.glob("vision-*.json")
    data = json.loads(result.read_text())
    assert [r["method"] for r in data["rows"]] == ["sdpa", "window"]
    for r in data["rows"]:
        assert {"method", "options", "patch", "seq_len", "epochs", "test_accuracy", "epoch_s", "images_per_s",
                "peak_mem_bytes", "device"} <= r.keys()
    assert data["environment"]["device"] == "cpu" and data["config"]["epochs"] == 2
    assert len(result.with_suffix(".jsonl").read_text().splitlines()) == 2
    assert result.with_suffix(".png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "time / sdpa" in table and "window" in table
