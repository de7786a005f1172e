"""Training the sequence autoencoder: cross-entropy on token reconstruction, one model for every length.

    attnlab compress train --ratio 0.5 --seq-len 512 --data sotu,brown --steps 2000 --out runs/ae2
    res = attnlab.compress.train(TrainConfig(ratio=0.5, steps=2000), out="runs/ae2")

Data: the named corpora tokenised by `tokenizer` (MiniLM's WordPiece by default, the closest packaged one to the
research's BertTokenizer), cut into windows of max_len tokens (train/data.py's TrainWindows: a deterministic
stream, the held-out tail of Moby Dick never in it). Step s draws one length L in [min_len, max_len] from a
generator seeded by (seed, s) and cuts each of its windows into max_len // L sequences of L tokens, so every
step sees about the same number of tokens and one model learns every length.

Recipe (the research's): AdamW, learning rate falling linearly from `lr` to `min_lr` over the first
`decay_steps` steps (it used 1e-3 -> 1e-4 over 5 epochs), then flat; bf16 autocast on CUDA; gradient clipping.
Held-out evaluation every `eval_every` steps on the tail of Moby Dick at `eval_lengths`: token accuracy with
float latents and with latents quantised to `quant_bits`. Checkpoints every `checkpoint_every` steps
(train/checkpoint.py with the whole model as its weights); `resume=True` continues from the newest one and
reproduces the uninterrupted run. A non-finite loss stops the run before it could write a checkpoint. Under
`torchrun --nproc_per_node N` each rank reads its share of every step's windows (DistributedDataParallel).

Output folder: model/ (config.json + model.safetensors + tokenizer/: `attnlab.compress.load(OUT/model)`),
result.json, log.jsonl, curve.png, checkpoints/.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import data
from ..train import checkpoint as ckpt
from ..train.data import TrainWindows
from ..types import AttnlabError
from . import store
from .model import AutoencoderConfig, SequenceAutoencoder


@dataclasses.dataclass
class TrainConfig:
    ratio: float = 0.5
    max_len: int = 512  # --seq-len: the longest sequence, and the training windows' length
    min_len: int = 64  # shortest sequence length drawn in training
    steps: int = 2000
    batch_size: int = 16  # windows of max_len tokens per step (all ranks)
    lr: float = 1e-3
    min_lr: float = 1e-4
    decay_steps: int = 1000  # the learning rate falls linearly from lr to min_lr over these steps, then stays
    warmup: int = 50
    weight_decay: float = 0.01
    clip: float = 1.0
    data: tuple[str, ...] = ("sotu", "brown")
    tokenizer: str = "minilm"
    eval_lengths: tuple[int, ...] = (64, 128, 256, 512)
    eval_tokens: int = 8192  # held-out tokens per evaluated length
    eval_every: int = 250
    checkpoint_every: int = 250
    seed: int = 0
    progress: bool = True
    # the model
    dim: int = 256
    heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    mlp_dim: int = 1024
    latent_dim: int = 64
    mixing: str = "relative"
    radius: int = 8
    quant_bits: int = 8
    bias: str = "distance"

    def model_config(self, vocab_size: int) -> AutoencoderConfig:
        return AutoencoderConfig(vocab_size=vocab_size, ratio=self.ratio, max_len=self.max_len, dim=self.dim,
                                 heads=self.heads, enc_layers=self.enc_layers, dec_layers=self.dec_layers,
                                 mlp_dim=self.mlp_dim, latent_dim=self.latent_dim, mixing=self.mixing,
                                 radius=self.radius, quant_bits=self.quant_bits, bias=self.bias)

    def check(self) -> None:
        """Everything that can be checked before a tokenizer or a corpus is read."""
        for name in ("steps", "batch_size", "decay_steps", "eval_every", "checkpoint_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise AttnlabError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.min_len <= self.max_len:
            raise AttnlabError(f"--min-len {self.min_len} must be in 1..--seq-len {self.max_len}")
        bad = [n for n in self.eval_lengths if not 1 <= n <= self.max_len]
        if bad or not self.eval_lengths:
            raise AttnlabError(f"--eval-lengths {list(self.eval_lengths)} must be non-empty and in 1..{self.max_len}")
        if not 0 < self.min_lr <= self.lr:
            raise AttnlabError(f"--min-lr {self.min_lr} must be in (0, --lr {self.lr}]")
        self.model_config(vocab_size=1).check()
        data.check_corpora(list(self.data))


def lr_factor(cfg: TrainConfig):
    def f(step: int) -> float:
        warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
        t = min(1.0, step / cfg.decay_steps)
        return warm * (1 - t * (1 - cfg.min_lr / cfg.lr))

    return f


def step_length(cfg: TrainConfig, step: int) -> int:
    """The sequence length of step `step` (uniform in [min_len, max_len], fixed by seed and step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return int(torch.randint(cfg.min_len, cfg.max_len + 1, (1,), generator=g))


def cut(windows: torch.Tensor, length: int) -> torch.Tensor:
    """[W, max_len] windows -> [W * (max_len // length), length] sequences."""
    w, n = windows.shape
    per = n // length
    return windows[:, : per * length].reshape(w * per, length)


def token_accuracy(model, ids: torch.Tensor, *, bits: int | None = None, batch: int = 64) -> float:
    """Fraction of tokens reconstructed exactly (latents quantised to `bits` when given)."""
    from .codec import dequantise, quantise

    right = 0
    model_was = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            x = ids[i: i + batch]
            lat = model.encode(x)
            if bits:
                lat = dequantise(quantise(lat, bits), bits)
            pred = model.decode(lat, x.shape[1]).argmax(-1)
            right += int((pred == x).sum())
    model.train(model_was)
    return right / ids.numel()


def held_out(tokenizer, lengths, eval_tokens: int) -> dict[int, torch.Tensor]:
    ids = tokenizer(data.moby_dick(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return {n: data.windows_of(ids, seq_len=n, num_tokens=max(n, eval_tokens)) for n in lengths}


def evaluate(model, windows: dict[int, torch.Tensor], device, bits: int) -> dict:
    out = {}
    for n, ids in windows.items():
        ids = ids.to(device)
        out[str(n)] = {"token_accuracy": token_accuracy(model, ids),
                       "token_accuracy_quantised": token_accuracy(model, ids, bits=bits) if bits else None}
    return out


def train(cfg: TrainConfig, *, out, device: str = "cpu", resume: bool = False) -> dict:
    from ..train.distill import check_out, init_distributed

    cfg.check()
    out = Path(out)
    last = check_out(out, resume)
    d = init_distributed(device)
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(dev)
    if cfg.batch_size % d.world:
        raise AttnlabError(f"--batch-size {cfg.batch_size} must be a multiple of the {d.world} processes")
    tokenizer = store.load_tokenizer(cfg.tokenizer)
    torch.manual_seed(cfg.seed)
    model = SequenceAutoencoder(cfg.model_config(len(tokenizer))).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    weights = store.ModelWeights()
    identity = {"config": dataclasses.asdict(cfg), "world": d.world}
    identity["config"].pop("progress")
    identity["config"].pop("eval_every")
    identity["config"].pop("checkpoint_every")
    identity = json.loads(json.dumps(identity))  # tuples as lists, as they come back from trainer.json
    start, log = 0, []
    if last is not None:
        meta, tensors = ckpt.read(last, weights)
        if meta["identity"] != identity:
            diff = sorted(k for k in meta["identity"]["config"] if meta["identity"]["config"].get(k) != identity["config"].get(k))
            raise ckpt.CheckpointError(f"{last} belongs to another run (differs in {diff or ['world']}); it cannot be "
                                       "resumed with these arguments")
        ckpt.restore(last, meta, tensors, model, opt, sched, weights)
        start = meta["step"]
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[: meta["log"]["lines"]]]
    windows = TrainWindows(tokenizer, list(cfg.data), cfg.max_len, needed=cfg.steps * cfg.batch_size, seed=cfg.seed)
    evals = held_out(tokenizer, cfg.eval_lengths, cfg.eval_tokens)
    net = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[d.local_rank] if dev.type == "cuda" else None)
    n_params = model.num_parameters()
    if d.main:
        noise = f", trained for {cfg.quant_bits}-bit codes" if cfg.quant_bits else ""
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**identity["config"], "parameters": n_params, "world": d.world},
                                                    indent=1))
        print(f"attnlab compress: {n_params:,} parameters; ratio {cfg.ratio:.4g} ({cfg.latent_dim} numbers per "
              f"latent{noise}); {len(windows)} training windows of {cfg.max_len} tokens "
              f"({windows.tokens:,} tokens of {', '.join(cfg.data)}); lengths {cfg.min_len}..{cfg.max_len}; "
              f"{d.world} process(es); device {dev}", flush=True)
    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=f"compress {cfg.ratio:.3g}", disable=not (cfg.progress and d.main),
               dynamic_ncols=True)
    per_rank = cfg.batch_size // d.world
    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    train_time, tokens = 0.0, 0
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        length = step_length(cfg, step)
        ids = cut(windows.batch(step * cfg.batch_size + d.rank * per_rank, per_rank), length).to(dev)
        with autocast():
            logits = net(ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        if not torch.isfinite(loss):
            raise AttnlabError(f"step {step + 1}: the loss is {loss.item()} (diverged); the last checkpoint is kept "
                               f"({ckpt.latest(out) or 'none yet'}); lower --lr and resume or restart")
        loss.backward()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        train_time += dt
        tokens += ids.numel() * d.world
        acc = float((logits.argmax(-1) == ids).float().mean())
        log.append({"step": step + 1, "length": length, "loss": loss.item(), "train_accuracy": acc,
                    "lr": sched.get_last_lr()[0]})
        bar.set_postfix(loss=f"{loss.item():.3g}", acc=f"{acc:.3f}", L=length, tok_s=f"{ids.numel() * d.world / dt:.0f}")
        bar.update()
        done = step + 1 == cfg.steps
        if d.main and ((step + 1) % cfg.eval_every == 0 or done):
            log[-1]["eval"] = evaluate(model, evals, dev, cfg.quant_bits)
            bar.write(f"step {step + 1}: held-out token accuracy " + ", ".join(
                f"{n}: {e['token_accuracy']:.4f}" for n, e in log[-1]["eval"].items()))
        if (step + 1) % cfg.checkpoint_every == 0 and not done:
            if d.main:
                _write_log(out, log)
                ckpt.save(out, model, opt, sched, step=step + 1, windows=(step + 1) * cfg.batch_size,
                          identity=identity, log_state={"lines": len(log)}, weights=weights)
            if d.world > 1:
                import torch.distributed as dist

                dist.barrier()
    bar.close()
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    final = next((r["eval"] for r in reversed(log) if "eval" in r), None)  # rank 0 evaluates
    result = {"ratio": cfg.ratio, "max_len": cfg.max_len, "seed": cfg.seed, "steps": cfg.steps,
              "parameters": n_params, "latent_dim": cfg.latent_dim, "quant_bits": cfg.quant_bits,
              "mixing": cfg.mixing, "tokenizer": cfg.tokenizer, "data": list(cfg.data), "world": d.world,
              "held_out": final, "split": "held-out (tail of Moby Dick)",
              "tokens_per_s": tokens / train_time if train_time else None, "train_s": train_time,
              "peak_mem_bytes": peak, "device": str(dev)}
    if d.main:
        store.save(model, tokenizer, out / "model", extra={"train": {k: v for k, v in result.items() if k != "held_out"},
                                                          "held_out": final})
        (out / "result.json").write_text(json.dumps(result, indent=1))
        _write_log(out, log)
        plot_curve(log, out / "curve.png", title=f"attnlab compress: ratio {cfg.ratio:.3g}, seed {cfg.seed}")
        accs = ", ".join(f"{n}: {e['token_accuracy']:.4f}" for n, e in final.items())
        print(f"attnlab compress: held-out token accuracy by length {accs}; wrote {out / 'model'} and "
              f"{out / 'result.json'}", flush=True)
    return result


def _write_log(out: Path, log: list[dict]) -> None:
    tmp = out / ".log.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in log))
    tmp.replace(out / "log.jsonl")


def plot_curve(log: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import save

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in log]
    a.plot(steps, [r["loss"] for r in log], lw=0.8, color="tab:blue")
    a.set(xlabel="step", ylabel="training cross-entropy (nats/token)", yscale="log")
    a.grid(alpha=0.3)
    evals = [r for r in log if "eval" in r]
    for n in (evals[0]["eval"] if evals else {}):
        b.plot([r["step"] for r in evals], [1 - r["eval"][n]["token_accuracy"] for r in evals], marker="o", ms=3,
               label=f"{n} tokens")
    b.set(xlabel="step", ylabel="held-out token error (1 - accuracy)", yscale="log")
    b.grid(alpha=0.3, which="both")
    if evals:
        b.legend(fontsize=8)
    save(fig, path, title)
