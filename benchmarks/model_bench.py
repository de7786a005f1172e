"""Model-level cost: SmolLM2-135M (its exact config, random weights: cost does not depend on weight values, and
the 540 MB checkpoint cannot travel to the GPU machine) forward and forward+backward vs sequence length, with
each method swapped in, against the original model in eager mode (builds the attention matrix) and sdpa mode.

    PYTHONPATH=src python benchmarks/model_bench.py --device cuda --dtype bfloat16 --out benchmarks/results

Writes model_bench.json (one row per measurement) and model_bench.png. Peak memory target from the research:
at least 30% below eager dense at every length >= 1024.

`--profile` adds, per row, one more step under torch.profiler: `busy_ms` (the device's kernel time; wall ms well
above it means the step waits on Python and launches), `attn_block_ms` (kernel time inside the layers' self_attn
modules in the forward: projections, rotary and attention; the backward's kernels run outside the modules and are
not attributed) and, on CUDA, `syncs` (host-device synchronisations counted by
torch.cuda.set_sync_debug_mode during one step: each stalls the launch queue).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import attnlab
from attnlab import defaults as method_defaults

HERE = Path(__file__).parent


def build(device, dtype, impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_dict(json.loads((HERE / "smollm2_config.json").read_text()))
    cfg.max_position_embeddings = 1 << 17
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=dtype).to(device)
    return model


def measure(model, ids, mode, device, warmup, repeats):
    def step():
        if mode == "fwd":
            with torch.no_grad():
                model(ids, use_cache=False)
        else:
            out = model(ids, labels=ids, use_cache=False)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

    cuda = device.startswith("cuda")
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    return statistics.median(times), peak


def profile_step(model, ids, mode, device) -> dict:
    """One step under torch.profiler: device busy time, time inside self_attn modules, and (CUDA) the syncs."""
    import warnings

    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.startswith("cuda")
    ranges = []

    def pre(mod, args):
        ranges.append(record_function("model_bench.self_attn"))
        ranges[-1].__enter__()

    def post(mod, args, out):
        ranges.pop().__exit__(None, None, None)

    attn = [m for n, m in model.named_modules() if n.endswith("self_attn")]
    hooks = [h for m in attn for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]

    def step():
        if mode == "fwd":
            with torch.no_grad():
                model(ids, use_cache=False)
        else:
            model(ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)

    try:
        out = {}
        if cuda:
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step()
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            out["syncs"] = sum("synchroniz" in str(w.message) for w in caught)
            out["sync_sites"] = sorted({str(w.message).splitlines()[0][:120] for w in caught
                                        if "synchroniz" in str(w.message)})[:5]
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        dev = "device_time_total" if cuda else "cpu_time_total"
        kernels = [e for e in events if cuda and getattr(e, "device_type", None) is not None
                   and str(e.device_type).endswith("CUDA")]
        def get(e, name):  # torch >= 2.4 says device_*, older cuda_*
            return getattr(e, name, None) if getattr(e, name, None) is not None else getattr(e, name.replace("device", "cuda"), 0)

        out["busy_ms"] = (sum(get(e, "self_device_time_total") for e in kernels) / 1e3 if cuda else None)
        rng = [e for e in events if e.key == "model_bench.self_attn"]
        out["attn_block_ms"] = sum(get(e, dev) for e in rng) / 1e3 if rng else None
        return out
    finally:
        for h in hooks:
            h.remove()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--methods", default="sdpa,window,linear,performer,block_sparse,lsh")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=400, help="stop starting new rows after this many seconds")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--no-original", action="store_true", help="skip the original eager/sdpa model rows")
    p.add_argument("--profile", action="store_true", help="per row, one more step under torch.profiler: device "
                   "busy time, time inside self_attn, and (CUDA) host-device syncs")
    p.add_argument("--merge", default=None, help="an earlier model_bench.json: its rows for the impls measured "
                   "now are replaced, the others kept (rerun a few methods after a change)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    lengths = [int(x) for x in a.lengths.split(",")]
    env = {"device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor(),
           "torch": torch.__version__, "command": "python " + " ".join(sys.argv)}
    try:
        import transformers
        import triton

        env.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    rows, t0 = [], time.time()
    dead = set()  # (impl, mode) that ran out of memory: longer lengths are skipped
    configs = ([] if a.no_original else [("original", "eager", None), ("original", "sdpa", None)]) + [
        ("attnlab", "sdpa", m) for m in a.methods.split(",")
    ]
    for impl_kind, impl, method in configs:
        model = build(a.device, dtype, impl)
        name = f"original-{impl}" if method is None else method
        for mode in a.modes.split(","):
            for n in lengths:
                row = {"model": "SmolLM2-135M (config, random weights)", "impl": name, "method": method or impl,
                       "seq_len": n, "batch": 1, "mode": mode, "dtype": a.dtype, "device": a.device, **env}
                if (name, mode) in dead or time.time() - t0 > a.budget_s:
                    row["status"] = "skipped" if time.time() - t0 > a.budget_s else "oom"
                    rows.append(row)
                    continue
                opts = method_defaults(method, n) if method else {}
                if method == "window":
                    opts = {"window": 256, "sinks": 4}
                if method == "block_sparse":
                    opts = {"block_size": 128}
                if method == "lsh":
                    opts = {"bucket_size": 128, "n_hashes": 2, "shared_qk": False}
                row["options"] = opts
                ids = torch.randint(0, 49152, (1, n), device=a.device)
                try:
                    if method:
                        attnlab.swap(model, method, **opts)
                    ms, peak = measure(model, ids, mode, a.device, a.warmup, a.repeats)
                    row.update(status="ok", ms=ms, ms_per_token=ms / n, peak_mem_bytes=peak)
                    if a.profile:
                        try:
                            row.update(profile_step(model, ids, mode, a.device))
                        except Exception as e:  # the timing above stands; the row says why it has no profile
                            row["profile_error"] = f"{type(e).__name__}: {e}"[:300]
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "oom"
                    dead.add((name, mode))
                except Exception as e:  # recorded, not hidden: the row says what failed
                    row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
                finally:
                    if method:
                        attnlab.unswap(model)
                    model.zero_grad(set_to_none=True)
                    if a.device.startswith("cuda"):
                        torch.cuda.empty_cache()
                rows.append(row)
                extra = "".join(f" {k}={row[k]:.2f}" if isinstance(row.get(k), float) else f" {k}={row[k]}"
                                for k in ("busy_ms", "attn_block_ms", "syncs") if row.get(k) is not None)
                print(f"{name:>16} {mode:>8} {n:>6} {row['status']:>7} "
                      f"{row.get('ms', float('nan')):9.2f} ms {((row.get('peak_mem_bytes') or 0) / 2**30):7.2f} GiB"
                      f"{extra}", flush=True)
        del model
    if a.merge:
        fresh = {r["impl"] for r in rows}
        rows = [r for r in json.loads(Path(a.merge).read_text()) if r["impl"] not in fresh] + rows
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_bench.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out / "model_bench.png")
    return 0


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for j, mode in enumerate(modes):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = [r for r in rows if r["impl"] == impl and r["mode"] == mode and r["status"] == "ok"]
            if not pts:
                continue
            xs = [r["seq_len"] for r in pts]
            axes[0][j].plot(xs, [r["ms_per_token"] * 1e3 for r in pts], marker="o", label=impl)
            if pts[0].get("peak_mem_bytes") is not None:
                axes[1][j].plot(xs, [r["peak_mem_bytes"] / 2**30 for r in pts], marker="o", label=impl)
        for i, lab in enumerate(("time per token (us)", "peak memory (GiB)")):
            axes[i][j].set(xscale="log", yscale="log", xlabel="sequence length", ylabel=lab, title=f"SmolLM2-135M {mode}")
            axes[i][j].grid(alpha=0.3)
            axes[i][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
