"""`attnlab distill`: train only the swapped attention of a frozen model to match the original (KL)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..types import AttnlabError
from . import common


def add_parser(sub) -> None:
    from ..train.distill import DistillConfig

    d = DistillConfig()
    p = sub.add_parser("distill", help="train the swapped attention to match the frozen original model (KL)",
                       description="Freeze a model, swap in a method, train only the method's parameters to minimise "
                                   "KL(original || swapped) on next-token distributions; evaluate on held-out text; "
                                   "checkpoint, resume, and run under torchrun as DDP.")
    p.add_argument("--model", default="smollm2", help="a packaged causal LM (smollm2) or a local model folder")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--method", default=None, help="the method to distil into every layer (e.g. learned_mask, hybrid, "
                                                     "hedgehog; performer / rfa with --set M.learn_features=true)")
    what.add_argument("--spec", default=None, metavar="FILE.json", help="a per-layer swap spec (attnlab.SwapSpec JSON)")
    what.add_argument("--init", default=None, metavar="DIR", help="continue training a saved attention (attnlab.save / "
                                                                  "a previous run's OUT/attention)")
    common.add_set_argument(p)
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="also train low-rank adapters of this rank on every swapped layer's projections (q, k, v, o; "
                        "LoLCATs' second stage); the only thing that trains for a method without parameters "
                        "(global_sparse, window, ...); with --init: adapters on a saved attention (LoLCATs' order: "
                        "the attention-transfer run first); not with --transfer-steps (default: 0, none)")
    p.add_argument("--density", type=float, default=None, help="shorthand for --set METHOD.density=X (learned_mask)")
    p.add_argument("--train", default=",".join(d.train), help="training corpora, comma-separated: sotu, brown, moby "
                                                              "(moby: its first 90%% only) (default: %(default)s)")
    p.add_argument("--eval", dest="eval_text", default="moby", help="held-out text: moby (the tail of Moby Dick, as in "
                                                                     "compare) or a UTF-8 file (default: %(default)s)")
    helps = {
        "steps": "optimiser steps of the KL stage", "seq_len": "tokens per training and held-out window",
        "batch_size": "windows per step and process", "grad_accum": "micro-batches per optimiser step",
        "lr": "learning rate of the KL stage", "transfer_lr": "learning rate of the attention-transfer stage",
        "warmup": "linear warmup steps of each stage (then cosine decay to 10%%)", "weight_decay": "AdamW weight decay",
        "clip": "max gradient norm (0: none)", "transfer_steps": "attention-transfer steps before the KL stage (LoLCATs)",
        "eval_every": "held-out evaluation every N steps (and before and after)",
        "eval_windows": "held-out windows per evaluation", "checkpoint_every": "checkpoint every N steps",
        "seed": "seed of the data order and the parameters' init",
    }
    for f in dataclasses.fields(d):
        if f.name in ("train", "eval_text", "baseline", "progress"):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"{helps.get(f.name, f.name)} (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (under torchrun: each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype: bfloat16 = autocast (default on CUDA), float32 (default on CPU)")
    p.add_argument("--out", required=True, help="run folder: attention/, result.json, log.jsonl, curve.png, checkpoints/")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--no-baseline", action="store_true", help="learned_mask: skip the window + sinks baseline")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    import torch

    from .. import data, models, registry
    from ..adapters.spec import SwapSpec, changes_nothing
    from ..adapters.state import check_fingerprint, check_saved
    from ..adapters.swap import check as check_swap
    from ..train import checkpoint as ckpt
    from ..train.distill import DistillConfig, check_out, check_spec_trainable, distill, spec_at_length

    cfg = DistillConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillConfig)
                           if f.name not in ("train", "eval_text", "baseline", "progress")},
                        train=tuple(t.strip() for t in args.train.split(",") if t.strip()),
                        eval_text=None if args.eval_text == "moby" else args.eval_text,
                        baseline=not args.no_baseline, progress=not args.no_progress)
    cfg.check()
    common.check_device(args.device)
    device = args.device
    if torch.device(device).type == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    overrides = common.parse_overrides(args.overrides)
    saved_meta = check_saved(args.init) if args.init else None
    if args.init:
        spec = SwapSpec.from_dict(saved_meta["spec"])
    elif args.spec:
        if not Path(args.spec).is_file():
            raise AttnlabError(f"--spec {args.spec!r}: no such file")
        spec = SwapSpec.from_json(Path(args.spec))
    else:
        if not args.method:
            raise AttnlabError("say what to distil: --method NAME, --spec FILE.json or --init DIR")
        registry.get(args.method)
        given = overrides.pop(args.method, {})
        if args.density is not None:
            given["density"] = args.density
        opts = registry.options_at(args.method, cfg.seq_len, given)
        spec = SwapSpec.of(args.method, **opts)
    if overrides:
        raise AttnlabError(f"--set for methods not distilled here: {sorted(overrides)}")
    if args.lora:
        if any(r.lora for r in spec.rules):
            raise AttnlabError(f"--lora: {args.init or args.spec} already has adapters (rank "
                               f"{max(r.lora for r in spec.rules)}); continue without --lora")
        spec = spec.with_lora(args.lora)  # --init + --lora: LoLCATs' order, the attention first, then adapters
    if not args.init:  # what attnlab.distill swaps in: omitted options at --seq-len (a resumed run keeps its own)
        spec = spec_at_length(spec, cfg.seq_len, ckpt.latest(Path(args.out)) if args.resume else None)
    check_spec_trainable(spec, cfg.transfer_steps)  # a method without parameters, bad options: before the model loads
    data.check_corpora(list(cfg.train))  # unknown or unfetched corpora, too
    if cfg.eval_text is not None:
        data.read_text(cfg.eval_text)
    if os.environ.get("RANK", "0") == "0":
        check_out(Path(args.out), args.resume)
    skeleton, causal = models.skeleton(args.model)
    if not causal:
        raise AttnlabError(f"attnlab distill trains against next-token distributions: {args.model!r} is not a causal LM")
    models.check_seq_len(skeleton, cfg.seq_len)
    if args.init:  # saved for another model (layers, heads): the skeleton tells, before the load
        check_fingerprint(skeleton, saved_meta, args.init)
    plans = check_swap(skeleton, spec, cfg.seq_len)  # a selector that picks no layer, a method that cannot run
    # causal or this length: before the load
    if changes_nothing(plans):
        raise AttnlabError(f"{args.init or args.spec or args.method}: the spec leaves every layer its original "
                           "attention, so there is nothing to distil")
    dtype = args.dtype or ("bfloat16" if torch.device(device).type == "cuda" else "float32")
    model, tok = models.load(args.model, device=device)
    if args.init:
        from ..adapters.state import load

        load(model, args.init)
        if args.lora:
            from ..adapters.swap import add_lora

            add_lora(model, args.lora)
    distill(model, spec, tokenizer=tok, out=args.out, config=cfg, resume=args.resume, device=device,
            autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
    return 0
