"""Prepare at scale (issue 20): synthetic check-ins, then `nextlocmoe prepare` timed with its peak memory.

    python scripts/scale_bench.py --rows 1e6 4e6 16e6 --out scale-out/bench.json
    python scripts/scale_bench.py --rows 1e6 --locations 1e6 --memory-gb 2 --keep

Synthetic data: ``--locations`` L venues around one city (New York; normal scatter, ~5 km), venue
popularity Zipf (rank^-``--zipf``), users = rows / ``--rows-per-user`` drawn uniformly, unix-second times
uniform over one year; written as plain CSV ``user,venue,time,lat,lon`` by pyarrow, in 1M-row chunks.
Each prepare runs as a child process (``nice``); wall time and its peak resident memory go into the
JSON, one row per size, and into a plot beside it (wall time per row and peak RSS against rows). Peak
RSS is sampled over the whole process tree (the prepare's parse workers included). ``--command`` swaps
in another prepare command (e.g. an older checkout's) with ``{src}``/``{out}``/``{mem}`` placeholders.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CITY = (40.7306, -73.9866)  # New York
PREPARE = (
    f"{sys.executable} -m nextlocmoe.cli prepare --dataset csv --source {{src}} --out {{out}} "
    "--time-col time --lat-col lat --lon-col lon --memory-gb {mem}"
)


def generate(
    path: Path, rows: int, locations: int, rows_per_user: int, zipf: float, seed: int, cover: bool = False
) -> None:
    """Write ``rows`` synthetic check-ins to ``path`` (CSV), 1M rows at a time. ``cover``: the first
    ``locations`` rows visit every venue once (in random order), so all L venues are known places of the
    store (Zipf alone leaves most of a 1M-venue tail unvisited at a few million rows)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    rng = np.random.default_rng(seed)
    lat = CITY[0] + rng.normal(0, 0.045, locations)
    lon = CITY[1] + rng.normal(0, 0.06, locations)
    p = 1.0 / np.arange(1, locations + 1) ** zipf
    cdf = np.cumsum(p / p.sum())
    users = max(rows // rows_per_user, 1)
    order = rng.permutation(locations) if cover else None
    t0 = 1_333_000_000  # 2012-03-29
    tmp = path.with_suffix(".partial")
    schema = pa.schema([("user", pa.int64()), ("venue", pa.int64()), ("time", pa.int64())]
                       + [("lat", pa.float64()), ("lon", pa.float64())])  # fmt: skip
    with pcsv.CSVWriter(str(tmp), schema) as w:
        for start in range(0, rows, 1_000_000):
            n = min(1_000_000, rows - start)
            venue = np.minimum(np.searchsorted(cdf, rng.random(n)), locations - 1)
            if cover and start < locations:
                first = min(n, locations - start)
                venue[:first] = order[start : start + first]
            cols = {
                "user": rng.integers(0, users, n),
                "venue": venue,
                "time": t0 + rng.integers(0, 365 * 86400, n),
                "lat": np.round(lat[venue], 6),
                "lon": np.round(lon[venue], 6),
            }
            w.write_table(pa.table(cols))
    tmp.rename(path)


def tree_rss_bytes(root: int) -> int:
    """Resident bytes of process ``root`` and all its descendants (from /proc)."""
    parent, rss = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            rss[int(d.name)] = int((d / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(rss.get(p, 0) for p in tree)


def measure(cmd: str) -> dict:
    """Run ``cmd`` (niced) as a child: wall time, CPU seconds (user + system, its worker processes
    included: the figure that does not depend on what else the machine runs), peak resident memory of its
    whole process tree (sampled every 0.2 s) and of its largest single process (getrusage), exit status."""
    t = time.perf_counter()
    proc = subprocess.Popen(["nice", "-n", "10"] + shlex.split(cmd), cwd=ROOT)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    done.set()
    sampler.join()
    return {"wall_s": round(wall, 2), "peak_rss_gb": round(peak[0] / 1e9, 3),
            "max_single_process_rss_gb": round(usage.ru_maxrss / 1e6, 3),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "rc": os.waitstatus_to_exitcode(status)}  # fmt: skip


def du_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 1)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["rc"] == 0]
    rows = [r["rows"] for r in ok]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.semilogx(rows, [r["us_per_row"] for r in ok], "o-", label="wall")
    if all("cpu_us_per_row" in r for r in ok):
        a.semilogx(rows, [r["cpu_us_per_row"] for r in ok], "s--", label="CPU (all processes)")
    a.set_xlabel("rows")
    a.set_ylabel("prepare time per row (us)")
    a.legend()
    a.set_ylim(bottom=0)
    b.semilogx(rows, [r["peak_rss_gb"] for r in ok], "o-", label="peak RSS")
    b.axhline(ok[0]["memory_gb"] if ok else 0, color="grey", ls="--", label="--memory-gb")
    b.set_xlabel("rows")
    b.set_ylabel("GB")
    b.set_ylim(bottom=0)
    b.legend()
    fig.suptitle("nextlocmoe prepare, synthetic check-ins (shared 2-core box)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=float, nargs="+", default=[1e6, 4e6, 16e6], help="sizes to measure")
    ap.add_argument("--locations", type=int, default=100_000, help="L venues (default 100k)")
    ap.add_argument("--rows-per-user", type=int, default=200, help="users = rows / this (default 200)")
    ap.add_argument("--zipf", type=float, default=1.1, help="venue popularity exponent (default 1.1)")
    ap.add_argument("--memory-gb", type=float, default=3.0, help="prepare --memory-gb (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--work", type=Path, default=ROOT / "scale-out", help="data and stores (default scale-out/)"
    )
    ap.add_argument("--out", type=Path, default=None, help="JSON (default WORK/bench.json; plot beside it)")
    ap.add_argument(
        "--command", default=PREPARE, help="prepare command with {src} {out} {mem} (default ours)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the CSVs and stores")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out or args.work / "bench.json"
    results = []
    for r in [int(x) for x in args.rows]:
        src = args.work / f"checkins_{r}_L{args.locations}.csv"
        if not src.exists():
            t = time.perf_counter()
            generate(src, r, args.locations, args.rows_per_user, args.zipf, args.seed)
            print(f"generated {r} rows in {time.perf_counter() - t:.1f} s: {src}", flush=True)
        store = args.work / f"store_{r}"
        cmd = args.command.format(src=src, out=store, mem=args.memory_gb)
        res = {"rows": r, "locations": args.locations, "memory_gb": args.memory_gb, "command": cmd}
        res |= measure(cmd)
        res["us_per_row"] = round(res["wall_s"] / r * 1e6, 3)
        res["cpu_us_per_row"] = round(res["cpu_s"] / r * 1e6, 3)
        res["store_mb"] = du_mb(store) if store.exists() else None
        res["csv_mb"] = round(src.stat().st_size / 1e6, 1)
        results.append(res)
        print(json.dumps(res), flush=True)
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
            src.unlink()
        out.write_text(json.dumps({"machine": "shared 2-core box", "results": results}, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
