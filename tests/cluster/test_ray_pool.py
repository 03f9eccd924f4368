"""Ray rollout workers: the same groups as a local rollout, weights versions, a worker killed mid-step
(no group lost, none counted twice), and the config errors of `cluster.*`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

pytest.importorskip("ray")

import torch  # noqa: E402

from tests.cluster import helpers  # noqa: E402
from tirl.cluster import check_config, require_ray  # noqa: E402
from tirl.cluster.ray_pool import (RayFlat, RolloutPool, _check_resources, start_rollout_workers,  # noqa: E402
                                   wait_ready)
from tirl.cluster.workers import GroupJob, GroupResult  # noqa: E402
from tirl.config import Config, load_config  # noqa: E402
from tirl.errors import ConfigError  # noqa: E402
from tirl.rollout.agent import TurnLimits  # noqa: E402
from tirl.rollout.groups import Flat, RolloutContext, RolloutSpec, StrategyOutput, run_strategy  # noqa: E402
from tirl.tasks.base import Problem  # noqa: E402

PROBLEMS = [Problem(id=f"p{i}", question=f"What is {i} + 1?", answer=str(i % 7)) for i in range(6)]
SPEC = RolloutSpec(group_size=3, limits=TurnLimits(max_turns=3, max_new_tokens_per_turn=64, max_new_tokens=192))


@pytest.fixture(scope="module")
def ray_with_helpers(local_ray):
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[helpers.__name__])
    return local_ray


@pytest.fixture(scope="module")
def pool(ray_with_helpers, smol_dir):
    actors = start_rollout_workers(helpers.ScriptedBuild(str(smol_dir), delay_s=0.3), 2, num_cpus=0.5,
                                   max_restarts=2)
    wait_ready(actors, "rollout workers")
    p = RolloutPool(actors, max_reissues=2)
    p.update_weights({"bias": torch.tensor(0)})
    yield p
    p.close()


def _ctx(fmt, backend, step=4, seed=11):
    return RolloutContext(helpers.make_env, backend, fmt, SPEC, helpers.reward, step=step, seed=seed)


def _local(fmt, tokenizer, bias=0, **kw):
    backend = helpers.VersionedScripted(tokenizer)
    backend.update_weights({"bias": torch.tensor(bias)})
    return asyncio.run(run_strategy(Flat(), PROBLEMS, _ctx(fmt, backend, **kw)))


def _on_pool(pool, fmt, **kw):
    return asyncio.run(run_strategy(RayFlat(pool), PROBLEMS, _ctx(fmt, pool, **kw)))


def _content(out):
    """What a step trains on and records (turn timings left out)."""
    return [(g.group_id, g.task_id, [(t.meta.group_id, t.meta.sample_index, t.prompt_ids, t.response_ids,
                                      t.loss_mask, t.logprobs,
                                      t.final_answer, t.reward, t.stop_reason, [r.content for r in t.tool_results])
                                     for t in g.trajectories]) for g in out.groups]


def test_two_workers_give_the_local_groups_in_order(pool, smol_format, smol_tokenizer):
    before = pool.metrics_snapshot()
    remote, local = _on_pool(pool, smol_format), _local(smol_format, smol_tokenizer)
    assert _content(remote) == _content(local)
    assert [g.task_id for g in remote.groups] == [p.id for p in PROBLEMS]
    answers = {t.final_answer for g in remote.groups for t in g.trajectories}
    assert len(answers) > 1 and any(t.reward == 1.0 for t in remote.trajectories)  # seeds matter, rewards vary
    assert all(r.content.strip().isdigit() for t in remote.trajectories for r in t.tool_results)  # tools ran
    pids = {os.getpid(), *pool.pids()}
    assert len(pids) == 3  # generated in two worker processes, not here
    got = pool.metrics_since(before)
    assert got["cluster/groups"] == len(PROBLEMS) and got["cluster/reissued"] == 0
    assert got["gen/tokens"] == sum(t.num_sampled_tokens for t in local.trajectories)


def test_workers_generate_with_the_weights_version_published_last(pool, smol_format, smol_tokenizer):
    pool.update_weights({"bias": torch.tensor(5)})
    try:
        remote = _on_pool(pool, smol_format, step=5)
        assert all(t.final_answer.endswith(" w5") for t in remote.trajectories)
        assert _content(remote) == _content(_local(smol_format, smol_tokenizer, bias=5, step=5))
    finally:
        pool.update_weights({"bias": torch.tensor(0)})
    assert all(t.final_answer.endswith(" w0") for t in _on_pool(pool, smol_format, step=6).trajectories)


def test_a_worker_killed_mid_step_loses_no_group_and_counts_none_twice(pool, smol_format, smol_tokenizer):
    ray = require_ray()
    victim = pool.actors[0]
    old_pid = pool.pids()[0]
    before = pool.metrics_snapshot()

    async def step_with_a_kill():
        running = asyncio.ensure_future(run_strategy(RayFlat(pool), PROBLEMS, _ctx(smol_format, pool, step=7)))
        waited = 0.0
        while (await victim.status.remote())[0] == 0:  # wait until it is generating some groups
            assert waited < 60 and not running.done(), "worker 0 never got a group"
            await asyncio.sleep(0.02)
            waited += 0.02
        os.kill(old_pid, signal.SIGKILL)
        return await running

    out = asyncio.run(step_with_a_kill())
    got = pool.metrics_since(before)
    assert got["cluster/reissued"] >= 1 and got["cluster/duplicates"] == 0
    assert got["cluster/groups"] == len(PROBLEMS)
    assert [g.task_id for g in out.groups] == [p.id for p in PROBLEMS]
    assert _content(out) == _content(_local(smol_format, smol_tokenizer, step=7))
    assert got["gen/tokens"] == sum(t.num_sampled_tokens for t in out.trajectories)
    assert _pid_after_restart(ray, victim) != old_pid  # Ray restarted it
    again = _on_pool(pool, smol_format, step=8)  # and the restarted worker loads the weights again
    assert _content(again) == _content(_local(smol_format, smol_tokenizer, step=8))


def test_dynamic_sampling_batches_on_the_pool_equal_local_ones(pool, smol_format, smol_tokenizer):
    from tirl.rollout.dynamic import dynamic_sample

    def sample(strategy, backend):
        data = list(PROBLEMS)
        take = lambda n: [data.pop(0) for _ in range(min(n, len(data)))]  # noqa: E731
        ctx = RolloutContext(helpers.make_env, backend, smol_format, SPEC, _answer_even, step=9, seed=11)
        return asyncio.run(dynamic_sample(strategy, take, 2, ctx, metric="reward", max_batches=3))

    remote, local = sample(RayFlat(pool), pool), sample(Flat(), helpers.VersionedScripted(smol_tokenizer))
    assert _content(remote) == _content(local)
    assert _content(StrategyOutput(remote.dropped)) == _content(StrategyOutput(local.dropped))
    assert remote.dropped and any(".b1" in g.group_id for g in remote.groups + remote.dropped)


def _answer_even(traj, problem, group):
    """1 when the scripted answer digit is even: varies within some groups, not in others."""
    return float(int(traj.final_answer[len("<answer>")]) % 2 == 0)


def _pid_after_restart(ray, actor, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.pid.remote(), timeout=timeout_s)
        except ray.exceptions.ActorUnavailableError:  # still restarting
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_late_duplicate_result_is_dropped_and_counted():
    p = RolloutPool([object()], max_reissues=0)
    job = GroupJob(0, PROBLEMS[0], "3-0", 3, 0, SPEC)
    results: dict[int, GroupResult] = {}
    first, late = GroupResult(0, (), 0, 1), GroupResult(0, (), 0, 2)
    p._accept(job, first, results)
    p._accept(job, late, results)
    assert results == {0: first}
    assert p.counts["cluster/groups"] == 1 and p.counts["cluster/duplicates"] == 1


# --- config errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("cluster.address=not-an-address", "cluster.address"),
    ("cluster.address=http://host:80", "cluster.address"),
    ("cluster.rollout_workers=0", "cluster.rollout_workers"),
    ("cluster.tool_workers=-1", "cluster.tool_workers"),
    ("cluster.max_restarts=-1", "cluster.max_restarts"),
])
def test_bad_cluster_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=["cluster.enabled=true", override])


def test_good_addresses_are_accepted():
    for address in ("auto", "ray://10.0.0.5:10001", "10.0.0.5:6379", "head-node:6379"):
        assert load_config(overrides=["cluster.enabled=true", f"cluster.address={address}"]).cluster.address == address


def test_cluster_settings_without_enabled_are_refused():
    with pytest.raises(ConfigError, match=r"cluster\.rollout_workers has no effect unless cluster.enabled=true"):
        load_config(overrides=["cluster.rollout_workers=4"])
    with pytest.raises(ConfigError, match=r"cluster\.address has no effect unless cluster.enabled=true"):
        load_config(overrides=["cluster.address=auto"])
    # the Ray launcher of data-parallel training connects with cluster.address, but uses no worker settings
    ray_launch = ["distributed.launcher=ray", "distributed.strategy=ddp"]
    assert load_config(overrides=[*ray_launch, "cluster.address=auto"]).cluster.address == "auto"
    with pytest.raises(ConfigError, match=r"cluster\.rollout_workers has no effect"):
        load_config(overrides=[*ray_launch, "cluster.rollout_workers=4"])


def test_a_strategy_the_cluster_does_not_run_is_refused():
    cfg = load_config(overrides=["cluster.enabled=true", "rollout.strategy=tree"])
    with pytest.raises(ConfigError, match="rollout.strategy=flat only"):
        check_config(cfg)


def test_cluster_with_data_parallel_training_is_refused(monkeypatch):
    if "distributed" not in Config.model_fields:
        pytest.skip("no distributed section in this config")
    with pytest.raises(ConfigError, match="distributed.strategy=ddp is not supported"):
        check_config(load_config(overrides=["cluster.enabled=true", "distributed.strategy=ddp"]))
    auto = load_config(overrides=["cluster.enabled=true", "distributed.strategy=auto"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="distributed.strategy=auto is not supported"):
        check_config(auto)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_config(auto)


def test_missing_ray_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'tirl\[ray\]'"):
        require_ray()
    with pytest.raises(ConfigError, match=r"pip install 'tirl\[ray\]'"):
        check_config(load_config(overrides=["cluster.enabled=true"]))


def test_more_gpus_per_worker_than_the_cluster_has_is_refused(local_ray):
    cfg = load_config(overrides=["cluster.enabled=true", "cluster.rollout_num_gpus=1"])
    with pytest.raises(ConfigError, match="cluster.rollout_num_gpus=1 but the Ray cluster has 0 GPU"):
        _check_resources(cfg.cluster)
