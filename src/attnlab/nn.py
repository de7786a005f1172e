"""`attnlab.nn`: the torch.nn.MultiheadAttention drop-in, and the pre-norm Transformer block the ViT and the
sequence autoencoder are built from."""
from torch import nn

from .adapters.mha import MultiheadAttention, replace_mha, restore_mha

__all__ = ["MultiheadAttention", "TransformerBlock", "replace_mha", "restore_mha"]


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)). method=None: torch.nn.MultiheadAttention (which
    `attnlab.swap` can replace later); a method name: `attnlab.nn.MultiheadAttention` running that method."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0, method: str | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = (nn.MultiheadAttention(dim, heads, dropout=0.0, batch_first=True) if method is None
                     else MultiheadAttention(dim, heads, batch_first=True, method=method))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))
