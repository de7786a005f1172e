"""Feature maps for kernelised (linear) attention, as modules: phi(q).phi(k) stands in for exp(q.k * scale).

    phi, log_scale = feature_map(x, scale=s, is_query=True|False, compiled=False)

phi [B, H, T, F] in x's dtype; log_scale [B, H, T] (fp32) or None: for keys, the true feature is
exp(log_scale_j) * phi_j with phi_j bounded and log_scale_j unbounded, which `ops.linear` stabilises with
maxima that cancel (see its module doc); a query's own factor cancels in the normalisation and is dropped.

- `ELU` (elu(x) + 1, Katharopoulos et al. 2020) and `ReLU`: fixed, no parameters; the scale is ignored.
- `FAVOR` (Performer's positive orthogonal random features, Choromanski et al. 2021): buffers.
- `Fourier` (random Fourier features, RFA, Peng et al. 2021): buffers; `UnitFourier`, RFA's practice: unit
  queries and keys and a learned per-head, per-dimension sigma.
- `Hedgehog` (Zhang et al. 2024; LoLCATs): a learned per-head projection followed by a softmax over features,
  trained to mimic softmax attention.

Random maps draw their features from a seeded generator whose state is a buffer (`rng_state`), so a redraw
continues the same stream after save and load. The exponent/phase maths runs in fp32 for half inputs;
`compiled=True` runs it through torch.compile (one fused kernel; the CUDA default of the methods); FAVOR+ on half
inputs then runs `ops.favor_triton`'s kernel instead (its projection as split-precision tensor-core dots).
"""
from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.fused import fused
from ..ops.limits import map_fits
from ..ops.linear import compute_dtype


class FeatureMap(nn.Module):
    trainable = False
    # the same map for every head (no per-head parameters): a GQA layer's keys can be mapped once per kv head and
    # the features shared by the group's query heads (methods/_kernel.py)
    head_shared = False
    # an elementwise map the causal Triton kernels can apply as they load q and k (`ops.linear_triton.FEATURE_MAPS`):
    # inference then writes no feature tensors
    kernel_map: str | None = None
    # a map with a one-node causal Triton path of its own defines `causal_triton(q, k, v, *, scale, compiled)`,
    # returning the output or None where it does not serve (FAVOR+: `ops.performer_triton`)
    causal_triton = None

    def projection_flops(self, head_dim: int) -> int:
        """Matmul FLOPs to map one token (2 per multiply-add): 0 for elementwise maps."""
        return 0

    def out_dim(self, head_dim: int) -> int:
        return head_dim

    def forward(self, x: torch.Tensor, *, scale: float, is_query: bool, compiled: bool = False):
        raise NotImplementedError


@fused
def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    xf = x.to(compute_dtype(x.dtype))  # fp32 for half inputs
    return (F.elu(xf) + 1.0).to(x.dtype)


class ELU(FeatureMap):
    """elu(x) + 1, the paper's map (positive, F = D)."""
    head_shared = True
    kernel_map = "elu"

    def forward(self, x, *, scale, is_query, compiled=False):
        return _elu_plus_one(x, compiled=compiled), None


class ReLU(FeatureMap):
    """relu(x): a row's normaliser can be exactly 0 (every feature off); such a row returns zeros."""
    head_shared = True
    kernel_map = "relu"

    def forward(self, x, *, scale, is_query, compiled=False):
        return F.relu(x), None


class _RandomFeatures(FeatureMap):
    """Shared mechanics of the random maps: a `features` buffer [m, D] and a seeded, saved generator."""

    def __init__(self, head_dim: int, num_features: int, seed: int, redraw: bool, learn: bool = False):
        super().__init__()
        self.head_dim, self.num_features, self.redraw, self.learn = head_dim, num_features, redraw, learn
        gen = torch.Generator().manual_seed(seed)
        if learn:  # the drawn features are the init of a trained projection (redraw-free)
            self.features = nn.Parameter(self._draw(gen))  # (m, D)
        else:
            self.register_buffer("features", self._draw(gen))  # (m, D)
        self.register_buffer("rng_state", gen.get_state())  # where the next redraw continues

    def projection_flops(self, head_dim: int) -> int:
        return 2 * head_dim * self.num_features

    def _draw(self, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def redraw_features(self) -> None:
        gen = torch.Generator()
        gen.set_state(self.rng_state.cpu())
        w = self._draw(gen)
        self.rng_state.copy_(gen.get_state())
        # Rebind (not copy_ in place): a graph from the previous forward may still need the old tensor.
        self.features = w.to(device=self.features.device, dtype=self.features.dtype)

    def maybe_redraw(self) -> None:
        if self.training and self.redraw:
            self.redraw_features()

    @property
    def trainable(self) -> bool:
        return self.learn

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, redraw={self.redraw}, learn={self.learn}"


def orthogonal_gaussian(m: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """[m, d]: stacked blocks of d orthonormal rows, each row rescaled to a chi(d) norm (so rows are
    marginally N(0, I) but orthogonal within a block: lower-variance estimator than iid rows)."""
    g = torch.randn(-(-m // d), d, d, generator=gen, dtype=torch.float64)  # (blocks, d, d)
    qmat, r = torch.linalg.qr(g)  # one batched QR: orthonormal columns per block
    # Fix QR's sign convention (diag(R) > 0): without it Q is not Haar-distributed and the rows have
    # a nonzero mean, which biases the estimator (measured: the error stopped falling with m).
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    w = qmat.transpose(-1, -2).reshape(-1, d)[:m]  # (m, d): the rows of each block
    norms = torch.randn(m, d, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)  # chi(d)
    return (w * norms).float()


@fused
def favor_features(x: torch.Tensor, w: torch.Tensor, half_scale: float, log_inv: float):
    """FAVOR+ positive features of x [B, H, T, D] with w = sqrt(scale) * W [m, D] (fp32):

        log phi(x) = x.w - scale |x|^2 / 2 - b(x) + log_inv,  b(x) = max over the m features (detached)

    Returns (phi in x's dtype, b in fp32 [B, H, T]): the true feature is exp(b) phi. The exponent is
    computed in fp32 (bf16 rounding of x.w, |x.w| ~ 10-20, would move every feature by several percent)."""
    xf = x.to(compute_dtype(x.dtype))  # fp32 for half inputs
    lx = xf @ w.to(xf.dtype).T - xf.pow(2).sum(-1, keepdim=True) * half_scale  # (B, H, T, m)
    b = lx.detach().amax(-1, keepdim=True)  # (B, H, T, 1)
    return torch.exp(lx - b + log_inv).to(x.dtype), b.squeeze(-1)


class FAVOR(_RandomFeatures):
    """Performer's FAVOR+: exp(q.k * scale) = E_w[phi(q') phi(k')], q' = q sqrt(scale), k' = k sqrt(scale),
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m), W [m, D]: orthogonal blocks with chi(D) row norms.

    Stabilisers: a query's per-row max cancels row-wise; a key's per-key max b_j does not, and is returned as the
    key log-scale. Both are detached: exp(b_j) exp(a_jf - b_j) does not depend on b_j."""
    head_shared = True

    def _draw(self, gen):
        return orthogonal_gaussian(self.num_features, self.head_dim, gen)

    def out_dim(self, head_dim):
        return self.num_features

    def forward(self, x, *, scale, is_query, compiled=False):
        log_inv = -0.5 * math.log(self.num_features)
        if compiled and not favor_triton_reasons(x) and map_fits(x, self.num_features):
            # half inputs on CUDA: one kernel, split-precision dots (past 32-bit row offsets: the fused PyTorch map)
            from ..ops import favor_triton

            phi, b = favor_triton.favor_features(x, self.features, math.sqrt(scale), scale / 2, log_inv)
        else:
            w = self.features.float() * math.sqrt(scale)  # (m, D): sqrt(scale) folded into the features
            phi, b = favor_features(x, w, scale / 2, log_inv, compiled=compiled)
        return phi, (None if is_query else b)

    def causal_triton(self, q, k, v, *, scale, compiled=False):
        """Causal attention of raw q, k, v through this map and the causal Triton kernels as one node
        (`ops.performer_triton`: independent launches on two streams), or None where that does not serve the inputs
        (the caller then maps q and k and runs the core)."""
        if not compiled or favor_triton_reasons(q):
            return None
        from ..ops import performer_triton

        if not performer_triton.serves(q, k, v, self.learn, self.num_features):
            return None
        return performer_triton.causal_favor(q, k, v, self.features, math.sqrt(scale), scale / 2,
                                             -0.5 * math.log(self.num_features))


def favor_triton_reasons(x: torch.Tensor) -> list[str]:
    """Why `ops.favor_triton`'s kernel cannot map x (empty: it can): it takes bf16 / fp16 on CUDA (or CPU tensors
    under Triton's interpreter, the CPU tests), head dims 16..128; fp32 inputs keep the fp32 GEMM. Read twice a layer
    per call: decided once per (device type, dtype, head dim, interpreter)."""
    return list(_favor_triton_reasons(x.device.type, x.dtype, x.shape[-1], os.environ.get("TRITON_INTERPRET") == "1"))


@functools.lru_cache(maxsize=64)
def _favor_triton_reasons(device_type: str, dtype: torch.dtype, head_dim: int, interpreted: bool) -> tuple[str, ...]:
    why = []
    if importlib.util.find_spec("triton") is None:
        why.append("triton is not installed")
    elif device_type != "cuda" and not interpreted:
        why.append("the kernel needs a CUDA device")
    if dtype not in (torch.bfloat16, torch.float16):
        why.append(f"the kernel maps half-precision inputs, got {dtype}")
    if not 16 <= head_dim <= 128:
        why.append(f"the kernel takes head dims 16..128, got {head_dim}")
    return tuple(why)


@fused
def fourier_features(x: torch.Tensor, w: torch.Tensor, half_scale: float, inv: float):
    """[sin(x.w), cos(x.w)] * inv in x's dtype [B, H, T, 2m], and scale |x|^2 / 2 in fp32 [B, H, T], for
    w = sqrt(scale) * W [m, D]. The phases are computed in fp32."""
    xf = x.to(compute_dtype(x.dtype))  # fp32 for half inputs
    proj = xf @ w.to(xf.dtype).T  # (B, H, T, m)
    phi = torch.cat([proj.sin(), proj.cos()], dim=-1) * inv
    return phi.to(x.dtype), xf.pow(2).sum(-1) * half_scale


class Fourier(_RandomFeatures):
    """Random Fourier features of the Gaussian kernel (Rahimi & Recht 2007), as RFA uses them:

        exp(-|x - y|^2 / 2) = E_w[phi(x).phi(y)],  phi(x) = [sin(W x), cos(W x)] / sqrt(m),  W ~ N(0, I)

    and exp(q'.k') = exp(|q'|^2/2) exp(|k'|^2/2) exp(-|q' - k'|^2/2). The q factor cancels in the normalisation;
    the k factor exp(|k'|^2/2) is returned as the key log-scale. Feature dimension 2m. Trig features are not
    positive: a row's estimated normaliser can be near zero or negative, and the output then blows up."""
    head_shared = True

    def _draw(self, gen):
        return torch.randn(self.num_features, self.head_dim, generator=gen, dtype=torch.float64).float()

    def out_dim(self, head_dim):
        return 2 * self.num_features

    def forward(self, x, *, scale, is_query, compiled=False):
        w = self.features.float() * math.sqrt(scale)  # (m, D): sqrt(scale) folded into the frequencies
        phi, lk = fourier_features(x, w, scale / 2, self.num_features ** -0.5, compiled=compiled)
        return phi, (None if is_query else lk)


@fused
def unit_fourier_features(x: torch.Tensor, sigma: torch.Tensor, w: torch.Tensor, inv: float):
    """[sin(u.w), cos(u.w)] * inv in x's dtype [B, H, T, 2m] for u = sigma_h * x / |x| (per head h, per dim;
    sigma [H, D]) and w [m, D]: the phases in fp32."""
    xf = x.to(compute_dtype(x.dtype))  # fp32 for half inputs
    u = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)) * sigma.to(xf.dtype)[None, :, None, :]
    proj = u @ w.to(xf.dtype).T  # (B, H, T, m)
    return (torch.cat([proj.sin(), proj.cos()], dim=-1) * inv).to(x.dtype)


class UnitFourier(Fourier):
    """RFA as its paper and code run it: queries and keys l2-normalised first, then random Fourier features with
    a learned per-head, per-dimension inverse length-scale sigma [H, D] (w = sigma o w~ in the paper):

        phi(q).phi(k) ~ exp(-|sigma o (q^ - k^)|^2 / 2),   q^ = q / |q|

    With a constant sigma = c that is exp(c^2 q^.k^) up to a factor shared by every key: softmax attention over
    cosine similarities at temperature 1 / c^2 (the exact limit). Unit inputs keep the key factor of the plain
    map (exp(|k'|^2 / 2), unbounded) constant, so the normaliser stays on the scale of the kernel instead of
    blowing up: the plain map trained a ViT to chance, this one to dense's accuracy (README, Vision). `scale`
    is not used (sigma is the temperature)."""
    head_shared = False  # a sigma per head

    def __init__(self, num_heads: int, head_dim: int, num_features: int, seed: int, redraw: bool, learn: bool = False,
                 sigma: float = 1.0):
        super().__init__(head_dim, num_features, seed, redraw, learn)
        self.sigma = nn.Parameter(torch.full((num_heads, head_dim), float(sigma)))

    def forward(self, x, *, scale, is_query, compiled=False):
        phi = unit_fourier_features(x, self.sigma, self.features.float(), self.num_features ** -0.5, compiled=compiled)
        return phi, None


@fused
def hedgehog_features(x: torch.Tensor, weight: torch.Tensor):
    """[softmax(x W_h), softmax(-x W_h)] over the features, per head h (fp32 for half inputs), clamped at 1e-12.
    x [B, H, T, D], weight [H, D, F] -> [B, H, T, 2F]."""
    xf = x.to(compute_dtype(x.dtype))
    z = torch.einsum("bhtd,hdf->bhtf", xf, weight.to(xf.dtype))  # (B, H, T, F)
    phi = torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1).clamp_min(1e-12)
    return phi.to(x.dtype)


class Hedgehog(FeatureMap):
    """Hedgehog's learnable map (Zhang et al. 2024, as LoLCATs uses it): phi(x) = [softmax(x W), softmax(-x W)]
    with a per-head W [D, F], identity-initialised (the first min(D, F) dims pass through), no bias. Each half
    sums to 1, so phi(q).phi(k) <= 2: on the scale of a max-shifted softmax term, which the hybrid method
    relies on. Queries and keys use separate maps (two instances)."""

    trainable = True

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        w = torch.zeros(num_heads, head_dim, feature_dim)
        n = min(head_dim, feature_dim)
        w[:, torch.arange(n), torch.arange(n)] = 1.0
        self.weight = nn.Parameter(w)  # (H, D, F)

    def projection_flops(self, head_dim: int) -> int:
        return 2 * head_dim * self.weight.shape[-1]

    def out_dim(self, head_dim):
        return 2 * self.weight.shape[-1]

    def extra_repr(self) -> str:
        h, d, f = self.weight.shape
        return f"heads={h}, head_dim={d}, feature_dim={f}"

    def forward(self, x, *, scale, is_query, compiled=False):
        return hedgehog_features(x, self.weight, compiled=compiled), None
