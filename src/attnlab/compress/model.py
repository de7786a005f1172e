"""The sequence autoencoder: n tokens -> m = ceil(ratio * n) latent vectors -> the same n tokens.

    tokens [B, n] -> embedding + learned positions -> enc_layers pre-norm blocks (attnlab.nn.MultiheadAttention)
      -> Resize (attention whose queries are W_S Q: the `reduce` method, ratio r)       [B, m, dim]
      -> tanh(Linear(dim -> latent_dim))                                               latents in [-1, 1]
      -> Linear(latent_dim -> dim) -> Resize (ratio 1 / r, out_len = n) + decoder positions
      -> dec_layers pre-norm blocks -> logits over the vocabulary (tied to the embedding)

The research this follows (a scaling matrix on the query path, cross-entropy on token reconstruction) used a
fixed input length; here one model serves every length up to max_len: the resize attention's mixing is a
kernel over row offsets (mixing="relative", any length) or the paper's matrix area-resampled
(mixing="absolute"), and training draws a new length every step. Latents are bounded by tanh so that the
codec (codec.py) quantises them to `bits` per number with a fixed scale; training adds uniform noise of one
quantisation step (`quant_bits`) so that the decoder learns to read quantised latents.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .. import registry
from ..nn import TransformerBlock
from ..types import OptionError


@dataclasses.dataclass
class AutoencoderConfig:
    vocab_size: int
    ratio: float = 0.5  # latent vectors per token
    max_len: int = 512  # longest input (tokens)
    dim: int = 256
    heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    mlp_dim: int = 1024
    latent_dim: int = 64  # numbers per latent vector (what the codec stores)
    mixing: str = "relative"  # the resize attention's W_S: relative | absolute (reduce's option)
    radius: int = 8  # relative mixing: reach in rows either side of a centre (at least the stretch a row covers)
    quant_bits: int = 8  # training noise of one quantisation step at this many bits (0: none)
    bias: str = "distance"  # the resize attention's score bias (reduce's option): distance | none (the paper's)

    def check(self) -> None:
        for name in ("vocab_size", "max_len", "dim", "heads", "mlp_dim", "latent_dim"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("enc_layers", "dec_layers"):
            if getattr(self, name) < 0:
                raise OptionError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.ratio <= 1:
            raise OptionError(f"ratio must be in (0, 1] (latent vectors per token), got {self.ratio}")
        if self.dim % self.heads:
            raise OptionError(f"dim {self.dim} must be a multiple of heads {self.heads}")
        if not 0 <= self.quant_bits <= 16:
            raise OptionError(f"quant_bits must be in 0..16, got {self.quant_bits}")
        stretch = math.ceil(1 / self.ratio)
        if self.mixing == "relative" and self.radius < stretch:
            raise OptionError(f"radius {self.radius} is narrower than the {stretch} tokens each latent covers at "
                              f"ratio {self.ratio:.4g}; use radius >= {stretch}")
        registry.check_options("reduce", self.reduce_options(self.ratio))

    def reduce_options(self, ratio: float) -> dict:
        return {"ratio": ratio, "mixing": self.mixing, "radius": self.radius, "per_head": True, "bias": self.bias,
                "max_len": self.max_len if ratio <= 1 else max(1, math.ceil(self.max_len * self.ratio))}

    def latent_len(self, n: int) -> int:
        from ..methods.reduce import out_length

        return out_length(n, self.ratio)


class Resize(nn.Module):
    """Attention from n rows to m rows (the `reduce` method) followed by an MLP with a residual."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, options: dict):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.method = registry.make("reduce", head_dim=self.head_dim, num_heads=heads, **options)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor, out_len: int) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.method(q, k, v, out_len=out_len).out  # [B, H, m, hd]
        x = self.proj(out.transpose(1, 2).reshape(b, out_len, d))
        return x + self.mlp(self.norm2(x))


class SequenceAutoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        d = cfg.dim
        self.embed = nn.Embedding(cfg.vocab_size, d)
        nn.init.normal_(self.embed.weight, std=d**-0.5)  # unit-scale logits through the tied output head
        self.pos_enc = nn.Parameter(torch.randn(cfg.max_len, d))  # as large as the scaled embeddings:
        self.pos_dec = nn.Parameter(torch.randn(cfg.max_len, d))  # the resize attention finds rows by position
        self.encoder = nn.ModuleList(TransformerBlock(d, cfg.heads, cfg.mlp_dim, method="sdpa") for _ in range(cfg.enc_layers))
        self.shrink = Resize(d, cfg.heads, cfg.mlp_dim, cfg.reduce_options(cfg.ratio))
        self.to_latent = nn.Linear(d, cfg.latent_dim)
        self.from_latent = nn.Linear(cfg.latent_dim, d)
        self.grow = Resize(d, cfg.heads, cfg.mlp_dim, cfg.reduce_options(1 / cfg.ratio))
        self.decoder = nn.ModuleList(TransformerBlock(d, cfg.heads, cfg.mlp_dim, method="sdpa") for _ in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(d)

    def check_ids(self, ids: torch.Tensor) -> None:
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise OptionError(f"token ids must be a LongTensor [batch, length], got {ids.dtype} {tuple(ids.shape)}")
        n = ids.shape[1]
        if not 1 <= n <= self.cfg.max_len:
            raise OptionError(f"sequence length {n} is outside 1..{self.cfg.max_len} (this model's max_len)")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise OptionError(f"token ids must be in 0..{self.cfg.vocab_size - 1} (the model's vocabulary)")

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """LongTensor [B, n] -> latents Float[B, ceil(ratio * n), latent_dim] in [-1, 1]."""
        self.check_ids(ids)
        n = ids.shape[1]
        x = self.embed(ids) * self.cfg.dim**0.5 + self.pos_enc[:n]
        for block in self.encoder:
            x = block(x)
        x = self.shrink(x, self.cfg.latent_len(n))
        return torch.tanh(self.to_latent(x))

    def decode(self, latents: torch.Tensor, n: int) -> torch.Tensor:
        """Latents [B, m, latent_dim] -> logits Float[B, n, vocab] for n tokens."""
        if latents.dim() != 3 or latents.shape[-1] != self.cfg.latent_dim:
            raise OptionError(f"latents must be [batch, m, {self.cfg.latent_dim}], got {tuple(latents.shape)}")
        if not 1 <= n <= self.cfg.max_len:
            raise OptionError(f"output length {n} is outside 1..{self.cfg.max_len} (this model's max_len)")
        x = self.grow(self.from_latent(latents), n) + self.pos_dec[:n]
        for block in self.decoder:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T

    def noisy(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents plus uniform noise of one quantisation step (training only), kept in [-1, 1]."""
        if not self.training or not self.cfg.quant_bits:
            return latents
        step = 2.0 / (2 ** self.cfg.quant_bits - 1)
        return (latents + (torch.rand_like(latents) - 0.5) * step).clamp(-1, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Reconstruction logits [B, n, vocab] (training: through noisy latents)."""
        return self.decode(self.noisy(self.encode(ids)), ids.shape[1])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
