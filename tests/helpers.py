"""Shared test helpers: seeded inputs, the fp64 reference, and THE tolerance rule (constants here only).

Tolerance rule (flash-attention's): a method's max abs error vs an fp64 dense reference must be at most
FACTOR x the max abs error of `dense` computed in the same dtype, plus a small absolute FLOOR (for fp32 the
dense error is ~1e-7, below what a different but exact order of operations can promise).
"""
from __future__ import annotations

import torch

import attnlab
from attnlab.methods.base import repeat_kv
from attnlab.methods.dense import dense_attention

FACTOR = 2.0
FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}
DTYPES = (torch.float32, torch.bfloat16)
# Kernelised attention's chunked / one-pass forms keep features and states in the inputs' dtype for their
# matmuls (as flash-linear-attention does). In bf16 that adds roundings at the output's scale that the
# quadratic form (rounding scores, probabilities and the output once) does not have: a single-token row
# is exact in the quadratic form and off by ~1 ulp in the chunked one. Allowed: two bf16 roundings (2 x 2^-8)
# of the largest |output|. fp32 keeps its states in fp32 and gets no allowance.
STATE_ROUNDING = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def rand_qkv(b=2, h=4, tq=16, tk=None, d=16, hkv=None, dtype=torch.float32, seed=0, std=1.0, requires_grad=False):
    """Seeded q [b,h,tq,d], k/v [b,hkv,tk,d]. Drawn in fp64 then cast, so every dtype sees the same values."""
    tk = tq if tk is None else tk
    hkv = h if hkv is None else hkv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g, dtype=torch.float64) * std
    k = torch.randn(b, hkv, tk, d, generator=g, dtype=torch.float64) * std
    v = torch.randn(b, hkv, tk, d, generator=g, dtype=torch.float64)
    out = [x.to(dtype) for x in (q, k, v)]
    if requires_grad:
        for x in out:
            x.requires_grad_(True)
    return out


def reference(q, k, v, **mask_kw) -> torch.Tensor:
    """fp64 dense attention on GQA-expanded heads: the truth every method is judged against."""
    groups = q.shape[1] // k.shape[1]
    out, _ = dense_attention(
        q.detach().double(), repeat_kv(k.detach().double(), groups), repeat_kv(v.detach().double(), groups), **mask_kw
    )
    return out


def dense_error(q, k, v, **mask_kw) -> float:
    """Max abs error of `dense` run in q's dtype vs the fp64 reference: the yardstick for FACTOR."""
    groups = q.shape[1] // k.shape[1]
    with torch.no_grad():
        low, _ = dense_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), **mask_kw)
    return (low.double() - reference(q, k, v, **mask_kw)).abs().max().item()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_matches_reference(out, q, k, v, ref=None, factor: float = FACTOR, **mask_kw) -> float:
    """Assert the tolerance rule; return the measured error (tests print it for the closing note)."""
    assert torch.isfinite(out).all(), "output has NaN/inf"
    ref = reference(q, k, v, **mask_kw) if ref is None else ref
    err = max_err(out, ref)
    bound = factor * dense_error(q, k, v, **mask_kw) + FLOOR[q.dtype]
    assert err <= bound, f"max abs error {err:.3e} > bound {bound:.3e} ({q.dtype})"
    return err


def check_vs_quadratic(out, q, k, v, m, **kw) -> float:
    """A kernelised method's output vs its own quadratic form (need_probs=True) in fp64; bound = FACTOR x
    (quadratic form in q's dtype vs fp64) + FLOOR + STATE_ROUNDING x max |truth|. Returns the error."""
    assert torch.isfinite(out).all(), "output has NaN/inf"
    truth = m(q.double(), k.double(), v.double(), need_probs=True, **kw)[0]
    low_err = max_err(m(q, k, v, need_probs=True, **kw)[0], truth)
    err = max_err(out, truth)
    bound = FACTOR * low_err + FLOOR[q.dtype] + STATE_ROUNDING[q.dtype] * truth.abs().max().item()
    assert err <= bound, f"{err:.3e} > {bound:.3e} ({q.dtype}, {kw})"
    return err


def grads(fn, q, k, v):
    """d(sum(out * w))/d(q, k, v) for a fixed random w."""
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64).to(out.dtype)
    (out * w).sum().backward()
    return q.grad, k.grad, v.grad


def make(name, q, k, **opts):
    return attnlab.make(name, head_dim=q.shape[-1], num_heads=q.shape[1], num_kv_heads=k.shape[1], **opts)


def assert_cli_one_line_error(argv: list[str], match: str, capsys, out=None) -> None:
    """`attnlab ARGV` (in-process) exits 2 with exactly one line on stderr containing `match`, and writes
    nothing into `out` (a folder that must not exist afterwards)."""
    import attnlab.cli

    rc = attnlab.cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and match in lines[0], err
    assert out is None or not out.exists()


def run_killed(argv: list, out, marker: str, cwd, timeout: float = 300) -> None:
    """Start `python -m attnlab ARGV --out OUT`, SIGKILL it once OUT/checkpoints/MARKER exists, and check it really
    died mid-run (no result.json): what the resume tests continue from."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = Path(out)
    proc = subprocess.Popen([sys.executable, "-m", "attnlab", *map(str, argv), "--out", str(out)], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not (out / "checkpoints" / marker).exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()  # it really died mid-run


def assert_grads_agree(loss_fn, q, k, v, *, backends=("triton", "torch"), tol: float = 2e-5) -> None:
    """Gradients of loss_fn(backend)(q, k, v) under two backends: finite, and within `tol` of each other."""
    g_a, g_b = (grads(loss_fn(b), q, k, v) for b in backends)
    for a, r in zip(g_a, g_b):
        assert torch.isfinite(a).all()
        assert max_err(a, r) < tol, max_err(a, r)
