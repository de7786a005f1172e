"""`SwapSpec`: which attention each layer of a model runs, as plain data (JSON).

    SwapSpec.of("window", window=128)                         # every layer
    SwapSpec.of({"*": ("window", {"window": 128}), "0-3": "original"})   # layers 0-3 keep their own attention
    SwapSpec([Rule("*", "performer", {"num_features": 128}), Rule("10,20-22", "dense")], seed=7)
    SwapSpec.from_json(path_or_text)

A rule says which layers (`layers`) run which method (`method`, with `options`). Layers are selected by index
in the order the adapter finds attention layers ("*", "3", "0-3", "0,2,5-7", "-1" for the last) or by a
glob on the module name ("model.layers.1?.self_attn"). Rules apply in order and the last rule that matches
a layer wins; a layer no rule matches keeps its own attention (method "original").

Seeds: a method with a `seed` option (performer, rfa, lsh, block_sparse's BigBird recipe, ...) gets a seed
per layer drawn from the spec's `seed`, so layers do not share random features, unless the rule sets `seed`
itself (then every layer it matches uses that one).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import re
from pathlib import Path

from .. import registry
from ..types import AttnlabError, UnsupportedError
from .lora import check_rank

ORIGINAL = "original"  # a layer that keeps the model's own attention
_RANGE = re.compile(r"^(-?\d+)(?:\s*-\s*(-?\d+))?$")  # "3", "-1", "0-3", "2--1"


@dataclasses.dataclass
class Rule:
    layers: str = "*"
    method: str = ORIGINAL
    options: dict = dataclasses.field(default_factory=dict)
    lora: int = 0  # rank of low-rank adapters on the layers' projections (adapters/lora.py); 0: none

    def matches(self, index: int, name: str, count: int) -> bool:
        sel = str(self.layers).strip()
        if sel == "*":
            return True
        parts = [p.strip() for p in sel.split(",") if p.strip()]
        if not all(_RANGE.match(p) for p in parts):
            return fnmatch.fnmatchcase(name, sel)  # a glob on the module name
        for part in parts:
            lo, hi = _RANGE.match(part).groups()
            lo = _index(int(lo), count)
            hi = lo if hi is None else _index(int(hi), count)
            if lo <= index <= hi:
                return True
        return False

    def to_dict(self) -> dict:
        d = {"layers": self.layers, "method": self.method, "options": dict(self.options)}
        if self.lora:  # absent when 0: specs and checkpoints written before adapters existed compare equal
            d["lora"] = self.lora
        return d


def _index(i: int, count: int) -> int:
    return i + count if i < 0 else i


def layer_seed(base: int, index: int) -> int:
    """A per-layer seed from the spec's seed: a hash, so neighbouring (base, index) pairs do not collide."""
    digest = hashlib.sha256(f"attnlab-layer-seed:{base}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass
class LayerPlan:
    """What one attention layer runs: its index and module name, the method ("original" = its own) and the
    options the method is built with (per-layer seed filled in)."""

    index: int
    name: str
    method: str
    options: dict
    lora: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.lora:
            d.pop("lora")
        return d


def changes_nothing(plans: list[LayerPlan]) -> bool:
    """Every layer keeps its own attention and gains no adapter: a swap of these plans is the original model."""
    return all(pl.method == ORIGINAL and not pl.lora for pl in plans)


@dataclasses.dataclass
class SwapSpec:
    rules: list[Rule]
    seed: int = 0

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def of(cls, spec, **options) -> "SwapSpec":
        """A method name (+ options), a {selector: method | (method, options)} dict, a JSON dict
        ({"rules": [...], "seed": n}), a list of rules, a SwapSpec, or a path to a JSON file."""
        if isinstance(spec, SwapSpec):
            if options:
                raise AttnlabError("options go into the SwapSpec's rules, not next to it")
            return spec
        if isinstance(spec, (str, Path)) and (str(spec).endswith(".json") or Path(str(spec)).is_file()):
            return cls.from_json(Path(spec))
        if isinstance(spec, str):
            return cls([Rule("*", spec, dict(options))])
        if (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict)
                and not options):  # ("window", {"window": 128}): every layer, as a rule's value reads
            return cls([Rule("*", spec[0], dict(spec[1]))])
        if options:
            raise AttnlabError("keyword options go with a single method name; put them in the rules of a per-layer spec")
        if isinstance(spec, dict) and "rules" in spec:
            return cls.from_dict(spec)
        if isinstance(spec, dict):
            rules = []
            for sel, val in spec.items():
                if isinstance(val, str):
                    rules.append(Rule(str(sel), val, {}))
                elif isinstance(val, (tuple, list)) and len(val) == 2 and isinstance(val[0], str) and isinstance(val[1], dict):
                    rules.append(Rule(str(sel), val[0], dict(val[1])))
                elif isinstance(val, dict) and "method" in val:
                    rules.append(Rule(str(sel), val["method"], dict(val.get("options", {})), val.get("lora", 0)))
                else:
                    raise AttnlabError(f"per-layer spec: {sel!r} -> {val!r}; expected a method name, (method, options) "
                                       "or {'method': ..., 'options': {...}}")
            return cls(rules)
        if isinstance(spec, (list, tuple)) and all(isinstance(r, (Rule, dict)) for r in spec):
            return cls([r if isinstance(r, Rule) else Rule(**r) for r in spec])
        raise AttnlabError(f"cannot read a swap spec from {type(spec).__name__} {spec!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "SwapSpec":
        expected = "expected {'rules': [{'layers', 'method', 'options'}], 'seed': n}"
        if not isinstance(d, dict):
            raise AttnlabError(f"not a swap spec (a JSON {type(d).__name__}); {expected}")
        unknown = sorted(set(d) - {"rules", "seed"})
        if unknown:  # a misspelt key must not quietly become a default ("layer" read as every layer)
            raise AttnlabError(f"swap spec: unknown key {unknown[0]!r}; {expected}")
        if not isinstance(d.get("rules"), list):
            raise AttnlabError(f"not a swap spec ('rules' is {type(d.get('rules')).__name__}, not a list); {expected}")
        keys = "expected layers, method, options, lora"
        for i, r in enumerate(d["rules"], 1):
            if not isinstance(r, dict):
                raise AttnlabError(f"swap spec rule {i}: a JSON {type(r).__name__}, not an object; {keys}")
            bad = sorted(set(r) - {f.name for f in dataclasses.fields(Rule)})
            if bad:
                raise AttnlabError(f"swap spec rule {i}: unknown key {bad[0]!r}; {keys}")
        try:
            rules = [Rule(str(r.get("layers", "*")), r["method"], dict(r.get("options", {})), r.get("lora", 0))
                     for r in d["rules"]]
            seed = int(d.get("seed", 0))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise AttnlabError(f"not a swap spec ({type(e).__name__}: {e}); {expected}") from None
        return cls(rules, seed)

    @classmethod
    def from_json(cls, src) -> "SwapSpec":
        text = Path(src).read_text() if isinstance(src, Path) or (isinstance(src, str) and not src.lstrip().startswith("{")) else src
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise AttnlabError(f"swap spec {src if isinstance(src, Path) else 'text'} is not valid JSON ({e})") from None
        return cls.from_dict(d.get("spec", d) if isinstance(d, dict) else d)

    def to_dict(self) -> dict:
        return {"rules": [r.to_dict() for r in self.rules], "seed": self.seed}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def with_seed(self, seed: int) -> "SwapSpec":
        return dataclasses.replace(self, seed=int(seed))

    # ---- resolution ----------------------------------------------------------------------------------------
    def methods(self) -> list[str]:
        return sorted({r.method for r in self.rules if r.method != ORIGINAL})

    def at_length(self, seq_len: int) -> "SwapSpec":
        """The same spec with each swapped rule's omitted options filled from its method's defaults at `seq_len`
        (`registry.defaults`: a window a quarter of the length, window's 4 sinks, ...), the options given kept. What
        every command that knows its length does, so `--methods window`, `--set window.window=32` and a spec rule
        {"method": "window", "options": {"window": 32}} build the same attention; without a length (`attnlab.swap`
        with a bare name) a method takes its Options' defaults."""
        return dataclasses.replace(self, rules=[
            r if r.method == ORIGINAL else dataclasses.replace(r, options=registry.options_at(r.method, seq_len,
                                                                                               r.options))
            for r in self.rules])

    def with_lora(self, rank: int) -> "SwapSpec":
        """The same spec with low-rank adapters of `rank` on every swapped layer's projections."""
        return dataclasses.replace(self, rules=[r if r.method == ORIGINAL else dataclasses.replace(r, lora=rank)
                                                for r in self.rules])

    def validate(self) -> None:
        """Unknown methods and option names fail here, before any model work (what a model's layers cannot run:
        `adapters.swap.check`)."""
        for r in self.rules:
            check_rank(r.lora)
            if r.lora and r.method == ORIGINAL:
                raise AttnlabError(f"rule {r.layers!r}: lora adapters go on swapped layers, not on ones that keep "
                                   "their own attention")
            if r.method != ORIGINAL:
                if registry.capabilities(r.method).resizes:
                    raise UnsupportedError(
                        f"method {r.method!r} changes the sequence length (its output has ratio * n rows), so it "
                        "cannot replace a model's attention; use it as a layer of its own (attnlab.compress)")
                registry.check_options(r.method, r.options)

    def plan(self, layer_names: list[str]) -> list[LayerPlan]:
        """One LayerPlan per attention layer (in the adapter's order)."""
        self.validate()
        n = len(layer_names)
        out = []
        for i, name in enumerate(layer_names):
            rule = None
            for r in self.rules:
                if r.matches(i, name, n):
                    rule = r
            if rule is None or rule.method == ORIGINAL:
                out.append(LayerPlan(i, name, ORIGINAL, {}))
                continue
            opts = dict(rule.options)
            if "seed" in registry.options(rule.method) and "seed" not in opts:
                opts["seed"] = layer_seed(self.seed, i)
            if "layer" in registry.options(rule.method) and "layer" not in opts:  # per-layer data (global_sparse)
                opts["layer"] = i
            out.append(LayerPlan(i, name, rule.method, opts, rule.lora))
        for r in self.rules:  # a selector that picks no layer is almost always a typo
            if not any(r.matches(i, nm, n) for i, nm in enumerate(layer_names)):
                raise AttnlabError(f"layer selector {r.layers!r} matches none of the model's {n} attention layers"
                                   + (f" (indices 0..{n - 1}, names like {layer_names[0]!r})" if n else ""))
        return out

    def describe(self) -> str:
        parts = []
        for r in self.rules:
            opts = ",".join(f"{k}={v}" for k, v in r.options.items())
            parts.append(f"{r.layers}: {r.method}" + (f"({opts})" if opts else "") + (f" + lora {r.lora}" if r.lora else ""))
        return "; ".join(parts)
