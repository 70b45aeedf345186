"""Print eval.json files (model + every baseline, same samples) as Markdown tables.

python scripts/eval_table.py EVAL_JSON [...]
"""

from __future__ import annotations

import json
import sys

KEYS = ("hit@1", "hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "mrr")


def rows(report: dict) -> list[str]:
    head = f"n = {report['n']} ({report.get('dataset')}, split {report['split']}"
    head += f", ranking {report.get('ranking')})"
    out = [head, "| | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 1) + "|"]  # fmt: skip
    out.append("| **model** | " + " | ".join(f"{report[k]:.4f}" for k in KEYS) + " |")
    for name, m in report.get("baselines", {}).items():
        out.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in KEYS) + " |")
    best = {k: max(m[k] for m in report.get("baselines", {}).values()) for k in KEYS}
    out.append("model above every baseline at: " + ", ".join(k for k in KEYS if report[k] > best[k]))
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print("\n".join(rows(json.load(open(path)))))
