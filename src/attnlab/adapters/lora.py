"""Low-rank adapters on a swapped layer's projections (LoRA, Hu et al. 2021), LoLCATs' second stage: the model
stays frozen, each swapped attention layer's own linear projections gain a trainable low-rank update that is
active only while the layer runs its new attention.

    attnlab.swap(model, attnlab.SwapSpec([attnlab.Rule("*", "global_sparse", {...}, lora=8)]))
    attnlab distill --method global_sparse --set global_sparse.pattern=runs/sparse/pattern --lora 8 ...

For every `torch.nn.Linear` directly inside the attention module (q_proj, k_proj, v_proj, o_proj in Llama-like
models; query, key, value in BERT) a forward hook adds `scale * (x A^T) B^T` to the projection's output, with A
[rank, in] (Kaiming-uniform, as `peft` initialises it) and B [out, rank] zeros: untrained, the layer computes
exactly what it did without the adapter. scale = alpha / rank with alpha = 2 * rank (LoLCATs: rank 8, alpha 16).

The adapters are parameters of the layer's method module (`module.attnlab_method.lora`, state-dict keys
`layers.<i>.lora.A.<proj>` / `.B.<proj>`), so they train, save and load with the method. Under
`attnlab.original(model)` the hooks add nothing: the teacher of distillation is the untouched model.
`attnlab.unswap` removes the hooks. A's initial values come from the spec's per-layer seed (`spec.layer_seed`), so
the same spec gives the same adapters. The hooks are small objects holding the adapters and the swap state (not
closures), so `copy.deepcopy` of a swapped model gets its own and `torch.save` can pickle it.

The attention-transfer stage of `attnlab distill` runs the method on detached inputs and trains nothing here:
distil adapters in a KL stage (LoLCATs: transfer first, then `--init OUT/attention --lora RANK`).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..types import AttnlabError, UnsupportedError

ATTR = "lora"  # the adapter's name on the method module (state-dict keys "layers.<i>.lora.A.<proj>")
HOOKS = "attnlab_lora_hooks"  # the hook handles on the attention module


class ProjectionLoRA(nn.Module):
    """One low-rank update per projection: delta(name, x) = scale * (x A^T) B^T."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float | None = None, seed: int = 0):
        super().__init__()
        self.rank = int(rank)
        self.scale = (2.0 * rank if alpha is None else float(alpha)) / rank
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        gen = torch.Generator().manual_seed(int(seed))
        for name, (fan_in, fan_out) in shapes.items():
            a = torch.empty(rank, fan_in)
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), peft's init, from our own generator
            a.uniform_(-bound, bound, generator=gen)
            self.A[name] = nn.Parameter(a)
            self.B[name] = nn.Parameter(torch.zeros(fan_out, rank))

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        a, b = self.A[name], self.B[name]
        return (x @ a.to(x.dtype).t()) @ (b.to(x.dtype).t() * self.scale)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}, projections={list(self.A.keys())}"


def projections(attn_module: nn.Module) -> dict[str, nn.Linear]:
    """The linear projections the adapters go on: every nn.Linear directly inside the attention module."""
    return {name: m for name, m in attn_module.named_children() if isinstance(m, nn.Linear)}


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise AttnlabError(f"lora must be a rank >= 0 (0: no adapters), got {rank!r}")
    return rank


def check_site(attn_module: nn.Module, rank: int) -> None:
    """One clear error, before anything changes, for a layer the adapters cannot go on."""
    projs = projections(attn_module)
    if not projs:
        raise UnsupportedError(f"lora: {type(attn_module).__name__} has no nn.Linear projections of its own to adapt")
    small = min(min(p.in_features, p.out_features) for p in projs.values())
    if rank > small:
        raise UnsupportedError(f"lora rank {rank} exceeds the smallest projection's width {small}")


class _Hook:
    """out + the adapter's delta while the swapped attention runs (`state.in_original` False)."""

    def __init__(self, lora: ProjectionLoRA, name: str, state):
        self.lora, self.name, self.state = lora, name, state

    def __call__(self, _mod, args, out):
        if self.state.in_original:
            return out
        return out + self.lora.delta(self.name, args[0])


def attach(attn_module: nn.Module, method: nn.Module, rank: int, state, seed: int = 0) -> None:
    """Give `method` adapters for `attn_module`'s projections and hook them in; `state` is the model's SwapState
    (its `in_original` says whether the swapped attention is running)."""
    check_site(attn_module, rank)
    projs = projections(attn_module)
    ref = next(iter(projs.values())).weight
    lora = ProjectionLoRA({n: (p.in_features, p.out_features) for n, p in projs.items()}, rank,
                          seed=seed).to(device=ref.device)
    method.add_module(ATTR, lora)
    setattr(attn_module, HOOKS, [proj.register_forward_hook(_Hook(lora, name, state)) for name, proj in projs.items()])


def detach(attn_module: nn.Module) -> None:
    for h in getattr(attn_module, HOOKS, ()):
        h.remove()
    if hasattr(attn_module, HOOKS):
        delattr(attn_module, HOOKS)
