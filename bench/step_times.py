"""Median RL step time of finished runs, split into rollout and update, from their metrics.jsonl.

    python bench/step_times.py RUN_A/metrics.jsonl RUN_B/metrics.jsonl ...

The first RL step is left out (warm-up: kernel selection, allocator growth). Prints one row per
run and, with several runs, each run's step time as a ratio of the first's.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

KEYS = ("time/step_s", "time/rollout_s", "time/update_s", "speed/tokens_per_s", "gen/tokens")


def rl_rows(path: Path) -> list[dict]:
    """The RL stage's metric rows, in step order (a missing file or stage: an empty list)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((r for r in rows if r.get("stage") == "rl" and "time/step_s" in r), key=lambda r: r["step"])


def summary(rows: list[dict]) -> dict[str, float]:
    """Medians of KEYS over the steps after the first."""
    steady = rows[1:] or rows
    return {k: statistics.median(r[k] for r in steady if k in r) for k in KEYS if any(k in r for r in steady)}


def main(paths: list[str]) -> int:
    first = None
    print(f"{'run':<40} {'steps':>5} {'step s':>8} {'rollout s':>10} {'update s':>9} {'tok/s':>8} {'ratio':>6}")
    for p in paths:
        rows = rl_rows(Path(p))
        if not rows:
            print(f"{p:<40} no RL steps recorded")
            continue
        s = summary(rows)
        first = first or s["time/step_s"]
        print(f"{p:<40} {len(rows):>5} {s['time/step_s']:>8.2f} {s.get('time/rollout_s', float('nan')):>10.2f} "
              f"{s.get('time/update_s', float('nan')):>9.2f} {s.get('speed/tokens_per_s', float('nan')):>8.1f} "
              f"{s['time/step_s'] / first:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
