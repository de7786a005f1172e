"""Training checkpoints: the trained attention (attnlab.save's format) plus the trainer's state, no pickle.

    OUT/checkpoints/step-000040/attention/           attnlab.json + attention.safetensors (the trained weights:
                                                     `Weights` says how they are saved, checked and loaded;
                                                     attnlab.compress saves a whole model under model/)
    OUT/checkpoints/step-000040/trainer.safetensors  optimizer moments, RNG states
    OUT/checkpoints/step-000040/trainer.json         step, windows consumed, scheduler and optimizer scalars,
                                                     the run's identity (model fingerprint, spec, data, shapes)
    OUT/checkpoints/latest                           the name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place when complete; `latest` is replaced
only after that. A killed run therefore leaves the previous checkpoint intact, and resuming reads `latest`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..adapters.state import CheckpointError, load_safetensors, read_meta, read_tensors
from ..adapters.state import save as save_attention

FORMAT = "attnlab-trainer/1"


class Weights:
    """What a checkpoint holds besides the trainer's state: by default the swapped attention alone (attnlab.save's
    format, under attention/). Another trainer passes its own (folder name, save, check, load)."""

    folder = "attention"

    def save(self, model, path: Path) -> None:
        save_attention(model, path)

    def check(self, path: Path) -> None:
        read_meta(path)
        read_tensors(path)

    def load(self, model, path: Path) -> None:
        from ..adapters.state import load as load_attention

        load_attention(model, path)


ATTENTION = Weights()


def latest(out: Path) -> Path | None:
    ptr = Path(out) / "checkpoints" / "latest"
    if not ptr.is_file():
        return None
    path = ptr.parent / ptr.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{ptr} names {path.name}, which does not exist (the run's checkpoints are damaged)")
    return path


def save(out: Path, model, optimizer, scheduler, *, step: int, windows: int, identity: dict, log_state: dict,
         weights: Weights = ATTENTION) -> Path:
    from safetensors.torch import save_file

    ckdir = Path(out) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ckdir))
    try:
        weights.save(model, tmp / weights.folder)
        tensors, scalars = _optimizer_state(optimizer)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda{i}"] = s
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / "trainer.safetensors"),
                  metadata={"format": FORMAT})
        meta = {"format": FORMAT, "step": step, "windows": windows, "identity": identity,
                "scheduler": scheduler.state_dict(), "optimizer": scalars, "log": log_state}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1, default=str))
        final = ckdir / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr_tmp = ckdir / ".latest.tmp"
        ptr_tmp.write_text(name)
        os.replace(ptr_tmp, ckdir / "latest")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ckdir / name


def _optimizer_state(optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, state = {}, {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"opt.{idx}.{key}"] = val
            else:
                state.setdefault(str(idx), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "state": state}


def read(path: Path, weights: Weights = ATTENTION) -> tuple[dict, dict]:
    """(trainer.json, trainer.safetensors tensors) of a checkpoint, with clear errors for damage."""
    path = Path(path)
    try:
        meta = json.loads((path / "trainer.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} has no trainer.json (incomplete)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}/trainer.json is corrupt ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an attnlab trainer checkpoint (format {meta.get('format')!r})")
    tensors = load_safetensors(path / "trainer.safetensors", "an incomplete checkpoint")
    weights.check(path / weights.folder)  # the weights are checked too, before anything is loaded
    return meta, tensors


def restore(path: Path, meta: dict, tensors: dict, model, optimizer, scheduler, weights: Weights = ATTENTION) -> None:
    weights.load(model, path / weights.folder)
    sd = {"param_groups": meta["optimizer"]["param_groups"], "state": {}}
    for key, val in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            sd["state"].setdefault(int(idx), {})[name] = val
    for idx, extra in meta["optimizer"]["state"].items():
        sd["state"].setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict(sd)
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
