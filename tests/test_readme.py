"""README numbers are generated from committed JSON (benchmarks/make_readme_tables.py): this fails when a table in
the README and the JSON it comes from disagree (a table edited by hand, or JSON changed without regenerating)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    """benchmarks/make_readme_tables.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_readme_tables", ROOT / "benchmarks" / "make_readme_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_tables_match_the_committed_json():
    """The README and docs/speed.md (the record the README's cost section links to) hold every generated block
    once between them, and each block is what the committed JSON gives."""
    mod = _tables()
    texts = {doc.name: doc.read_text() for doc in mod.DOCS}
    assert set(texts) == {"README.md", "speed.md"}
    bodies = mod.blocks()
    for start, end in bodies:
        holders = [name for name, text in texts.items() if start in text and end in text]
        assert len(holders) == 1, f"{start} should be in exactly one of {sorted(texts)}, is in {holders}"
    for name, text in texts.items():
        assert mod.render(text, bodies) == text, f"{name}'s tables differ from the JSON: run python benchmarks/make_readme_tables.py"


def test_model_crossover_counts_a_failed_length_as_a_loss_and_an_original_oom_as_a_win():
    mod = _tables()

    def row(impl, n, ms, status="ok"):
        return {"impl": impl, "seq_len": n, "ms": ms, "status": status}

    base = [row("orig", 1, 1.0), row("orig", 2, 1.0), row("orig", 4, 1.0)]
    assert mod.crossover(base + [row("m", 1, 2.0), row("m", 2, 0.5), row("m", 4, 0.5)], "m", "orig", "ms") == 2
    # faster at 2 but out of memory at 4, where the original ran: no crossover
    assert mod.crossover(base + [row("m", 1, 2.0), row("m", 2, 0.5), row("m", 4, 0, "oom")], "m", "orig", "ms") is None
    # the original out of memory at 4 where the method ran: a win there
    oom = base[:2] + [row("orig", 4, 0, "oom")]
    assert mod.crossover(oom + [row("m", 1, 2.0), row("m", 2, 0.5), row("m", 4, 9.0)], "m", "orig", "ms") == 2
    # slower at the longest: none, whatever happens below
    assert mod.crossover(base + [row("m", 1, 0.5), row("m", 2, 0.5), row("m", 4, 2.0)], "m", "orig", "ms") is None


def test_a_run_whose_peers_were_cut_short_does_not_replace_one_with_every_ratio():
    mod = _tables()

    def run(peer_lengths, stamp):
        rows = {("fwd", False, "m", "attnlab", n): {"status": "ok", "timestamp": stamp} for n in mod.LENGTHS}
        for n in mod.LENGTHS:
            rows[("fwd", False, "m", "peer", n)] = {"status": "ok" if n in peer_lengths else "skipped"}
        return rows

    every, short = run(mod.LENGTHS, "2026-01-01"), run(mod.LENGTHS[:1], "2026-06-01")
    assert mod._pick_run({"old": every, "new": short}, "fwd", False, "m", "attnlab")[0] == "old"
    # peers at as many lengths: the latest
    assert mod._pick_run({"old": every, "new": run(mod.LENGTHS, "2026-06-01")}, "fwd", False, "m", "attnlab")[0] == "new"
    # more of the method's own lengths first, whatever its peers
    fewer = {k: dict(v, status="oom") if k[3] == "attnlab" and k[4] == mod.LENGTHS[-1] else v for k, v in every.items()}
    assert mod._pick_run({"old": fewer, "new": short}, "fwd", False, "m", "attnlab")[0] == "new"


def test_a_later_run_on_another_card_is_listed_under_the_tables_and_an_earlier_one_is_not():
    mod = _tables()

    def run(stamp, ms, device, method="m"):
        rows = {}
        for n in mod.LENGTHS:
            rows[("fwd", True, method, "attnlab", n)] = {"status": "ok", "timestamp": stamp, "ms": ms, "device_name": device}
            rows[("fwd", True, method, "peer", n)] = {"status": "ok", "timestamp": stamp, "ms": 2.0, "device_name": device}
        return rows

    h200 = {"results/a/sweep.json": run("2026-06-01", 3.0, "NVIDIA H200")}
    later = {"results/b/sweep.json": run("2026-07-01", 0.5, "NVIDIA H100 80GB HBM3")}
    notes = mod.other_card_notes(h200, later)
    assert len(notes) == 2 and "**m**" in notes[1] and "H100" in notes[1] and "b/sweep.json" in notes[1]
    assert "fwd causal 0.25 / 0.25 / 0.25" in notes[1]  # that run's own ratio to its peer, never across cards
    assert mod.other_card_notes(h200, {"results/b/sweep.json": run("2026-05-01", 0.5, "H100")}) == []  # older: no note
    assert mod.other_card_notes(h200, {"results/b/sweep.json": run("2026-07-01", 0.5, "H100", "sdpa")}) == []
    alone = mod.other_card_notes({}, later)  # a method with no H200 row at all: listed, and said so
    assert len(alone) == 2 and "has no H200 row" in alone[1]
    # a mode whose best run is another one: each cell names its run
    fwdbwd = {(("fwd+bwd",) + k[1:]): v for k, v in run("2026-07-02", 1.0, "H100").items()}
    two = mod.other_card_notes(h200, {**later, "results/c/sweep.json": fwdbwd})
    assert "fwd causal 0.25 / 0.25 / 0.25 [1]" in two[1] and "fwd+bwd causal 0.50 / 0.50 / 0.50 [2]" in two[1]
    assert "[2] [c/sweep.json]" in two[1]
