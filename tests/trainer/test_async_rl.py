"""Asynchronous RL (`rl.max_staleness`): the schedule of the rollout pipeline, the behaviour weights, the
decoupled loss they give, config refusals, and `tirl train` runs (see also test_resume.py for killing
and resuming an asynchronous run)."""

from __future__ import annotations

import math
import threading
import time

import pytest
import torch

from tirl.algorithms import POLICY_LOSSES, PolicyLossInput
from tirl.config import load_config
from tirl.errors import ConfigError, InvariantError
from tirl.rollout.groups import StrategyOutput
from tirl.trainer.async_rl import (Produced, RolloutPipeline, behaviour_weights, check_config, produced_from_state,
                                   produced_to_state)


# ----------------------------------------------------------------------------- behaviour weights


def test_behaviour_weights_hand_values():
    """old = [-1, -2, -0.5, -3], sampled = [-1.5, -1, -0.5, -4], cap 2:
    raw w = exp([0.5, -1, 0, 1]) = [1.6487, 0.3679, 1, 2.7183]; truncated at 2 -> [1.6487, 0.3679, 1, 2];
    the last position is masked (mask 0) so it is 1 and not counted: mean raw weight over the three sampled
    tokens (1.6487 + 0.3679 + 1) / 3 = 1.00553, none truncated, k3 = mean(w - 1 - log w) =
    ((1.6487 - 1 - 0.5) + (0.3679 - 1 + 1) + 0) / 3 = 0.17221."""
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    sampled = torch.tensor([[-1.5, -1.0, -0.5, -4.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w, m = behaviour_weights(old, sampled, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[math.exp(0.5), math.exp(-1), 1.0, 1.0]]))
    assert m["async/is_weight_mean"] == pytest.approx((math.exp(0.5) + math.exp(-1) + 1) / 3)
    assert m["async/is_truncated_frac"] == 0.0
    assert m["async/kl_sample_old"] == pytest.approx((math.exp(0.5) - 1.5 + math.exp(-1)) / 3)
    # unmasked, the last token's weight e is truncated at 2 (1 of 4 tokens)
    w, m = behaviour_weights(old, sampled, torch.ones(1, 4), cap=2.0)
    assert w[0, 3] == 2.0 and m["async/is_truncated_frac"] == 0.25
    w, _ = behaviour_weights(old, sampled, torch.ones(1, 4), cap=None)
    assert w[0, 3] == pytest.approx(math.e)


def test_nan_sampling_logprob_on_a_sampled_token_is_an_error():
    with pytest.raises(InvariantError, match="sampling log-prob"):
        behaviour_weights(torch.zeros(1, 2), torch.tensor([[0.0, float("nan")]]), torch.ones(1, 2), cap=2.0)
    w, _ = behaviour_weights(torch.zeros(1, 2), torch.tensor([[0.0, float("nan")]]), torch.tensor([[1.0, 0.0]]), 2.0)
    assert w.tolist() == [[1.0, 1.0]]


def test_weighted_advantages_give_the_decoupled_ppo_objective():
    """ppo_clip (eps 0.2) with advantages A*w equals the decoupled objective computed by hand:
    per token -w * min(r A, clip(r, 0.8, 1.2) A), r = pi_theta / pi_old, token-mean over 3 tokens.
    r = exp([0.1, -0.5, 0.3]) = [1.10517, 0.60653, 1.34986], A = [1, 1, -2], w = [0.5, 2, 1.5]:
    terms min(1.10517, 1.10517) = 1.10517; min(0.60653, 0.8) = 0.60653; min(-2.69972, -2.4) = -2.69972;
    loss = -(0.55259 + 1.21306 - 4.04958) / 3 = 0.76131."""
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.1, -0.5, 0.3]])
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    w = torch.tensor([[0.5, 2.0, 1.5]])
    mask = torch.ones(1, 3)
    loss, _ = POLICY_LOSSES.get("ppo_clip")(PolicyLossInput(logp, old, adv * w, mask, "token-mean"))
    by_hand = -(0.5 * math.exp(0.1) + 2 * math.exp(-0.5) + 1.5 * -2 * math.exp(0.3)) / 3
    assert float(loss) == pytest.approx(by_hand, abs=1e-6) and by_hand == pytest.approx(0.76131, abs=1e-5)


# ----------------------------------------------------------------------------- the pipeline's schedule


class _Recorder:
    """A produce/load pair that records what happened when, sleeping to make overlap observable."""

    def __init__(self, produce_s: float = 0.05):
        self.events: list[tuple] = []
        self.weights = "v0"
        self.lock = threading.Lock()
        self.produce_s = produce_s

    def produce(self, runner, step):
        with self.lock:
            self.events.append(("start", step, self.weights, time.monotonic()))
        time.sleep(self.produce_s)
        with self.lock:
            self.events.append(("end", step, self.weights, time.monotonic()))
        return StrategyOutput([], metrics={"step": float(step)}), {}, {"cursor": step + 1}

    def load(self, weights):
        self.weights = weights["name"]


def _train(pipeline: RolloutPipeline, rec: _Recorder, start: int, end: int, update_s: float = 0.05) -> list:
    got = []
    for step in range(start, end):
        item = pipeline.get(step)
        got.append((item.step, item.version, rec.weights_at_start(step)))
        t0 = time.monotonic()
        time.sleep(update_s)
        rec.events.append(("update", step, t0, time.monotonic()))
        pipeline.publish(step + 1, lambda v=step + 1: {"name": f"v{v}"})
    return got


def _start_weights(rec: _Recorder, step: int) -> str:
    return next(e[2] for e in rec.events if e[0] == "start" and e[1] == step)


_Recorder.weights_at_start = _start_weights


@pytest.mark.parametrize("k", [1, 2])
def test_step_s_samples_with_version_s_minus_k_while_the_trainer_updates(k):
    rec = _Recorder()
    pipeline = RolloutPipeline(rec.produce, rec.load, start=0, end=6, k=k)
    try:
        got = _train(pipeline, rec, 0, 6)
    finally:
        pipeline.close()
    assert [(s, v) for s, v, _ in got] == [(s, max(0, s - k)) for s in range(6)]
    assert [w for _, _, w in got] == [f"v{max(0, s - k)}" for s in range(6)]  # the weights really loaded
    # overlap: the rollout of step s+1 started before update s ended, for every s
    for s in range(5):
        update_end = next(e[3] for e in rec.events if e[0] == "update" and e[1] == s)
        assert next(e[3] for e in rec.events if e[0] == "start" and e[1] == s + 1) < update_end
    # never more than k versions behind, and never ahead of what the trainer published
    for e in rec.events:
        if e[0] == "start":
            assert e[1] - int(e[2][1:]) <= k


def test_resumed_pipeline_trains_restored_batches_first_then_samples_with_the_start_version():
    rec = _Recorder()
    ready = [Produced(s, s - 1, StrategyOutput([], metrics={"restored": 1.0})) for s in (3,)]
    pipeline = RolloutPipeline(rec.produce, rec.load, start=3, end=6, k=1, ready=ready)
    try:
        first = pipeline.get(3)
        assert first.out.metrics == {"restored": 1.0} and first.version == 2
        pipeline.publish(4, lambda: {"name": "v4"})
        assert pipeline.get(4).version == 3 and _start_weights(rec, 4) == "v0"  # the backend's start weights
        pipeline.publish(5, lambda: {"name": "v5"})
        assert pipeline.get(5).version == 4 and _start_weights(rec, 5) == "v4"
    finally:
        pipeline.close()
    assert not any(e[1] == 3 for e in rec.events if e[0] == "start")  # step 3 was not sampled again


def test_ready_after_waits_for_the_batches_sampled_ahead():
    rec = _Recorder(produce_s=0.2)
    pipeline = RolloutPipeline(rec.produce, rec.load, start=0, end=4, k=2)
    try:
        pipeline.get(0)
        pipeline.publish(1, lambda: {"name": "v1"})
        ahead = pipeline.ready_after(1)  # steps 1 and 2, both sampled with v0
        assert [(p.step, p.version) for p in ahead] == [(1, 0), (2, 0)]
        assert pipeline.get(1) is ahead[0]  # still queued for the trainer
        pipeline.publish(2, lambda: {"name": "v2"})
        assert [(p.step, p.version) for p in pipeline.ready_after(3)] == [(3, 1)]  # one left before the end
        assert pipeline.ready_after(4) == []
    finally:
        pipeline.close()


def test_a_producer_error_reaches_the_trainer():
    def produce(runner, step):
        if step == 1:
            raise ValueError("the env broke")
        return StrategyOutput([]), {}, {}

    pipeline = RolloutPipeline(produce, lambda w: None, start=0, end=3, k=1)
    try:
        pipeline.get(0)
        with pytest.raises(RuntimeError, match="asynchronous rollout failed: the env broke"):
            pipeline.get(1)
    finally:
        pipeline.close()


def test_close_stops_a_producer_waiting_for_weights():
    rec = _Recorder(produce_s=0.0)
    pipeline = RolloutPipeline(rec.produce, rec.load, start=0, end=10, k=1)
    pipeline.get(0)
    time.sleep(0.1)  # the producer made step 1 and now waits for version 1
    t0 = time.monotonic()
    pipeline.close()
    assert time.monotonic() - t0 < 5 and not pipeline._thread.is_alive()


def test_produced_batches_survive_a_json_round_trip():
    from tirl.types import StopReason, Trajectory, TrajectoryGroup, TrajectoryMeta, Turn, TreeEdge

    tiny_traj = Trajectory(prompt_ids=(5, 6), response_ids=(10, 11, 12), loss_mask=(1, 1, 0),
                           logprobs=(-1.0, -0.5, 0.0), turns=(Turn(0, 2, 3, "call", "stop"),), messages=(),
                           stop_reason=StopReason.ANSWERED, meta=TrajectoryMeta("t0", "g0"), final_answer="x",
                           reward=1.0, reward_components={"correct": 1.0}, correct=True)
    group = TrajectoryGroup("g0", "t0", (tiny_traj, tiny_traj), (TreeEdge("a", "b"),))
    p = Produced(4, 3, StrategyOutput([group], [tiny_traj], [group], {"rollout/x": 1.0}), {"gen/tokens": 5.0},
                 {"cursor": 7, "reward_state": {"a": [1]}, "strategy": {}})
    import json

    back = produced_from_state(json.loads(json.dumps(produced_to_state(p))))
    assert back == p


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides, error", [
    (["rl.max_staleness=1", "distributed.strategy=ddp"], "distributed.strategy=ddp"),
    (["rl.max_staleness=1", "algorithm.info_gain.enabled=true"], "info_gain"),
])
def test_unsupported_combinations_are_refused(overrides, error):
    with pytest.raises(ConfigError, match=error):
        check_config(load_config(None, overrides))


def test_is_cap_without_async_is_refused():
    with pytest.raises(ConfigError, match="rl.is_cap has no effect"):
        load_config(None, ["rl.is_cap=3"])
    assert load_config(None, ["rl.max_staleness=2", "rl.is_cap=null"]).rl.is_cap is None
    with pytest.raises(ConfigError, match="max_staleness"):
        load_config(None, ["rl.max_staleness=-1"])


def test_preflight_refuses_what_the_asynchronous_mode_cannot_run():
    from tirl.trainer.build import preflight

    with pytest.raises(ConfigError, match="info_gain"):
        preflight(load_config(None, ["rl.max_staleness=1", "algorithm.info_gain.enabled=true"]))


def test_a_sampled_token_budget_needs_synchronous_rl():
    with pytest.raises(ConfigError, match="rl.max_sampled_tokens needs synchronous RL"):
        load_config(None, ["rl.max_staleness=1", "rl.max_sampled_tokens=1000"])
    with pytest.raises(ConfigError, match="max_sampled_tokens"):
        load_config(None, ["rl.max_sampled_tokens=0"])
    assert load_config(None, ["rl.max_sampled_tokens=1000"]).rl.max_sampled_tokens == 1000
