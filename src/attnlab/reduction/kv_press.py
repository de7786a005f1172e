"""KV-cache eviction after the prompt ("presses", kvpress's shape): each press scores every cached key of every
layer and KV head, and the cache keeps the best `keep` of them per head.

    press = PRESSES["snapkv"](evict=0.5)
    cache, kept, last = prefill(model, prompt_ids, press)          # the prompt's cache, half of it evicted
    logits = continue_scoring(model, cache, continuation, start=prompt_len)   # positions stay the original ones
    text_ids = generate(model, prompt_ids, press, max_new_tokens=32)          # greedy decoding on the pressed cache

Scores (higher = kept), per layer and KV head, from the prompt's own queries and keys (captured in the prefill
with `sdpa` swapped in, after rotary):
- `streaming_llm` (Xiao et al. 2023): the first `sinks` tokens, then the most recent ones; `window`: the most
  recent only (no sinks), the plain window StreamingLLM is measured against;
- `snapkv` (Li et al. 2024): the attention of the last `window` queries (an observation window), averaged over
  them and over the query heads of the KV head, smoothed by an average pool of `kernel`; the window itself kept;
- `tova` (Oren et al. 2024): the attention of the last query alone;
- `h2o` (Zhang et al. 2023): accumulated attention, the column sums over every query; `h2o_mean`: each sum divided
  by the queries that can see the key (the mean attention it receives, kvpress's ObservedAttentionPress);
- `snapkv_h2o_mean`: SnapKV's score plus `weight` (0.5) x h2o_mean's, each normalised per head (SnapKV's over
  its candidate keys, h2o_mean's over all keys);
- `knorm` (Devoto et al. 2024): keys with the smallest L2 norm kept;
- `random`: a seeded baseline.

Budget: `evict` (the fraction of the prompt's tokens evicted, kvpress's compression ratio) or `keep_tokens`.
Every layer and head keeps exactly the same count, so the cache stays a rectangular tensor, unless the press is
wrapped in `AdaKV` (Feng et al. 2024, "Ada-KV"; kvpress's AdaKVPress; names `adakv_<press>`): each layer keeps the
same total (the budget x KV heads) but shares it between its heads by the scores, every head keeping at least
`alpha` x the budget; the cache holds the largest head's count and the slots a head does not keep are masked out
of attention (the continuation runs through attnlab's `sdpa` with that per-head mask), so it saves no memory over
the plain press at the same budget: it spends the same memory where the scores say it matters. Two regimes:
- once, after the prompt (`prefill`, `generate`): the cache then grows by one token a step;
- bounded (`bounded`, `stream`, `generate(bounded_cache=True)`): a cache of at most `keep_tokens` between calls,
  pressed again whenever a chunk of text or a generated token overflows it, scored from that call's queries over
  every cached key (long-text scoring and decoding in constant memory, as StreamingLLM runs; H2O's scores are then
  the newest chunk's column sums, not accumulated over the whole history).
Continuing (`continue_scoring`, `generate`) passes position ids explicitly (the cache is shorter than the positions
it covers); positions are the original ones, never re-assigned inside the cache.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..types import AttnlabError


class Press:
    name = "press"

    def __init__(self, evict: float | None = None, keep_tokens: int | None = None, seed: int = 0):
        if (evict is None) == (keep_tokens is None):
            raise AttnlabError(f"{self.name}: give exactly one of evict (a fraction) or keep_tokens (a count)")
        if evict is not None and not (isinstance(evict, (int, float)) and 0 <= evict < 1):
            raise AttnlabError(f"{self.name}: evict must be a fraction in [0, 1), got {evict!r}")
        if keep_tokens is not None and (isinstance(keep_tokens, bool) or not isinstance(keep_tokens, int) or keep_tokens < 1):
            raise AttnlabError(f"{self.name}: keep_tokens must be an integer >= 1, got {keep_tokens!r}")
        self.evict, self.keep_tokens, self.seed = evict, keep_tokens, seed
        self.calls = 0  # presses applied by a bounded cache so far (random draws anew for each)

    def budget(self, t: int) -> int:
        """Tokens kept per head out of t."""
        if self.keep_tokens is not None:
            return min(t, self.keep_tokens)
        return max(1, t - math.floor(self.evict * t + 1e-9))

    def score(self, q: torch.Tensor, k: torch.Tensor, *, scale: float) -> torch.Tensor:
        """q [B, H, T, D], k [B, Hkv, T, D] (after rotary) -> [B, Hkv, T], higher = kept."""
        raise NotImplementedError


def _group_mean(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, ...] -> [B, Hkv, ...]: the mean over the query heads that share a KV head."""
    b, h = x.shape[:2]
    return x.view(b, kv_heads, h // kv_heads, *x.shape[2:]).mean(2)


def _last_rows_attention(q, k, *, scale: float, rows: int) -> torch.Tensor:
    """Softmax attention of the last `rows` queries over every key (causal, bottom-right: q's last row is key T-1's
    position, so q may hold only the newest rows, as while streaming), [B, H, rows, T] fp32."""
    from ..methods.base import repeat_kv

    t, tq = k.shape[-2], q.shape[-2]
    rows = min(rows, tq)
    kk = repeat_kv(k, q.shape[1] // k.shape[1]).float()
    s = torch.matmul(q[:, :, tq - rows:].float(), kk.transpose(-1, -2)) * scale
    pos = torch.arange(t - rows, t, device=q.device)[:, None]
    s = s.masked_fill(torch.arange(t, device=q.device)[None, :] > pos, float("-inf"))
    return s.softmax(-1)


class StreamingLLM(Press):
    name = "streaming_llm"

    def __init__(self, evict=None, keep_tokens=None, seed=0, sinks: int = 4):
        super().__init__(evict, keep_tokens, seed)
        self.sinks = sinks

    def score(self, q, k, *, scale):
        b, hkv, t, _ = k.shape
        pos = torch.arange(t, device=k.device, dtype=torch.float32)
        s = torch.where(pos < self.sinks, torch.full_like(pos, float("inf")), pos)
        return s.expand(b, hkv, t).clone()


class Window(StreamingLLM):
    """The most recent tokens only (StreamingLLM with no sinks): the plain sliding window StreamingLLM contrasts with."""
    name = "window"

    def __init__(self, evict=None, keep_tokens=None, seed=0):
        super().__init__(evict, keep_tokens, seed, sinks=0)


class SnapKV(Press):
    name = "snapkv"

    def __init__(self, evict=None, keep_tokens=None, seed=0, window: int = 32, kernel: int = 5):
        super().__init__(evict, keep_tokens, seed)
        self.window, self.kernel = window, kernel

    def score(self, q, k, *, scale):
        t = k.shape[-2]
        w = min(self.window, t, q.shape[-2])
        att = _group_mean(_last_rows_attention(q, k, scale=scale, rows=w).mean(2), k.shape[1])  # [B, Hkv, T]
        if self.kernel > 1:
            att = torch.nn.functional.avg_pool1d(att, self.kernel, stride=1, padding=self.kernel // 2,
                                                 count_include_pad=False)[..., :t]
        att[..., t - w:] = float("inf")  # the observation window stays
        return att


class TOVA(Press):
    name = "tova"

    def score(self, q, k, *, scale):
        return _group_mean(_last_rows_attention(q, k, scale=scale, rows=1)[:, :, 0], k.shape[1])


class H2O(Press):
    """Accumulated attention: each key's column sum over the queries (H2O's score). normalise=True divides it by
    how many queries can see the key (causal: the later a key, the fewer), the mean attention it receives, as
    kvpress's ObservedAttentionPress does; the raw sums favour early keys."""
    name = "h2o"

    def __init__(self, evict=None, keep_tokens=None, seed=0, normalise: bool = False):
        super().__init__(evict, keep_tokens, seed)
        self.normalise = normalise

    def score(self, q, k, *, scale):
        from ..methods.base import repeat_kv
        from ..ops.reference import blockwise_attention

        kk = repeat_kv(k, q.shape[1] // k.shape[1])
        _, _, cols = blockwise_attention(q, kk, kk, scale=scale, causal=True, need_out=False, need_col_sums=True)
        cols = cols.float()
        if self.normalise:  # queries sit at the last tq positions (bottom-right): key j is seen by min(tq, t - j)
            t, tq = k.shape[-2], q.shape[-2]
            cols = cols / (t - torch.arange(t, device=cols.device)).clamp(max=tq)
        return _group_mean(cols, k.shape[1])


class H2OMean(H2O):
    """H2O with each key's column sum divided by the queries that see it (the mean attention it receives)."""
    name = "h2o_mean"

    def __init__(self, evict=None, keep_tokens=None, seed=0):
        super().__init__(evict, keep_tokens, seed, normalise=True)


class SnapKVMean(Press):
    """SnapKV's view and the whole prompt's, summed: the observation window's attention (`snapkv`, the window kept)
    plus `weight` x the mean attention each key receives from every query that sees it (`h2o_mean`). SnapKV's
    score is normalised to sum to 1 over the keys outside its window (the candidates), h2o_mean's over all of a
    head's keys, the window's included (their share, 4-52% per head on SmolLM2, lowers the mean term's effective
    weight where the recent keys draw most attention; the committed results use this form). SnapKV alone misses
    keys the last queries happen not to read and the whole prompt's mean misses what the continuation is about to
    need; on SmolLM2 the sum evicts less of either (README, "Beside kvpress")."""
    name = "snapkv_h2o_mean"

    def __init__(self, evict=None, keep_tokens=None, seed=0, weight: float = 0.5, window: int = 32, kernel: int = 5):
        super().__init__(evict, keep_tokens, seed)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise AttnlabError(f"{self.name}: weight must be a number >= 0, got {weight!r}")
        self.weight = float(weight)
        self.snap = SnapKV(keep_tokens=1, window=window, kernel=kernel)
        self.mean = H2OMean(keep_tokens=1)

    def score(self, q, k, *, scale):
        snap = self.snap.score(q, k, scale=scale)
        window = torch.isinf(snap)  # SnapKV's observation window: kept whatever the sum
        snap = snap.masked_fill(window, 0.0)
        mean = self.mean.score(q, k, scale=scale)
        share = snap / snap.sum(-1, keepdim=True).clamp_min(1e-12)
        share = share + self.weight * mean / mean.sum(-1, keepdim=True).clamp_min(1e-12)
        return share.masked_fill(window, float("inf"))


class KNorm(Press):
    name = "knorm"

    def score(self, q, k, *, scale):
        return -k.float().norm(dim=-1)


class RandomPress(Press):
    name = "random"

    def score(self, q, k, *, scale):
        # a new draw for every press of a bounded cache (the same seed would evict the same cache slots each time
        # and keep, say, the first token for ever); the prompt-only press is the call-0 draw
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.calls)
        return torch.rand(k.shape[:3], generator=g).to(k.device)


PRESSES = {cls.name: cls for cls in (StreamingLLM, Window, SnapKV, TOVA, H2O, H2OMean, SnapKVMean, KNorm,
                                     RandomPress)}


class AdaKV(Press):
    """A press whose budget each layer shares between its KV heads by the press's own scores (Ada-KV), every head
    keeping at least `alpha` x the budget (Ada-KV's safeguard, 0.2). Prompt presses only (not a bounded cache)."""

    def __init__(self, press: Press, alpha: float = 0.2):
        if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
            raise AttnlabError(f"adakv: alpha must be in [0, 1], got {alpha!r}")
        super().__init__(press.evict, press.keep_tokens, press.seed)
        self.press, self.alpha = press, float(alpha)
        self.name = f"adakv_{press.name}"

    def score(self, q, k, *, scale):
        self.press.calls = self.calls
        return self.press.score(q, k, scale=scale)


class Pyramid(AdaKV):
    """Per-layer budgets (PyramidKV, Cai et al. 2024): the same total over the layers as the plain press, the lower
    layers keeping more and the upper fewer, linearly: layer l of L keeps budget x (1 + slope x (1 - 2 l / (L - 1)))
    (slope 0: the plain press; slope 1 - 1/beta is kvpress's PyramidKVPress(beta); a bottom budget above the prompt is
    capped at it and the top raised, as kvpress does; rounded so the total is exact). Heads of a layer keep equal counts; the layers'
    caches differ in length, so the continuation runs the masked path of AdaKV (every slot visible)."""

    def __init__(self, press: Press, slope: float = 0.5):
        if not (isinstance(slope, (int, float)) and 0 <= slope < 1):
            raise AttnlabError(f"pyramid: slope must be in [0, 1), got {slope!r}")
        super().__init__(press, alpha=1.0)
        self.slope = float(slope)
        self.name = f"pyramid_{press.name}"

    def layer_budgets(self, keep: int, n_layers: int, t: int) -> list[int]:
        if n_layers == 1:
            return [keep]
        hi, lo = keep * (1 + self.slope), keep * (1 - self.slope)
        if hi > t:  # the bottom layer cannot keep more than the prompt: cap it and raise the top (as kvpress does)
            hi, lo = t, 2 * keep - t
        want = [hi - (hi - lo) * i / (n_layers - 1) for i in range(n_layers)]
        out = [int(math.floor(w)) for w in want]
        for i in sorted(range(n_layers), key=lambda i: out[i] - want[i])[: keep * n_layers - sum(out)]:
            out[i] += 1  # the largest remainders first: the total is exactly keep x layers
        return [min(t, max(1, b)) for b in out]


WRAPPERS = {"adakv_": lambda press, kw: AdaKV(press, kw.get("alpha", 0.2)),
            "pyramid_": lambda press, kw: Pyramid(press, kw.get("slope", 0.5))}


def get_press(name: str, **kw) -> Press:
    """A press by name; `adakv_<name>` wraps press <name> in AdaKV (`alpha`, default 0.2), `pyramid_<name>` in
    Pyramid (`slope`, default 0.5)."""
    extra = {k: kw.pop(k) for k in ("alpha", "slope") if k in kw}
    prefix = next((p for p in WRAPPERS if name.startswith(p)), "")
    base = name[len(prefix):]
    try:
        cls = PRESSES[base]
    except KeyError:
        raise AttnlabError(f"unknown press {name!r}; presses: {', '.join(PRESSES)} (and adakv_<press>, pyramid_<press> "
                           "for each)") from None
    press = cls(**kw)
    return WRAPPERS[prefix](press, extra) if prefix else press


def _cache_layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None or not all(hasattr(lay, "keys") for lay in layers):
        raise AttnlabError(f"presses need a transformers DynamicCache with per-layer keys/values, got {type(cache).__name__}")
    return layers


def top_newest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` highest scores along the last dim; equal scores go to the newest (highest) position. A
    press's kept-anyway positions score +inf (SnapKV's observation window, StreamingLLM's sinks): when the budget is
    below their count, the newest of them stay, not whichever `topk` happens to return."""
    t = scores.shape[-1]
    if not 0 <= k <= t:
        raise ValueError(f"top_newest: k={k} outside [0, {t}]")
    order = torch.argsort(scores.flip(-1), dim=-1, descending=True, stable=True)[..., :k]
    return t - 1 - order


def compress(cache, scores: list[torch.Tensor], keep: int | list[int], alpha: float | None = None) -> torch.Tensor:
    """Keep the `keep` best-scored positions of every layer and KV head (ascending order); returns the kept
    indices [L, B, Hkv, keep]. With `alpha` (AdaKV), each layer keeps keep x Hkv positions shared between its
    heads (`allocate`); the indices are then [L, B, Hkv, K] with K the largest head's count over the layers and -1
    where a head keeps fewer, and the cache gets `attnlab_key_masks` (per layer Bool[B, Hkv, K_layer]: which of
    its slots a head really keeps)."""
    kept, masks = [], []
    layers = _cache_layers(cache)
    keeps = keep if isinstance(keep, (list, tuple)) else [keep] * len(layers)  # per layer (Pyramid) or one for all
    for layer, s, keep in zip(layers, scores, keeps):
        if alpha is None:
            idx = top_newest(s, keep).sort(-1).values  # [B, Hkv, keep]
        else:
            idx, valid = _head_slots(allocate(s, keep, alpha))
            masks.append(valid)
        layer.keys = layer.keys.gather(2, idx[..., None].expand(-1, -1, -1, layer.keys.shape[-1]))
        layer.values = layer.values.gather(2, idx[..., None].expand(-1, -1, -1, layer.values.shape[-1]))
        kept.append(idx)
    if alpha is not None:
        cache.attnlab_key_masks = masks
        width = max(k.shape[-1] for k in kept)  # layers differ in their largest head: -1 marks no slot
        kept = [torch.where(m, k, -1) for k, m in zip(kept, masks)]
        kept = [torch.nn.functional.pad(k, (0, width - k.shape[-1]), value=-1) for k in kept]
    return torch.stack(kept)


def allocate(scores: torch.Tensor, keep: int, alpha: float) -> torch.Tensor:
    """Ada-KV's budget split for one layer: scores [B, Hkv, T] -> Bool[B, Hkv, T] keeping exactly keep x Hkv
    positions per batch row: each head's best int(alpha x keep) (at least 1, as kvpress) first (the safeguard), then the best remaining
    scores of the layer, whichever head they are in."""
    b, hkv, t = scores.shape
    keep = min(keep, t)
    floor = min(keep, max(1, int(alpha * keep)) if alpha > 0 else 0)  # kvpress AdaKVPress's n_safe
    chosen = torch.zeros(b, hkv, t, dtype=torch.bool, device=scores.device)
    if floor:
        chosen.scatter_(-1, top_newest(scores, floor), True)
    rest = keep * hkv - floor * hkv
    if rest:  # across the heads, position-major so that equal scores go to the newest positions too
        flat = scores.float().masked_fill(chosen, float("-inf")).transpose(1, 2).reshape(b, t * hkv)
        pick = torch.zeros(b, t * hkv, dtype=torch.bool, device=scores.device)
        pick.scatter_(-1, top_newest(flat, rest), True)
        chosen |= pick.view(b, t, hkv).transpose(1, 2)
    return chosen


def _head_slots(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool[B, Hkv, T] -> (indices [B, Hkv, K] ascending, valid Bool[B, Hkv, K]), K the largest head's count; a
    head's unused slots repeat its last kept index and are marked invalid."""
    counts = chosen.sum(-1)  # [B, Hkv]
    k = int(counts.max())
    t = chosen.shape[-1]
    pos = torch.arange(t, device=chosen.device).expand_as(chosen)
    order = torch.where(chosen, pos, pos + t).sort(-1).values[..., :k]  # kept positions first, ascending
    valid = torch.arange(k, device=chosen.device) < counts[..., None]
    last = order.gather(-1, (counts - 1).clamp(min=0)[..., None]).clamp(max=t - 1)  # a head with no slot: any index
    return torch.where(valid, order, last), valid


@contextlib.contextmanager
def _capture_qk(model):
    """Within the block, each swapped layer's (q, k, scale) of its last call, by layer index."""
    from ..adapters.swap import method_modules, state, swapped

    got: dict[int, tuple] = {}

    def hook_for(i):
        def hook(module, args, kwargs, _out):
            got[i] = (args[0].detach(), args[1].detach(), kwargs.get("scale") or args[0].shape[-1] ** -0.5)
        return hook

    with swapped(model, "sdpa") if state(model) is None else contextlib.nullcontext():
        handles = [mod.register_forward_hook(hook_for(plan.index), with_kwargs=True) for plan, mod in method_modules(model)]
        try:
            yield got
        finally:
            for h in handles:
                h.remove()


def prefill(model, ids: torch.Tensor, press: Press | None):
    """Run the prompt `ids` [B, T]: (its KV cache pressed by `press`, the kept indices [L, B, Hkv, K] (None without a
    press), the logits of the prompt's last position [B, V])."""
    with (_capture_qk(model) if press is not None else contextlib.nullcontext({})) as got, torch.no_grad():
        out = model(ids, use_cache=True)
    cache, last = getattr(out, "cache", None) or out.past_key_values, out.logits[:, -1]
    if press is None:
        return cache, None, last
    return cache, _press(cache, got, press, press.budget(ids.shape[1])), last


def _press(cache, got: dict, press: Press, keep: int) -> torch.Tensor:
    """Score every layer's cached keys from the captured (q, k, scale) of the last call and keep `keep` per head."""
    layers = _cache_layers(cache)
    if len(got) != len(layers):
        raise AttnlabError(f"press: captured {len(got)} attention layers for a cache of {len(layers)}")
    budgets = press.layer_budgets(keep, len(layers), layers[0].keys.shape[-2]) if hasattr(press, "layer_budgets") \
        else keep
    return compress(cache, [press.score(*got[i][:2], scale=got[i][2]) for i in sorted(got)], budgets,
                    alpha=getattr(press, "alpha", None))


def continue_scoring(model, cache, continuation: torch.Tensor, *, start: int) -> torch.Tensor:
    """Logits [B, M, V] over `continuation` [B, M] after the (pressed) cache of a prompt of `start` tokens; position
    ids are the original ones (start .. start + M - 1), the mask covers the cache as it is."""
    b, m = continuation.shape
    past = cache.get_seq_length()
    pos = torch.arange(start, start + m, device=continuation.device).expand(b, m)
    mask = torch.ones(b, past + m, dtype=torch.long, device=continuation.device)
    masks = getattr(cache, "attnlab_key_masks", None)
    layers = _cache_layers(cache)
    if masks is None and len({lay.keys.shape[-2] for lay in layers}) > 1:
        # layers of different lengths (a per-layer budget, e.g. kvpress's PyramidKV): the model's own mask is sized
        # for layer 0, so run the masked path with every slot visible
        masks = [torch.ones(lay.keys.shape[:3], dtype=torch.bool, device=lay.keys.device) for lay in layers]
    with _head_masks(model, masks), torch.no_grad():
        return model(continuation, **{_cache_kwarg(model): cache}, position_ids=pos, attention_mask=mask,
                     use_cache=True).logits


@contextlib.contextmanager
def _head_masks(model, masks: list[torch.Tensor] | None):
    """Per-head key masks (AdaKV's cache: Bool[B, Hkv, K] per layer) applied inside attention: the model runs with
    attnlab's `sdpa` swapped in, each layer told its mask (keys past K, appended since the press, stay visible)."""
    if masks is None:
        yield
        return
    from ..adapters.swap import attention_sites, state, swapped

    if state(model) is not None:
        raise AttnlabError("an AdaKV-pressed cache runs the model with attnlab's sdpa and per-head masks; unswap the "
                           "model first")
    with swapped(model, "sdpa"):
        hosts = [mod for _, mod in attention_sites(model)]  # in layer order, as the cache's layers
        if len(hosts) != len(masks):
            raise AttnlabError(f"press: {len(masks)} per-head masks for a model of {len(hosts)} attention layers")
        try:
            for host, mask in zip(hosts, masks):
                host.attnlab_key_mask = mask
            yield
        finally:
            for host in hosts:
                host.attnlab_key_mask = None


def _cache_kwarg(model) -> str:
    """transformers >= 5.24 names the cache argument `cache` (`past_key_values` is deprecated); older ones do not."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generate(model, ids: torch.Tensor, press: Press | None, max_new_tokens: int = 32, *,
             bounded_cache: bool = False, chunk: int | None = None) -> torch.Tensor:
    """Greedy decoding (positions continue from the prompt's length): [B, max_new_tokens]. bounded_cache=False: the
    prompt's cache is pressed once, after the prompt, and grows by one token a step. bounded_cache=True (a press built
    with keep_tokens): the cache never exceeds keep_tokens + 1 while decoding; the prompt streams in chunks of
    `chunk` tokens (default keep_tokens // 2) and every generated token that overflows it is followed by a press
    scored from that token's query."""
    out = []
    with (bounded(model, press) if bounded_cache else contextlib.nullcontext()) as feed:
        if bounded_cache:
            if chunk is None:
                chunk = max(1, press.keep_tokens // 2) if press is not None else ids.shape[1]
            for s0 in range(0, ids.shape[1], chunk):
                logits = feed(ids[:, s0:s0 + chunk], s0)[:, -1]
        else:
            cache, _, logits = prefill(model, ids, press)

            def feed(x, start):
                return continue_scoring(model, cache, x, start=start)
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            logits = feed(nxt, ids.shape[1] + i)[:, -1]
    return torch.cat(out, dim=1)


class _Bounded:
    """Feeds tokens to a model on one KV cache, pressing the cache back to `press.keep_tokens` whenever a call leaves
    it longer, scored from that call's queries over every cached key (inside `_capture_qk`)."""

    def __init__(self, model, press: Press | None, got: dict):
        self.model, self.press, self.got = model, press, got
        self.cache, self.longest = None, 0

    def __call__(self, x: torch.Tensor, start: int) -> torch.Tensor:
        if self.cache is None:
            res = self.model(x, use_cache=True)
            self.cache = getattr(res, "cache", None) or res.past_key_values
            logits = res.logits
        else:
            logits = continue_scoring(self.model, self.cache, x, start=start)
        t = self.cache.get_seq_length()
        self.longest = max(self.longest, t)
        if self.press is not None and t > self.press.keep_tokens:
            _press(self.cache, self.got, self.press, self.press.keep_tokens)
            self.press.calls += 1
        return logits


@contextlib.contextmanager
def bounded(model, press: Press | None):
    """`with bounded(model, press) as feed: logits = feed(ids_chunk, start)`: one cache, never longer than
    press.keep_tokens between calls (press=None: unbounded, the reference)."""
    if press is not None and press.keep_tokens is None:
        raise AttnlabError(f"{press.name}: a bounded cache needs a press built with keep_tokens=N (the bound), not "
                           "evict=")
    if isinstance(press, AdaKV):
        raise AttnlabError(f"{press.name}: per-head or per-layer budgets press the prompt once; a bounded cache keeps "
                           "one count per head and layer (use the plain press)")
    with (_capture_qk(model) if press is not None else contextlib.nullcontext({})) as got, torch.no_grad():
        yield _Bounded(model, press, got)


def stream(model, ids: torch.Tensor, press: Press | None, *, chunk: int = 64) -> tuple[torch.Tensor, int]:
    """Score a long text with a bounded KV cache: `ids` [B, T] run in chunks of `chunk` tokens on one cache pressed
    back to `press.keep_tokens` after every chunk (positions stay the original ones). press=None: the same chunks on
    the full cache (the reference). Returns (logits Float[B, T, V] on the CPU, the longest cache attended over)."""
    with bounded(model, press) as feed:
        out = [feed(ids[:, s:s + chunk], s).float().cpu() for s in range(0, ids.shape[1], chunk)]
    return torch.cat(out, dim=1), feed.longest


def evaluate_stream(model, windows: torch.Tensor, *, max_caches, chunk: int, presses=tuple(PRESSES),
                    progress: bool = True, seed: int = 0) -> list[dict]:
    """Held-out windows [N, T] scored whole with the cache bounded to each of `max_caches` tokens (`stream`): per
    press and bound, KL(full cache || bounded cache), top-1 agreement and perplexity over the positions after the
    first `max_cache + chunk` (before them nothing was evicted), and the longest cache attended over. One row per
    (press, bound) plus the full cache (the same chunks on an unbounded cache) per bound."""
    from tqdm.auto import tqdm

    from ..metrics import fidelity as fm

    device = next(model.parameters()).device
    windows = windows.to(device)
    n, t = windows.shape
    for m in max_caches:
        if not 0 < m < t - chunk - 1:
            raise AttnlabError(f"--max-cache {m} must be in 1..{t - chunk - 2} (the window of {t} tokens must go on "
                               f"past the bound and one chunk of {chunk})")
    full = []
    for i in range(n):
        logits, longest_full = stream(model, windows[i:i + 1], None, chunk=chunk)
        full.append(logits)
    rows = []
    for m in max_caches:
        s0 = (m // chunk + 1) * chunk  # the first position that attends over a pressed cache
        ids = windows[:, s0:].cpu()  # positions s0 .. T-2 predict tokens s0+1 .. T-1
        base = [fm.next_token_stats(f[:, s0:], f[:, s0:], ids[i:i + 1]) for i, f in enumerate(full)]
        rows.append({"technique": "full_cache", "impl": "attnlab", "max_cache": m, "from_position": s0,
                     "longest_cache": longest_full, **fm.summarise(base)})
    jobs = [(p, m) for p in presses for m in max_caches]
    for name, m in tqdm(jobs, desc="presses (bounded cache)", disable=not progress):
        press = get_press(name, keep_tokens=m, seed=seed)
        s0 = (m // chunk + 1) * chunk
        stats, longest = [], 0
        for i in range(n):
            logits, longest = stream(model, windows[i:i + 1], press, chunk=chunk)
            stats.append(fm.next_token_stats(full[i][:, s0:], logits[:, s0:], windows[i:i + 1, s0:].cpu()))
        rows.append({"technique": name, "impl": "attnlab", "max_cache": m, "from_position": s0,
                     "longest_cache": longest, **fm.summarise(stats)})
    return rows


def kv_bytes(cache) -> int:
    return int(sum(lay.keys.numel() * lay.keys.element_size() + lay.values.numel() * lay.values.element_size()
                   for lay in _cache_layers(cache)))


def evaluate(model, windows: torch.Tensor, *, prompt_len: int, evicts, presses=tuple(PRESSES), progress: bool = True,
             seed: int = 0, alpha: float = 0.2, slope: float = 0.5) -> list[dict]:
    """Held-out windows [N, prompt_len + M]: per press and evicted fraction, KL(full cache || pressed cache) and
    perplexity over the continuation (teacher-forced, each position predicting the next), the KV bytes kept and
    the continuation's time. One row per (press, evict) plus the full cache."""
    from tqdm.auto import tqdm

    from ..metrics import fidelity as fm
    from ..timing import Timer

    from .token_prune import split_windows

    device = next(model.parameters()).device
    prompts, conts = split_windows(windows.to(device), prompt_len)
    n = prompts.shape[0]
    full, full_bytes, full_ms = [], 0, []
    for i in range(n):
        cache, _, _ = prefill(model, prompts[i:i + 1], None)
        full_bytes = kv_bytes(cache)
        with Timer(device) as tm:
            full.append(continue_scoring(model, cache, conts[i:i + 1], start=prompt_len).float().cpu())
        full_ms.append(tm.ms)
    base = [fm.next_token_stats(full[i], full[i], conts[i:i + 1].cpu()) for i in range(n)]
    rows = [{"technique": "full_cache", "impl": "attnlab", "evict": 0.0, **fm.summarise(base), "kv_bytes": full_bytes,
             "ms": sorted(full_ms)[n // 2]}]
    jobs = [(p, e) for p in presses for e in evicts]
    for name, e in tqdm(jobs, desc="presses", disable=not progress):
        press = get_press(name, evict=e, seed=seed, alpha=alpha, slope=slope)
        stats, ms, kb = [], [], 0
        for i in range(n):
            cache, _, _ = prefill(model, prompts[i:i + 1], press)
            kb = kv_bytes(cache)
            with Timer(device) as tm:
                logits = continue_scoring(model, cache, conts[i:i + 1], start=prompt_len)
            ms.append(tm.ms)
            stats.append(fm.next_token_stats(full[i], logits.float().cpu(), conts[i:i + 1].cpu()))
        rows.append({"technique": name, "impl": "attnlab", "evict": e, **fm.summarise(stats), "kv_bytes": kb,
                     "ms": sorted(ms)[n // 2]})
    return rows
