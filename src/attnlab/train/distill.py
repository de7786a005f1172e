"""Distillation: freeze a model, swap in a cheaper attention, and train only that attention so the model keeps
its behaviour: minimise KL(P_original || P_swapped) over next-token distributions, in fp32.

    attnlab distill --model smollm2 --method learned_mask --set learned_mask.density=0.25 \
        --train sotu,brown --seq-len 512 --steps 200 --out runs/lm25
    res = attnlab.distill(model, "hybrid", tokenizer=tok, train=["sotu", "brown"], steps=100, out="runs/h")

The teacher is the same model under `attnlab.original(model)` (its own attention, the same weights: no second
copy); the student is the model with the spec swapped in. Only the methods' parameters train: every other
parameter is frozen, and the run refuses to start if any other parameter would receive a gradient.

Optional attention-transfer stage first (`transfer_steps`, LoLCATs / Hedgehog): each swapped layer runs its
method on the original attention's inputs and is trained to match the original's output (MSE), while the
original output goes on to the next layer: layer-local, no backward through the model.

Recipe: AdamW, linear warmup then cosine decay to 10% of the learning rate, gradient accumulation, gradient
clipping, bf16 autocast on CUDA (the KL in fp32). Held-out evaluation every `eval_every` steps on the tail of
Moby Dick (never trained on): KL mean and p95, top-1 agreement, perplexity, attention-probability MSE where
every swapped method has implied probabilities, gradient cosine. Checkpoints every `checkpoint_every` steps
(train/checkpoint.py); `resume=True` continues from the newest one and reproduces the uninterrupted run's loss
curve. Under `torchrun --nproc_per_node N` the same code runs DistributedDataParallel (gloo on CPU, nccl on
GPU), each rank reading its own shard of every global batch.

Output folder: attention/ (the trained attention alone: attnlab.load(model, OUT/attention)), result.json,
log.jsonl (every step and evaluation), curve.png, config.json, checkpoints/.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import registry
from ..adapters.spec import ORIGINAL, SwapSpec
from ..adapters.state import CheckpointError, fingerprint
from ..adapters.swap import attention_sites, method_modules, original, swap, unswap
from ..types import AttnlabError
from . import checkpoint as ckpt
from .data import TrainWindows, eval_windows


# attention-probability MSE and gradient cosine are measured on the first tokens of one held-out window (the
# probabilities are T x T per layer and head): a mask that keeps every pair within them scores as exact there
ATTN_MSE_TOKENS = 256
GRAD_COS_TOKENS = 128


@dataclasses.dataclass
class DistillConfig:
    """One distillation run. Every field has a CLI flag of the same name (`--seq-len` for seq_len)."""

    steps: int = 200  # optimiser steps (after the transfer stage)
    seq_len: int = 512  # tokens per training window
    batch_size: int = 4  # windows per step and process (before accumulation)
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 1e-3  # learning rate of the KL stage
    transfer_lr: float = 1e-2  # learning rate of the attention-transfer stage (LoLCATs: 1e-2)
    warmup: int = 20  # linear warmup steps of each stage, then cosine decay to 10% of its rate
    weight_decay: float = 0.0
    clip: float = 1.0  # max gradient norm (0: no clipping)
    transfer_steps: int = 0  # attention-transfer steps before the KL stage
    eval_every: int = 50
    eval_windows: int = 4  # held-out windows of seq_len tokens per evaluation
    checkpoint_every: int = 50
    seed: int = 0
    train: tuple = ("sotu", "brown")  # corpora (data.CORPORA)
    eval_text: str | None = None  # a text file instead of Moby Dick's held-out tail
    baseline: bool = True  # learned_mask: also evaluate window + 4 sinks of the same density
    progress: bool = True

    def check(self) -> None:
        """One clear error per bad value, before anything heavy."""
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "eval_every", "eval_windows", "checkpoint_every"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < (2 if name == "seq_len" else 1):
                raise AttnlabError(f"--{name.replace('_', '-')} must be an integer >= {2 if name == 'seq_len' else 1}, got {val!r}")
        for name in ("warmup", "transfer_steps", "seed"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise AttnlabError(f"--{name.replace('_', '-')} must be an integer >= 0, got {val!r}")
        for name in ("lr", "transfer_lr"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 < val < 10:
                raise AttnlabError(f"--{name.replace('_', '-')} must be in (0, 10), got {val!r}")
        if not isinstance(self.clip, (int, float)) or self.clip < 0:
            raise AttnlabError(f"--clip must be >= 0, got {self.clip!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise AttnlabError(f"--weight-decay must be >= 0, got {self.weight_decay!r}")


# ---- distributed ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; then one process group: nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return Dist(rank, world, local)


def no_buffer_sync() -> dict:
    """DistributedDataParallel's keyword for "no buffer broadcast before every forward" (the methods' buffers, drawn
    features and masks, are equal on every rank from their seeds): `forward_sync_buffers=False` from torch 2.13 on,
    where `broadcast_buffers` warns once per process as deprecated (unlike it, that one still copies rank 0's buffers
    once at the start: the same values here); `broadcast_buffers=False` before."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    new = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if new else {"broadcast_buffers": False}


def _all_mean(value: float, d: Dist, device) -> float:
    if d.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item() / d.world)


# ---- losses and metrics ---------------------------------------------------------------------------------------------
def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Forward KL(P_teacher || P_student) in fp32, mean over positions (nats per token)."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1).mean()


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of every swapped method's parameters."""
    out = []
    for plan, module in method_modules(model):
        for name, p in module.named_parameters():
            out.append((f"layers.{plan.index}.{name}", p))
    return out


def freeze_all_but_methods(model) -> list[torch.nn.Parameter]:
    """Freeze the model, unfreeze the methods' parameters; refuse if anything else would get a gradient."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for _, p in trainable_parameters(model)]
    for p in params:
        p.requires_grad_(True)
    ids = {id(p) for p in params}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    if stray:  # pragma: no cover - the lines above make this impossible; kept as the stated guarantee
        raise AttnlabError(f"parameters outside the swapped attention would train: {stray[:5]}")
    return params


def _aux_losses(model) -> list[torch.Tensor]:
    return [m.aux_loss for _, m in method_modules(model) if getattr(m, "aux_loss", None) is not None]


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, *, ref_probs=None, grad_ids=None, base_grad=None, device, autocast) -> dict:
    """Held-out fidelity of the swapped model against the original on the same windows."""
    from ..metrics import fidelity as fm

    kls, agree, nll_t, nll_s = [], [], [], []
    for w in windows:
        ids = w[None].to(device)
        with autocast():
            with original(model):
                t = model(ids).logits.float()
            s = model(ids).logits.float()
        st = fm.next_token_stats(t.cpu(), s.cpu(), ids.cpu())
        kls.append(st["kl"])
        agree.append(st["agree"])
        nll_t.append(st["nll_base"])
        nll_s.append(st["nll_new"])
    kl = torch.cat(kls)
    out = {"kl_mean": kl.mean().item(), "kl_p95": kl.quantile(0.95).item(), "top1": torch.cat(agree).mean().item(),
           "ppl_base": torch.cat(nll_t).mean().exp().item(), "ppl": torch.cat(nll_s).mean().exp().item()}
    if ref_probs is not None:
        ids = windows[:1, : ref_probs[0].shape[-1]].to(device)
        with fm.capture_probs(model) as mods:
            model(ids)
            new = [m.attnlab_probs for m in mods]
        out["attn_mse"] = fm.probs_mse([r.to(device) for r in ref_probs], new, causal=True)
    if grad_ids is not None and base_grad is not None:
        with torch.enable_grad():
            g = _model_grads(model, grad_ids.to(device))
        out["grad_cos"] = fm.cosine(base_grad, g)  # chunked float64: F.cosine_similarity took ~6 s a call on CPU
    return out


def _model_grads(model, ids) -> torch.Tensor:
    """Flattened LM-loss gradient w.r.t. the model's own (frozen) parameters: requires_grad switched on briefly."""
    own = {id(p) for _, p in trainable_parameters(model)} if getattr(model, "_attnlab_swap_state", None) else set()
    params = [p for p in model.parameters() if id(p) not in own]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        loss = model(ids, labels=ids).loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float() for g, p in zip(grads, params)])


# ---- the run -------------------------------------------------------------------------------------------------------
def _lr_lambda(cfg: DistillConfig):
    """The learning rate as a factor of cfg.lr, per step: each stage (transfer, then KL) has its own warmup and
    cosine decay to 10% of its own rate."""
    def stage(step: int, length: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, length - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def f(step: int) -> float:
        if step < cfg.transfer_steps:
            return cfg.transfer_lr / cfg.lr * stage(step, cfg.transfer_steps)
        return stage(step - cfg.transfer_steps, cfg.steps)

    return f


def _distillable(name: str) -> bool:
    """A method distillation can train into a causal LM: parameters, causal attention, the sequence length kept."""
    caps = registry.capabilities(name)
    return caps.trainable and caps.causal and not caps.resizes


def check_spec_trainable(spec: SwapSpec, transfer_steps: int = 0) -> dict[str, int]:
    """{method: trainable parameters of one small instance}; a method with none and no adapters is an error (before
    any model loads). Bad options fail here too, except those of a method built from per-layer data (a `layer`
    option: global_sparse's pattern meets the model's head count only at swap time). Adapters get no gradient in
    the attention-transfer stage (it runs the methods on detached inputs), so the two are refused together."""
    spec.validate()
    if transfer_steps and any(r.lora for r in spec.rules):
        raise AttnlabError("--transfer-steps with --lora: the attention-transfer stage trains the methods on detached "
                           "inputs, the adapters get no gradient there; run the transfer first, then continue with "
                           "--init OUT/attention --lora RANK")
    counts = {}
    for r in spec.rules:
        if r.method == ORIGINAL:
            continue
        opts = {k: v for k, v in r.options.items() if k != "max_len"}
        try:
            inst = registry.make(r.method, head_dim=16, num_heads=2, **opts)
        except AttnlabError:
            if r.lora and "layer" in registry.options(r.method):
                continue  # built with the model's shapes at swap time; the adapters train regardless
            raise
        n = sum(p.numel() for p in inst.parameters())
        if n == 0 and not r.lora:
            hint = " (performer / rfa: --set {m}.learn_features=true)".format(m=r.method) if "learn_features" in registry.options(r.method) else ""
            raise AttnlabError(f"method {r.method!r} with options {r.options} has no trainable parameters: nothing to "
                               f"distil{hint}; trainable methods: "
                               f"{', '.join(n for n in registry.list_methods() if _distillable(n))}; "
                               "or train low-rank adapters on its projections (--lora RANK)")
        counts[r.method] = n
    return counts


def spec_at_length(spec, seq_len: int, last: Path | None = None) -> SwapSpec:
    """The spec a run swaps in: its omitted options the methods' at `seq_len` (`SwapSpec.at_length`, as the command
    line takes them). A run resumed from `last` whose checkpoints recorded the spec as given, unfilled (runs
    started before options were filled), keeps it as given: its trained shapes and its identity are those."""
    spec = SwapSpec.of(spec)
    filled = spec.at_length(seq_len)
    if last is not None and filled != spec:
        meta, _ = ckpt.read(last)
        if meta.get("identity", {}).get("spec") == spec.to_dict():
            return spec
    return filled


def check_out(out: Path, resume: bool) -> Path | None:
    """The output folder: a finished or started run is never overwritten; --resume needs a checkpoint."""
    out = Path(out)
    if resume:
        last = ckpt.latest(out)
        if last is None:
            raise CheckpointError(f"--resume: {out} holds no checkpoint to resume from")
        return last
    if out.exists() and any(out.iterdir()):
        raise AttnlabError(f"--out {out} already holds a run (its files would be overwritten); use --resume to "
                           "continue it, or another --out")
    return None


def distill(model, spec, *, tokenizer, out, config: DistillConfig | None = None, resume: bool = False,
            device=None, autocast_dtype=None, **overrides) -> dict:
    """Distil `spec` (a method name, a per-layer spec, a SwapSpec) into `model` (unswapped, or already running
    that spec, e.g. from `attnlab.load`) and return the result row. Fields of DistillConfig may be given as
    keyword arguments. The model ends up swapped, with the trained attention."""
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(DistillConfig)})
    if unknown:
        raise AttnlabError(f"attnlab.distill: no setting {', '.join(unknown)}; DistillConfig has "
                           f"{', '.join(f.name for f in dataclasses.fields(DistillConfig))}")
    cfg = dataclasses.replace(config or DistillConfig(), **overrides)
    cfg.check()
    spec = SwapSpec.of(spec)
    last = check_out(Path(out), resume)
    current = getattr(model, "_attnlab_swap_state", None)
    if current is None:  # a fresh swap
        spec = spec_at_length(spec, cfg.seq_len, last)
    elif current.spec.to_dict() in (spec.to_dict(), spec.at_length(cfg.seq_len).to_dict()):
        spec = current.spec  # the model already runs it (attnlab.load), its options filled as a fresh run fills them
    else:
        raise AttnlabError(f"the model already runs {current.spec.describe()!r}, not {spec.describe()!r} at "
                           f"seq_len {cfg.seq_len}; pass attnlab.swapped_spec(model) to train it on, or unswap it first")
    counts = check_spec_trainable(spec, cfg.transfer_steps)
    device = torch.device(device or next(model.parameters()).device)
    d = init_distributed(str(device))
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has looked at --out before rank 0 writes into it
    flags = [(p, p.requires_grad) for p in model.parameters()]  # the model's own, frozen while the methods train
    try:
        return _Run(model, spec, tokenizer, Path(out), cfg, device, d, last, counts, autocast_dtype).run()
    finally:
        for p, trains in flags:  # as they were, so attnlab.unswap gives back the model as it came
            p.requires_grad_(trains)


class _Run:
    def __init__(self, model, spec, tok, out, cfg, device, d, last, counts, autocast_dtype):
        self.model, self.spec, self.tok, self.out, self.cfg, self.device, self.d = model, spec, tok, out, cfg, device, d
        self.last, self.counts = last, counts
        self.autocast_dtype = autocast_dtype
        self.log: list[dict] = []
        self._logged = 0  # lines of self.log already in OUT/log.jsonl

    def autocast(self):
        import contextlib

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def identity(self) -> dict:
        c = self.cfg
        return {"model": fingerprint(self.model), "spec": self.spec.to_dict(), "train": list(c.train),
                "seq_len": c.seq_len, "batch_size": c.batch_size, "grad_accum": c.grad_accum, "world": self.d.world,
                "steps": c.steps, "transfer_steps": c.transfer_steps, "seed": c.seed}

    def run(self) -> dict:
        c, d, model = self.cfg, self.d, self.model
        torch.manual_seed(c.seed)
        per_step = c.batch_size * c.grad_accum * d.world  # windows per optimiser step, all ranks
        total_steps = c.transfer_steps + c.steps
        train = TrainWindows(self.tok, list(c.train), c.seq_len, needed=total_steps * per_step, seed=c.seed)
        if len(train) < d.world:
            raise AttnlabError(f"{d.world} processes but the training text makes only {len(train)} windows of "
                               f"{c.seq_len} tokens: fewer data shards than processes")
        held_out = eval_windows(self.tok, c.eval_text, c.seq_len, c.eval_windows)
        # the reference (dense) attention probabilities of the unswapped model, for attention MSE
        current = getattr(model, "_attnlab_swap_state", None)  # distill() matched a running spec to self.spec
        ref_probs = base_grad = None
        grad_ids = held_out[:1, : min(GRAD_COS_TOKENS, c.seq_len)]
        if current is None:
            ref_probs = self._reference_probs(held_out[:1, : min(ATTN_MSE_TOKENS, c.seq_len)])
            base_grad = _model_grads(model, grad_ids.to(self.device))
            swap(model, self.spec)
        else:
            with original(model):
                base_grad = _model_grads(model, grad_ids.to(self.device))
        if ref_probs is None or not self._all_probs():
            ref_probs = None
        params = freeze_all_but_methods(model)
        n_params = sum(p.numel() for p in params)
        self._train_mode()
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(c))
        start = 0
        if self.last is not None:
            meta, tensors = ckpt.read(self.last)
            if meta["identity"] != self.identity():
                diff = sorted(k for k in meta["identity"] if meta["identity"].get(k) != self.identity().get(k))
                raise CheckpointError(f"{self.last} belongs to another run (differs in {diff}); it cannot be resumed "
                                      "with these arguments")
            ckpt.restore(self.last, meta, tensors, model, opt, sched)
            start = meta["step"]
            self.log = self._read_log()[: meta["log"]["lines"]]
        ddp = self._ddp(model)
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps({**dataclasses.asdict(c), "spec": self.spec.to_dict(),
                                                               "trainable_params": n_params,
                                                               "world": d.world}, indent=1, default=str))
            self._rewrite_log()
            adapters = sum(p.numel() for n, p in trainable_parameters(model) if ".lora." in n)
            lora = [f"low-rank adapters: {adapters:,}"] if adapters else []
            print(f"attnlab distill: {self.spec.describe()}; trainable parameters: {n_params:,} "
                  f"({', '.join([f'{k}: {v:,} per small layer' for k, v in self.counts.items()] + lora)}); nothing else "
                  f"trains; "
                  f"{len(train)} training windows of {c.seq_len} tokens; {d.world} process(es)", flush=True)
        evals = [r for r in self.log if "eval" in r]
        before = evals[0]["eval"] if evals else None
        if start == 0:
            self._calibrate(train)
        if before is None:
            before = self._eval(held_out, ref_probs, grad_ids, base_grad, step=0)
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start, desc="distill", disable=not (c.progress and d.main),
                   dynamic_ncols=True)
        step_times = []  # seconds of each optimiser step of this process run
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for step in range(start, total_steps):
            phase = "transfer" if step < c.transfer_steps else "kl"
            t0 = time.perf_counter()
            loss = self._step(ddp, train, step, per_step, phase, params, opt)
            sched.step()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            loss = _all_mean(loss, d, self.device)
            if not math.isfinite(loss):  # stop before a checkpoint could store what this step did to the weights
                raise AttnlabError(f"step {step + 1}: the {phase} loss is {loss} (diverged); the last checkpoint is "
                                   f"kept ({ckpt.latest(self.out) or 'none yet'}); lower --lr and --resume or restart")
            self.log.append({"step": step + 1, "phase": phase, "loss": loss, "lr": sched.get_last_lr()[0],
                             "tokens": (step + 1) * per_step * c.seq_len})
            bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{per_step * c.seq_len / dt:.0f}")
            bar.update()
            if (step + 1) % c.eval_every == 0 and step + 1 < total_steps:
                self._eval(held_out, ref_probs, grad_ids, base_grad, step=step + 1)
            if (step + 1) % c.checkpoint_every == 0 and step + 1 < total_steps:
                self._checkpoint(opt, sched, step + 1, per_step)
            if d.main:
                self._append_log()
        bar.close()
        after = self._eval(held_out, ref_probs, grad_ids, base_grad, step=total_steps)
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        result = self._result(before, after, n_params, step_times, peak, per_step)
        if c.baseline and d.main:
            result["baselines"] = self._baselines(held_out, ref_probs, grad_ids, base_grad)
        if d.world > 1:
            result["rank_param_digests"] = self._param_digests(params)
        if d.main:
            from ..adapters.state import save

            save(model, self.out / "attention", extra={"distill": {**{k: result[k] for k in ("kl_before", "kl_after")},
                                                                   "seq_len": c.seq_len, "steps": c.steps}})
            (self.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
            self._append_log()
            self._plot()
            print(f"attnlab distill: KL {result['kl_before']:.4g} -> {result['kl_after']:.4g} nats/token, ppl "
                  f"{result['ppl_before']:.4g} -> {result['ppl_after']:.4g} (original {result['ppl_base']:.4g}), top-1 "
                  f"{result['top1_after']:.3f}; wrote {self.out / 'attention'} and {self.out / 'result.json'}", flush=True)
            asked = result["options"].get("density")
            if result["density"] is not None and asked is not None and abs(result["density"] - asked) > 1e-6:
                print(f"attnlab distill: the masks keep {result['density']:.3g} of the causal pairs at {c.seq_len} "
                      f"tokens (asked {asked:.3g}: whole blocks, plus the local band every row keeps)", flush=True)
            for b in result.get("baselines", []):
                print(f"attnlab distill: beside it, {b['method']} {b['options']} at density {b['density']:.3g}: KL "
                      f"{b['kl']:.4g}, ppl {b['ppl']:.4g}, top-1 {b['top1']:.3f}", flush=True)
        return result

    # ---- pieces --------------------------------------------------------------------------------------------------
    def _reference_probs(self, ids):
        from ..metrics import fidelity as fm

        if not all(registry.capabilities(m).probs for m in self.spec.methods()):
            return None
        _, probs = fm.swapped_probs(self.model, ids.to(self.device), "dense")
        return [p.cpu() for p in probs]

    def _all_probs(self) -> bool:
        return all(registry.capabilities(m).probs for m in self.spec.methods())

    def _ddp(self, model):
        if self.d.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.d.local_rank] if self.device.type == "cuda" else None
        return DDP(model, device_ids=ids, **no_buffer_sync())

    def _step(self, ddp, train, step, per_step, phase, params, opt) -> float:
        c, d, model = self.cfg, self.d, self.model
        total = 0.0
        for micro in range(c.grad_accum):
            first = step * per_step + micro * c.batch_size * d.world + d.rank * c.batch_size
            ids = train.batch(first, c.batch_size).to(self.device)
            sync = micro == c.grad_accum - 1 or d.world == 1
            ctx = ddp.no_sync() if not sync else _null()
            with ctx:
                if phase == "transfer":
                    loss = self._transfer_loss(ddp, ids)
                else:
                    with torch.no_grad(), self.autocast(), original(model):
                        teacher = model(ids).logits
                    with self.autocast():
                        student = ddp(ids).logits
                    loss = kl_loss(teacher, student)
                    for aux in _aux_losses(model):
                        loss = loss + aux
                (loss / c.grad_accum).backward()
            total += loss.item() / c.grad_accum
        if c.clip:
            torch.nn.utils.clip_grad_norm_(params, c.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    def _calibrate(self, train) -> None:
        """Methods that start from the original attention's statistics (learned_mask init="data") measure them
        on the first training batch, before the "before" evaluation (it then evaluates the calibrated start)."""
        need = [(p, m) for p, m in method_modules(self.model) if getattr(m, "needs_calibration", lambda: False)()]
        if not need:
            return
        mods = dict(attention_sites(self.model))
        for p, _ in need:
            mods[p.name].attnlab_calibrate = True
        try:
            ids = train.batch(self.d.rank * self.cfg.batch_size, self.cfg.batch_size).to(self.device)
            with torch.no_grad(), self.autocast():
                self.model(ids)
        finally:
            for p, _ in need:
                mods[p.name].attnlab_calibrate = False
        if self.d.world > 1:  # every rank keeps rank 0's start
            import torch.distributed as dist

            for _, m in need:
                dist.broadcast(m.scores.data, 0)

    def _transfer_loss(self, ddp, ids):
        mods = [m for _, m in attention_sites(self.model) if hasattr(m, "attnlab_method")]
        for m in mods:
            m.attnlab_transfer = []
        try:
            with self.autocast():
                ddp(ids)
            losses = [x for m in mods for x in m.attnlab_transfer]
        finally:
            for m in mods:
                m.attnlab_transfer = None
        return torch.stack(losses).mean()

    def _train_mode(self) -> None:
        """The model stays in eval mode (no dropout: the teacher and the frozen parts are deterministic); only the
        swapped methods train (a learned mask takes its straight-through path only in training mode)."""
        self.model.eval()
        for _, m in method_modules(self.model):
            m.train()

    def _eval(self, held_out, ref_probs, grad_ids, base_grad, step) -> dict:
        self.model.eval()
        res = evaluate(self.model, held_out, ref_probs=ref_probs, grad_ids=grad_ids, base_grad=base_grad,
                       device=self.device, autocast=self.autocast)
        self._train_mode()
        self.log.append({"step": step, "eval": res})
        if self.d.main:
            print(f"\n[eval step {step}] KL {res['kl_mean']:.4g} (p95 {res['kl_p95']:.4g}) top-1 {res['top1']:.3f} "
                  f"ppl {res['ppl']:.4g} (original {res['ppl_base']:.4g})", flush=True)
        return res

    def _checkpoint(self, opt, sched, step, per_step) -> None:
        if self.d.main:
            self._append_log()
            ckpt.save(self.out, self.model, opt, sched, step=step, windows=step * per_step, identity=self.identity(),
                      log_state={"lines": len(self.log)})
        if self.d.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _read_log(self) -> list[dict]:
        path = self.out / "log.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def _rewrite_log(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.log))
        self._logged = len(self.log)

    def _append_log(self) -> None:
        new = self.log[self._logged:]
        if new:
            with (self.out / "log.jsonl").open("a") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in new))
            self._logged = len(self.log)

    def _result(self, before, after, n_params, step_times, peak, per_step) -> dict:
        c = self.cfg
        step_tokens, train_time = per_step * c.seq_len, sum(step_times)
        methods = self.spec.methods()
        rule = next((r for r in reversed(self.spec.rules) if r.method != ORIGINAL), None)
        density = None
        lm = [m for p, m in method_modules(self.model) if p.method == "learned_mask" and m.opts.form == "static"]
        if lm:
            density = sum(m.density_at(c.seq_len) for m in lm) / len(lm)
        elif rule is not None and "density" in rule.options:
            density = rule.options["density"]
        from ..cli.common import environment

        return {
            "method": methods[0] if len(methods) == 1 else "+".join(methods), "options": rule.options if rule else {},
            "lora": rule.lora if rule else 0,
            "spec": self.spec.to_dict(), "density": density, "steps": c.steps, "transfer_steps": c.transfer_steps,
            "tokens": (c.steps + c.transfer_steps) * per_step * c.seq_len, "trainable_params": n_params,
            "kl_before": before["kl_mean"], "kl_after": after["kl_mean"], "kl_p95_after": after["kl_p95"],
            "ppl_base": after["ppl_base"], "ppl_before": before["ppl"], "ppl_after": after["ppl"],
            "top1_before": before["top1"], "top1_after": after["top1"], "attn_mse": after.get("attn_mse"),
            "attn_mse_before": before.get("attn_mse"), "grad_cos": after.get("grad_cos"),
            "grad_cos_before": before.get("grad_cos"),
            "attn_mse_tokens": min(ATTN_MSE_TOKENS, c.seq_len), "grad_cos_tokens": min(GRAD_COS_TOKENS, c.seq_len),
            "tokens_per_s": len(step_times) * step_tokens / train_time if train_time else None,
            # the median step: steady throughput, without the first steps' compilation (tokens_per_s includes it)
            "tokens_per_s_median_step": step_tokens / statistics.median(step_times) if step_times else None,
            "peak_mem_bytes": peak,
            "seq_len": c.seq_len, "batch_size": c.batch_size, "grad_accum": c.grad_accum, "world": self.d.world,
            "lr": c.lr, "transfer_lr": c.transfer_lr, "split": "held-out", "eval_tokens": c.eval_windows * c.seq_len, "train": list(c.train),
            "device": self.device.type, "environment": environment(self.device),
        }

    def _baselines(self, held_out, ref_probs, grad_ids, base_grad) -> list[dict]:
        """learned_mask: window + 4 sinks at the density the learned masks reached, on the same held-out text."""
        from ..adapters.state import Saved, load, save
        from ..patterns import WindowPattern

        lm = [m for p, m in method_modules(self.model) if p.method == "learned_mask" and m.opts.form == "static"]
        if not lm:
            return []
        t = self.cfg.seq_len
        target = sum(m.density_at(t) for m in lm) / len(lm)
        window = WindowPattern.for_density(target, t, sinks=4).window
        tmp = self.out / ".trained"
        save(self.model, tmp)
        unswap(self.model)
        try:
            swap(self.model, SwapSpec.of("window", window=window, sinks=4))
            res = evaluate(self.model, held_out, ref_probs=ref_probs, grad_ids=grad_ids, base_grad=base_grad,
                           device=self.device, autocast=self.autocast)
            unswap(self.model)
        finally:
            load(self.model, Saved(tmp).path)
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        dens = WindowPattern(window, 4).density(t, t, causal=True)
        return [{"method": "window", "options": {"window": window, "sinks": 4}, "density": dens, "kl": res["kl_mean"],
                 "kl_p95": res["kl_p95"], "ppl": res["ppl"], "top1": res["top1"], "attn_mse": res.get("attn_mse"),
                 "grad_cos": res.get("grad_cos")}]

    def _param_digests(self, params) -> list[str]:
        import hashlib

        import torch.distributed as dist

        h = hashlib.sha256()
        for p in params:
            h.update(p.detach().cpu().double().numpy().tobytes())
        out = [None] * self.d.world
        dist.all_gather_object(out, h.hexdigest())
        return out

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r for r in self.log if "loss" in r]
        evals = [r for r in self.log if "eval" in r]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        for phase, color in (("transfer", "tab:orange"), ("kl", "tab:blue")):
            pts = [(r["step"], r["loss"]) for r in steps if r["phase"] == phase]
            if pts:
                a.plot(*zip(*pts), color=color, lw=1, label="attention transfer (MSE)" if phase == "transfer" else "KL (train)")
        a.set_yscale("log"), a.set_xlabel("step"), a.set_ylabel("training loss"), a.grid(alpha=0.3), a.legend(fontsize=8)
        if evals:
            xs = [r["step"] for r in evals]
            b.plot(xs, [r["eval"]["kl_mean"] for r in evals], "o-", label="KL mean")
            b.plot(xs, [r["eval"]["kl_p95"] for r in evals], "s--", label="KL p95", alpha=0.6)
            b.set_yscale("log")
            b.axhline(1e-3, color="gray", ls=":", lw=1)
            b.text(xs[0], 1.1e-3, "target 1e-3", color="gray", fontsize=8)
        b.set_xlabel("step"), b.set_ylabel("held-out KL(original || swapped), nats/token"), b.grid(alpha=0.3)
        b.legend(fontsize=8)
        fig.suptitle(f"attnlab distill: {self.spec.describe()}"[:120] + f"; {self.cfg.seq_len}-token windows", fontsize=9)
        fig.tight_layout()
        fig.savefig(self.out / "curve.png", dpi=110)
        plt.close(fig)


def _null():
    import contextlib

    return contextlib.nullcontext()
