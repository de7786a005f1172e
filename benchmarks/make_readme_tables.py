"""Build the README's tables from committed JSON: the cost tables from benchmarks/results/ (latest row wins) and
the fidelity tables from docs/compare-<task>.json (the result file `attnlab compare` wrote, with its command and
commit). Nothing in those README blocks is typed by hand.

    python benchmarks/make_readme_tables.py            # rewrites the blocks between the markers
    python benchmarks/make_readme_tables.py --check    # exit 1 if the README differs from what the JSON gives
"""
from __future__ import annotations

import glob
import json
import re
from pathlib import Path

HERE = Path(__file__).parent
LENGTHS = (4096, 16384, 65536)
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def load_runs(h200: bool = True) -> dict[str, dict]:
    """Every committed bench run outside results/history/: {relative JSON path: {(mode, causal, method, impl, T): row}}.
    A table row takes attnlab's cells, the SDPA baseline and the peers from ONE run (the ratios are same-run ratios).
    h200=False: the runs on other cards instead (`other_card_notes`)."""
    runs = {}
    for f in sorted(glob.glob(str(HERE / "results" / "**" / "*.json"), recursive=True)):
        rel = str(Path(f).relative_to(HERE.parent))
        if f.endswith("crossover.json") or "/history/" in f:
            continue
        data = json.load(open(f))
        rows = {}
        for r in data if isinstance(data, list) else []:
            if not isinstance(r, dict) or not {"status", "seq_len", "causal", "mode", "impl", "method"} <= r.keys():
                continue
            if r.get("dtype", "bfloat16") != "bfloat16" or r.get("heads") not in (None, 16):
                continue  # the tables' setup (bf16, 16 heads): runs of other shapes answer other questions
            if ("H200" in str(r.get("device_name", "H200"))) != h200 or not str(r.get("device", "cuda")).startswith("cuda"):
                continue  # the tables are the H200's; a run on another GPU is cited beside them, a CPU run not at all
            impl = r["impl"]
            if r.get("overrides") and impl.startswith("attnlab"):  # `--set` options: a variant, not the default
                impl += "{" + ",".join(f"{k}={v}" for k, v in sorted(r["overrides"].items())) + "}"
            rows[(r["mode"], bool(r["causal"]), r["method"], impl, r["seq_len"])] = r
        if rows:
            runs[rel] = rows
    return runs


def cell(r) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"]
    return f"{r['ms']:.2f} ms / {r['peak_mem_bytes'] / 2**30:.2f} GiB"


def limit_cell(r) -> str:
    """How close a row came to the device's limits: its own FLOPs per second as a share of the bf16 matmul rate and
    its compulsory bytes per second as a share of the copy bandwidth, both measured in the row's own run (bench rows
    since the H200 runs; older rows have none)."""
    if r is None or r["status"] != "ok" or (r.get("matmul_fraction") is None and r.get("copy_fraction") is None):
        return "-"
    share = lambda x: "n/a" if x is None else f"{x:.1%}"  # n/a: a method that does not count its FLOPs
    return f"{share(r.get('matmul_fraction'))} / {share(r.get('copy_fraction'))}"


def _pick_run(runs: dict, mode: str, causal: bool, method: str, impl: str):
    """The run with the most ok lengths of this (method, impl); on a tie the one whose peers of the method were timed
    at the most of those lengths (a run whose peers were cut short by its time budget does not replace one with
    the ratio at every length), then the latest."""
    def score(item):
        rel, rows = item
        ok = [rows.get((mode, causal, method, impl, n)) for n in LENGTHS]
        n_ok = sum(1 for r in ok if r and r["status"] == "ok")
        peer_lengths = {k[4] for k, r in rows.items() if k[:3] == (mode, causal, method)
                        and not k[3].startswith("attnlab") and k[4] in LENGTHS and r["status"] == "ok"}
        stamp = max((str(r.get("timestamp", "")) for r in ok if r), default="")
        return (n_ok, any(ok), len(peer_lengths), stamp)
    best = max(runs.items(), key=score, default=None)
    return best if best and score(best)[1] else None


def _best_peer(rows: dict, mode: str, causal: bool, method: str, n: int):
    """(name, row) of the fastest ok peer of `method` at length n in one run (None: no peer ran there)."""
    peers = [(k[3], r) for k, r in rows.items() if k[:3] == (mode, causal, method) and not k[3].startswith("attnlab")
             and k[4] == n and r["status"] == "ok"]
    return min(peers, key=lambda p: p[1]["ms"]) if peers else None


def other_card_notes(runs: dict, others: dict) -> list[str]:
    """A line per attnlab row measured on another GPU after the H200 run its table row comes from (a session whose
    device calls got an H100), or never on the H200: each mode's same-run ratios to the best peer, with the run each
    comes from, so a stale H200 row says so. Milliseconds are not compared across cards."""
    lines = []
    variants = sorted({(k[2], k[3]) for rows in others.values() for k in rows
                       if k[3].startswith("attnlab") and k[2] != "sdpa"})  # (sdpa: the baseline every sweep runs)
    for m, impl in variants:
        cells, used, stale, peer, h200 = [], {}, False, set(), False

        def stamp(rs):
            return max((str(r.get("timestamp", "")) for k, r in rs.items() if k[2:4] == (m, impl)), default="")
        for mode in ("fwd", "fwd+bwd"):
            for causal in (False, True):
                mine, theirs = _pick_run(runs, mode, causal, m, impl), _pick_run(others, mode, causal, m, impl)
                if theirs is None:
                    continue
                rel, rows = theirs
                h200 |= mine is not None
                stale |= mine is None or stamp(rows) > stamp(mine[1])
                ratios = []
                for n in LENGTHS:
                    own, best = rows.get((mode, causal, m, impl, n)), _best_peer(rows, mode, causal, m, n)
                    ok = own is not None and own["status"] == "ok" and best is not None
                    ratios.append(f"{own['ms'] / best[1]['ms']:.2f}" if ok else "-")
                    peer |= {best[0]} if ok else set()
                used.setdefault(rel, len(used) + 1)
                cells.append((f"{mode} {'causal' if causal else 'non-causal'} {' / '.join(ratios)}", rel))
        if not (stale and used):
            continue
        many = len(used) > 1  # a mode whose best run is another: each cell names its run
        cells = [text + (f" [{used[rel]}]" if many else "") for text, rel in cells]
        devs = sorted({r.get("device_name") for rel in used for r in others[rel].values()})
        links = ", ".join((f"[{i}] " if many else "") + f"[{Path(rel).parent.name}/{Path(rel).name}]({rel}), "
                          f"{stamp(others[rel])[:10]}" for rel, i in used.items())
        label = m + impl[len("attnlab"):]
        when = "was measured again after its rows above" if h200 else "has no H200 row in a mode below; measured"
        lines.append(f"- **{label}** {when}, on {' and '.join('an ' + d for d in devs)} ({links}); x the best peer in "
                     f"the same run ({', '.join(sorted(peer)) or 'none ran'}) at "
                     f"{' / '.join(f'{n // 1024}k' for n in LENGTHS)}: " + "; ".join(cells) + ".")
    if lines:
        lines.insert(0, "Rows above that a later run on another card re-measured (its same-run ratios; the H200 rows "
                        "stand until an H200 run replaces them):")
    return lines


def table(runs: dict, mode: str, causal: bool) -> str:
    variants = sorted({(k[2], k[3]) for rows in runs.values() for k in rows
                       if k[0] == mode and k[1] == causal and k[3].startswith("attnlab")})
    head = ("| method | " + " | ".join(f"{n // 1024}k time / peak mem" for n in LENGTHS)
            + " | x SDPA at 64k | best peer at 64k | x best peer at " + " / ".join(f"{n // 1024}k" for n in LENGTHS)
            + " | 64k: matmul / copy rate | run |")
    lines = [f"**{mode}, {'causal' if causal else 'non-causal'}**", "", head, "|" + "---|" * (len(LENGTHS) + 6)]
    for m, impl in variants:
        picked = _pick_run(runs, mode, causal, m, impl)
        if picked is None:  # measured only at lengths outside the table's
            continue
        rel, rows = picked
        own = [rows.get((mode, causal, m, impl, n)) for n in LENGTHS]
        sd = rows.get((mode, causal, "sdpa", "attnlab", LENGTHS[-1]))
        big = own[-1]
        ratio_sdpa = (f"{big['ms'] / sd['ms']:.2f}" if big and sd and big["status"] == sd["status"] == "ok" else "-")

        ratios = []
        for r, n in zip(own, LENGTHS):
            bp = _best_peer(rows, mode, causal, m, n)
            ratios.append(f"{r['ms'] / bp[1]['ms']:.2f}" if bp and r and r["status"] == "ok" else "-")
        best = _best_peer(rows, mode, causal, m, LENGTHS[-1])
        label = m + impl[len("attnlab"):]
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in own)
                     + f" | {ratio_sdpa} | {best[0] + ' {:.2f} ms'.format(best[1]['ms']) if best else '-'}"
                     + f" | {' / '.join(ratios)} | {limit_cell(big)} | [{Path(rel).parent.name}/{Path(rel).name}]({rel}) |")
    return "\n".join(lines)


MODEL_DIR = HERE / "results" / "model_bench" / "h200"
NOTES = {"global_sparse": "that run gave the backward 64-token tiles too, for which torch 2.11 has no flex backward "
                          "kernel by default; a backward now gets 128-token blocks (ops/sparse.py call_block_size), or "
                          "64 after enable_narrow_backward: both measured since, in the global_sparse fwd+bwd tables "
                          "below"}


def crossover(rows, impl, base, key) -> int | None:
    """The shortest measured length from which `impl` beats `base` in `key` (ms | peak_mem_bytes) at every longer
    length: the bench's crossover (attnlab.bench.plot.crossover: a length where the method failed and the base ran
    is a loss, one where the base ran out of memory a win) over model_bench rows, one configuration."""
    import sys

    sys.path.insert(0, str(HERE.parent / "src"))
    from attnlab.bench import plot

    fill = {"mode": "", "causal": True, "dtype": "", "device": "", "heads": 0, "head_dim": 0, "batch": 1}
    keyed = [{**fill, key: r.get(key), "seq_len": r["seq_len"], "status": r["status"], "method": r["impl"],
              "impl": "model"} for r in rows if r["impl"] in (impl, base)]
    out = plot.crossover(keyed, baseline=(base, "model"))
    return out[0]["crossover_" + {"ms": "time", "peak_mem_bytes": "memory"}[key]] if out else None


def _model_mode_table(rows, base: str, mode: str, title: str) -> list[str]:
    """One mode's rows of a model_bench file: ms / peak GiB per length, time vs `base`, crossover per method."""
    mrows = [r for r in rows if r["mode"] == mode]
    lengths = sorted({r["seq_len"] for r in mrows if r["status"] == "ok"})
    if not lengths:
        return []
    out = [title, "", "| impl | " + " | ".join(str(n) for n in lengths) + " | crossover (time) | crossover (memory) |",
           "|" + "---|" * (len(lengths) + 3)]
    ref = {r["seq_len"]: r for r in mrows if r["impl"] == base and r["status"] == "ok"}
    for impl in dict.fromkeys(r["impl"] for r in mrows):
        cells = []
        for n in lengths:
            r = next((x for x in mrows if x["impl"] == impl and x["seq_len"] == n), None)
            if r is None or r["status"] != "ok":
                cells.append((r["status"] if r else "-") + ("¹" if r and r.get("error") else ""))
                continue
            c = f"{r['ms']:.0f} / {r['peak_mem_bytes'] / 2**30:.2f}" if r["ms"] >= 10 else \
                f"{r['ms']:.1f} / {r['peak_mem_bytes'] / 2**30:.2f}"
            if impl != base and n in ref:
                c += f" ({r['ms'] / ref[n]['ms']:.2f}x)"
            cells.append(c)
        if impl == base:
            cross = ["-", "-"]
        else:
            cross = [str(crossover(mrows, impl, base, k) or "none measured") for k in ("ms", "peak_mem_bytes")]
        out.append(f"| {impl} | " + " | ".join(cells) + f" | {cross[0]} | {cross[1]} |")
    errs = sorted({(r["impl"], r["error"].split(":")[0] + ": " + r["error"].split(":")[1].strip()) for r in mrows
                   if r.get("error")})
    out += [f"¹ {impl}: {err} ({NOTES.get(impl, 'see the JSON')})" for impl, err in errs]
    return out + [""]


GRAPH_RUNS = (("model_bench_graph.json", "**Each step captured as one CUDA graph** (`--cuda-graph`, `model_bench_graph.json`: "
           "`python benchmarks/model_bench.py --device cuda --dtype bfloat16 --lengths L --methods "
           "sdpa,window,linear,performer,global_sparse --originals sdpa --modes fwd,fwd+bwd --cuda-graph`, one run per "
           "length, each interleaved; 16384 fwd only). A replay launches the whole step at once: no Python, no "
           "per-kernel launch cost, so this is what the kernels cost. transformers' mask is decided outside the "
           "capture (`adapters/hf.py` `mask_outside_capture`); peak memory is what the capture allocated.",
           "CUDA graph"),
          ("model_bench_graph_segments.json", "**CUDA graph, after the linear kernels' state passes went into "
           "segments** (`model_bench_graph_segments.json`: `python benchmarks/model_bench.py --device cuda --dtype "
           "bfloat16 --cuda-graph --lengths 1024,4096,16384 --methods linear,performer --originals sdpa`, one "
           "interleaved run; `ops/linear_triton.py` `segment_len`):", "CUDA graph with segments"),
          ("model_bench_graph_favor_gqa.json", "**CUDA graph, after FAVOR+'s Triton feature map and the causal "
           "kernels' kv-head states** (`model_bench_graph_favor_gqa.json`: the same command, commit 6666ffd; "
           "`ops/favor_triton.py`, `ops/linear_triton.py`):", "CUDA graph, FAVOR+ kernel and "
           "kv-head states"),
          ("model_bench_graph_favor_bwd.json", "**CUDA graph, after FAVOR+'s backward became a kernel too** "
           "(`model_bench_graph_favor_bwd.json`: the same command with `--methods performer`, commit fa4bc38):",
           "CUDA graph, FAVOR+ forward and backward kernels"),
          ("model_bench_graph_linear_map.json", "**CUDA graph, linear with its elementwise map inside the kernels** "
           "(`model_bench_graph_linear_map.json`: `python benchmarks/model_bench.py --cuda-graph --lengths "
           "1024,4096,16384 --methods linear --modes fwd,fwd+bwd`, commit 0f612e0):", "CUDA graph, in-kernel map"),
          ("model_bench_graph_global_sparse_triton.json", "**CUDA graph, global_sparse on the Triton block kernels** "
           "(`model_bench_graph_global_sparse_triton.json`: `python benchmarks/model_bench.py --device cuda --dtype "
           "bfloat16 --lengths 4096,8192,16384 --methods global_sparse@flex,global_sparse,window --originals sdpa "
           "--modes fwd,fwd+bwd --cuda-graph --narrow-backward`, commit 0a2f224; the synthetic 90%-pruned "
           "pattern with its sinks and band; `global_sparse` is the default, now `ops/window_triton.py` with block "
           "tables; `@flex` the FlexAttention path, its backward on 64-token blocks):",
           "CUDA graph, global_sparse: Triton vs Flex"),
          ("model_bench_graph_window_bounds.json", "**CUDA graph, window with the band's two-bound mask** "
           "(`model_bench_graph_window_bounds.json`: `python benchmarks/model_bench.py --device cuda --dtype "
           "bfloat16 --cuda-graph --lengths 1024,4096,16384 --methods window --originals sdpa --modes "
           "fwd,fwd+bwd --budget-s 120`, commit 4004224, one interleaved run; `window_triton.BAND`):",
           "CUDA graph, window two-bound mask"),
          ("model_bench_graph_layouts.json", "**CUDA graph, q, k, v read and the output written in transformers' "
           "layout** (`model_bench_graph_layouts.json`: `python benchmarks/model_bench.py --device cuda --dtype "
           "bfloat16 --cuda-graph --lengths 1024,4096,16384 --methods window,linear,performer --originals sdpa "
           "--modes fwd,fwd+bwd --budget-s 200`, commit 42ce912, one interleaved run; no copies of q, k, v or the "
           "output a layer):",
           "CUDA graph, caller's layout"),
          ("model_bench_graph_parallel_bwd.json", "**CUDA graph, linear's short-input passes reworked** "
           "(`model_bench_graph_parallel_bwd.json`: the same command, commit 9760bac: the parallel forward's "
           "walk without an inner loop and with 128-token key tiles, the parallel backward per kv head in the "
           "caller's layout; `model_bench/h200/short_calls.json` times each call alone):",
           "CUDA graph, linear parallel passes"),
          ("model_bench_graph_saved_states.json", "**CUDA graph, the chunked backward reading the forward's "
           "states** (`model_bench_graph_saved_states.json`: the same command with `--methods linear,performer`, "
           "commit 8c57186: no second state walk in the backward, O(T F D / 64) memory kept per layer):",
           "CUDA graph, states kept for the backward"),
          ("model_bench_graph_kv_backward.json", "**CUDA graph, the chunked backward per kv head** "
           "(`model_bench_graph_kv_backward.json`: the same command, the working tree of 95e54ae but for a "
           "docstring: the reverse walk and dk, dv per kv head over its group, no expanded k, v and no group "
           "sums):", "CUDA graph, chunked backward per kv head"),
          ("model_bench_graph_fused_bwd_map_on_load.json", "**CUDA graph, window's backward in two launches** "
           "(`model_bench_graph_fused_bwd_map_on_load.json`: `python benchmarks/model_bench.py --device cuda "
           "--dtype bfloat16 --cuda-graph --lengths 1024,4096,16384 --methods linear,window --originals sdpa "
           "--modes fwd,fwd+bwd --budget-s 230`, the window of 1d2e1b4; its linear rows are a discarded working "
           "tree that mapped q and k on load inside every backward kernel's walk, 1.25x at 1024):",
           "CUDA graph, window backward in two launches"),
          ("model_bench_graph_map_bwd.json", "**CUDA graph, linear's map inside the kernels with gradients** "
           "(`model_bench_graph_map_bwd.json`: the same command with `--methods linear --budget-s 190`, commit "
           "dd51f8f: the forward maps raw q, k on load, the backward maps them once in one launch and applies "
           "the slope to dq, dk in its kernels):", "CUDA graph, linear map with gradients"),
          ("model_bench_graph_performer_one_node.json", "**CUDA graph, performer as one node on two streams** "
           "(`model_bench_graph_performer_one_node.json`: the same command with `--methods linear,performer "
           "--budget-s 170`, commit d3ef41c: FAVOR+'s map and the causal kernels in one autograd node, the "
           "launches that do not wait on each other on two streams; the map's forward in one tile of 256 "
           "features, its tensors in the layouts the next kernel reads; the reverse walk by `reverse_walk`'s "
           "rule):", "CUDA graph, performer one node"),
          ("model_bench_graph_chunk_max.json", "**CUDA graph, the chunk maxima in one launch** "
           "(`model_bench_graph_chunk_max.json`: the same command with `--budget-s 150`, commit 1735bac: the key "
           "log-scales' chunk maxima from one Triton launch, not five PyTorch kernels, on the forward's critical "
           "path):", "CUDA graph, chunk maxima in one launch"),
          ("model_bench_graph_dk_blocks.json", "**CUDA graph, dk over feature blocks** "
           "(`model_bench_graph_dk_blocks.json`: the same command with `--lengths 1024,4096 --budget-s 90`, the "
           "working tree of 3318b01: the chunked backward's dk, dv pass on a program per feature block, dv in "
           "block 0's):", "CUDA graph, dk over feature blocks"),
          ("model_bench_graph_edges_segments.json", "**CUDA graph, window masks on edge tiles, shorter segments** "
           "(`model_bench_graph_edges_segments.json`: `python benchmarks/model_bench.py --device cuda --dtype "
           "bfloat16 --cuda-graph --lengths 1024,4096,16384 --methods window,linear,performer --originals sdpa "
           "--modes fwd,fwd+bwd --budget-s 170`, one interleaved run; the window kernel masking only the band's "
           "edge tiles, `window_triton.BAND = \"edges\"`; the state walks in segments of about sqrt(n / 4) "
           "chunks, `linear_triton.segment_len`; measured before the window forward's register cap of 23c89ac, "
           "which made that kernel ~10% shorter at 16k-64k; the next table is the run after it):",
           "CUDA graph, edge masks and shorter segments"),
          ("model_bench_graph_own_p_value_blocks.json", "**CUDA graph, the window forward's register cap, the state "
           "pass finding the chunk maxima, wider value blocks** (`model_bench_graph_own_p_value_blocks.json`: the "
           "same command, commit 382f801, one interleaved run (the run on 42e11c3, whose walks of 64 columns counted "
           "as one walk in `segment_len`: `performer_1k_experiments/final_model_bench_42e11c3.json`, within 1%); `window_triton.CONFIG[\"fwd\"]` with `maxnreg`, "
           "`linear_triton.OWN_P` (no launch of its own for the key log-scales' chunk maxima) and "
           "`linear_triton.state_bv` (64 value columns a walk for FAVOR+'s forward and the per-kv-head reverse "
           "walk); `performer_1k_experiments/` times each call alone):",
           "CUDA graph, register cap, chunk maxima in the walk, value blocks"),
          ("model_bench_graph_grad_layouts.json", "**CUDA graph, linear's chunked form under gradients from 1024 "
           "tokens, gradients in the inputs' layouts** (`model_bench_graph_grad_layouts.json`: the same command "
           "with `--budget-s 150`, the working tree of c00ee71, one interleaved run; `linear_triton.PARALLEL_GRAD_MAX_T` "
           "(the quadratic passes with gradients only up to 512 tokens) and gradients from `torch.empty_like` (dq, dk, dv "
           "written as transformers' [B, T, H, D] memory: no copy kernels on their way back); `grad_layouts/` "
           "and `grad_rule/` hold the profiles):", "CUDA graph, chunked under gradients, gradient layouts"),
          ("model_bench_graph_after_limits.json", "**CUDA graph, after the kernels' size limits** "
           "(`model_bench_graph_after_limits.json`: the same command with `--budget-s 100`, the tree of 3f0ef8c, "
           "one interleaved run, 2026-12-05: every Triton entry point checks its rows against 32-bit offsets and "
           "CUDA's grid rows before launching, `ops/limits.py`; the step moved by at most 0.4% against the table "
           "above):", "CUDA graph, after the size limits"),
          ("model_bench_graph_window_bwdcap.json", "**CUDA graph, window's backward with its registers capped** "
           "(`model_bench_graph_window_bwdcap.json`: the same command with `--methods window`, commit 751e8ba, "
           "one interleaved run, 2026-12-05: `window_triton.CONFIG[\"bwd\"]` with `maxnreg=168`, 7.9% off the "
           "kernel's causal fwd+bwd at 64k; at these lengths the step moved by under 0.5%):",
           "CUDA graph, window backward capped"))


GRAPH_PROSE = {name: (prose, label) for name, prose, label in GRAPH_RUNS}


def _graph_tables(name: str, prose: str, label: str) -> list[str]:
    """A CUDA-graph model_bench file's fwd and fwd+bwd tables against the original's graph, under `prose`."""
    if not (MODEL_DIR / name).exists():
        return []
    rows, out = json.load(open(MODEL_DIR / name)), [prose, ""]
    for mode in ("fwd", "fwd+bwd"):
        out += _model_mode_table(rows, "original-sdpa+graph", mode, f"*{label}, {mode}*")
    return out


def model_table() -> str:
    """SmolLM2-135M model level on the H200: each swapped method against the original model (sdpa), interleaved
    step by step in one process; the crossover length per method; the profile of one step; regional compile."""
    f = MODEL_DIR / "model_bench_1k_32k.json"  # the latest run of the first tables' command (model_bench.json's)
    if not f.exists():
        return ""
    rows = json.load(open(f))
    base = "original-sdpa"
    cmd = rows[0].get("command", "").replace("python3 ", "python ")
    out = [f"NVIDIA H200, bf16, batch 1, `{cmd.split(' --out')[0]}` (`model_bench/h200/model_bench_1k_32k.json`, "
           "2026-12-06, the tree of e9f11cb; [`model_bench/h200/`](benchmarks/results/model_bench/h200/), results "
           "README there, also for the first run of this command, `model_bench.json`, before the kernels' later work). "
           "Every configuration's model is resident and their steps interleave (the r-th "
           "step of each, then the next), so host drift hits all alike. ms / peak GiB, in brackets time vs the "
           "original model; `global_sparse` is a synthetic 64-token-block pattern with 90% of the blocks pruned "
           "(cost depends on the kept count and layout, not on which text chose them); `block_sparse` is BigBird's "
           "recipe at its length defaults. fwd's peak is the logits "
           "(tokens x 49152 vocabulary), the same for every method. Crossover: the shortest measured length from "
           "which the method is faster than the original at every longer one. Eager steps: below 16k tokens the host "
           "issuing kernels is the bottleneck (the CUDA-graph tables below are the kernels' cost).", ""]
    for mode in ("fwd", "fwd+bwd"):
        out += _model_mode_table(rows, base, mode, f"**SmolLM2-135M {mode}**")
    long = MODEL_DIR / "model_bench_long.json"
    if long.exists():
        lr = json.load(open(long))
        lcmd = lr[0].get("command", "").replace("python3 ", "python ").split(" --out")[0]
        out += [f"**Long inputs** (`model_bench_long.json`: `{lcmd}`, commit "
                f"{lr[0].get('commit') or 'in the folder README'}, one interleaved run; eager steps: from 16k tokens "
                "the host is not the bottleneck; `oom`: the step did not fit in the H200's memory):", ""]
        for mode in ("fwd", "fwd+bwd"):
            out += _model_mode_table(lr, base, mode, f"*long inputs, {mode}*")
            lens = sorted({r["seq_len"] for r in lr if r["mode"] == mode})
            none = [n for n in lens if all(r["status"] == "oom" for r in lr if r["mode"] == mode and r["seq_len"] == n)]
            if none:  # a length no row fitted at has no column: say so
                out += [f"(at {', '.join(map(str, none))} tokens every {mode} row was `oom`, the original's too: "
                        "not in the table)", ""]
    latest = ("**Each step captured as one CUDA graph, the latest run of window, linear and performer together** "
              "(`--cuda-graph`, `model_bench_graph_after_limits.json`: `python benchmarks/model_bench.py --device cuda "
              "--dtype bfloat16 --cuda-graph --lengths 1024,4096,16384 --methods window,linear,performer --originals sdpa "
              "--modes fwd,fwd+bwd --budget-s 100`, the tree of 3f0ef8c, one interleaved run, 2026-12-05; window's run "
              "after its backward's register cap, 751e8ba, moved its step by under 0.5%). A replay launches "
              "the whole step at once: no Python, no per-kernel launch cost, so this is what the kernels cost. "
              "transformers' mask is decided outside the capture (`adapters/hf.py` `mask_outside_capture`); peak "
              "memory is what the capture allocated. Every earlier graph run, each with the change it measured, is in "
              "[docs/speed.md](docs/speed.md#model-level-every-run).")
    out += _graph_tables("model_bench_graph_after_limits.json", latest, "CUDA graph")
    out += _graph_tables("model_bench_graph_global_sparse_triton.json",
                         *GRAPH_PROSE["model_bench_graph_global_sparse_triton.json"])
    gsb = MODEL_DIR / "model_bench_global_sparse_bwd.json"
    if gsb.exists():
        out += _model_mode_table(json.load(open(gsb)), base, "fwd+bwd", "**global_sparse fwd+bwd** (`model_bench_"
                                 "global_sparse_bwd.json`, its own interleaved run beside the original; the backward "
                                 "runs 128-token Flex blocks over the 64-token pattern: the sparsify section's notes on fwd+bwd)")
    gsn = MODEL_DIR / "model_bench_global_sparse_bwd_narrow.json"
    if gsn.exists():
        out += _model_mode_table(json.load(open(gsn)), base, "fwd+bwd", "**global_sparse fwd+bwd with "
                                 "`enable_narrow_backward`** (`model_bench_global_sparse_bwd_narrow.json`, "
                                 "`model_bench.py --narrow-backward`: the backward runs the pattern's 64-token blocks)")
    return "\n".join(out)


def model_history() -> str:
    """docs/speed.md's model-level record: the profile of one eager step, every CUDA-graph run in the order they
    were made (each with the change it measured), regional compile."""
    out = []
    prof = MODEL_DIR / "model_bench_profile.json"
    if prof.exists():
        pr = [r for r in json.load(open(prof)) if r["status"] == "ok"]
        out += ["**One fwd step, profiled** (`model_bench_profile.json`, an earlier run with `--profile`, configurations "
                "one after another, not interleaved, so its wall times carry the host's drift; global_sparse there "
                "still ran 128-token Flex blocks over its 64-token pattern, before `flex_block_for`): wall ms, the "
                "device's kernel time, the host's time under cProfile (which slows the host), the largest kernel:", "",
                "| impl | tokens | wall ms | device busy ms | host ms | largest kernel (ms for 30 layers) |",
                "|---|---|---|---|---|---|"]
        for r in pr:
            k = r.get("top_kernels") or [["-", 0, 0]]
            out.append(f"| {r['impl']} | {r['seq_len']} | {r['ms']:.1f} | {r.get('busy_ms', 0):.1f} | "
                       f"{r.get('host_ms', 0):.1f} | `{k[0][0][:40]}` {k[0][1]:.1f} |")
        out.append("")
    for name, prose, label in GRAPH_RUNS:
        out += _graph_tables(name, prose, label)
    comp = MODEL_DIR / "model_bench_compile.json"
    if comp.exists():
        cr = json.load(open(comp))
        out += ["**Regional torch.compile** (`--compile`, `model_bench_compile.json`: each decoder layer compiled, the "
                "methods outside the graph, one break per layer):", ""]
        for mode in ("fwd", "fwd+bwd"):
            out += _model_mode_table(cr, "original-sdpa+compile", mode, f"*regional compile, {mode}*")
    return "\n".join(out)


def compare_block(task: str) -> str:
    """The `attnlab compare` table of docs/compare-<task>.json, headed by what produced it."""
    import sys

    sys.path.insert(0, str(HERE.parent / "src"))
    from attnlab.eval.tasks import get

    res = json.loads((HERE.parent / "docs" / f"compare-{task}.json").read_text())
    env = res.get("environment", {})
    head = (f"{_ran(res)}; {res['model']}, {res['dtype']}, "
            f"{res['setup']}; {env.get('device_name') or env.get('device')} ({env.get('cpu_threads', '?')} threads), "
            f"torch {env.get('torch_version', '?')}, transformers {env.get('transformers_version', '?')}; "
            f"{res['elapsed_s']:.0f} s. JSON: [`docs/compare-{task}.json`](docs/compare-{task}.json).")
    return head + "\n\n```\n" + get(task).table(res["rows"]) + "\n```"


MOVED = {"benchmarks/results/gpu_sweep/": "benchmarks/results/history/h100/gpu_sweep/"}  # result folders moved since


def _ran(res: dict) -> str:
    """The command and commit that made a committed result (a path it read that has moved since is shown where it
    is now, so the command still runs from a clean checkout)."""
    cmd = res["command"]
    moved = [new for old, new in MOVED.items() if old in cmd]
    for old, new in MOVED.items():
        cmd = cmd.replace(old, new)
    return f"`{cmd}` at commit `{res.get('commit') or 'unknown'}`" + (" (input path as moved since)" if moved else "")


def _where(env: dict) -> str:
    return f"{env.get('device_name')} ({env.get('cpu_threads')} threads)"


def _files(rel: Path, plot: str | None = "plot", sep: str = ", ") -> str:
    """Links to a result's JSON and (unless plot is None) to the PNG beside it, named `plot`."""
    png = rel.with_suffix(".png")
    return f"JSON: [`{rel}`]({rel})" + (f"{sep}{plot}: [`{png}`]({png})" if plot else "")


def distill_rows() -> list[dict]:
    """Every distillation result row committed under benchmarks/results/distill/ (result.json-shaped)."""
    rows = []
    for f in sorted(glob.glob(str(HERE / "results" / "distill" / "**" / "*.json"), recursive=True)):
        data = json.load(open(f))
        for r in data if isinstance(data, list) else [data]:
            if isinstance(r, dict) and "kl_before" in r and r.get("status", "ok") == "ok":
                rows.append({**r, "_file": str(Path(f).relative_to(HERE.parent))})
    return rows


def distill_block() -> str:
    rows = distill_rows()
    head = ("| method | options | density | trainable params | tokens seen | held-out KL before -> after | ppl (original) "
            "before -> after | top-1 after | attn MSE after | grad cos after | tokens/s | device | JSON |")
    lines = ["Generated by `python benchmarks/make_readme_tables.py` from `benchmarks/results/distill/**.json`; the "
             "commands are in the README beside each file.", "", head, "|" + "---|" * 13]
    for r in rows:
        opts = ", ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items() if k not in ("seed",))
        lora = max([rule.get("lora", 0) for rule in (r.get("spec") or {}).get("rules", [])] or [0])
        opts += f"; + adapters of rank {lora} (--lora)" if lora else ""
        dens = "-" if r.get("density") is None else f"{r['density']:.3f}"
        dev = (r.get("environment") or {}).get("device_name") or r.get("device")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['method']} | {opts} | {dens} | {r['trainable_params']:,} | {r['tokens']:,} | "
            f"{r['kl_before']:.3g} -> {r['kl_after']:.3g} ({r['kl_after'] / r['kl_before'] * 100:.0f}%) | "
            f"({r['ppl_base']:.1f}) {r['ppl_before']:.4g} -> {r['ppl_after']:.4g} | {r['top1_after']:.3f} | "
            f"{fmt(r.get('attn_mse'), '.2e')} | {fmt(r.get('grad_cos'), '.3f')} | {fmt(r.get('tokens_per_s'), '.0f')}"
            f"{' (GPU shared by ' + str(r['concurrent_processes']) + ')' if r.get('concurrent_processes') else ''} | "
            f"{dev} | [{Path(r['_file']).name}]({r['_file']}) |")
        for b in r.get("baselines") or []:
            lines.append(f"| window (baseline) | {', '.join(f'{k}={v}' for k, v in b['options'].items())} | "
                         f"{b['density']:.3f} | 0 | - | {b['kl']:.3g} | {b['ppl']:.4g} | {b['top1']:.3f} | "
                         f"{fmt(b.get('attn_mse'), '.2e')} | {fmt(b.get('grad_cos'), '.3f')} | - | {dev} | same run |")
    return "\n".join(lines)


def vision_block() -> str:
    """One row per method: its complexity (from the method class), the patch-4 training run and the patch-1 cost
    probe of benchmarks/results/vision/h200/ (ratios within one run's patch size, from `summary_rows`)."""
    import sys

    sys.path.insert(0, str(HERE.parent / "src"))
    from attnlab import registry
    from attnlab.vision.report import load_rows
    from attnlab.vision.train import summary_rows

    folder = HERE / "results" / "vision" / "h200"
    files = sorted(glob.glob(str(folder / "*.json")) + glob.glob(str(folder / "*.jsonl")))
    files = [f for f in files if not (f.endswith(".jsonl") and Path(f).with_suffix(".json").exists())]
    from attnlab.vision.train import FROM_SCRATCH

    short = [f for f in files if "patch1-8k" in f]  # patch 1 trained briefly: its accuracy column only
    longer = [f for f in files if "30ep" in Path(f).name]  # 30 epochs (some side by side on one GPU): accuracy only
    rows = summary_rows(load_rows([f for f in files if f not in short and f not in longer and "patch1-16k" not in f]))

    def as_run_now(r):  # accuracy columns show each method in the form `attnlab vision` trains it now
        return "error" not in r and all(r.get("options", {}).get(k) == v for k, v in FROM_SCRATCH.get(r["method"], {}).items())

    p1_acc = {r["method"]: r for r in load_rows(short) if as_run_now(r)}
    long_acc = {r["method"]: r for r in load_rows(longer) if as_run_now(r)}
    long_epochs = next(iter(long_acc.values()))["epochs"] if long_acc else None
    long_base = long_acc.get("sdpa", {}).get("test_accuracy")
    for r in long_acc.values():
        r["vs_sdpa"] = None if long_base is None else r["test_accuracy"] - long_base
    by = {(r["method"], r["patch"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    p4 = next(r for r in rows if r["patch"] == 4 and "error" not in r)
    p1 = next(r for r in rows if r["patch"] == 1 and "error" not in r)
    fmt = lambda r, k, f: "-" if r is None or r.get(k) is None else format(r[k], f)  # noqa: E731
    lines = [f"Generated by `python benchmarks/make_readme_tables.py` from `{folder.relative_to(HERE.parent)}/` (commands "
             f"and commit in its README.md); NVIDIA H200, bf16 autocast. Patch 4: {p4['train_images']:,} training "
             f"images, {p4['epochs']} epochs. Patch 1: a cost probe ({p1['train_images']:,} images, {p1['epochs']} "
             "epochs: its accuracy means nothing). s/epoch: mean of the epochs after the first (which pays "
             "compilation); time and memory ratios are to sdpa (flash) or dense (explicit softmax, the \"vanilla "
             "Transformer\" of LRA) in the same run; \"-\" where the method ran in another run than sdpa (its s/epoch "
             "stands; no ratio across runs). Patch 1 acc: a short run (8,192 training images, 4 epochs, "
             "2,048 test images; `patch1-8k-4ep.json`): far from converged, it shows which methods learn fastest "
             "at 785 tokens, not where they end." + (
                 f" Patch 4, {long_epochs} epochs: the same settings trained longer, in processes side by side on "
                 "one H200 (`patch4-30ep-*.jsonl`: accuracy only, their epoch times share the GPU)." if long_acc else "")
             + " Accuracy columns show each method as `attnlab vision` trains it now (rfa: `normalize=True`); time "
               "and memory columns may come from an earlier form (rfa's patch-1 probe ran its plain form, of the "
               "same cost order).", "",
             f"| method | time | memory | options (patch 4; patch 1) | patch 4: test acc ({p4['epochs']} ep) | vs sdpa | "
             f"s/epoch | time / sdpa | mem / sdpa | patch 4: test acc ({long_epochs} ep) | vs sdpa | "
             "patch 1 acc (short) | patch 1: time / sdpa | mem / sdpa | time / dense | peak GiB |", "|" + "---|" * 16]
    skip = ("backend", "seed", "redraw", "learn_features", "init", "share_kv", "per_head", "layout", "shared_qk",
            "pinv", "pinv_iters", "conv_kernel", "chunk_size", "max_len")

    def opts(r):
        if r is None or "options" not in r:
            return "-"
        return ", ".join(f"{k}={v}" for k, v in r["options"].items() if k not in skip and v is not None) or "-"

    for m in methods:
        t, mem, note = registry.get(m).complexity
        a, b = by.get((m, 4)), by.get((m, 1))
        a = None if a is None or "error" in a else a
        b = None if b is None or "error" in b else b
        acc = "not run" if a is None else (f"{a['test_accuracy']:.4f}" if as_run_now(a) else "other form")
        lines.append(f"| {m} | {t} | {mem}{' (' + note + ')' if note else ''} | {opts(a)}; {opts(b)} | {acc} | "
                     f"{fmt(a if a and as_run_now(a) else None, 'accuracy_vs_sdpa', '+.4f')} | {fmt(a, 'epoch_s', '.2f')} | "
                     f"{fmt(a, 'time_ratio_sdpa', '.2f')} | {fmt(a, 'mem_ratio_sdpa', '.2f')} | "
                     f"{fmt(long_acc.get(m), 'test_accuracy', '.4f') if m in long_acc else 'not finished'} | "
                     f"{fmt(long_acc.get(m), 'vs_sdpa', '+.4f')} | "
                     f"{fmt(p1_acc.get(m), 'test_accuracy', '.4f')} | "
                     f"{fmt(b, 'time_ratio_sdpa', '.2f')} | {fmt(b, 'mem_ratio_sdpa', '.2f')} | "
                     f"{fmt(b, 'time_ratio_dense', '.2f')} | "
                     f"{'-' if b is None else format(b['peak_mem_bytes'] / 2 ** 30, '.1f')} |")
    return "\n".join(lines)


def sparsify_block() -> str:
    """Every committed `attnlab sparsify` result: global sparse beside window + sinks at each pruned fraction."""
    lines = []
    for f in sorted(glob.glob(str(HERE / "results" / "sparsify" / "*" / "sparsify.json"))):
        res = json.loads(Path(f).read_text())
        env = res["environment"]
        rel = Path(f).relative_to(HERE.parent)
        lines += [""] if lines else []
        lines += [f"{_ran(res)}; {_where(env)}, {res['eval_windows']} held-out windows x {res['seq_len']} tokens "
                  f"of {res['eval_text']}, {res['block_size']}-token blocks. " + _files(rel, None) + ".", "",
                  "| pruned (requested) | budget per | global sparse: density | ppl | KL | top-1 | window + sinks: window "
                  "| density | ppl | KL | top-1 |", "|" + "---|" * 11]
        rows = res["rows"]
        for g in (r for r in rows if r["technique"] == "global_sparse"):
            w = next((r for r in rows if r["technique"] == "window_sinks" and r["fraction"] == g["fraction"]), None)
            wcells = (f"{w['options']['window']} | {w['density']:.3f} | {w['ppl']:.2f} | {w['kl']:.4f} | {w['top1']:.3f}"
                      if w else "- | - | - | - | -")
            per = g.get("share") or "head"
            if g.get("budget") == "sensitivity":
                per += f", layers by sensitivity^{g['options']['alpha']:g}"
            lines.append(f"| {g['fraction']:.0%} | {per} | {g['density']:.3f} | {g['ppl']:.2f} | "
                         f"{g['kl']:.4f} | {g['top1']:.3f} | {wcells} |")
        lines.append(f"\nOriginal model: ppl {rows[0]['ppl_original']:.2f}.")
        cost = [c for c in res.get("cost") or () if c.get("status") == "ok"]
        if cost:
            base = {c["mode"]: c for c in cost if c["technique"] == "original"}
            narrow = "; global_sparse's backward on 64-token blocks, `--narrow-backward`" if res.get("narrow_backward") else ""
            graph = ("; each step captured as a CUDA graph and its replays timed, `--cuda-graph`: the device work "
                     "without the host; memory is what the step allocates beyond the weights and inputs already "
                     "resident" if res.get("cuda_graph") else "")
            mem = "extra_mem_bytes" if res.get("cuda_graph") else "peak_mem_bytes"
            lines += ["", f"The model's layers at {res['seq_len']} tokens, batch 1 (`--cost`; the vocabulary head left "
                          f"out{narrow}{graph}):", "",
                      "| technique | pruned | mode | ms | x original | "
                      + ("MiB the step allocates" if res.get("cuda_graph") else "peak MiB") + " | x original |",
                      "|" + "---|" * 7]
            for c in cost:
                b = base.get(c["mode"])
                frac = "-" if c["fraction"] is None else f"{c['fraction']:.0%}"
                share = (c.get("options") or {}).get("share")
                budget = (c.get("options") or {}).get("budget")
                tech = (f"{c['technique']} ({share}" + (f", {budget})" if budget else ")")) if share else \
                    {"original_eager": "original, eager attention (T x T kept)"}.get(c["technique"], c["technique"])
                lines.append(f"| {tech} | {frac} | {c['mode']} | {c['ms']:.2f} | "
                             f"{format(c['ms'] / b['ms'], '.2f') if b else '-'} | {c[mem] / 2**20:.0f} | "
                             f"{format(c[mem] / b[mem], '.2f') if b else '-'} |")
    return "\n".join(lines) or "(no committed result)"


def scan_block() -> str:
    """Every committed `attnlab scan` result (cpu, then GPU): per method, KL by layer (sorted) and the heat map."""
    files = sorted(glob.glob(str(HERE / "results" / "scan" / "*" / "scan.json")), key=lambda f: "/cpu/" not in f)
    return "\n\n".join(_scan_table(Path(f)) for f in files) or "(no committed result)"


def _scan_table(f: Path) -> str:
    res = json.loads(f.read_text())
    env = res["environment"]
    rel = f.relative_to(HERE.parent)
    where = _where(env) if env.get("device") == "cpu" else env.get("device_name")
    lines = [f"{_ran(res)}; {res['model']}, {res['windows']} held-out windows x {res['seq_len']} tokens of "
             f"{res['text']}; {where}, {res['elapsed_s']:.0f} s. " + _files(rel, "heat map", sep="; ") + ".", "",
             "| method | options | KL, whole range (min / median / max) | 5 least sensitive layers | 5 most sensitive layers |",
             "|---|---|---|---|---|"]
    rows = res["rows"]
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["kl"])
        opts = ", ".join(f"{k}={v}" for k, v in rs[0]["options"].items() if k not in ("backend", "seed")) or "-"
        fmt = lambda sel: ", ".join(f"{r['layer']} ({r['kl']:.2g})" for r in sel)  # noqa: E731
        lines.append(f"| {m} | {opts} | {rs[0]['kl']:.2g} / {rs[len(rs) // 2]['kl']:.2g} / {rs[-1]['kl']:.2g} | "
                     f"{fmt(rs[:5])} | {fmt(rs[::-1][:5])} |")
    return "\n".join(lines)


def prune_block() -> str:
    """Every committed `attnlab prune` result: per technique, the metric at each fraction of tokens kept."""
    lines = []
    for f in sorted(glob.glob(str(HERE / "results" / "prune" / "*" / "*" / "prune.json"))):
        res = json.loads(Path(f).read_text())
        env, rel, rows = res["environment"], Path(f).relative_to(HERE.parent), res["rows"]
        spam = res["task"] == "spam"
        keeps = sorted({r["keep"] for r in rows[1:] if r["keep"] is not None}, reverse=True)
        took = "" if res.get("elapsed_s") is None else f", {res['elapsed_s']:.0f} s"
        lines += [f"{_ran(res)}; {_where(env)}{took}; setup {res['setup']}. " + _files(rel) + ".", ""]
        what = "test accuracy (speed-up of the test pass)" if spam else "continuation KL (ppl)"
        base = rows[0]
        lines.append(f"| technique: {what} | " + " | ".join(f"keep {k:.0%}" for k in keeps) + " |")
        lines.append("|---|" + "---|" * len(keeps))
        lines.append(f"| all tokens | {base['accuracy']:.4f} (1.00x) |" if spam else
                     f"| all tokens | 0 ({base['ppl']:.2f}) |")
        for tech in dict.fromkeys(r["technique"] for r in rows[1:]):
            by = {r["keep"]: r for r in rows if r["technique"] == tech}
            cell = (lambda r: f"{r['accuracy']:.4f} ({r['speedup']:.2f}x)") if spam else \
                (lambda r: f"{r['kl']:.3f} ({r['ppl']:.2f})")
            lines.append(f"| {tech} | " + " | ".join(cell(by[k]) if k in by else "-" for k in keeps) + " |")
        lines.append("")
    return "\n".join(lines).strip() or "(no committed result)"


def advise_block() -> str:
    """The committed `attnlab advise` result: verified path points, single methods, the recommendation."""
    lines = []
    for f in sorted(glob.glob(str(HERE / "results" / "advise" / "*" / "advise.json"))):
        res = json.loads(Path(f).read_text())
        env, rel = res["environment"], Path(f).relative_to(HERE.parent)
        lines += [f"{_ran(res)}; {res['model']}, {res['windows']} "
                  f"held-out windows x {res['seq_len']} tokens; one attention layer timed at {res['cost_len']} tokens on "
                  f"{res.get('cost_source') or env.get('device_name')} (one layer, ms: "
                  + ", ".join(f"{m} {c['ms']:.3g}" for m, c in res["costs"].items()) +
                  f"), {res['elapsed_s']:.0f} s. " + _files(rel) + ".", "",
                  "| choice | layers switched | KL, scan sum | KL, whole model | top-1 | ppl | attention time vs original |",
                  "|---|---|---|---|---|---|---|"]
        rec = res.get("recommended") or {}
        for v in res["verified"]:
            mark = " **(recommended)**" if v["step"] == rec.get("step") else ""
            lines.append(f"| greedy path, step {v['step']}{mark} | {v['switched']} | {v['kl_est']:.4f} | {v['kl']:.4f} | "
                         f"{v['top1']:.3f} | {v['ppl']:.2f} | {v['time_ratio']:.2f}x |")
        for sgl in res["singles"]:
            lines.append(f"| {sgl['method']} in every layer | all | - | {sgl['kl']:.4f} | {sgl['top1']:.3f} | "
                         f"{sgl['ppl']:.2f} | {sgl['time_ratio']:.2f}x |")
        lines.append("")
    return "\n".join(lines).strip() or "(no committed result)"


def press_block() -> str:
    """Every committed `attnlab press` result: KL (ppl) per press and evicted fraction."""
    lines = []
    for f in sorted(glob.glob(str(HERE / "results" / "press" / "*" / "press.json"))):
        res = json.loads(Path(f).read_text())
        env, rel, rows = res["environment"], Path(f).relative_to(HERE.parent), res["rows"]
        evicts = sorted({r["evict"] for r in rows[1:]})
        lines += [f"{_ran(res)}; {res['model']}, {res['windows']} "
                  f"held-out windows, prompt {res['prompt_len']} + {res['seq_len'] - res['prompt_len']} continuation "
                  f"tokens; {_where(env)}, {res['elapsed_s']:.0f} s. " + _files(rel) + ".", "",
                  "| press: continuation KL (ppl) | " + " | ".join(f"{e:.0%} evicted" for e in evicts) + " |",
                  "|---|" + "---|" * len(evicts),
                  f"| full cache ({rows[0]['kv_bytes'] / 2**20:.1f} MiB) | " +
                  " | ".join(f"0 ({rows[0]['ppl']:.2f})" for _ in evicts) + " |"]
        for name in dict.fromkeys(r["technique"] for r in rows[1:]):
            by = {r["evict"]: r for r in rows if r["technique"] == name}
            lines.append(f"| {name} | " + " | ".join(f"{by[e]['kl']:.3f} ({by[e]['ppl']:.2f})" if e in by else "-"
                                                     for e in evicts) + " |")
        lines.append("")
    return "\n".join(lines).strip() or "(no committed result)"


def kvpress_block() -> str:
    """attnlab's presses beside kvpress's of the same name, one run (benchmarks/kvpress_side_by_side.py)."""
    lines = []
    for f in sorted(glob.glob(str(HERE / "results" / "press" / "*" / "kvpress*.json")),
                    key=lambda f: (Path(f).name != "kvpress.json", f)):  # the full comparison first
        res = json.loads(Path(f).read_text())
        env, rel, rows = res["environment"], Path(f).relative_to(HERE.parent), res["rows"]
        ratios = sorted({r["ratio"] for r in rows if r["library"] != "none"})
        full = next(r for r in rows if r["library"] == "none")
        lines += [f"{_ran(res)}; {res['model']}, {full['windows']} "
                  f"held-out windows, prompt {full['prompt_len']} + {full['seq_len'] - full['prompt_len']} continuation "
                  f"tokens; kvpress {full['kvpress_version']}, transformers {full['transformers_version']}; "
                  f"{_where(env)}, {res['elapsed_s']:.0f} s. "
                  + _files(rel, "plot" if Path(f).with_suffix(".png").exists() else None) +
                  f". Full cache: ppl {full['ppl']:.2f}.", "",
                  "| press: KL (top-1), attnlab / kvpress | " + " | ".join(f"{x:.0%} evicted" for x in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for name in dict.fromkeys(r["press"] for r in rows if r["library"] != "none"):
            by = {(r["library"], r["ratio"]): r for r in rows if r["press"] == name}
            cell = lambda r: "-" if r is None else f"{r['kl_mean']:.4f} ({r['top1']:.3f})"  # noqa: E731
            lines.append(f"| {name} | " + " | ".join(f"{cell(by.get(('attnlab', x)))} / {cell(by.get(('kvpress', x)))}"
                                                     for x in ratios) + " |")
        ada = [r for r in rows if r["library"] == "attnlab" and r["press"].startswith("adakv_")]
        if ada:
            lines += ["", "attnlab's KV cache length after the press (layer 0: its largest head's count; the plain press keeps "
                          f"{full['prompt_len']} x (1 - ratio); kvpress keeps the whole "
                          f"prompt's {full['prompt_len']} and masks): " + "; ".join(
                              f"{r['press']} {r['ratio']:.0%}: {r['kept_tokens']}" for r in ada) + "."]
        lines.append("")
    return "\n".join(lines).strip() or "(no committed result)"


def decode_block() -> str:
    """Greedy decode tokens/s with a pressed cache (benchmarks/press_decode.py), per prompt length."""
    lines = []
    for f in sorted(glob.glob(str(HERE / "results" / "press" / "*" / "decode*.json"))):
        res = json.loads(Path(f).read_text())
        env, rel, rows = res["environment"], Path(f).relative_to(HERE.parent), res["rows"]
        lines += [f"{_ran(res)}; {res['model']}, batch 1, {res['new_tokens']} new tokens after a held-out prompt; "
                  f"{env.get('device_name')}. " + _files(rel, None) + ".", "",
                  "| prompt | regime | press | budget | KV MiB after the prompt | prefill + press s | decode tokens/s | "
                  "greedy tokens equal to the full cache's |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            budget = "-" if r["regime"] == "full" else (f"{r['evict']:.0%} evicted" if r["regime"] == "once"
                                                        else f"cache <= {r['max_cache']}")
            lines.append(f"| {r['prompt_len']} | {r['regime']} | {r['press'] or '-'} | {budget} | "
                         f"{r['kv_bytes'] / 2 ** 20:.1f} | {r['prefill_s']:.3f} | {r['decode_tok_s']:.1f} | "
                         f"{r['same_tokens']} of {res['new_tokens']} |")
        lines.append("")
    return "\n".join(lines).strip() or "(no committed result)"


def press_bounded_block() -> str:
    """Every committed bounded-cache `attnlab press --max-cache` result: KL (ppl) per press and cache bound."""
    lines = []
    for f in sorted(glob.glob(str(HERE / "results" / "press" / "*" / "press-bounded.json"))):
        res = json.loads(Path(f).read_text())
        env, rel, rows = res["environment"], Path(f).relative_to(HERE.parent), res["rows"]
        bounds = sorted({r["max_cache"] for r in rows})
        full = {r["max_cache"]: r for r in rows if r["technique"] == "full_cache"}
        lines += [f"{_ran(res)}; {res['model']}, {res['windows']} "
                  f"held-out windows of {res['seq_len']} tokens fed in chunks of {res['chunk']}; "
                  f"{_where(env)}, {res['elapsed_s']:.0f} s. " + _files(rel) + ".", "",
                  "| press: KL (ppl) after the first eviction | " + " | ".join(
                      f"cache <= {m} (from token {full[m]['from_position']})" for m in bounds) + " |",
                  "|---|" + "---|" * len(bounds),
                  "| full cache | " + " | ".join(f"0 ({full[m]['ppl']:.2f})" for m in bounds) + " |"]
        for name in dict.fromkeys(r["technique"] for r in rows if r["technique"] != "full_cache"):
            by = {r["max_cache"]: r for r in rows if r["technique"] == name}
            lines.append(f"| {name} | " + " | ".join(f"{by[m]['kl']:.3f} ({by[m]['ppl']:.2f})" if m in by else "-"
                                                     for m in bounds) + " |")
        lines.append("")
    return "\n".join(lines).strip() or "(no committed result)"


def harness_block() -> str:
    """Every committed `attnlab harness` result: lm-eval metric per task and variant."""
    lines = []
    for f in sorted(glob.glob(str(HERE / "results" / "harness" / "*" / "harness.json"))):
        res = json.loads(Path(f).read_text())
        env, rel, rows = res["environment"], Path(f).relative_to(HERE.parent), res["rows"]
        cols = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
        by = {(r["variant"], r["task"], r["metric"]): r for r in rows}
        lines += [f"{_ran(res)}; {res['model']}, lm-eval "
                  f"{res['lm_eval_version']}, {res['limit']} documents per task; {_where(env)}, "
                  f"{res['elapsed_s']:.0f} s. " + _files(rel) + ".", "",
                  "| variant | " + " | ".join(f"{t.removeprefix('attnlab_')} {m}" for t, m in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for v in dict.fromkeys(r["variant"] for r in rows):
            cells = []
            for t, m in cols:
                r = by.get((v, t, m))
                cells.append("-" if r is None else f"{r['value']:.3f}" + (f" ± {r['stderr']:.3f}" if r.get("stderr") else ""))
            opts = res["variants"].get(v)
            label = v if not opts else f"{v} ({', '.join(f'{k}={x}' for k, x in opts.items() if k != 'max_len')})"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).strip() or "(no committed result)"


def compress_block() -> str:
    """The merged H200 `attnlab compress` result (benchmarks/compress_results.py): held-out token accuracy per ratio,
    length and recipe; the codec's bytes per character beside gzip / bz2 / xz."""
    f = HERE / "results" / "compress" / "h200" / "compress.json"
    if not f.exists():
        return "(no committed result)"
    res, rel = json.loads(f.read_text()), f.relative_to(HERE.parent)
    calls = "; ".join(f"`{c['call']}` ({c['concurrent_runs']} runs side by side)" for c in res["calls"])
    commits = sorted({c["commit"] for c in res["calls"]})
    lines = [f"`{res['command']}` over the device calls {calls}, each `bash benchmarks/compress_gpu.sh` on one "
             f"{res['rows'][-1].get('device', 'GPU')} (code of commit(s) {', '.join(commits)} plus this change, "
             f"which added `attnlab compress`). " + _files(rel) + ".", "",
             "Held-out token accuracy (tail of Moby Dick, never trained on), one model per row serving every length:", "",
             "| ratio | recipe | seeds | 64 | 128 | 256 | 512 | tokens/s | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in res["runs"]:
        groups.setdefault((r["ratio"], r["steps"], r["latent_dim"], r["bias"]), []).append(r)
    for (ratio, steps, dim, bias), runs in sorted(groups.items(), key=lambda kv: (kv[0][3] != "distance", -kv[0][1], -kv[0][2], -kv[0][0])):
        finals = [r["evals"][-1] for r in runs]
        cells = []
        for n in ("64", "128", "256", "512"):
            vals = [e[n] for e in finals]
            cells.append(f"{sum(vals) / len(vals):.4f}" + (f" ± {(max(vals) - min(vals)) / 2:.4f}" if len(vals) > 1 else ""))
        recipe = f"{steps} steps, {dim}-d latents" + ("" if bias == "distance" else ", no distance bias (the paper's)")
        tps = sum(r["tokens_per_s"] for r in runs) / len(runs)
        lines.append(f"| 1/{1 / ratio:.3g} | {recipe} | {len(runs)} | " + " | ".join(cells) +
                     f" | {tps / 1e3:.0f}k | {max(r['peak_mem_bytes'] for r in runs) / 2**30:.1f} |")
    longest = max(r["steps"] for r in res["runs"])
    lines += ["", f"The codec on the same held-out text ({res['rows'][0]['characters']:,} characters; the {longest}-step "
              "models, and the paper's form):", "",
              "| codec | bits | bytes/char | token accuracy | char accuracy |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["codec"] != "attnlab":
            lines.append(f"| {r['codec']} (lossless) | - | {r['bytes_per_char']:.3f} | 1 | 1 |")
    for r in sorted((r for r in res["rows"] if r["codec"] == "attnlab" and r.get("seed") == 0 and r["bits"] in (8, 4)
                     and (r["steps"] == longest or r["bias"] != "distance")),
                    key=lambda r: (r["bias"] != "distance", -r["steps"], -r["latent_dim"], -r["ratio"], -r["bits"])):
        recipe = f"ratio 1/{1 / r['ratio']:.3g}, {r['latent_dim']}-d, {r['steps']} steps" + (
            "" if r["bias"] == "distance" else ", no bias")
        lines.append(f"| {recipe} | {r['bits']} | {r['bytes_per_char']:.3f} | {r['token_accuracy']:.4f} | "
                     f"{r['char_accuracy']:.4f} |")
    return "\n".join(lines)


def blocks() -> dict[tuple[str, str], str]:
    out = {(START, END): bench_block(), ("<!-- distill-table:start -->", "<!-- distill-table:end -->"): distill_block(),
           ("<!-- vision-table:start -->", "<!-- vision-table:end -->"): vision_block(),
           ("<!-- sparsify-table:start -->", "<!-- sparsify-table:end -->"): sparsify_block(),
           ("<!-- scan-table:start -->", "<!-- scan-table:end -->"): scan_block(),
           ("<!-- prune-table:start -->", "<!-- prune-table:end -->"): prune_block(),
           ("<!-- advise-table:start -->", "<!-- advise-table:end -->"): advise_block(),
           ("<!-- press-table:start -->", "<!-- press-table:end -->"): press_block(),
           ("<!-- press-bounded-table:start -->", "<!-- press-bounded-table:end -->"): press_bounded_block(),
           ("<!-- kvpress-table:start -->", "<!-- kvpress-table:end -->"): kvpress_block(),
           ("<!-- decode-table:start -->", "<!-- decode-table:end -->"): decode_block(),
           ("<!-- compress-table:start -->", "<!-- compress-table:end -->"): compress_block(),
           ("<!-- harness-table:start -->", "<!-- harness-table:end -->"): harness_block()}
    for task in ("lm", "spam"):
        if (HERE.parent / "docs" / f"compare-{task}.json").exists():
            out[(f"<!-- compare-{task}:start -->", f"<!-- compare-{task}:end -->")] = compare_block(task)
    out[HISTORY] = model_history()
    return out


HISTORY = ("<!-- model-history:start -->", "<!-- model-history:end -->")
# the files whose blocks this script writes: the README, and the speed record its cost section links to
DOCS = (HERE.parent / "README.md", HERE.parent / "docs" / "speed.md")


def render(text: str, bodies: dict | None = None) -> str:
    for (start, end), body in (blocks() if bodies is None else bodies).items():
        block = start + "\n" + body + "\n" + end
        if start in text:
            text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    return text


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when a table differs from what the "
                                                        "committed JSON gives")
    args = p.parse_args(argv)
    bodies, stale = blocks(), []
    texts = {doc: doc.read_text() for doc in DOCS}
    lost = [start for start, end in bodies if sum(start in t and end in t for t in texts.values()) != 1]
    if lost:  # render() fills only the markers it finds: a deleted pair would otherwise pass unseen
        print(f"each of these blocks should be in exactly one of {', '.join(d.name for d in DOCS)}: {', '.join(lost)}")
        return 1
    for doc in DOCS:
        text = texts[doc]
        new = render(text, bodies)
        if new != text:
            stale.append(doc.relative_to(HERE.parent))
            if not args.check:
                doc.write_text(new)
    if args.check:
        if stale:
            print(f"{', '.join(map(str, stale))} differ from the tables the committed JSON gives: run python "
                  "benchmarks/make_readme_tables.py")
            return 1
        return 0
    print(f"tables regenerated: {', '.join(map(str, stale)) or 'none changed'}")
    return 0


def bench_block() -> str:
    runs = load_runs()
    devices = sorted({r.get("device_name") or "?" for rows in runs.values() for r in rows.values()})
    parts = [f"{', '.join(devices)}, bf16, 16 heads, head dim 64, batch 4 at 4k and 1 from 16k; attention call only "
             "(inputs given). Every row's cells, its SDPA ratio and its peers come from one run (the `run` column: "
             "the JSON, with the command in the `*.cmd.txt` / `sweep_run.txt` beside it). `METHOD@BACKEND` rows are "
             "the method run with that backend in the same run as its default. Generated by "
             "`python benchmarks/make_readme_tables.py`; H100 runs are kept under `benchmarks/results/history/h100/` "
             "and `benchmarks/results/bench_h100/` and not used in the tables (a row an H100 run re-measured later is "
             "listed below them, with that run's same-run ratios). `64k: matmul / copy rate`: the method's own FLOPs per second (a sparse pattern's visible pairs, "
             "a kernelised method's feature-space products: `AttentionMethod.flops`, not the dense count; x3.5 for fwd+bwd) as a "
             "share of the bf16 matmul rate, and its compulsory bytes "
             "(q, k, v read and the output written once; fwd+bwd adds the gradients) per second as a share of the "
             "copy bandwidth, both ceilings measured in the same run (`attnlab.bench.harness.ceilings`); `-` for "
             "runs made before the rows carried them."]
    for mode in ("fwd", "fwd+bwd"):
        for causal in (False, True):
            parts.append(table(runs, mode, causal))
    notes = other_card_notes(runs, load_runs(h200=False))
    if notes:
        parts.append("\n".join(notes))
    parts.append("### Model level: `python benchmarks/model_bench.py` (SmolLM2-135M config, random weights)\n\n" + model_table())
    return "\n\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
