"""Correctness on the GPU (CI has none), for every registered method, with what each method declares:

1. exact limit (`Method.exact_limit`) vs an fp64 dense reference on CUDA, fp32 and bf16, causal and not, with
   padding and a fully padded batch row that must come back as zeros (FlexAttention's empty rows included);
2. the CUDA path (backend="auto": Triton kernels, torch.compile-fused feature maps, flex, SDPA cores, bf16
   matmuls) vs the same module's eager CPU path (backend="eager"/"torch" where a method has one), outputs and
   gradients, at the method's `test_options`, each against the same module's fp64 CPU output: the CUDA error
   may be at most 2x the CPU path's own error in that dtype (plus a floor); the kernel that ran is printed;
3. causal no-leak on CUDA, bit for bit;
4. the declared extras (lse, column sums) on CUDA vs the CPU path;
5. inputs in transformers' layout ([B, H, T, D] views of [B, T, H, D] memory) vs contiguous copies;
6. per method: lsh's buckets, window's band masks, block_sparse's and learned_mask's cheap kernel mask_mod
   (compiled and force-eager), linear's maps inside the kernels with gradients, performer's reverse walks at its 256
   features, nystrom's solve.

    PYTHONPATH=src python benchmarks/gpu_checks.py               # every method, prints a line per check, exits 1 on a failure
    PYTHONPATH=src python benchmarks/gpu_checks.py linear,window  # only these methods
    PYTHONPATH=src python benchmarks/gpu_checks.py --quick        # fp32 limits + bf16 CUDA-vs-CPU only (about a minute)
    PYTHONPATH=src python benchmarks/gpu_checks.py window@triton  # a method with a chosen CUDA backend (not auto)
    PYTHONPATH=src python benchmarks/gpu_checks.py linear --linear-form chunked  # the causal kernels' chunked forward
    PYTHONPATH=src python benchmarks/gpu_checks.py --limits       # the kernels' size limits (grid rows, 32-bit rows)
"""
from __future__ import annotations

import argparse
import contextlib
import operator
import sys

import torch

import attnlab
from attnlab import registry
from attnlab.methods.base import repeat_kv
from attnlab.methods.dense import dense_attention
from attnlab.ops import sparse as sparse_ops

T, D, H, HKV, B = 256, 64, 8, 4, 2
T_BANDS = 2000  # window_bands' length
BOUND = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # CUDA vs CPU: fp32 summation order; bf16 a few output ulps


def cpu_backend(name):
    """The plain-PyTorch backend of a method (None when it has one kernel)."""
    choices = registry.get(name).Options.__dataclass_fields__.get("backend")
    if choices is None:
        return None
    opts = choices.metadata.get("choices") or ()
    for b in ("eager", "torch"):
        if b in opts:
            return b
    return None


def inputs(seed=0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64) * std
    k = torch.randn(B, HKV, T, D, generator=g, dtype=torch.float64) * std
    v = torch.randn(B, HKV, T, D, generator=g, dtype=torch.float64)
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, :] = False  # a batch row with no real key: every query row must return zeros
    kpm[0, 200:] = False
    return q, k, v, kpm


def variant(spec: str) -> tuple[str, dict]:
    """"window@triton" -> ("window", {"backend": "triton"}): the options the CUDA module is built with."""
    name, _, backend = spec.partition("@")
    return name, ({"backend": backend} if backend else {})


def exact_limits(names, dtypes) -> int:
    failures = 0
    q64, k64, v64, kpm = inputs()
    for spec in names:
        name, cuda_opts = variant(spec)
        cls, caps = registry.get(name), registry.capabilities(name)
        limit = cls.exact_limit(T, T)
        limit = None if limit is None else {**limit, **cuda_opts}
        if limit is None or name == "nystrom":  # nystrom's exact pinv at T=256 is ill-conditioned in fp32: CPU tests
            continue
        for causal in ((False, True) if caps.causal else (False,)):
            for dtype in dtypes:
                m = attnlab.make(name, head_dim=D, num_heads=H, num_kv_heads=HKV, **limit).to("cuda")
                q, k, v = (x.to("cuda", dtype) for x in (q64, k64, v64))
                with torch.no_grad():
                    out = m(q, k, v, causal=causal, key_padding_mask=kpm.cuda()).out
                ref, _ = dense_attention(q64, repeat_kv(k64, 2), repeat_kv(v64, 2), causal=causal, key_padding_mask=kpm)
                low, _ = dense_attention(q.cpu().double().to(dtype), repeat_kv(k.cpu(), 2), repeat_kv(v.cpu(), 2),
                                         causal=causal, key_padding_mask=kpm)
                err = (out.double().cpu() - ref).abs().max().item()
                bound = 2 * (low.double() - ref).abs().max().item() + (2e-5 if dtype == torch.float32 else 2e-3)
                finite, zeros = bool(torch.isfinite(out).all()), bool((out[1] == 0).all())
                ok = finite and zeros and err <= bound
                failures += not ok
                print(f"{'ok ' if ok else 'FAIL'} limit {spec:13} causal={causal!s:5} {str(dtype):15} kernel={m.kernel:18} "
                      f"err={err:.2e} bound={bound:.2e} finite={finite} padded-row-zeros={zeros}", flush=True)
    return failures


def cuda_vs_cpu(names, dtypes) -> int:
    failures = 0
    for spec in names:
        name, cuda_opts = variant(spec)
        cls, caps = registry.get(name), registry.capabilities(name)
        opts = cls.test_options(T)
        # rfa's trig normaliser cancels at std 1 (outputs blow up, as in its CPU tests): std 0.5 there
        q64, k64, v64, kpm = inputs(std=0.5 if name == "rfa" else 1.0)
        eager = cpu_backend(name)
        for causal in ((False, True) if caps.causal else (False,)):
            for dtype in dtypes:
                outs, grads, extras, kernels = [], [], [], []
                o64 = dict(opts, **({"backend": eager} if eager else {}))
                m64 = attnlab.make(name, head_dim=D, num_heads=H, num_kv_heads=HKV, **o64).double()
                q, k, v = (x.clone().requires_grad_(True) for x in (q64, k64, v64))
                out = m64(q, k, v, causal=causal, key_padding_mask=kpm).out
                w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
                (out * w).sum().backward()
                truth, gtruth = out.detach(), [x.grad for x in (q, k, v)]
                for dev in ("cpu", "cuda"):
                    o = dict(opts, **({"backend": eager} if dev == "cpu" and eager else cuda_opts if dev == "cuda" else {}))
                    m = attnlab.make(name, head_dim=D, num_heads=H, num_kv_heads=HKV, **o).to(dev)
                    q, k, v = (x.to(dev, dtype).requires_grad_(True) for x in (q64, k64, v64))
                    out = m(q, k, v, causal=causal, key_padding_mask=kpm.to(dev)).out
                    kernels.append(m.kernel)
                    w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(dev, dtype)
                    (out * w).sum().backward()
                    outs.append(out.detach().double().cpu())
                    grads.append([x.grad.double().cpu() for x in (q, k, v)])
                    if caps.extras:
                        # the extras the CUDA module's kernel serves (window@triton: lse, not column sums)
                        need = {f"need_{x}": x in caps.extras and not attnlab.make(
                            name, head_dim=D, num_heads=H, num_kv_heads=HKV, **opts, **cuda_opts).unsupported_reasons(
                            **{f"need_{x}": True}, device="cuda") for x in ("lse", "col_sums")}
                        with torch.no_grad():
                            r = m(q, k, v, causal=causal, key_padding_mask=kpm.to(dev), **need)
                        extras.append([None if t is None else t.double().cpu() for t in (r.lse, r.col_sums)])
                # the CUDA path's error vs fp64, against the CPU path's own error in the same dtype (the yardstick)
                e_cpu, e_cuda = ((o - truth).abs().max().item() for o in outs)
                scale = max(1.0, truth.abs().max().item())
                g_rel = [max(((a - t).abs().max() / t.abs().max().clamp_min(1e-6)).item() for a, t in zip(g, gtruth))
                         for g in grads]
                gerr = g_rel[1]
                finite = all(torch.isfinite(t).all() for t in [outs[1], *grads[1]])
                xerr = 0.0
                if extras:
                    for a, b in zip(*extras):
                        if a is not None:
                            fin = torch.isfinite(a)
                            if not torch.equal(fin, torch.isfinite(b)):
                                xerr = float("inf")
                            else:
                                xerr = max(xerr, ((a[fin] - b[fin]).abs().max() / max(1.0, a[fin].abs().max())).item())
                leak = 0.0
                if causal:
                    t0 = 100
                    m = attnlab.make(name, head_dim=D, num_heads=H, num_kv_heads=HKV, **opts, **cuda_opts).to("cuda")
                    q, k, v = (x.to("cuda", dtype) for x in (q64, k64, v64))
                    k2, v2 = k.clone(), v.clone()
                    k2[:, :, t0 + 1:] += 3.0
                    v2[:, :, t0 + 1:] -= 5.0
                    with torch.no_grad():
                        a = m(q, k, v, causal=True).out
                        b = m(q, k2, v2, causal=True).out
                    leak = (a[:, :, : t0 + 1] - b[:, :, : t0 + 1]).abs().max().item()
                # gradients: the CPU path's own error twice, plus the output's margin (every committed run's CUDA
                # gradient error is within 2x the CPU's but rfa's bf16 trig features, 0.064 against 2 * 0.024)
                ok = (finite and e_cuda <= 2 * e_cpu + BOUND[dtype] * scale and gerr <= 2 * g_rel[0] + BOUND[dtype]
                      and leak == 0.0 and xerr <= BOUND[dtype])
                failures += not ok
                print(f"{'ok ' if ok else 'FAIL'} cuda-vs-cpu {spec:12} causal={causal!s:5} {str(dtype):15} "
                      f"kernels cpu={kernels[0]} cuda={kernels[1]} out err vs fp64 cuda={e_cuda:.2e} cpu={e_cpu:.2e} "
                      f"grad rel err cuda={gerr:.2e} cpu={g_rel[0]:.2e} "
                      f"extras err={xerr:.1e} finite={finite} leak={leak:.1e}", flush=True)
    return failures


def lsh_buckets(dtypes) -> int:
    """lsh with several buckets (its test_options keep one, the dense limit): the Triton kernels vs the PyTorch form
    on the same GPU (the same hashes, so the same buckets), outputs and gradients, shared and separate QK, causal
    and not, padding and a fully padded row, a length not a multiple of the bucket; and no-leak bit for bit with
    only later values changed (later keys may move buckets and so, by design, earlier chunks: `methods.lsh`)."""
    failures = 0
    from attnlab.ops.lsh_triton import hash_sort

    for dtype in dtypes:  # the fused hash against the PyTorch one: the same buckets but for fp32 rounding near ties
        m = attnlab.make("lsh", head_dim=D, num_heads=16, bucket_size=64, n_hashes=2)
        x = torch.randn(1, 16, 8192, D, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(dtype)
        nb = m.n_buckets(8192)
        bkt = m._hash(x, nb, 8192)
        order, sbkt = hash_sort(x, m.rotations(nb, "cuda", torch.float32), nb, 8192)
        differ = (torch.empty_like(sbkt).scatter_(-1, order, sbkt) != bkt).float().mean().item()  # per position
        ok = differ <= 1e-4
        failures += not ok
        print(f"{'ok ' if ok else 'FAIL'} lsh-hash T=8192 buckets={nb} {str(dtype):15} fused vs PyTorch: {differ:.1e} of "
              f"the tokens' buckets differ", flush=True)
    q64, k64, v64, kpm = inputs()
    for t, bucket, rounds in ((T, 32, 2), (T - 6, 64, 3)):
        for shared in (False, True):
            for causal in (False, True):
                for dtype in dtypes:
                    res = []
                    for backend in ("triton", "eager"):
                        m = attnlab.make("lsh", head_dim=D, num_heads=H, num_kv_heads=HKV, bucket_size=bucket,
                                         n_hashes=rounds, shared_qk=shared, backend=backend).cuda()
                        q, k, v = (x[:, :, :t].to("cuda", dtype).requires_grad_(True) for x in (q64, k64, v64))
                        out = m(q, k, v, causal=causal, key_padding_mask=kpm[:, :t].cuda()).out
                        w = torch.linspace(-1, 1, out.numel(), device="cuda", dtype=dtype).reshape(out.shape)
                        (out * w).sum().backward()
                        res.append((m.kernel, out.detach().double(), [x.grad.double() for x in ((q, v) if shared else (q, v, k))]))
                    (kern, out, gr), (_, ref, gref) = res
                    err = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
                    gerr = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(gr, gref))
                    leak = 0.0
                    if causal:
                        m = attnlab.make("lsh", head_dim=D, num_heads=H, num_kv_heads=HKV, bucket_size=bucket,
                                         n_hashes=rounds, shared_qk=shared, backend="triton").cuda()
                        q, k, v = (x[:, :, :t].to("cuda", dtype) for x in (q64, k64, v64))
                        v2 = v.clone()
                        v2[:, :, 101:] -= 5.0
                        with torch.no_grad():
                            leak = (m(q, k, v, causal=True).out - m(q, k, v2, causal=True).out)[:, :, :101].abs().max().item()
                    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in gr)
                    zeros = bool((out[1] == 0).all())
                    ok = finite and zeros and kern == "triton" and err <= BOUND[dtype] and gerr <= 2 * BOUND[dtype] and leak == 0.0
                    failures += not ok
                    print(f"{'ok ' if ok else 'FAIL'} lsh-buckets T={t} bucket={bucket} rounds={rounds} shared={shared!s:5} "
                          f"causal={causal!s:5} {str(dtype):15} kernel={kern} out rel err vs eager={err:.2e} "
                          f"grad rel err={gerr:.2e} finite={finite} padded-row-zeros={zeros} leak={leak:.1e}", flush=True)
    return failures


def nystrom_solve(dtypes) -> int:
    """nystrom's inference path (no autograd: A, pinv(A) and X in one kernel, `ops.nystrom_triton.solve`) against its
    path with gradients (PyTorch ops between the two kernels) and the PyTorch form, on the GPU: its test_options and
    64 landmarks, with padding (an empty landmark, a fully padded row) and a landmark count that is not a power of 2."""
    failures = 0
    q64, k64, v64, kpm = inputs()
    for landmarks, pad in ((64, True), (48, True), (64, False)):
        for dtype in dtypes:
            q, k, v = (x.to("cuda", dtype) for x in (q64, k64, repeat_kv(v64, H // HKV)))
            k = repeat_kv(k, H // HKV)
            mask = kpm.cuda() if pad else None
            outs = {}
            for name, backend, grad in (("solve", "triton", False), ("grad-path", "triton", True),
                                        ("torch", "torch", False)):
                m = attnlab.make("nystrom", head_dim=D, num_heads=H, num_landmarks=landmarks, backend=backend).cuda()
                qq = q.clone().requires_grad_(grad)
                with torch.set_grad_enabled(grad):
                    outs[name] = m(qq, k, v, key_padding_mask=mask).out.detach().double()
            scale = max(1.0, outs["torch"].abs().max().item())
            e_grad = (outs["solve"] - outs["grad-path"]).abs().max().item() / scale
            e_torch = (outs["solve"] - outs["torch"]).abs().max().item() / scale
            e_ref = (outs["grad-path"] - outs["torch"]).abs().max().item() / scale
            finite = bool(torch.isfinite(outs["solve"]).all())
            zeros = not pad or bool((outs["solve"][1] == 0).all())
            ok = finite and zeros and e_grad <= BOUND[dtype] and e_torch <= 2 * e_ref + BOUND[dtype]
            failures += not ok
            print(f"{'ok ' if ok else 'FAIL'} nystrom-solve landmarks={landmarks} pad={pad!s:5} {str(dtype):15} "
                  f"vs grad path {e_grad:.2e} vs torch {e_torch:.2e} (grad path vs torch {e_ref:.2e}) "
                  f"finite={finite} padded-row-zeros={zeros}", flush=True)
    return failures


def layouts(names, dtypes) -> int:
    """q, k, v as transformers hands them over ([B, H, T, D] views of [B, T, H, D] memory, which the Triton kernels
    read where they lie) against contiguous copies of the same values, on CUDA at `test_options`: outputs (inference
    and with gradients) and gradients within a few rounding steps (the same kernels, other addresses: bit-identical
    is expected, another tile order is not wrong). Causal where the method can."""
    failures = 0
    q64, k64, v64, _ = inputs()
    for spec in names:
        name, cuda_opts = variant(spec)
        cls, caps = registry.get(name), registry.capabilities(name)
        for causal in ((False, True) if caps.causal else (False,)):
            for dtype in dtypes:
                m = attnlab.make(name, head_dim=D, num_heads=H, num_kv_heads=HKV, **cls.test_options(T),
                                 **cuda_opts).to("cuda")
                if m.unsupported_reasons(causal=causal, tq=T, tk=T, gqa=True, dtype=dtype, device="cuda"):
                    continue  # e.g. linear@triton non-causal: the kernels are the causal form
                held = [x.to("cuda", dtype).transpose(1, 2).contiguous().transpose(1, 2) for x in (q64, k64, v64)]
                errs, kernels = [], []
                for grad in (False, True):
                    res = []
                    for xs in (held, [x.contiguous() for x in held]):
                        xs = [x.detach().requires_grad_(grad) for x in xs]
                        with torch.set_grad_enabled(grad):
                            out = m(*xs, causal=causal).out
                        kernels.append(m.kernel)
                        got = [out.detach()]
                        if grad:
                            w = torch.linspace(-1, 1, out.numel(), device="cuda", dtype=out.dtype).reshape(out.shape)
                            got += torch.autograd.grad((out * w).sum(), xs)
                        res.append(got)
                    errs += [((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()
                             for a, b in zip(*res)]
                ok = all(e <= BOUND[dtype] / 10 for e in errs)
                failures += not ok
                print(f"{'ok ' if ok else 'FAIL'} layout {spec:13} causal={causal!s:5} {str(dtype):15} kernels="
                      f"{'/'.join(dict.fromkeys(kernels))} rel diff out(inference)/out/dq/dk/dv "
                      + "/".join(f"{e:.1e}" for e in errs), flush=True)
    return failures


def window_bands(dtypes) -> int:
    """The window kernel's band masks (`window_triton.BAND_MODES`) at the GPU's own 64-token tiles, with windows of
    several tiles (`test_options`' 256-token inputs have bands of a tile or two): T = 2000 (not a multiple of the
    tiles), windows 256 and 300, with and without sinks and padding, causal and not, each mode's output and
    gradients against an fp64 dense reference: within a floor of it, and within 2x of the "rule" mode's (the first
    kernel's) own error."""
    from attnlab.ops import window_triton

    t = T_BANDS
    g = torch.Generator().manual_seed(3)
    q64, k64, v64 = (torch.randn(1, 4, t, D, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.randn(1, 4, t, D, generator=g, dtype=torch.float64)
    kpm = torch.ones(1, t, dtype=torch.bool)
    kpm[0, 700:760] = False
    kpm[0, -30:] = False
    base = window_triton.BAND
    try:
        failures = _window_bands(window_triton, dtypes, t, q64, k64, v64, w, kpm)
    finally:
        window_triton.BAND = base
    return failures


def _window_bands(window_triton, dtypes, t, q64, k64, v64, w, kpm) -> int:
    failures = 0
    for window, sinks, causal, pad in ((256, 0, True, False), (256, 4, False, True), (300, 0, False, False),
                                       (300, 4, True, True)):
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        allowed = ((i - j).abs() <= window) | (j < sinks)
        if causal:
            allowed = allowed & (j <= i)
        m = kpm[:, None, None, :] & allowed if pad else allowed
        qr, kr, vr = (x.clone().requires_grad_(True) for x in (q64, k64, v64))
        ref = ((qr @ kr.transpose(-1, -2)) * D ** -0.5).masked_fill(~m, float("-inf")).softmax(-1).nan_to_num(0) @ vr
        (ref * w).sum().backward()
        truth = [ref.detach(), qr.grad, kr.grad, vr.grad]
        for dtype in dtypes:
            errs = {}
            for band in ("rule", *(b for b in window_triton.BAND_MODES if b != "rule")):
                window_triton.BAND = band
                q, k, v = (x.to("cuda", dtype).requires_grad_(True) for x in (q64, k64, v64))
                out, _ = window_triton.window_attention(q, k, v, window=window, sinks=sinks, causal=causal,
                                                        key_padding_mask=kpm.cuda() if pad else None)
                (out * w.to("cuda", dtype)).sum().backward()
                got = [out.detach(), q.grad, k.grad, v.grad]
                errs[band] = [((a.double().cpu() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()
                              for a, r in zip(got, truth)]
                finite = all(bool(torch.isfinite(a).all()) for a in got)
                # every mode within a floor of the fp64 reference, and within 2x of the first kernel's own error
                ok = finite and all(e <= BOUND[dtype] / 3 and e <= 2 * r + BOUND[dtype] / 10
                                    for e, r in zip(errs[band], errs["rule"]))
                failures += not ok
                print(f"{'ok ' if ok else 'FAIL'} window-band {band:6} window={window} sinks={sinks} causal={causal!s:5} "
                      f"pad={pad!s:5} {str(dtype):15} rel err out/dq/dk/dv "
                      + "/".join(f"{e:.1e}" for e in errs[band]) + " (rule "
                      + "/".join(f"{e:.1e}" for e in errs["rule"]) + f") finite={finite}", flush=True)
    return failures


def window_launches() -> int:
    """The window backward's launches (`window_triton.BWD_LAUNCHES`: one launch holding the dk, dv and the dq
    programs, two launches, the two on two streams) give the same bits: each program computes the same thing in
    each. 2000 queries on 2640 keys (more key tiles than query tiles: a launch given the other kind's grid fails), 8
    query heads on 2 kv heads, window 256 + 4 sinks (sink chunks in `_bwd_prep`), bf16, causal and not; eagerly and
    replayed from a CUDA graph."""
    from attnlab.ops import window_triton

    failures, base = 0, window_triton.BWD_LAUNCHES
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(1, 8, T_BANDS, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 2, T_BANDS + 640, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    w = torch.randn_like(q)
    try:
        for causal in (True, False):
            got = {}
            for mode in ("one", "two", "streams"):
                window_triton.BWD_LAUNCHES = mode
                leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]

                def step():
                    out, _ = window_triton.window_attention(*leaves, window=256, sinks=4, causal=causal)
                    return torch.autograd.grad((out.float() * w).sum(), leaves)
                _, eager, graph, static = _eager_and_captured(step)
                graph.replay()
                torch.cuda.synchronize()
                got[mode] = (eager, static)
            for mode in ("two", "streams"):
                ok = all(torch.equal(a, b) for run in range(2) for a, b in zip(got["one"][run], got[mode][run]))
                failures += not ok
                print(f"{'ok ' if ok else 'FAIL'} window-launches {mode:7} causal={causal!s:5} dq/dk/dv bits equal to "
                      f"one launch's, eager and from a CUDA graph: {ok}", flush=True)
    finally:
        window_triton.BWD_LAUNCHES = base
    return failures


def kernel_maps(dtypes) -> int:
    """linear's elementwise maps inside the causal kernels with gradients ("triton+map": q and k mapped on load in the
    forward and backward kernels, the map's derivative applied there) against the same module mapping them first in
    PyTorch (an all-real padding mask sends it there: the same function), outputs and gradients, elu and relu, 9 query
    heads on 3 kv heads (SmolLM2's), at 256 tokens (the parallel passes) and 1500 (the chunked ones). check 2 runs
    linear with padding, so the mapped path alone."""
    failures = 0
    for fmap in ("elu", "relu"):
        for t in (256, 1500):
            for dtype in dtypes:
                g = torch.Generator().manual_seed(t)
                q64, k64, v64 = (torch.randn(2, h, t, D, generator=g, dtype=torch.float64) for h in (9, 3, 3))
                m = attnlab.make("linear", head_dim=D, num_heads=9, num_kv_heads=3, feature_map=fmap).cuda()
                res = []
                for kpm in (None, torch.ones(2, t, dtype=torch.bool, device="cuda")):
                    q, k, v = (x.to("cuda", dtype).requires_grad_(True) for x in (q64, k64, v64))
                    out = m(q, k, v, causal=True, key_padding_mask=kpm).out
                    w = torch.linspace(-1, 1, out.numel(), device="cuda", dtype=torch.float64).reshape(out.shape)
                    (out * w.to(dtype)).sum().backward()
                    res.append((m.kernel, [x.double() for x in (out.detach(), q.grad, k.grad, v.grad)]))
                (kern, got), (ref_kern, ref) = res
                errs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(got, ref)]
                finite = all(bool(torch.isfinite(a).all()) for a in got)
                ok = finite and kern == "triton+map" and all(e <= BOUND[dtype] for e in errs)
                failures += not ok
                print(f"{'ok ' if ok else 'FAIL'} linear-map {fmap:4} T={t:5} {str(dtype):15} kernel={kern} vs "
                      f"{ref_kern}: rel err out/dq/dk/dv " + "/".join(f"{e:.1e}" for e in errs) + f" finite={finite}",
                      flush=True)
    return failures


def _masked(method: str, opts: dict, dev_opts: dict, dev: str):
    """A module for kernel_masks: block_sparse, or learned_mask in eval (its hard mask through the sparse kernel,
    gradients included) with random scores, so each head keeps other blocks."""
    m = attnlab.make(method, head_dim=D, num_heads=H, num_kv_heads=HKV, **opts, **dev_opts)
    if method == "learned_mask":
        with torch.no_grad():
            m.scores.copy_(torch.randn(m.scores.shape, generator=torch.Generator().manual_seed(2)))
        m.eval()
    return m.to(dev)


def _pattern_of(m, tk: int):
    return m._pattern(-(-tk // m.opts.block_size), True) if hasattr(m, "_pattern") else m.pattern


def kernel_masks(dtypes, quick: bool = False, methods=("block_sparse",)) -> int:
    """block_sparse and learned_mask where the compiled kernel gets the cheap mask_mod (`Pattern.block_masks`'
    second, inside the blocks the diagonal cuts: for a block layout aligned with the BlockMask's blocks only the
    causal comparison; for learned_mask's layout OR band + sinks, the band, the sinks and causal, no layout lookup):
    outputs and gradients on CUDA, compiled and under a force-eager stance (what dynamo runs past its recompile
    limit: the whole mask_mod), against the CPU path's fp64 truth with the CPU path's own error in that dtype as the
    yardstick; the BigBird recipe, a fixed per-head layout and learned_mask's (random scores, 4 sinks, its one-block
    band), 64- and 128-token blocks, Tq = Tk (ragged and not), decoding-shaped Tq < Tk with the offset a whole
    number of blocks (cheap) and not (the whole mask_mod), key padding; and, once per pattern and block size, that
    the compiled path does read the kernel mask and the eager one does not (`poisoned_reads`). A call with gradients
    runs 128-token BlockMasks on CUDA (`ops.sparse.call_block_size`: no narrow backward), so a 64-token layout
    takes the cheap mod only without them: each case also runs the compiled forward under no_grad. Quick: three
    shapes, 6 cases a pattern (each compiles its kernels)."""
    failures, probed = 0, set()
    g = torch.Generator().manual_seed(1)
    shapes = ((1000, 1000), (256, 1024), (200, 1024)) if quick else ((1024, 1024), (1000, 1000), (256, 1024), (200, 1024))
    for bs in (64, 128):
        nb = -(-1024 // bs)
        per_head = torch.rand(H, nb, nb, generator=g) < 0.4
        per_head[:, torch.arange(nb), torch.arange(nb)] = True
        cases = [("block_sparse", "bigbird", {"block_size": bs}), ("block_sparse", "layout", {"block_size": bs, "layout": per_head}),
                 ("learned_mask", "learned", {"block_size": bs, "max_blocks": nb, "density": 0.4})]
        for method, kind, opts in (c for c in cases if c[0] in methods):
            cuda_opts = {"backend": "flex"} if method == "learned_mask" else {}  # (auto: Triton for 16-64-token blocks)
            for tq, tk in shapes:
                q64 = torch.randn(B, H, tq, D, generator=g, dtype=torch.float64)
                k64, v64 = (torch.randn(B, HKV, tk, D, generator=g, dtype=torch.float64) for _ in range(2))
                kpm = torch.ones(B, tk, dtype=torch.bool)
                kpm[1, tk - 37:] = False
                m64 = _masked(method, opts, {"backend": "torch"}, "cpu").double()
                flex_bs = m64.flex_block_size if method == "block_sparse" else sparse_ops.flex_block_for(bs)
                pat64 = _pattern_of(m64, tk)
                # the kernel BlockMask a CUDA call gets, without and with gradients: the cheap mod where it differs
                cheap = {grad: operator.is_not(*pat64.block_masks(tq, tk, True, "cpu", sparse_ops.call_block_size(
                    flex_bs, "cuda", backward=grad, tq=tq))) for grad in (False, True)}
                q, k, v = (x.clone().requires_grad_(True) for x in (q64, k64, v64))
                out = m64(q, k, v, causal=True, key_padding_mask=kpm).out
                w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
                (out * w).sum().backward()
                truth, gtruth = out.detach(), [x.grad for x in (q, k, v)]
                for dtype in dtypes:
                    errs, kernels = [], []
                    for dev, stance in (("cpu", None), ("cuda", None), ("cuda", "force_eager")):
                        m = _masked(method, opts, {"backend": "torch"} if dev == "cpu" else cuda_opts, dev)
                        q, k, v = (x.to(dev, dtype).requires_grad_(True) for x in (q64, k64, v64))
                        ctx = torch.compiler.set_stance(stance) if stance else contextlib.nullcontext()
                        with ctx:
                            out = m(q, k, v, causal=True, key_padding_mask=kpm.to(dev)).out
                            (out * w.to(dev, dtype)).sum().backward()
                        kernels.append(m.kernel)
                        if dev == "cuda" and stance is None:  # the inference call: no gradients, narrower blocks
                            with torch.no_grad():
                                e_inf = (m(q, k, v, causal=True, key_padding_mask=kpm.to(dev)).out.double().cpu()
                                         - truth).abs().max().item()
                        e = (out.detach().double().cpu() - truth).abs().max().item()
                        ge = max(((x.grad.double().cpu() - t).abs().max() / t.abs().max().clamp_min(1e-6)).item()
                                 for x, t in zip((q, k, v), gtruth))
                        fin = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(x.grad).all()) for x in (q, k, v))
                        errs.append((e, ge, fin))
                    (e0, g0, _), *cuda = errs
                    # (running the cheap mod where it does not belong moves the gradients by ~0.2-0.3 relative at
                    # 1024 tokens: the bound is the output check's)
                    ok = all(f and e <= 2 * e0 + BOUND[dtype] and ge <= 2 * g0 + BOUND[dtype] for e, ge, f in cuda)
                    ok = ok and e_inf <= 2 * e0 + BOUND[dtype]
                    probe = cheap[False] and dtype == dtypes[0] and (bs, kind) not in probed  # (once each: a compile each)
                    used = poisoned_reads(method, {**opts, **cuda_opts}, tq, tk, dtype, q64, k64, v64) if probe else None
                    if probe:
                        probed.add((bs, kind))
                    ok = ok and used in (None, (True, False))
                    failures += not ok
                    print(f"{'ok ' if ok else 'FAIL'} kernel-mask {method} {kind:7} block={bs} Tq={tq} Tk={tk} "
                          f"{str(dtype):15} cheap-mod no-grad={cheap[False]!s:5} grad={cheap[True]!s:5} "
                          f"kernels={kernels[1]}/{kernels[2]} out err vs fp64 compiled no-grad={e_inf:.2e} "
                          f"compiled={cuda[0][0]:.2e} force-eager={cuda[1][0]:.2e} cpu={e0:.2e} grad rel err "
                          f"compiled={cuda[0][1]:.2e} force-eager={cuda[1][1]:.2e} cpu={g0:.2e}"
                          + ("" if used is None else f" poisoned kernel mask read: compiled={used[0]} "
                             f"force-eager={used[1]}"), flush=True)
    return failures


def poisoned_reads(method, opts, tq, tk, dtype, q64, k64, v64) -> tuple[bool, bool]:
    """Whether the compiled path and the force-eager path read the kernel BlockMask's mask_mod: with it poisoned
    (every pair of a partial block masked) the compiled output must move and the force-eager one must not; else the
    compiled column above ran eagerly (past the recompile limit) or without the cheap mask, and proved nothing."""
    m = _masked(method, opts, {}, "cuda")
    q, k, v = (x.to("cuda", dtype) for x in (q64, k64, v64))

    def both():
        with torch.no_grad():
            compiled = m(q, k, v, causal=True).out
            with torch.compiler.set_stance("force_eager"):
                return compiled, m(q, k, v, causal=True).out
    clean = both()
    pat = _pattern_of(m, tk)
    pat.partial_mask_mod = lambda *a, **kw: (lambda b, h, qi, ki: qi < 0)
    pat.touch()  # (drops the cached BlockMasks: the poisoned kernel mask is built next)
    return tuple(not torch.equal(a, b) for a, b in zip(both(), clean))


def performer_walks(dtypes) -> int:
    """performer at its defaults (FAVOR+'s 256 features: `favor_triton`'s one-sweep forward, the chunked passes, the
    one-node path of `performer_triton` with its two streams) with SmolLM2's 9 query heads on 3, q, k, v in
    transformers' layout, at 1000 tokens (16 chunks: `reverse_walk` takes the walk per query head) and 1500 (24: per
    kv head), each walk forced too (`REVERSE_WALK`): outputs and gradients against the same module's fp64 CPU path,
    within 2x its own bf16 CPU path's error (as check 2), and against each other (also "chunkmax": the chunk maxima
    of the key log-scales from a launch of their own, `linear_triton.OWN_P` off). The one node against the
    composition it replaces (`performer_triton.FUSED` off): equal bits (same kernels, same inputs; a race between
    its streams would show here), also replayed from a CUDA graph (its fork and join captured). check 2 runs
    performer at its 64-feature test options and 256 tokens, which reach none of this."""
    from attnlab.ops import linear_triton, performer_triton

    failures = 0
    for t in (1000, 1500):
        g = torch.Generator().manual_seed(t)
        row = torch.randn(1, t, (9 + 3 + 3) * D, generator=g, dtype=torch.float64)
        m64 = attnlab.make("performer", head_dim=D, num_heads=9, num_kv_heads=3, backend="eager").double()

        def run(m, dev, dtype):
            r = row.to(dev, dtype, copy=True).requires_grad_(True)
            q, k, v = (x.unflatten(-1, (-1, D)).transpose(1, 2) for x in r.split([9 * D, 3 * D, 3 * D], dim=-1))
            out = m(q, k, v, causal=True).out
            w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(dev, dtype)
            (out * w).sum().backward()
            return m.kernel, [out.detach().double().cpu(), r.grad.double().cpu()]

        _, truth = run(m64, "cpu", torch.float64)
        for dtype in dtypes:
            _, cpu = run(attnlab.make("performer", head_dim=D, num_heads=9, num_kv_heads=3, backend="eager"), "cpu", dtype)
            err_cpu = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(cpu, truth)]
            got = {}
            for walk in ("auto", "kv", "query", "chunkmax", "composed"):
                linear_triton.REVERSE_WALK = walk if walk in ("kv", "query") else "auto"
                performer_triton.FUSED = walk != "composed"
                linear_triton.OWN_P = walk != "chunkmax"
                try:
                    kern, got[walk] = run(attnlab.make("performer", head_dim=D, num_heads=9, num_kv_heads=3).cuda(),
                                          "cuda", dtype)
                finally:
                    linear_triton.REVERSE_WALK = "auto"
                    performer_triton.FUSED = linear_triton.OWN_P = True
                errs = [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got[walk], truth)]
                finite = all(bool(torch.isfinite(a).all()) for a in got[walk])
                ok = finite and all(e <= 2 * c + BOUND[dtype] for e, c in zip(errs, err_cpu))
                if walk == "composed":  # the same kernels on the same inputs: the same bits
                    ok = ok and all(torch.equal(a, b) for a, b in zip(got[walk], got["auto"]))
                elif walk != "auto":
                    ok = ok and all(((a - b).abs().max() / b.abs().max()).item() <= BOUND[dtype]
                                    for a, b in zip(got[walk], got["auto"]))
                failures += not ok
                print(f"{'ok ' if ok else 'FAIL'} performer-walk T={t:5} walk={walk:8} "
                      f"(auto: {linear_triton.reverse_walk(256, -(-t // 64))}) {str(dtype):15} kernel={kern}: rel err vs "
                      f"fp64 out/grad cuda {errs[0]:.1e}/{errs[1]:.1e} cpu {err_cpu[0]:.1e}/{err_cpu[1]:.1e} "
                      f"finite={finite}" + (" bits equal to the one node" if walk == "composed" else ""), flush=True)
        failures += _performer_graph(row, t)
    return failures


def _eager_and_captured(step):
    """(side stream, step()'s eager outputs cloned, a CUDA graph of step, the graph's outputs): step run twice on a
    side stream (warm-up and compilation outside the capture), then captured. Every eager call goes on the side
    stream: a leaf first used on the legacy stream would make autograd sync that stream inside the capture (an error
    of the harness, not of the code under test)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
        want = [x.clone() for x in step()]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        held = step()
    return side, want, graph, held


def _performer_graph(row, t) -> int:
    """The one-node path's fwd+bwd captured as a CUDA graph and replayed (after other work on both streams): the
    eager call's bits."""
    m = attnlab.make("performer", head_dim=D, num_heads=9, num_kv_heads=3).cuda()
    r = row.to("cuda", torch.bfloat16, copy=True)
    q, k, v = (x.unflatten(-1, (-1, D)).transpose(1, 2).detach().requires_grad_(True)
               for x in r.split([9 * D, 3 * D, 3 * D], dim=-1))
    w = torch.linspace(-1, 1, 9 * t * D, device="cuda").reshape(1, 9, t, D).to(torch.bfloat16)

    def step():
        out = m(q, k, v, causal=True).out
        return (out, *torch.autograd.grad(out, (q, k, v), w))

    side, want, graph, held = _eager_and_captured(step)
    results = []
    for _ in range(3):
        with torch.cuda.stream(side):
            step()  # eager work in between, on both of its streams
        torch.cuda.current_stream().wait_stream(side)
        graph.replay()
        torch.cuda.synchronize()
        results.append(all(torch.equal(a, b) for a, b in zip(held, want)))
    ok = all(results) and m.kernel == "triton+favor"
    print(f"{'ok ' if ok else 'FAIL'} performer-graph T={t:5} kernel={m.kernel}: fwd+bwd replayed from a CUDA graph "
          f"3x, bits equal to the eager call: {results}", flush=True)
    return int(not ok)


def size_limits(device="cuda", heads=16, t=64, d=32, huge=True, huge_heads=32, huge_dim=128, tail=128) -> int:
    """The Triton kernels' size limits (`ops.limits`) where they bite, on the GPU (the CPU tests lower them instead).
    Grid rows: a batch of batch x heads (x 2 for causal_linear's and FAVOR+'s map launches, x LSH's 2 rounds) past
    CUDA's 65,535 programs along y runs in pieces (before: "invalid argument" at launch): window, linear, performer,
    lsh and nystrom on backend='triton', outputs and gradients of the first, middle and last items against each item
    run alone. huge: the 32-bit row offsets at 32 heads of 128 in transformers' layout: window and linear at the
    longest length the kernels serve (524,287 tokens, a row of 2^31 - 4096 elements) against references on their
    tails (window: the kernel on the last rows' keys alone; linear: the PyTorch form), and one token more refused by
    backend='triton' and served by auto's other kernel. v carries a signal along the positions, so rows read from the
    wrong place fail the relative bound. A kernel that does hit an illegal address leaves the CUDA context unusable:
    the checks after it then fail too (the huge ones run last)."""
    from attnlab import UnsupportedError
    from attnlab.ops import limits

    failures = 0
    dtype = torch.bfloat16
    b = limits.MAX_GRID_ROWS // heads + 2
    for name, opts in (("window", {}), ("linear", {}), ("performer", {}), ("lsh", {"bucket_size": 32, "n_hashes": 2}),
                       ("nystrom", {"num_landmarks": 16})):
        causal = name != "nystrom"
        m = attnlab.make(name, head_dim=d, num_heads=heads, **{**attnlab.defaults(name, t), **opts,
                                                               "backend": "triton"}).to(device)
        g = torch.Generator(device=device).manual_seed(11)
        q, k, v = (torch.randn(b, heads, t, d, device=device, dtype=dtype, generator=g) for _ in range(3))

        def run(idx):
            leaves = [x[idx].clone().requires_grad_(True) for x in (q, k, v)]
            out = m(*leaves, causal=causal).out
            grads = torch.autograd.grad(out.float().square().sum(), leaves)
            return [out.detach(), *grads]
        try:
            whole = run(slice(None))
            worst = 0.0
            for i in (0, b // 2, b - 1):
                alone = run(slice(i, i + 1))
                for got, want in zip(whole, alone):
                    got, want = got[i:i + 1].double(), want.double()
                    worst = max(worst, (got - want).abs().max().item() / max(1.0, want.abs().max().item()))
            ok, note = worst <= BOUND[dtype], f"max rel. diff {worst:.2e} to each item alone"
        except Exception as exc:  # noqa: BLE001 - a failed check, not a crash
            ok, note = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        failures += not ok
        print(f"{'ok ' if ok else 'FAIL'} size-limits grid rows {name:9} batch {b} x {heads} heads: {note}", flush=True)
        q = k = v = None  # freed before the next method
    if not huge:
        return failures
    h, dh = huge_heads, huge_dim
    t_max = (limits.OFFSET_LIMIT - 1) // (h * dh)  # 524,287 tokens at 32 x 128
    for name, opts in (("window", {"window": 256, "sinks": 0}), ("linear", {})):
        for t_run in (t_max, t_max + 1):
            g = torch.Generator(device=device).manual_seed(12)
            refused = False
            # transformers' layout: [B, T, H, D] memory seen as [B, H, T, D]
            q, k, v = (torch.randn(1, t_run, h, dh, device=device, dtype=dtype, generator=g).transpose(1, 2)
                       for _ in range(3))
            # a signal in v that depends on the position (a causal mean of noise is ~0: rows read from the wrong
            # place would still pass a relative bound)
            pos = torch.arange(t_run, device=device, dtype=torch.float32)
            v.add_(torch.sin(pos / 1000.0).to(dtype)[None, None, :, None])
            try:
                with torch.no_grad():
                    fits = t_run == t_max
                    tri = attnlab.make(name, head_dim=dh, num_heads=h, **{**opts, "backend": "triton"}).to(device)
                    if fits:
                        out = tri(q, k, v, causal=True).out[:, :, -tail:]
                    else:
                        try:
                            tri(q, k, v, causal=True)
                            raise AssertionError("backend='triton' served a row past 2^31 elements")
                        except UnsupportedError as exc:
                            refused = "32-bit offsets" in str(exc)
                        auto = attnlab.make(name, head_dim=dh, num_heads=h, **opts).to(device)
                        out = auto(q, k, v, causal=True).out[:, :, -tail:]
                    if name == "window":  # the last rows see only the last window + tail keys
                        lo = t_run - tail - opts["window"]
                        ref = attnlab.make(name, head_dim=dh, num_heads=h, **{**opts, "backend": "triton"}).to(device)(
                            q[:, :, -tail:], k[:, :, lo:], v[:, :, lo:], causal=True).out
                    else:
                        ref = attnlab.make(name, head_dim=dh, num_heads=h, backend="eager").to(device)(
                            q, k, v, causal=True).out[:, :, -tail:]
                err = (out.double() - ref.double()).abs().max().item() / ref.double().abs().max().item()
                ok = bool(torch.isfinite(out).all()) and err <= BOUND[dtype] and (fits or refused)
                note = f"tail vs reference {err:.2e}" + ("" if fits else f", backend='triton' refused: {refused}")
            except Exception as exc:  # noqa: BLE001
                ok, note = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            failures += not ok
            print(f"{'ok ' if ok else 'FAIL'} size-limits offsets {name:6} {t_run} tokens x {h} x {dh} "
                  f"({'triton' if t_run == t_max else 'auto'}): {note}", flush=True)
            q = k = v = None
            torch.cuda.empty_cache()
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("methods", nargs="?", default=None, help="comma-separated subset (default: every method)")
    p.add_argument("--quick", action="store_true", help="the exact limits in fp32, every other check in bf16 only")
    p.add_argument("--linear-form", choices=("auto", "chunked", "parallel"), default="auto",
                   help="the causal linear kernels' forward (ops.linear_triton.PARALLEL_MAX_T): auto takes the one "
                        "quadratic pass at these short lengths; chunked checks the state walk and output passes")
    p.add_argument("--limits", action="store_true", help="only the kernels' size limits (`size_limits`: batches past "
                   "the grid's 65,535 rows, rows of 2^31 elements at 524k tokens; about 80 GB of GPU memory at peak)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: gpu_checks.py checks the CUDA kernels against the CPU path; no CUDA device is available here")
    from attnlab.ops import linear_triton

    linear_triton.PARALLEL_MAX_T = {"auto": None, "chunked": 0, "parallel": 1 << 30}[args.linear_form]
    from attnlab.ops.fused import raise_recompile_limit

    raise_recompile_limit()  # many (method, shape, grad mode) variants of flex: past dynamo's default 8 it runs eagerly
    if args.limits:
        failures = size_limits()
        print(f"{failures} failure(s) on {torch.cuda.get_device_name()}, torch {torch.__version__} (size limits)")
        return 1 if failures else 0
    names = args.methods.split(",") if args.methods else registry.list_methods()
    failures = exact_limits(names, (torch.float32,) if args.quick else (torch.float32, torch.bfloat16))
    failures += cuda_vs_cpu(names, (torch.bfloat16,) if args.quick else (torch.float32, torch.bfloat16))
    failures += layouts(names, (torch.bfloat16,) if args.quick else (torch.float32, torch.bfloat16))
    if any(variant(n)[0] == "lsh" for n in names):
        failures += lsh_buckets((torch.bfloat16,) if args.quick else (torch.float32, torch.bfloat16))
    if any(variant(n) == ("window", {"backend": "triton"}) for n in names):
        failures += window_bands((torch.bfloat16,) if args.quick else (torch.float32, torch.bfloat16))
        failures += window_launches()
    if any(variant(n)[0] == "linear" for n in names):
        failures += kernel_maps((torch.bfloat16,) if args.quick else (torch.float32, torch.bfloat16))
    masked = [m for m in ("block_sparse", "learned_mask") if any(variant(n)[0] == m for n in names)]
    if masked:
        failures += kernel_masks((torch.bfloat16,) if args.quick else (torch.float32, torch.bfloat16), quick=args.quick,
                                 methods=masked)
    if any(variant(n)[0] == "performer" for n in names):
        failures += performer_walks((torch.bfloat16,))
    if any(variant(n)[0] == "nystrom" for n in names):
        failures += nystrom_solve((torch.bfloat16,) if args.quick else (torch.float32, torch.bfloat16))
    print(f"{failures} failure(s) on {torch.cuda.get_device_name()}, torch {torch.__version__} (linear form: "
          f"{args.linear_form})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
