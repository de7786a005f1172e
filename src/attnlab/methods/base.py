"""The one interface every attention method implements.

    out, probs = method(q, k, v, causal=False, key_padding_mask=None, attn_mask=None, scale=None, need_probs=False)
    res = method(q, k, v, causal=True, need_lse=True, need_col_sums=True)   # res.out, res.probs, res.lse, res.col_sums

q: [B, H, Tq, D]; k, v: [B, Hkv, Tk, D] with H % Hkv == 0; out: [B, H, Tq, D];
probs: [B, H, Tq, Tk] (the implied attention matrix) or None. The result is an `AttnOutput`: the pair
(out, probs) with the extras asked for as attributes (`types.AttnOutput`).

`forward` checks the request against the method's `Capabilities` before any compute, expands GQA heads,
fills the default scale and then calls the method's `_attend`. Subclasses write `_attend` and may set
`self.kernel` (which kernel ran: visible on the module and in bench rows).

What else a method owns (class methods, read by compare, bench, the tests and the GPU checks):
- `defaults(seq_len)`: the options it runs with at that length unless told otherwise;
- `exact_limit(tq, tk)`: options under which it IS dense attention (None: it has no such limit, and its
  own implied-matrix form, need_probs=True, is its reference);
- `complexity`: its time and memory per head in n, d and its own parameters (README tables);
- `test_options(seq_len)`: small but non-trivial options for checks at a short length (a window narrower than
  the sequence, several blocks), causal-safe where the method is causal.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar

import torch
from torch import nn

from ..types import AttnlabError, AttnOutput, Capabilities, OptionError, ShapeError, UnsupportedError, validate_options


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * groups, T, D] (each kv head serves `groups` query heads)."""
    if groups == 1:
        return x
    b, hkv, t, d = x.shape
    return x[:, :, None].expand(b, hkv, groups, t, d).reshape(b, hkv * groups, t, d)


_warned_capture = False


def leading_padding(key_padding_mask: torch.Tensor) -> list[int]:
    """Each row's count of padded keys before its first real one (Tk for a fully padded row): one host sync."""
    kpm = key_padding_mask.bool()
    real = kpm.any(-1)
    return torch.where(real, kpm.int().argmax(-1), kpm.shape[-1]).tolist()


def queries_before(n: int, tq: int, tk: int, causal: bool) -> int:
    """How many leading queries a row whose keys start at n drops: causal, those that see no key (query i sits at
    position i + Tk - Tq); not causal, the padded tokens' own queries where Tq == Tk (self-attention), else none."""
    if causal:
        return min(tq, max(0, n - (tk - tq)))
    return min(tq, n) if tq == tk else 0


def padding_groups(leads: list[int], tq: int, tk: int, causal: bool, device):
    """(n, drop, rows) per distinct leading padding n in `leads` (`leading_padding`): the batch rows with it (a
    LongTensor on `device`) and the leading queries they drop (`queries_before`); groups left with nothing to attend
    (a fully padded row, or every query dropped) are skipped."""
    for n in sorted(set(leads)):
        drop = queries_before(n, tq, tk, causal)
        if drop < tq and n < tk:
            yield n, drop, torch.tensor([i for i, x in enumerate(leads) if x == n], device=device)


def attend_from_first_key(method, q, k, v, key_padding_mask, kw) -> AttnOutput:
    """`method._attend(q, k, v, **kw)` with each row's keys counted from its first real key: rows are grouped by their
    leading padding L and a group runs on keys [L, Tk). For a pattern that reads absolute positions (StreamingLLM's
    sinks are a row's first tokens, a block layout measured from position 0) a left-padded row is then the same as
    the row alone; distances are unchanged, so a band or causal mask is too. Queries on padded positions are
    dropped (zeros; lse -inf): causal, those that see no key (query i sits at position i + Tk - Tq); not causal,
    the padded tokens' own rows where Tq == Tk, which the library takes as self-attention (as its column sums do:
    a cross-attention with as many queries as keys has its first L queries dropped too). Otherwise all stay.
    Rows without leading padding run together, uncropped: one host sync finds L. That sync cannot happen inside a
    CUDA-graph capture or a torch.compile trace, whose graph must not depend on the data: there the call runs
    uncropped (positions from key 0, as before 2026-12-05), with a warning.
    A training loss the method leaves in `aux_loss` (learned_mask's gate) becomes the groups' row-weighted mean."""
    global _warned_capture
    attend = method._attend
    if (q.is_cuda and torch.cuda.is_current_stream_capturing()) or torch.compiler.is_compiling():
        if not _warned_capture:
            warnings.warn(f"{method.name}: a key padding mask inside a CUDA-graph capture or a compiled graph: sinks and "
                          "block layouts count from key 0 there (a left-padded row's sinks fall on its padding); "
                          "eagerly they count from each row's first real key")
            _warned_capture = True
        return attend(q, k, v, **kw)
    b, tq, tk = q.shape[0], q.shape[-2], k.shape[-2]
    leads = leading_padding(key_padding_mask)
    if not any(leads):
        return attend(q, k, v, **kw)
    if hasattr(method, "aux_loss"):
        method.aux_loss = None  # (no group may run: never a previous call's loss)
    res, aux = {}, []
    for n, drop, rows in padding_groups(leads, tq, tk, kw["causal"], q.device):
        got = attend(q[rows, :, drop:], k[rows, :, n:], v[rows, :, n:],
                     **{**kw, "key_padding_mask": key_padding_mask[rows, n:]})
        res[n] = (rows, drop, got if isinstance(got, AttnOutput) else AttnOutput(*got))
        if getattr(method, "aux_loss", None) is not None:
            aux.append((len(rows), method.aux_loss))
    if aux:
        method.aux_loss = sum(n * loss for n, loss in aux) / sum(n for n, _ in aux)
    first = next(iter(res.values()))[2] if res else None
    out = q.new_zeros(*q.shape[:-1], v.shape[-1]) if first is None else first.out.new_zeros(*q.shape[:-1], v.shape[-1])
    extra = torch.promote_types(torch.float32, q.dtype)  # what the kernels give lse and col_sums (fp32; fp64 inputs: fp64)
    probs = lse = cols = None
    if kw.get("need_probs"):
        probs = out.new_zeros(b, q.shape[1], tq, tk, dtype=first.probs.dtype if first is not None else out.dtype)
    if kw.get("need_lse"):
        dt = first.lse.dtype if first is not None else extra
        lse = torch.full((b, q.shape[1], tq), float("-inf"), device=q.device, dtype=dt)
    if kw.get("need_col_sums"):
        cols = torch.zeros(b, q.shape[1], tk, device=q.device, dtype=first.col_sums.dtype if first is not None else extra)
    for n, (rows, drop, got) in res.items():
        out[rows, :, drop:] = got.out
        if probs is not None:
            probs[rows, :, drop:, n:] = got.probs
        if lse is not None:
            lse[rows, :, drop:] = got.lse
        if cols is not None:
            cols[rows, :, n:] = got.col_sums
    return AttnOutput(out, probs, lse=lse, col_sums=cols)


def visible_pairs(tq: int, tk: int, causal: bool) -> int:
    """(query, key) pairs of a Tq x Tk attention; causal bottom-right (query i sees keys j <= i + Tk - Tq)."""
    if not causal:
        return tq * tk
    off = tk - tq
    # row i sees min(tk, max(0, i + off + 1)) keys
    first_full = max(0, tk - off - 1)  # rows from here see all tk keys
    lo = max(0, -off)  # rows before this see none
    part_end = min(tq, first_full)
    partial = 0
    if part_end > lo:
        a, b = lo + off + 1, part_end - 1 + off + 1  # arithmetic series of keys seen
        partial = (a + b) * (part_end - lo) // 2
    return partial + max(0, tq - max(first_full, lo)) * tk


def is_block_mask(obj) -> bool:
    return type(obj).__name__ == "BlockMask"


class AttentionMethod(nn.Module):
    name: ClassVar[str] = "?"
    capabilities: ClassVar[Capabilities] = Capabilities()
    # GQA handled natively by `_attend` (k, v arrive with Hkv heads) instead of expanded by the base.
    native_gqa: ClassVar[bool] = False
    # (time, memory, what the symbols are) per head as the method runs in attnlab, n the sequence length and d the
    # head dim, e.g. ("O(n m d)", "O(n m + m d)", "m: num_features"); the README's vision table prints it
    complexity: ClassVar[tuple[str, str, str]] = ("?", "?", "")
    # options with no usable default: the data a method is built from (global_sparse's measured pattern). Runs
    # over "every method" (compare, bench all, vision all) leave such a method out unless it is named with them.
    requires: ClassVar[tuple[str, ...]] = ()
    # a call's `scale` must be > 0 (random features of exp(q.k * scale) take its square root); softmax methods take
    # any finite scale (a negative one is -q at -scale, zero uniform weights)
    positive_scale: ClassVar[bool] = False

    @dataclasses.dataclass
    class Options:
        pass

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__()
        if head_dim <= 0 or num_heads <= 0:
            raise OptionError(f"{self.name}: head_dim and num_heads must be positive, got {head_dim}, {num_heads}")
        if num_kv_heads is not None and (num_kv_heads <= 0 or num_heads % num_kv_heads):
            raise OptionError(
                f"{self.name}: num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (GQA groups)"
            )
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        try:
            self.opts = self.Options(**options)
        except TypeError as e:  # unknown option names reach here only when built without make()
            valid = ", ".join(f.name for f in dataclasses.fields(self.Options))
            raise OptionError(f"{self.name}: {e}; valid options: {valid or '(none)'}") from None
        validate_options(self.name, self.opts)
        self.max_len: int | None = None
        self.kernel: str | None = None  # the kernel the last call ran (set by _attend)
        self._checked: dict = {}  # requests check() has passed (see check)

    def __setattr__(self, name, value):
        # `kernel` is a plain string set on every call: nn.Module's parameter / buffer / submodule bookkeeping
        # costs microseconds per call for nothing there
        if name == "kernel":
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    # ---- what the method owns besides its maths ------------------------------------------------------------
    @classmethod
    def defaults(cls, seq_len: int, given: dict | None = None) -> dict:
        """Options at sequence length `seq_len` unless told otherwise (compare, bench, advice read them here);
        `given`: the options the caller sets (`registry.options_at` puts them over these), for a default that
        depends on one of them."""
        return {}

    @classmethod
    def exact_limit(cls, tq: int, tk: int) -> dict | None:
        """Options under which the method computes dense attention exactly; None when it has no such limit."""
        return None

    @classmethod
    def test_options(cls, seq_len: int) -> dict:
        """Small, non-trivial options for checks at a short length (leak, padding, conformance)."""
        return cls.defaults(seq_len)

    def flops(self, tq: int, tk: int, causal: bool, *, grad: bool = False) -> float | None:
        """The forward's own floating-point work for one (batch, head) at (Tq, Tk), 2 FLOPs per multiply-add,
        counting the (query, key) pairs or features the method really computes, not the dense equivalent. grad:
        count the forward that runs when autograd records the call (a method whose kernels pick another form for
        training counts that one).
        Matmul terms only (softmaxes, feature-map nonlinearities and masks are left out, as flash-attention's
        count does). None: not counted for this method. Default: softmax attention over every visible pair."""
        return 4.0 * visible_pairs(tq, tk, causal) * self.head_dim

    def options_dict(self) -> dict:
        """The options this instance was built with, as plain JSON-able values."""
        out = {}
        for f in dataclasses.fields(self.opts):
            val = getattr(self.opts, f.name)
            out[f.name] = val.tolist() if isinstance(val, torch.Tensor) else val
        return out

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.opts).items() if not isinstance(v, (list, torch.Tensor)))
        return f"head_dim={self.head_dim}, num_heads={self.num_heads}" + (f", {opts}" if opts else "")

    # ---- the contract ------------------------------------------------------------------------------
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask=None,
        scale: float | None = None,
        need_probs: bool = False,
        need_lse: bool = False,
        need_col_sums: bool = False,
    ) -> AttnOutput:
        try:  # "yes" was truthy for some methods and a TypeError deep in SDPA for others
            ok = causal in (True, False)
        except RuntimeError:  # a tensor of several values
            ok = False
        if not ok:
            raise AttnlabError(f"{self.name}: causal must be True or False, got {causal!r}")
        causal = bool(causal)  # 1, numpy's and torch's booleans: a Python bool for every kernel
        if scale is not None:
            try:
                ok = not isinstance(scale, bool) and math.isfinite(float(scale))
                ok = ok and (float(scale) > 0 or not self.positive_scale)
            except (TypeError, ValueError):
                ok = False
            if not ok:  # NaN gave all-NaN outputs; a negative scale a math domain error 9 frames down in performer
                raise AttnlabError(f"{self.name}: scale must be a finite number{' > 0' * self.positive_scale}, got "
                                   f"{scale!r}")
        self.check(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_probs=need_probs,
                   need_lse=need_lse, need_col_sums=need_col_sums)
        if scale is None:
            scale = q.shape[-1] ** -0.5
        groups = q.shape[1] // k.shape[1]
        if not self.native_gqa:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.bool()
        kw = dict(causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, scale=float(scale),
                  need_probs=need_probs)
        if need_lse or need_col_sums:
            kw.update(need_lse=need_lse, need_col_sums=need_col_sums)
        try:
            if key_padding_mask is not None and self.anchored():
                res = attend_from_first_key(self, q, k, v, key_padding_mask, kw)
            else:
                res = self._attend(q, k, v, **kw)
        except UnsupportedError as e:  # a kernel's own refusal (ops/*) names the method too
            if str(e).startswith(f"{self.name}:"):
                raise
            raise UnsupportedError(f"{self.name}: {e}") from None
        return res if isinstance(res, AttnOutput) else AttnOutput(*res)

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        raise NotImplementedError

    def anchored(self) -> bool:
        """Whether the method reads absolute key positions (attention sinks, a block grid): then a row's positions
        count from its first real key (`attend_from_first_key`), as a left-padded row's position ids do."""
        return False

    # ---- validation, before any compute --------------------------------------------------------------
    def unsupported_reasons(
        self, *, causal: bool = False, padding: bool = False, attn_mask=None, need_probs: bool = False,
        tq: int | None = None, tk: int | None = None, gqa: bool = False, dtype: torch.dtype | None = None,
        need_lse: bool = False, need_col_sums: bool = False, device=None,
    ) -> list[str]:
        """Why this method cannot serve a request (empty list: it can). xformers' not_supported_reasons."""
        caps, why = self.capabilities, []
        if causal and not caps.causal:
            why.append("it cannot do causal attention")
        if padding and not caps.padding:
            why.append("it does not support key_padding_mask")
        if attn_mask is not None:
            if is_block_mask(attn_mask):
                if not caps.block_mask:
                    why.append("it does not accept a FlexAttention BlockMask")
            elif not caps.attn_mask:
                why.append("it does not support an arbitrary attn_mask (only causal and key_padding_mask)")
        if need_probs and not caps.probs:
            why.append("it cannot return attention probabilities (need_probs=True)")
        for extra, asked in (("lse", need_lse), ("col_sums", need_col_sums)):
            if asked and extra not in caps.extras:
                why.append(f"it cannot compute {extra} blockwise (need_{extra}=True; it offers: "
                           f"{', '.join(caps.extras) or 'none'})")
        if gqa and not caps.gqa:
            why.append("it does not support grouped-query attention (Hkv < H)")
        if tq is not None and tk is not None and tq != tk and not caps.cross:
            why.append(f"it needs Tq == Tk (got Tq={tq}, Tk={tk})")
        if tk is not None and self.max_len is not None and tk > self.max_len:
            why.append(f"it was built for at most max_len={self.max_len} keys, got {tk}")
        if dtype is not None and dtype not in caps.dtypes:
            why.append(f"it does not support dtype {dtype}")
        why += self._unsupported_reasons(causal=causal, tq=tq, tk=tk, dtype=dtype, device=device, need_lse=need_lse,
                                          need_col_sums=need_col_sums, need_probs=need_probs)
        return why

    def _unsupported_reasons(self, *, causal: bool, tq, tk, dtype, device, need_lse=False, need_col_sums=False,
                             need_probs=False) -> list[str]:
        """Reasons that depend on the instance's options (e.g. a backend that cannot run here). Override."""
        return []

    def _check_state(self) -> tuple:
        """What besides the request's shapes, dtypes, device and flags `_unsupported_reasons` reads that can
        change after construction (a loaded pattern's length, a resized parameter): part of check()'s cache key.
        Override together with `_unsupported_reasons`."""
        return ()

    def check(self, q, k, v, *, causal=False, key_padding_mask=None, attn_mask=None, need_probs=False,
              need_lse=False, need_col_sums=False) -> None:
        """Refuse a bad request before compute (ShapeError, UnsupportedError). A request that passed is
        remembered by its shapes, dtypes, device, flags and `_check_state()`, so a layer called with the same
        shapes again pays a dict lookup instead of the ~50 comparisons (measured: ~100 us per call on the CPU
        here, a large share of a short kernel's time on the GPU). An explicit tensor attn_mask or a BlockMask is
        checked every time."""
        if torch.compiler.is_compiling():  # traced once per graph: the checks cost nothing at run time, and the
            # cache's key (object ids, data pointers) would make every layer's method a guard of its own
            return self._check_uncached(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                        need_probs=need_probs, need_lse=need_lse, need_col_sums=need_col_sums)
        key = None
        if (attn_mask is None and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
                and isinstance(v, torch.Tensor) and (key_padding_mask is None or isinstance(key_padding_mask, torch.Tensor))):
            kpm = None if key_padding_mask is None else (key_padding_mask.shape, key_padding_mask.dtype)
            key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, kpm,
                   causal, need_probs, need_lse, need_col_sums, self.max_len, self._check_state())
            if key in self._checked:
                return
        self._check_uncached(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                             need_probs=need_probs, need_lse=need_lse, need_col_sums=need_col_sums)
        if key is not None:
            if len(self._checked) >= 64:
                self._checked.clear()
            self._checked[key] = True

    def _check_uncached(self, q, k, v, *, causal, key_padding_mask, attn_mask, need_probs, need_lse,
                        need_col_sums) -> None:
        n = self.name
        for t, nm in ((q, "q"), (k, "k"), (v, "v")):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ShapeError(f"{n}: {nm} must be a 4D tensor [B, heads, T, head_dim], got {shape}")
        b, h, tq, d = q.shape
        if k.shape[0] != b or v.shape[0] != b:
            raise ShapeError(f"{n}: batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
        if k.shape[:3] != v.shape[:3]:
            raise ShapeError(f"{n}: k {tuple(k.shape)} and v {tuple(v.shape)} must agree in [B, Hkv, Tk]")
        if k.shape[-1] != d:
            raise ShapeError(f"{n}: q head_dim {d} != k head_dim {k.shape[-1]}")
        if d != self.head_dim or v.shape[-1] != self.head_dim:
            raise ShapeError(f"{n}: built for head_dim={self.head_dim}, got q/k {d}, v {v.shape[-1]}")
        if h != self.num_heads:
            raise ShapeError(f"{n}: built for num_heads={self.num_heads}, got q with {h} heads")
        hkv, tk = k.shape[1], k.shape[2]
        if h % hkv:
            raise ShapeError(f"{n}: kv heads ({hkv}) must divide query heads ({h}) for GQA")
        if self.num_kv_heads is not None and hkv != self.num_kv_heads:
            raise ShapeError(f"{n}: built for num_kv_heads={self.num_kv_heads}, got k/v with {hkv} heads")
        if tq == 0 or tk == 0 or b == 0:
            raise ShapeError(f"{n}: empty input (B={b}, Tq={tq}, Tk={tk})")
        if not (q.dtype == k.dtype == v.dtype):
            raise ShapeError(f"{n}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise ShapeError(f"{n}: q, k, v are on different devices")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or tuple(key_padding_mask.shape) != (b, tk):
                got = tuple(key_padding_mask.shape) if isinstance(key_padding_mask, torch.Tensor) else key_padding_mask
                raise ShapeError(f"{n}: key_padding_mask must be Bool[B={b}, Tk={tk}] (True = real key), got {got}")
            if key_padding_mask.dtype != torch.bool:
                raise ShapeError(
                    f"{n}: key_padding_mask must be bool (True = real key, as in SDPA), got {key_padding_mask.dtype}"
                )
        if attn_mask is not None and not is_block_mask(attn_mask):
            if not isinstance(attn_mask, torch.Tensor):
                raise ShapeError(f"{n}: attn_mask must be a tensor or a BlockMask, got {type(attn_mask).__name__}")
            try:
                torch.broadcast_shapes(attn_mask.shape, (b, h, tq, tk))
                ok = attn_mask.dim() <= 4
            except RuntimeError:
                ok = False
            if not ok:
                raise ShapeError(f"{n}: attn_mask {tuple(attn_mask.shape)} does not broadcast to [B, H, Tq, Tk]={(b, h, tq, tk)}")
        why = self.unsupported_reasons(
            causal=causal, padding=key_padding_mask is not None, attn_mask=attn_mask, need_probs=need_probs,
            tq=tq, tk=tk, gqa=hkv != h, dtype=q.dtype, need_lse=need_lse, need_col_sums=need_col_sums, device=q.device,
        )
        if why:
            raise UnsupportedError(f"method {n!r} cannot run this request: " + "; ".join(why))
