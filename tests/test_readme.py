"""README numbers are generated from committed JSON (benchmarks/make_readme_tables.py): this fails when a table in
the README and the JSON it comes from disagree (a table edited by hand, or JSON changed without regenerating)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_match_the_committed_json():
    spec = importlib.util.spec_from_file_location("make_readme_tables", ROOT / "benchmarks" / "make_readme_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (ROOT / "README.md").read_text()
    for (start, end), _ in mod.blocks().items():
        assert start in text and end in text, f"README lost the {start} block"
    assert mod.render(text) == text, "README tables differ from the JSON: run python benchmarks/make_readme_tables.py"
