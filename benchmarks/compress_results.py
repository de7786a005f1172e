"""Merge the H200 `attnlab compress` calls committed under benchmarks/results/compress/h200/raw/ into one table
(compress.json) and one plot (compress.png), each codec row annotated with its run's training recipe (steps, score
bias, latent size, training noise), throughput and peak memory from the run's own result.json.

Each raw/<call>/ holds what one device call of benchmarks/compress_gpu.sh returned: compress.json (`attnlab compress
eval` over its models) and runs.tgz (every run's log, result.json, log.jsonl, config.json).

    python benchmarks/compress_results.py
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results" / "compress" / "h200"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def read_runs(tgz: Path) -> dict[str, dict]:
    runs = {}
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) == 2 and parts[1] in ("result.json", "config.json"):
                runs.setdefault(parts[0], {})[parts[1]] = json.load(tar.extractfile(member))
            elif len(parts) == 2 and parts[1] == "log.jsonl":
                lines = tar.extractfile(member).read().decode().splitlines()
                runs.setdefault(parts[0], {})["evals"] = [
                    {"step": r["step"], **{n: e["token_accuracy"] for n, e in r["eval"].items()}}
                    for r in map(json.loads, lines) if "eval" in r]
    return runs


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    from attnlab.compress.report import plot

    rows, runs, calls = [], [], []
    for call in sorted(p for p in (ROOT / "raw").iterdir() if p.is_dir()):
        res = json.loads((call / "compress.json").read_text())
        info = read_runs(call / "runs.tgz")
        concurrent = len(info)
        calls.append({"call": call.name, "command": res["command"], "commit": res["commit"],
                      "device": res["environment"].get("gpu") or res["environment"].get("device"),
                      "concurrent_runs": concurrent})
        for name, run in sorted(info.items()):
            cfg, result = run["config.json"], run.get("result.json", {})
            runs.append({"call": call.name, "run": name, "ratio": cfg["ratio"], "seed": cfg["seed"],
                         "steps": cfg["steps"], "bias": cfg["bias"], "latent_dim": cfg["latent_dim"],
                         "quant_bits": cfg["quant_bits"], "batch_tokens": cfg["batch_size"] * cfg["max_len"],
                         "parameters": cfg["parameters"], "tokens_per_s": result.get("tokens_per_s"),
                         "peak_mem_bytes": result.get("peak_mem_bytes"), "concurrent_runs": concurrent,
                         "evals": run["evals"]})
        for r in res["rows"]:
            if r["codec"] != "attnlab":
                if not any(x["codec"] == r["codec"] for x in rows):
                    rows.append(r)
                continue
            name = Path(r["model"]).parent.name
            cfg = info[name]["config.json"]
            rows.append({**r, "call": call.name, "run": name, "model": f"{call.name}/{name}", "steps": cfg["steps"],
                         "bias": cfg["bias"], "quant_bits": cfg["quant_bits"], "device": "NVIDIA H200"})
    out = {"command": "python benchmarks/compress_results.py", "calls": calls, "runs": runs, "rows": rows}
    (ROOT / "compress.json").write_text(json.dumps(out, indent=1))
    plot(rows, ROOT / "compress.png")
    print(f"wrote {ROOT / 'compress.json'} ({len(rows)} rows, {len(runs)} runs) and {ROOT / 'compress.png'}")


if __name__ == "__main__":
    main()
