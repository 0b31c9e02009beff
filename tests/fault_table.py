"""Turn the fault report of ``make faults`` (JSON lines) into the README's markdown table.

Usage: ``python tests/fault_table.py REPORT.jsonl`` prints the table: one row per
category of fault or bad input, the trials summed, the outcomes seen.
"""

from __future__ import annotations

import collections
import json
import sys


def table(lines: list[str]) -> str:
    trials: dict[str, int] = collections.Counter()
    outcomes: dict[str, set[str]] = collections.defaultdict(set)
    order: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        cat = row["category"]
        if cat not in trials:
            order.append(cat)
        trials[cat] += int(row["trials"])
        outcomes[cat].add(row["outcome"])
    out = ["| fault or bad input | trials | outcome |", "|---|---|---|"]
    for cat in order:
        out.append(f"| {cat} | {trials[cat]} | {'; '.join(sorted(outcomes[cat]))} |")
    out.append(f"| **total** | **{sum(trials.values())}** | |")
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as fh:
        print(table(fh.readlines()))
