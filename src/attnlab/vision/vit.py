"""A small Vision Transformer (Dosovitskiy et al. 2021) whose attention layers are torch.nn.MultiheadAttention,
so that `attnlab.swap(vit, method, ...)` puts any attnlab method in every block (sharing the weights; see
adapters/mha.py). Patch embedding (a strided convolution), learned position embeddings, pre-norm blocks,
classification from a CLS token or from the mean of the patch tokens.

    vit = ViT(ViTConfig(patch=4))            # 28x28 images -> 7x7 = 49 tokens (+1 CLS)
    attnlab.swap(vit, "performer", num_features=64)
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..nn import TransformerBlock
from ..types import OptionError


@dataclasses.dataclass
class ViTConfig:
    image_size: int = 28
    channels: int = 1
    num_classes: int = 10
    patch: int = 4
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 256
    dropout: float = 0.0
    pool: str = "cls"  # cls | mean

    def check(self) -> None:
        # sizes first: `dim % heads` below needs heads >= 1 (heads 0 was a ZeroDivisionError)
        for name in ("dim", "depth", "heads", "mlp_dim"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise OptionError(f"{name} must be an integer >= 1, got {val!r}")
        if self.patch < 1 or self.image_size % self.patch:
            raise OptionError(f"patch {self.patch} must divide the image size {self.image_size} (28: 1, 2, 4, 7, 14)")
        if self.dim % self.heads:
            raise OptionError(f"dim {self.dim} must be a multiple of heads {self.heads}")
        if self.pool not in ("cls", "mean"):
            raise OptionError(f"pool must be 'cls' or 'mean', got {self.pool!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def seq_len(self) -> int:
        """Tokens the attention sees: the patches plus the CLS token when pooling from it."""
        return self.num_patches + (self.pool == "cls")


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        self.pos = nn.Parameter(torch.randn(1, cfg.seq_len, cfg.dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(cfg.dim, cfg.heads, cfg.mlp_dim, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, C, H, W] (normalised) -> logits [B, num_classes]."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, dim]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return self.head(x[:, 0] if self.cls is not None else x.mean(dim=1))
