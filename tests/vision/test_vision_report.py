"""The vision table and plot: references from the same run only (table and plot alike), '-' without one, labels
that do not overlap, runs whose every row failed, weight decay off the embeddings. Hand-made rows and a fake
dataset of a few images: nothing trains long, nothing is downloaded."""
from __future__ import annotations

import gzip
import itertools
import json
import struct

import pytest
import torch

from attnlab.vision import report
from attnlab.vision.train import summary_rows

TINY = dict(dim=16, depth=1, heads=2, mlp_dim=32)


def _row(method, epoch_s, acc, run="A", patch=4, **kw):
    return {"method": method, "patch": patch, "seq_len": (28 // patch) ** 2 + 1, "epochs": 1, "train_images": 256,
            "test_images": 64, "batch_size": 64, "device": "cpu", "dtype": "float32", "seed": 0, "run": run,
            "test_accuracy": acc, "epoch_s": epoch_s, "images_per_s": 100.0, "peak_mem_bytes": None, **kw}


@pytest.fixture
def figures(monkeypatch):
    """The figures report.plot draws, kept open after it saves them (to read their lines and labels)."""
    import matplotlib.pyplot as plt

    import attnlab.plotting

    kept, real = [], attnlab.plotting.save

    def save(fig, path, title="", **kw):
        with monkeypatch.context() as m:
            m.setattr(plt, "close", lambda *a, **k: None)
            real(fig, path, title, **kw)
        kept.append(fig)

    monkeypatch.setattr(attnlab.plotting, "save", save)
    return kept


def _reference_lines(fig):
    """{panel title: y of its solid horizontal (sdpa) line}."""
    return {ax.get_title(): [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "-"]
            for ax in fig.axes}


# ---- the reference is the same run's row, in the table and in the plot --------------------------------
def test_merged_runs_each_compare_to_their_own_sdpa(tmp_path, figures):
    rows = [_row("sdpa", 1.0, 0.80, "A"), _row("window", 2.0, 0.82, "A"),
            _row("sdpa", 3.85, 0.70, "B"), _row("window", 7.7, 0.71, "B")]
    s = {(r["run"], r["method"]): r for r in summary_rows(rows)}
    assert s["A", "sdpa"]["time_ratio_sdpa"] == 1.0 and s["B", "sdpa"]["time_ratio_sdpa"] == 1.0
    assert s["A", "window"]["time_ratio_sdpa"] == 2.0 and s["B", "window"]["time_ratio_sdpa"] == 2.0
    assert s["A", "window"]["accuracy_vs_sdpa"] == pytest.approx(0.02)
    assert s["B", "window"]["accuracy_vs_sdpa"] == pytest.approx(0.01)
    table = report.format_table(rows).splitlines()
    assert sum(line.split()[0] == "sdpa" and " 1.00 " in line for line in table) == 2
    report.plot(rows, tmp_path / "p.png")
    lines = _reference_lines(figures[0])
    assert len(lines) == 2  # one panel per run
    assert sorted(v[0] for v in lines.values()) == [0.70, 0.80]
    assert all(("run A" in t) == (v == [0.80]) for t, v in lines.items())


def test_rows_of_other_settings_are_other_runs():
    """Without run ids (rows built by hand): epochs, images, device, dtype and seed tell runs apart."""
    base = dict(run=None)
    rows = [_row("sdpa", 1.0, 0.8, **base), _row("window", 2.0, 0.8, **base),
            _row("sdpa", 4.0, 0.8, **{**base, "device": "cuda"}), _row("sdpa", 5.0, 0.8, **{**base, "seed": 1}),
            _row("window", 6.0, 0.8, **{**base, "epochs": 2})]
    s = summary_rows(rows)
    assert [r.get("time_ratio_sdpa") for r in s] == [1.0, 2.0, 1.0, 1.0, None]


def test_files_without_run_ids_are_one_run_each(tmp_path):
    """Rows of older files carry no `run`: each file is its own run, however alike their settings."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    strip = lambda r: {k: v for k, v in r.items() if k != "run"}  # noqa: E731
    a.write_text("\n".join(json.dumps(strip(r)) for r in [_row("sdpa", 1.0, 0.8), _row("window", 2.0, 0.8)]))
    b.write_text(json.dumps({"rows": [strip(_row("sdpa", 3.85, 0.7)), strip(_row("window", 7.7, 0.7))]}))
    rows = report.load_rows([a, b])
    assert [r["run"] for r in rows] == [str(a), str(a), str(b), str(b)]
    assert [r["time_ratio_sdpa"] for r in summary_rows(rows)] == [1.0, 2.0, 1.0, 2.0]


def test_no_sdpa_in_the_run_shows_a_dash_not_dense(tmp_path, figures):
    """the 'vs sdpa' column is sdpa's or '-', never dense's under sdpa's name; the table says so and
    that peak memory is CUDA-only."""
    rows = [_row("dense", 1.0, 0.80, "A"), _row("window", 2.0, 0.82, "A"), _row("sdpa", 1.0, 0.5, "B")]
    s = summary_rows(rows)
    assert "accuracy_vs_sdpa" not in s[1] and "time_ratio_sdpa" not in s[1] and s[1]["time_ratio_dense"] == 2.0
    head, body = report.table_rows(rows)
    col = dict(zip(head, body[1]))
    assert col["vs sdpa"] == "-" and col["time / sdpa"] == "-" and col["time / dense"] == "2.00"
    assert "peak train MiB (CUDA)" in head
    text = report.format_table(rows)
    assert "same run" in text and "CUDA only" in text
    report.plot(rows, tmp_path / "p.png")
    assert [v for t, v in _reference_lines(figures[0]).items() if "run A" in t] == [[]]  # no line from run B


def test_labels_do_not_overlap(tmp_path, figures):
    """Labels were placed on a linear axis that then became logarithmic: two points far apart in linear x but
    close in log x printed their names over each other ("windowdow")."""
    from matplotlib.text import Annotation

    rows = [_row("sdpa", 0.1, 0.5), _row("dense", 0.2, 0.5), _row("window", 100.0, 0.8), _row("linear", 125.0, 0.8)]
    report.plot(rows, tmp_path / "p.png")
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for ax in fig.axes for t in ax.texts if isinstance(t, Annotation)]
    assert sorted(t.get_text() for t in labels) == ["dense", "linear", "sdpa", "window"]
    for a, b in itertools.combinations(labels, 2):
        assert not a.get_window_extent(renderer).overlaps(b.get_window_extent(renderer)), (a.get_text(), b.get_text())


# ---- a run whose rows all failed is plotted (or skipped), never a crash -------------------------------
def test_plot_of_failed_rows_only(tmp_path, figures):
    bad = [{"method": "window", "patch": 4, "seq_len": 50, "device": "cpu", "run": "A", "error": "boom"},
           {"method": "lsh", "patch": 4, "seq_len": 50, "device": "cpu", "run": "A", "error": "out of memory"}]
    report.plot(bad, tmp_path / "bad.png")
    assert (tmp_path / "bad.png").stat().st_size > 1000
    assert "no method ran" in " ".join(t.get_text() for ax in figures[0].axes for t in ax.texts)
    mixed = [_row("sdpa", 1.0, 0.8, patch=4), {**bad[0], "patch": 1, "seq_len": 785}]  # patch 1: all failed
    report.plot(mixed, tmp_path / "mixed.png")
    assert len(figures[1].axes) == 1 and "window patch 1 (boom)" in figures[1]._suptitle.get_text()
    assert "not run" in report.format_table(mixed)


def _write_idx(path, tensor, magic):
    head = struct.pack(">II", magic, tensor.shape[0]) + b"".join(struct.pack(">I", s) for s in tensor.shape[1:])
    path.write_bytes(gzip.compress(head + tensor.numpy().tobytes()))


@pytest.fixture
def fake_fashion_mnist(tmp_path, monkeypatch):
    """A Fashion-MNIST folder of 64 training and 16 test images of noise."""
    d = tmp_path / "fmnist"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 64), ("t10k", 16)):
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=g,
                                                                     dtype=torch.uint8), 2051)
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8), 2049)
    monkeypatch.setenv("ATTNLAB_FASHION_MNIST", str(d))
    return d


def test_cli_run_where_every_method_fails_still_ends_well(tmp_path, monkeypatch, capsys, fake_fashion_mnist):
    """Every row an error (here: train_one refuses): the table, the JSON and a PNG saying why, exit 0."""
    import attnlab.cli
    import attnlab.vision.train as vtrain
    from attnlab.types import UnsupportedError

    def refuse(method, *a, **k):
        raise UnsupportedError(f"{method} cannot run here")

    monkeypatch.setattr(vtrain, "train_one", refuse)
    out = tmp_path / "out"
    rc = attnlab.cli.main(["vision", "--methods", "sdpa,window", "--patch", "7", "--epochs", "1", "--warmup-epochs",
                           "0", "--batch-size", "32", "--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "32",
                           "--out", str(out), "--no-progress"])
    assert rc == 0
    (result,) = out.glob("vision-*.json")
    rows = json.loads(result.read_text())["rows"]
    assert [r["error"] for r in rows] == ["sdpa cannot run here", "window cannot run here"]
    assert len({r["run"] for r in rows}) == 1 and rows[0]["train_images"] == 64
    assert result.with_suffix(".png").stat().st_size > 1000


def test_a_smaller_dataset_than_asked_for_is_refused(fake_fashion_mnist):
    from attnlab.types import OptionError
    from attnlab.vision import fashion_mnist

    with pytest.raises(OptionError, match="train_size 100 exceeds the 64 train images"):
        fashion_mnist("train", 100)


# ---- no weight decay on the position embedding and the CLS token --------------------------------------
def test_weight_decay_spares_positions_cls_norms_and_biases():
    from attnlab.vision import ViT, ViTConfig
    from attnlab.vision.train import param_groups

    vit = ViT(ViTConfig(patch=7, **TINY))
    decay, no_decay = param_groups(vit, 0.05)
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    names = {id(p): n for n, p in vit.named_parameters()}
    assert {names[i] for i in ids(no_decay)} >= {"pos", "cls", "norm.weight", "norm.bias", "head.bias"}
    assert {"patch_embed.weight", "head.weight", "blocks.0.attn.in_proj_weight"} <= {names[i] for i in ids(decay)}
    assert not ids(decay) & ids(no_decay) and len(ids(decay) | ids(no_decay)) == len(list(vit.parameters()))
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0


# ---- the config checks at the library level ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad,match", [(dict(heads=0), "heads must be an integer >= 1"),
                                       (dict(dim=0), "dim must be an integer >= 1")])
def test_vit_config_sizes_are_checked_first(bad, match):
    from attnlab.types import OptionError
    from attnlab.vision import ViTConfig

    with pytest.raises(OptionError, match=match):
        ViTConfig(**{**TINY, **bad}).check()


@pytest.mark.parametrize("bad,match", [
    (dict(epochs=2, warmup_epochs=2.0), "warmup_epochs 2.0 must be less than epochs 2"),
    (dict(train_size=60001), "at most 60000"), (dict(test_size=10001), "at most 10000"),
    (dict(train_size=10, batch_size=11), "batch_size 11 exceeds the 10 training images"),
])
def test_vision_config_refuses(bad, match):
    from attnlab.types import OptionError
    from attnlab.vision import VisionConfig

    with pytest.raises(OptionError, match=match):
        VisionConfig(**{**TINY, **bad}).check()
    VisionConfig(epochs=2, warmup_epochs=1.5, train_size=60000, test_size=10000, **TINY).check()  # the limits pass
