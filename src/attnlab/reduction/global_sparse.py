"""Data-informed global sparsity: which key blocks each query block of each layer and head actually attends to,
measured on a corpus, kept as a fixed block pattern.

    mass = measure_block_mass(model, windows, block_size=64)     # [L, H, nb, nb]: mean attention per query
    save_pattern(DIR, GlobalPattern(mass, 64, meta))              # pattern.safetensors + pattern.json
    attnlab.swap(model, "global_sparse", pattern=DIR, sparsity=0.9)

The measurement runs the model with `sdpa` swapped in (the same function as the original) and, in a forward hook
on every layer's method, sums the attention each query block gives each key block, one query block at a time
(`ops.reference.block_mass`: no T x T matrix). Selection (`select_blocks`) keeps, per layer and head, the
diagonal blocks and then the blocks that add the most log attention mass to their query block, until a fraction
1 - sparsity of the candidate blocks (those that received any attention: the causal blocks of a decoder) is kept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import torch

from ..types import AttnlabError, OptionError, data_version

FORMAT = "attnlab-global-sparse/1"


class PatternError(AttnlabError):
    pass


@dataclasses.dataclass
class GlobalPattern:
    mass: torch.Tensor  # float [L, H, nb, nb]: mean attention a query of block i gives block j
    block_size: int
    meta: dict = dataclasses.field(default_factory=dict)
    sink_mass: torch.Tensor | None = None  # float [L, H, nb]: the part of it that goes to the first `sinks` tokens
    sinks: int = 0  # token-level attention sinks, always kept
    band: bool = True  # a token-level local band of block_size keys, always kept
    # float [L]: KL(original || this layer alone pruned) on calibration windows (`probe_sensitivity`; `attnlab
    # sparsify` records its settings in meta["sensitivity_probe"]); what budget="sensitivity" divides the blocks by
    sensitivity: torch.Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.mass.shape[0]

    @property
    def num_heads(self) -> int:
        return self.mass.shape[1]

    @property
    def max_len(self) -> int:
        return self.mass.shape[-1] * self.block_size


SHARES = ("head", "layer", "model")


def select_blocks(mass: torch.Tensor, sparsity: float, sink_mass: torch.Tensor | None = None,
                  band: bool = False, share: str = "head") -> torch.Tensor:
    """Bool blocks of `mass` [..., nb, nb] to keep, per leading index (layer, head): the diagonal always, then
    round((1 - sparsity) * candidates) blocks in all (candidates: blocks with mass > 0, the causal ones of a
    decoder; never fewer than the diagonal), chosen to maximise the sum over query blocks of the log of the
    attention mass each keeps.

    Why the log: greedy by raw mass maximises the total mass kept but starves late query blocks, whose mass is
    spread over many keys (a row of 8 blocks keeps its diagonal only, losing 77% of its attention, while early
    rows keep everything); on SmolLM2 that was worse than a plain window of the same density. log(kept) is
    concave, so taking each row's blocks in decreasing mass, the marginal gains log(R + m) - log(R) fall along a
    row and the global top gains are the optimum of the separable problem. Ties go to the earlier block.

    `share`: who shares a budget. "head": every (layer, head) keeps its own fraction 1 - sparsity; "layer": the
    heads of a layer share the layer's budget (mass [L, H, nb, nb] or [H, nb, nb]); "model": every head of every
    layer shares one budget (mass [L, H, nb, nb]). The objective is the same sum of logs, so a shared budget goes
    where it buys the most: to heads whose attention is spread, away from heads that look at a few blocks (as
    Ada-KV shares a KV budget between heads). The overall density is the same; a head's is not.

    `sink_mass` [..., nb]: attention each query block gives the token-level sinks kept anyway; it counts as
    kept from the start and is taken out of block 0's mass (whose remainder competes like any block).
    `band`: a token-level band of block_size keys runs beside the blocks (`make_pattern`): it covers the diagonal
    block and about half of the block just below it, which counts as kept (the other half competes).
    `sparsity` may also be one value per layer (mass [L, H, nb, nb], share head or layer): each layer is then
    selected alone at its own (`layer_sparsities`)."""
    if isinstance(sparsity, (list, tuple, torch.Tensor)):  # one sparsity per layer: each layer selected alone
        ps = [float(x) for x in (sparsity.tolist() if isinstance(sparsity, torch.Tensor) else sparsity)]
        if mass.dim() != 4 or len(ps) != mass.shape[0]:
            raise OptionError(f"per-layer sparsities need scores [L, H, nb, nb] and one value per layer, got "
                              f"{len(ps)} for {tuple(mass.shape)}")
        if share == "model":
            raise OptionError("share='model' shares one budget across layers: per-layer sparsities contradict it")
        return torch.stack([select_blocks(mass[i], p, None if sink_mass is None else sink_mass[i], band, share)
                            for i, p in enumerate(ps)])
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise OptionError(f"sparsity must be in [0, 1) (the fraction of blocks pruned), got {sparsity!r}")
    if share not in SHARES:
        raise OptionError(f"share must be one of {', '.join(SHARES)}, got {share!r}")
    if share == "model" and mass.dim() != 4:
        raise OptionError(f"share='model' needs every layer's scores [L, H, nb, nb], got {tuple(mass.shape)}")
    nb = mass.shape[-1]
    flat = mass.reshape(-1, nb, nb).float()
    # a single [nb, nb] grid is its own layer (one head): there 'layer' is 'head'
    group = 1 if share == "head" or mass.dim() == 2 else (flat.shape[0] if share == "model" else mass.shape[-3])
    sink = torch.zeros(flat.shape[:2]) if sink_mass is None else sink_mass.reshape(-1, nb).float()
    diag = torch.eye(nb, dtype=torch.bool)
    gains, orders, counts = [], [], []
    for n in range(flat.shape[0]):
        cand = (flat[n] > 0) | diag
        m = flat[n].clone()
        m[1:, 0] = (m[1:, 0] - sink[n, 1:]).clamp_min(0)  # (row 0's block 0 is its diagonal)
        start = sink[n].clone()
        if band and nb > 1:
            sub = torch.arange(1, nb)
            half = 0.5 * m[sub, sub - 1]
            start[1:] += half
            m[sub, sub - 1] -= half
        # each row's blocks in keeping order: the diagonal first, then by decreasing mass; non-candidates last
        key = torch.where(diag, torch.full_like(m, math.inf), m).masked_fill(~cand, -math.inf)
        order = key.argsort(dim=1, descending=True, stable=True)
        sorted_m = m.gather(1, order).clamp_min(0) * cand.gather(1, order)
        cum = sorted_m.cumsum(1) + start[:, None]
        gain = torch.log(cum.clamp_min(1e-30)) - torch.log((cum - sorted_m).clamp_min(1e-30))
        gain[:, 0] = math.inf  # the diagonal
        gains.append(gain.masked_fill(~cand.gather(1, order), -math.inf))
        orders.append(order)
        counts.append(int(cand.sum()))
    gains, orders = torch.stack(gains), torch.stack(orders)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    for g0 in range(0, flat.shape[0], group):
        cand_total = sum(counts[g0:g0 + group])
        budget = max(group * nb, int(round((1 - sparsity) * cand_total)))
        # a stable sort, not topk: equal gains go to the earlier head, row and block on every platform
        top = gains[g0:g0 + group].flatten().sort(descending=True, stable=True).indices[:min(budget, cand_total)]
        n, rest = top // (nb * nb) + g0, top % (nb * nb)
        rows, pos = rest // nb, rest % nb
        keep[n, rows, orders[n, rows, pos]] = True
    return keep.view(mass.shape)


def make_pattern(blocks: torch.Tensor, block_size: int, sinks: int, band: bool = True):
    """The runnable pattern: the selected blocks ([nb, nb] or [H, nb, nb]), `sinks` token-level sinks and (with
    `band`) a token-level local band of block_size keys, so that the first query of a block is not left with
    only itself (the diagonal block alone gives query r of a block r + 1 keys)."""
    from ..patterns import BlockPattern, UnionPattern, WindowPattern

    blk = BlockPattern(blocks, block_size)
    if sinks > 0 or band:
        return UnionPattern(blk, WindowPattern(block_size - 1 if band else 0, sinks))
    return blk


BUDGETS = ("uniform", "sensitivity")
_SELECTED: dict = {}
_LAYER_SPARSITIES: dict = {}


def _remembered(store: dict, size: int, pat: GlobalPattern, args: tuple, make):
    """make(), remembered in `store` (the last `size`, least recently used out) under the pattern's tensors (ids and
    version counters: a tensor changed in place is a new pattern) and `args`. The entry holds the tensors, so an id
    is never reused while it lives."""
    tensors = tuple(t for t in (pat.mass, pat.sink_mass, pat.sensitivity) if t is not None)
    key = (tuple((id(t), data_version(t)[1]) for t in tensors), pat.sinks, pat.band, pat.block_size, *args)
    hit = store.pop(key, None)
    if hit is None:
        hit = (tensors, make())
        while len(store) >= size:
            store.pop(next(iter(store)))
    store[key] = hit  # most recently used last
    return hit[1]


def selected_blocks(pat: GlobalPattern, sparsity: float, share: str = "layer", budget: str = "uniform",
                    alpha: float = 0.5) -> torch.Tensor:
    """select_blocks over a whole pattern [L, H, nb, nb], remembered for the last few (pattern, sparsity, share,
    budget): the layers of a swapped model each ask for their slice of the same selection. `budget`: "uniform"
    (every layer prunes `sparsity` of its blocks) or "sensitivity" (layers get budgets by their measured
    sensitivity at the same mean density: `layer_sparsities`). Returns a fresh copy (callers keep their slice as a
    buffer that load_state_dict may overwrite)."""
    if budget not in BUDGETS:
        raise OptionError(f"budget must be one of {', '.join(BUDGETS)}, got {budget!r}")

    def make():
        per = sparsity if budget == "uniform" else layer_sparsities(pat, sparsity, share, alpha)
        return select_blocks(pat.mass, per, pat.sink_mass, band=pat.band, share=share)

    args = (float(sparsity), share, budget, float(alpha) if budget == "sensitivity" else None)
    return _remembered(_SELECTED, 4, pat, args, make).clone()


def pattern_density(pat: GlobalPattern, sparsity: float, seq_len: int, share: str = "layer", budget: str = "uniform",
                    alpha: float = 0.5) -> float:
    """Fraction of the causal token pairs (q >= k) the selection at `sparsity` (with `share` and the layer `budget`,
    see selected_blocks) allows at `seq_len`, sinks and band included (mean over layers and heads)."""
    return blocks_density(pat, selected_blocks(pat, sparsity, share, budget, alpha), seq_len)


_PAIRS: dict = {}


def _block_pairs(pat: GlobalPattern, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block (i, j) of a seq_len window: its causal pairs, and those of them the sinks and band keep anyway
    (float64 [nb_t, nb_t] each, cached), counted per (query, key block) in closed form: query r sees keys <= r,
    its band keys r - w .. r (w = block_size - 1 with the band, else 0: `make_pattern`'s WindowPattern) and the
    sinks below the band, keys < min(sinks, r - w). O(T nb) memory, not T x T."""
    key = (pat.block_size, pat.sinks, pat.band, seq_len)
    if key not in _PAIRS:
        bs, nb = pat.block_size, -(-seq_len // pat.block_size)
        w = bs - 1 if pat.band else 0
        r = torch.arange(seq_len, dtype=torch.int64)[:, None]  # query
        lo = torch.arange(nb, dtype=torch.int64)[None, :] * bs  # key block j: keys lo .. hi - 1
        hi = (lo + bs).clamp(max=seq_len)
        end = torch.minimum(r + 1, hi)
        causal = (end - lo).clamp(min=0)
        band = (end - torch.maximum(r - w, lo)).clamp(min=0)
        below = (r - w).clamp(min=0).clamp(max=pat.sinks)  # the sinks outside the band: keys < below
        sinks = (torch.minimum(hi, below) - lo).clamp(min=0)
        pad = nb * bs - seq_len

        def per_block(m):  # [T, nb] counts -> [nb, nb] summed over each query block's rows
            return torch.nn.functional.pad(m.double(), (0, 0, 0, pad)).view(nb, bs, nb).sum(1)

        while len(_PAIRS) >= 8:
            _PAIRS.pop(next(iter(_PAIRS)))
        _PAIRS[key] = (per_block(causal), per_block(band + sinks))
    return _PAIRS[key]


def blocks_density(pat: GlobalPattern, blocks: torch.Tensor, seq_len: int) -> float:
    """Mean fraction of the causal token pairs that kept-block grids Bool[..., nb, nb] allow at `seq_len`, with the
    pattern's sinks and band: a kept block keeps all its causal pairs, another only those the sinks and band keep
    (the union `make_pattern` builds, counted per block instead of per pair)."""
    full, extra = _block_pairs(pat, seq_len)
    nbt = full.shape[0]
    keep = blocks.reshape(-1, *blocks.shape[-2:])[:, :nbt, :nbt]
    kept = torch.where(keep, full, extra).sum((1, 2))
    return float(kept.mean() / full.sum())


def layer_sparsities(pat: GlobalPattern, sparsity: float, share: str = "layer", alpha: float = 0.5) -> list[float]:
    """Per-layer sparsities at the mean causal token density of the uniform `sparsity` (at the pattern's own
    length): layer l keeps a fraction of its blocks proportional to sensitivity_l ** alpha (the KL the model loses
    when that layer alone is pruned, `probe_sensitivity`), rescaled until the mean density matches. alpha 0 is
    uniform in blocks; larger alpha moves more blocks to the sensitive layers. Remembered for the last few
    (pattern, sparsity, share, alpha): the bisection selects every layer ~10-40 times."""
    if pat.sensitivity is None:
        raise OptionError("budget='sensitivity' needs the pattern's per-layer sensitivity: run `attnlab sparsify "
                          "--budget sensitivity` (or reduction.probe_sensitivity) on it first")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 4:
        raise OptionError(f"alpha must be in [0, 4], got {alpha!r}")
    if share == "model":
        raise OptionError("budget='sensitivity' divides the blocks between layers: use share='layer' or 'head'")
    return list(_remembered(_LAYER_SPARSITIES, 8, pat, (float(sparsity), share, float(alpha)),
                            lambda: _layer_sparsities(pat, sparsity, share, alpha)))


def _layer_sparsities(pat: GlobalPattern, sparsity: float, share: str, alpha: float) -> list[float]:
    """layer_sparsities' bisection, its arguments checked."""
    t = pat.max_len
    target = pattern_density(pat, sparsity, t, share)
    if sparsity == 0:
        return [0.0] * pat.num_layers
    w = pat.sensitivity.double().clamp_min(1e-9) ** alpha
    w = w / w.mean()

    def at(keep_mean: float) -> tuple[list[float], float]:
        keep = (w * keep_mean).clamp(0.0, 1.0)
        for _ in range(50):  # renormalise under the clamp so the mean kept fraction stays keep_mean
            keep = (keep * keep_mean / keep.mean()).clamp(0.0, 1.0)
        ps = [min(max(1.0 - float(k), 0.0), 0.999999) for k in keep]
        return ps, blocks_density(pat, select_blocks(pat.mass, ps, pat.sink_mass, pat.band, share), t)

    lo, hi, keep_mean = 0.0, 1.0, 1.0 - sparsity  # bisection on the mean kept fraction: density rises with it
    for _ in range(40):
        ps, dens = at(keep_mean)
        if abs(dens / target - 1) < 1e-3:
            break
        lo, hi = (keep_mean, hi) if dens < target else (lo, keep_mean)
        keep_mean = (lo + hi) / 2
    return [round(p, 6) for p in ps]


def measure_block_mass(model, windows: torch.Tensor, *, block_size: int = 64, sinks: int = 4,
                       progress: bool = True) -> GlobalPattern:
    """Mean attention mass per query from each query block to each key block, for every layer and head of a
    transformers model (`.mass`: float [L, H, nb, nb], nb = ceil(T / block_size); rows of a causal model sum to 1),
    and the part of it that goes to the first `sinks` tokens (`.sink_mass` [L, H, nb])."""
    from tqdm.auto import tqdm

    from ..adapters.swap import method_modules, swapped
    from ..methods.base import repeat_kv
    from ..ops.reference import block_mass

    windows = windows.to(next(model.parameters()).device)
    t = windows.shape[1]
    sums: dict[int, torch.Tensor] = {}
    sink_sums: dict[int, torch.Tensor] = {}

    def hook_for(index):
        def hook(module, args, kwargs, _out):
            q, k = args[0], args[1]
            k = repeat_kv(k, q.shape[1] // k.shape[1])
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            m, s = block_mass(q.detach(), k.detach(), block_size=block_size, scale=scale,
                              causal=bool(kwargs.get("causal", False)), sinks=max(1, sinks))
            m, s = m.sum(0).cpu(), s.sum(0).cpu()
            sums[index] = m if index not in sums else sums[index] + m
            sink_sums[index] = s if index not in sink_sums else sink_sums[index] + s
        return hook

    with swapped(model, "sdpa"), torch.no_grad():
        handles = [mod.register_forward_hook(hook_for(plan.index), with_kwargs=True)
                   for plan, mod in method_modules(model)]
        try:
            for w in tqdm(windows, desc=f"measure block attention ({block_size}-token blocks)", disable=not progress):
                model(w[None])
        finally:
            for h in handles:
                h.remove()
    if not sums:
        raise PatternError("no attention layer ran: is this a transformers model with attention layers?")
    nb = -(-t // block_size)
    counts = torch.full((nb,), float(block_size))
    counts[-1] = t - (nb - 1) * block_size  # queries in the last (partial) block
    mass = torch.stack([sums[i] for i in sorted(sums)])  # [L, H, nb, nb]
    sink = torch.stack([sink_sums[i] for i in sorted(sums)]) if sinks > 0 else None
    return GlobalPattern(mass / (counts[:, None] * len(windows)), block_size, {}, None if sink is None else
                         sink / (counts * len(windows)), sinks)


def save_pattern(path, pattern: GlobalPattern) -> Path:
    """DIR/pattern.safetensors (mass) + DIR/pattern.json (format, shape, block size, what it was measured on)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {"mass": pattern.mass.float().contiguous()}
    if pattern.sink_mass is not None:
        tensors["sink_mass"] = pattern.sink_mass.float().contiguous()
    if pattern.sensitivity is not None:
        tensors["sensitivity"] = pattern.sensitivity.float().contiguous()
    save_file(tensors, str(path / "pattern.safetensors"))
    meta = {"format": FORMAT, "num_layers": pattern.num_layers, "num_heads": pattern.num_heads,
            "block_size": pattern.block_size, "num_blocks": pattern.mass.shape[-1], "max_len": pattern.max_len,
            "sinks": pattern.sinks if pattern.sink_mass is not None else 0, "band": pattern.band, **pattern.meta}
    (path / "pattern.json").write_text(json.dumps(meta, indent=2))
    return path


_CACHE: dict = {}


def load_pattern(path) -> GlobalPattern:
    """Read a pattern folder; a missing, foreign or damaged one is a PatternError (one line)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_file() and p.name in ("pattern.json", "pattern.safetensors"):
        p = p.parent
    meta_f, data_f = p / "pattern.json", p / "pattern.safetensors"
    if not meta_f.is_file() or not data_f.is_file():
        raise PatternError(f"{path!r} is not a global-sparse pattern folder (no pattern.json + pattern.safetensors; "
                           "make one with `attnlab sparsify`)")
    key = (str(p.resolve()), meta_f.stat().st_mtime_ns, data_f.stat().st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    try:
        meta = json.loads(meta_f.read_text())
        tensors = load_file(str(data_f))
        mass = tensors["mass"]
        sink = tensors.get("sink_mass")
        sens = tensors.get("sensitivity")
    except (json.JSONDecodeError, SafetensorError, KeyError, OSError) as e:
        raise PatternError(f"{p}: damaged pattern files ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise PatternError(f"{p}: pattern format {found!r}, expected {FORMAT!r}")
    for key in ("block_size", "num_layers", "num_heads", "num_blocks"):
        if isinstance(meta.get(key), bool) or not isinstance(meta.get(key), int) or meta[key] < 1:
            raise PatternError(f"{p}: pattern.json's {key} is {meta.get(key)!r}, not a positive integer")
    want = (meta.get("num_layers"), meta.get("num_heads"), meta.get("num_blocks"), meta.get("num_blocks"))
    if mass.dim() != 4 or tuple(mass.shape) != want:
        raise PatternError(f"{p}: mass has shape {tuple(mass.shape)}, pattern.json says {want}")
    if sink is not None and tuple(sink.shape) != tuple(mass.shape[:3]):
        raise PatternError(f"{p}: sink_mass has shape {tuple(sink.shape)}, expected {tuple(mass.shape[:3])}")
    if sens is not None and tuple(sens.shape) != (mass.shape[0],):
        raise PatternError(f"{p}: sensitivity has shape {tuple(sens.shape)}, expected ({mass.shape[0]},)")
    pat = GlobalPattern(mass, int(meta["block_size"]), meta, sink, int(meta.get("sinks", 0)) if sink is not None else 0,
                        bool(meta.get("band", True)), sens)
    _CACHE.clear()
    _CACHE[key] = pat
    return pat


def probe_sensitivity(model, windows: torch.Tensor, pattern_dir, *, probe: float = 0.97, share: str = "layer",
                      progress: bool = True) -> torch.Tensor:
    """Per layer, KL(original || the model with only that layer pruned at `probe`) on `windows` (mean nats per
    token; use calibration windows, not the held-out ones): float [L]. One forward over the windows per layer."""
    from tqdm.auto import tqdm

    from ..adapters.spec import Rule, SwapSpec
    from ..adapters.swap import swapped
    from ..metrics import fidelity as fm

    pat = load_pattern(pattern_dir)
    device = next(model.parameters()).device
    windows = windows.to(device)
    if windows.shape[1] > pat.max_len:
        raise PatternError(f"probe windows of {windows.shape[1]} tokens are longer than the pattern covers ({pat.max_len})")

    def logits(spec=None):
        with (swapped(model, spec) if spec is not None else contextlib.nullcontext()), torch.no_grad():
            return [model(w[None]).logits.float().cpu() for w in windows]

    base, ids, kl = logits(), windows.cpu(), []
    for layer in tqdm(range(pat.num_layers), desc=f"probe each layer at {probe:.0%} pruned", disable=not progress):
        spec = SwapSpec(rules=[Rule(str(layer), "global_sparse", {"pattern": str(pattern_dir), "sparsity": probe,
                                                                  "share": share})])
        got = logits(spec)
        kl.append(fm.summarise([fm.next_token_stats(base[i], got[i], ids[i:i + 1]) for i in range(len(ids))])["kl"])
    return torch.tensor(kl, dtype=torch.float32)


def evaluate(model, windows: torch.Tensor, pattern_dir, sparsities, *, baseline: bool = True, sinks: int | None = None,
             shares=("layer",), budgets=("uniform",), alpha: float = 0.5, progress: bool = True) -> list[dict]:
    """Held-out perplexity, KL(original || swapped) and top-1 agreement of the global-sparse pattern at each
    sparsity, budget sharing (`shares`: see select_blocks) and layer budget (`budgets`: uniform | sensitivity, see
    layer_sparsities), and (with `baseline`) of a window + `sinks` mask (default: the pattern's own sinks, so both
    keep the same first tokens) of the same causal token density as the first (share, budget)'s, all against the
    original model on the same windows. One dict per (technique, share, budget, sparsity)."""
    from tqdm.auto import tqdm

    from ..adapters.swap import swapped
    from ..metrics import fidelity as fm
    from ..patterns import WindowPattern
    from ..timing import Timer

    pat = load_pattern(pattern_dir)
    sinks = pat.sinks if sinks is None else sinks
    device = next(model.parameters()).device
    windows = windows.to(device)
    t = windows.shape[1]
    if t > pat.max_len:
        raise PatternError(f"held-out windows of {t} tokens are longer than the pattern covers ({pat.max_len})")

    def run(target=None, **opts):
        out, ms = [], []
        with (swapped(model, target, **opts) if target else contextlib.nullcontext()), torch.no_grad():
            for w in windows:
                with Timer(device) as tm:
                    out.append(model(w[None]).logits.float().cpu())
                ms.append(tm.ms)
        return out, sorted(ms)[len(ms) // 2]

    shares = [shares] if isinstance(shares, str) else list(shares)
    budgets = [budgets] if isinstance(budgets, str) else list(budgets)
    jobs = [("global_sparse", p, sh, bu) for sh in shares for bu in budgets for p in sparsities]
    jobs += [("window_sinks", p, None, None) for p in sparsities] if baseline else []
    bar = tqdm(total=len(jobs) + 1, desc="evaluate", disable=not progress)
    bar.set_postfix_str("original")
    base, base_ms = run()
    bar.update()
    ids = windows.cpu()
    rows = []
    densities = {}
    for technique, p, share, budget in jobs:
        bar.set_postfix_str(f"{technique} {share or ''} {budget or ''} {p:.0%}")
        if technique == "global_sparse":
            opts = {"sparsity": p, "share": share}
            if budget != "uniform":
                opts.update(budget=budget, alpha=alpha,
                            layer_sparsity=layer_sparsities(pat, p, share, alpha) if p > 0 else [0.0] * pat.num_layers)
            density = pattern_density(pat, p, t, share, budget, alpha)
            densities.setdefault(p, density)
            logits, ms = run("global_sparse", pattern=str(pattern_dir),
                             **{k: v for k, v in opts.items() if k != "layer_sparsity"})
        else:
            density = densities[p]
            win = WindowPattern.for_density(density, t, sinks=sinks).window
            logits, ms = run("window", window=win, sinks=sinks)
            opts = {"window": win, "sinks": sinks}
            density = WindowPattern(win, sinks).density(t, t, causal=True)
        st = [fm.next_token_stats(base[i], logits[i], ids[i:i + 1]) for i in range(len(ids))]
        rows.append({"technique": technique, "share": share, "budget": budget, "fraction": p, "options": opts,
                     "density": density,
                     **fm.summarise(st),
                     "ms": ms, "ms_original": base_ms})
        bar.update()
    bar.close()
    return rows


def cost(model, seq_len: int, pattern_dir, sparsities, *, baseline: bool = True, sinks: int | None = None,
         share: str = "layer", budget: str = "uniform", alpha: float = 0.5, modes=("fwd", "fwd+bwd"), repeats: int = 5,
         progress: bool = True, cuda_graph: bool = False, eager_reference: bool = False) -> list[dict]:
    """Time and peak memory of the model's backbone (its layers, not the vocabulary head, whose logits would
    dominate the memory) on one random window of `seq_len` tokens, batch 1: the original model (its own
    attention), the global-sparse pattern at each sparsity and, with `baseline`, window + `sinks` (default: the
    pattern's own) of the same density; with `eager_reference` also the original with transformers' eager attention (the T x T matrix
    materialised, as dense attention without a fused kernel keeps it: the kind of baseline the published 27% memory
    cut was measured against). fwd+bwd backpropagates into the (unfrozen) weights, as fine-tuning would.

    Eager (default): the jobs interleave, `repeats` rounds each timing one step of every (job, mode) (the ms: the
    median over the rounds, `ms_rounds`; peak_mem_bytes: the largest). `cuda_graph` (CUDA): each (job, mode) step
    is captured once as a CUDA graph (`timing.capture_graph`) and its `repeats` replays timed, job after job: the
    device work without the host's Python and launches; extra_mem_bytes is what the step allocates and
    peak_mem_bytes that plus what was resident before it (weights, inputs). One dict
    per (technique, fraction, mode), with the bench harness's fields and status."""
    from tqdm.auto import tqdm

    from ..adapters.hf import set_implementation
    from ..adapters.swap import swapped
    from ..bench.harness import bench_one, free_memory
    from ..patterns import WindowPattern

    device = next(model.parameters()).device
    if cuda_graph and device.type != "cuda":
        raise AttnlabError("cost: cuda_graph needs the model on a CUDA device")
    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(backbone, "model", backbone)
    pat = load_pattern(pattern_dir)
    sinks = pat.sinks if sinks is None else sinks
    if seq_len > pat.max_len:
        raise PatternError(f"{seq_len} tokens are longer than the pattern covers ({pat.max_len})")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=gen).to(device)
    jobs = [("original", None, {})] + ([("original_eager", None, {})] if eager_reference else [])
    for p in sparsities:
        extra = {} if budget == "uniform" else {"budget": budget, "alpha": alpha}
        jobs.append(("global_sparse", p, {"pattern": str(pattern_dir), "sparsity": p, "share": share, **extra}))
        if baseline:
            dens = pattern_density(pat, p, seq_len, share, budget, alpha)
            win = WindowPattern.for_density(dens, seq_len, sinks=sinks).window
            jobs.append(("window_sinks", p, {"window": win, "sinks": sinks}))
    own_impl = model.config._attn_implementation

    @contextlib.contextmanager
    def job_context(technique, opts):
        target = {"global_sparse": "global_sparse", "window_sinks": "window"}.get(technique)
        if technique == "original_eager":
            set_implementation(model, "eager")
            try:
                yield
            finally:
                set_implementation(model, own_impl)
        else:
            with swapped(model, target, **opts) if target else contextlib.nullcontext():
                yield

    grads = [q.requires_grad for q in model.parameters()]
    got: dict = {}
    bar = tqdm(total=repeats * len(jobs) * len(modes) if not cuda_graph else len(jobs) * len(modes), desc="cost",
               disable=not progress)
    try:
        for q in model.parameters():
            q.requires_grad_(True)
        if cuda_graph:
            for technique, p, opts in jobs:
                with job_context(technique, opts):
                    for mode in modes:
                        bar.set_postfix_str(f"{technique} {p} {mode} (graph)")
                        got[(technique, p, mode)] = [_graph_row(model, backbone, ids, mode, repeats, device)]
                        free_memory(device)
                        bar.update()
        else:
            # interleaved: round r times every (job, mode) once, so drift in the host's speed (up to 2x between rows
            # timed one after another on the H200 machine, where a short step is host-bound) hits every job alike;
            # each round swaps the job in afresh and warms it (pattern caches, compilation) before its timed step
            for r in range(repeats):
                for technique, p, opts in jobs:
                    with job_context(technique, opts):
                        for mode in modes:
                            bar.set_postfix_str(f"{technique} {p} {mode}")
                            row = bench_one(lambda x: backbone(x, use_cache=False).last_hidden_state, lambda: (ids,),
                                            mode, device, repeats=1, warmup=2 if r == 0 else 1,
                                            params=list(model.parameters()))
                            got.setdefault((technique, p, mode), []).append(row)
                            free_memory(device)
                            bar.update()
    finally:
        for q, g in zip(model.parameters(), grads):
            q.requires_grad_(g)
            q.grad = None
        bar.close()
    rows = []
    for technique, p, opts in jobs:
        for mode in modes:
            runs = got.get((technique, p, mode), [])
            row = (runs[0] if cuda_graph else merge_rounds(runs)) if runs else {"status": "skipped"}
            row.update(technique=technique, fraction=p, options=opts, mode=mode, seq_len=seq_len,
                       interleaved=not cuda_graph, cuda_graph=cuda_graph)
            rows.append(row)
    return rows


def _graph_row(model, backbone, ids, mode: str, repeats: int, device) -> dict:
    """One (job, mode): the backbone's step captured as a CUDA graph and replayed `repeats` times (CUDA events
    around each replay); never raises for an OOM or an error in the capture (the row's status says)."""
    import statistics

    from ..bench.harness import result_fields
    from ..timing import Timer, capture_graph

    row = result_fields(device)
    keep = None
    try:
        if mode == "fwd":
            def step():
                with torch.no_grad():
                    backbone(ids, use_cache=False)
        else:
            with torch.no_grad():
                grad_out = torch.randn_like(backbone(ids, use_cache=False).last_hidden_state)

            def step():
                backbone(ids, use_cache=False).last_hidden_state.backward(grad_out)
                model.zero_grad(set_to_none=True)
        cap = capture_graph(step, model=model, warmup=2)
        keep = cap.keep
        times = []
        for _ in range(repeats):
            with Timer(device) as tm:
                cap.replay()
            times.append(tm.ms)
        # extra_mem_bytes: what the step itself allocates (activations, workspaces; the attention's share shows
        # here); peak_mem_bytes: with what was resident before it (the weights, the inputs), as the eager rows
        row.update(status="ok", ms=statistics.median(times), ms_rounds=times, repeats=len(times),
                   extra_mem_bytes=cap.step_bytes, peak_mem_bytes=cap.base_bytes + cap.step_bytes)
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", error=f"{type(e).__name__}: {e}"[:300])
    except Exception as e:  # recorded, not hidden: the row says what failed
        row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
    finally:
        del keep
        model.zero_grad(set_to_none=True)
    return row


def merge_rounds(runs: list[dict]) -> dict:
    """One row from a job's single-step rounds: the median time and the largest peak over the rounds; the first
    failing round's status and error when any failed."""
    import statistics

    bad = next((r for r in runs if r.get("status") != "ok"), None)
    if bad is not None:
        return dict(bad)
    row = dict(runs[0])
    row["ms"] = statistics.median(r["ms"] for r in runs)
    row["ms_rounds"] = [r["ms"] for r in runs]
    row["repeats"] = len(runs)
    for key in ("peak_mem_bytes", "extra_mem_bytes"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        row[key] = max(vals) if vals else None
    return row
