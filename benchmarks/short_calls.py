"""Device time of one attention call at SmolLM2's shapes (batch 1, 9 query heads on 3 kv heads, head dim 64, bf16)
and short lengths, where a swapped model step is within a few percent of the original's and every microsecond a
layer shows (x 30 layers). q, k, v are handed over as transformers does (views of [B, T, H, D] memory) and the
output goes through the adapter's `transpose(1, 2).contiguous()`.

Each variant is captured as one CUDA graph of `--layers` calls (a model step's worth, so that one replay's own
launch cost is spread over them) and replayed; rows give microseconds per call, the median over `--rounds`
replays, variants interleaved round by round. Variants:
  - sdpa: `F.scaled_dot_product_attention(causal, enable_gqa)`, what the original model runs;
  - each method (`--methods`) as attnlab builds it (backend auto: what a swapped model runs);
  - linear and performer with the causal kernels' other forms (`+chunked`, `+parallel`; `+parallel-fwd`: the
    parallel forward, the chunked backward) and, with `--configs`, each (key tile, num_warps, num_stages) of the
    parallel pass (`ops.linear_triton.CONFIG["parallel"]`, `linear+p64w4s2` ...; F = 256: `"parallel_wide"`,
    `performer+p64w8s2` ...);
  - `linear+seg4`, `performer+seg1` ... (`--segments 1,4`): the chunked passes' walks in segments of that many
    chunks (`SEGMENT_LEN`; 1: every chunk's own state in parallel, then each chunk's entering state as a sum of
    the earlier ones), not `segment_len`'s choice;
  - `linear+premap`: with gradients, q and k mapped by PyTorch ops before the kernels (`MAP_WITH_GRAD = False`),
    not inside them; `+walkq`, `+walkkv` (linear, performer): the chunked backward's reverse walk per query head
    or per kv head (`REVERSE_WALK`), not by `reverse_walk`'s rule; `performer+unfused`: the map of q, the map of k
    and the causal kernels as three autograd nodes, each launch after the other (`performer_triton.FUSED = False`);
    `performer+chunkmax`: the key log-scales' chunk maxima from a launch of their own before the state pass
    (`linear_triton.OWN_P = False`), not found by that pass;
  - performer's parts: `favor_map` (the FAVOR+ map of q and of k, two launches; `favor_map+two`: its forward in two sweeps of
    64 features, as maps wider than `favor_triton.ONE_SWEEP_MAX_M` run; with `--favor-configs`, each (rows,
    num_warps, num_stages) of the one-sweep forward, `favor_map+n32w4s2` ...) and `favor_core` (the causal kernels on the mapped
    features, F = 256, with the key log-scales), in each form;
  - `--variant NAME=KEY:VALUE[;KEY:VALUE]`: variants of your own, with any module setting the ones above use.
fwd runs under no_grad (linear then maps q and k inside its kernels); fwd+bwd records gradients for q, k, v.

    PYTHONPATH=src python benchmarks/short_calls.py --out OUT            # OUT/short_calls.json
    PYTHONPATH=src python benchmarks/short_calls.py --configs --out OUT  # + the parallel pass's launch settings
    PYTHONPATH=src python benchmarks/short_calls.py --methods performer --variant "performer+seg2=SEGMENT_LEN:2" --out OUT
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import attnlab
from attnlab.ops import favor_triton as ft
from attnlab.ops import linear_triton as lt
from attnlab.ops import performer_triton as pt
from attnlab.ops import triton_common as tc

H, HKV, D = 9, 3, 64


def inputs(t: int, grad: bool):
    """q [1, H, T, D], k, v [1, HKV, T, D]: views of one [1, T, (H + 2 HKV) D] projection, as transformers hands
    them over."""
    g = torch.Generator(device="cuda").manual_seed(t)
    row = torch.randn(1, t, (H + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = row.split([H * D, HKV * D, HKV * D], dim=-1)
    return [x.unflatten(-1, (-1, D)).transpose(1, 2).detach().requires_grad_(grad) for x in (q, k, v)]


FORMS = {"chunked": {"PARALLEL_MAX_T": 0}, "parallel": {"PARALLEL_MAX_T": 1 << 30},
         # the parallel forward with the chunked backward
         "parallel-fwd": {"PARALLEL_MAX_T": 1 << 30, "PARALLEL_BWD_MAX_F": 0}}


def _where(key: str):
    """(module, name) of a setting key: `ops.linear_triton`'s by default, "favor." keys `ops.favor_triton`'s,
    "performer." keys `ops.performer_triton`'s, "common." keys `ops.triton_common`'s."""
    for prefix, mod in (("favor.", ft), ("performer.", pt), ("common.", tc)):
        if key.startswith(prefix):
            return mod, key[len(prefix):]
    return lt, key


def _known(key: str) -> bool:
    """Whether a setting key names a module attribute or a CONFIG entry (`_where`)."""
    mod, k = _where(key)
    return k in getattr(mod, "CONFIG", {}) or hasattr(mod, k)


def _settings(settings: dict):
    """Install a variant's module settings (attributes, or CONFIG entries by their key, of the module `_where` names);
    returns a function restoring them."""
    def get(key):
        mod, k = _where(key)
        return dict(mod.CONFIG[k]) if k in getattr(mod, "CONFIG", {}) else getattr(mod, k)

    saved = {k: get(k) for k in settings}

    def put(values):
        for key, val in values.items():
            mod, k = _where(key)
            if k in getattr(mod, "CONFIG", {}):
                mod.CONFIG[k] = val
            else:
                setattr(mod, k, val)
    put(settings)
    return lambda: put(saved)


def make_call(name: str, t: int, grad: bool):
    """A no-argument callable running one call of the variant (and its backward when grad)."""
    q, k, v = inputs(t, grad)
    gout = torch.ones(1, t, H, D, device="cuda", dtype=torch.bfloat16)

    def finish(out):  # the adapter's transpose back, then the backward
        out = out.transpose(1, 2).contiguous()
        if grad:
            torch.autograd.grad(out, (q, k, v), gout)

    if name == "sdpa":
        return lambda: finish(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    if name.split("+")[0] in ("favor_map", "favor_core"):
        m = attnlab.make("performer", head_dim=D, num_heads=H, num_kv_heads=HKV).cuda()
        fm = m.feature_map
        scale = D ** -0.5
        with torch.no_grad():
            pq, _ = fm(q.detach(), scale=scale, is_query=True, compiled=True)
            pk, lk = fm(k.detach(), scale=scale, is_query=False, compiled=True)
        if name.startswith("favor_map"):
            def call():
                with torch.set_grad_enabled(grad):
                    a, _ = fm(q, scale=scale, is_query=True, compiled=True)
                    b, _ = fm(k, scale=scale, is_query=False, compiled=True)
                if grad:
                    torch.autograd.grad((a, b), (q, k), (torch.ones_like(a), torch.ones_like(b)))
            return call
        pq, pk = (x.detach().requires_grad_(grad) for x in (pq, pk))
        vv = v

        def core():
            with torch.set_grad_enabled(grad):
                out = lt.causal_linear(pq, pk, vv, lk)
            if grad:
                torch.autograd.grad(out, (pq, pk, vv), torch.ones_like(out))
        return core
    method = name.split("+")[0]
    m = attnlab.make(method, head_dim=D, num_heads=H, num_kv_heads=HKV).cuda()

    def call():
        with torch.set_grad_enabled(grad):
            out = m(q, k, v, causal=True).out
        finish(out)
    return call


def graph_of(call, layers: int) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) outside the capture
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            call()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_us(graph, layers: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / layers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--methods", default="window,linear,performer")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--configs", action="store_true", help="also each (key tile, num_warps, num_stages) of the "
                                                           "parallel pass")
    ap.add_argument("--favor-configs", action="store_true", help="also each (rows, num_warps, num_stages) of FAVOR+'s "
                                                                 "one-sweep map forward")
    ap.add_argument("--segments", default="", help="comma list of chunks per segment of the chunked passes' walks "
                                                   "(`linear_triton.SEGMENT_LEN`): linear / performer +seg<n> variants")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY:VALUE[;KEY:VALUE]",
                    help="an extra variant with module settings (`ops.linear_triton` attributes, CONFIG keys, "
                         "'favor.' / 'performer.' / 'common.' (`ops.triton_common`) ones as the built-in variants; "
                         "values as Python literals), e.g. 'performer+seg3=SEGMENT_LEN:3'; NAME's method is the part "
                         "before '+', NAME a name no other variant has (repeatable)")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in a.lengths.split(",")]
    except ValueError:
        ap.error(f"--lengths: comma-separated token counts, got {a.lengths!r}")
    if not all(n.isdigit() and int(n) > 0 for n in a.segments.split(",") if n):
        ap.error(f"--segments: positive integers, got {a.segments!r}")
    if min(lengths) < 1 or a.layers < 1 or a.rounds < 1:
        ap.error("--lengths, --layers and --rounds must be positive")
    unknown = [m for m in a.methods.split(",") if m and m not in attnlab.registry.list_methods()]
    if unknown:
        ap.error(f"--methods: unknown {unknown} (attnlab list shows the methods)")
    bad_modes = [m for m in a.modes.split(",") if m not in ("fwd", "fwd+bwd")]
    if bad_modes:
        ap.error(f"--modes: fwd and / or fwd+bwd, got {bad_modes}")
    methods = [m for m in a.methods.split(",") if m]
    extra = []
    for spec in a.variant:
        try:
            name, sets = spec.split("=", 1)
            settings = {k.strip(): ast.literal_eval(v) for k, v in (kv.split(":", 1) for kv in sets.split(";"))}
        except (ValueError, SyntaxError, TypeError):
            ap.error(f"--variant: NAME=KEY:VALUE[;KEY:VALUE] with Python literal values, got {spec!r}")
        if name.split("+")[0] not in methods + (["favor_map", "favor_core"] if "performer" in methods else []):
            ap.error(f"--variant {spec!r}: its method {name.split('+')[0]!r} is not in --methods")
        unknown_keys = [k for k in settings if not _known(k)]
        if unknown_keys:
            ap.error(f"--variant {spec!r}: no such setting {unknown_keys} (ops.linear_triton's attributes or "
                     "CONFIG keys; 'favor.', 'performer.', 'common.' for ops.favor_triton's, ops.performer_triton's, "
                     "ops.triton_common's)")
        extra.append((name, settings))
    variants = [("sdpa", {})] + [(m, {}) for m in methods] + extra  # (name, module settings)
    variants += [(f"{m}+seg{n}", {"SEGMENT_LEN": int(n)}) for m in ("linear", "performer") if m in methods
                 for n in a.segments.split(",") if n]
    if "linear" in methods:
        variants += [(f"linear+{form}", FORMS[form]) for form in ("chunked", "parallel")]
        variants += [("linear+premap", {"MAP_WITH_GRAD": False})]  # with gradients, q and k mapped first (PyTorch)
        variants += [("linear+walkq", {"REVERSE_WALK": "query"}), ("linear+walkkv", {"REVERSE_WALK": "kv"})]
        if a.configs:
            variants += [(f"linear+p{bn}w{w}s{s}",
                          {**FORMS["parallel"], "parallel": dict(BN=bn, num_warps=w, num_stages=s)})
                         for bn, w, s in itertools.product((64, 128), (4, 8), (1, 2, 3))]
    if "performer" in methods:
        variants += [(f"performer+{form}", FORMS[form]) for form in FORMS]
        variants += [("performer+walkq", {"REVERSE_WALK": "query"}), ("performer+walkkv", {"REVERSE_WALK": "kv"})]
        variants += [("performer+unfused", {"performer.FUSED": False})]  # the composition: map q, map k, core
        variants += [("performer+chunkmax", {"OWN_P": False})]  # the chunk maxima a launch of their own
        variants += [("favor_map", {})] + [(f"favor_core+{form}", FORMS[form]) for form in FORMS]
        variants += [("favor_map+two", {"favor.ONE_SWEEP_MAX_M": 0})]  # two sweeps of 64 features (wider maps' form)
        if a.favor_configs:  # the one-sweep forward's launch settings
            variants += [(f"favor_map+n{bn}w{w}s{st}", {"favor.fwd_one": dict(BN=bn, num_warps=w, num_stages=st)})
                         for bn, w, st in itertools.product((32, 64), (4, 8), (1, 2, 3))]
        if a.configs:  # the wide parallel passes' launch settings (F = 256)
            variants += [(f"performer+p{bn}w{w}s{s}",
                          {**FORMS["parallel"], "parallel_wide": dict(BN=bn, num_warps=w, num_stages=s)})
                         for bn, w, s in itertools.product((32, 64), (4, 8), (1, 2))]
    names = [n for n, _ in variants]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        ap.error(f"--variant: {clash} named twice (a built-in variant's or another --variant's name)")
    if not torch.cuda.is_available():
        print("short_calls.py: needs a CUDA device", file=sys.stderr)
        return 1
    rows = []
    for t, mode in itertools.product(lengths, a.modes.split(",")):
        graphs = {}
        for name, settings in variants:
            restore = _settings(settings)
            try:  # settings are read at capture: the graph keeps the kernels they chose
                call = make_call(name, t, mode == "fwd+bwd")
                # the call (its closure holds the inputs the graph reads) lives as long as the graph: a graph
                # does not keep the tensors it was captured on alive, and freed ones are reused by later variants
                graphs[name] = (graph_of(call, a.layers), call)
            except Exception as e:  # a launch setting that does not fit: a row saying so
                rows.append(dict(variant=name, tokens=t, mode=mode, status="error", error=f"{type(e).__name__}: {e}"[:200]))
                print(f"{name:18} {mode:8} {t:6} error {rows[-1]['error']}", flush=True)
            finally:
                restore()
        times = {n: [] for n in graphs}
        for _ in range(a.rounds):
            for n, (g, _call) in graphs.items():
                times[n].append(replay_us(g, a.layers))
        base = statistics.median(times["sdpa"])
        for n, ts in times.items():
            us = statistics.median(ts)
            rows.append(dict(variant=n, tokens=t, mode=mode, status="ok", us_per_call=round(us, 2),
                             x_sdpa=round(us / base, 3), layers=a.layers, rounds=a.rounds))
            print(f"{n:18} {mode:8} {t:6} {us:8.2f} us  {us / base:5.2f}x sdpa", flush=True)
        del graphs
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, command="python " + " ".join(sys.argv))
    (out / "short_calls.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
