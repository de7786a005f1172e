"""One-off (2026-12-05): after `tune_window.py --modes fwd+bwd`, the fastest backward setting at the longest length
(causal and not); if it is a register cap and beats CONFIG["bwd"] by 3% in both, `gpu_checks.py window@triton
--quick` with it installed.

    python benchmarks/results/window/h200_bwd_caps/bwd_caps_check.py OUT/tune_window.json
"""
import json
import runpy
import sys

from attnlab.ops import window_triton

if len(sys.argv) != 2:
    sys.exit("usage: python benchmarks/results/window/h200_bwd_caps/bwd_caps_check.py OUT/tune_window.json")
try:
    rows = [r for r in json.load(open(sys.argv[1])) if r.get("ms") and r.get("config") and r["mode"] == "fwd+bwd"]
except (OSError, ValueError, KeyError, TypeError) as e:
    sys.exit(f"error: {sys.argv[1]}: not a tune_window.json ({type(e).__name__}: {e})")
if not rows:
    sys.exit(f"error: {sys.argv[1]}: no timed fwd+bwd rows with a config (run tune_window.py --modes fwd+bwd)")
t = max(r["seq_len"] for r in rows)
base = {k: window_triton.CONFIG[k] for k in ("dkdv", "dq", "bwd")}
best = {}
for causal in (True, False):
    mine = {json.dumps({k: r["config"][k] for k in base}, sort_keys=True): r["ms"]
            for r in rows if r["seq_len"] == t and r["causal"] == causal}
    ref = mine[json.dumps(base, sort_keys=True)]
    for k, ms in sorted(mine.items(), key=lambda kv: kv[1]):
        print(f"T={t} causal={causal} bwd {k}: {ms:.3f} ms ({ms / ref - 1:+.1%} vs CONFIG)")
    best[causal] = {k: ms / ref for k, ms in mine.items()}
caps = [k for k in best[True] if "maxnreg" in k and best[True][k] < 0.97 and best[False][k] < 0.97]
if not caps:
    sys.exit(print("no cap beats CONFIG['bwd'] by 3% causal and not: no check run") or 0)
cap = min(caps, key=lambda k: best[True][k] + best[False][k])
print("checking with CONFIG's", cap, flush=True)
window_triton.CONFIG.update(json.loads(cap))
sys.argv = ["gpu_checks.py", "window@triton", "--quick"]
runpy.run_path("benchmarks/gpu_checks.py", run_name="__main__")
