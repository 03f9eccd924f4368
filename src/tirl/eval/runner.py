"""Evaluation: any task's held-out split, greedy or k samples, with or without tools; resumable.

Trajectories are appended to `<out>/<name>.jsonl` chunk by chunk; problems already there are not
run again after an interruption (a last line cut short by the interruption is dropped and redone).
The summary (accuracy, tool use, error rates, accuracy per level where problems carry one) is
written to `<out>/<name>.summary.json`.
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
from tirl.rollout.groups import Flat, RolloutContext, RolloutSpec, run_strategy
from tirl.rollout.io import append_jsonl, drop_partial_tail, read_jsonl
from tirl.rollout.metrics import trajectory_metrics
from tirl.tasks.base import Problem


def eval_problems(task, cfg: Config) -> list[Problem]:
    problems = task.heldout()
    return problems[:cfg.eval.size] if cfg.eval.size else problems


def run_eval(name: str, problems: list[Problem], make_env, backend, fmt, reward_fn: RewardFn, limits: TurnLimits,
             cfg: Config, out_dir: Path, chunk: int | None = None) -> dict[str, Any]:
    """Evaluate and return the summary (also written next to the trajectories).

    Problems run `chunk` samples at a time (default: the generation batch size), each chunk appended
    to the JSONL file when it is done.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path, summary_path = out_dir / f"{name}.jsonl", out_dir / f"{name}.summary.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    drop_partial_tail(path)  # a line cut short by a kill is run again, not an error
    done = {t.meta.task_id for t in read_jsonl(path)} if path.exists() else set()
    todo = [p for p in problems if p.id not in done]
    spec = RolloutSpec(group_size=cfg.eval.samples, sampling=SamplingParams(cfg.eval.temperature),
                       limits=limits, stall_timeout_s=cfg.rollout.stall_timeout_s, check=cfg.rollout.check_invariants,
                       max_failed_fraction=cfg.rollout.max_failed_fraction)
    per_chunk = max(1, (chunk or cfg.rollout.max_batch_size) // cfg.eval.samples)
    with asyncio.Runner() as runner:
        for i in range(0, len(todo), per_chunk):
            ctx = RolloutContext(make_env, backend, fmt, spec, reward_fn, step=0, seed=cfg.run.seed, training=False)
            out = runner.run(run_strategy(Flat(), todo[i:i + per_chunk], ctx))
            failed = [t.with_reward(0.0, {}, False) for t in out.failed]  # a failed sample is not correct
            append_jsonl(path, out.trajectories + failed)
    trajs = list(read_jsonl(path))
    summary = {"name": name, "problems": len({t.meta.task_id for t in trajs}), "samples": len(trajs),
               **trajectory_metrics(trajs), **_accuracy_by_level(problems, trajs)}
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def _accuracy_by_level(problems: list[Problem], trajs) -> dict[str, float]:
    """`accuracy/level_<k>` for tasks whose problems carry `info["level"]`."""
    level = {p.id: p.info.get("level") for p in problems}
    by_level: dict[Any, list[bool]] = {}
    for t in trajs:
        if level.get(t.meta.task_id) is not None:
            by_level.setdefault(level[t.meta.task_id], []).append(bool(t.correct))
    return {f"accuracy/level_{k}": sum(v) / len(v) for k, v in sorted(by_level.items())}
