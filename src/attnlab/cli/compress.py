"""`attnlab compress`: train the sequence autoencoder, evaluate it as a codec beside gzip / bz2 / xz, and encode or
decode text files with it."""
from __future__ import annotations

from pathlib import Path

from ..types import AttnlabError
from . import common


ARCH_HELP = {"dim": "model width", "heads": "attention heads", "enc_layers": "encoder layers",
             "dec_layers": "decoder layers", "mlp_dim": "feed-forward width", "latent_dim": "numbers per latent vector (what the codec stores)",
             "radius": "relative mixing: reach in rows either side of a centre (at least the tokens a latent covers)",
             "quant_bits": "training noise of one quantisation step at this many bits (0: none)"}


def add_parser(sub) -> None:
    p = sub.add_parser("compress", help="sequence autoencoder (n tokens -> ratio * n vectors) and a lossy text codec",
                       description="Train an attention autoencoder whose encoder shortens a token sequence to "
                                   "ceil(ratio * n) latent vectors (the `reduce` method: queries W_S Q) and whose "
                                   "decoder restores it; one model serves every length up to --seq-len. Then use it "
                                   "as a lossy text codec.")
    cmds = p.add_subparsers(dest="compress_cmd", required=True, metavar="{train,eval,encode,decode}")

    t = cmds.add_parser("train", help="train an autoencoder (cross-entropy on token reconstruction)")
    d = common_defaults()
    t.add_argument("--ratio", type=float, default=d.ratio, help="latent vectors per token, in (0, 1] (default: %(default)s)")
    t.add_argument("--seq-len", type=int, default=d.max_len, help="longest sequence; training windows (default: %(default)s)")
    t.add_argument("--min-len", type=int, default=d.min_len, help="shortest sequence drawn in training (default: %(default)s)")
    t.add_argument("--data", default=",".join(d.data), help="training corpora (default: %(default)s); the held-out "
                                                             "tail of Moby Dick is evaluated")
    t.add_argument("--tokenizer", default=d.tokenizer, help="a packaged model's tokenizer (minilm, smollm2) or a "
                                                            "folder (default: %(default)s)")
    t.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="windows of --seq-len tokens per step "
                                                                        "(default: %(default)s)")
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    t.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate after --decay-steps (default: %(default)s)")
    t.add_argument("--decay-steps", type=int, default=d.decay_steps, help="linear decay lr -> min-lr over these steps "
                                                                          "(default: %(default)s)")
    t.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out evaluation every N steps (default: %(default)s)")
    t.add_argument("--eval-lengths", default=",".join(map(str, d.eval_lengths)),
                   help="held-out sequence lengths evaluated (default: %(default)s)")
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="save a resumable checkpoint every N steps (default: %(default)s)")
    t.add_argument("--seed", type=int, default=d.seed, help="initialisation and data order (default: %(default)s)")
    for name, what in ARCH_HELP.items():
        t.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name),
                       help=f"{what} (default: %(default)s)")
    t.add_argument("--mixing", choices=("relative", "absolute"), default=d.mixing,
                   help="W_S: a kernel over row offsets, or the paper's matrix area-resampled (default: %(default)s)")
    t.add_argument("--bias", choices=("distance", "none"), default=d.bias,
                   help="the resize attention's score bias: distance (rows start local; attnlab's) or none (the "
                        "paper's) (default: %(default)s)")
    t.add_argument("--out", required=True, help="run folder (model/, result.json, log.jsonl, curve.png, checkpoints/)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    t.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)

    e = cmds.add_parser("eval", help="codec report: bytes/char and accuracy per model and bit width, beside gzip/bz2/xz")
    e.add_argument("--models", required=True, help="comma-separated trained model folders (RUN/model)")
    e.add_argument("--text", default=None, help="a UTF-8 text file (default: the held-out tail of Moby Dick)")
    e.add_argument("--bits", default="8,6,4", help="quantisation bit widths (default: %(default)s)")
    e.add_argument("--lengths", default="64,128,256,512", help="held-out sequence lengths for token accuracy by "
                                                               "length (default: %(default)s)")
    e.add_argument("--out", default=str(common.default_results_dir("compress")), help="folder for compress.json and "
                                                                                      "compress.png (default: %(default)s)")
    e.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    e.add_argument("--no-plot", action="store_true", help="write no PNG")
    e.set_defaults(func=run_eval)

    for name, helptext in (("encode", "text file -> codec file"), ("decode", "codec file -> text file")):
        c = cmds.add_parser(name, help=helptext)
        c.add_argument("file", help="the UTF-8 text to encode" if name == "encode" else "the .alc file to decode")
        c.add_argument("--model", required=True, help="the trained model folder (RUN/model)")
        c.add_argument("-o", "--output", required=True, help="the file to write")
        if name == "encode":
            c.add_argument("--bits", type=int, default=8, help="bits per latent number, 1..16 (default: %(default)s)")
        c.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
        c.set_defaults(func=run_encode if name == "encode" else run_decode)


def common_defaults():
    from ..compress.train import TrainConfig

    return TrainConfig()


def run_train(args) -> int:
    from ..compress.train import TrainConfig, train

    common.check_device(args.device)
    cfg = TrainConfig(ratio=args.ratio, max_len=args.seq_len, min_len=args.min_len, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr, decay_steps=args.decay_steps,
                      data=tuple(common.name_list(args.data, "--data")), tokenizer=args.tokenizer,
                      eval_lengths=tuple(common.int_list("--eval-lengths", args.eval_lengths)), eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every, seed=args.seed, progress=not args.no_progress,
                      mixing=args.mixing, bias=args.bias, **{k: getattr(args, k) for k in ("dim", "heads", "enc_layers", "dec_layers",
                                                                          "mlp_dim", "latent_dim", "radius", "quant_bits")})
    train(cfg, out=args.out, device=args.device, resume=args.resume)
    return 0


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise AttnlabError(f"{path!r} is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise AttnlabError(f"{path!r} is not UTF-8 text") from None


def _check_output(path: str, flag: str = "-o/--output") -> Path:
    """The file to write: not a folder, in a folder that exists or can be made (common.check_out_folder); checked
    before the model loads."""
    p = Path(path)
    if p.is_dir():
        raise AttnlabError(f"{flag} {path!r} is a folder; give the file to write")
    common.check_out_folder(p.parent, f"{flag}'s folder")
    return p


def run_encode(args) -> int:
    from ..compress import codec, store

    common.check_device(args.device)
    output = _check_output(args.output)
    store.read_config(args.model)  # the folder checked before the text is read or the model built
    text = _read_text(args.file)
    model, tok, _ = store.load(args.model, args.device)
    buf = codec.encode(model, tok, text, bits=args.bits, device=args.device)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(buf)
    print(f"wrote {args.output}: {len(buf):,} bytes for {len(text):,} characters ({len(buf) / max(1, len(text)):.4f} "
          f"bytes/char, {args.bits}-bit latents, ratio {model.cfg.ratio:.4g})")
    return 0


def run_decode(args) -> int:
    from ..compress import codec, store

    common.check_device(args.device)
    p = Path(args.file)
    if not p.is_file():
        raise AttnlabError(f"{args.file!r} is not a file")
    output = _check_output(args.output)
    store.read_config(args.model)
    model, tok, _ = store.load(args.model, args.device)
    text, ids = codec.decode(model, tok, p.read_bytes(), device=args.device)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}: {len(ids):,} tokens, {len(text):,} characters")
    return 0


def run_eval(args) -> int:
    from .. import data
    from ..compress import codec, store
    from ..compress.train import evaluate, held_out

    common.check_device(args.device)
    bits = common.int_list("--bits", args.bits)
    if max(bits) > 16:
        raise AttnlabError(f"--bits must be in 1..16, got {args.bits}")
    lengths = common.int_list("--lengths", args.lengths)
    dirs = common.name_list(args.models, "--models")
    metas = [store.read_config(d) for d in dirs]  # every folder checked before any work
    for d, meta in zip(dirs, metas):  # each model needs a length it can evaluate (its max_len is in config.json)
        max_len = (meta.get("model") or {}).get("max_len")
        if isinstance(max_len, int) and not any(n <= max_len for n in lengths):
            raise AttnlabError(_no_length(d, max_len, lengths))
    if args.text is None:
        full = data.moby_dick()
        text, split = full[int(len(full) * (1 - data.HELD_OUT)):], "held-out (tail of Moby Dick)"
    else:
        text, split = _read_text(args.text), args.text
        if not text:
            raise AttnlabError(f"--text {args.text!r} is empty")
        for d in dirs:  # the tokenizers only (light): a text with no tokens is refused before any model loads
            if not codec.text_ids(store.model_tokenizer(d), text):
                raise AttnlabError(f"--text {args.text!r} has no tokens for the tokenizer of {d} (only whitespace "
                                   "or characters it drops): nothing to encode")
    rows = [{**r, "split": split, "characters": len(text)} for r in codec.lossless_baselines(text)]
    print(f"{len(text):,} characters of {split}; lossless: " + "; ".join(
        f"{r['codec']} {r['bytes_per_char']:.3f} B/char" for r in rows))
    for d, meta in zip(dirs, metas):
        model, tok, meta = store.load(d, args.device)
        ok = [n for n in lengths if n <= model.cfg.max_len]
        if not ok:
            raise AttnlabError(_no_length(d, model.cfg.max_len, lengths))
        if len(ok) < len(lengths):
            print(f"{d}: trained up to {model.cfg.max_len} tokens: accuracy by length at "
                  f"{','.join(map(str, ok))} (not {','.join(str(n) for n in lengths if n not in ok)})")
        by_len = evaluate(model, held_out(tok, ok, 8192), args.device, bits=max(bits))
        train = meta.get("train", {})
        for r in codec.report(model, tok, text, bits, args.device):
            rows.append({**r, "model": d, "ratio": model.cfg.ratio, "seq_len": model.cfg.max_len,
                         "seed": train.get("seed"), "steps": train.get("steps"), "mixing": model.cfg.mixing,
                         "bias": model.cfg.bias, "latent_dim": model.cfg.latent_dim, "quant_bits": model.cfg.quant_bits,
                         "split": split, "characters": len(text), "device": args.device, "by_length": by_len})
        print(f"{d}: ratio {model.cfg.ratio:.4g}: " + "; ".join(
            f"{r['bits']}-bit {r['bytes_per_char']:.3f} B/char, tokens {r['token_accuracy']:.4f}"
            for r in rows if r.get("model") == d))
    out = Path(args.out)
    from ..compress.report import plot

    common.write_result(out / "compress.json", args.device, {"rows": rows},
                        plot=None if args.no_plot else (lambda png: plot(rows, png)))
    return 0


def _no_length(model_dir: str, max_len: int, lengths: list[int]) -> str:
    return (f"--lengths {','.join(map(str, lengths))}: {model_dir} was trained up to {max_len} tokens, so none of "
            f"these lengths can be evaluated (give lengths in 1..{max_len})")
