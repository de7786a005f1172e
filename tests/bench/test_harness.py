"""The cost harness on CPU at tiny sizes: row schema, statuses (ok / not installed / oom / unsupported),
crossover on synthetic rows, JSON + PNG output. No FlexAttention compile (window runs backend="torch")."""
from __future__ import annotations

import json

import pytest
import torch

import attnlab
from attnlab.bench import harness, peers, plot, sweep
from attnlab.cli import main as attnlab_main

SCHEMA = ("method", "impl", "options", "seq_len", "batch", "heads", "head_dim", "mode", "causal", "dtype", "device",
          "ms", "peak_mem_bytes", "status", "error", "device_name", "torch_version", "triton_version", "command",
          "tflops", "note")
TINY = dict(heads=2, head_dim=16, batch=1, dtype=torch.float32, device="cpu", repeats=2, warmup=1,
            progress=False, row_budget_s=0.5)


def _qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 32, 16, generator=g) for _ in range(3))


@pytest.mark.parametrize("mode", harness.MODES)
def test_bench_one_times_a_method(mode):
    m = attnlab.make("sdpa", head_dim=16, num_heads=2)
    row = harness.bench_one(lambda q, k, v: m(q, k, v, causal=True)[0], _qkv, mode, "cpu", repeats=3, warmup=1)
    assert row["status"] == "ok" and row["error"] is None
    assert row["ms"] > 0 and row["ms_min"] <= row["ms"] <= row["ms_max"] and row["repeats"] == 3
    assert row["peak_mem_bytes"] is None and "CPU" in row["mem_note"]  # no allocator statistics on CPU
    assert row["input_bytes"] == 3 * 32 * 2 * 16 * 4 + (32 * 2 * 16 * 4 if mode == "fwd+bwd" else 0)


def test_backward_really_runs():
    seen = {}

    def fn(q, k, v):
        seen["grad_enabled"] = torch.is_grad_enabled()
        seen["requires_grad"] = q.requires_grad
        return (q * k).sum(-1, keepdim=True) * v

    harness.bench_one(fn, _qkv, "fwd+bwd", "cpu", repeats=1, warmup=1)
    assert seen == {"grad_enabled": True, "requires_grad": True}
    harness.bench_one(fn, _qkv, "fwd", "cpu", repeats=1, warmup=1)
    assert seen["grad_enabled"] is False  # fwd = inference, under no_grad


def test_oom_is_a_row_not_a_crash():
    def fn(q, k, v):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    row = harness.bench_one(fn, _qkv, "fwd", "cpu", repeats=2, warmup=1)
    assert row["status"] == "oom" and "out of memory" in row["error"] and row["ms"] is None


def test_errors_are_classified():
    def unsupported(q, k, v):
        raise attnlab.UnsupportedError("nope")

    def broken(q, k, v):
        raise ValueError("boom")

    assert harness.bench_one(unsupported, _qkv, "fwd", "cpu")["status"] == "unsupported"
    row = harness.bench_one(broken, _qkv, "fwd", "cpu")
    assert row["status"] == "error" and "ValueError: boom" in row["error"]


def test_dense_flops_convention():
    f = harness.dense_flops(2, 3, 128, 64, "fwd", False)
    assert f == 4 * 2 * 3 * 128 * 128 * 64
    assert harness.dense_flops(2, 3, 128, 64, "fwd", True) == f / 2
    assert harness.dense_flops(2, 3, 128, 64, "fwd+bwd", False) == 3.5 * f


def _fake_missing_peer(seq_len, heads, head_dim, causal, dtype, device, **options):
    peers._import("attnlab_no_such_peer_pkg", "no-such-peer")  # raises NotInstalled


def _fake_peer_that_runs(seq_len, heads, head_dim, causal, dtype, device, **options):
    return peers.PeerFn(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal),
                        prepare=lambda q, k, v: (q.contiguous(), k, v), note="fake")


def test_sweep_rows_statuses_json_png(tmp_path):
    fake = [peers.Peer("no-such-peer", "sdpa", _fake_missing_peer),
            peers.Peer("fake-sdpa", "sdpa", _fake_peer_that_runs)]
    out = tmp_path / "rows.json"
    rows = sweep.run_sweep(methods=["sdpa", "dense", "window", "linformer"], lengths=[32, 64], modes=["fwd", "fwd+bwd"],
                         causal_list=[False, True], peer_list=fake, out_path=out, command="pytest", **TINY)
    assert len(rows) == (4 + 2) * 2 * 2 * 2
    for r in rows:
        for key in SCHEMA:
            assert key in r, key
        assert r["status"] in harness.STATUSES
        assert (r["status"] == "ok") == (r["ms"] is not None)
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["command"] == "pytest"

    def status(method, impl, causal):
        return {r["status"] for r in rows if (r["method"], r["impl"], r["causal"]) == (method, impl, causal)}

    for method in ("sdpa", "dense", "window"):
        assert status(method, "attnlab", False) == status(method, "attnlab", True) == {"ok"}
    assert status("linformer", "attnlab", False) == {"ok"}
    assert status("linformer", "attnlab", True) == {"unsupported"}  # cannot do causal: a row, not a crash
    assert status("sdpa", "no-such-peer", False) == {"not installed"}
    assert status("sdpa", "fake-sdpa", True) == {"ok"}
    lin = next(r for r in rows if r["method"] == "linformer" and r["status"] == "ok" and r["seq_len"] == 64)
    assert lin["options"]["max_len"] == 64  # per-length option adjustment
    win = next(r for r in rows if r["method"] == "window")
    assert win["kernel"] == "torch"  # auto on CPU: no flex compile; the row says which kernel ran
    assert win["options"] == attnlab.defaults("window", win["seq_len"])  # the method's own defaults

    saved = json.loads(out.read_text())  # written incrementally, complete at the end
    assert saved == json.loads(json.dumps(rows))
    png = plot.plot(saved, tmp_path / "rows.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_method_at_backend_runs_beside_the_default(tmp_path):
    """"window,window@torch": two attnlab rows per length, told apart by impl, the second built with the
    backend asked for; the method's peers are planned once."""
    impls = sweep.plan_impls(["window", "window@triton"], "all")
    assert [(i.method, i.impl) for i in impls[:2]] == [("window", "attnlab"), ("window", "attnlab@triton")]
    assert len([i for i in impls if i.peer is not None]) == len(peers.peers_for("window"))
    rows = sweep.run_sweep(methods=["window", "window@torch"], lengths=[32], peer_list=[], **TINY)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["attnlab@torch"]["status"] == "ok" and by_impl["attnlab@torch"]["options"]["backend"] == "torch"
    assert "backend" not in by_impl["attnlab"]["options"]  # the default row keeps the method's own options


def test_oom_skips_longer_lengths(monkeypatch):
    def fake_measure(im, t, *args, **kwargs):
        if t >= 64:
            return {"status": "oom", "error": "OutOfMemoryError: CUDA out of memory", "ms": None, "wall_s": 0.0}
        return {"status": "ok", "error": None, "ms": 1.0, "peak_mem_bytes": None, "wall_s": 0.0}

    monkeypatch.setattr(sweep, "_measure", fake_measure)
    rows = sweep.run_sweep(methods=["dense"], lengths=[32, 64, 128, 256], peer_list=[], **TINY)
    assert [r["status"] for r in rows] == ["ok", "oom", "skipped", "skipped"]
    assert "out of memory at seq_len=64" in rows[2]["error"]


def test_cli_main_writes_files(tmp_path):
    rc = attnlab_main(["bench", "--methods", "sdpa,linear", "--lengths", "32,64", "--heads", "2", "--head-dim", "16",
                   "--device", "cpu", "--dtype", "fp32", "--peers", "none", "--repeats", "2", "--warmup", "1",
                   "--out", str(tmp_path), "--name", "t", "--no-progress"])
    assert rc == 0
    rows = json.loads((tmp_path / "t.json").read_text())
    assert {r["status"] for r in rows} == {"ok"} and len(rows) == 4
    assert (tmp_path / "t.png").stat().st_size > 0
    assert "bench --methods sdpa,linear" in (tmp_path / "t.cmd.txt").read_text()
    assert isinstance(json.loads((tmp_path / "t.crossover.json").read_text()), list)


def _row(method, impl, t, ms, status="ok", mem=None):
    return {"method": method, "impl": impl, "seq_len": t, "batch": 1, "mode": "fwd", "causal": False,
            "dtype": "bfloat16", "device": "cuda", "heads": 16, "head_dim": 64, "ms": ms, "status": status,
            "peak_mem_bytes": mem}


def test_crossover_on_synthetic_rows():
    lengths = [1024, 2048, 4096, 8192, 16384]
    sdpa = [_row("sdpa", "attnlab", t, t * t / 1e6, mem=t * t) for t in lengths[:-1]]
    sdpa.append(_row("sdpa", "attnlab", 16384, None, status="oom"))
    lin = [_row("linear", "attnlab", t, t / 1e3 * 4, mem=t * 5000) for t in lengths]  # cheaper from 4096 on
    noisy = [_row("nystrom", "attnlab", t, ms) for t, ms in zip(lengths, [0.1, 99, 0.1, 0.1, 0.1])]
    never = [_row("dense", "attnlab", t, t * t / 1e5) for t in lengths[:-1]]
    got = {e["method"]: e for e in plot.crossover(sdpa + lin + noisy + never)}
    assert got["linear"]["crossover_time"] == 4096  # 4.096 < 16.8 ms; at 2048: 8.2 > 4.2
    assert got["linear"]["crossover_memory"] == 8192  # 8192*5000 < 8192^2; at 4096: 20.5M > 16.8M
    assert got["nystrom"]["crossover_time"] == 4096  # it must stay cheaper: the dip at 1024 does not count
    assert got["dense"]["crossover_time"] is None
    assert got["linear"]["ratio_time"]["16384"] is None  # SDPA ran out of memory there: cheaper, no ratio
    assert "sdpa" not in got
    absent = [_row("window", "peer", t, None, status="not installed") for t in lengths]
    table = plot.crossover_table(list(got.values()) + plot.crossover(sdpa + absent)).splitlines()
    cells = {ln.split()[3]: ln.split()[4:] for ln in table[2:]}  # impl -> (time, memory)
    assert table[0].startswith("crossover against sdpa [attnlab]")
    assert cells["peer"] == ["-", "-"]  # never compared: not "never"
    assert [ln.split()[4:] for ln in table[2:] if ln.split()[2] in ("linear", "dense")] == [["never", "-"],
                                                                                               ["4096", "8192"]]
    # cheaper at 4096 but out of memory at 8192, where SDPA ran: no crossover (a failure is not "cheaper")
    fails = [_row("lsh", "attnlab", t, 0.001) for t in lengths[:3]] + [_row("lsh", "attnlab", 8192, None, "oom")]
    assert plot.crossover(sdpa + fails)[0]["crossover_time"] is None


@pytest.mark.parametrize("args,match", [
    (["--lengths", "x"], "--lengths expects comma-separated integers"),
    (["--lengths", "64,-1"], "--lengths must be positive integers"),
    (["--methods", "window,nosuch"], "unknown attention method 'nosuch'"),
    (["--methods", "window", "--set", "window.nosuch=1"], "has no option(s) 'nosuch'"),
    (["--methods", "window", "--set", "window.window=-3"], "window"),
    (["--methods", "global_sparse"], "`pattern` is required"),
    (["--repeats", "0"], "--repeats must be an integer >= 1"),
    (["--mode", "back"], "--mode must be fwd, fwd+bwd or both"),
    (["--methods", "window@nosuch"], "backend must be one of"),
    (["--methods", "nosuch@triton"], "unknown attention method 'nosuch'"),
    (["--methods", "window,nystrom", "--causal"], "'nystrom' cannot do causal attention"),
])
def test_cli_bad_input_is_one_line_before_any_timing(args, match, tmp_path, capsys):
    from tests.helpers import assert_cli_one_line_error

    assert_cli_one_line_error(["bench", "--device", "cpu", *args, "--out", str(tmp_path / "out")], match, capsys,
                              tmp_path / "out")


def test_own_flops_follow_each_method_and_reach_the_rows():
    """Each method's own forward count: dense pairs for softmax attention (bottom-right causal), the window's band
    (equal to dense at its exact limit), and rows carrying method_flops (x3.5 fwd+bwd) and compulsory bytes."""
    from attnlab.methods.base import visible_pairs

    d, t = 16, 40
    dense = attnlab.make("dense", head_dim=d, num_heads=2)
    assert dense.flops(t, t, False) == 4 * t * t * d
    assert dense.flops(t, t, True) == 4 * (t * (t + 1) // 2) * d
    assert visible_pairs(3, 7, True) == 3 * 5 + 3  # rows see 5, 6, 7 keys
    win = attnlab.make("window", head_dim=d, num_heads=2, window=t)
    assert win.flops(t, t, True) == dense.flops(t, t, True)
    narrow = attnlab.make("window", head_dim=d, num_heads=2, window=3, sinks=0)
    assert narrow.flops(t, t, True) == 4 * d * (t * 4 - 6)  # rows 0..2 see 1..3 keys, the rest 4
    lin = attnlab.make("linear", head_dim=d, num_heads=2)  # elu + 1: no projection, F = d
    assert lin.flops(t, t, True) == 2 * (t * (t + 1) // 2) * (2 * d + 1)  # short causal: the one quadratic pass
    big = 4096  # beyond parallel_max_t: the chunked form's state pass + intra-chunk quadratic
    assert lin.flops(big, big, True) == 4.0 * big * d * d + 2.0 * big * d + big * 64 * (2 * d + 1)
    assert lin.flops(t, t, False) == 4.0 * t * d * d + 2.0 * t * d
    mid = 768  # quadratic pass for inference, chunked form when autograd records (linear_triton.parallel_max_t)
    chunked = 4.0 * mid * d * d + 2.0 * mid * d + mid * 64 * (2 * d + 1)
    assert lin.flops(mid, mid, True) == 2 * (mid * (mid + 1) // 2) * (2 * d + 1)
    assert lin.flops(mid, mid, True, grad=True) == chunked
    rows = sweep.run_sweep(methods=["linear"], lengths=[mid], modes=["fwd", "fwd+bwd"], causal_list=[True],
                           peer_list=[], **{**TINY, "repeats": 1, "warmup": 0})
    by_mode = {r["mode"]: r for r in rows if r["method"] == "linear"}  # each mode counts the form it runs
    assert by_mode["fwd"]["method_flops"] == lin.flops(mid, mid, True) * 2
    assert by_mode["fwd+bwd"]["method_flops"] == chunked * 2 * 3.5
    lsh = attnlab.make("lsh", head_dim=d, num_heads=2, bucket_size=t, n_hashes=2)
    assert lsh.flops(t, t, False) == 4 * 2 * t * t * d  # one bucket, no hashing: each round is dense
    rows = sweep.run_sweep(methods=["window"], lengths=[32], modes=["fwd", "fwd+bwd"], peer_list=[], **TINY)
    by_mode = {r["mode"]: r for r in rows if r["method"] == "window"}
    own = attnlab.make("window", head_dim=16, num_heads=2, **attnlab.defaults("window", 32)).flops(32, 32, False)
    assert by_mode["fwd"]["method_flops"] == own * 2 and by_mode["fwd+bwd"]["method_flops"] == own * 2 * 3.5
    assert by_mode["fwd"]["min_bytes"] == 2 * 32 * 16 * 4 * 4 and by_mode["fwd+bwd"]["min_bytes"] == 3 * by_mode["fwd"]["min_bytes"]
    assert "matmul_fraction" not in by_mode["fwd"]  # ceilings are measured on CUDA only


def test_summary_says_why_a_row_was_not_measured_once_per_reason():
    from attnlab.cli.bench import summary

    row = {"mode": "fwd", "causal": True, "method": "nystrom", "impl": "attnlab", "seq_len": 64, "batch": 1}
    rows = [{**row, "status": "unsupported", "error": "Unsupported: nystrom: it cannot do causal attention"},
            {**row, "seq_len": 128, "status": "unsupported", "error": "Unsupported: nystrom: it cannot do causal attention"},
            {**row, "method": "sdpa", "status": "ok", "ms": 1.0, "peak_mem_bytes": 2**20}]
    lines = summary(rows).splitlines()
    assert [ln.split()[-3] for ln in lines[1:3]] == ["[1]", "[1]"] and lines[-1].endswith("cannot do causal attention")
    assert len(lines) == 5 and len({len(ln) for ln in lines[:4]}) == 1  # one footnote; the columns stay aligned


def test_an_sdpa_backend_without_a_kernel_says_so():
    """The memory-efficient SDPA backend has no CPU kernel: the row's reason says that first, torch's words after."""
    fn = peers._sdpa_factory("efficient")(64, 2, 16, False, torch.float32, "cpu")
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(peers.Unsupported, match=r"SDPA backend 'efficient' has no kernel for these inputs on cpu \(torch: "):
        fn(q, q, q)
