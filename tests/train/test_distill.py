"""`attnlab distill`: the loop trains only the swapped attention and brings the held-out KL down; a killed run
resumes onto the same loss curve; two gloo processes equal one with twice the batch; every bad input is one
clear error before any training step, and no checkpoint is overwritten.

Most runs use a tiny random Llama saved with SmolLM2's tokenizer (the real data path, seconds per run); the
README's example runs on the real SmolLM2.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab.train.distill import kl_loss
from tests.helpers import run_killed

REPO = Path(__file__).resolve().parents[2]
QUICK = ["--seq-len", "32", "--batch-size", "2", "--eval-windows", "1", "--warmup", "1", "--no-progress",
         "--train", "sotu"]


def cli(*args, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "attnlab", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def refused(capsys, *args) -> str:
    """A CLI call expected to stop with exit code 2, in-process (a refusal needs no fresh interpreter: it saves the
    ~5 s a subprocess spends importing); returns its stderr."""
    import attnlab.cli

    capsys.readouterr()
    with torch.random.fork_rng():  # a refusal after the run started has seeded the global generator
        rc = attnlab.cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err[-1500:]
    return err


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def test_an_unknown_setting_is_one_attnlab_error(tmp_path):
    with pytest.raises(attnlab.AttnlabError, match="no setting stepz; DistillConfig has .*steps"):
        attnlab.distill(None, "hybrid", tokenizer=None, out=tmp_path / "run", stepz=3)
    assert not (tmp_path / "run").exists()


def test_kl_loss_is_forward_kl_in_fp32():
    p = torch.tensor([[0.5, 0.25, 0.25]]).log()
    q = torch.tensor([[0.2, 0.3, 0.5]]).log()
    want = sum(a * math.log(a / b) for a, b in zip([0.5, 0.25, 0.25], [0.2, 0.3, 0.5]))
    assert abs(kl_loss(p.bfloat16(), q.bfloat16()).item() - float(want)) < 1e-2  # bf16 logits, fp32 maths
    assert kl_loss(p, p).item() == 0.0


def test_distill_trains_only_the_attention_and_lowers_the_kl(tiny_lm_dir, tmp_path):
    model, tok = attnlab.models.load(str(tiny_lm_dir))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = attnlab.distill(model, {"*": ("hybrid", {"window": 4, "feature_dim": 8}), "0": "original"}, tokenizer=tok,
                          out=tmp_path / "run", steps=10, transfer_steps=10, seq_len=32, batch_size=2, eval_windows=2,
                          eval_every=100, checkpoint_every=100, warmup=1, train=("sotu",), progress=False, lr=3e-2,
                          transfer_lr=5e-2)
    assert res["kl_after"] < 0.9 * res["kl_before"], res  # a random tiny model: little to learn (SmolLM2 below)
    assert res["trainable_params"] == sum(p.numel() for _, m in attnlab.adapters.method_modules(model)
                                          for p in m.parameters())
    for n, p in model.named_parameters():  # nothing but the methods changed
        if ".attnlab_method." not in n:
            assert torch.equal(p, frozen[n]), n
            assert p.requires_grad, n  # frozen while the methods trained, then given back as it came
    for key in ("method", "options", "density", "steps", "tokens", "trainable_params", "kl_before", "kl_after",
                "ppl_base", "ppl_before", "ppl_after", "top1_after", "attn_mse", "grad_cos", "tokens_per_s",
                "peak_mem_bytes", "split", "device"):
        assert key in res, key
    assert res["split"] == "held-out" and res["attn_mse"] is not None
    assert res["attn_mse_tokens"] == 32 and res["grad_cos_tokens"] == 32  # min(256 / 128, seq_len)
    assert res["tokens_per_s_median_step"] >= res["tokens_per_s"] * 0.5 > 0  # the median step, not the mean
    out = tmp_path / "run"
    assert json.loads((out / "result.json").read_text())["kl_after"] == res["kl_after"]
    assert (out / "curve.png").stat().st_size > 10_000
    fresh, _ = attnlab.models.load(str(tiny_lm_dir))
    attnlab.load(fresh, out / "attention")  # the trained attention alone, loadable into a fresh model
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.model
def test_low_rank_adapters_alone_win_back_a_global_sparse_mask_on_smollm2(smollm2, tmp_path):
    """global_sparse has no parameters; with adapters on its layers' projections (LoLCATs' second stage) they alone
    train, and on the real model a few steps bring the held-out KL down (a trial: 1.59 -> 0.98 in 8 steps; here 6). The
    mask: raw block scores decaying with distance, 60% of the 8 x 8 causal blocks pruned, no sinks (a lossy one).
    No causal leak afterwards. (On a random tiny model the adapters fit their training text without carrying
    over to held-out text: nothing to test there.)"""
    from tests.adapters.test_hf import LEAK_AT, LEAK_T, assert_no_leak, perturbed_pair

    model, tok = smollm2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = [[1.0 / (1 + i - j) if j <= i else 0.0 for j in range(8)] for i in range(8)]
    spec = attnlab.SwapSpec([attnlab.Rule("*", "global_sparse", {"pattern": scores, "block_size": 16,
                                                                  "sparsity": 0.6})]).with_lora(8)
    try:
        res = attnlab.distill(model, spec, tokenizer=tok, out=tmp_path / "run", steps=6, seq_len=128, batch_size=2,
                              eval_windows=2, eval_every=100, checkpoint_every=100, warmup=2, train=("sotu",),
                              progress=False, lr=3e-3)
        assert res["kl_after"] < 0.8 * res["kl_before"], res
        lora = {n: p for n, p in model.named_parameters() if ".attnlab_method.lora." in n}
        assert res["trainable_params"] == sum(p.numel() for p in lora.values()) == 30 * 8 * (2 * 576 + 2 * 576 + 2 * 768)
        for n, p in model.named_parameters():
            if n not in lora:
                assert torch.equal(p, frozen[n]), n
        ids, ids2 = perturbed_pair(LEAK_T, LEAK_AT, model.config.vocab_size)
        assert_no_leak(model, ids, ids2, LEAK_AT)
        meta = json.loads((tmp_path / "run" / "attention" / "attnlab.json").read_text())
        assert meta["spec"]["rules"][0]["lora"] == 8
    finally:
        if attnlab.swapped_spec(model) is not None:
            attnlab.unswap(model)
        for n, p in model.named_parameters():  # the session's shared model as the fixture made it
            p.requires_grad_(flags[n])


def test_adapters_from_the_cli_alone_and_on_a_saved_attention(tiny_lm_dir, tmp_path, capsys):
    """--lora on a method without parameters (window), and LoLCATs' order: a hybrid run, then --init of its saved
    attention with --lora (the saved hybrid state kept, adapters added); --lora on a saved attention that already
    has adapters is refused."""
    common = ["--model", tiny_lm_dir, "--steps", "2", "--eval-every", "1000", "--checkpoint-every", "1000", *QUICK]
    win = cli("distill", "--method", "window", "--set", "window.window=4", "--lora", "2", *common, "--out", tmp_path / "w")
    assert win.returncode == 0, win.stderr[-2000:]
    res = json.loads((tmp_path / "w" / "result.json").read_text())
    assert res["lora"] == 2 and res["trainable_params"] == 2 * (4 * 2 * 32 + 2 * (32 + 16 + 16 + 32))  # 2 layers: A, B of q k v o
    hyb = cli("distill", "--method", "hybrid", "--set", "hybrid.window=4", "--set", "hybrid.feature_dim=8", *common,
              "--no-baseline", "--out", tmp_path / "h")
    assert hyb.returncode == 0, hyb.stderr[-2000:]
    more = cli("distill", "--init", tmp_path / "h" / "attention", "--lora", "2", *common, "--out", tmp_path / "hl")
    assert more.returncode == 0, more.stderr[-2000:]
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "h" / "attention" / "attention.safetensors"))
    after = load_file(str(tmp_path / "hl" / "attention" / "attention.safetensors"))
    assert set(before) < set(after) and any(".lora." in k for k in after)
    meta = json.loads((tmp_path / "hl" / "attention" / "attnlab.json").read_text())
    assert meta["spec"]["rules"][0]["lora"] == 2
    assert meta["extra"]["distill"]["seq_len"] == 32 and meta["extra"]["distill"]["steps"] == 2  # compare's note reads it
    again = refused(capsys, "distill", "--init", tmp_path / "hl" / "attention", "--lora", "2", *common, "--out",
                    tmp_path / "x")
    assert "already has adapters" in again


def test_killed_run_resumes_onto_the_same_loss_curve(tiny_lm_dir, tmp_path):
    """A real process killed mid-run; --resume continues from its last checkpoint; the per-step losses and the
    trained attention equal an uninterrupted run's."""
    args = ["distill", "--model", tiny_lm_dir, "--method", "hedgehog", "--set", "hedgehog.feature_dim=8",
            "--steps", "60", "--checkpoint-every", "5", "--eval-every", "1000", "--no-baseline", *QUICK]
    ref = cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    run_killed(args, out, "step-000010", REPO)
    resumed = cli(*args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == losses(tmp_path / "ref")
    a = json.loads((out / "result.json").read_text())
    b = json.loads((tmp_path / "ref" / "result.json").read_text())
    assert a["kl_after"] == b["kl_after"]
    from safetensors.torch import load_file

    ta, tb = (load_file(str(p / "attention" / "attention.safetensors")) for p in (out, tmp_path / "ref"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_two_gloo_processes_equal_one_with_twice_the_batch(tiny_lm_dir, tmp_path):
    """torchrun --nproc_per_node 2 (DDP over gloo): the ranks end with identical parameters, equal to a single
    process whose batch holds both ranks' windows."""
    common = ["--model", str(tiny_lm_dir), "--method", "hybrid", "--set", "hybrid.window=4", "--set",
              "hybrid.feature_dim=8", "--steps", "3", "--transfer-steps", "2", "--eval-every", "1000",
              "--checkpoint-every", "1000", "--no-baseline", "--seq-len", "32", "--eval-windows", "1", "--warmup", "1",
              "--no-progress", "--train", "sotu"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "attnlab", "distill", *common, "--batch-size", "1", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    one = cli("distill", *common, "--batch-size", "2", "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    res = json.loads((tmp_path / "two" / "result.json").read_text())
    assert res["world"] == 2 and len(set(res["rank_param_digests"])) == 1  # every rank holds the same parameters
    from safetensors.torch import load_file

    ta, tb = (load_file(str(tmp_path / d / "attention" / "attention.safetensors")) for d in ("two", "one"))
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=1e-5, rtol=1e-4)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


# ---- bad input: one line, exit 2, before any training step, nothing overwritten -----------------------------------
@pytest.mark.parametrize("args,match", [
    (["--method", "linear"], "has no trainable parameters"),
    (["--method", "window", "--lora", "-1"], "lora must be a rank >= 0"),
    (["--method", "window", "--lora", "2", "--transfer-steps", "2"], "--transfer-steps with --lora"),
    (["--method", "learned_mask", "--density", "1.5", "--lora", "2"], "density must be in"),
    (["--method", "performer"], "learn_features=true"),
    (["--method", "learned_mask", "--density", "0"], "density must be in"),
    (["--method", "learned_mask", "--density", "1.5"], "density must be in"),
    (["--method", "nosuch"], "unknown attention method"),
    (["--method", "hybrid", "--train", "nosuch"], "unknown corpus"),
    (["--method", "hybrid", "--steps", "0"], "--steps must be an integer >= 1"),
    (["--method", "hybrid", "--lr", "-1"], "--lr must be in"),
    (["--method", "hybrid", "--set", "window.window=3"], "not distilled here"),
    (["--method", "hybrid", "--model", "/no/such/folder"], "neither a packaged model"),
    (["--method", "hybrid", "--resume"], "holds no checkpoint"),
])
def test_bad_input_is_one_line_before_any_work(args, match, tmp_path, capsys, monkeypatch):
    """Through the CLI's entry point (in-process: no model may load before the error)."""
    import attnlab.cli
    import attnlab.models

    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    rc = attnlab.cli.main(["distill", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err[-1000:]
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and match in lines[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_empty_or_short_corpus_and_an_occupied_out_are_refused(tiny_lm_dir, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("Call me Ishmael.")
    base = ["distill", "--model", tiny_lm_dir, "--method", "hybrid", *QUICK[:-2]]
    for text, match in (("empty.txt", "hold no text"), ("short.txt", "fewer than one window")):
        err = refused(capsys, *base, "--train", tmp_path / text, "--out", tmp_path / text.replace(".txt", ""))
        assert match in err, err[-1500:]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "result.json").write_text("{}")
    assert "already holds a run" in refused(capsys, *base, "--train", "sotu", "--out", tmp_path / "busy")
    assert (tmp_path / "busy" / "result.json").read_text() == "{}"


def test_a_diverged_step_stops_before_any_checkpoint(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """A non-finite loss ends the run with one line; the last good checkpoint stays the newest."""
    import importlib

    import attnlab.cli

    dist = importlib.import_module("attnlab.train.distill")  # the module (attnlab.train.distill is also a function)
    real, calls = dist.kl_loss, {"n": 0}

    def flaky(t, s):
        calls["n"] += 1
        loss = real(t, s)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(dist, "kl_loss", flaky)
    out = tmp_path / "nan"
    rc = attnlab.cli.main(["distill", "--model", str(tiny_lm_dir), "--method", "hedgehog", "--set",
                           "hedgehog.feature_dim=8", "--steps", "5", "--checkpoint-every", "1", "--eval-every", "1000",
                           "--no-baseline", *QUICK, "--out", str(out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("attnlab: error")]
    assert rc == 2 and len(lines) == 1 and "step 3: the kl loss is nan (diverged)" in lines[0], err
    assert "Traceback" not in err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not (out / "checkpoints" / "step-000003").exists() and not (out / "result.json").exists()


def test_resume_of_another_run_or_a_damaged_checkpoint_is_refused_and_changes_nothing(tiny_lm_dir, tmp_path,
                                                                                      capsys):
    out = tmp_path / "run"
    args = ["distill", "--model", tiny_lm_dir, "--method", "hedgehog", "--set", "hedgehog.feature_dim=8", "--steps",
            "4", "--checkpoint-every", "2", "--eval-every", "1000", *QUICK]
    assert cli(*args, "--out", out).returncode == 0
    ck = out / "checkpoints" / "step-000002"
    before = {p: p.read_bytes() for p in ck.rglob("*") if p.is_file()}
    other = ["distill", "--model", tiny_lm_dir, "--method", "hybrid", *args[7:]]
    assert "belongs to another run" in refused(capsys, *other, "--out", out, "--resume")  # another method
    # another window length
    assert "belongs to another run" in refused(capsys, *args, "--seq-len", "16", "--out", out, "--resume")
    st = ck / "trainer.safetensors"
    st.write_bytes(st.read_bytes()[:100])  # truncated
    assert "corrupt or truncated" in refused(capsys, *args, "--out", out, "--resume")
    st.write_bytes(before[st])
    assert {p: p.read_bytes() for p in ck.rglob("*") if p.is_file()} == before  # nothing else was written


def test_more_processes_than_data_shards_is_refused(tiny_lm_dir, tmp_path):
    (tmp_path / "one_window.txt").write_text(" ".join(["whale"] * 40))  # ~40 tokens: one window of 32
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "attnlab", "distill", "--model", str(tiny_lm_dir), "--method", "hybrid", "--seq-len", "32",
                          "--batch-size", "1", "--steps", "1", "--no-progress", "--train", str(tmp_path / "one_window.txt"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode != 0 and "fewer data shards than processes" in res.stderr, res.stderr[-2000:]


@pytest.mark.model
def test_the_readme_distill_example_runs_on_smollm2(tmp_path):
    """The README's distill command, on the real model, a few steps: the attention is saved and compare loads it."""
    res = cli("distill", "--method", "hybrid", "--seq-len", "128", "--steps", "5", "--transfer-steps", "10",
              "--batch-size", "2", "--eval-windows", "2", "--train", "sotu,brown", "--no-progress",
              "--out", tmp_path / "hybrid", timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "hybrid" / "result.json").read_text())
    assert r["kl_after"] < 0.5 * r["kl_before"], r  # measured: 2.3 -> 0.4 nats/token in 10 transfer steps at 128
    cmp = cli("compare", "--quick", "--methods", "sdpa", "--load", tmp_path / "hybrid" / "attention", "--no-plot",
              "--out", tmp_path / "cmp", timeout=900)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    assert "saved:attention" in cmp.stdout


def test_what_the_model_cannot_run_is_refused_before_the_load(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """Checked against the model's skeleton (its config on the meta device), before any weight loads."""
    import attnlab.models

    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"rules": [{"layers": "40", "method": "hybrid"}]}))
    base = ["distill", "--model", tiny_lm_dir, *QUICK]
    for extra, match in ((["--spec", spec], "matches none of the model's 2 attention layers"),
                         (["--method", "hybrid", "--seq-len", "1024"], "max_position_embeddings=512"),
                         (["--method", "learned_mask", "--set", "learned_mask.block_size=4",
                           "--set", "learned_mask.max_blocks=4"], "max_len=16 tokens; this run feeds 32")):
        err = refused(capsys, *base, *extra, "--out", tmp_path / "out")
        assert match in err, err[-1500:]
        assert not (tmp_path / "out").exists()


def test_a_truncated_init_is_refused_before_the_load(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """--init checks the saved attention's state file (its header) before the model loads, as compare's --load."""
    import attnlab.models
    from tests.adapters import tiny_model

    model = tiny_model("llama")
    attnlab.swap(model, "hedgehog", feature_dim=8)
    saved = attnlab.save(model, tmp_path / "att")
    st = saved / "attention.safetensors"
    st.write_bytes(st.read_bytes()[:-64])
    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    err = refused(capsys, "distill", "--model", tiny_lm_dir, "--init", saved, *QUICK, "--out", tmp_path / "out")
    assert "attention.safetensors is corrupt or truncated" in err, err[-1500:]
    assert not (tmp_path / "out").exists()


def test_a_spec_takes_the_options_the_command_line_would_and_an_old_run_resumes_as_recorded(tiny_lm_dir, tmp_path,
                                                                                             monkeypatch):
    """A spec's omitted options are the method's at --seq-len in attnlab.distill too; a run whose checkpoints
    recorded its spec unfilled (begun before options were filled) resumes with it, not refused as another run."""
    from attnlab.adapters.spec import SwapSpec

    kw = dict(tokenizer=None, steps=4, seq_len=32, batch_size=2, eval_windows=1, eval_every=100, checkpoint_every=2,
              warmup=1, train=("sotu",), progress=False, baseline=False)
    model, tok = attnlab.models.load(str(tiny_lm_dir))
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    res = attnlab.distill(model, "hybrid", **{**kw, "tokenizer": tok}, out=tmp_path / "new")
    assert res["options"] == attnlab.registry.options_at("hybrid", 32)  # window 4 at 32 tokens, not its class's 64
    attnlab.unswap(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == before  # frozen only while it trained
    attnlab.load(model, tmp_path / "new" / "attention")  # a model running the spec trains on by the same name
    assert attnlab.distill(model, "hybrid", **{**kw, "tokenizer": tok, "steps": 1}, out=tmp_path / "on")["steps"] == 1
    with pytest.raises(attnlab.AttnlabError, match="already runs .*hybrid.*, not .*hedgehog"):
        attnlab.distill(model, "hedgehog", **{**kw, "tokenizer": tok}, out=tmp_path / "other")
    with monkeypatch.context() as m:  # the run as it began before: the spec as given
        m.setattr(SwapSpec, "at_length", lambda self, n: self)
        import attnlab.train.checkpoint as ckpt

        m.setattr(ckpt, "save", _stop_after(ckpt.save, "step-000002"))
        model, _ = attnlab.models.load(str(tiny_lm_dir))
        with pytest.raises(KeyboardInterrupt):
            attnlab.distill(model, "hybrid", **{**kw, "tokenizer": tok}, out=tmp_path / "old")
    model, _ = attnlab.models.load(str(tiny_lm_dir))
    res = attnlab.distill(model, "hybrid", **{**kw, "tokenizer": tok}, out=tmp_path / "old", resume=True)
    assert res["options"] == {} and res["steps"] == 4


def _stop_after(save, name):
    def wrapped(out, *a, **k):
        path = save(out, *a, **k)
        if name in str(path):
            raise KeyboardInterrupt  # killed once that checkpoint is on disk
        return path

    return wrapped
