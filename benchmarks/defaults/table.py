"""The table of benchmarks/defaults.md from results.jsonl: per benchmark and setting, the
validation score at the last epoch and the test score of last.pt, per seed.

    python benchmarks/defaults/table.py benchmarks/defaults/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

MAIN = {  # benchmark -> (validation column, test metric path, what it is)
    "bags": ("val_lesion/auc", ("lesion", "auc"), "AUC"),
    "mnist": ("val_majority/accuracy", ("majority", "accuracy"), "majority accuracy"),
    "cohort": ("val_lesion/auc", ("lesion", "auc"), "AUC"),
    "needles": ("val_needle/auc", ("needle", "auc"), "AUC"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for line in args.results.read_text().splitlines():
        record = json.loads(line)
        benchmark = record["name"].split("_")[0]
        setting = ", ".join(s for s in record["sets"] if not s.startswith("train.seed")) or "—"
        groups[benchmark, setting].append(record)
    print(
        "| benchmark | setting | seeds | val at last epoch | test (last.pt) | epochs to 90 % "
        "of the best val | seconds per run |"
    )
    print("|---|---|--:|---|---|---|--:|")
    for (benchmark, setting), records in groups.items():
        column, (task, metric), _ = MAIN[benchmark]
        vals = [r["val"][column][-1] for r in records]
        tests = [r["test_last"][task][metric] for r in records]
        reach = []
        for r in records:
            curve = r["val"][column]
            target = 0.9 * max(curve)
            reach.append(next(i + 1 for i, v in enumerate(curve) if v >= target))
        seconds = sum(r["seconds"] for r in records) / len(records)
        seed = [re.sub("train.seed=", "", s) for r in records for s in r["sets"] if "seed" in s]
        print(
            f"| {benchmark} | {setting} | {', '.join(seed) or '0'} | "
            f"{' / '.join(f'{v:.3f}' for v in vals)} | {' / '.join(f'{t:.3f}' for t in tests)} | "
            f"{' / '.join(map(str, reach))} | {seconds:.0f} |"
        )


if __name__ == "__main__":
    main()
