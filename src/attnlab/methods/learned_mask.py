"""Learned block-sparse attention: which key blocks each query block attends to, per layer and head, at a target
density (the fraction of the causal block pairs kept), learned by distillation (`attnlab distill`).

Two forms:

- `form="static"`: a score per head and block distance, theta[h, d] (d = query block - key block), plus the
  diagonal block always kept. At any length n (nb blocks) the layer keeps
  the (head, distance) pairs with the highest scores until the density is met: the heads share the layer's
  budget, so a head that needs far context can take it from heads that only look nearby (DuoAttention and MoA
  found layers and heads differ that way). One trained mask transfers across lengths. `init="window"`: scores
  prefer near distances (untrained, a sliding window of the density); `init="data"`: on the first training
  batch the scores are set from the original attention's mass per head and distance (`calibrate`), then learned.
- `form="content"` (SeerAttention, Gao et al. 2024): block scores from the input itself: queries average-pooled
  per block, keys max-, min- and average-pooled, each through a learned per-head projection,
  A = (pool(q) W_q)(pool(k) W_k)^T / sqrt(gate_dim); each query block keeps its top blocks by A (the row's
  share of the density), plus the diagonal and sink blocks. Trained layer-locally toward the original
  attention's block distribution (each block pair's largest attention probability, rows normalised) with a
  KL loss the module leaves in `aux_loss` during training; the output itself uses the hard selection.

Under the learned blocks every query also keeps a token-level band of its `local` previous tokens (default: one
block) and the first `sinks` tokens: a block "staircase" alone would give the first queries of a block less
nearby context than a sliding window of the same density, and a whole sink block costs a block per row where
StreamingLLM's 4 sink tokens do.

Training (module in training mode, scores requiring grad): straight-through gates, value = the hard mask,
gradient = sigmoid(theta / temperature). The static form runs the hard mask through the sparse kernel (as in
inference) and adds the gates' gradient in the backward (`ops.gated.straight_through_blocks`: one dense pass,
a chunk of query rows at a time); the content form's gates run through `ops.gated.gated_attention`.
Otherwise the hard mask is a `patterns.BlockPattern` (per head) run by `ops.sparse`: FlexAttention BlockMasks on
CUDA (dropped blocks are skipped: inference costs what the density says), the gathered kernel on CPU.
Exact limit: density 1 (every causal block kept).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .. import masks
from ..ops import sparse as sparse_ops
from ..ops.gated import gated_attention, straight_through_blocks
from ..patterns import BlockPattern, UnionPattern, WindowPattern
from ..registry import register
from ..types import AttnOutput, Capabilities, OptionError, data_version, opt
from .base import AttentionMethod, leading_padding, padding_groups
from .dense import column_sums, dense_attention


def query_rows(allowed: torch.Tensor | None, s: int, e: int) -> torch.Tensor | None:
    """`masks.combine`'s allowed [B|1, H|1, Tq|1, Tk] for query rows s:e; a key-padding-only mask ([B, 1, 1, Tk])
    is every row's (sliced, it had no rows left past the first)."""
    return allowed if allowed is None or allowed.shape[-2] == 1 else allowed[..., s:e, :]


@register("learned_mask")
class LearnedMask(AttentionMethod):
    """Block-sparse attention whose blocks are learned (static per distance, or content-based): trainable."""
    complexity = ("O(ρ n² d)", "O(n + (n/b)²)", "ρ: density, b: block_size (the block table)")

    capabilities = Capabilities(causal=True, padding=True, probs=True, trainable=True, extras=("lse", "col_sums"))

    @dataclasses.dataclass
    class Options:
        density: float = opt(0.5, "fraction of the causal block pairs kept, in (0, 1]", low=0.0, high=1.0)
        form: str = opt("static", "static (scores per head and block distance) | content (SeerAttention gate)",
                        choices=("static", "content"))
        block_size: int = opt(64, "tokens per block", low=1)
        sinks: int = opt(4, "leading key tokens every query keeps (StreamingLLM's attention sinks)", low=0)
        sink_blocks: int = opt(0, "leading key blocks every query keeps (block-level sinks, on top of `sinks`)", low=0)
        local: int = opt(-1, "tokens back every query always sees, a token-level band under the learned blocks "
                             "(-1: one block; 0: none)", low=-1)
        max_blocks: int = opt(256, "static: block distances with a learned score (longer inputs are refused)", low=1)
        gate_dim: int = opt(64, "content: width of the pooled query/key projections", low=1)
        temperature: float = opt(1.0, "softness of the straight-through gates in training", low=1e-3)
        init: str = opt("window", "static: window (near distances first) | data (scores from the original attention's "
                                  "mass per head and distance on the first training batch)", choices=("window", "data"))
        backend: str = opt("auto", "the static form's kernel: auto (on CUDA in bf16 / fp16 the Triton block kernels "
                                   "for 16-64-token blocks with a band or sinks, else flex; torch elsewhere) | triton | "
                                   "flex | torch",
                           choices=sparse_ops.BACKENDS)

        def __post_init__(self):
            if isinstance(self.density, (int, float)) and not isinstance(self.density, bool) and not 0 < self.density <= 1:
                raise OptionError(f"learned_mask: density must be in (0, 1], got {self.density!r}")

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        o = self.opts
        if o.form == "static":
            # near distances first: untrained, the mask is a sliding window of the target density
            self.scores = nn.Parameter(-0.05 * torch.arange(o.max_blocks, dtype=torch.float32).expand(num_heads, -1).clone())
            self.register_buffer("calibrated", torch.tensor(o.init == "window"))
        else:
            dg = o.gate_dim
            eye_q = torch.eye(head_dim, dg)  # identity-like init: the gate starts as pooled-q . pooled-k
            self.w_q = nn.Parameter(eye_q.expand(num_heads, -1, -1).clone())  # (H, D, dg)
            self.w_k = nn.Parameter((torch.cat([eye_q, eye_q, eye_q]) / 3).expand(num_heads, -1, -1).clone())  # (H, 3D, dg)
        self.max_len = o.block_size * o.max_blocks if o.form == "static" else None
        self.aux_loss: torch.Tensor | None = None
        self._patterns: dict = {}  # (nb, causal, device) -> (scores version, pattern, its blocks): derived, not state

    @classmethod
    def defaults(cls, seq_len, given=None):
        # max_blocks covers seq_len in blocks of the given block_size where it is smaller than 16
        bs = min(16, int((given or {}).get("block_size", 16)))
        return {"density": 0.5, "block_size": max(16, min(64, seq_len // 8)), "max_blocks": max(64, -(-seq_len // bs))}

    @classmethod
    def exact_limit(cls, tq, tk):
        return {"density": 1.0, "block_size": 4, "max_blocks": -(-max(tq, tk) // 4)}

    @classmethod
    def test_options(cls, seq_len):
        return {"density": 0.5, "block_size": max(2, seq_len // 8), "max_blocks": 16}

    # ---- which blocks ----------------------------------------------------------------------------------------
    def _visible_blocks(self, nb: int, causal: bool, device) -> torch.Tensor:
        a = torch.arange(nb, device=device)
        return a[:, None] >= a[None, :] if causal else torch.ones(nb, nb, dtype=torch.bool, device=device)

    def _forced(self, nb: int, causal: bool, device) -> torch.Tensor:
        a = torch.arange(nb, device=device)
        forced = (a[:, None] == a[None, :]) | (a[None, :] < self.opts.sink_blocks)
        return forced & self._visible_blocks(nb, causal, device)

    def static_layout(self, nb: int, causal: bool) -> torch.Tensor:
        """Bool[H, nb, nb]: per head, the forced blocks plus the best-scored distances until the density is met.
        Chosen on the CPU (a few hundred numbers; no device syncs in the loop), returned on the scores' device."""
        device = torch.device("cpu")
        visible = self._visible_blocks(nb, causal, device)
        forced = self._forced(nb, causal, device)
        scores = self.scores.detach()[:, :nb].float().cpu()
        target = math.ceil(self.opts.density * int(visible.sum()))
        a = torch.arange(nb, device=device)
        dist = (a[:, None] - a[None, :]).abs()  # (nb, nb); causal: the visible ones are >= 0 anyway
        # pairs a distance d would add beyond the forced ones
        gain = torch.zeros(nb, dtype=torch.long).index_add_(0, dist[visible & ~forced], torch.ones(1, dtype=torch.long).expand(
            int((visible & ~forced).sum()))).tolist()  # pairs each distance adds beyond the forced ones
        heads = self.num_heads
        kept, budget = heads * int(forced.sum()), heads * target  # the layer's budget, shared by its heads
        chosen = torch.zeros(heads, nb, dtype=torch.bool)
        for flat in torch.argsort(scores.flatten(), descending=True, stable=True).tolist():
            if kept >= budget:
                break
            h, d = divmod(flat, nb)
            if gain[d] > 0:
                chosen[h, d] = True
                kept += gain[d]
        return (forced | (chosen[:, dist] & visible)).to(self.scores.device)  # (H, nb, nb)

    def _pooled_scores(self, q, k, causal: bool) -> torch.Tensor:
        """content form: block scores A [B, H, nb, nb] (causal blocks only; -inf elsewhere) from pooled q and k."""
        bs, tq, tk = self.opts.block_size, q.shape[-2], k.shape[-2]
        nb = -(-tk // bs)
        pad_q, pad_k = nb * bs - tq, nb * bs - tk  # queries padded at the front: bottom-right positions
        qf, kf = q.float(), k.float()
        qp = torch.nn.functional.pad(qf, (0, 0, pad_q, 0)).unflatten(-2, (nb, bs))  # (B, H, nb, bs, D)
        kp = torch.nn.functional.pad(kf, (0, 0, 0, pad_k)).unflatten(-2, (nb, bs))
        n_q = torch.nn.functional.pad(torch.ones(tq, device=q.device), (pad_q, 0)).unflatten(0, (nb, bs))  # (nb, bs)
        n_k = torch.nn.functional.pad(torch.ones(tk, device=q.device), (0, pad_k)).unflatten(0, (nb, bs))
        q_avg = qp.sum(-2) / n_q.sum(-1).clamp_min(1)[:, None]
        real = n_k[..., None] > 0  # (nb, bs, 1)
        k_max = kp.masked_fill(~real, float("-inf")).amax(-2)
        k_min = kp.masked_fill(~real, float("inf")).amin(-2)
        k_avg = kp.sum(-2) / n_k.sum(-1).clamp_min(1)[:, None]
        gq = torch.einsum("bhnd,hde->bhne", q_avg, self.w_q)  # (B, H, nb, dg)
        gk = torch.einsum("bhnd,hde->bhne", torch.cat([k_max, k_min, k_avg], -1), self.w_k)
        a = torch.matmul(gq, gk.transpose(-1, -2)) / math.sqrt(self.opts.gate_dim)  # (B, H, nb, nb)
        return a.masked_fill(~self._visible_blocks(nb, causal, q.device), float("-inf"))

    def content_layout(self, scores: torch.Tensor, causal: bool) -> torch.Tensor:
        """Bool[B, H, nb, nb]: each block row keeps its top blocks (its share of the density) + forced ones."""
        nb = scores.shape[-1]
        visible = self._visible_blocks(nb, causal, scores.device)
        forced = self._forced(nb, causal, scores.device)
        per_row = torch.ceil(self.opts.density * visible.sum(-1)).long()  # (nb,)
        rank = torch.argsort(torch.argsort(scores.masked_fill(forced, float("inf")), dim=-1, descending=True), dim=-1)
        return ((rank < per_row[:, None]) & visible) | forced

    # ---- attention -------------------------------------------------------------------------------------------
    def _layout(self, q, k, causal):
        nb = -(-k.shape[-2] // self.opts.block_size)
        if self.opts.form == "static":
            return self.static_layout(nb, causal)
        return self.content_layout(self._pooled_scores(q, k, causal).detach(), causal)

    @property
    def local(self) -> int:
        return self.opts.block_size if self.opts.local < 0 else self.opts.local

    def _pattern(self, nb: int, causal: bool):
        """The hard mask as a pattern, one object per (nb, causal, device): when the scores change (a training
        step) its layout buffer is updated in place, so FlexAttention keeps the mask_mod it compiled and only the
        BlockMask (built from block tables) is rebuilt."""
        key = (nb, causal, str(self.scores.device))
        version = data_version(self.scores)
        hit = self._patterns.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        layout = self.static_layout(nb, causal)
        if hit is not None:
            blocks, pat = hit[2], hit[1]
            if not torch.equal(blocks.layout, layout):
                blocks.set_blocks(layout)
        else:
            self._patterns.clear()
            blocks = BlockPattern.from_blocks(layout, self.opts.block_size)
            pat = UnionPattern(blocks, WindowPattern(self.local, self.opts.sinks)) if (self.local or self.opts.sinks) else blocks
        self._patterns[key] = (version, pat, blocks)
        return pat

    def _band(self, rows_pos: torch.Tensor, kidx: torch.Tensor) -> torch.Tensor:
        """Bool[C, K]: the local band (|pos(i) - j| <= local) and the sink tokens; causal is applied by the caller."""
        return ((rows_pos[:, None] - kidx[None, :]).abs() <= self.local) | (kidx[None, :] < self.opts.sinks)

    def _token_mask(self, layout: torch.Tensor, tq: int, tk: int) -> torch.Tensor:
        """Bool[..., Tq, Tk] from a block layout [..., nb, nb] (bottom-right query positions), band included."""
        bs = self.opts.block_size
        pos = torch.arange(tq, device=layout.device) + tk - tq
        kidx = torch.arange(tk, device=layout.device)
        mask = layout[..., (pos.clamp(min=0) // bs)[:, None], (kidx // bs)[None, :]]
        return mask | self._band(pos, kidx)

    def _unsupported_reasons(self, *, causal, tq, tk, dtype, device, need_lse=False, need_col_sums=False,
                             need_probs=False):
        """The static form's sparse kernel (`ops.sparse`: an explicit backend that cannot run here is refused before
        compute, as for window and block_sparse); the content form and need_probs run their own PyTorch paths."""
        o = self.opts
        if need_probs or o.form != "static":
            return []
        why = sparse_ops.unsupported_reasons(o.backend, device, need_lse=need_lse, need_col_sums=need_col_sums,
                                             head_dim=self.head_dim, dtype=dtype, tq=tq, tk=tk, heads=self.num_heads)
        if o.backend == "triton":  # the layout's blocks on the block kernels
            why += sparse_ops.block_size_unsupported(o.block_size, tq, tk)
        return why

    def flops(self, tq, tk, causal, *, grad=False):
        return None  # not counted yet: bench rows carry only the dense-equivalent count for this method

    def anchored(self):
        return True  # its blocks are a grid from position 0 (and it may keep sinks)

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs, need_lse=False,
                need_col_sums=False):
        o, tq, tk = self.opts, q.shape[-2], k.shape[-2]
        if o.form == "static" and -(-tk // o.block_size) > o.max_blocks:
            from ..types import UnsupportedError

            raise UnsupportedError(f"method 'learned_mask' learned scores for {o.max_blocks} block distances "
                                   f"({o.max_blocks * o.block_size} tokens), got Tk={tk}; build it with a larger max_blocks")
        self.aux_loss = None
        if o.form == "content" and self.training and torch.is_grad_enabled():
            self.aux_loss = self._gate_loss(q, k, causal, key_padding_mask, scale)
        train_scores = o.form == "static" and self.training and torch.is_grad_enabled() and self.scores.requires_grad
        if need_probs or (o.form == "content" and (need_lse or need_col_sums)):
            layout = self._layout(q, k, causal)
            allowed = self._token_mask(layout, tq, tk)
            allowed = allowed[None] if allowed.dim() == 3 else allowed  # (B|1, H, Tq, Tk)
            out, probs, lse = dense_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                              attn_mask=allowed, scale=scale, need_lse=True)
            self.kernel = "dense"
            return AttnOutput(out, probs if need_probs else None, lse=lse if need_lse else None,
                              col_sums=column_sums(probs, key_padding_mask) if need_col_sums else None)
        if train_scores and not (need_lse or need_col_sums):
            return self._train_static(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale), None
        if o.form == "content":
            layout = self._layout(q, k, causal)  # (B, H, nb, nb), per input
            self.kernel = "gated-hard"
            gate_fn = self._hard_gate(layout, tq, tk)
            return gated_attention(q, k, v, gate_fn, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                                   chunk=max(o.block_size, 64), use_checkpoint=False), None
        pat = self._pattern(-(-tk // o.block_size), causal)
        res, self.kernel = sparse_ops.sparse_attention(
            q, k, v, pat, causal=causal, key_padding_mask=key_padding_mask, scale=scale, backend=o.backend,
            need_lse=need_lse, need_col_sums=need_col_sums,
            flex_block_size=sparse_ops.flex_block_for(o.block_size))
        return res

    def _train_static(self, q, k, v, *, causal, key_padding_mask, scale):
        """Training forward of the static form: the hard mask through the sparse kernel (as in inference), with
        the straight-through gradient of the scores attached (`ops.gated.straight_through_blocks`): d gate /
        d theta[h, d] = sigmoid'(theta[h, d] / T) / T for every visible block pair at distance d that is not
        forced, token pairs of the band and the sinks excluded. The same gradient as `_static_gate` through
        `gated_attention` (the reference the tests hold it to), without the checkpointed dense forward."""
        o, tk = self.opts, k.shape[-2]
        if o.backend == "flex" and q.device.type == "cpu":
            from ..types import UnsupportedError

            raise UnsupportedError("backend='flex' on CPU cannot train the static mask (FlexAttention is inference-only "
                                   "there and returns no log-sum-exp); use backend='torch' to train on CPU, or .eval()")
        if scale is None:
            scale = q.shape[-1] ** -0.5
        nb = -(-tk // o.block_size)
        res, self.kernel = sparse_ops.sparse_attention(
            q, k, v, self._pattern(nb, causal), causal=causal, key_padding_mask=key_padding_mask, scale=scale,
            backend=o.backend, need_lse=True, flex_block_size=sparse_ops.flex_block_for(o.block_size))
        self.kernel += "+st"
        a = torch.arange(nb, device=q.device)
        dist = (a[:, None] - a[None, :]).abs()
        free = self._visible_blocks(nb, causal, q.device) & ~self._forced(nb, causal, q.device)

        def to_theta(block_grads):  # (B, H, nbq, nbk) -> (H, max_blocks)
            soft = torch.sigmoid(self.scores.detach().to(block_grads.dtype)[:, :nb] / o.temperature)
            per_pair = block_grads.sum(0)[:, :nb, :nb] * free  # (H, nb, nb)
            d_theta = torch.zeros_like(self.scores, dtype=block_grads.dtype)
            d_theta[:, :nb] = torch.zeros(self.num_heads, nb, dtype=block_grads.dtype, device=q.device).index_add_(
                1, dist.flatten(), per_pair.flatten(1)) * soft * (1 - soft) / o.temperature
            return d_theta.to(self.scores.dtype)

        def exclude(pos, kidx):
            return self._band(pos, kidx)

        return straight_through_blocks(res.out, res.lse, self.scores, q, k, v, to_theta=to_theta, scale=scale,
                                       causal=causal, key_padding_mask=key_padding_mask, block_size=o.block_size,
                                       exclude=exclude)

    def _static_gate(self, tq, tk, causal):
        """Straight-through gates for rows [s, e) x keys kidx: value = the hard layout, gradient = sigmoid(theta/T)."""
        o = self.opts
        nb = -(-tk // o.block_size)
        hard = self.static_layout(nb, causal)  # (H, nb, nb), on the scores' device
        forced = self._forced(nb, causal, self.scores.device)

        def gate(s, e, kidx):
            pos = torch.arange(s, e, device=kidx.device) + tk - tq
            rows = pos.clamp(min=0) // o.block_size  # (C,)
            cols = kidx // o.block_size  # (K,)
            dist = (rows[:, None] - cols[None, :]).abs()  # (C, K)
            soft = torch.sigmoid(self.scores[:, dist] / o.temperature)  # (H, C, K)
            h = hard[:, rows[:, None], cols[None, :]].to(soft.dtype)
            st = h + soft - soft.detach()
            always = forced[rows[:, None], cols[None, :]] | self._band(pos, kidx)
            return torch.where(always, torch.ones_like(st), st)[None]  # (1, H, C, K)

        return gate

    def _hard_gate(self, layout, tq, tk):
        bs = self.opts.block_size

        def gate(s, e, kidx):
            pos = torch.arange(s, e, device=kidx.device) + tk - tq
            g = layout[:, :, (pos.clamp(min=0) // bs)[:, None], (kidx // bs)[None, :]]  # (B, H, C, K)
            return (g | self._band(pos, kidx)).float()

        return gate

    def _gate_loss(self, q, k, causal, key_padding_mask, scale) -> torch.Tensor:
        """KL(target || softmax(A)) per block row: target = the original attention's largest probability in each
        block pair, rows normalised (computed a block of queries at a time, no grad)."""
        bs, tq, tk = self.opts.block_size, q.shape[-2], k.shape[-2]
        nb = -(-tk // bs)
        with torch.no_grad():
            target = torch.zeros(q.shape[0], q.shape[1], nb, nb, device=q.device)
            allowed, _ = masks.combine(tq, tk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
            for a in range(nb):
                s, e = max(0, a * bs - (tk - tq)), min(tq, (a + 1) * bs - (tk - tq))
                if e <= s:
                    continue
                sc = torch.matmul(q[:, :, s:e].float(), k.float().transpose(-1, -2)) * scale
                p = masks.masked_softmax(sc, query_rows(allowed, s, e))  # (B, H, C, Tk)
                p = torch.nn.functional.pad(p, (0, nb * bs - tk)).unflatten(-1, (nb, bs))
                target[:, :, a] = p.amax(dim=(-3, -1))
            target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
        logits = self._pooled_scores(q, k, causal)
        logp = torch.log_softmax(logits.float(), dim=-1)
        terms = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - logp), torch.zeros_like(target))
        return terms.sum(-1).mean()

    # ---- data-informed start ---------------------------------------------------------------------------------------
    def needs_calibration(self) -> bool:
        return self.opts.form == "static" and not bool(self.calibrated)

    @torch.no_grad()
    def calibrate(self, q, k, *, causal: bool, key_padding_mask=None, scale: float) -> None:
        """Set the scores from the original attention on (q, k) [B, H, T, D]: log of the mean probability a query
        block puts on one key block at each distance, per head (blockwise: a block of query rows at a time). Rows
        are measured from their first real key, as the mask is applied (`anchored`, `attend_from_first_key`): a
        left-padded row's blocks and sinks are its own, not its padding's; distances no row reached stay last."""
        bs, tk = self.opts.block_size, k.shape[-2]
        nb = -(-tk // bs)
        mass = torch.zeros(q.shape[1], nb, dtype=torch.float64, device=q.device)
        pairs = torch.zeros(nb, dtype=torch.float64, device=q.device)  # (block pairs x rows) at each distance
        lead = [0] * q.shape[0] if key_padding_mask is None else leading_padding(key_padding_mask)
        for n, drop, rows in padding_groups(lead, q.shape[-2], tk, causal, q.device):
            kpm = None if key_padding_mask is None else key_padding_mask[rows, n:]
            self._calibration_mass(q[rows, :, drop:], k[rows, :, n:], causal, kpm, scale, mass, pairs)
        seen = pairs > 0
        mean = mass[:, seen] / pairs[seen]  # (H, seen): the mean probability one query puts on a block at distance d
        scores = torch.log(mean.clamp_min(1e-12)).float()
        self.scores.data[:] = scores.min() - 1.0  # distances not seen: last
        self.scores.data[:, :nb][:, seen] = scores
        self.calibrated.fill_(True)
        self._patterns.clear()

    def _calibration_mass(self, q, k, causal, key_padding_mask, scale, mass, pairs) -> None:
        """Add one group's (rows with the same leading padding, cropped to their first real key) probability mass per
        head and block distance into `mass`, and its (block pair x row) counts into `pairs`."""
        bs, tq, tk = self.opts.block_size, q.shape[-2], k.shape[-2]
        nb = -(-tk // bs)
        allowed, _ = masks.combine(tq, tk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
        for a in range(nb):
            s, e = max(0, a * bs - (tk - tq)), min(tq, (a + 1) * bs - (tk - tq))
            if e <= s:
                continue
            sc = torch.matmul(q[:, :, s:e].float(), k.float().transpose(-1, -2)) * scale
            p = masks.masked_softmax(sc, query_rows(allowed, s, e))  # (B, H, C, Tk)
            p = p.clone()
            p[..., : self.opts.sinks] = 0  # the sink tokens are always kept: their mass says nothing about distances
            per_block = torch.nn.functional.pad(p, (0, nb * bs - tk)).unflatten(-1, (nb, bs)).sum(-1).sum(-2)  # (B, H, nb)
            d = (a - torch.arange(nb, device=q.device)).abs()
            keep = d <= a if causal else torch.ones_like(d, dtype=torch.bool)
            mass.index_add_(1, d[keep], per_block.sum(0)[:, keep].double() / (e - s))
            pairs.index_add_(0, d[keep], torch.full_like(d[keep], q.shape[0], dtype=torch.float64))

    def density_at(self, seq_len: int, causal: bool = True) -> float:
        """Fraction of the causal token pairs the static mask keeps at this length (averaged over heads)."""
        bs = self.opts.block_size
        nb = -(-seq_len // bs)
        layout = self.static_layout(nb, causal)
        kept = 0
        kidx = torch.arange(seq_len, device=layout.device)
        for a in range(nb):  # a block of query rows at a time: never a T x T mask
            pos = torch.arange(a * bs, min((a + 1) * bs, seq_len), device=layout.device)
            rows = layout[:, a][:, kidx // bs][:, None, :] | self._band(pos, kidx)[None]  # (H, C, T)
            if causal:
                rows = rows & (kidx[None, :] <= pos[:, None])[None]
            kept += int(rows.sum())
        total = seq_len * (seq_len + 1) // 2 if causal else seq_len * seq_len
        return kept / (total * layout.shape[0])
