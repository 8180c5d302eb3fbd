"""Compare the runs of two `scripts/refactor_curves.sh` outputs: every steps.csv / epochs.csv column but wall-clock ones, and the
test metrics of results.json. Exit status 0 when all are identical."""

import csv
import json
import sys
from pathlib import Path

WALL_CLOCK = {"images_per_s", "data_wait"}


def rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def main(before: Path, after: Path) -> bool:
    same = True
    for run in sorted(p.name for p in before.iterdir() if (p / "results.json").is_file()):
        for name in ("steps.csv", "epochs.csv"):
            if not (before / run / name).is_file():
                continue
            old, new = rows(before / run / name), rows(after / run / name)
            columns = [c for c in old[0] if c not in WALL_CLOCK]
            equal = len(old) == len(new) and all(a[c] == b.get(c) for a, b in zip(old, new) for c in columns)
            print(f"{run}/{name}: {len(old)} rows x {len(columns)} columns {'identical' if equal else 'DIFFERENT'}")
            same &= equal
        tests = [json.loads((root / run / "results.json").read_text())["test"] for root in (before, after)]
        print(f"{run}/results.json test metrics {'identical' if tests[0] == tests[1] else 'DIFFERENT'}")
        same &= tests[0] == tests[1]
    return same


if __name__ == "__main__":
    sys.exit(0 if main(Path(sys.argv[1]), Path(sys.argv[2])) else 1)
