"""One JSON line for a finished run: its settings, validation per epoch, last-epoch test.

python benchmarks/defaults/summarize.py RUN_DIR --name NAME --seconds S --sets "k=v ..."
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--sets", default="")
    args = parser.parse_args()
    with (args.run / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    val = {k: [float(r[k]) for r in rows if r.get(k)] for k in rows[-1] if k.startswith("val_")}
    test = json.loads((args.run / "test_last.json").read_text())
    record = {
        "name": args.name,
        "sets": args.sets.split(),
        "seconds": args.seconds,
        "epochs": len(rows),
        "val": val,  # per epoch
        "test_last": test["test"],
        "settings": test.get("settings"),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
