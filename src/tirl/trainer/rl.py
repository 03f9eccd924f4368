"""The RL loop: rollout -> reward -> advantage -> loss -> optimizer step -> weights to the backend.

Orchestration only: rollouts come from `tirl.rollout`, the math from `tirl.algorithms` (through
`update.py`), persistence from `stage.py`. Optional parts: a critic's value head (`critic.py`; trained
in the stage's optimizer with its own learning rate, kept in checkpoints and saved next to the final
model as `final.value_head.safetensors`), the KL reference policy (`reference.py`), and the SPEAR
replay buffer (`replay.py`, kept in checkpoints). A step is a pure function of (weights, step index,
data cursor, seed, buffer), so a run killed at any point and resumed from its last checkpoint retraces
the uninterrupted run step for step.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tirl.backends.base import SamplingParams
from tirl.config import Config
from tirl.rewards.base import RewardFn
from tirl.rollout.groups import RewardState, RolloutContext, RolloutSpec, StrategyOutput
from tirl.rollout.step import build_strategy, rollout_step
from tirl.rollout.io import append_jsonl
from tirl.rollout.metrics import trajectory_metrics
from tirl.tasks.base import Problem, Task
from tirl.tools import ToolSet
from tirl.errors import ResumeError
from tirl.models.loading import merged_state_dict
from tirl.trainer.async_rl import RolloutPipeline, produced_from_state, produced_to_state, with_behaviour_correction
from tirl.trainer.build import EnvFactory, Policy, build_reference, critic_enabled, make_backend, turn_limits
from tirl.trainer import distributed
from tirl.trainer.critic import ValueHead, attach_to_stage, make_value_head, save_value_head
from tirl.trainer.info_gain import with_information_gain
from tirl.trainer.logging import MetricsLogger
from tirl.trainer.reference import Reference
from tirl.trainer.replay import ReplayBuffer, replay_weight
from tirl.trainer.stage import TrainingStage
from tirl.trainer.update import UpdateSettings, advantages_for, rl_update, with_old_logprobs


def rollout_spec(cfg: Config, policy: Policy) -> RolloutSpec:
    r = cfg.rollout
    return RolloutSpec(group_size=r.group_size, sampling=SamplingParams(r.temperature, r.top_p),
                       limits=turn_limits(cfg, policy.model), stall_timeout_s=r.stall_timeout_s,
                       check=r.check_invariants, max_failed_fraction=r.max_failed_fraction)


def update_settings(cfg: Config, policy: Policy) -> UpdateSettings:
    a = cfg.algorithm
    return UpdateSettings(
        advantage=a.advantage, advantage_kwargs=dict(a.advantage_kwargs), loss=a.loss, loss_kwargs=dict(a.loss_kwargs),
        aggregation=a.aggregation, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, kl_placement=a.kl_placement,
        entropy_coef=a.entropy_coef, epochs=a.epochs, minibatches=a.minibatches,
        micro_batch_size=cfg.rl.micro_batch_size or cfg.rollout.group_size, max_grad_norm=cfg.rl.optim.max_grad_norm,
        temperature=cfg.rollout.temperature or 1.0, compute_dtype=policy.compute_dtype,
        critic_coef=a.critic.coef, critic_clip=a.critic.clip, world=distributed.world())


@dataclass
class Learner:
    """The policy with what trains alongside it."""

    policy: Policy
    stage: TrainingStage
    critic: ValueHead | None
    reference: Reference | None
    replay: ReplayBuffer | None


def make_learner(cfg: Config, policy: Policy, stage: TrainingStage) -> Learner:
    """The critic's value head and the replay buffer attached to `stage` (call before `stage.resume()`),
    and the KL reference."""
    critic = None
    if critic_enabled(cfg):
        critic = make_value_head(policy.model)
        attach_to_stage(critic, stage, cfg.algorithm.critic.lr or 5 * cfg.rl.optim.lr, cfg.rl.optim, cfg.rl.steps)
    replay = None
    if cfg.algorithm.replay.enabled:
        r = cfg.algorithm.replay
        replay = ReplayBuffer(r.size, r.threshold, r.tolerate_steps, r.reward_window)
        stage.ckpt.attach("replay", replay)
    return Learner(policy, stage, critic, build_reference(cfg, policy), replay)


def train_on(learner: Learner, groups, step: int, cfg: Config, settings: UpdateSettings) -> dict[str, float]:
    """One update on the step's groups: advantages (with the critic's values and in-reward KL where
    configured), the replay buffer's step, then `rl_update`. Critic warm-up steps train the head only."""
    model = learner.policy.model
    s = replace(settings, critic_only=learner.critic is not None and step < cfg.algorithm.critic.warmup_steps)
    batch = advantages_for(groups, s, model, learner.critic, learner.reference)
    replay, weight, stats = None, 0.0, {}
    if cfg.rl.max_staleness:  # asynchronous: behaviour weights against the sampling log-probs (module async_rl)
        batch, stats = with_behaviour_correction(with_old_logprobs(model, batch, s), cfg.rl.is_cap)
    if learner.replay is not None:
        batch = with_old_logprobs(model, batch, s)
        replay, replay_stats = learner.replay.step(batch, step, cfg.run.seed, cfg.algorithm.replay.batch_size)
        stats.update(replay_stats)
        weight = replay_weight(step, cfg.algorithm.replay.coef, cfg.algorithm.replay.warmup_steps)
        stats["replay/beta"] = weight
    metrics = rl_update(model, learner.stage.optimizer, batch, s, learner.reference, learner.critic, replay, weight)
    if learner.critic is not None:
        metrics["critic/warmup"] = float(s.critic_only)
        metrics["critic/lr"] = learner.stage.optimizer.param_groups[-1]["lr"]
    return {**metrics, **stats}


def run_rl(cfg: Config, policy: Policy, task: Task, tools: ToolSet, reward_fn: RewardFn, run_dir: Path,
           logger: MetricsLogger) -> Path:
    """Train for `cfg.rl.steps` steps (resuming if checkpoints exist); returns the final model directory.
    Under torch.distributed every rank runs this, each sampling its share of the step's problems
    (module `distributed`); with `rl.max_staleness` >= 1 rollouts run ahead of the updates (`_async_steps`)."""
    world = distributed.world()
    stage = TrainingStage("rl", run_dir, policy, cfg.rl.optim, cfg.rl.steps, cfg.rl.save_every,
                          cfg.rl.keep_checkpoints, logger)
    learner = make_learner(cfg, policy, stage)
    state = stage.resume()
    if state.get("pending") and not cfg.rl.max_staleness:
        raise ResumeError(f"the checkpoint of step {state['step']} was written by an asynchronous run (it holds "
                          f"{len(state['pending'])} batches sampled ahead); resume it with rl.max_staleness >= 1")
    traj_dir = run_dir / "trajectories" / "rl"
    if world.is_main:
        _drop_after(traj_dir, state["step"])
    backend = make_backend(policy, cfg) if not cfg.cluster.enabled else _start_rollout_pool(cfg, policy)
    distributed.barrier()  # servers shared by the ranks: rank 0 has loaded the starting weights
    distributed.prepare_model(policy.model, world, stage)  # after resume: fsdp2 shards the restored weights
    strategy = build_strategy(cfg) if not cfg.cluster.enabled else backend.strategy(cfg)
    strategy.load_state_dict(state.get("strategy", {}))
    run = _Run(cfg, policy, learner, backend, strategy, _Cursor(task, state.get("cursor", 0)),
               RewardState(state.get("reward_state", {})), EnvFactory(task, tools, cfg, policy.fmt),
               rollout_spec(cfg, policy), update_settings(cfg, policy), reward_fn, traj_dir, task)
    try:
        if cfg.rl.max_staleness:
            _async_steps(run, state)
        else:
            _sync_steps(run, state["step"], state.get("sampled_tokens", 0.0))
    finally:
        backend.close()
    if learner.critic is not None and world.is_main:
        save_value_head(learner.critic, run_dir / "models" / "final.value_head.safetensors")
    return stage.finish(run_dir / "models" / "final")


@dataclass
class _Run:
    """What the steps of one RL run share."""

    cfg: Config
    policy: Policy
    learner: Learner
    backend: Any
    strategy: Any
    data: _Cursor
    reward_state: RewardState
    make_env: EnvFactory
    spec: RolloutSpec
    settings: UpdateSettings
    reward_fn: RewardFn
    traj_dir: Path
    task: Task

    def context(self, step: int) -> RolloutContext:
        return RolloutContext(self.make_env, self.backend, self.policy.fmt,
                              _with_deadline(self.spec, self.cfg.rollout.step_timeout_s), self.reward_fn, step,
                              self.cfg.run.seed, self.reward_state)

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs to continue the data stream (copies: a producer thread may go on)."""
        return {"cursor": self.data.cursor, "reward_state": copy.deepcopy(self.reward_state.data),
                "strategy": copy.deepcopy(self.strategy.state_dict())}

    def finish_step(self, step: int, out: StrategyOutput, metrics: dict[str, float], state: dict[str, Any]) -> None:
        metrics.update(trajectory_metrics(out.trajectories))
        metrics.update(out.metrics)
        if self.cfg.rl.save_trajectories and distributed.world().is_main:
            _save(self.traj_dir, step, out)
        self.learner.stage.step_done(step + 1, metrics, state)


def _sync_steps(run: _Run, start: int, sampled: float) -> None:
    """Rollout, update, weights to the backend, one step after the other; `sampled` tokens generated before
    `start` count towards `rl.max_sampled_tokens`."""
    cfg, policy, backend, world = run.cfg, run.policy, run.backend, distributed.world()
    budget = cfg.rl.max_sampled_tokens
    with asyncio.Runner() as runner:
        for step in range(start, cfg.rl.steps):
            if budget is not None and sampled >= budget:
                break
            t0 = time.monotonic()
            snapshot = backend.metrics_snapshot()
            take, prompts, ctx = distributed.shard_rollout(run.data.take, cfg.rollout.prompts_per_step,
                                                           run.context(step), world)
            out = runner.run(rollout_step(run.strategy, take, prompts, ctx, cfg.rollout.dynamic_sampling))
            out = distributed.gather_output(out, step, cfg.rollout.prompts_per_step, world)
            if cfg.algorithm.info_gain.enabled and out.groups:
                out.groups, gain = with_information_gain(
                    policy.model, out.groups, lambda task_id: run.task.final_answer_text(run.data.problem(task_id)),
                    policy.fmt.encode, compute_dtype=policy.compute_dtype,
                    micro_batch_size=run.settings.micro_batch_size, log_space=cfg.algorithm.info_gain.log_space)
                out.metrics.update(gain)
            t1 = time.monotonic()
            metrics = train_on(run.learner, out.groups, step, cfg, run.settings) if out.groups else {"train/skipped": 1.0}
            distributed.push_weights(backend, distributed.generation_weights(policy.model, world), world)
            t2 = time.monotonic()
            gen = distributed.sum_generation_metrics(backend.metrics_since(snapshot), world)
            metrics.update(gen)
            metrics.update({"time/rollout_s": t1 - t0, "time/update_s": t2 - t1,
                            "speed/tokens_per_s": gen.get("gen/tokens", 0.0) / (t1 - t0)})
            sampled += gen.get("gen/tokens", 0.0)
            metrics["gen/tokens_total"] = sampled
            run.finish_step(step, out, metrics, {**run.state(), "sampled_tokens": sampled})


def _async_steps(run: _Run, state: dict[str, Any]) -> None:
    """`rl.max_staleness` >= 1: a producer thread samples step s with version max(start, s - k) while the
    trainer updates (module `async_rl`); checkpoints carry the batches already sampled ahead."""
    cfg, policy, backend, start = run.cfg, run.policy, run.backend, state["step"]

    def produce(runner, step):
        snapshot = backend.metrics_snapshot()
        out = runner.run(rollout_step(run.strategy, run.data.take, cfg.rollout.prompts_per_step, run.context(step),
                                      cfg.rollout.dynamic_sampling))
        return out, backend.metrics_since(snapshot), run.state()

    ready = [produced_from_state(p) for p in state.get("pending", [])]
    pipeline = RolloutPipeline(produce, backend.update_weights, start, cfg.rl.steps, cfg.rl.max_staleness, ready)
    try:
        for step in range(start, cfg.rl.steps):
            t0 = time.monotonic()
            item = pipeline.get(step)
            t1 = time.monotonic()
            groups = item.out.groups
            metrics = train_on(run.learner, groups, step, cfg, run.settings) if groups else {"train/skipped": 1.0}
            pipeline.publish(step + 1, lambda: merged_state_dict(policy.model))
            t2 = time.monotonic()
            metrics.update(item.metrics)
            metrics.update({"time/wait_s": t1 - t0, "time/update_s": t2 - t1, "async/version": float(item.version),
                            "async/staleness": float(step - item.version),
                            "speed/tokens_per_s": item.metrics.get("gen/tokens", 0.0) / item.metrics["time/rollout_s"]})
            ahead = pipeline.ready_after(step + 1) if run.learner.stage.saves_at(step + 1) else []
            saved = {**(ahead[-1] if ahead else item).state, "pending": [produced_to_state(p) for p in ahead]}
            run.finish_step(step, item.out, metrics, saved)
    finally:
        pipeline.close()


class _Cursor:
    """The training stream's position: `take(n)` hands out the next n problems."""

    def __init__(self, task: Task, cursor: int):
        self.task, self.cursor = task, cursor
        self.taken: dict[str, Problem] = {}
        """Problems handed out so far in this run, by id (IGPO needs their gold answers)."""

    def take(self, n: int) -> list[Problem]:
        problems = [self.task.train_problem(self.cursor + i) for i in range(n)]
        self.cursor += n
        self.taken.update((p.id, p) for p in problems)
        return problems

    def problem(self, task_id: str) -> Problem:
        """A problem handed out earlier in the run (before a resume too: regenerated from the stream)."""
        if task_id not in self.taken:
            self.taken.update((p.id, p) for p in map(self.task.train_problem, range(self.cursor)))
        if task_id not in self.taken:
            raise KeyError(f"problem {task_id!r} is not among the {self.cursor} training problems of this run")
        return self.taken[task_id]


def _start_rollout_pool(cfg: Config, policy: Policy):
    """`cluster.enabled`: Ray rollout workers stand in for the local backend (`tirl.cluster`)."""
    from tirl.cluster import start_rollout_pool

    return start_rollout_pool(cfg, policy)


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
