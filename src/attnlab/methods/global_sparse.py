"""Data-informed global sparse attention: a fixed block pattern per layer and head, chosen from the attention
the original model gave each block on a corpus (`attnlab sparsify`, reduction/global_sparse.py), run on CUDA
by attnlab's Triton kernels for 16-64-token blocks in bf16 / fp16 (`ops/window_triton.py` with block tables: each
query tile visits only its row's key tiles), else as a FlexAttention BlockMask (the torch backend on CPU).

    attnlab.swap(model, "global_sparse", pattern="runs/sparsify/pattern", sparsity=0.9)

`pattern` is a folder written by `attnlab sparsify` (or `reduction.save_pattern`), or the block scores
themselves (float [nb, nb], [H, nb, nb] or [L, H, nb, nb]; then `block_size` is required). `layer` picks the
layer's slice and is filled in per layer by `attnlab.swap`. A measured pattern also keeps its first `sinks`
tokens (4 by default) and a local band of block_size tokens at token level for every query (StreamingLLM's
sinks; the band so that a block's first queries do not see only themselves). `sparsity` re-selects from the stored scores (the
diagonal always kept); without it the pattern's own `sparsity` is used. `budget="sensitivity"` divides the
blocks between layers by their probed sensitivity at the same mean density (`reduction.layer_sparsities`). Exact limit: sparsity 0 over scores
that are positive everywhere (every block kept).
"""
from __future__ import annotations

import dataclasses

import torch

from ..reduction.global_sparse import BUDGETS, SHARES
from ..registry import register
from ..types import OptionError, opt
from ._sparse import BACKENDS, SparseAttention, flex_block_for


@register("global_sparse")
class GlobalSparse(SparseAttention):
    """A measured block pattern per layer and head: the top blocks by the original model's attention mass."""
    requires = ("pattern",)
    complexity = ("O((1 - p) n² d)", "O(n + (n/b)²)", "p: sparsity, b: block_size (the block table)")

    @dataclasses.dataclass
    class Options:
        pattern: object = opt(None, "a pattern folder from `attnlab sparsify`, or block scores [nb, nb] / [H, nb, nb] / "
                                    "[L, H, nb, nb] (nested list or tensor)", kind=object)
        sparsity: float = opt(None, "fraction of the candidate blocks pruned, in [0, 1); None: the pattern's own "
                                  "(a pattern folder that records none needs it; raw scores: 0)",
                              kind=object)
        layer: int = opt(-1, "the layer whose pattern this is (filled in per layer by attnlab.swap)", low=-1)
        block_size: int = opt(None, "tokens per block: from the pattern folder; needed with raw scores", kind=object)
        share: str = opt("layer", "who shares the block budget: layer (a layer's heads share one: heads whose attention "
                                  "is spread get more blocks) | head (each head keeps 1 - sparsity of its own) | "
                                  "model (every head of every layer shares one)",
                         choices=SHARES)
        budget: str = opt("uniform", "how the layers divide the blocks: uniform (each prunes `sparsity`) | sensitivity "
                                     "(by each layer's probed sensitivity, at the same mean density: the pattern "
                                     "must hold a probe, `attnlab sparsify --budget sensitivity`)", choices=BUDGETS)
        alpha: float = opt(0.5, "budget='sensitivity': a layer keeps blocks in proportion to sensitivity ** alpha",
                           low=0.0, high=4.0)
        backend: str = opt("auto", "auto (on CUDA triton in bf16 / fp16 self-attention with 16-64-token blocks, "
                                    "else flex; torch elsewhere) | flex | torch | triton (ops/window_triton.py: only the "
                                    "listed key tiles)", choices=BACKENDS)

        def __post_init__(self):
            if self.pattern is None:
                raise OptionError("global_sparse: `pattern` is required (a folder from `attnlab sparsify`, or block scores)")
            if self.sparsity is not None and (isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float))
                                              or not 0 <= self.sparsity < 1):
                raise OptionError(f"global_sparse: sparsity must be in [0, 1), got {self.sparsity!r}")
            if self.block_size is not None and (isinstance(self.block_size, bool) or not isinstance(self.block_size, int)
                                                or self.block_size < 1):
                raise OptionError(f"global_sparse: block_size must be a positive integer, got {self.block_size!r}")

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        from ..reduction.global_sparse import load_pattern, make_pattern, select_blocks, selected_blocks

        o = self.opts
        pat = None
        if isinstance(o.pattern, (str, bytes)) or hasattr(o.pattern, "__fspath__"):
            pat = load_pattern(o.pattern)
            if o.block_size is not None and o.block_size != pat.block_size:
                raise OptionError(f"global_sparse: block_size={o.block_size} but the pattern was measured with "
                                  f"{pat.block_size}-token blocks")
            if pat.num_heads != num_heads:
                raise OptionError(f"global_sparse: the pattern has {pat.num_heads} heads per layer, this layer "
                                  f"{num_heads} (a pattern of another model?)")
            if not 0 <= o.layer < pat.num_layers:
                raise OptionError(f"global_sparse: layer {o.layer} is outside the pattern's {pat.num_layers} layers "
                                  "(a pattern of another model? attnlab.swap fills `layer` in)")
            scores, block_size, sinks, band, sink_mass = pat.mass, pat.block_size, pat.sinks, pat.band, pat.sink_mass
            sparsity = pat.meta.get("sparsity") if o.sparsity is None else o.sparsity
            if sparsity is None:  # `attnlab sparsify` keeps the scores, not one choice: a dense mask is no default
                raise OptionError(f"global_sparse: the pattern {str(o.pattern)!r} records no sparsity; give one "
                                  "(sparsity=0.9: the fraction of blocks pruned)")
        else:
            try:
                scores = torch.as_tensor(o.pattern, dtype=torch.float32)
            except (TypeError, ValueError) as e:
                raise OptionError(f"global_sparse: pattern must be a folder or a float score grid ({e})") from None
            if scores.dim() == 4 and not 0 <= o.layer < scores.shape[0]:
                raise OptionError(f"global_sparse: layer {o.layer} outside the scores' {scores.shape[0]} layers")
            if scores.dim() not in (2, 3, 4) or scores.shape[-1] != scores.shape[-2] or scores.numel() == 0:
                raise OptionError(f"global_sparse: scores must be [nb, nb], [H, nb, nb] or [L, H, nb, nb], got "
                                  f"{tuple(scores.shape)}")
            if o.block_size is None:
                raise OptionError("global_sparse: block_size is required with raw scores")
            block_size, sparsity, sinks, sink_mass, band = o.block_size, (o.sparsity or 0.0), 0, None, False
            if scores.dim() >= 3 and scores.shape[-3] != num_heads:
                raise OptionError(f"global_sparse: scores for {scores.shape[-3]} heads, the layer has {num_heads}")
        if o.share == "model" and scores.dim() != 4:
            raise OptionError("global_sparse: share='model' needs every layer's scores ([L, H, nb, nb] or a pattern "
                              "folder)")
        self.sparsity = float(sparsity)
        if pat is not None:  # every layer of a swapped model selects from the same folder: select once
            keep = selected_blocks(pat, self.sparsity, o.share, o.budget, o.alpha)[o.layer]
        else:
            if o.budget != "uniform":
                raise OptionError("global_sparse: budget='sensitivity' needs a pattern folder with a sensitivity probe, "
                                  "not raw scores")
            # the model's budget is shared across layers only with share='model'; otherwise select the layer alone
            if scores.dim() == 4 and o.share != "model":
                scores = scores[o.layer]
            keep = select_blocks(scores, self.sparsity, sink_mass, band, share=o.share)
            if keep.dim() == 4:
                keep = keep[o.layer]
        self.pattern = make_pattern(keep, block_size, sinks, band)
        self.flex_block_size = flex_block_for(block_size)

    def options_dict(self) -> dict:
        out = super().options_dict()
        if not isinstance(self.opts.pattern, str):
            out["pattern"] = "<scores>"
        return out

    @classmethod
    def exact_limit(cls, tq, tk):
        bs = 16
        n = -(-max(tq, tk) // bs)
        return {"pattern": [[1.0] * n] * n, "block_size": bs, "sparsity": 0.0}

    @classmethod
    def test_options(cls, seq_len):
        bs = 16 if seq_len >= 96 else max(2, seq_len // 6)  # 16 from 96 tokens: a block size the Triton kernels run
        n = -(-seq_len // bs)
        # decaying with distance (and the first block a "sink"), so that half the causal blocks are kept
        scores = [[(1.0 / (1 + i - j) + (0.5 if j == 0 else 0.0)) if j <= i else 0.0 for j in range(n)] for i in range(n)]
        return {"pattern": scores, "block_size": bs, "sparsity": 0.5}
