"""`attnlab vision`: the same small ViT trained on Fashion-MNIST once per attention method; accuracy and cost."""
from __future__ import annotations

import dataclasses
import json
import time

from ..types import AttnlabError
from . import common

DEFAULT_METHODS = "sdpa,dense,linear,performer,rfa,linformer,nystrom,lsh,window,block_sparse"


def add_parser(sub) -> None:
    from ..vision.train import VisionConfig

    d = VisionConfig()
    p = sub.add_parser("vision", help="train a ViT on Fashion-MNIST once per attention method: accuracy and cost",
                       description="Train the same small Vision Transformer on Fashion-MNIST (Debian's "
                                   "dataset-fashion-mnist) once per attention method, with identical starting weights, "
                                   "data order, augmentation and hyper-parameters; report test accuracy, training time "
                                   "per epoch, inference throughput and (on CUDA) peak memory as a table, JSON and a PNG.")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma-separated method names, or 'all' for every registered method (default: %(default)s)")
    p.add_argument("--patch", default="4", help="patch size(s), comma-separated: 4 gives 49 patches, 2 gives 196, 1 "
                                                "gives 784 (pixel-level, LRA's image regime) (default: %(default)s)")
    common.add_set_argument(p)
    helps = {"epochs": "training epochs", "batch_size": "images per step", "lr": "peak AdamW learning rate",
             "weight_decay": "AdamW weight decay (weight matrices only: not biases, norms, the position "
             "embedding or the CLS token)", "warmup_epochs": "linear warmup (below --epochs), then cosine decay",
             "label_smoothing": "cross-entropy label smoothing", "dim": "ViT width", "depth": "ViT blocks",
             "heads": "attention heads", "mlp_dim": "MLP hidden width", "seed": "seed of weights, data order and "
             "augmentation (the same for every method)"}
    helps["warmup_epochs"] += f" (default: {d.warmup_epochs}, or 0 in a run of one epoch)"
    for f in dataclasses.fields(d):
        if f.name in helps:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default),
                           default=None if f.name == "warmup_epochs" else f.default,
                           help=helps[f.name] + ("" if f.name == "warmup_epochs" else " (default: %(default)s)"))
    p.add_argument("--pool", default=d.pool, choices=["cls", "mean"], help="classify from a CLS token or the mean of "
                                                                            "the patch tokens (default: %(default)s)")
    p.add_argument("--train-size", type=int, default=None, help="use the first N (at most 60000) of the 60k training "
                                                                "images")
    p.add_argument("--test-size", type=int, default=None, help="use the first N (at most 10000) of the 10k test images")
    p.add_argument("--no-augment", action="store_true", help="no random shifts and flips")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="bfloat16 = autocast (default on CUDA), float32 (default on CPU)")
    p.add_argument("--out", default=str(common.default_results_dir("vision")),
                   help="folder for vision-<timestamp>.json, .jsonl (rows as they finish) and .png (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def parse_patches(raw: str) -> tuple[int, ...]:
    try:
        patches = tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise AttnlabError(f"--patch expects integers such as 4 or 4,1, got {raw!r}") from None
    if not patches:
        raise AttnlabError("--patch needs at least one patch size")
    return patches


def run(args) -> int:
    import torch

    from .. import registry
    from ..vision import report
    from ..vision.data import fashion_mnist_dir
    from ..vision.train import VisionConfig, check_methods, run_vision

    methods = registry.standalone_methods() if args.methods.strip() == "all" else common.name_list(args.methods)
    if args.warmup_epochs is None:  # the warmup must end before the run does: a one-epoch run has none
        args.warmup_epochs = VisionConfig.warmup_epochs if args.epochs > 1 else 0.0
    cfg = VisionConfig(patches=parse_patches(args.patch), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                       label_smoothing=args.label_smoothing, augment=not args.no_augment, dim=args.dim,
                       depth=args.depth, heads=args.heads, mlp_dim=args.mlp_dim, pool=args.pool,
                       train_size=args.train_size, test_size=args.test_size, seed=args.seed,
                       progress=not args.no_progress)
    cfg.check()
    common.check_device(args.device)
    out = common.check_out_folder(args.out)  # main checks it too; run() may be called alone
    overrides = common.parse_overrides(args.overrides, methods)
    check_methods(methods, cfg, overrides)
    fashion_mnist_dir()  # a missing dataset fails here, in one line
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"vision-{stamp}.json"
    live = path.with_suffix(".jsonl")
    print(f"attnlab vision: {len(methods)} methods x patch {','.join(map(str, cfg.patches))}, {cfg.epochs} epochs, "
          f"device={args.device}; rows go to {live} as they finish", flush=True)

    def on_row(row):
        with live.open("a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        status = row.get("error") or f"test accuracy {row['test_accuracy']:.4f}, {row['epoch_s']:.2f} s/epoch"
        print(f"  {row['method']} patch {row['patch']}: {status}", flush=True)

    t0 = time.time()
    rows = run_vision(methods, cfg, overrides=overrides, device=args.device, dtype=dtype, on_row=on_row)
    print()
    print(report.format_table(rows))
    common.write_result(
        path, args.device, {"config": dataclasses.asdict(cfg), "elapsed_s": round(time.time() - t0, 1), "rows": rows},
        None if args.no_plot else lambda png: report.plot(
            rows, png, title=f"attnlab vision: ViT (dim {cfg.dim}, depth {cfg.depth}) on Fashion-MNIST, {cfg.epochs} "
                             f"epochs, {args.device}"))
    return 0
