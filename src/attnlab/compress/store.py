"""A trained autoencoder on disk, and the tokenizer it reads.

    DIR/config.json          {"format": "attnlab-compress/1", "model": AutoencoderConfig, "tokenizer": ..., ...}
    DIR/model.safetensors    the weights
    DIR/tokenizer/           the tokenizer's own files (the folder is self-contained)

`load(DIR)` checks all three before building anything: a missing folder, a foreign or damaged config, or
truncated weights is one clear error (CheckpointError), never a traceback.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


from ..adapters.state import CheckpointError, load_safetensors
from ..types import AttnlabError
from .model import AutoencoderConfig, SequenceAutoencoder

FORMAT = "attnlab-compress/1"


def load_tokenizer(name: str):
    """A packaged model's tokenizer by name ("minilm", "smollm2") or a folder holding tokenizer files."""
    from transformers import AutoTokenizer

    from .. import models

    models._quiet_transformers()
    if name in models.MODELS:
        path, _ = models.resolve(name)
    else:
        path = Path(name)
        if not path.is_dir():
            raise AttnlabError(f"--tokenizer {name!r} is neither a packaged model ({', '.join(models.MODELS)}) nor a "
                               "folder with tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise AttnlabError(f"--tokenizer {name!r}: no usable tokenizer in {path} ({models.first_line(e, 160)})") from None


def fingerprint(model: SequenceAutoencoder) -> str:
    """sha256 (16 hex) of the weights: the codec refuses a file made by another model."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save(model: SequenceAutoencoder, tokenizer, path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": FORMAT})
    if tokenizer is not None:
        tokenizer.save_pretrained(path / "tokenizer")
    meta = {"format": FORMAT, "model": model.cfg.__dict__, "fingerprint": fingerprint(model), **(extra or {})}
    (path / "config.json").write_text(json.dumps(meta, indent=1))
    return path


def _is_model_folder(path: Path) -> bool:
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def read_config(path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--model {str(path)!r} is not a folder (a trained autoencoder: attnlab compress train "
                              "--out DIR writes DIR/model)")
    if not _is_model_folder(path) and _is_model_folder(path / "model"):  # the run folder of `compress train --out`
        raise CheckpointError(f"{path} is a training run folder, not a model: pass {path / 'model'} (the trained "
                              "autoencoder it holds)")
    try:
        meta = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json: not a trained autoencoder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}/config.json is corrupt ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an attnlab autoencoder (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    return meta


def load(path, device: str = "cpu", tokenizer: bool = True):
    """(model in eval mode, tokenizer or None, config.json) of a trained autoencoder folder."""
    path = Path(path)
    meta = read_config(path)
    try:
        cfg = AutoencoderConfig(**meta["model"])
    except TypeError as e:
        raise CheckpointError(f"{path}/config.json: the model config does not fit this attnlab ({e})") from None
    model = SequenceAutoencoder(cfg)
    tensors = load_safetensors(path / "model.safetensors", "the autoencoder's weights")
    missing = sorted(set(model.state_dict()) ^ set(tensors))
    if missing:
        raise CheckpointError(f"{path}/model.safetensors does not match its config (keys differ: {missing[:4]})")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CheckpointError(f"{path}/model.safetensors does not match its config ({str(e)[:160]})") from None
    tok = model_tokenizer(path) if tokenizer else None
    return model.to(device).eval(), tok, meta


def model_tokenizer(path):
    """The tokenizer of a trained autoencoder folder (its tokenizer/), without loading the model."""
    path = Path(path)
    if not (path / "tokenizer").is_dir():
        raise CheckpointError(f"{path} has no tokenizer/ folder")
    return load_tokenizer(str(path / "tokenizer"))


class ModelWeights:
    """train/checkpoint.py's weights part for the autoencoder: the whole model (no tokenizer) under model/."""

    folder = "model"

    def save(self, model, path: Path) -> None:
        save(model, None, path)

    def check(self, path: Path) -> None:
        read_config(path)
        if not (path / "model.safetensors").is_file():
            raise CheckpointError(f"{path} has no model.safetensors (incomplete checkpoint)")

    def load(self, model, path: Path) -> None:
        loaded, _, _ = load(path, tokenizer=False)
        model.load_state_dict(loaded.state_dict())
