"""Peer implementations behind the same call, so attnlab's methods are timed beside the packages people use.

A peer is `Peer(impl, method, factory, note)`: `impl` is the package (or torch API) it comes from,
`method` the attnlab method it is compared with, and

    fn = factory(seq_len, heads, head_dim, causal, dtype, device, **options)   # once per length
    out = fn(*fn.prepare(q, k, v))                                            # timed: fn(...) only

`options` are the attnlab method's options at that length (window, num_landmarks, ...), so both sides
run the same configuration. `fn.prepare` (outside the timed region) converts the shared [B, H, T, D]
inputs into the peer's own layout; where a peer's module owns projections we replace them by identity
views so only attention is timed, and say so in `note`. A factory raises `NotInstalled` when the package
cannot be imported and `Unsupported` when it cannot serve the request (e.g. Linformer causal).

Install the optional peers with `pip install attnlab[peers]`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .harness import NotInstalled, Unsupported


@dataclass(frozen=True)
class Peer:
    impl: str  # package name as pip knows it, or the torch API
    method: str  # the attnlab method it serves
    factory: Callable
    note: str = ""  # what is timed besides attention, layout, semantics


class PeerFn:
    """A callable with a `prepare(q, k, v) -> tuple` step that runs outside the timed region."""

    def __init__(self, call, prepare=None, module: nn.Module | None = None, note: str = ""):
        self._call = call
        self._prepare = prepare
        self.module = module
        self.note = note

    def prepare(self, q, k, v):
        return (q, k, v) if self._prepare is None else tuple(self._prepare(q, k, v))

    def __call__(self, *args):
        return self._call(*args)

    def parameters(self):
        return list(self.module.parameters()) if self.module is not None else []


def _import(module: str, package: str):
    if importlib.util.find_spec(module) is None:
        raise NotInstalled(f"{package} is not installed (pip install {package}, or attnlab[peers])")
    try:
        return importlib.import_module(module)
    except ImportError as e:  # the package is there but one of its own dependencies is not
        raise NotInstalled(f"{package} is installed but cannot be imported: {e}") from None


def _ensure_distutils_version() -> None:
    """performer-pytorch does `from distutils.version import LooseVersion`; Python 3.12 dropped distutils.

    setuptools normally provides it; where it does not, a minimal stand-in (numeric comparison only) is
    put in sys.modules so the peer imports. Only ever used for performer-pytorch's torch-version check.
    """
    try:
        importlib.import_module("distutils.version")
        return
    except ImportError:
        pass

    class LooseVersion:
        def __init__(self, v):
            self.v = tuple(int(p) if p.isdigit() else 0 for p in str(v).split("+")[0].split(".")[:3])

        def __ge__(self, other):
            return self.v >= other.v

        def __lt__(self, other):
            return self.v < other.v

    pkg = types.ModuleType("distutils")
    ver = types.ModuleType("distutils.version")
    ver.LooseVersion = LooseVersion
    pkg.version = ver
    sys.modules.setdefault("distutils", pkg)
    sys.modules.setdefault("distutils.version", ver)


def _bhtd_to_bt_hd(x):  # (B, H, T, D) -> (B, T, H*D)
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d).contiguous()


def _opt(options: dict, *names, default=None):
    for n in names:
        if n in options and options[n] is not None:
            return options[n]
    return default


# ---- lucidrains' packages ----------------------------------------------------------------------------

def performer_pytorch(seq_len, heads, head_dim, causal, dtype, device, **options):
    _ensure_distutils_version()
    mod = _import("performer_pytorch", "performer-pytorch")
    m = _opt(options, "num_features", "nb_features", "features", default=256)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice when fast_transformers is absent
        fa = mod.FastAttention(dim_heads=head_dim, nb_features=m, causal=causal).to(device=device, dtype=dtype)
    note = f"performer_pytorch.FastAttention(nb_features={m}) on q, k, v [B,H,T,D]; no projections"
    if causal:
        note += "; causal uses its pure-PyTorch chunked prefix sum (fast_transformers CUDA kernel absent)"
    return PeerFn(lambda q, k, v: fa(q, k, v), module=fa, note=note)


def linformer(seq_len, heads, head_dim, causal, dtype, device, **options):
    if causal:
        raise Unsupported("linformer has no causal mode (its E/F projections mix all positions)")
    mod = _import("linformer", "linformer")
    kp = int(_opt(options, "proj_len", "k", "proj_dim", default=256))
    attn = mod.LinformerSelfAttention(dim=heads * head_dim, seq_len=seq_len, k=kp, heads=heads, dim_head=head_dim)
    hd = heads * head_dim
    # identity projections: x carries q, the context carries [k | v]; slicing a view costs nothing
    attn.to_q = nn.Identity()
    attn.to_k = _Slice(0, hd)
    attn.to_v = _Slice(hd, 2 * hd)
    attn.to_out = nn.Identity()
    attn = attn.to(device=device, dtype=dtype)

    def prepare(q, k, v):
        return _bhtd_to_bt_hd(q), torch.cat([_bhtd_to_bt_hd(k), _bhtd_to_bt_hd(v)], dim=-1)

    note = (f"linformer.LinformerSelfAttention(k={kp}, seq_len={seq_len}); to_q/to_k/to_v/to_out replaced by "
            "identity views, so only the E/F sequence projections + attention are timed; inputs as [B,T,H*D]")
    return PeerFn(lambda x, ctx: attn(x, context=ctx), prepare, module=attn, note=note)


class _Slice(nn.Module):
    def __init__(self, lo, hi):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x):
        return x[..., self.lo:self.hi]


def nystrom_attention(seq_len, heads, head_dim, causal, dtype, device, **options):
    if causal:
        raise Unsupported("nystrom-attention has no causal mode")
    mod = _import("nystrom_attention", "nystrom-attention")
    lm = int(_opt(options, "num_landmarks", "landmarks", default=64))
    iters = int(_opt(options, "pinv_iterations", "pinv_iters", default=6))
    attn = mod.NystromAttention(dim=heads * head_dim, dim_head=head_dim, heads=heads, num_landmarks=lm,
                                pinv_iterations=iters, residual=False)
    attn.to_qkv = nn.Identity()
    attn.to_out = nn.Identity()
    attn = attn.to(device=device, dtype=dtype)

    def prepare(q, k, v):
        return (torch.cat([_bhtd_to_bt_hd(q), _bhtd_to_bt_hd(k), _bhtd_to_bt_hd(v)], dim=-1),)

    note = (f"nystrom_attention.NystromAttention(num_landmarks={lm}, pinv_iterations={iters}, residual=False); "
            "to_qkv/to_out replaced by identity; input packed as [B,T,3*H*D] outside the timed call")
    if dtype in (torch.float32, torch.float64):
        return PeerFn(lambda x: attn(x), prepare, module=attn, note=note)
    # its pinv adds an fp32 torch.eye to low-precision tensors and fails; autocast at the inputs' dtype
    # casts that identity (and keeps every matmul in the inputs' dtype)
    dev_type = torch.device(device).type

    def call(x):
        with torch.autocast(dev_type, dtype=dtype):
            return attn(x)

    return PeerFn(call, prepare, module=attn, note=note + f"; run under torch.autocast({dtype}) (fp32 eye in its pinv)")


def reformer_pytorch(seq_len, heads, head_dim, causal, dtype, device, **options):
    mod = _import("reformer_pytorch", "reformer-pytorch")
    bucket = int(_opt(options, "bucket_size", default=64))
    n_hashes = int(_opt(options, "n_hashes", "num_hashes", default=2))
    if seq_len % (2 * bucket):
        raise Unsupported(f"reformer-pytorch needs seq_len divisible by 2*bucket_size={2 * bucket}, got {seq_len}")
    lsh = mod.LSHAttention(bucket_size=bucket, n_hashes=n_hashes, causal=causal).to(device=device).eval()

    def prepare(q, k, v):
        b, h, t, d = q.shape
        return q.reshape(b * h, t, d), v.reshape(b * h, t, d)

    note = (f"reformer_pytorch.LSHAttention(bucket_size={bucket}, n_hashes={n_hashes}); shared-QK attention: "
            "q serves as both query and key (k unused); heads folded into batch")
    return PeerFn(lambda qk, v: lsh(qk, v)[0], prepare, module=lsh, note=note)


def local_attention(seq_len, heads, head_dim, causal, dtype, device, **options):
    mod = _import("local_attention", "local-attention")
    w = int(_opt(options, "window", "window_size", default=256))
    la = mod.LocalAttention(window_size=w, causal=causal, look_backward=1, look_forward=0 if causal else 1,
                            exact_windowsize=True, autopad=True, use_rotary_pos_emb=False)
    la = la.to(device=device, dtype=dtype)
    note = (f"local_attention.LocalAttention(window_size={w}, exact_windowsize=True): key j visible iff "
            f"|i-j| <= {w} (and j <= i when causal); computed on blocks of {w} with one block each side")
    return PeerFn(lambda q, k, v: la(q, k, v), module=la, note=note)


# ---- flash-linear-attention ----------------------------------------------------------------------------

def _fla_linear(device):
    if torch.device(device).type != "cuda":
        raise Unsupported("fla-core's Triton kernels need a CUDA device")
    _import("triton", "triton")
    mod = _import("fla.ops.linear_attn", "fla-core")
    return mod.chunk_linear_attn


def fla_linear(seq_len, heads, head_dim, causal, dtype, device, **options):
    if not causal:
        raise Unsupported("fla-core's chunk_linear_attn is causal only (a recurrence); non-causal linear "
                          "attention is two matmuls and has no fla kernel")
    kernel = _fla_linear(device)

    def call(q, k, v):  # elu(x)+1 feature map (Katharopoulos et al.) inside the timed call, as attnlab's
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        return kernel(q, k, v, scale=1.0, normalize=True)[0]

    def prepare(q, k, v):  # (B, H, T, D) -> (B, T, H, D): fla's layout
        return tuple(x.transpose(1, 2).contiguous() for x in (q, k, v))

    note = ("fla.ops.linear_attn.chunk_linear_attn(normalize=True) with the elu+1 feature map inside the "
            "timed call; inputs as [B,T,H,D]")
    return PeerFn(call, prepare, note=note)


def fla_performer(seq_len, heads, head_dim, causal, dtype, device, **options):
    if not causal:
        raise Unsupported("fla-core's chunk_linear_attn is causal only; non-causal Performer is two matmuls")
    kernel = _fla_linear(device)
    m = int(_opt(options, "num_features", "nb_features", "features", default=256))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(m, head_dim, generator=g).to(device=device, dtype=dtype)  # (M, D) Gaussian features
    c = head_dim ** -0.25

    def phi(x, is_query):  # positive random features, FAVOR+ (Choromanski et al.), stabilised by a max
        xw = (x * c) @ w.t()  # (B, T, H, M)
        sq = (x * c).pow(2).sum(-1, keepdim=True) / 2
        mx = xw.amax(-1, keepdim=True) if is_query else xw.amax((-1, -3), keepdim=True)
        return torch.exp(xw - sq - mx.detach()) * m ** -0.5 + 1e-4

    def call(q, k, v):
        return kernel(phi(q, True), phi(k, False), v, scale=1.0, normalize=True)[0]

    def prepare(q, k, v):
        return tuple(x.transpose(1, 2).contiguous() for x in (q, k, v))

    note = (f"FAVOR+ positive features (M={m}, computed inside the timed call) + fla chunk_linear_attn "
            "(normalize=True); inputs as [B,T,H,D]")
    return PeerFn(call, prepare, note=note)


# ---- torch's own kernels ---------------------------------------------------------------------------------

_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH",
                  "cudnn": "CUDNN_ATTENTION"}


def _sdpa_factory(backend: str):
    def factory(seq_len, heads, head_dim, causal, dtype, device, **options):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kind = getattr(SDPBackend, _SDPA_BACKENDS[backend])
        if backend == "cudnn" and torch.device(device).type != "cuda":
            raise Unsupported("the cuDNN SDPA backend needs a CUDA device")

        def call(q, k, v):
            try:
                with sdpa_kernel([kind]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            except RuntimeError as e:
                msg = str(e)
                if "No available kernel" in msg or "No viable backend" in msg or "not supported" in msg.lower():
                    raise Unsupported(f"SDPA backend {backend!r} has no kernel for these inputs on "
                                      f"{torch.device(device).type} (torch: {msg.splitlines()[0]})") from None
                raise

        return PeerFn(call, note=f"torch.nn.functional.scaled_dot_product_attention under sdpa_kernel([{kind.name}])")

    return factory


_FLEX_COMPILED = None


def _flex():
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        from torch.nn.attention.flex_attention import flex_attention

        # dynamic=True: one kernel for every length (the method's own compile turns dynamic at its 2nd length)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=True)
    return _FLEX_COMPILED


def _method_block_mask(method: str, seq_len, heads, head_dim, causal, device, options):
    """(BlockMask, description) of the attnlab method's own pattern (its `pattern` part, the same options, the
    same BLOCK_SIZE it gives FlexAttention), so the raw-flex peer runs exactly the method's sparsity."""
    import attnlab

    inst = attnlab.make(method, head_dim=head_dim, num_heads=heads, **options)
    pattern = getattr(inst, "pattern", None)
    if pattern is None:
        raise Unsupported(f"method {method!r} has no sparsity pattern for a raw flex_attention peer")
    bs = inst.flex_block_size
    from torch.nn.attention.flex_attention import create_block_mask

    heads_dim = pattern.num_heads if pattern.per_head else None
    bm = create_block_mask(pattern.mask_mod(seq_len, seq_len, causal, device), None, heads_dim, seq_len, seq_len,
                           device=device, BLOCK_SIZE=bs)
    return bm, f"the attnlab {method} method's own pattern ({type(pattern).__name__}, BLOCK_SIZE={bs})"


def _flex_factory(method: str):
    def factory(seq_len, heads, head_dim, causal, dtype, device, **options):
        bm, src = _method_block_mask(method, seq_len, heads, head_dim, causal, device, options)
        flex = _flex()
        note = f"torch.compile(flex_attention)(q, k, v, block_mask=...) with {src}; no lse / empty-row fix-up"
        return PeerFn(lambda q, k, v: flex(q, k, v, block_mask=bm), note=note)

    return factory


PEERS: list[Peer] = [
    Peer("performer-pytorch", "performer", performer_pytorch),
    Peer("fla-core", "performer", fla_performer),
    Peer("fla-core", "linear", fla_linear),
    Peer("linformer", "linformer", linformer),
    Peer("nystrom-attention", "nystrom", nystrom_attention),
    Peer("reformer-pytorch", "lsh", reformer_pytorch),
    Peer("local-attention", "window", local_attention),
    Peer("torch.flex_attention", "window", _flex_factory("window")),
    Peer("torch.flex_attention", "block_sparse", _flex_factory("block_sparse")),
    *(Peer(f"torch.sdpa[{b}]", "sdpa", _sdpa_factory(b)) for b in _SDPA_BACKENDS),
]


# Under a time budget the peers that compile or autotune on first use (minutes for fla's Triton autotune)
# run after the others.
_SLOW_START = {"torch.flex_attention": 1, "fla-core": 2}


def peers_for(method: str, peers: list[Peer] | None = None) -> list[Peer]:
    return [p for p in (PEERS if peers is None else peers) if p.method == method]


def slow_start_rank(peer: Peer) -> int:
    return _SLOW_START.get(peer.impl, 0)
