"""benchmarks/trace_gaps.py: the device's idle time attributed to the host's innermost event."""
import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("trace_gaps", Path(__file__).parents[2] / "benchmarks" / "trace_gaps.py")
trace_gaps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trace_gaps)


def ev(cat, name, ts, dur, tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid}


def test_idle_goes_to_the_innermost_host_event():
    events = [
        ev("kernel", "A", 0, 10, tid=7), ev("kernel", "B", 30, 10, tid=7), ev("kernel", "C", 41, 4, tid=7),
        ev("python_function", "step", 0, 45),          # parent of everything below: only its own time counts
        ev("python_function", "slow_python", 5, 30),   # own time [5, 25) and [30, 35)
        ev("cuda_runtime", "cuLaunchKernel", 25, 5),   # launches B: inside slow_python
    ]
    r = trace_gaps.analyse(events)
    assert r["busy_ms"] == pytest.approx(0.024)
    assert r["idle_ms"] == pytest.approx(0.021)  # [10, 30) and [40, 41)
    blame = {name: ms for name, ms, _ in r["idle_by_host_event"]}
    assert blame["python_function: slow_python"] == pytest.approx(0.015)  # [10, 25)
    assert blame["cuda_runtime: cuLaunchKernel"] == pytest.approx(0.005)  # [25, 30)
    assert blame["python_function: step"] == pytest.approx(0.001)  # [40, 41): its own time after slow_python
    assert r["largest_gaps"][0] == {"us": 20, "after": "A", "before": "B"}


def test_a_gap_is_blamed_on_the_launching_thread_only():
    # a backward: the step's thread waits inside Tensor.backward while autograd's thread launches the kernels
    events = [
        {**ev("kernel", "A", 0, 10, tid=7), "args": {"correlation": 1}},
        {**ev("kernel", "B", 30, 10, tid=7), "args": {"correlation": 2}},
        ev("python_function", "Tensor.backward", 0, 40, tid=1),
        {**ev("cuda_runtime", "cudaLaunchKernel", 1, 1, tid=2), "args": {"correlation": 1}},
        ev("cpu_op", "MmBackward0", 5, 30, tid=2),
        {**ev("cuda_runtime", "cudaLaunchKernel", 28, 1, tid=2), "args": {"correlation": 2}},
        {**ev("cuda_runtime", "cudaStreamSynchronize", 39, 1, tid=1), "args": {}},
    ]
    r = trace_gaps.analyse(events)
    assert r["idle_ms"] == pytest.approx(0.020)
    assert r["attributed_ms"] == pytest.approx(0.020)  # not twice
    blame = {name: ms for name, ms, _ in r["idle_by_host_event"]}
    assert "python_function: Tensor.backward" not in blame
    assert blame["cpu_op: MmBackward0"] == pytest.approx(0.019)  # [10, 28) and [29, 30)
    assert blame["cuda_runtime: cudaLaunchKernel"] == pytest.approx(0.001)


def test_a_trace_without_device_events_says_so():
    assert "error" in trace_gaps.analyse([ev("cpu_op", "aten::mm", 0, 5)])
