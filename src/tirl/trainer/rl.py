"""The RL loop: rollout -> reward -> advantage -> loss -> optimizer step -> weights to the backend.

Orchestration only: rollouts come from `tirl.rollout`, the math from `tirl.algorithms` (through
`update.py`), persistence from `stage.py`. A step is a pure function of (weights, step index, data
cursor, seed), so a run killed at any point and resumed from its last checkpoint retraces the
uninterrupted run step for step.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import replace
from pathlib import Path

from tirl.backends.base import SamplingParams
from tirl.config import Config
from tirl.models import loading
from tirl.rewards.base import RewardFn
from tirl.rollout.groups import RewardState, RolloutContext, RolloutSpec, StrategyOutput
from tirl.rollout.step import build_strategy, rollout_step
from tirl.rollout.io import append_jsonl
from tirl.rollout.metrics import trajectory_metrics
from tirl.tasks.base import Problem, Task
from tirl.tools import ToolSet
from tirl.trainer.build import EnvFactory, Policy, load_policy, make_backend, turn_limits
from tirl.trainer.logging import MetricsLogger
from tirl.trainer.stage import TrainingStage
from tirl.trainer.update import UpdateSettings, advantages_for, rl_update


def rollout_spec(cfg: Config, policy: Policy) -> RolloutSpec:
    r = cfg.rollout
    return RolloutSpec(group_size=r.group_size, sampling=SamplingParams(r.temperature, r.top_p),
                       limits=turn_limits(cfg, policy.model), stall_timeout_s=r.stall_timeout_s,
                       check=r.check_invariants, max_failed_fraction=r.max_failed_fraction)


def update_settings(cfg: Config, policy: Policy) -> UpdateSettings:
    a = cfg.algorithm
    return UpdateSettings(
        advantage=a.advantage, advantage_kwargs=dict(a.advantage_kwargs), loss=a.loss, loss_kwargs=dict(a.loss_kwargs),
        aggregation=a.aggregation, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef,
        epochs=a.epochs, minibatches=a.minibatches,
        micro_batch_size=cfg.rl.micro_batch_size or cfg.rollout.group_size, max_grad_norm=cfg.rl.optim.max_grad_norm,
        temperature=cfg.rollout.temperature or 1.0, compute_dtype=policy.compute_dtype)


def run_rl(cfg: Config, policy: Policy, task: Task, tools: ToolSet, reward_fn: RewardFn, run_dir: Path,
           logger: MetricsLogger) -> Path:
    """Train for `cfg.rl.steps` steps (resuming if checkpoints exist); returns the final model directory."""
    stage = TrainingStage("rl", run_dir, policy, cfg.rl.optim, cfg.rl.steps, cfg.rl.save_every,
                          cfg.rl.keep_checkpoints, logger)
    state = stage.resume()
    traj_dir = run_dir / "trajectories" / "rl"
    _drop_after(traj_dir, state["step"])
    backend = make_backend(policy, cfg)
    ref = load_policy(cfg.model, policy.device, policy.path, trainable=False).model if cfg.algorithm.kl_coef else None
    make_env = EnvFactory(task, tools, cfg, policy.fmt)
    spec, settings = rollout_spec(cfg, policy), update_settings(cfg, policy)
    strategy = build_strategy(cfg)
    strategy.load_state_dict(state.get("strategy", {}))
    data = _Cursor(task, state.get("cursor", 0))
    reward_state = RewardState(state.get("reward_state", {}))
    with asyncio.Runner() as runner:
        for step in range(state["step"], cfg.rl.steps):
            t0 = time.monotonic()
            snapshot = backend.metrics_snapshot()
            ctx = RolloutContext(make_env, backend, policy.fmt, _with_deadline(spec, cfg.rollout.step_timeout_s),
                                 reward_fn, step, cfg.run.seed, reward_state)
            out = runner.run(rollout_step(strategy, data.take, cfg.rollout.prompts_per_step, ctx,
                                          cfg.rollout.dynamic_sampling))
            t1 = time.monotonic()
            metrics = (rl_update(policy.model, stage.optimizer, advantages_for(out.groups, settings), settings, ref)
                       if out.groups else {"train/skipped": 1.0})
            backend.update_weights(loading.merged_state_dict(policy.model))
            t2 = time.monotonic()
            metrics.update(trajectory_metrics(out.trajectories))
            metrics.update(out.metrics)
            gen = backend.metrics_since(snapshot)
            metrics.update(gen)
            metrics.update({"time/rollout_s": t1 - t0, "time/update_s": t2 - t1,
                            "speed/tokens_per_s": gen.get("gen/tokens", 0.0) / (t1 - t0)})
            if cfg.rl.save_trajectories:
                _save(traj_dir, step, out)
            stage.step_done(step + 1, metrics, {"cursor": data.cursor, "reward_state": reward_state.data,
                                                "strategy": strategy.state_dict()})
    backend.close()
    return stage.finish(run_dir / "models" / "final")


class _Cursor:
    """The training stream's position: `take(n)` hands out the next n problems."""

    def __init__(self, task: Task, cursor: int):
        self.task, self.cursor = task, cursor

    def take(self, n: int) -> list[Problem]:
        problems = [self.task.train_problem(self.cursor + i) for i in range(n)]
        self.cursor += n
        return problems


def _with_deadline(spec: RolloutSpec, step_timeout_s: float | None) -> RolloutSpec:
    if step_timeout_s is None:
        return spec
    return replace(spec, limits=replace(spec.limits, deadline=time.monotonic() + step_timeout_s))


def _save(traj_dir: Path, step: int, out: StrategyOutput) -> None:
    """Every trajectory of the step: those trained on in `step_N.jsonl`; filtered groups, then failures
    (with their errors) in `step_N.untrained.jsonl`."""
    append_jsonl(traj_dir / f"step_{step + 1:06d}.jsonl", out.trajectories)
    rest = [t for g in out.dropped for t in g.trajectories] + out.failed
    if rest:
        append_jsonl(traj_dir / f"step_{step + 1:06d}.untrained.jsonl", rest)


def _drop_after(traj_dir: Path, step: int) -> None:
    """Trajectory files of steps a resumed run will redo."""
    if traj_dir.exists():
        for f in traj_dir.glob("step_*.jsonl"):
            if int(f.name[len("step_"):].split(".")[0]) > step:
                f.unlink()


def remove_run_artifacts(run_dir: Path) -> None:
    shutil.rmtree(run_dir / "trajectories", ignore_errors=True)
