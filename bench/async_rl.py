"""Synchronous vs asynchronous RL steps (`rl.max_staleness`), side by side, on the default recipe.

    python bench/async_rl.py [--steps 5] [--staleness 1] [key=value ...]

First the default SFT cold start (`tirl sft`, not timed; `--no-sft` skips it), so that the RL updates
have rewards to learn from (from the raw model every reward is 0 and the update has nothing to do).
Then `tirl train` twice from that model in fresh directories, RL only (no evaluations), with the same
seed and settings: once synchronous (`rl.max_staleness=0`), once asynchronous (`rl.max_staleness=K`).
Prints for each the median step time after the first step, split into the rollout, the trainer's wait
for its batch, and the update, with the mean reward; then the asynchronous step time as a ratio of the
synchronous one. Extra `key=value` arguments go to every run (e.g. `backend.name=...`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEYS = ("time/step_s", "time/rollout_s", "time/wait_s", "time/update_s", "reward/mean")


def cold_start(extra: list[str], root: Path) -> str:
    """`tirl sft` with its defaults; the trained model's directory."""
    run_dir = root / "sft"
    done = subprocess.run([sys.executable, "-m", "tirl.cli", "sft", f"run.dir={run_dir}", "run.tensorboard=false",
                           *extra], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"tirl sft failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return str(run_dir / "models" / "sft")


def run(staleness: int, steps: int, extra: list[str], root: Path) -> tuple[list[dict], float]:
    """One `tirl train` with `rl.max_staleness=staleness`: its RL metric rows and its wall time."""
    cwd = root / f"staleness{staleness}"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "tirl.cli", "train", "pipeline.eval_before=false", "pipeline.sft=false",
           "pipeline.eval_after_sft=false", "pipeline.eval_after=false", f"rl.steps={steps}", f"rl.save_every={steps}",
           "run.tensorboard=false", f"rl.max_staleness={staleness}", *extra]
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (cwd / "runs" / "default" / "metrics.jsonl").read_text().splitlines()]
    return sorted((r for r in rows if r.get("stage") == "rl"), key=lambda r: r["step"]), wall


def medians(rows: list[dict]) -> dict[str, float]:
    steady = rows[1:] or rows
    return {k: statistics.median(r.get(k, 0.0) for r in steady) for k in KEYS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--staleness", type=int, default=1)
    parser.add_argument("--no-sft", dest="sft", action="store_false", help="start RL from the raw model")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="tirl-bench-async-") as tmp:
        start = [f"model.name={cold_start(extra, Path(tmp))}"] if args.sft else []
        results = {k: run(k, args.steps, [*extra, *start], Path(tmp)) for k in (0, args.staleness)}
    print(f"{'mode':<14} {'step s':>8} {'rollout s':>10} {'wait s':>8} {'update s':>9} {'reward':>7} {'run s':>7}")
    for k, (rows, wall) in results.items():
        m = medians(rows)
        name = "sync" if k == 0 else f"async k={k}"
        print(f"{name:<14} {m['time/step_s']:>8.2f} {m['time/rollout_s']:>10.2f} {m['time/wait_s']:>8.2f} "
              f"{m['time/update_s']:>9.2f} {statistics.mean(r.get('reward/mean', 0.0) for r in rows):>7.3f} "
              f"{wall:>7.1f}")
    sync, asyn = (medians(results[k][0])["time/step_s"] for k in (0, args.staleness))
    print(f"async / sync step time: {asyn / sync:.2f}  (median over steps 2..{args.steps}; "
          f"{sync / asyn:.2f}x steps per second)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
