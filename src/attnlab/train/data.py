"""Training and held-out windows for distillation.

Training text: the named corpora (data.CORPORA), documents in a seeded order, each followed by the tokenizer's
end-of-text token, concatenated and cut into windows of `seq_len` tokens (plain concatenation: a window may
span a document boundary, marked by the separator; attention is not reset there). Moby Dick as training text
contributes only its first 90% of tokens: the held-out tail that every evaluation reads is never trained on.
Only as many documents are tokenised as the run needs. When a run needs more windows than the text holds it
starts another pass over them in a new seeded order (recorded as `epochs` in the result).
"""
from __future__ import annotations

import random

import torch

from .. import data
from ..types import AttnlabError


def eos_id(tokenizer) -> int:
    for attr in ("eos_token_id", "sep_token_id", "pad_token_id"):
        val = getattr(tokenizer, attr, None)
        if val is not None:
            return int(val)
    return 0


class TrainWindows:
    """Deterministic stream of training windows: window i of the run is `self[i]` (cycling with reshuffles)."""

    def __init__(self, tokenizer, corpora: list[str], seq_len: int, needed: int, seed: int = 0):
        if not corpora:
            raise AttnlabError("no training corpus given (--train sotu,brown, ...)")
        docs = data.documents(corpora)
        rng = random.Random(seed)
        rng.shuffle(docs)
        sep = eos_id(tokenizer)
        ids: list[int] = []
        want = needed * seq_len
        for corpus, text in docs:
            toks = tokenizer(text, add_special_tokens=False)["input_ids"]
            if corpus == "moby":
                toks = toks[: int(len(toks) * (1 - data.HELD_OUT))]  # the held-out tail is never trained on
            if not toks:
                continue
            ids.extend(toks)
            ids.append(sep)
            if len(ids) >= want:
                break
        n = len(ids) // seq_len
        if len(ids) <= 1:
            raise AttnlabError(f"the training corpora {corpora} hold no text (empty after tokenisation)")
        if n == 0:
            raise AttnlabError(f"the training corpora {corpora} hold {len(ids)} tokens, fewer than one window of "
                               f"--seq-len {seq_len}")
        self.windows = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
        self.seed, self.tokens = seed, len(ids)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def batch(self, start: int, count: int) -> torch.Tensor:
        """Windows start .. start+count-1 of the run (pass p over the windows uses the order of seed + p)."""
        n = len(self)
        rows = []
        for i in range(start, start + count):
            epoch, j = divmod(i, n)
            order = self._order(epoch)
            rows.append(self.windows[order[j]])
        return torch.stack(rows)

    def _order(self, epoch: int) -> list[int]:
        if not hasattr(self, "_orders"):
            self._orders = {}
        if epoch not in self._orders:
            order = list(range(len(self)))
            if epoch:
                random.Random(self.seed * 1000003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def epochs(self, windows_used: int) -> float:
        return windows_used / len(self)


def eval_windows(tokenizer, text: str | None, seq_len: int, num_windows: int) -> torch.Tensor:
    """The held-out windows `attnlab compare` evaluates: the tail of Moby Dick (or of a given text)."""
    return data.token_windows(tokenizer, data.read_text(text), seq_len=seq_len, num_tokens=num_windows * seq_len)
