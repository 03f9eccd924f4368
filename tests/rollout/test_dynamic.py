"""DAPO dynamic sampling (reference 2.5) with a scripted model: the filter, the cap, reproducibility.

Problems are named for how their group turns out: "vary" problems get one right and one wrong
answer (reward 1 and 0: kept), "same" problems two right answers (constant reward: filtered).
"""

from __future__ import annotations

import asyncio

import pytest

from tirl.backends.scripted import ScriptedBackend
from tirl.cli import main
from tirl.config import DynamicSamplingConfig
from tirl.envs.tool_env import ToolEnv
from tirl.errors import ConfigError, RolloutError
from tirl.rewards.base import RewardResult
from tirl.rollout.agent import TurnLimits
from tirl.rollout.dynamic import dynamic_sample, varies
from tirl.rollout.groups import Flat, RolloutContext, RolloutSpec
from tirl.rollout.step import rollout_step
from tirl.tasks.base import Problem
from tirl.tools import ToolSet, calculator

RIGHT, WRONG = "<answer>2</answer><|im_end|>", "<answer>3</answer><|im_end|>"


def _reward(traj, problem, group):
    correct = traj.final_answer == "<answer>2</answer>"
    return RewardResult(float(correct), {"correct": float(correct)}, correct)


def _no_correctness(traj, problem, group):
    return RewardResult(float(traj.final_answer == "<answer>2</answer>"), {}, None)


def _script(request, turn):
    """Sample 1 of a "vary" problem answers wrong; everything else answers right."""
    question = request.messages[1].content
    return WRONG if question.startswith("vary") and request.key[1] == 1 else RIGHT


class _Data:
    """The step's data cursor: `take(n)` hands out the next n problems of `kinds`."""

    def __init__(self, kinds: list[str]):
        self.problems = [Problem(id=f"p{i}", question=f"{k}: 1+1?", answer="2") for i, k in enumerate(kinds)]
        self.taken = 0

    def take(self, n: int) -> list[Problem]:
        out = self.problems[self.taken:self.taken + n]
        self.taken += n
        return out


def _tokens(group):
    """What a group trains on (turn timings left out)."""
    return group.group_id, [(t.response_ids, t.loss_mask, t.logprobs, t.reward) for t in group.trajectories]


def _ctx(fmt, reward=_reward, script=_script, seed=0):
    return RolloutContext(lambda p: ToolEnv(p, "Solve it.", ToolSet([calculator])),
                          ScriptedBackend(fmt.tokenizer, script), fmt,
                          RolloutSpec(group_size=2, limits=TurnLimits(max_turns=2)), reward, step=3, seed=seed)


def _sample(fmt, kinds, prompts=2, max_batches=10, metric="reward", **ctx):
    data = _Data(kinds)
    out = asyncio.run(dynamic_sample(Flat(), data.take, prompts, _ctx(fmt, **ctx), metric=metric,
                                     max_batches=max_batches))
    return out, data


def test_constant_groups_are_filtered_until_enough_vary(smol_format):
    out, data = _sample(smol_format, ["same", "vary", "same", "same", "vary", "vary"], prompts=2)
    assert [g.task_id for g in out.groups] == ["p1", "p4"]  # the first two that vary, in sampling order
    assert all(len(set(g.rewards)) == 2 for g in out.groups)
    assert data.taken == 6  # three batches of two problems
    dropped = sorted(g.task_id for g in out.dropped)
    assert dropped == ["p0", "p2", "p3", "p5"]  # constant groups, then the surplus p5
    m = out.metrics
    assert (m["dynamic/batches"], m["dynamic/kept"], m["dynamic/filtered"], m["dynamic/surplus"]) == (3, 2, 3, 1)


def test_batch_zero_is_the_plain_step_and_later_batches_are_new_samples(smol_format):
    out, _ = _sample(smol_format, ["vary", "same", "same", "vary"], prompts=2)
    plain = asyncio.run(Flat()(_Data(["vary", "same"]).take(2), _ctx(smol_format)))
    assert _tokens(out.groups[0]) == _tokens(plain.groups[0])  # batch 0: what the step samples unfiltered
    assert out.groups[1].group_id == "3-1.b1"  # group ids of batch b carry the batch number
    assert len({g.group_id for g in out.groups + out.dropped}) == 4
    again, _ = _sample(smol_format, ["vary", "same", "same", "vary"], prompts=2)
    assert [_tokens(g) for g in again.groups + again.dropped] == [_tokens(g) for g in out.groups + out.dropped]


def test_later_batches_draw_their_own_seeds(smol_format):
    seeds: list[tuple[tuple, int]] = []

    def script(request, turn):
        seeds.append((request.key, request.seed))
        return _script(request, turn)

    _sample(smol_format, ["same", "same", "vary", "vary"], prompts=2, script=script)
    by_batch = [{k: s for k, s in seeds[:4]}, {k: s for k, s in seeds[4:]}]
    assert by_batch[0].keys() == by_batch[1].keys()  # the same coordinates (group, sample, turn)...
    assert all(by_batch[0][k] != by_batch[1][k] for k in by_batch[0])  # ...with other seeds


def test_the_cap_raises_and_says_how_many_qualified(smol_format):
    with pytest.raises(RolloutError) as e:
        _sample(smol_format, ["same", "vary", "same", "same", "same", "same"], prompts=2, max_batches=3)
    message = str(e.value)
    assert "only 1 of the 2 groups" in message and "max_batches=3" in message
    assert "6 groups sampled, 5 with the same reward" in message


def test_metric_correct_needs_a_reward_that_says_so(smol_format):
    out, _ = _sample(smol_format, ["vary", "vary"], prompts=2, metric="correct")
    assert len(out.groups) == 2
    with pytest.raises(ConfigError, match="does not say whether an answer is correct"):
        _sample(smol_format, ["vary", "vary"], prompts=2, metric="correct", reward=_no_correctness)
    with pytest.raises(ConfigError, match="metric"):
        _sample(smol_format, ["vary"], prompts=1, metric="accuracy")


def test_varies_compares_exact_values(smol_format):
    out, _ = _sample(smol_format, ["vary", "same", "vary"], prompts=2)
    assert all(varies(g, "reward") for g in out.groups)
    assert not any(varies(g, "reward") for g in out.dropped if g.task_id == "p1")


def test_rollout_step_applies_dynamic_sampling_only_when_enabled(smol_format):
    data = _Data(["same", "vary", "vary", "vary"])
    ctx = _ctx(smol_format)
    plain = asyncio.run(rollout_step(Flat(), data.take, 2, ctx, DynamicSamplingConfig(enabled=False)))
    assert len(plain.groups) == 2 and data.taken == 2
    data = _Data(["same", "vary", "vary", "vary"])
    dyn = asyncio.run(rollout_step(Flat(), data.take, 2, ctx, DynamicSamplingConfig(enabled=True)))
    assert [g.task_id for g in dyn.groups] == ["p1", "p2"] and data.taken == 4


def test_failed_rollouts_count_over_all_batches(smol_format):
    def script(request, turn):
        if request.messages[1].content.startswith("boom"):
            raise RuntimeError("backend fell over")
        return _script(request, turn)

    # 1 failed group (2 trajectories) of 3 batches x 2 groups x 2 samples = 12: 17% > 10%
    with pytest.raises(RolloutError, match="2 of 12 trajectories failed"):
        _sample(smol_format, ["boom", "same", "same", "vary", "same", "vary"], prompts=2, script=script)


def test_train_stops_with_the_cap_error_and_keeps_the_run(tmp_path, monkeypatch, tiny_model_dir, capsys):
    """A random tiny model answers nothing right: every group is constant, so the cap is hit at step 1."""
    monkeypatch.chdir(tmp_path)
    code = main(["train", f"model.name={tiny_model_dir}", "pipeline.sft=false", "pipeline.eval_before=false",
                 "pipeline.eval_after_sft=false", "rl.steps=2", "rollout.group_size=2", "rollout.prompts_per_step=1",
                 "rollout.max_new_tokens_per_turn=4", "rollout.max_new_tokens=8", "rollout.max_turns=1",
                 "rollout.dynamic_sampling.enabled=true", "rollout.dynamic_sampling.max_batches=2"])
    assert code == 2
    err = "".join(capsys.readouterr())
    assert "dynamic sampling: only 0 of the 1 groups needed" in err and "max_batches=2" in err
    run = tmp_path / "runs" / "default"
    assert (run / "config.yaml").is_file() and (run / "run.json").is_file()
