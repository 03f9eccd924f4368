"""IGPO information gain (reference 4.4): turn rewards from teacher-forced gold-answer beliefs."""

from __future__ import annotations

import math

import pytest
import torch

from tirl.trainer.info_gain import answer_beliefs, with_information_gain
from tirl.types import StopReason, Trajectory, TrajectoryGroup, TrajectoryMeta, Turn


def _traj(task_id: str = "q") -> Trajectory:
    """Prompt [5, 6, 7]; turn 0 samples [10, 11] then the env inserts [12, 13]; turn 1 samples [14, 15]."""
    turns = (Turn(0, 2, 4, "call", "stop"), Turn(4, 6, 6, "answer", "eos"))
    return Trajectory(prompt_ids=(5, 6, 7), response_ids=(10, 11, 12, 13, 14, 15), loss_mask=(1, 1, 0, 0, 1, 1),
                      logprobs=(-1.0, -1.0, 0.0, 0.0, -1.0, -1.0), turns=turns, messages=(),
                      stop_reason=StopReason.ANSWERED, meta=TrajectoryMeta(task_id, "g"), final_answer="x",
                      reward=1.0, reward_components={"correct": 1.0}, correct=True)


def _model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")


def _belief(model, context: list[int], answer: list[int]) -> float:
    """exp(mean_j log pi(a_j | context, a_<j)) by one plain forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([context + answer])).logits[0].float(), -1)
    return math.exp(sum(float(logp[len(context) + j - 1, tok]) for j, tok in enumerate(answer)) / len(answer))


def test_beliefs_are_teacher_forced_gold_probabilities(tiny_model_dir):
    """Contexts: the prompt alone, then the prompt + turn 0 + its observation; checked against plain
    forward passes (the batched scorer shares the prompt prefix)."""
    model = _model(tiny_model_dir)
    answer = [20, 21, 22]
    got = answer_beliefs(model, [_traj(), _traj()], [answer, answer], micro_batch_size=3)
    want = [_belief(model, [5, 6, 7], answer), _belief(model, [5, 6, 7, 10, 11, 12, 13], answer)]
    assert got[0] == pytest.approx(want, rel=1e-4) and got[1] == pytest.approx(want, rel=1e-4)


def test_groups_get_turn_rewards_summing_to_the_reward(tiny_model_dir):
    model = _model(tiny_model_dir)
    groups = [TrajectoryGroup("g0", "q", (_traj(), _traj()))]
    out, metrics = with_information_gain(model, groups, lambda task_id: "ab", lambda text: [30, 31])
    t = out[0].trajectories[0]
    beliefs = answer_beliefs(model, [_traj()], [[30, 31]])[0]
    assert t.turn_rewards == pytest.approx((beliefs[1] - beliefs[0], 1.0), rel=1e-5)
    assert t.reward == pytest.approx(sum(t.turn_rewards)) and t.correct is True
    assert t.reward_components["info_gain"] == pytest.approx(beliefs[1] - beliefs[0], rel=1e-5)
    assert metrics["igpo/info_gain_mean"] == pytest.approx(beliefs[1] - beliefs[0], rel=1e-5)
    logged, _ = with_information_gain(model, groups, lambda task_id: "ab", lambda text: [30, 31], log_space=True)
    assert logged[0].trajectories[0].turn_rewards[0] == pytest.approx(math.log(beliefs[1] / beliefs[0]), rel=1e-5)
    with pytest.raises(ValueError, match="empty gold answer"):
        with_information_gain(model, groups, lambda task_id: "", lambda text: [])


def test_tirl_train_with_information_gain_and_igpo(tmp_path, tiny_model_dir):
    """`algorithm.info_gain.enabled=true` + `algorithm.advantage=igpo` on the tiny model: the trained
    trajectories carry one turn reward per turn, summing to their reward; the gain is logged."""
    import json

    from tirl.cli import main
    from tirl.rollout.io import read_jsonl

    run = tmp_path / "run"
    assert main(["train", f"model.name={tiny_model_dir}", f"run.dir={run}", "pipeline.sft=false",
                 "pipeline.eval_before=false", "pipeline.eval_after=false", "rl.steps=2", "rollout.group_size=2",
                 "rollout.prompts_per_step=2", "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16",
                 "rollout.max_turns=2", "algorithm.info_gain.enabled=true", "algorithm.advantage=igpo"]) == 0
    trajs = list(read_jsonl(run / "trajectories" / "rl" / "step_000001.jsonl"))
    assert trajs and all(len(t.turn_rewards) == len(t.turns) for t in trajs)
    assert all(t.reward == pytest.approx(sum(t.turn_rewards)) for t in trajs)
    assert all("info_gain" in t.reward_components for t in trajs)
    rl = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("igpo/info_gain_mean" in m for m in rl if m["stage"] == "rl")


def test_turn_rewards_sit_on_each_turns_last_sampled_token():
    """Turn 0 samples positions 0-1 (then observation 2-3), turn 1 samples 4-5: turn rewards (0.2, 1.0)
    land on positions 1 and 5; an outcome-only trajectory keeps its reward on its last sampled token."""
    import dataclasses

    from tirl.trainer.update import loss_masks, token_rewards_and_turns

    turned = _traj().with_reward(1.2, {}, True, (0.2, 1.0))
    outcome = dataclasses.replace(_traj(), reward=0.7)
    rewards, turns = token_rewards_and_turns([turned, outcome], loss_masks([turned, outcome]))
    assert torch.allclose(rewards, torch.tensor([[0, 0.2, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, 0.7]]))
    assert turns.tolist() == [[0, 0, -1, -1, 1, 1]] * 2
