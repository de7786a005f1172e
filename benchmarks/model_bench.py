"""Model-level cost: SmolLM2-135M (its exact config, random weights: cost does not depend on weight values, and
the 540 MB checkpoint cannot travel to the GPU machine) forward and forward+backward vs sequence length, with
each method swapped in, against the original model in eager mode (builds the attention matrix) and sdpa mode.

    PYTHONPATH=src python benchmarks/model_bench.py --device cuda --dtype bfloat16 --out benchmarks/results

Writes model_bench.json (one row per measurement) and model_bench.png. Peak memory target from the research:
at least 30% below eager dense at every length >= 1024.

`--cuda-graph` (CUDA) captures each configuration's step once as a CUDA graph (`attnlab.timing.capture_graph`) and times its replays:
the step without its host time (Python, launches), i.e. what the kernels cost; `--compile` compiles each decoder
layer instead (regional compilation, the attention methods outside the graph).

`--profile` adds, per row, one more step under torch.profiler: `busy_ms` (the device's kernel time; wall ms well
above it means the step waits on Python and launches), `attn_block_ms` (kernel time inside the layers' self_attn
modules in the forward: projections, rotary and attention; the backward's kernels run outside the modules and are
not attributed), `host_ms` and `host_top` (the step under cProfile: the host's time and its costliest functions by
own time), on CUDA `top_kernels` (the largest kernels: name, ms, count), `kernels` (all of them, largest first),
`launches` (kernel launches in the step) and `syncs` (host-device synchronisations counted by
torch.cuda.set_sync_debug_mode during one step: each stalls the launch queue).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

import attnlab
from attnlab import defaults as method_defaults
from attnlab.timing import capture_graph

HERE = Path(__file__).parent


def build(device, dtype, impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_dict(json.loads((HERE / "smollm2_config.json").read_text()))
    cfg.max_position_embeddings = 1 << 17
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl, dtype=dtype).to(device)
    return model


def synthetic_pattern(cfg, seq_len: int, folder: Path, block_size: int = 64) -> Path:
    """A global-sparse pattern folder of SmolLM2's shape (every layer and head) covering `seq_len`, from made-up
    block masses: causal, decaying with distance at a per-head rate, the first block a sink, seeded noise. Cost
    depends on how many blocks are kept and how they scatter, not on which text chose them; the real patterns
    come from `attnlab sparsify` (which needs the checkpoint)."""
    from attnlab.reduction.global_sparse import GlobalPattern, save_pattern

    layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    nb = -(-seq_len // block_size)
    gen = torch.Generator().manual_seed(0)
    i = torch.arange(nb)
    dist = (i[:, None] - i[None, :]).clamp(min=0).float()
    rate = torch.empty(layers, heads, 1, 1).uniform_(0.5, 2.0, generator=gen)
    mass = (1.0 + dist) ** -rate
    mass[..., 0] += 0.5
    mass = mass * torch.empty(layers, heads, nb, nb).uniform_(0.5, 1.5, generator=gen)
    mass = mass * (dist > 0).float() + torch.diag_embed(torch.ones(layers, heads, nb))  # causal; diagonal kept anyway
    mass = torch.where(i[:, None] >= i[None, :], mass, torch.zeros(()))
    pat = GlobalPattern(mass=mass, block_size=block_size, meta={"synthetic": True, "seq_len": seq_len},
                        sink_mass=torch.full((layers, heads, nb), 0.2), sinks=4, band=True)
    return save_pattern(folder, pat)


def make_step(model, ids, mode):
    def step():
        if mode == "fwd":
            with torch.no_grad():
                model(ids, use_cache=False)
        else:
            model(ids, labels=ids, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
    return step


def timed(step, device) -> tuple[float, int | None]:
    """One step: (ms, peak bytes above what was allocated before it; None on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e), torch.cuda.max_memory_allocated() - base
    t = time.perf_counter()
    step()
    return (time.perf_counter() - t) * 1e3, None


def compile_layers(model, on: bool) -> None:
    """Regional compilation (PyTorch's recipe for repeated blocks): each decoder layer through torch.compile, one
    graph shared by all layers; the mask creation and the vocabulary head stay eager. Whole-model compilation
    would trace transformers' mask creation, which under tracing cannot prove a batch holds one sequence
    (packed-sequence detection) and hands every attention a materialised 4D mask."""
    for layer in model.model.layers:
        if on:
            layer.compile()
        else:
            layer._compiled_call_impl = None


def profile_step(model, ids, mode, device, trace: Path | None = None) -> dict:
    """One step under torch.profiler: device busy time, time inside self_attn modules, and (CUDA) the syncs.
    `trace`: also one step under torch.profiler with Python stacks, written there as a chrome trace (.json.gz;
    benchmarks/trace_gaps.py reads it)."""
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
    step = make_step(model, ids, mode)

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
        # the CUDA-side copy of a record_function range (gpu_user_annotation) is a span, not a kernel: left out
        kernels = [e for e in events if cuda and str(getattr(e, "device_type", "")).endswith("CUDA")
                   and e.key != "model_bench.self_attn"]
        def get(e, name):  # torch >= 2.4 says device_*, older cuda_*
            return getattr(e, name, None) if getattr(e, name, None) is not None else getattr(e, name.replace("device", "cuda"), 0)

        out["busy_ms"] = (sum(get(e, "self_device_time_total") for e in kernels) / 1e3 if cuda else None)
        rng = [e for e in events if e.key == "model_bench.self_attn" and str(getattr(e, "device_type", "CPU")).endswith("CPU")]
        out["attn_block_ms"] = sum(get(e, dev) for e in rng) / 1e3 if rng else None
        if cuda:  # where the device time goes: the largest kernels by their own time
            top = sorted(kernels, key=lambda e: -get(e, "self_device_time_total"))[:8]
            out["top_kernels"] = [[e.key[:80], round(get(e, "self_device_time_total") / 1e3, 3), e.count] for e in top]
            # every kernel of the step (name, ms, launches), for comparing two configurations' steps kernel by kernel
            out["kernels"] = [[e.key[:160], round(get(e, "self_device_time_total") / 1e3, 4), e.count] for e in
                              sorted(kernels, key=lambda e: -get(e, "self_device_time_total"))]
            out["launches"] = sum(e.count for e in kernels)
        if trace is not None:  # a step of its own: Python stacks slow the host, the numbers above stay unaffected
            with profile(activities=acts, with_stack=True) as tprof:
                step()
                if cuda:
                    torch.cuda.synchronize()
            trace.parent.mkdir(parents=True, exist_ok=True)
            tprof.export_chrome_trace(str(trace))
            out["trace"] = trace.name
        # host time: the step under cProfile, its costliest functions by own time (Python, launches, guards)
        import cProfile
        import pstats

        prof_py = cProfile.Profile()
        prof_py.enable()
        step()
        prof_py.disable()  # before the sync: host time, not waiting for the device
        if cuda:
            torch.cuda.synchronize()
        st = pstats.Stats(prof_py)
        out["host_ms"] = st.total_tt * 1e3
        top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:12]  # (file, line, fn) -> (cc, nc, tt, ct, callers)
        out["host_top"] = [[f"{Path(f).name}:{ln}({fn})"[:70], nc, round(tt * 1e3, 2)] for (f, ln, fn), (cc, nc, tt, ct, _)
                           in top]
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
    p.add_argument("--budget-s", type=float, default=400, help="stop starting new lengths after this many seconds")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--no-original", action="store_true", help="skip the original eager/sdpa model rows")
    p.add_argument("--originals", default="eager,sdpa", help="which original implementations get rows")
    p.add_argument("--sparsity", type=float, default=0.9, help="global_sparse rows: fraction of blocks pruned from a "
                   "synthetic pattern (see synthetic_pattern)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (regional compilation, "
                   "compile_layers) before timing; impl names get a +compile suffix; compilation happens in the warm-up")
    p.add_argument("--cuda-graph", action="store_true", help="CUDA only: each step captured once as a CUDA graph "
                   "and replayed (capture); impl names get a +graph suffix; peak memory is what the capture allocated")
    p.add_argument("--narrow-backward", action="store_true", help="attnlab.ops.sparse.enable_narrow_backward(64) "
                   "first: global_sparse's backward runs its 64-token blocks (impl names get +narrowbwd)")
    p.add_argument("--linear-form", choices=("auto", "chunked", "parallel"), default="auto",
                   help="the causal linear kernels' forward for every layer of linear / performer rows "
                        "(ops.linear_triton.PARALLEL_MAX_T): auto is the rule (parallel_max_t), chunked the state "
                        "walk, parallel the one quadratic pass; not auto: method impl names get +chunked / +parallel")
    p.add_argument("--profile", action="store_true", help="per row, one more step under torch.profiler: device "
                   "busy time, time inside self_attn, and (CUDA) host-device syncs")
    p.add_argument("--trace", default=None, help="with --profile: write each row's step as a chrome trace "
                   "(Python stacks) into this folder, IMPL_MODE_LEN.json.gz (benchmarks/trace_gaps.py reads them)")
    p.add_argument("--verbose", action="store_true", help="with --profile, print each row's largest kernels and "
                   "host functions")
    p.add_argument("--merge", default=None, help="an earlier model_bench.json: its rows for the impls measured "
                   "now are replaced, the others kept (rerun a few methods after a change)")
    a = p.parse_args(argv)
    if a.cuda_graph and not a.device.startswith("cuda"):
        p.error("--cuda-graph needs --device cuda")
    if a.trace and not a.profile:
        p.error("--trace goes with --profile")
    if a.cuda_graph and (a.compile or a.profile):
        p.error("--cuda-graph times replays of a captured step: not with --compile or --profile")
    if a.narrow_backward:
        from attnlab.ops.sparse import enable_narrow_backward

        if not enable_narrow_backward(64):
            p.error("--narrow-backward: this torch has no inductor choices hook (see ops/sparse.py)")
    form = ""
    if a.linear_form != "auto":
        from attnlab.ops import linear_triton

        linear_triton.PARALLEL_MAX_T = 0 if a.linear_form == "chunked" else 1 << 30
        form = "+" + a.linear_form
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
    if a.compile:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = 64  # a graph per (length, grad mode)
    originals = [] if a.no_original else [x for x in a.originals.split(",") if x]
    # a method may name its backend, METHOD@BACKEND (global_sparse@flex): the configuration's row keeps that name
    configs = [(f"original-{impl}", impl, None) for impl in originals] + [
        (m + ("+narrowbwd" if a.narrow_backward else "") + form, "sdpa", m) for m in a.methods.split(",")
    ]
    suffix = "+compile" if a.compile else "+graph" if a.cuda_graph else ""
    # one model per configuration, built once (135M parameters each), so that the steps of all configurations can
    # interleave: the host's speed drifts (the same kernels' launch time varied 2x between rows measured one after
    # the other on the H200 machine), and at short lengths the host is most of the step
    models = {name: build(a.device, dtype, impl) for name, impl, _ in configs}
    t0 = time.time()  # the budget counts measurement, not building
    for i, n in enumerate(lengths):
        if time.time() - t0 > a.budget_s:
            rows += [dict(base_row(name + suffix, method or impl, m, mode, a, env), status="skipped")
                     for m in lengths[i:] for name, impl, method in configs for mode in a.modes.split(",")]
            break
        ids = torch.randint(0, 49152, (1, n), device=a.device)
        ready = {}  # name -> options of the configurations swapped in at this length
        for name, impl, method in configs:
            base, _, backend = (method or "").partition("@")
            opts = {**method_options(base, n, models[name].config, a.sparsity),
                    **({"backend": backend} if backend else {})} if method else {}
            try:
                if method:
                    attnlab.swap(models[name], base, **opts)
                if a.compile:
                    compile_layers(models[name], True)
                ready[name] = opts
            except Exception as e:
                compile_layers(models[name], False)
                if method and attnlab.swapped_layers(models[name]):
                    attnlab.unswap(models[name])
                rows += [dict(base_row(name + suffix, method or impl, n, mode, a, env), status="error",
                              error=f"{type(e).__name__}: {e}"[:300]) for mode in a.modes.split(",")]
        for mode in a.modes.split(","):
            live, out, graphs = {}, {}, {}  # graphs: name -> (CUDAGraph, its masks); the pool is freed with them
            pool = None
            for name, impl, method in configs:
                if name not in ready:
                    continue
                row = base_row(name + suffix, method or impl, n, mode, a, env)
                row["options"] = {**ready[name], **({"pattern": "synthetic"} if (method or "").startswith("global_sparse")
                                                   else {})}
                out[name] = row
                if (name, mode) in dead:
                    row["status"] = "oom"
                    continue
                step = make_step(models[name], ids, mode)
                try:
                    if a.cuda_graph:
                        pool = pool or torch.cuda.graph_pool_handle()  # one pool for this (length, mode)'s graphs
                        cap = capture_graph(step, model=models[name], warmup=a.warmup, pool=pool)
                        step, row["capture_peak_bytes"], graphs[name] = cap.replay, cap.step_bytes, cap.keep
                    else:
                        for _ in range(a.warmup):
                            step()
                    live[name] = step
                    row.update(status="ok", times=[], peaks=[])
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "oom"
                    dead.add((name, mode))
                except Exception as e:  # recorded, not hidden: the row says what failed
                    row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
                finally:
                    models[name].zero_grad(set_to_none=True)
                    free(a.device)
            for _ in range(a.repeats):  # round robin: every configuration's r-th step under the same host conditions
                for name in list(live):
                    try:
                        ms, peak = timed(live[name], a.device)
                        out[name]["times"].append(ms)
                        out[name]["peaks"].append(peak)
                    except Exception as e:  # an OOM ends the configuration's longer lengths; anything else is shown
                        oom = isinstance(e, torch.cuda.OutOfMemoryError)
                        out[name].update(status="oom" if oom else "error",
                                         **({} if oom else {"error": f"{type(e).__name__}: {e}"[:300]}))
                        if oom:
                            dead.add((name, mode))
                        del live[name]
                        models[name].zero_grad(set_to_none=True)
                        free(a.device)
            for name, row in out.items():
                if row.get("status") == "ok":
                    times, peaks = row.pop("times"), row.pop("peaks")
                    peak = row.pop("capture_peak_bytes", None) if a.cuda_graph else None if peaks[0] is None else max(peaks)
                    row.update(ms=statistics.median(times), ms_min=min(times), ms_per_token=statistics.median(times) / n,
                               peak_mem_bytes=peak, repeats=len(times))
                    if a.profile:
                        try:
                            trace = (Path(a.trace) / f"{name}_{mode.replace('+', '')}_{n}.json.gz" if a.trace
                                     else None)
                            row.update(profile_step(models[name], ids, mode, a.device, trace))
                        except Exception as e:  # the timing above stands; the row says why it has no profile
                            row["profile_error"] = f"{type(e).__name__}: {e}"[:300]
                        models[name].zero_grad(set_to_none=True)
                row.pop("times", None), row.pop("peaks", None)
                rows.append(row)
                report(row, a)
            live = graphs = pool = step = None  # the graphs (and the replay bound to the last) release their pool
            models_zero(models)
            free(a.device)
            save(rows, a)  # after every (length, mode): a call cut by its time limit keeps what it measured
        for name, impl, method in configs:
            if name in ready:
                if a.compile:
                    compile_layers(models[name], False)
                if method:
                    attnlab.unswap(models[name])
                if (method or "").startswith("global_sparse"):  # the synthetic pattern's folder (read at swap time)
                    shutil.rmtree(Path(ready[name]["pattern"]).parent, ignore_errors=True)
        free(a.device)
    rows = save(rows, a)
    plot(rows, Path(a.out) / "model_bench.png")
    return 0


def base_row(impl, method, n, mode, a, env) -> dict:
    return {"model": "SmolLM2-135M (config, random weights)", "impl": impl, "method": method, "seq_len": n,
            "batch": 1, "mode": mode, "dtype": a.dtype, "device": a.device, "compiled": a.compile,
            "cuda_graph": a.cuda_graph, "interleaved": True, **env}


def models_zero(models) -> None:
    for m in models.values():
        m.zero_grad(set_to_none=True)


def method_options(method, n, config, sparsity) -> dict:
    if method == "window":
        return {"window": 256, "sinks": 4}
    if method == "block_sparse":
        return {"block_size": 128}
    if method == "lsh":
        return {"bucket_size": 128, "n_hashes": 2, "shared_qk": False}
    if method == "global_sparse":
        import tempfile

        folder = synthetic_pattern(config, n, Path(tempfile.mkdtemp(prefix="model_bench_")) / "pattern")
        return {"pattern": str(folder), "sparsity": sparsity}
    return method_defaults(method, n)


def free(device) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def report(row, a) -> None:
    extra = "".join(f" {k}={row[k]:.2f}" if isinstance(row.get(k), float) else f" {k}={row[k]}"
                    for k in ("busy_ms", "attn_block_ms", "host_ms", "syncs") if row.get(k) is not None)
    print(f"{row['impl']:>22} {row['mode']:>8} {row['seq_len']:>6} {row['status']:>7} "
          f"{row.get('ms', float('nan')):9.2f} ms {((row.get('peak_mem_bytes') or 0) / 2**30):7.2f} GiB"
          f"{extra}{' ' + row['error'][:120] if row.get('error') else ''}", flush=True)
    if a.verbose and row.get("top_kernels"):
        print("      kernels:", "; ".join(f"{k[:40]} {t}ms x{c}" for k, t, c in row["top_kernels"][:6]))
    if a.verbose and row.get("host_top"):
        print("      host:", "; ".join(f"{k} x{c} {t}ms" for k, c, t in row["host_top"][:8]))


def save(rows, a) -> list:
    """Write model_bench.json (rows of --merge's file for impls not measured now kept); returns what was written."""
    if a.merge:
        fresh = {r["impl"] for r in rows}
        rows = [r for r in json.loads(Path(a.merge).read_text()) if r["impl"] not in fresh] + rows
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_bench.json").write_text(json.dumps(rows, indent=1))
    return rows


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
