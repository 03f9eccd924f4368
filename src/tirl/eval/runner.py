"""Evaluation: any task's held-out split, greedy or k samples, with or without tools; resumable.

Trajectories are appended to `<out>/<name>.jsonl` chunk by chunk; problems already there are not
run again after an interruption. The summary (accuracy, tool use, error rates, ...) is written to
`<out>/<name>.summary.json`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tirl.backends.base import SamplingParams
from tirl.config import Config
from tirl.rewards.base import RewardFn
from tirl.rollout.agent import TurnLimits
from tirl.rollout.groups import RolloutSpec, rollout_groups
from tirl.rollout.io import append_jsonl, read_jsonl
from tirl.rollout.metrics import trajectory_metrics
from tirl.tasks.base import Problem


def eval_problems(task, cfg: Config) -> list[Problem]:
    problems = task.heldout()
    return problems[:cfg.eval.size] if cfg.eval.size else problems


def run_eval(name: str, problems: list[Problem], make_env, backend, fmt, reward_fn: RewardFn, limits: TurnLimits,
             cfg: Config, out_dir: Path, chunk: int = 64) -> dict[str, Any]:
    """Evaluate and return the summary (also written next to the trajectories)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path, summary_path = out_dir / f"{name}.jsonl", out_dir / f"{name}.summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    done = {t.meta.task_id for t in read_jsonl(path)} if path.exists() else set()
    todo = [p for p in problems if p.id not in done]
    spec = RolloutSpec(group_size=cfg.eval.samples, sampling=SamplingParams(cfg.eval.temperature),
                       limits=limits, stall_timeout_s=cfg.rollout.stall_timeout_s, check=cfg.rollout.check_invariants)
    per_chunk = max(1, chunk // cfg.eval.samples)
    with asyncio.Runner() as runner:
        for i in range(0, len(todo), per_chunk):
            groups = runner.run(rollout_groups(todo[i:i + per_chunk], make_env, backend, fmt, spec, reward_fn,
                                               step=0, seed=cfg.run.seed))
            append_jsonl(path, [t for g in groups for t in g.trajectories])
    trajs = list(read_jsonl(path))
    summary = {"name": name, "problems": len({t.meta.task_id for t in trajs}), "samples": len(trajs),
               **trajectory_metrics(trajs)}
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary
