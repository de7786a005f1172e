"""lm-evaluation-harness (PyPI `lm-eval`) on a causal LM as shipped and with attention swapped in, offline.

    rows = harness.evaluate(model, tok, variants, tasks=["attnlab_moby_cloze", "attnlab_moby_lastword"], limit=200)

No standard task's data is reachable without the Hugging Face hub, so attnlab writes two local tasks from the
held-out tail of Moby Dick (the text `attnlab compare` evaluates on; never trained on by `attnlab distill`) and
hands them to lm-eval as YAML through its TaskManager (`include_path`), with `datasets` reading local JSON:

- `attnlab_moby_cloze` (multiple choice, HellaSwag's shape): three consecutive sentences, then the true next
  sentence among four (three drawn from elsewhere in the tail, seeded). Metrics: acc, acc_norm (chance 0.25).
- `attnlab_moby_lastword` (log-likelihood, LAMBADA's shape): up to 80 words of running text, then the last word of
  a sentence (punctuation stripped). Metrics: acc (the word is the greedy continuation), perplexity.

Any other task name lm-eval knows is passed through; with the hub unreachable it fails with lm-eval's own
error, reported as one line. The model runs through lm-eval's HFLM wrapper around the already-loaded model, so
swapping with `attnlab.swapped` around `simple_evaluate` evaluates the swapped model.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
from pathlib import Path

from .. import data
from ..types import AttnlabError

LOCAL_TASKS = ("attnlab_moby_cloze", "attnlab_moby_lastword")

_CLOZE_YAML = """task: attnlab_moby_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_LASTWORD_YAML = """task: attnlab_moby_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _sentences(text: str) -> list[str]:
    flat = " ".join(text.split())
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'])", flat) if s]


def cloze_docs(text: str, seed: int = 0) -> list[dict]:
    sents = _sentences(text)
    good = [i for i, s in enumerate(sents) if 5 <= len(s.split()) <= 50]  # targets and distractors
    rng = random.Random(seed)
    docs = []
    for i in good[::4]:
        context = " ".join(sents[max(0, i - 3):i])
        if i < 3 or sents[i] in context:
            continue
        others = rng.sample([j for j in good if abs(j - i) > 8 and sents[j] != sents[i]], 3)
        choices = [sents[i]] + [sents[j] for j in others]
        order = list(range(4))
        rng.shuffle(order)
        docs.append({"context": context, "choices": [choices[k] for k in order], "gold": order.index(0)})
    return docs


_LAST_WORD = re.compile(r"[A-Za-z][a-z'-]{2,}[.!?]")  # a plain word of three letters or more that ends a sentence


def lastword_docs(text: str) -> list[dict]:
    words = text.split()
    docs = []
    for start in range(80, len(words), 97):
        i = next((j for j in range(start, min(start + 60, len(words))) if _LAST_WORD.fullmatch(words[j])), None)
        if i is None:
            continue
        docs.append({"context": " ".join(words[i - 80:i]), "target": " " + words[i][:-1]})
    return docs


def write_local_tasks(folder) -> Path:
    """Write the local tasks' data (JSON lines) and YAML under `folder`; returns it (TaskManager's include_path)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = data.moby_dick()
    tail = text[int(len(text) * (1 - data.HELD_OUT)):]
    for name, docs, yaml in (("attnlab_moby_cloze", cloze_docs(tail), _CLOZE_YAML),
                             ("attnlab_moby_lastword", lastword_docs(tail), _LASTWORD_YAML)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(yaml.format(path=path.resolve()))
    return folder


@contextlib.contextmanager
def quiet_lm_eval(progress: bool):
    """lm-eval's own output, for the length of an evaluation: its `git describe` of the working directory (stderr left
    open: outside a checkout every evaluation printed "fatal: not a git repository"; attnlab's rows name their commit
    themselves) always, and with `progress` False its progress bars (building contexts, the requests), which its
    evaluator gives no switch for."""
    import sys
    from unittest import mock

    import lm_eval.evaluator
    import tqdm as tqdm_package

    tqdm = tqdm_package.tqdm

    def silent(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    with contextlib.ExitStack() as stack:
        if hasattr(lm_eval.evaluator, "get_git_commit_hash"):
            stack.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None))
        if not progress:  # the modules that imported tqdm, and the package for those importing it inside a function
            for name, module in list(sys.modules.items()):
                if (name == "tqdm" or name.startswith("lm_eval")) and getattr(module, "tqdm", None) is tqdm:
                    stack.enter_context(mock.patch.object(module, "tqdm", silent))
        yield


def check_installed():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise AttnlabError("lm-eval is not installed: pip install 'lm-eval>=0.4.8' (the README's install command "
                           "does it)") from None


def evaluate(model, tokenizer, variants, *, tasks=LOCAL_TASKS, limit: int | None = 200, batch_size: int = 8,
             folder=None, progress: bool = True) -> list[dict]:
    """One row per (variant, task, metric): lm-eval's value and stderr. `variants`: compare.Variant list; the
    original model is always evaluated first (variant "original")."""
    import logging

    check_installed()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from ..adapters.swap import swapped
    from ..models import cache_dir

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    folder = write_local_tasks(folder or cache_dir() / "lm_eval_tasks")
    manager = TaskManager(include_path=str(folder))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise AttnlabError(f"lm-eval knows no task {unknown}; local tasks: {', '.join(LOCAL_TASKS)}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    rows = []
    for variant in [None, *variants]:
        label = "original" if variant is None else variant.label
        ctx = contextlib.nullcontext() if variant is None else swapped(model, variant.target)
        with ctx, quiet_lm_eval(progress):
            try:
                res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                              bootstrap_iters=100, log_samples=False)
            except Exception as e:  # noqa: BLE001 - lm-eval's own failures (a task's data unreachable) as one line
                raise AttnlabError(f"lm-eval failed on {label}: {type(e).__name__}: {str(e)[:300]}") from None
        for task, metrics in res["results"].items():
            n = res.get("n-samples", {}).get(task, {}).get("effective")
            for key, value in metrics.items():
                if "," not in key or "_stderr" in key:
                    continue
                metric = key.split(",")[0]
                stderr = metrics.get(f"{metric}_stderr,{key.split(',')[1]}")
                rows.append({"variant": label, "task": task, "metric": metric, "value": value,
                             "stderr": stderr if isinstance(stderr, (int, float)) else None, "samples": n})
    return rows
