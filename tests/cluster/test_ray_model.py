"""Rollout workers built from a run's config (`FromConfig`: the tiny model on the hf backend) sample what
the local backend samples, with the weights the trainer pushed rather than those on disk."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")

import torch  # noqa: E402

from tirl.cluster.ray_pool import RayFlat, RolloutPool, start_rollout_workers, wait_ready  # noqa: E402
from tirl.cluster.workers import FromConfig  # noqa: E402
from tirl.config import load_config  # noqa: E402
from tirl.models import loading  # noqa: E402
from tirl.rollout.groups import Flat, RolloutContext, run_strategy  # noqa: E402
from tirl.trainer.build import (EnvFactory, build_reward, build_task, build_tools, load_policy,  # noqa: E402
                                make_backend)
from tirl.trainer.rl import rollout_spec  # noqa: E402


def _run(strategy, problems, parts, backend, step):
    cfg, policy, task, tools, reward = parts
    ctx = RolloutContext(EnvFactory(task, tools, cfg, policy.fmt), backend, policy.fmt, rollout_spec(cfg, policy),
                         reward, step=step, seed=cfg.run.seed)
    return asyncio.run(run_strategy(strategy, problems, ctx))


def _tokens(out):
    return [(g.group_id, [(t.response_ids, t.loss_mask, t.final_answer, t.reward) for t in g.trajectories])
            for g in out.groups]


def _logprobs(out):
    return [lp for t in out.trajectories for lp in t.logprobs]


def test_config_built_workers_sample_like_the_local_backend_with_pushed_weights(local_ray, tiny_model_dir):
    cfg = load_config(overrides=[f"model.name={tiny_model_dir}", "rollout.group_size=2", "rollout.max_turns=2",
                                 "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16", "run.seed=3"])
    policy = load_policy(cfg.model, "cpu")
    with torch.no_grad():  # weights that differ from those on disk: only a push can bring them to the workers
        torch.manual_seed(1)
        for p in policy.model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    task = build_task(cfg.task)
    parts = (cfg, policy, task, build_tools(cfg, task), build_reward(cfg.task, task))
    problems = [task.train_problem(i) for i in range(3)]
    build = local_ray.put(FromConfig(cfg, policy.path, threads=1))
    pool = RolloutPool(start_rollout_workers(build, 2, num_cpus=0.5), keep=[build])
    try:
        wait_ready(pool.actors, "rollout workers")
        pool.weight_dtypes = local_ray.get(pool.actors[0].weight_dtypes.remote())  # published in these dtypes
        assert set(pool.weight_dtypes.values()) == {policy.compute_dtype}
        pool.update_weights(loading.merged_state_dict(policy.model))
        remote = _run(RayFlat(pool), problems, parts, pool, step=2)
    finally:
        pool.close()
    backend = make_backend(policy, cfg)
    try:
        local = _run(Flat(), problems, parts, backend, step=2)
    finally:
        backend.close()
    assert _tokens(remote) == _tokens(local)
    assert _logprobs(remote) == pytest.approx(_logprobs(local), abs=1e-4)
    assert len({t.response_ids for t in local.trajectories}) > 1  # sampled, not one answer repeated
