"""attnlab's KV-cache presses side by side with kvpress's presses of the same name (issue [E]).

One process, one model (attnlab.models.load), the held-out windows and metrics of `attnlab press` (prompt-only
eviction): each window's prompt is run once with a press (attnlab's: `kv_press.prefill`; kvpress's: `with
press(model): model(prompt)`), then the continuation is scored teacher-forced on the pressed cache at its original
positions (`kv_press.continue_scoring`, the same call for both libraries), against the full-cache logits computed
once: KL(full || pressed) per next-token position, perplexity, top-1 agreement (`metrics.fidelity`). `seconds` is
the wall time of the prefill with the press plus the continuation, summed over the windows.

    press name (attnlab)   kvpress class
    streaming_llm          StreamingLLMPress(n_sink=4)
    snapkv                 SnapKVPress(window_size=32, kernel_size=5)  (attnlab's window; kvpress's default is 64)
    tova                   TOVAPress
    h2o, h2o_mean          ObservedAttentionPress  (needs eager attention: the model is switched to eager for it)
    knorm                  KnormPress
    random                 RandomPress(seed=--seed)
    adakv_<press>          AdaKVPress(press=<press>, alpha_safeguard=--alpha)  (for the scorer presses above but
                           h2o: each layer's budget shared between its KV heads; kvpress keeps the whole cache and
                           masks with fake keys, attnlab keeps the largest head's count and masks in its sdpa)
    pyramid_snapkv         PyramidKVPress(beta=1 / (1 - --slope), window 32, kernel 5)  (per-layer budgets; kvpress
                           falls back to uniform SnapKV when its smallest layer budget is below the window)

kvpress 0.5.5 pins transformers<5.3; installed without its pins it imports, but its forward hook reads
kwargs["past_key_values"] and kwargs["cache_position"], which newer transformers no longer pass to the attention
module (the cache is `cache`, and cache_position is gone). `_shim_kvpress` below adds both back for kvpress's hook
only (cache_position = the positions of this call's tokens in the cache), in this process; attnlab is untouched.

    python benchmarks/kvpress_side_by_side.py --kvpress-path /tmp/kvsite \
        --seq-len 1024 --prompt-len 896 --num-windows 2 --ratios 0.25,0.5,0.75 --device cpu \
        --out benchmarks/results/press/cpu
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import torch

INSTALL = ("pip download kvpress==0.5.5 --no-deps -d /tmp/kvw && pip install --target /tmp/kvsite --no-deps "
           "/tmp/kvw/kvpress-0.5.5-py3-none-any.whl cachetools==5.5.2 fire==0.6.0 termcolor, then pass "
           "--kvpress-path /tmp/kvsite (kvpress pins transformers<5.3, so install it without its dependencies)")

KVPRESS_NAMES = {"streaming_llm": "StreamingLLMPress", "snapkv": "SnapKVPress", "tova": "TOVAPress",
                 "h2o": "ObservedAttentionPress", "h2o_mean": "ObservedAttentionPress", "knorm": "KnormPress",
                 "random": "RandomPress"}


def fail(message: str) -> None:
    """A user error: one line on stderr, exit code 2 (as attnlab's commands)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def import_kvpress(path: str | None):
    if path:
        sys.path.insert(0, path)
    try:
        import kvpress
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        fail(f"kvpress is not importable ({type(e).__name__}: {e}); install it with: {INSTALL}")
    return kvpress


def _shim_kvpress(kvpress) -> bool:
    """kvpress's BasePress.forward_hook wants kwargs past_key_values and cache_position; newer transformers pass
    the cache as `cache` and no cache_position. Add them (for kvpress's hook only). Returns whether it patched."""
    from kvpress.presses import base_press

    orig = base_press.BasePress.forward_hook
    if getattr(orig, "_side_by_side_shim", False):
        return True

    def forward_hook(self, module, input, kwargs, output):
        if "past_key_values" not in kwargs or "cache_position" not in kwargs:
            kwargs = dict(kwargs)
            if "hidden_states" not in kwargs:
                kwargs["hidden_states"] = input[0]
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            kwargs["past_key_values"] = cache
            if "cache_position" not in kwargs:
                q = kwargs["hidden_states"].shape[1]
                t = cache.layers[module.layer_idx].keys.shape[-2]  # after this call's update
                kwargs["cache_position"] = torch.arange(t - q, t, device=kwargs["hidden_states"].device)
        return orig(self, module, input, kwargs, output)

    forward_hook._side_by_side_shim = True
    base_press.BasePress.forward_hook = forward_hook
    return True


ADAKV_BASES = ("streaming_llm", "snapkv", "tova", "knorm", "random")  # kvpress's AdaKVPress takes ScorerPresses only


def known(name: str) -> bool:
    if name == "pyramid_snapkv":  # kvpress's PyramidKVPress is SnapKV with layer budgets
        return True
    base = name.removeprefix("adakv_")
    return base in KVPRESS_NAMES and (base == name or base in ADAKV_BASES)


def kvpress_press(kvpress, name: str, ratio: float, seed: int, kvpress_defaults: bool, alpha: float = 0.2,
                  slope: float = 0.5):
    if name == "pyramid_snapkv":  # attnlab's slope s is kvpress's beta = 1 / (1 - s)
        kw = {} if kvpress_defaults else {"window_size": 32, "kernel_size": 5}
        return kvpress.PyramidKVPress(compression_ratio=ratio, beta=max(1, round(1 / (1 - slope))), **kw)
    if name.startswith("adakv_"):  # the same scorer, its budget shared between heads (kvpress masks, attnlab gathers)
        inner = kvpress_press(kvpress, name.removeprefix("adakv_"), ratio, seed, kvpress_defaults)
        return kvpress.AdaKVPress(press=inner, alpha_safeguard=alpha)
    cls = getattr(kvpress, KVPRESS_NAMES[name])
    kw = {"compression_ratio": ratio}
    if name == "random":
        kw["seed"] = seed
    if not kvpress_defaults:
        if name == "snapkv":
            kw.update(window_size=32, kernel_size=5)  # attnlab's SnapKV defaults
        if name == "streaming_llm":
            kw["n_sink"] = 4
    return cls(**kw)


@contextlib.contextmanager
def _attn_impl(model, impl: str | None):
    """Switch the model's attention implementation inside the block (eager for kvpress's ObservedAttentionPress)."""
    from attnlab.adapters.hf import set_implementation

    old = model.config._attn_implementation
    if not impl or impl == old:
        yield
        return
    set_implementation(model, impl)
    try:
        yield
    finally:
        set_implementation(model, old)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_kvpress_prefill(model, prompt, press):
    with press(model), torch.no_grad():
        out = model(prompt, use_cache=True)
    return getattr(out, "cache", None) or out.past_key_values


def clear_kvpress_masks(model) -> None:
    """kvpress's AdaKV leaves `masked_key_indices` on the attention modules (its patched attention functions
    replace those keys on every later call whose query is shorter than the keys): cleared after its run."""
    for mod in model.modules():
        if getattr(mod, "masked_key_indices", None) is not None:
            mod.masked_key_indices = None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/press/cpu", help="folder of kvpress.json/.png")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--seq-len", type=int, default=1024, help="prompt + continuation tokens per window")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default: seq-len - 128)")
    p.add_argument("--num-windows", "--num-examples", type=int, default=2, help="held-out windows")
    p.add_argument("--ratios", default="0.25,0.5,0.75", help="fractions of the prompt's cache evicted")
    p.add_argument("--presses", default=",".join(KVPRESS_NAMES), help="attnlab names (default: %(default)s)")
    p.add_argument("--attnlab-only", default="", help="attnlab presses with no kvpress counterpart, run in the same "
                   "process on the same windows (comma-separated; e.g. snapkv_h2o_mean)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of both random presses")
    p.add_argument("--kvpress-path", default=os.environ.get("KVPRESS_PATH"),
                   help="a folder holding kvpress (pip install --target), prepended to sys.path")
    p.add_argument("--kvpress-defaults", action="store_true",
                   help="kvpress's own press defaults (SnapKV window 64) instead of attnlab's (window 32)")
    p.add_argument("--alpha", type=float, default=0.2, help="adakv_ presses: the per-head safeguard (both libraries)")
    p.add_argument("--slope", type=float, default=0.95, help="pyramid_snapkv: attnlab's slope (kvpress's beta = "
                   "1 / (1 - slope); default %(default)s = beta 20, kvpress's default)")
    p.add_argument("--name", default="kvpress", help="file stem of the JSON / PNG (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    kvpress = import_kvpress(args.kvpress_path)
    import transformers

    from attnlab import models
    from attnlab.cli import common
    from attnlab.metrics import fidelity as fm
    from attnlab.reduction import kv_press as kp
    from attnlab.reduction.token_prune import split_windows
    from attnlab.train.data import eval_windows

    shimmed = _shim_kvpress(kvpress)
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    presses = [x.strip() for x in args.presses.split(",") if x.strip()]
    only = [x.strip() for x in args.attnlab_only.split(",") if x.strip()]
    for x in only:  # checked before the model loads (get_press knows the wrappers too)
        try:
            kp.get_press(x, evict=0.5)
        except Exception as e:
            fail(f"--attnlab-only: {e}")
    bad = [x for x in presses if not known(x)]
    if bad:
        fail(f"no kvpress press of the name {bad[0]!r}; shared presses: {', '.join(KVPRESS_NAMES)}, and "
                 f"adakv_<press> for {', '.join(ADAKV_BASES)}")
    prompt_len = args.prompt_len or args.seq_len - 128
    kv_version = getattr(kvpress, "__version__", None)
    if kv_version is None:
        from importlib.metadata import PackageNotFoundError, version
        try:
            kv_version = version("kvpress")
        except PackageNotFoundError:
            kv_version = next((d.name.split("-")[1] for d in Path(kvpress.__file__).parents[1].glob("kvpress-*.dist-info")),
                              None)
    started = time.time()
    model, tok = models.load(args.model, device=args.device)
    windows = eval_windows(tok, None, args.seq_len, args.num_windows).to(args.device)
    prompts, conts = split_windows(windows, prompt_len)
    n = prompts.shape[0]
    device_name = common.environment(args.device)["device_name"]
    print(f"kvpress {kv_version} (shim: {shimmed}), transformers {transformers.__version__}, {args.model} on "
          f"{device_name}: {n} windows x ({prompt_len} + {args.seq_len - prompt_len}) tokens, ratios {ratios}",
          flush=True)

    full = []
    t0 = time.perf_counter()
    for i in range(n):
        cache, _, _ = kp.prefill(model, prompts[i:i + 1], None)
        full.append(kp.continue_scoring(model, cache, conts[i:i + 1], start=prompt_len).float().cpu())
    _sync(args.device)
    base_s = time.perf_counter() - t0
    common_fields = {"seq_len": args.seq_len, "prompt_len": prompt_len, "windows": n, "device": device_name,
                     "kvpress_version": kv_version, "transformers_version": transformers.__version__}
    base = fm.summarise([fm.next_token_stats(full[i], full[i], conts[i:i + 1].cpu()) for i in range(n)])
    rows = [{"library": "none", "press": "full_cache", "ratio": 0.0, "kl_mean": 0.0, "kl_p95": 0.0,
             "ppl": base["ppl"], "top1": 1.0, "seconds": round(base_s, 3), "kept_tokens": prompt_len,
             **common_fields}]
    print(f"{'library':<8} {'press':<14} {'ratio':>5} {'KL':>8} {'KL p95':>7} {'top-1':>6} {'ppl':>8} {'kept':>5} "
          f"{'s':>6}\n{'none':<8} {'full_cache':<14} {0:>5.2f} {0:>8.4f} {0:>7.3f} {1:>6.3f} {base['ppl']:>8.2f} "
          f"{prompt_len:>5} {base_s:>6.1f}", flush=True)

    for name in presses + only:
        for ratio in ratios:
            for lib in ("attnlab",) if name in only else ("attnlab", "kvpress"):
                if lib == "attnlab":
                    press = kp.get_press(name, evict=ratio, seed=args.seed, alpha=args.alpha, slope=args.slope)
                    prefill, impl = (lambda x, press=press: kp.prefill(model, x, press)[0]), None
                else:
                    press = kvpress_press(kvpress, name, ratio, args.seed, args.kvpress_defaults, args.alpha, args.slope)
                    prefill = lambda x, press=press: run_kvpress_prefill(model, x, press)  # noqa: E731
                    impl = "eager" if name in ("h2o", "h2o_mean") else None
                stats, secs, kept = [], 0.0, 0
                for i in range(n):
                    _sync(args.device)
                    t0 = time.perf_counter()
                    with _attn_impl(model, impl):
                        cache = prefill(prompts[i:i + 1])
                    kept = cache.get_seq_length()
                    logits = kp.continue_scoring(model, cache, conts[i:i + 1], start=prompt_len)
                    clear_kvpress_masks(model)
                    _sync(args.device)
                    secs += time.perf_counter() - t0
                    stats.append(fm.next_token_stats(full[i], logits.float().cpu(), conts[i:i + 1].cpu()))
                s = fm.summarise(stats)
                rows.append({"library": lib, "press": name, "ratio": ratio, "kl_mean": s["kl"], "kl_p95": s["kl_p95"],
                             "ppl": s["ppl"], "top1": s["top1"], "seconds": round(secs, 3), "kept_tokens": kept,
                             **common_fields})
                print(f"{lib:<8} {name:<14} {ratio:>5.2f} {s['kl']:>8.4f} {s['kl_p95']:>7.3f} {s['top1']:>6.3f} "
                      f"{s['ppl']:>8.2f} {kept:>5} {secs:>6.1f}", flush=True)

    out = Path(args.out) / f"{args.name}.json"
    common.write_result(
        out, args.device,
        {"command": " ".join(["python", "benchmarks/kvpress_side_by_side.py", *(sys.argv[1:] if argv is None else argv)]),
         "model": args.model, "text": "moby_dick (held-out tail)", "kvpress_shim": shimmed,
         "kvpress_press_args": "kvpress defaults" if args.kvpress_defaults else
         "attnlab's: SnapKV window 32 kernel 5, StreamingLLM 4 sinks",
         "elapsed_s": round(time.time() - started, 1), "rows": rows},
        None if args.no_plot else lambda png: plot(rows, png, title=(
            f"attnlab vs kvpress {kv_version} presses: {args.model}, {n} held-out windows, prompt {prompt_len} + "
            f"{args.seq_len - prompt_len} continuation tokens; eviction once, after the prompt")))
    return 0


def plot(rows: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnlab.plotting import save

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    names = list(dict.fromkeys(r["press"] for r in rows if r["library"] != "none"))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, color, marker in zip(names, colors, "osD^v<>p"):
        for lib, ls in (("attnlab", "-"), ("kvpress", "--")):
            rs = sorted((r for r in rows if r["press"] == name and r["library"] == lib), key=lambda r: r["ratio"])
            if not rs:  # an attnlab-only press
                continue
            for ax, key in zip(axes, ("kl_mean", "top1")):
                ax.plot([100 * r["ratio"] for r in rs], [max(r[key], 1e-5) for r in rs], ls=ls, color=color,
                        marker=marker, mfc="none" if lib == "kvpress" else color, label=f"{name} ({lib})")
    axes[0].set(yscale="log", ylabel="KL(full cache || pressed), nats/token")
    axes[1].set(ylabel="top-1 agreement with the full cache")
    for ax in axes:
        ax.set_xlabel("prompt KV cache evicted (%)  [solid: attnlab, dashed/open: kvpress]")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    save(fig, path, title)


if __name__ == "__main__":
    raise SystemExit(main())
