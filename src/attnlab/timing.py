"""One way to time a call, shared by compare, bench and the training loops: CUDA events on a GPU (the device
work, not the launch), `time.perf_counter` after a synchronise elsewhere. Milliseconds."""
from __future__ import annotations

import time
from typing import NamedTuple

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """with Timer(device) as t: ...   then t.ms"""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.ms: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = (time.perf_counter() - self._t0) * 1e3
        return False


def time_ms(fn, device="cpu") -> tuple[object, float]:
    """(fn(), milliseconds)."""
    with Timer(device) as t:
        out = fn()
    return out, t.ms


class Captured(NamedTuple):
    replay: object  # launches the captured step
    step_bytes: int  # the most the capture allocated above what was resident before it (the step's own memory)
    base_bytes: int  # what was resident before the capture (weights, inputs, ...): the peak is base + step
    keep: tuple  # what must stay alive as long as the graph is replayed


def capture_graph(step, *, model=None, warmup: int = 2, pool=None, device=None) -> Captured:
    """`step` (a no-argument callable) captured once as a CUDA graph, PyTorch's whole-network capture: warm-up calls
    on a side stream, then the capture, on `device` (default: the model's, else the current CUDA device). A replay
    launches every kernel of the step at once: no Python and no per-kernel launch cost, what the device work alone
    costs. For a transformers `model`, its mask is decided by the warm-up outside the capture
    (`adapters.hf.mask_outside_capture`; inside a capture transformers would hand attention a materialised mask).
    Gradients are set to None before the capture, so replays write them afresh. `pool`
    (torch.cuda.graph_pool_handle()) shares one memory pool among graphs replayed one after another on one stream
    that never read each other's outputs."""
    import contextlib

    from .adapters.hf import is_hf_model, mask_outside_capture

    if device is None:
        device = next(model.parameters()).device if model is not None else torch.device("cuda")
    with torch.cuda.device(device), (mask_outside_capture(model) if model is not None and is_hf_model(model)
                                     else contextlib.nullcontext({})) as masks:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                step()
        torch.cuda.current_stream().wait_stream(side)
        if model is not None:
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    return Captured(graph.replay, peak - base, base, (graph, masks))
