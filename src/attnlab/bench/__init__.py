"""Cost benchmarks: time, peak memory and the SDPA crossover of every method and its peer packages.

    from attnlab.bench import bench_one, run_sweep, crossover
    attnlab bench --methods sdpa,linear --lengths 1024,2048 --device cuda --out results/

Nothing here runs at import; submodules (and matplotlib, tqdm, the peers) load on first use.
"""
__all__ = ["NotInstalled", "Unsupported", "bench_one", "crossover", "dense_flops", "run_sweep"]

_WHERE = {"NotInstalled": "harness", "Unsupported": "harness", "bench_one": "harness", "dense_flops": "harness",
          "crossover": "plot", "run_sweep": "sweep"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
