"""Small pieces shared by attnlab's Triton kernels (`linear_triton`, `window_triton`).

Triton's CPU interpreter (TRITON_INTERPRET=1, how the CPU tests run the kernels) differs from the GPU in two
ways these helpers hide: its dot of half inputs multiplies their bit patterns, and its fp32 -> bf16 cast
truncates. Under it, "upcast" takes half inputs to fp32 first (bf16 x bf16 is exact in fp32) and rounds to
nearest-even by hand.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def dot(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation. PREC "ieee" (fp32 inputs), "tf32" (half inputs: the tensor cores), or
    "upcast" (half inputs under the interpreter, see the module doc)."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def to(x, dtype: tl.constexpr, PREC: tl.constexpr):
    """fp32 x to the matmul dtype, rounded to nearest-even (by hand under the interpreter, which truncates)."""
    if PREC == "upcast":
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def row_base(bh, NH, sb, sh):
    """The offset of row bh = b * NH + h of a [B, NH, T, *] tensor with batch / head strides sb, sh: the kernels read
    q, k, v and write their outputs in the caller's layout (transformers' [B, T, H, D] memory seen as [B, H, T, D],
    no copy); a contiguous [B, H, T, W] tensor gives bh * T * W."""
    return (bh // NH) * sb + (bh % NH) * sh


def strides(*xs: torch.Tensor) -> tuple[int, ...]:
    """The batch, head and token strides of each of xs, in order, as `row_base` and a token index take them:
    [B, H, T, W] tensors in any layout, or contiguous [BH, T, W] ones (one head a row: head stride 0)."""
    return tuple(s for x in xs for s in ((x.stride(0), 0, x.stride(1)) if x.dim() == 3 else x.stride()[:3]))


def unit_stride(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """xs as they are where their last dim is contiguous (what the kernels' loads need), else contiguous copies."""
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def precision(q: torch.Tensor) -> str:
    """The PREC a kernel runs `q`'s dtype with: ieee for fp32 (as torch.matmul, not TF32), tf32 for half
    inputs on the GPU (their tensor-core path), upcast under the interpreter."""
    if q.dtype == torch.float32:
        return "ieee"
    return "upcast" if interpreted() else "tf32"


_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def kernel_reasons(device, *, dtype, dtypes, head_dim: int, max_head_dim: int, fallback: str) -> list[str]:
    """The refusals every attnlab Triton kernel shares (dtype, device, head dim), naming `fallback` as the backend to
    ask for instead (empty: none applies)."""
    why = []
    if dtype is not None and dtype not in dtypes:
        names = [_SHORT.get(d, str(d)) for d in dtypes]
        runs = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        why.append(f"backend='triton' runs {runs}, not {dtype} (use backend='{fallback}')")
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda" and not interpreted():
        why.append(f"backend='triton' runs on CUDA (got {dev.type}; the CPU runs it only under TRITON_INTERPRET=1)")
    if head_dim > max_head_dim:
        why.append(f"backend='triton' supports head_dim <= {max_head_dim}, got {head_dim}")
    return why


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def concurrently(first, second, device: torch.device):
    """(first(), second()): on CUDA, first's launches on a second stream, concurrent with second's on the caller's,
    joined before returning (the caller's stream waits for both); elsewhere (the interpreter) one after the other.

    For passes that each fill a few SMs (at a few thousand tokens a chunked walk runs one program per head and block):
    side by side they take the longer one's time, not the sum. The branches may read what existed before the call and
    write what they allocate or were handed: tensors allocated inside `first` come from the second stream's pool,
    which is safe because every fork waits for everything the caller's stream had issued (a freed block it reuses is
    no longer read), and everything after the join waits for both. Captured by CUDA graphs as a fork and a join."""
    if device.type != "cuda":
        return first(), second()
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(device.index)
    if side is None:
        side = _SIDE_STREAMS[device.index] = torch.cuda.Stream(device=device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        a = first()
    b = second()
    main.wait_stream(side)
    return a, b


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
