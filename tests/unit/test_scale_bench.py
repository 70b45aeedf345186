"""scripts/scale_bench.py on a tiny size: synthetic CSV, a measured prepare, the JSON and the plot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scale_bench_tiny(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "scripts" / "scale_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--rows", "3000", "--locations", "300", "--rows-per-user", "50", "--work", str(tmp_path)]
    argv.append("--keep")
    assert bench.main(argv) == 0
    res = json.loads((tmp_path / "bench.json").read_text())["results"][0]
    assert res["rows"] == 3000 and res["rc"] == 0 and res["peak_rss_gb"] > 0 and res["cpu_s"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0
    m = json.loads((tmp_path / "store_3000" / "manifest.json").read_text())
    assert m["input_rows"] == 3000 and m["users"] == 60
    assert m["kept_rows"] + sum(m["dropped"].values()) == 3000
