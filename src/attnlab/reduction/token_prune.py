"""Column-sum token pruning: score each token by the attention it receives, drop the least attended ones.

    with TokenPruner(model, keep=0.5, after=[2]) as pruner:          # an encoder: prune after layer 2
        out, kept = pruner(input_ids=ids, attention_mask=mask, special=special_tokens_mask)
        # out.last_hidden_state [B, K, E]; kept.index [B, K] (positions in the input), kept.valid [B, K]

    scores = prompt_scores(model, ids)                                # a causal LM: score a prompt, then
    kept = select_tokens(scores, 0.5, always=first_token)             # keep half of it and continue from
    logits = continue_from(model, ids, kept, continuation)            # there, positions preserved

Score (`ops.reference.received_attention`): the attention a token receives, averaged over heads and over the
queries that can see it, relative to uniform attention (1 = what uniform attention would give it). Normalising
by the queries that see a token keeps the scores of a causal model comparable along the sequence: raw column
sums favour early tokens, which more queries can see (LTP, Kim et al. 2022, normalise the same way).

Where tokens are dropped inside the model (`TokenPruner`), a forward hook on layer l's attention method computes
the scores from its q and k, and a forward pre-hook on layer l + 1 gathers the kept tokens out of everything
that layer receives (hidden states, the key padding mask, position ids and rotary cos/sin), so later layers run
on fewer tokens and each kept token keeps its original position. Progressive pruning (several layers in
`after`) keeps keep ** (1 / stages) at each stage (PoWER-BERT's progressive elimination), `threshold` keeps the
tokens scoring at least that much instead. Special tokens ([CLS], [SEP]: `special`) are always kept. Rows keep
different counts; the batch is padded to the largest and the padding masked, as any padded batch.

Baselines use the same machinery with other scores: `random` (seeded) and `first` (keep the first tokens,
PoWER-BERT's and many truncation baselines); `last` (the most recent, for a causal LM's prompt). For prompt
compression also H2O's scores (Zhang et al. 2023): `accumulated`, the plain column sums (no normalisation: early
tokens, seen by every query, gather the most), and `h2o`, the most recent half of the budget plus the rest by
accumulated attention (heavy hitters + recent window).
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import torch

from ..types import AttnlabError

TECHNIQUES = ("attention", "random", "first", "last")
PROMPT_TECHNIQUES = (*TECHNIQUES, "accumulated", "h2o")  # prompt compression: H2O's score, alone and + recent half


@dataclasses.dataclass
class Kept:
    index: torch.Tensor  # long [B, K]: positions in the input, ascending; padding slots repeat index 0
    valid: torch.Tensor  # bool [B, K]: False on the padding slots

    @property
    def counts(self) -> torch.Tensor:
        return self.valid.sum(-1)


def check_keep(keep: float | None, threshold: float | None) -> None:
    if (keep is None) == (threshold is None):
        raise AttnlabError("token pruning needs exactly one of keep (a fraction) or threshold (a score)")
    if keep is not None and not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise AttnlabError(f"keep must be a fraction in (0, 1], got {keep!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise AttnlabError(f"threshold must be a score >= 0 (1 = uniform attention), got {threshold!r}")


def technique_scores(technique: str, t: int, batch: int, device, *, attention=None, generator=None) -> torch.Tensor:
    """[B, T] scores, higher = keep: the attention scores, or a baseline's."""
    if technique == "attention":
        if attention is None:
            raise AttnlabError("technique 'attention' needs attention scores")
        return attention.float()
    pos = torch.arange(t, device=device, dtype=torch.float32).expand(batch, t)
    if technique == "first":
        return -pos
    if technique == "last":
        return pos.clone()
    if technique == "random":
        return torch.rand(batch, t, generator=generator).to(device)
    raise AttnlabError(f"unknown pruning technique {technique!r}; techniques: {', '.join(TECHNIQUES)}")


def select_tokens(scores: torch.Tensor, keep: float | None = None, *, threshold: float | None = None,
                  real: torch.Tensor | None = None, always: torch.Tensor | None = None) -> Kept:
    """Per row, the tokens to keep: with `keep`, ceil(keep x real tokens) of them (never fewer than the `always`
    ones, never fewer than 1); with `threshold`, those scoring >= threshold. `always` (Bool[B, T]) are kept
    whatever they score; `real` (Bool[B, T]) marks the non-padding tokens, the only candidates."""
    check_keep(keep, threshold)
    b, t = scores.shape
    real = torch.ones(b, t, dtype=torch.bool, device=scores.device) if real is None else real.bool()
    always = torch.zeros_like(real) if always is None else (always.bool() & real)
    if threshold is not None:
        chosen = real & ((scores >= threshold) | always)
        counts = chosen.sum(-1).clamp_min(1)  # a row with nothing above the threshold keeps its best token
        key = torch.where(always, torch.full_like(scores, float("inf")), scores.float())
        key = torch.where(chosen, key + 1e9, key)  # the chosen first, by score; then the rest by score
    else:
        counts = torch.maximum(torch.ceil(keep * real.sum(-1).float() - 1e-9).long(), always.sum(-1)).clamp_min(1)
        key = torch.where(always, torch.full_like(scores, float("inf")), scores.float())
    key = torch.where(real, key, torch.full_like(key, float("-inf")))
    counts = torch.minimum(counts, real.sum(-1).clamp_min(1))
    k = int(counts.max())
    top = torch.topk(key, k, dim=-1, sorted=True).indices  # best first
    valid = torch.arange(k, device=scores.device)[None, :] < counts[:, None]
    top = torch.where(valid, top, torch.full_like(top, t))  # padding slots sort last
    index = torch.sort(top, dim=-1).values
    valid = index < t
    return Kept(torch.where(valid, index, torch.zeros_like(index)), valid)


# ---- pruning inside the forward ----------------------------------------------------------------------------------
def _take(x, idx: torch.Tensor, t: int):
    """x with its sequence axis (length t) gathered at idx [B, K]; anything without one is returned as is."""
    if isinstance(x, (tuple, list)):
        return type(x)(_take(y, idx, t) for y in x)
    if not torch.is_tensor(x) or x.dim() == 0:
        return x
    b, k = idx.shape
    if x.dim() == 1:
        return (idx[0] if b == 1 else torch.arange(k, device=x.device)) if x.shape[0] == t else x  # cache_position
    if b > 1 and x.shape[0] == 1 and t in x.shape[1:]:  # broadcast over the batch (position ids, cos / sin, masks)
        x = x.expand(b, *x.shape[1:])
    if x.dim() == 3 and x.shape[1] == t:  # hidden states, rotary cos / sin [B, T, D]
        return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))
    if x.dim() == 2 and x.shape[1] == t:  # key padding mask, position ids [B, T]
        return x.gather(1, idx)
    if x.dim() == 4 and x.shape[-1] == t:  # a 4D mask [B, 1|H, Tq|1, T]
        x = x.gather(3, idx[:, None, None, :].expand(-1, x.shape[1], x.shape[2], -1))
        if x.shape[2] == t:
            x = x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, k))
        return x
    return x


def _with_valid(mask, valid: torch.Tensor):
    """The layer's attention mask with the padding slots of a pruned batch masked out as keys."""
    if valid.all():
        return mask
    if mask is None:
        return valid
    if mask.dim() == 2:
        return mask.bool() & valid
    if mask.dim() == 4 and mask.dtype == torch.bool:
        return mask & valid[:, None, None, :]
    if mask.dim() == 4:
        return mask.masked_fill(~valid[:, None, None, :], torch.finfo(mask.dtype).min)
    raise AttnlabError(f"token pruning: unexpected attention mask of shape {tuple(mask.shape)}")


def _layer_modules(model, names: list[str]):
    """The decoder / encoder layer module that holds each attention module (by name): the child of the
    ModuleList the attention sits in."""
    modules = dict(model.named_modules())
    out = []
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:i - 1]) if i > 1 else ""
            holder = modules.get(parent) if parent else model
            if isinstance(holder, torch.nn.ModuleList) and parts[i - 1].isdigit():
                out.append(modules[".".join(parts[:i])])
                break
        else:
            raise AttnlabError(f"token pruning: no layer list holds {name!r}")
    return out


class TokenPruner:
    """Prune tokens inside the forward after the layers in `after` (0-based). A context manager: it swaps
    `method` (default sdpa, the same function as the original) into a model with nothing swapped in, and
    restores it on exit; a model already swapped keeps its methods (pruning composes with them)."""

    def __init__(self, model, *, keep: float | None = None, threshold: float | None = None, after=(2,),
                 technique: str = "attention", seed: int = 0, method: str = "sdpa"):
        check_keep(keep, threshold)
        if technique not in TECHNIQUES:
            raise AttnlabError(f"unknown pruning technique {technique!r}; techniques: {', '.join(TECHNIQUES)}")
        self.model, self.technique, self.threshold, self.method = model, technique, threshold, method
        self.after = sorted({int(a) for a in after})
        if not self.after:
            raise AttnlabError("token pruning needs at least one layer in `after`")
        self.keep = None if keep is None else keep ** (1.0 / len(self.after))  # per stage
        self.seed = seed
        self._generator = torch.Generator()  # one stream over a `with` block's calls, seeded on __enter__
        self._handles: list = []
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        from ..adapters.swap import method_modules, state, swapped

        self._generator.manual_seed(self.seed)  # each `with` draws the same stream: a run repeats
        if state(self.model) is None:
            self._stack.enter_context(swapped(self.model, self.method))
        try:
            pairs = method_modules(self.model)
            n = len(pairs)
            bad = [a for a in self.after if not 0 <= a < n - 1]
            if bad:
                raise AttnlabError(f"token pruning: `after` layers must be in [0, {n - 2}] (the model has {n} "
                                   f"attention layers and pruning after the last one changes nothing), got {bad}")
            layers = _layer_modules(self.model, [plan.name for plan, _ in pairs])
            if self.technique == "attention":
                for a in self.after:
                    self._handles.append(pairs[a][1].register_forward_hook(self._score_hook(a), with_kwargs=True))
            for layer in range(self.after[0] + 1, n):  # every later layer: its inputs sliced to the kept tokens
                self._handles.append(layers[layer].register_forward_pre_hook(self._prune_hook(layer), with_kwargs=True))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stack.close()
        return False

    def __call__(self, *, special: torch.Tensor | None = None, **inputs):
        """Run the model on `inputs` (input_ids, attention_mask, ...); returns (model output, Kept)."""
        ids = inputs.get("input_ids")
        ref = ids if ids is not None else inputs["inputs_embeds"][..., 0]
        b, t = ref.shape[:2]
        mask = inputs.get("attention_mask")
        valid = torch.ones(b, t, dtype=torch.bool, device=ref.device) if mask is None else mask.bool()
        self._state = {"index": torch.arange(t, device=ref.device).expand(b, t), "valid": valid, "t0": t,
                       "special": torch.zeros_like(valid) if special is None else special.bool().to(ref.device),
                       "scores": {}, "generator": self._generator}
        try:
            out = self.model(**inputs)
            return out, Kept(self._state["index"], self._state["valid"])
        finally:
            self._state = None

    def _score_hook(self, layer):
        from ..methods.base import repeat_kv
        from ..ops.reference import received_attention

        def hook(module, args, kwargs, _out):
            if getattr(self, "_state", None) is None:
                return
            q, k = args[0], args[1]
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            self._state["scores"][layer] = received_attention(
                q.detach(), repeat_kv(k.detach(), q.shape[1] // k.shape[1]), scale=scale,
                causal=bool(kwargs.get("causal", False)), key_padding_mask=kwargs.get("key_padding_mask"))
        return hook

    def _prune_hook(self, layer):
        """Before `layer`: drop tokens if the layer before it is a pruning point (the hidden states arrive at the
        current length), then slice what the model hands every layer at the input length (masks, positions,
        rotary cos / sin) to the tokens kept so far."""
        def hook(module, args, kwargs):
            st = getattr(self, "_state", None)
            if st is None:
                return None
            positional = len(args) > 0
            hidden = args[0] if positional else kwargs["hidden_states"]
            if layer - 1 in self.after:
                valid, t = st["valid"], hidden.shape[1]
                scores = technique_scores(self.technique, t, valid.shape[0], valid.device,
                                          attention=st["scores"].pop(layer - 1, None), generator=st["generator"])
                kept = select_tokens(scores, self.keep, threshold=self.threshold, real=valid, always=st["special"])
                hidden = _take(hidden, kept.index, t)
                st["index"] = st["index"].gather(1, kept.index)
                st["valid"] = kept.valid
                st["special"] = st["special"].gather(1, kept.index) & kept.valid
            idx, t0 = st["index"], st["t0"]
            rest = _take(tuple(args[1:] if positional else args), idx, t0)
            kwargs = {key: (val if key == "hidden_states" else _take(val, idx, t0)) for key, val in kwargs.items()}
            if "attention_mask" in kwargs or len(rest) < (1 if positional else 2):
                kwargs["attention_mask"] = _with_valid(kwargs.get("attention_mask"), st["valid"])
            else:
                i = 0 if positional else 1
                rest = (*rest[:i], _with_valid(rest[i], st["valid"]), *rest[i + 1:])
            if positional:
                return (hidden, *rest), kwargs
            kwargs["hidden_states"] = hidden
            return rest, kwargs
        return hook


# ---- causal LM: prompt compression -----------------------------------------------------------------------------
def prompt_scores(model, ids: torch.Tensor, *, layers=None, method: str = "sdpa", normalise: bool = True) -> torch.Tensor:
    """[B, T] received-attention scores of a prompt under the model itself: one forward, the mean over `layers`
    (default: all) of each layer's `received_attention` (`normalise=False`: plain column sums, H2O's score)."""
    from ..adapters.swap import method_modules, state, swapped
    from ..methods.base import repeat_kv
    from ..ops.reference import received_attention

    acc: dict[int, torch.Tensor] = {}

    def hook_for(i):
        def hook(module, args, kwargs, _out):
            q, k = args[0], args[1]
            acc[i] = received_attention(q.detach(), repeat_kv(k.detach(), q.shape[1] // k.shape[1]),
                                        scale=kwargs.get("scale") or q.shape[-1] ** -0.5,
                                        causal=bool(kwargs.get("causal", False)),
                                        key_padding_mask=kwargs.get("key_padding_mask"), normalise=normalise)
        return hook

    with (swapped(model, method) if state(model) is None else contextlib.nullcontext()), torch.no_grad():
        pairs = method_modules(model)
        chosen = range(len(pairs)) if layers is None else layers
        handles = [pairs[i][1].register_forward_hook(hook_for(i), with_kwargs=True) for i in chosen]
        try:
            model(ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
    return torch.stack([acc[i] for i in sorted(acc)]).mean(0)


def continue_from(model, prompt: torch.Tensor, kept: Kept, continuation: torch.Tensor) -> torch.Tensor:
    """Logits [B, M, V] of the model over `continuation` [B, M] after only the kept prompt tokens (batch 1, or
    rows that keep the same count), each at its original position (rotary / learned positions stay right)."""
    if not bool(kept.valid.all()):
        raise AttnlabError("continue_from: rows keep different numbers of tokens; run them one at a time")
    b, t = prompt.shape
    m = continuation.shape[1]
    ids = torch.cat([prompt.gather(1, kept.index), continuation], dim=1)
    pos = torch.cat([kept.index, torch.arange(t, t + m, device=prompt.device).expand(b, m)], dim=1)
    # an explicit all-ones mask: with none, transformers reads a jump in position_ids as the start of another
    # packed sequence and would hide the kept prompt from the continuation
    with torch.no_grad():
        return model(ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False).logits[:, -m:]


def split_windows(windows: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out windows [N, T] -> (prompts [N, prompt_len], continuations [N, T - prompt_len]); at least 2
    continuation tokens (the first predicts the second)."""
    total = windows.shape[1]
    if not 1 <= prompt_len < total - 1:
        raise AttnlabError(f"prompt length {prompt_len} must leave at least 2 continuation tokens of {total}")
    return windows[:, :prompt_len], windows[:, prompt_len:]


def kv_bytes(model, tokens: int, dtype_bytes: int | None = None) -> int:
    """Bytes of the key/value cache for `tokens` tokens (all layers, the model's KV heads), in the model's dtype
    unless `dtype_bytes` says otherwise (what transformers' cache holds: `attnlab press` measures the same)."""
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if dtype_bytes is None:
        dtype_bytes = next(model.parameters()).element_size()
    return int(2 * c.num_hidden_layers * heads * head_dim * tokens * dtype_bytes)


__all__ = ["Kept", "PROMPT_TECHNIQUES", "TECHNIQUES", "TokenPruner", "check_keep", "continue_from", "kv_bytes",
           "prompt_scores", "select_tokens", "technique_scores"]


# ---- evaluations (attnlab prune) -----------------------------------------------------------------------------------
def evaluate_spam(model, tok, train, test, *, keeps, techniques=("attention", "random", "first"), after=(2,),
                  threshold=None, seq_len: int = 256, batch_size: int = 32, progress: bool = True,
                  head: str = "full", timing_repeats: int = 3, seed: int = 0) -> list[dict]:
    """Spam Assassin with an encoder (MiniLM), as `attnlab compare --task spam`: test accuracy with tokens pruned
    inside the model (mean pooling over the kept tokens) by a logistic head on mean-pooled embeddings, trained on
    the full model's embeddings of `train` (head="full": the model as shipped, pruning only at test time) or on
    embeddings of `train` computed with the same pruning (head="pruned": the head sees the features it will be
    tested on, as a pruned model fine-tuned for its task would). One row per (technique, keep), plus the original.

    `seconds`: the model's time over the test set (batches of `batch_size`, tokenized once beforehand), the median
    of `timing_repeats` passes timed after the accuracy pass (the warm-up), the device synchronised around each
    pass and nothing copied back; the attention technique's scoring runs inside it. `speedup`: the original's over
    the row's."""
    from tqdm.auto import tqdm

    from ..eval.compare import train_head
    from ..timing import sync

    if head not in ("full", "pruned"):
        raise AttnlabError(f"head must be 'full' or 'pruned', got {head!r}")
    if isinstance(timing_repeats, bool) or not isinstance(timing_repeats, int) or timing_repeats < 1:
        raise AttnlabError(f"timing_repeats must be an integer >= 1, got {timing_repeats!r}")
    device = next(model.parameters()).device
    ytr, yte = torch.tensor([y for _, y in train]), torch.tensor([y for _, y in test])

    def encode(items):  # tokenized once: the timed passes run the model only
        out = []
        for i in range(0, len(items), batch_size):
            enc = tok([t for t, _ in items[i:i + batch_size]], padding=True, truncation=True, max_length=seq_len,
                      return_tensors="pt", return_special_tokens_mask=True).to(device)
            out.append((enc.pop("special_tokens_mask"), dict(enc)))
        return out

    def forward(enc, special, pruner):
        if pruner is None:
            return model(**enc).last_hidden_state, enc["attention_mask"].bool()
        out, kept = pruner(special=special, **enc)
        return out.last_hidden_state, kept.valid

    def embed(batches, pruner=None, desc=""):
        feats, kept_n, real_n = [], 0, 0
        with torch.no_grad():
            for special, enc in tqdm(batches, desc=desc, leave=False, disable=not progress):
                h, valid = forward(enc, special, pruner)
                m = valid.unsqueeze(-1).float()
                feats.append(((h.float() * m).sum(1) / m.sum(1).clamp_min(1)).cpu())
                kept_n += int(valid.sum())
                real_n += int(enc["attention_mask"].sum())
        return torch.cat(feats), kept_n / max(1, real_n)

    def seconds(batches, pruner=None):
        times = []
        with torch.no_grad():
            for _ in range(timing_repeats):
                sync(device)
                t0 = time.perf_counter()
                for special, enc in batches:
                    forward(enc, special, pruner)
                sync(device)
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    train_b, test_b = encode(train), encode(test)
    full_head = train_head(embed(train_b, desc="embed train")[0], ytr)
    x0, _ = embed(test_b, desc="original")
    base_s = seconds(test_b)
    base_acc = accuracy(full_head, x0, yte)
    rows = [{"technique": "original", "keep": 1.0, "kept_fraction": 1.0, "accuracy": base_acc, "acc_retention": 1.0,
             "seconds": base_s, "speedup": 1.0, "head": head, "batch_size": batch_size, "seed": seed}]
    jobs = [(tech, k) for tech in techniques for k in keeps]
    for tech, k in tqdm(jobs, desc="prune", disable=not progress):
        with TokenPruner(model, keep=None if threshold is not None else k, threshold=threshold, after=after,
                         technique=tech, seed=seed) as pruner:
            x, frac = embed(test_b, pruner, desc=f"{tech} {k}")
            sec = seconds(test_b, pruner)
            clf = full_head if head == "full" else train_head(embed(train_b, pruner, desc=f"train {tech} {k}")[0], ytr)
        acc = accuracy(clf, x, yte)
        rows.append({"technique": tech, "keep": k, "threshold": threshold, "after": list(after), "head": head,
                     "batch_size": batch_size, "seed": seed, "kept_fraction": frac, "accuracy": acc, "acc_retention": acc / base_acc,
                     "seconds": sec, "speedup": base_s / sec})
    return rows


def accuracy(clf, x: torch.Tensor, y: torch.Tensor) -> float:
    """A logistic head's accuracy on features x against labels y (1 = positive logit)."""
    with torch.no_grad():
        return ((clf(x).squeeze(-1) > 0).long() == y).float().mean().item()


def evaluate_prompt(model, windows: torch.Tensor, *, prompt_len: int, keeps, techniques=PROMPT_TECHNIQUES,
                    threshold=None, seed: int = 0, progress: bool = True) -> list[dict]:
    """A causal LM's prompt compression on held-out windows [N, prompt_len + M]: score the prompt with the model
    itself (`prompt_scores`, all layers), keep a fraction of it (its first token, the attention sink, always),
    and read the continuation after the kept prompt at the original positions. KL(full prompt || kept prompt)
    and perplexity over the continuation's tokens predicted from inside the continuation (M - 1 per window), the
    forward's time over the kept prompt and the continuation (`ms`, the median over windows after a warm-up
    forward; the original's: the whole window), the scoring forward's time (`score_ms`: the prompt with the
    attention hooks; 0 for the positional and random baselines) and the prompt's KV-cache bytes, one row per
    (technique, keep) plus the full prompt."""

    from tqdm.auto import tqdm

    from ..metrics import fidelity as fm
    from ..timing import time_ms

    device = next(model.parameters()).device
    windows = windows.to(device)  # the full-prompt forwards read the windows whole
    prompts, conts = split_windows(windows, prompt_len)
    n = prompts.shape[0]
    always = torch.zeros(1, prompt_len, dtype=torch.bool, device=device)
    always[:, 0] = True

    def score(i, logits):  # continuation positions 0..M-2 predict its tokens 1..M-1
        return fm.next_token_stats(full[i], logits.float().cpu(), conts[i:i + 1].cpu())

    full, full_ms, attn_scores, acc_scores, score_ms = [], [], [], [], {"attention": [], "accumulated": []}
    with torch.no_grad():
        model(windows[:1], use_cache=False)  # warm-up: the first forward pays kernel selection and allocation
        if {"attention", "accumulated", "h2o"} & set(techniques):
            prompt_scores(model, prompts[:1])  # and the first scoring forward (hooks, the chunked softmax)
        for i in tqdm(range(n), desc="full prompt", disable=not progress):
            logits, ms = time_ms(lambda: model(windows[i:i + 1], use_cache=False).logits[:, prompt_len:], device)
            full.append(logits.float().cpu())
            full_ms.append(ms)
            one = prompts[i:i + 1]
            sc, ms = time_ms(lambda: prompt_scores(model, one), device) if "attention" in techniques else (None, None)
            attn_scores.append(sc)
            score_ms["attention"].append(ms)
            sc, ms = (time_ms(lambda: prompt_scores(model, one, normalise=False), device)
                      if {"accumulated", "h2o"} & set(techniques) else (None, None))
            acc_scores.append(sc)
            score_ms["accumulated"].append(ms)
    rows = [{"technique": "original", "keep": 1.0, "kept_fraction": 1.0, **fm.summarise([score(i, full[i]) for i in range(n)]),
             "ms": sorted(full_ms)[n // 2], "score_ms": 0.0, "kv_bytes": kv_bytes(model, prompt_len)}]
    jobs = [(tech, k) for tech in techniques for k in keeps]
    for tech, k in tqdm(jobs, desc="prune prompt", disable=not progress):
        stats, ms, kept_total = [], [], 0
        gen = torch.Generator().manual_seed(seed)  # per row: a row does not depend on which others the run has
        for i in range(n):
            base_tech = "attention" if tech in ("accumulated", "h2o") else tech
            sc = technique_scores(base_tech, prompt_len, 1, device, generator=gen,
                                  attention=acc_scores[i] if tech in ("accumulated", "h2o") else attn_scores[i])
            keep_now = always
            if tech == "h2o":
                recent = int(k * prompt_len) // 2
                keep_now = always.clone()
                keep_now[:, prompt_len - recent:] = True
            kept = select_tokens(sc, None if threshold is not None else k, threshold=threshold, always=keep_now)
            kept_total += int(kept.counts.sum())
            logits, t = time_ms(lambda: continue_from(model, prompts[i:i + 1], kept, conts[i:i + 1]), device)
            ms.append(t)
            stats.append(score(i, logits))
        scored = score_ms["attention" if tech == "attention" else "accumulated"] if tech in (
            "attention", "accumulated", "h2o") else None
        rows.append({"technique": tech, "keep": k, "threshold": threshold, "kept_fraction": kept_total / (n * prompt_len),
                     **fm.summarise(stats), "ms": sorted(ms)[n // 2],
                     "score_ms": sorted(scored)[n // 2] if scored else 0.0,
                     "kv_bytes": kv_bytes(model, round(kept_total / n))})
    return rows
