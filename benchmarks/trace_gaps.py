"""Where a step's device idles, and what the host does meanwhile: read a torch.profiler chrome trace (as
`model_bench.py --profile --trace DIR` writes one per row, CPU + CUDA activities, Python stacks) and attribute
every microsecond the GPU has no kernel running (between the step's first and last kernel) to the host event
running then on the thread that launched the kernel ending the gap: the innermost one (the last started that still runs: a Python function's or an op's own time).

    python benchmarks/trace_gaps.py TRACE.json.gz [TRACE2 ...] [--top 25]

Prints per trace: the span, device busy and idle time, the idle time by the launching threads' innermost event (with
the number of such events), and the largest single gaps with the kernel that ended each and the one that follows.
A sync (cudaStreamSynchronize, cudaDeviceSynchronize, cudaMemcpy to host) shows up as host time while the device
is busy, not in the idle table; a slow launch (cuLaunchKernel, cudaLaunchKernel) or Python between launches shows
up in it.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
from pathlib import Path

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "python_function", "cuda_runtime", "cuda_driver", "user_annotation")


def load(path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def merge(intervals):
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def idle_by_innermost(events, idle):
    """Sweep one thread's host events: in each stretch between two event boundaries the innermost event (the one
    started last that is still running: record_function ranges that open in one hook and close in another are not
    nested, so no stack of parents) takes the stretch's overlap with the `idle` intervals (sorted, disjoint).
    Returns {event index: idle microseconds}."""
    evs = sorted(range(len(events)), key=lambda i: (events[i]["ts"], -events[i]["dur"]))
    times = sorted({t for e in events for t in (e["ts"], e["ts"] + e["dur"])})
    got = collections.defaultdict(float)
    stack, nxt, j = [], 0, 0
    for a, b in zip(times, times[1:]):
        while nxt < len(evs) and events[evs[nxt]]["ts"] <= a:
            stack.append(evs[nxt])
            nxt += 1
        while stack and events[stack[-1]]["ts"] + events[stack[-1]]["dur"] <= a:
            stack.pop()
        if not stack:
            continue
        while j < len(idle) and idle[j][1] <= a:
            j += 1
        k = j
        while k < len(idle) and idle[k][0] < b:
            got[stack[-1]] += min(b, idle[k][1]) - max(a, idle[k][0])
            k += 1
    return got


def analyse(events, top=25) -> dict:
    dev = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS]
    if not dev:
        return {"error": "no device events (a CPU trace?)"}
    dev.sort(key=lambda e: e["ts"])
    t0, t1 = dev[0]["ts"], max(e["ts"] + e["dur"] for e in dev)
    busy = merge([(e["ts"], e["ts"] + e["dur"]) for e in dev])
    idle = [[busy[i][1], busy[i + 1][0]] for i in range(len(busy) - 1) if busy[i + 1][0] > busy[i][1]]
    busy_us = sum(e - s for s, e in busy)
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") in HOST_CATS and "dur" in e]
    by_tid = collections.defaultdict(list)
    for e in host:
        by_tid[(e.get("pid"), e.get("tid"))].append(e)
    # only the threads that launch work (the step's, autograd's): a compile worker's or a pool's idle wait runs
    # beside the step and would take the blame for every gap
    by_tid = {t: evs for t, evs in by_tid.items() if any(e["cat"] in ("cuda_runtime", "cuda_driver") for e in evs)}
    # each gap belongs to ONE thread, the one that launched the kernel ending it (by the launch's correlation id;
    # without one, the thread whose latest launch came last before the gap ended): in a backward the step's thread
    # waits inside Tensor.backward while autograd's thread launches, and must not be blamed a second time
    launches = [e for evs in by_tid.values() for e in evs if e["cat"] in ("cuda_runtime", "cuda_driver")]
    by_corr = {e["args"]["correlation"]: (e.get("pid"), e.get("tid")) for e in launches
               if isinstance(e.get("args"), dict) and "correlation" in e["args"]}
    launches.sort(key=lambda e: e["ts"])
    launch_ts = [e["ts"] for e in launches]
    starts = [d["ts"] for d in dev]
    owned = collections.defaultdict(list)
    for gap in idle:
        i = bisect.bisect_left(starts, gap[1])  # the kernel ending the gap
        args = dev[i].get("args") if i < len(dev) else None
        owner = by_corr.get(args.get("correlation")) if isinstance(args, dict) else None
        if owner is None:
            j = bisect.bisect_right(launch_ts, gap[1]) - 1  # the latest launch before the gap ended
            if j < 0:
                continue
            owner = (launches[j].get("pid"), launches[j].get("tid"))
        owned[owner].append(gap)
    blame = collections.defaultdict(lambda: [0.0, 0])
    for tid, evs in by_tid.items():
        for i, us in idle_by_innermost(evs, owned.get(tid, [])).items():
            b = blame[f"{evs[i].get('cat')}: {evs[i]['name']}"[:110]]
            b[0] += us
            b[1] += 1
    idle_us = sum(e - s for s, e in idle)
    gaps = []
    for s, e in sorted(idle, key=lambda g: g[0] - g[1])[:8]:
        nxt = next((d["name"] for d in dev if d["ts"] >= e), "?")
        prev = max((d for d in dev if d["ts"] + d["dur"] <= s), key=lambda d: d["ts"] + d["dur"], default={"name": "?"})
        gaps.append({"us": round(e - s, 1), "after": prev["name"][:70], "before": nxt[:70]})
    rows = sorted(blame.items(), key=lambda kv: -kv[1][0])[:top]
    return {"span_ms": (t1 - t0) / 1e3, "busy_ms": busy_us / 1e3, "idle_ms": idle_us / 1e3, "gaps": len(idle),
            "idle_by_host_event": [[k, round(v[0] / 1e3, 3), v[1]] for k, v in rows],
            "attributed_ms": sum(v[0] for v in blame.values()) / 1e3, "largest_gaps": gaps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="+")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None, help="also write the summaries here")
    a = p.parse_args(argv)
    out = {}
    for t in a.traces:
        r = analyse(load(t), a.top)
        out[Path(t).name] = r
        print(f"== {Path(t).name}")
        if "error" in r:
            print("  ", r["error"])
            continue
        print(f"   span {r['span_ms']:.2f} ms, device busy {r['busy_ms']:.2f}, idle {r['idle_ms']:.2f} in {r['gaps']} gaps "
              f"({r['attributed_ms']:.2f} ms of it under a host event)")
        for name, ms, n in r["idle_by_host_event"]:
            print(f"   {ms:9.3f} ms  x{n:<5} {name}")
        for g in r["largest_gaps"]:
            print(f"   gap {g['us']:8.1f} us after {g['after']} before {g['before']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
