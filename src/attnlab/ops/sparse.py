"""How a sparsity pattern (patterns/) is computed. Three kernels, one pattern definition:

- "flex": compiled `flex_attention` with the pattern's cached BlockMask (skips empty blocks; CUDA, and CPU for
  inference with torch >= 2.6);
- "triton": the sliding-window pattern, and a block pattern alone or united with a window + sinks (global_sparse's
  shape) for self-attention in 16-, 32- or 64-token blocks (`ops.window_triton`: FlashAttention-2 with the key
  loop bounded to the band and the sinks, or to the key tiles each query tile's row of the block tables lists;
  CUDA, and CPU under TRITON_INTERPRET=1);
- "torch": the plain-PyTorch gathered kernel: each query chunk attends to the keys its `key_chunks` lists,
  masked exactly by the mask_mod on those (query, key) pairs: O(T x reachable keys) memory, never Tq x Tk.
  It also yields each row's log-sum-exp and the per-key column sums in the same pass;
- dense under the pattern's Bool[Tq, Tk] mask, when the implied matrix is asked for (need_probs).

`sparse_attention` picks the kernel from the method's `backend` option ("auto": on CUDA in bf16 / fp16 triton for
the plain window and for block patterns united with a window (global_sparse) in self-attention, flex for other
patterns; torch elsewhere)
and reports which one ran. A request the chosen kernel cannot serve is an UnsupportedError before compute;
"auto" picks the torch kernel for column sums (flex cannot sum columns), which is the same maths.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from .. import masks
from ..methods.base import repeat_kv
from ..patterns.base import UnionPattern
from ..patterns.blocks import BlockPattern
from ..patterns.window import WindowPattern
from ..types import AttnOutput, UnsupportedError, records_grad
from .fused import triton_importable
from . import limits
from .reference import lse_and_probs

BACKENDS = ("auto", "flex", "torch", "triton")

# Parsed once; tests monkeypatch it to prove the "flex unavailable" error path.
TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


@functools.lru_cache(maxsize=None)
def _flex_unavailable_reason(device_type: str, torch_version: tuple) -> str | None:
    need = (2, 6) if device_type == "cpu" else (2, 5)  # CPU flex (inductor C++ template) landed in 2.6
    if torch_version < need:
        return (f"FlexAttention on {device_type} needs torch >= {need[0]}.{need[1]}, found {torch.__version__}; "
                "use backend='torch'")
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError as e:  # pragma: no cover - builds without flex
        return f"torch.nn.attention.flex_attention is not importable ({e}); use backend='torch'"
    if device_type == "cuda" and importlib.util.find_spec("triton") is None:
        return "FlexAttention on CUDA compiles Triton kernels but triton is not installed; use backend='torch'"
    return None


def flex_unavailable_reason(device) -> str | None:
    """Why FlexAttention cannot run on `device` (None: it can). Cached per device type: it is on the hot path."""
    return _flex_unavailable_reason(torch.device(device).type, TORCH_VERSION)


_COMPILED_FLEX: dict = {}


def compiled_flex_attention(device_type: str = "cuda"):
    """flex_attention under torch.compile, compiled once per process and device type (CPU has no eager flex
    kernel; on CUDA eager flex is a slow reference).

    CPU compiles with static shapes: with automatic dynamic shapes, a second pattern in the same process (a
    captured layout table whose size became symbolic) made the CPU C++ flex template fail to build in torch
    2.13 ("cur_kvSplitSize3 was not declared"). CUDA keeps torch's default (dynamic after a shape change), so
    new lengths do not each cost a recompile there.
    """
    fn = _COMPILED_FLEX.get(device_type)
    if fn is None:
        from .fused import FUSED_RECOMPILE_LIMIT, raise_recompile_limit

        # variants per (length, grad mode, block size, score_mod): past dynamo's default 8 flex runs eagerly (the
        # dense matrix); the benchmarks raised it themselves, a training run through the CLI did not
        raise_recompile_limit(FUSED_RECOMPILE_LIMIT)
        fn = torch.compile(flex_with, dynamic=False if device_type == "cpu" else None)
        _COMPILED_FLEX[device_type] = fn
    return fn


def unsupported_reasons(backend: str, device, *, need_lse: bool = False, need_col_sums: bool = False,
                        pattern=None, head_dim: int | None = None, dtype=None, tq: int | None = None,
                        tk: int | None = None, heads: int = 1) -> list[str]:
    """Why an explicitly asked backend cannot serve a request on `device` (checked before compute)."""
    if backend == "triton":
        from . import window_triton

        why = [] if pattern is None or is_window(pattern) else block_triton_unsupported(pattern, tq, tk)
        why += window_triton.unsupported_reasons(device, head_dim=head_dim or 0, need_col_sums=need_col_sums,
                                                 dtype=dtype)
        return why + limits.span_reasons(tq, tk, heads=heads, head_dim=head_dim or 0)
    if backend != "flex" or device is None:
        return []
    why = []
    reason = flex_unavailable_reason(device)
    if reason:
        why.append(f"backend='flex' cannot run: {reason}")
    if need_col_sums:
        why.append("backend='flex' cannot compute col_sums (use backend='torch' or 'auto')")
    if need_lse and torch.device(device).type == "cpu":
        why.append("backend='flex' returns no log-sum-exp on CPU (use backend='torch' or 'auto')")
    return why


def is_window(pattern) -> bool:
    return type(pattern) is WindowPattern


def block_window_parts(pattern) -> tuple[BlockPattern, WindowPattern | None] | None:
    """(the block part, the window part or None) of a pattern the Triton kernels run as a block pattern: a
    BlockPattern alone, or united with a WindowPattern (global_sparse: the measured blocks, sinks and a local band)."""
    if type(pattern) is BlockPattern:
        return pattern, None
    if type(pattern) is UnionPattern and len(pattern.parts) == 2:
        a, b = pattern.parts
        if type(a) is BlockPattern and type(b) is WindowPattern:
            return a, b
        if type(a) is WindowPattern and type(b) is BlockPattern:
            return b, a
    return None


def block_triton_unsupported(pattern, tq: int | None, tk: int | None) -> list[str]:
    """Why the Triton kernels cannot run `pattern` as a block pattern (empty: they can)."""
    parts = block_window_parts(pattern)
    if parts is None:
        return ["backend='triton' runs the sliding-window pattern and block patterns (alone or with a window and "
                f"sinks), not {type(pattern).__name__}"]
    return block_size_unsupported(parts[0].block_size, tq, tk)


def block_size_unsupported(block_size: int, tq: int | None, tk: int | None) -> list[str]:
    """Why the Triton block kernels cannot run blocks of `block_size` tokens at Tq x Tk (empty: they can)."""
    from .window_triton import BLOCK_SIZES

    why = []
    if block_size not in BLOCK_SIZES:
        why.append(f"backend='triton' runs block patterns of {', '.join(map(str, BLOCK_SIZES))}-token blocks, not "
                   f"{block_size}")
    if tq is not None and tk is not None and tq != tk:
        why.append(f"backend='triton' runs block patterns for self-attention (Tq == Tk), got Tq={tq}, Tk={tk}")
    return why


def triton_block_tables(pattern, tq: int, causal: bool, device):
    """The Triton kernels' tables for a block (+ window) pattern at Tq = Tk = tq: built once per data version and
    kept beside the pattern's BlockMasks."""
    from .window_triton import block_tables

    device = torch.device(device)

    def make():
        blk, _ = block_window_parts(pattern)
        bs = blk.block_size
        nb = -(-tq // bs)
        visit = pattern.block_tables(nb, bs, causal)[0]  # tiles with any visible pair: the blocks, the band, the sinks
        return block_tables(visit, blk.block_tables(nb, bs, causal)[0], bs, device)
    return pattern.cached(("triton", tq, causal, str(device)), make)


def resolve(backend: str, q: torch.Tensor, *, need_lse: bool, need_col_sums: bool, pattern=None,
            backward: bool = False, tk: int | None = None, rows_fit: bool = True) -> str:
    """The kernel that will run. auto -> on CUDA the window's own Triton kernel for the plain sliding-window
    pattern in bf16 / fp16 (faster than FlexAttention's at 16k-64k on an H200, benchmarks/results/window/; in fp32
    it is not, window_triton.AUTO_DTYPES), and for a block pattern united with a window (global_sparse) for
    self-attention in 16-64-token blocks, flex for other patterns where it can serve the request, else torch (the same maths); flex asked
    explicitly where it cannot run is refused."""
    if backend == "auto":
        if q.device.type != "cuda" or need_col_sums:
            return "torch"
        parts = block_window_parts(pattern)
        # block patterns only with a window part (global_sparse's shape, measured); a plain block layout stays on flex
        if triton_importable() and (is_window(pattern) or (
                parts is not None and parts[1] is not None and not block_triton_unsupported(pattern, q.shape[-2], tk))):
            from . import window_triton

            if (q.shape[-1] <= window_triton.MAX_HEAD_DIM and q.dtype in window_triton.AUTO_DTYPES
                    and not limits.span_reasons(q.shape[-2], tk, heads=q.shape[1], head_dim=q.shape[-1])
                    and rows_fit):  # q, k, v's own rows (`limits.rows_fit`: wider layouts, a fused qkv's slices)
                return "triton"
        return "flex" if flex_unavailable_reason(q.device) is None else "torch"
    if backend == "flex":
        if q.device.type == "cpu" and backward:
            # The CPU flex template is inference-only (no backward) in torch 2.6-2.13.
            raise UnsupportedError("backend='flex' on CPU is inference-only (no backward); use backend='torch' to "
                                   "train on CPU")
    return backend


def flex_block_for(block_size: int) -> int:
    """FlexAttention's BLOCK_SIZE for a pattern of `block_size`-token blocks: the pattern's own block when it is a
    multiple of 128 (the kernel's default tiles), 64 when it is a multiple of 64 (then the forward runs 64-wide
    tiles, `tile_options`, where `call_block_size` allows), so that every visited block is one the pattern keeps
    and only blocks cut by a token-level part evaluate the mask_mod; otherwise 128, with the pattern resolved
    inside blocks by its mask_mod (every block it touches then partial)."""
    if block_size % 128 == 0:
        return block_size
    return 64 if block_size % 64 == 0 else 128


NARROW_TILES_TORCH = (2, 11)  # the first torch measured running 64-token Flex tiles (H200, 2026-12-02)


def tile_options(block_mask, device) -> dict | None:
    """Forward kernel tiles for a BlockMask whose blocks are narrower than the CUDA kernel's default 128-row tiles
    (the tiles must divide the mask's blocks); None where the defaults fit. Only the forward: inductor filters its
    backward configurations by the mask's blocks before applying options (torch 2.11 found none for 64-token blocks
    on the H200, "No choices"), so `call_block_size` gives a call that a backward will follow 128-token blocks
    unless `enable_narrow_backward` offered inductor a narrow backward configuration."""
    if torch.device(device).type != "cuda" or min(block_mask.BLOCK_SIZE) >= 128:
        return None
    b = min(block_mask.BLOCK_SIZE)
    return {"fwd_BLOCK_M": b, "fwd_BLOCK_N": b}


@functools.lru_cache(maxsize=None)
def _torch_version() -> tuple:
    return tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


def call_block_size(flex_block_size: int, device, backward: bool, tq: int) -> int:
    """The BlockMask's block for one call: the method's `flex_block_size`, except 128 on CUDA where the narrower
    block has no kernel that fits it: a backward will follow and no narrow backward configuration could be offered
    to inductor (`narrow_backward`), fewer than 128 queries (flex's decoding kernel then picks its own tiles: 128
    rows fit no 64-token block, and 16 or 32 rows would be overridden by tile_options' 64 without row masking), or
    a torch older than NARROW_TILES_TORCH (not measured; older forwards checked their default tiles against the
    mask before any option). Measured with 64-token tiles on the H200: a 90%-pruned 64-token pattern's SmolLM2
    forward at 4096 tokens went from 51 to 35 ms a step (its Flex kernel had been 40 of the 51, every 128-token
    block partial)."""
    if flex_block_size < 128 and torch.device(device).type == "cuda" and (
            tq < 128 or _torch_version() < NARROW_TILES_TORCH or (backward and not narrow_backward(flex_block_size))):
        return 128
    return flex_block_size


def narrow_backward(block: int) -> bool:
    """Whether flex's backward may run `block`-token BlockMasks in this process (`enable_narrow_backward`)."""
    return block in NARROW_SIZES


def enable_narrow_backward(block: int = 64) -> bool:
    """Let flex's backward run `block`-token BlockMasks (64-token global_sparse patterns when training), so that it
    skips what the pattern prunes instead of evaluating 128-token blocks element by element. Opt-in and
    process-wide: call it before anything is compiled.

    Inductor filters its backward tile configurations by the mask's blocks before any kernel option applies, and on
    sm90 with head dim 64 its one default, (64, 128, 128, 64), divides no 64-token block ("No choices"). This sets
    inductor's `inductor_choices_class` (and the current thread's handler) to a subclass of the current choices
    class whose flex backward configurations also hold a (block, block, block, block) one. Side effect: a
    128-token flex backward compiled afterwards has two fitting configurations, which inductor benchmarks once
    when it compiles. Returns False (backwards keep 128-token blocks) where this torch has no such hook. Inductor's
    config is per thread in recent torch and backwards compile on autograd's device thread: measured on the H200
    with `benchmarks/model_bench.py --narrow-backward` (torch 2.11), not on other versions."""
    try:
        from torch._inductor import config as inductor_config
        from torch._inductor.choices import InductorChoices
        from torch._inductor.template_heuristics.triton import FlexBwDConfig
        from torch._inductor.virtualized import V
    except ImportError:
        return False
    if not hasattr(InductorChoices, "get_flex_attention_bwd_configs") or not hasattr(inductor_config,
                                                                                     "inductor_choices_class"):
        return False
    base = inductor_config.inductor_choices_class or InductorChoices
    if not getattr(base, "attnlab_narrow", False):
        base = _narrow_class(base, FlexBwDConfig)
        inductor_config.inductor_choices_class = base
    if not getattr(type(V.choices), "attnlab_narrow", False):
        V.set_choices_handler(base())
    NARROW_SIZES.add(block)
    return True


_NARROW_CLASSES: dict = {}  # base choices class -> its narrow subclass, built once (a rebuilt class would not pickle)


def _narrow_class(base, config_cls):
    if base not in _NARROW_CLASSES:
        class NarrowFlexBackward(base):
            attnlab_narrow = True

            def get_flex_attention_bwd_configs(self, head_dim, dtype, device_type="cuda"):
                return with_narrow(super().get_flex_attention_bwd_configs(head_dim, dtype, device_type),
                                   config_cls, NARROW_SIZES)

            def uuid(self):
                """Part of inductor's cache key (torch >= 2.13 asks every choices class for one): the narrow sizes
                offered, and the base's own key where it has one."""
                own = super().uuid() if hasattr(super(), "uuid") else base.__qualname__
                return f"attnlab-narrow-flex-backward:{sorted(NARROW_SIZES)}:{own}"

        # a module attribute under its own name: inductor pickles its config into cache keys (torch 2.11), and a
        # local class cannot be pickled (measured: "Can't pickle local object", each compile then skipped its cache)
        name = "NarrowFlexBackward" if not _NARROW_CLASSES else f"NarrowFlexBackward{len(_NARROW_CLASSES)}"
        NarrowFlexBackward.__name__ = NarrowFlexBackward.__qualname__ = name
        globals()[name] = NarrowFlexBackward
        _NARROW_CLASSES[base] = NarrowFlexBackward
    return _NARROW_CLASSES[base]


NARROW_SIZES: set[int] = set()


def with_narrow(configs: list, config_cls, sizes) -> list:
    """configs plus, for each narrow block size no configuration divides, a (b, b, b, b) one (3 stages, 4 warps:
    inductor's own sm90 choice for head dims under 64)."""
    out = list(configs)
    for b in sorted(sizes):
        fits = any(b % c.block_m1 == 0 and b % c.block_n1 == 0 and b % c.block_m2 == 0 and b % c.block_n2 == 0
                   for c in out)
        if not fits:
            out.append(config_cls(b, b, b, b, 3, 4))
    return out


# Compiled flex on CPU visits only the BlockMask's blocks, and evaluates no mask_mod in its full ones, from torch 2.8
# (pytorch/pytorch#147196). torch 2.6's and 2.7's CPU kernel walks every key block and evaluates the mask_mod on
# every pair, reading no block table (found by .ci/oldest: the kernel mask's causal-only mod let rows see the layout's
# dropped blocks there).
CPU_KERNEL_READS_TABLES = torch.__version__ >= "2.8"


def kernel_reads_tables(device) -> bool:
    """Whether compiled flex on `device` skips blocks by the BlockMask's tables and runs no mask_mod in full blocks:
    what a kernel BlockMask (`Pattern.block_masks`' second) needs to be right. CUDA always; CPU from torch 2.8."""
    return torch.device(device).type != "cpu" or CPU_KERNEL_READS_TABLES


def flex_with(q, k, v, *, block_mask, kernel_block_mask=None, **kw):
    """flex_attention with `kernel_block_mask` where torch.compile traces this function, `block_mask` where it runs
    eagerly. The kernel BlockMask (`Pattern.block_masks`' second: the same blocks, a cheaper mask_mod inside the
    partial ones) is right only where the block tables are read, in the compiled kernel (on CPU only from torch 2.8,
    `kernel_reads_tables`); flex's eager form evaluates the mask_mod on every pair and reads no block table. Eager
    is what dynamo runs past its recompile limit, when disabled, or under a force-eager stance: the choice is made
    where that happens, so no such case can pair the eager form with the kernel mask."""
    from torch.nn.attention.flex_attention import flex_attention

    kernel = block_mask if kernel_block_mask is None else kernel_block_mask  # (alone: flex_attention's signature)
    compiled = torch.compiler.is_compiling() and kernel_reads_tables(q.device)
    return flex_attention(q, k, v, block_mask=kernel if compiled else block_mask, **kw)


@torch.compiler.disable
def flex(q, k, v, block_mask, *, scale: float, key_padding_mask: torch.Tensor | None = None, return_lse: bool = False,
         kernel_block_mask=None):
    """Compiled flex_attention; rows with no visible key return zeros, never NaN. k and v may carry fewer heads
    than q (grouped-query attention, Hkv dividing H): flex reads each query head's kv head itself
    (`enable_gqa`), no expanded copies.

    `kernel_block_mask` (default `block_mask`) goes to the compiled kernel only (`flex_with`). This function stays
    outside any caller's torch.compile (`torch.compiler.disable`: a graph break there): traced into a graph that
    another backend runs (aot_eager, eager), the kernel mask would meet flex's eager form; here flex compiles on
    its own, with inductor.

    Padding reaches the kernel as a score_mod (score -> -inf at padded keys) so the BlockMask stays
    batch-independent and cached; the price is that padded tail blocks are computed, not skipped.
    """
    score_mod = None
    if key_padding_mask is not None:
        real = key_padding_mask

        def key_padding_score(score, b, h, q_idx, kv_idx):
            return torch.where(real[b, kv_idx], score, -float("inf"))

        score_mod = key_padding_score
    # A row whose scores are all -inf comes back as exact zeros from the kernel itself (CPU and CUDA; checked by
    # the tests on CPU and benchmarks/gpu_checks.py on CUDA), so no logsumexp fix-up pass is needed.
    fn = compiled_flex_attention(q.device.type)
    tiles = tile_options(block_mask, q.device)
    kw = {} if tiles is None else {"kernel_options": tiles}
    if k.shape[1] != q.shape[1]:
        kw["enable_gqa"] = True
    if return_lse:
        out, lse = fn(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_block_mask=kernel_block_mask,
                      scale=scale, return_lse=True, **kw)
        # flex reports a row with no visible key as lse = -inf (CUDA) or a large negative number; keep -inf
        return out, lse.float()
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, kernel_block_mask=kernel_block_mask, scale=scale,
              **kw)


def gathered_attention(q, k, v, mask_mod, chunks, *, scale: float, key_padding_mask: torch.Tensor | None = None,
                       need_lse: bool = False, need_col_sums: bool = False):
    """Attention where each query chunk [s, e) sees only the keys `kidx` (LongTensor) it lists, masked exactly
    by `mask_mod` evaluated on those (head, query, key) index triples. Memory O(chunk x len(kidx)) per step.
    Numerics follow dense: scores in the input dtype, fp32 softmax. Returns (out, lse | None, col_sums | None).
    Column sums leave out padded query rows of self-attention (Tq == Tk), as ops.reference does."""
    b, h, tq, d = q.shape
    tk = k.shape[-2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=torch.long, device=q.device)
    hidx = torch.arange(h, device=q.device)[:, None, None]
    outs, lses = [], []
    cols = torch.zeros(b, h, tk, dtype=acc, device=q.device) if need_col_sums else None
    row_real = key_padding_mask if (need_col_sums and key_padding_mask is not None and tq == tk) else None
    for s, e, kidx in chunks:
        qc = q[:, :, s:e]  # (B, H, C, D)
        kidx = kidx.to(q.device)
        if kidx.numel() == 0:  # nothing reachable: zeros, as for any fully masked row
            outs.append(torch.zeros_like(qc))
            if need_lse:
                lses.append(torch.full((b, h, e - s), float("-inf"), dtype=acc, device=q.device))
            continue
        kc, vc = k.index_select(2, kidx), v.index_select(2, kidx)  # (B, H, K, D)
        qi = torch.arange(s, e, device=q.device)[:, None]
        allowed = mask_mod(zero, hidx, qi, kidx[None, :])  # (H|1, C, K) or (C, K)
        allowed = allowed.expand(*allowed.shape[:-2], e - s, kidx.numel())[None] if allowed.dim() == 3 else allowed[None, None]
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask.index_select(1, kidx)[:, None, None, :]  # (B, H|1, C, K)
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, H, C, K)
        if not (need_lse or need_col_sums):
            probs = masks.masked_softmax(scores, allowed)
            outs.append(torch.matmul(probs.to(v.dtype), vc))
            continue
        scores = scores.to(acc).masked_fill(~allowed, float("-inf"))
        lse, probs = lse_and_probs(scores)  # (B, H, C), (B, H, C, K)
        outs.append(torch.matmul(probs.to(v.dtype), vc))
        if need_lse:
            lses.append(lse)
        if cols is not None:
            if row_real is not None:
                probs = probs * row_real[:, None, s:e, None].to(acc)
            cols.index_add_(2, kidx, probs.sum(-2))
    out = torch.cat(outs, dim=2)
    return out, (torch.cat(lses, dim=2) if need_lse else None), cols


def sparse_attention(q, k, v, pattern, *, causal: bool, key_padding_mask, scale: float, backend: str,
                     need_probs: bool = False, need_lse: bool = False, need_col_sums: bool = False,
                     flex_block_size: int = 128) -> tuple[AttnOutput, str]:
    """Run `pattern` with the chosen kernel. Returns (AttnOutput, kernel name). k and v may have fewer heads than
    q (GQA): flex and the window's Triton kernel read them as they are, the torch and dense kernels get them
    expanded here."""
    from .reference import blockwise_attention

    tq, tk = q.shape[-2], k.shape[-2]
    backward = records_grad(q, k, v)
    kernel = "dense" if need_probs else resolve(backend, q, need_lse=need_lse, need_col_sums=need_col_sums,
                                                pattern=pattern, backward=backward, tk=tk,
                                                rows_fit=backend != "auto" or limits.rows_fit(q, k, v))
    if kernel not in ("flex", "triton"):
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if need_probs:  # the implied matrix is Tq x Tk anyway: dense maths under the same mask_mod
        from ..methods.dense import dense_attention

        allowed = pattern.dense(tq, tk, causal, q.device)[None]  # (1, H|1, Tq, Tk)
        out, probs = dense_attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=allowed, scale=scale)
        lse = cols = None
        if need_lse or need_col_sums:
            _, lse, cols = blockwise_attention(q, k, v, scale=scale, key_padding_mask=key_padding_mask, attn_mask=allowed,
                                               need_out=False, need_lse=need_lse, need_col_sums=need_col_sums)
        return AttnOutput(out, probs, lse=lse, col_sums=cols), "dense"
    if kernel == "triton":
        from .window_triton import window_attention

        if is_window(pattern):
            win, blocks = pattern, None
        else:  # a block pattern, with the window and sinks it is united with
            win, blocks = block_window_parts(pattern)[1], triton_block_tables(pattern, tq, causal, q.device)
        out, lse = window_attention(q, k, v, window=win.window if win is not None else -1,
                                    sinks=win.sinks if win is not None else 0, causal=causal, scale=scale,
                                    key_padding_mask=key_padding_mask, blocks=blocks, need_lse=need_lse)
        return AttnOutput(out, None, lse=lse), "triton"
    if kernel == "flex":
        bs = call_block_size(flex_block_size, q.device, backward, tq)
        bm, kbm = pattern.block_masks(tq, tk, causal, q.device, bs)
        if need_lse:
            out, lse = flex(q, k, v, bm, scale=scale, key_padding_mask=key_padding_mask, return_lse=True,
                            kernel_block_mask=kbm)
            return AttnOutput(out, None, lse=lse), "flex"
        return AttnOutput(flex(q, k, v, bm, scale=scale, key_padding_mask=key_padding_mask, kernel_block_mask=kbm)), "flex"
    out, lse, cols = gathered_attention(
        q, k, v, pattern.mask_mod(tq, tk, causal, q.device), pattern.key_chunks(tq, tk, causal), scale=scale,
        key_padding_mask=key_padding_mask, need_lse=need_lse, need_col_sums=need_col_sums,
    )
    return AttnOutput(out, None, lse=lse, col_sums=cols), "torch"
