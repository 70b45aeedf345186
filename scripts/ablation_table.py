"""Print the QT-Mob ablation table from scripts/ablation_qtmob.sh's eval JSONs (markdown).

python scripts/ablation_table.py ablation-out fsq-nyc llmmob-fsq-nyc
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = ("hit@1", "hit@5", "hit@10", "ndcg@5", "ndcg@10", "mrr")


def _row(name: str, m: dict) -> str:
    return f"| {name} | {m['n']} | " + " | ".join(f"{m[k]:.4f}" for k in KEYS) + " |"


def table(out: Path, dataset: str) -> list[str]:
    lines = [f"### {dataset}", "", "| model / ranking | n | " + " | ".join(KEYS) + " |",
             "|---" * (len(KEYS) + 2) + "|"]  # fmt: skip
    for task in ("next", "recovery"):
        lines.append(f"| **{task}** |" + " |" * (len(KEYS) + 1))
        base = None
        for variant in ("coord", "tokens", "codes", "recovery"):
            path = out / dataset / variant / f"eval_{task}.json"
            if not path.is_file():
                continue
            rep = json.loads(path.read_text())
            base = rep["baselines"]
            for ranking, m in rep["rankings"].items():
                lines.append(_row(f"{variant} run, {ranking} ranking", m))
        for name, m in (base or {}).items():
            lines.append(_row(f"baseline {name}", m))
    return lines + [""]


def main() -> None:
    out = Path(sys.argv[1])
    for ds in sys.argv[2:]:
        print("\n".join(table(out, ds)))


if __name__ == "__main__":
    main()
