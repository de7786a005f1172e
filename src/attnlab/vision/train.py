"""Train the same ViT once per attention method on Fashion-MNIST and measure accuracy and cost side by side.

Every method sees identical starting weights (the ViT is built with torch's attention under one seed, then the
method is swapped in sharing those weights), the same data order and augmentation draws, and the same
hyper-parameters; only the attention differs. One result row per (method, patch size):

    rows = run_vision(["sdpa", "performer"], VisionConfig(patches=(4,), epochs=10), device="cuda")
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from .. import registry
from ..adapters.spec import Rule, SwapSpec
from ..adapters.swap import method_modules, swap
from ..timing import sync
from ..types import OptionError, UnsupportedError
from . import data as vdata
from .vit import ViT, ViTConfig


@dataclasses.dataclass
class VisionConfig:
    patches: tuple[int, ...] = (4,)
    epochs: int = 20
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    augment: bool = True  # random 2-pixel shifts and horizontal flips, the same draws for every method
    dim: int = 128
    depth: int = 6
    heads: int = 4
    mlp_dim: int = 256
    pool: str = "cls"
    train_size: int | None = None  # the first N training images (None: all 60k)
    test_size: int | None = None  # the first N test images (None: all 10k)
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        """Every setting, in one line each, before any data is read."""
        for name in ("epochs", "batch_size"):
            if isinstance(getattr(self, name), bool) or getattr(self, name) < 1:
                raise OptionError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, split, what in (("train_size", "train", "training"), ("test_size", "test", "test")):
            val = getattr(self, name)
            if val is not None and val < 1:
                raise OptionError(f"{name} must be >= 1, got {val}")
            if val is not None and val > vdata.SIZES[split]:
                raise OptionError(f"{name} {val} exceeds the {vdata.SIZES[split]} Fashion-MNIST {what} images "
                                  f"(--{name.replace('_', '-')} at most {vdata.SIZES[split]})")
        n_train = self.train_size if self.train_size is not None else vdata.SIZES["train"]
        if self.batch_size > n_train:
            raise OptionError(f"batch_size {self.batch_size} exceeds the {n_train} training images")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_epochs < 0 or not 0 <= self.label_smoothing < 1:
            raise OptionError("lr must be > 0, weight_decay and warmup_epochs >= 0, label_smoothing in [0, 1)")
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise OptionError(f"warmup_epochs {self.warmup_epochs} must be less than epochs {self.epochs} (the "
                              "learning rate would never reach lr and decay from it); lower --warmup-epochs "
                              "(0: no warmup)")
        if not self.patches:
            raise OptionError("at least one patch size is needed")
        for p in self.patches:
            self.vit(p).check()

    def vit(self, patch: int) -> ViTConfig:
        return ViTConfig(patch=patch, dim=self.dim, depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim,
                         pool=self.pool)


def _to_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 28, 28] -> normalised float [B, 1, 28, 28]."""
    return ((images_u8.float() / 255.0 - vdata.MEAN) / vdata.STD).unsqueeze(1)


def _draws(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of augmentation draws, made on the CPU from `gen` so that they are identical on every device
    and for every method: shifts in 0..4 (of a 2-pixel zero padding) and horizontal flips."""
    return torch.randint(0, 5, (n, 2), generator=gen), torch.rand(n, generator=gen) < 0.5


def _augment(x: torch.Tensor, off: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Shift each image by `off` - 2 pixels (zero padding) and flip those where `flip` (both on x's device)."""
    b, _, h, w = x.shape
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=float((0 - vdata.MEAN) / vdata.STD))  # pad with "black"
    rows = (off[:, 0, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
    cols = (off[:, 1, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
    return padded[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols].unsqueeze(1)


def _schedule(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model, images, labels, *, batch_size: int, device, dtype) -> tuple[float, float, float]:
    """(accuracy, images per second, seconds) over the given images, in eval mode; one untimed batch first."""
    model.eval()
    device = torch.device(device)
    with _autocast(device, dtype):
        model(_to_input(images[:batch_size]))
        sync(device)
        t0 = time.perf_counter()
        correct = torch.zeros((), dtype=torch.long, device=images.device)
        for i in range(0, len(images), batch_size):
            logits = model(_to_input(images[i:i + batch_size]))
            correct += (logits.argmax(-1) == labels[i:i + batch_size]).sum()
        correct = int(correct)  # the one synchronisation
    secs = time.perf_counter() - t0
    model.train()
    return correct / len(images), len(images) / secs, secs


# Options a method takes when it is trained from scratch rather than swapped into trained weights (on top of its
# defaults at the length): RFA as its paper trains it (unit queries and keys, a learned sigma); its plain form,
# an estimate of the model's own softmax, trained this ViT to chance (10.7% after 30 epochs, H200).
FROM_SCRATCH = {"rfa": {"normalize": True}}


def method_options(method: str, seq_len: int, overrides: dict | None = None) -> dict:
    """The options a method trains with here: its defaults at `seq_len`, FROM_SCRATCH, then `--set` overrides."""
    return registry.options_at(method, seq_len, {**FROM_SCRATCH.get(method, {}), **(overrides or {})})


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight matrices (projections, MLP, patch embedding, head) decay; biases, norms, the position
    embedding `pos` [1, T, d], the CLS token `cls` [1, 1, d] (the usual ViT practice) and a method's temperatures
    (rfa's sigma [H, D], which decay would pull toward a flat kernel) do not."""
    embeddings = {id(p) for p in (getattr(model, "pos", None), getattr(model, "cls", None))
                  if isinstance(p, torch.nn.Parameter)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            matrix = p.dim() >= 2 and id(p) not in embeddings and not name.endswith("sigma")
            (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_one(method: str, options: dict, patch: int, cfg: VisionConfig, train_set, test_set, *,
              device="cpu", dtype=torch.float32) -> dict:
    """Train the ViT with `method` at `patch` and return its result row (see the module docstring)."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    vcfg = cfg.vit(patch)
    torch.manual_seed(cfg.seed)
    model = ViT(vcfg)  # identical starting weights for every method
    opts = method_options(method, vcfg.seq_len, options)
    swap(model, method, **opts)
    model.to(device)
    layer_opts = method_modules(model)[0][1].options_dict()
    x_train, y_train = (t.to(device) for t in train_set)
    x_test, y_test = (t.to(device) for t in test_set)
    n = len(x_train)
    steps_per_epoch = max(1, n // cfg.batch_size)  # the last partial batch is dropped (equal step sizes)
    total = steps_per_epoch * cfg.epochs
    optim = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=device.type == "cuda")
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _schedule(s, total, warmup))
    order_gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history, epoch_secs, error = [], [], None
    bar = tqdm(total=total, desc=f"{method} patch {patch} (T={vcfg.seq_len})", disable=not cfg.progress,
               unit="step", leave=True, dynamic_ncols=True)
    model.train()
    for epoch in range(cfg.epochs):
        # the epoch's order and augmentation draws go to the device once (a per-step host-to-device copy would
        # stall the CPU on the GPU every step)
        perm = torch.randperm(n, generator=order_gen).to(device)
        offs, flips = (t.to(device) for t in _draws(steps_per_epoch * cfg.batch_size, aug_gen))
        sync(device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for s in range(steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            x = _to_input(x_train[idx])
            if cfg.augment:
                sl = slice(s * cfg.batch_size, (s + 1) * cfg.batch_size)
                x = _augment(x, offs[sl], flips[sl])
            with _autocast(device, dtype):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_train[idx], label_smoothing=cfg.label_smoothing)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            loss_sum += loss.detach()
            bar.update(1)
            if s % 20 == 0 or s == steps_per_epoch - 1:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        sync(device)
        epoch_secs.append(time.perf_counter() - t0)
        train_loss = float(loss_sum) / steps_per_epoch
        if not math.isfinite(train_loss):
            error = f"training loss became {train_loss} in epoch {epoch + 1}"
            break
        peak_train = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        acc, ips, _ = evaluate(model, x_test, y_test, batch_size=cfg.batch_size, device=device, dtype=dtype)
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "test_accuracy": acc, "epoch_s": epoch_secs[-1]})
        bar.set_postfix(epoch=epoch + 1, loss=f"{train_loss:.3f}", test_acc=f"{acc:.4f}")
    bar.close()
    infer_peak = None
    if device.type == "cuda" and error is None:
        torch.cuda.reset_peak_memory_stats(device)
        acc, ips, _ = evaluate(model, x_test, y_test, batch_size=cfg.batch_size, device=device, dtype=dtype)
        infer_peak = torch.cuda.max_memory_allocated(device)
    last = history[-1] if history else {}
    kernels = sorted({str(m.kernel) for _, m in method_modules(model) if m is not None})
    row = {
        "method": method, "options": layer_opts, "patch": patch, "seq_len": vcfg.seq_len, "epochs": len(history),
        "test_accuracy": last.get("test_accuracy"), "final_train_loss": last.get("train_loss"),
        # the first epoch pays one-time costs (compilation, autotuning): the mean is over the others when there are
        "epoch_s": (sum(epoch_secs[1:]) / len(epoch_secs[1:])) if len(epoch_secs) > 1 else (epoch_secs[0] if epoch_secs else None),
        "first_epoch_s": epoch_secs[0] if epoch_secs else None,
        "images_per_s": ips if history else None,
        "peak_mem_bytes": peak_train if history else None, "infer_peak_mem_bytes": infer_peak,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "kernel": kernels,
        "params": sum(p.numel() for p in model.parameters()),
        "method_params": sum(p.numel() for _, m in method_modules(model) if m is not None
                             for p in m.parameters()),
        "train_images": n, "test_images": len(x_test), "batch_size": cfg.batch_size, "seed": cfg.seed,
        "history": history,
    }
    if error:
        row["error"] = error
    return row


def check_methods(methods: list[str], cfg: VisionConfig, overrides: dict) -> None:
    """Unknown methods, methods that cannot replace the ViT's attention (reduce: it changes the sequence length),
    option names and values (the method's defaults at each patch's length with the overrides on top, as
    `train_one` builds them) fail here, before any data is read: the swap spec's own check, as `swap` makes it."""
    for m in methods:
        for patch in cfg.patches:
            seq_len = cfg.vit(patch).seq_len
            opts = method_options(m, seq_len, overrides.get(m, {}))
            SwapSpec([Rule("*", m, opts)]).validate()
            built = registry.make(m, head_dim=cfg.dim // cfg.heads, num_heads=cfg.heads, **opts)
            if built.max_len is not None and seq_len > built.max_len:  # a run that could only end in a "not run" row
                raise UnsupportedError(f"{m} with max_len={built.max_len} cannot take patch {patch}'s {seq_len} tokens")


def new_run_id() -> str:
    """What every row of one `run_vision` call records as `run`: the time it started and a random suffix."""
    import secrets

    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def run_vision(methods: list[str], cfg: VisionConfig, *, overrides: dict | None = None, device="cpu",
               dtype=None, on_row=None, run_id: str | None = None) -> list[dict]:
    """Train once per (patch, method); returns the rows, each carrying `run` (`run_id`, else a new one): the
    reports compare rows of one run only. A method that cannot run gives a row with `error`."""
    cfg.check()
    overrides = overrides or {}
    check_methods(methods, cfg, overrides)
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    run_id = run_id or new_run_id()
    train_set = vdata.fashion_mnist("train", cfg.train_size)
    test_set = vdata.fashion_mnist("test", cfg.test_size)
    if len(train_set[0]) < cfg.batch_size:  # a dataset folder smaller than the real one (cfg.check knows 60k)
        raise OptionError(f"batch_size {cfg.batch_size} exceeds the {len(train_set[0])} training images")
    rows = []
    for patch in cfg.patches:
        for m in methods:
            failed = {"method": m, "patch": patch, "seq_len": cfg.vit(patch).seq_len, "device": str(device),
                      "dtype": str(dtype).removeprefix("torch."), "train_images": len(train_set[0]),
                      "test_images": len(test_set[0]), "batch_size": cfg.batch_size, "seed": cfg.seed}
            try:
                row = train_one(m, overrides.get(m, {}), patch, cfg, train_set, test_set, device=device, dtype=dtype)
            except (UnsupportedError, OptionError) as e:
                row = {**failed, "error": str(e)}
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                row = {**failed, "error": "out of memory"}
            row = {"run": run_id, **row}
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


# What a row records of the run it came from: rows agreeing on all of these (and on `patch`) are compared with
# each other; `run` is the call's id (`run_vision`), or the file a row was read from when it has none (older
# files; `report.load_rows`).
RUN_FIELDS = ("run", "epochs", "train_images", "test_images", "batch_size", "device", "dtype", "seed")
REFERENCES = ("sdpa", "dense")


def run_key(row: dict) -> tuple:
    """(patch, seq_len, the RUN_FIELDS): rows with the same key are one run's rows at one patch size."""
    return (row.get("patch"), row.get("seq_len")) + tuple(str(row.get(f)) for f in RUN_FIELDS)


def references(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """{run_key: {"sdpa": row, "dense": row}}: each run's (first) successful sdpa and dense rows at each patch size.
    The one lookup of the table's columns and the plot's reference line."""
    out: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("method") in REFERENCES and "error" not in r:
            out.setdefault(run_key(r), {}).setdefault(r["method"], r)
    return out


def summary_rows(rows: list[dict]) -> list[dict]:
    """The table: each row with its accuracy difference to sdpa (`accuracy_vs_sdpa`) and its time and memory
    ratios to sdpa and to dense (`time_ratio_sdpa`, `mem_ratio_dense`, ...), each against the row of that method
    from the same run at the same patch size (`run_key`); absent where that run has none (never against another
    run's row, nor against dense under sdpa's name)."""
    refs = references(rows)
    out = []
    for r in rows:
        s = dict(r)
        out.append(s)
        if "error" in r:
            continue
        same = refs.get(run_key(r), {})
        if "sdpa" in same and r.get("test_accuracy") is not None and same["sdpa"].get("test_accuracy") is not None:
            s["accuracy_vs_sdpa"] = r["test_accuracy"] - same["sdpa"]["test_accuracy"]
        for base, b in same.items():
            if r.get("epoch_s") and b.get("epoch_s"):
                s[f"time_ratio_{base}"] = r["epoch_s"] / b["epoch_s"]
            if r.get("peak_mem_bytes") and b.get("peak_mem_bytes"):
                s[f"mem_ratio_{base}"] = r["peak_mem_bytes"] / b["peak_mem_bytes"]
    return out
