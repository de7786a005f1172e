"""Timing and memory core: one (callable, inputs, mode) -> one result row.

    row = bench_one(fn, make_inputs, mode="fwd+bwd", device="cuda", repeats=10, warmup=3)

`make_inputs()` returns a tuple of tensors (the same values for every implementation at one length);
`fn(*inputs)` returns the output tensor (or a tuple whose first item is it).

Conventions, recorded in every row:
- time: median over `repeats` timed calls after `warmup` untimed ones (the first warm-up call pays any
  compilation / autotuning). CUDA events around each call on GPU, `time.perf_counter` (after a sync)
  on CPU. `fwd` runs under `torch.no_grad()` (inference); `fwd+bwd` is forward then
  `out.backward(grad_out)` with q, k, v (and any method parameters) requiring grad.
- memory (CUDA only): `peak_mem_bytes` = torch.cuda.max_memory_allocated over the timed calls after
  reset_peak_memory_stats; `extra_mem_bytes` = peak minus what was allocated just before them
  (the inputs, grad_out, the module's own parameters/buffers); `input_bytes` = the inputs' own size.
  On CPU all three are None and `mem_note` says why (the CPU allocator keeps no peak statistics).
- status: ok | oom | unsupported | not installed | error | skipped (+ `error` text when not ok).
"""
from __future__ import annotations

import gc
import statistics
import time
import traceback
from typing import Callable, Sequence

import torch

STATUSES = ("ok", "oom", "unsupported", "not installed", "error", "skipped")
MODES = ("fwd", "fwd+bwd")
CPU_MEM_NOTE = "peak memory is not measured on CPU (no allocator statistics); null"


class NotInstalled(Exception):
    """A peer package (or one of its dependencies) cannot be imported."""


class Unsupported(Exception):
    """A request (causal, device, dtype, length) the implementation cannot serve."""


def dense_flops(batch: int, heads: int, seq_len: int, head_dim: int, mode: str, causal: bool) -> float:
    """Dense-equivalent attention FLOPs (flash-attention's convention).

    fwd: 4 * B * H * T^2 * D (QK^T and PV, 2 FLOPs per multiply-add), halved when causal;
    fwd+bwd: 3.5x the forward (backward = 2.5x forward). The same count is used for every method, so
    an approximate method's TFLOP/s is "effective" (dense work per second), not its own arithmetic.
    """
    flops = 4.0 * batch * heads * seq_len * seq_len * head_dim
    if causal:
        flops /= 2
    if mode == "fwd+bwd":
        flops *= 3.5
    return flops


_CEILINGS: dict = {}


def ceilings(device) -> dict:
    """The device's own limits, measured once per process (CUDA only; {} elsewhere): the bf16 matmul rate
    (an 8192^3 torch.mm, TFLOP/s) and the copy bandwidth (a 1 GiB tensor copied, read + write, GB/s). Rows
    report each method's achieved fraction of both, from its own FLOPs and its compulsory bytes."""
    device = torch.device(device)
    if device.type != "cuda":
        return {}
    key = str(device)
    if key not in _CEILINGS:
        try:
            import triton.testing

            a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
            mm_ms = triton.testing.do_bench(lambda: a @ a, warmup=25, rep=200)
            x = torch.empty(1 << 29, device=device, dtype=torch.bfloat16)
            y = torch.empty_like(x)
            cp_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=100)
            del a, x, y
            _CEILINGS[key] = {"ceiling_matmul_tflops": round(2 * 8192 ** 3 / mm_ms / 1e9, 1),
                              "ceiling_copy_gbps": round(2 * 2 ** 30 / cp_ms / 1e6, 1)}
        except Exception:  # noqa: BLE001 - no ceilings (no triton, no memory): rows go without the fractions
            _CEILINGS[key] = {}
            free_memory(device)
    return _CEILINGS[key]


def own_cost(fwd_flops_per_head: float | None, batch: int, heads: int, seq_len: int, head_dim: int, mode: str,
             elem_bytes: int) -> dict:
    """A row's own work: `method_flops` (the method's forward count x B x H, x3.5 for fwd+bwd, as the dense
    convention) and `min_bytes` (compulsory traffic: q, k, v read and out written once; fwd+bwd adds do read,
    dq, dk, dv written and q, k, v, out read again: 12 x B H T D elements)."""
    per = batch * heads
    flops = None if fwd_flops_per_head is None else fwd_flops_per_head * per * (3.5 if mode == "fwd+bwd" else 1.0)
    return {"method_flops": flops, "min_bytes": per * seq_len * head_dim * elem_bytes * (12 if mode == "fwd+bwd" else 4)}


def is_oom(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, or an OOM re-raised under another type (torch.compile wraps errors)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device | str) -> None:
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    if not isinstance(exc, (NotInstalled, Unsupported)) and not is_oom(exc):
        # where it failed, in one line: the innermost frame
        tb = traceback.extract_tb(exc.__traceback__)
        if tb:
            fr = tb[-1]
            text += f" [at {fr.filename.rsplit('/', 1)[-1]}:{fr.lineno} in {fr.name}]"
    return text[:2000]


def classify(exc: BaseException) -> str:
    from ..types import UnsupportedError

    if is_oom(exc):
        return "oom"
    if isinstance(exc, NotInstalled):
        return "not installed"
    if isinstance(exc, (Unsupported, UnsupportedError)):
        return "unsupported"
    return "error"


def result_fields(device) -> dict:
    """The measurement fields of a row, all present (None) even when nothing was measured."""
    return {
        "status": "ok", "error": None, "ms": None, "ms_min": None, "ms_max": None, "repeats": 0, "warmup": 0,
        "peak_mem_bytes": None, "extra_mem_bytes": None, "input_bytes": None,
        "mem_note": CPU_MEM_NOTE if torch.device(device).type != "cuda" else None, "wall_s": 0.0,
    }


def failed_row(exc: BaseException, device="cpu") -> dict:
    return {**result_fields(device), "status": classify(exc), "error": _error_text(exc)}


def bench_one(
    fn: Callable,
    make_inputs: Callable[[], Sequence[torch.Tensor]],
    mode: str,
    device: torch.device | str,
    repeats: int = 10,
    warmup: int = 3,
    *,
    row_budget_s: float | None = None,
    params: Sequence[torch.nn.Parameter] = (),
) -> dict:
    """Time and measure one callable. Never raises for OOM / unsupported / errors: they become the row.

    row_budget_s: soft cap on the timed loop; when one call is slow the number of repeats is lowered
    (never below 1) so one row cannot eat the sweep. `repeats` in the row says how many were timed.
    params: module parameters whose .grad is reset between fwd+bwd calls.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    device = torch.device(device)
    row = result_fields(device)
    t_start = time.perf_counter()
    exc_info: tuple[str, str] | None = None
    inputs = grad_out = None
    leaves: list = []
    try:
        inputs = tuple(make_inputs())
        backward = mode == "fwd+bwd"
        if backward:
            inputs = tuple(x.detach().requires_grad_(x.is_floating_point()) for x in inputs)
        leaves = [x for x in inputs if x.requires_grad] + [p for p in params if p.requires_grad]

        def call():
            for x in leaves:
                x.grad = None
            if backward:
                out = _first(fn(*inputs))
                out.backward(grad_out)
            else:
                with torch.no_grad():
                    out = _first(fn(*inputs))
            return out

        # ---- warm-up: the first call pays compilation; later ones estimate the per-call time
        t_call = None
        for i in range(max(1, warmup)):
            t0 = time.perf_counter()
            if backward and grad_out is None:
                # the first call also makes grad_out (its shape is the output's); grad mode stays on, so a
                # compiled callable is not compiled a second time for no_grad
                out = _first(fn(*inputs))
                grad_out = torch.randn_like(out)
                out.backward(grad_out)
            else:
                out = call()
            del out
            _sync(device)
            t_call = time.perf_counter() - t0
            row["warmup"] = i + 1
            if row_budget_s is not None and i >= 1 and t_call * (warmup - i - 1) > row_budget_s / 2:
                break  # slow call: further warm-ups would only spend the budget
        n = repeats
        if row_budget_s is not None and t_call is not None and t_call > 0:
            n = max(1, min(repeats, int(row_budget_s / t_call)))

        # ---- timed loop (memory peak taken over the same calls)
        input_bytes = sum(x.numel() * x.element_size() for x in inputs)
        if grad_out is not None:
            input_bytes += grad_out.numel() * grad_out.element_size()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
            for i in range(n):
                for x in leaves:  # outside the timed region
                    x.grad = None
                starts[i].record()
                out = call()
                ends[i].record()
                del out
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
            peak = torch.cuda.max_memory_allocated(device)
            row.update(peak_mem_bytes=int(peak), extra_mem_bytes=int(peak - base), input_bytes=int(input_bytes))
        else:
            times = []
            for _ in range(n):
                for x in leaves:
                    x.grad = None
                t0 = time.perf_counter()
                out = call()
                times.append((time.perf_counter() - t0) * 1e3)
                del out
            row["input_bytes"] = int(input_bytes)
        row.update(
            ms=float(statistics.median(times)), ms_min=float(min(times)), ms_max=float(max(times)), repeats=n,
        )
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row, the sweep goes on
        exc_info = (classify(exc), _error_text(exc))
        del exc  # drop the traceback (it pins the frames that hold the big tensors)
    if exc_info is not None:
        inputs = grad_out = None
        leaves = []
        row.update(status=exc_info[0], error=exc_info[1], ms=None)
        free_memory(device)
    row["wall_s"] = round(time.perf_counter() - t_start, 3)
    return row
