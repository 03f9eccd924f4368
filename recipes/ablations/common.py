"""What the ablation scripts share: running `tirl` stages, reading evaluations per problem, intervals.

Every stage is a `tirl train` (or `tirl eval`) subprocess writing its own run directory; a stage whose
directory already holds `results.json` is not run again, so an interrupted script continues where it
stopped. Evaluations are read per problem (task id -> its samples), which gives paired bootstrap
intervals of a difference between two arms evaluated on the same held-out problems; with several seeds
the per-seed differences also get a t interval.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tirl.rollout.io import read_jsonl
from tirl.types import Trajectory

Problems = dict[str, list[Trajectory]]
"""task id -> the trajectories sampled for it in one evaluation."""
Stat = Callable[[list[list[Trajectory]]], float]
"""A number from a list of problems (each: its samples)."""

T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
"""Student t quantile 0.975 by degrees of freedom (seeds - 1)."""


def train(run_dir: Path, overrides: Sequence[str], recipe: Path | None = None) -> Path:
    """`tirl train [recipe] run.dir=<run_dir> <overrides>` unless it finished before; returns run_dir."""
    if not (run_dir / "results.json").exists():
        cmd = [sys.executable, "-m", "tirl.cli", "train", *([str(recipe)] if recipe else []), f"run.dir={run_dir}",
               *overrides]
        print("+ tirl", " ".join(cmd[3:]), flush=True)
        if subprocess.run(cmd).returncode:
            sys.exit(f"stage {run_dir} failed (its output is above); fix it and re-run: finished stages are kept")
    return run_dir


def evaluate(run_dir: Path, model: Path, overrides: Sequence[str], recipe: Path | None = None) -> Path:
    """Evaluation only (`pipeline.sft=false pipeline.rl=false`) of `model`; its samples land in
    `run_dir/eval/eval.jsonl`."""
    return train(run_dir, [*overrides, f"model.name={model}", "pipeline.sft=false", "pipeline.rl=false",
                           "pipeline.eval_before=true"], recipe)


def problems(path: Path) -> Problems:
    out: Problems = {}
    for t in read_jsonl(path):
        out.setdefault(t.meta.task_id, []).append(t)
    return out


def flat(rows: list[list[Trajectory]]) -> list[Trajectory]:
    return [t for samples in rows for t in samples]


def accuracy(rows: list[list[Trajectory]]) -> float:
    ts = flat(rows)
    return sum(bool(t.correct) for t in ts) / len(ts)


def tool_calls(rows: list[list[Trajectory]]) -> float:
    """Mean tool calls per sample."""
    ts = flat(rows)
    return sum(len(t.tool_results) for t in ts) / len(ts)


def sampled_tokens(rows: list[list[Trajectory]]) -> float:
    """Mean tokens the model generated per sample (all turns; tool output not counted)."""
    ts = flat(rows)
    return sum(t.num_sampled_tokens for t in ts) / len(ts)


def paired_bootstrap(a: Problems, b: Problems, stat: Stat, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of stat(b) - stat(a), resampling the problems both arms were evaluated on (together)."""
    ids = sorted(set(a) & set(b))
    if len(ids) != len(a) or len(ids) != len(b):
        raise ValueError(f"the arms were evaluated on different problems ({len(a)} and {len(b)}, {len(ids)} shared)")
    rng, diffs = random.Random(seed), []
    for _ in range(draws):
        pick = [rng.choice(ids) for _ in ids]
        diffs.append(stat([b[i] for i in pick]) - stat([a[i] for i in pick]))
    diffs.sort()
    return diffs[int(0.025 * draws)], diffs[int(0.975 * draws) - 1]


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval over seeds (the interval is nan for one seed)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan, math.nan
    half = T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def show_table(title: str, rows: dict[str, dict[str, float]], columns: dict[str, str]) -> None:
    """One line per arm; `columns` maps a key of the rows to its header."""
    print(f"\n{title}\n{'':14}" + "".join(f"{h:>16}" for h in columns.values()))
    for name, row in rows.items():
        print(f"{name:14}" + "".join(f"{row[k]:16.3f}" for k in columns))


def across_seeds(per_seed: dict[int, dict[str, float]], keys: Sequence[str]) -> dict[str, list[float]]:
    """{key: [mean, lo, hi]} over the seeds' values of each key (per_seed: seed -> {key: value})."""
    return {k: list(mean_ci([row[k] for row in per_seed.values()])) for k in keys}


def show_seeds(title: str, summary: dict[str, list[float]]) -> None:
    print(f"\n{title}")
    for key, (m, lo, hi) in summary.items():
        interval = f"  (95% CI over seeds {lo:+.3f} .. {hi:+.3f})" if not math.isnan(lo) else ""
        print(f"  {key:40} {m:+.3f}{interval}")


def write_summary(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nsummary: {out / 'summary.json'}")


def finish(out: Path, summary: dict, per_seed: dict[int, dict[str, float]]) -> int:
    """Mean and t interval over seeds of every per-seed difference, printed and added to `summary`, which is
    written to `out/summary.json`; the script's exit code."""
    summary["across_seeds"] = across_seeds(per_seed, list(next(iter(per_seed.values()))))
    show_seeds(f"over {len(per_seed)} seed(s)", summary["across_seeds"])
    write_summary(out, summary)
    return 0
