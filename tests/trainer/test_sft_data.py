"""SFT data from rollouts: reading, checks, each filter with its count, MAE, PKT key tokens and weights.

Trajectories come from real episodes of `ToolEnv` with a scripted model on the default model's
tokenizer (exact token layout, real tool results), written to JSONL exactly as runs write them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
import torch

from tirl.backends.base import SamplingParams
from tirl.backends.scripted import ScriptedBackend
from tirl.config import SFTConfig, SFTFilterConfig, load_config
from tirl.envs.tool_env import ToolEnv
from tirl.errors import ConfigError, DataError
from tirl.rollout.agent import TurnLimits, run_trajectory
from tirl.rollout.io import append_jsonl
from tirl.tasks.base import Problem
from tirl.tools import ToolSet, calculator, tool
from tirl.trainer.sft import weighted_token_mean
from tirl.trainer.sft_data import (error_turns, key_positions, key_token_mask, key_token_weights, resolve_paths,
                                   rollout_examples, with_key_weights, example_of)
from tirl.types import Message, StopReason, ToolCall, ToolStatus, TrajectoryMeta

CALC = '<tool_call>{"name": "calculator", "arguments": {"expression": "4821 * 37"}}</tool_call>'
BOOM = '<tool_call>{"name": "explode", "arguments": {"x": 1}}</tool_call>'
SOFT = '<tool_call>{"name": "soft_fail", "arguments": {"x": 1}}</tool_call>'
RIGHT = "<answer>178377</answer><|im_end|>"
WRONG = "<answer>1</answer><|im_end|>"


@tool
def explode(x: int) -> str:
    """Always raises.

    Args:
        x: Anything.
    """
    raise RuntimeError("kaboom")


@tool
def soft_fail(x: int) -> str:
    """Returns an error as plain text (status ok).

    Args:
        x: Anything.
    """
    return "NameError: name 'y' is not defined"


TOOLS = ToolSet([calculator, explode, soft_fail])


def episode(fmt, script, task_id="p0", correct=True, reward=None, limits=TurnLimits()):
    """A real episode of the scripted model, scored by hand."""
    env = ToolEnv(Problem(task_id, f"What is 4821 * 37? ({task_id})", "178377"), "Solve it.", TOOLS)
    traj = asyncio.run(run_trajectory(env, ScriptedBackend(fmt.tokenizer, script), fmt, SamplingParams(), limits,
                                      TrajectoryMeta(task_id, "g0"), seed=0))
    return traj.with_reward(float(bool(correct)) if reward is None else reward, {}, correct)


@pytest.fixture(scope="module")
def trajs(smol_format):
    """a: right; b: wrong; c: a failing call, then right; d: a copy of a; e: cut by the token budget;
    f: environment error; g: right, another problem."""
    a = episode(smol_format, [CALC, RIGHT], reward=1.0)
    return {
        "a": a, "b": episode(smol_format, [CALC, WRONG], correct=False),
        "c": episode(smol_format, [BOOM, CALC, RIGHT], reward=0.8), "d": a,
        "e": episode(smol_format, [CALC, "<answer>1783" * 20], correct=False,
                     limits=TurnLimits(max_new_tokens_per_turn=40, max_new_tokens=60)),
        "f": dataclasses.replace(episode(smol_format, [CALC, RIGHT]), stop_reason=StopReason.ERROR),
        "g": episode(smol_format, [CALC, RIGHT], task_id="p1", reward=0.5),
    }


def write(path, trajectories):
    append_jsonl(path, trajectories)
    return str(path)


def cfg(paths, **filter_kwargs) -> SFTConfig:
    return SFTConfig(source="rollouts", rollouts=list(paths), filter=SFTFilterConfig(**filter_kwargs))


def test_fixture_trajectories_are_what_the_filters_expect(trajs):
    assert trajs["e"].stop_reason == StopReason.MAX_TOKENS
    assert trajs["c"].turns[0].tool_results[0].status == ToolStatus.EXECUTION_ERROR
    assert [t.stop_reason for k, t in trajs.items() if k not in "ef"] == [StopReason.ANSWERED] * 5


# ----------------------------------------------------------------------------- filters


def test_default_filters_keep_right_distinct_finished_trajectories_token_exact(tmp_path, smol_format, trajs):
    path = write(tmp_path / "step_000001.jsonl", trajs.values())
    examples, report = rollout_examples(cfg([path]), smol_format)
    assert report.read == 7 and report.kept == 3
    assert report.removed == {"drop_errored": 1, "drop_truncated": 1, "correct_only": 1, "dedupe": 1}
    assert [e.origin for e in examples] == [f"{path}:1", f"{path}:3", f"{path}:7"]
    for e, t in zip(examples, (trajs["a"], trajs["c"], trajs["g"])):
        assert (e.prompt_ids, e.response_ids, e.loss_mask) == (t.prompt_ids, t.response_ids, t.loss_mask)
        assert e.weights == tuple(float(m) for m in t.loss_mask)


def test_each_filter_can_be_switched_off_and_min_reward(tmp_path, smol_format, trajs):
    path = write(tmp_path / "t.jsonl", trajs.values())
    loose = dict(correct_only=False, dedupe=False, drop_truncated=False, drop_errored=False)
    _, report = rollout_examples(cfg([path], **loose), smol_format)
    assert report.kept == 7 and report.removed == {}
    _, report = rollout_examples(cfg([path], **loose, min_reward=0.8), smol_format)
    assert report.removed == {"min_reward": 3}  # b (0), e (0), g (0.5)


def test_max_per_problem_keeps_the_highest_rewards(tmp_path, smol_format, trajs):
    path = write(tmp_path / "t.jsonl", [trajs["c"], trajs["a"], trajs["g"]])
    examples, report = rollout_examples(cfg([path], max_per_problem=1), smol_format)
    assert report.removed["max_per_problem"] == 1
    assert [e.origin for e in examples] == [f"{path}:2", f"{path}:3"]  # a (1.0) beats c (0.8); g alone


def test_globs_and_several_files(tmp_path, smol_format, trajs):
    (tmp_path / "rl").mkdir()
    write(tmp_path / "rl" / "step_000001.jsonl", [trajs["a"]])
    write(tmp_path / "rl" / "step_000002.jsonl", [trajs["g"]])
    write(tmp_path / "eval.jsonl", [trajs["c"]])
    paths = resolve_paths([str(tmp_path / "rl" / "step_*.jsonl"), str(tmp_path / "eval.jsonl"),
                           str(tmp_path / "**" / "step_000001.jsonl")])
    assert [p.name for p in paths] == ["step_000001.jsonl", "step_000002.jsonl", "eval.jsonl"]
    _, report = rollout_examples(cfg([str(tmp_path / "**" / "*.jsonl")]), smol_format)
    assert report.read == 3 and report.kept == 3 and len(report.files) == 3


# ----------------------------------------------------------------------------- MAE


def test_mae_masks_only_the_turn_whose_tool_output_is_an_error(tmp_path, smol_format, trajs):
    c = trajs["c"]
    path = write(tmp_path / "t.jsonl", [c])
    [e], report = rollout_examples(cfg([path], mask_error_turns=True), smol_format)
    assert report.masked_turns == 1
    bad, good, answer = c.turns
    assert set(e.loss_mask[bad.gen_start:bad.gen_end]) == {0}
    assert e.loss_mask[good.gen_start:] == c.loss_mask[good.gen_start:]  # later turns still trained
    assert sum(e.loss_mask) == sum(c.loss_mask) - (bad.gen_end - bad.gen_start)
    assert e.weights == tuple(float(m) for m in e.loss_mask)


def test_mae_error_strings_catch_text_only_errors(smol_format):
    traj = episode(smol_format, [SOFT, RIGHT])
    assert traj.turns[0].tool_results[0].status == ToolStatus.OK
    assert error_turns(traj, ["execution_error"], ["is not defined"]) == [0]
    assert error_turns(traj, ["execution_error"], ["IS  NOT-defined!"]) == [0]  # letters and digits only
    assert error_turns(traj, ["execution_error"], ["unexpected keyword"]) == []


def test_mae_drops_a_trajectory_with_nothing_left_and_counts_it(tmp_path, smol_format):
    only_errors = episode(smol_format, [BOOM], correct=False, limits=TurnLimits(max_turns=1))
    path = write(tmp_path / "t.jsonl", [only_errors])
    with pytest.raises(DataError, match="mask_error_turns 1"):
        rollout_examples(cfg([path], mask_error_turns=True, correct_only=False, drop_truncated=False), smol_format)


# ----------------------------------------------------------------------------- errors


def test_missing_files_and_globs_are_named(tmp_path):
    with pytest.raises(DataError, match="no such file 'nope.jsonl'"):
        resolve_paths(["nope.jsonl"])
    with pytest.raises(DataError, match="matches no files"):
        resolve_paths([str(tmp_path / "*.jsonl")])
    with pytest.raises(DataError, match="is a directory"):
        resolve_paths([str(tmp_path)])


def test_malformed_lines_name_file_and_line(tmp_path, smol_format, trajs):
    path = tmp_path / "t.jsonl"
    write(path, [trajs["a"]])
    with path.open("a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=rf"{path}:2: not a tirl trajectory"):
        rollout_examples(cfg([str(path)]), smol_format)
    row = json.loads(path.read_text().splitlines()[0])
    path.write_text(json.dumps({**row, "loss_mask": row["loss_mask"][:-1]}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: .*one loss_mask entry per response token"):
        rollout_examples(cfg([str(path)]), smol_format)


def test_tokens_of_another_tokenizer_are_refused(tmp_path, smol_format, trajs):
    a = trajs["a"]
    too_big = dataclasses.replace(a, response_ids=(len(smol_format.tokenizer),) + a.response_ids[1:])
    with pytest.raises(DataError, match="outside this model's vocabulary"):
        rollout_examples(cfg([write(tmp_path / "x.jsonl", [too_big])]), smol_format)
    shuffled = dataclasses.replace(a, prompt_ids=tuple(t + 7 for t in a.prompt_ids))
    with pytest.raises(DataError, match="do not decode to the trajectory's question"):
        rollout_examples(cfg([write(tmp_path / "y.jsonl", [shuffled])]), smol_format)


def test_nothing_left_says_what_each_filter_removed(tmp_path, smol_format, trajs):
    path = write(tmp_path / "t.jsonl", [trajs["b"], trajs["e"], trajs["f"]])
    with pytest.raises(DataError) as info:
        rollout_examples(cfg([path]), smol_format)
    msg = str(info.value)
    assert "read 3 trajectories from 1 file" in msg
    assert "drop_errored 1, drop_truncated 1, correct_only 1" in msg and "correct_only=false" in msg
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="hold no trajectories"):
        rollout_examples(cfg([str(tmp_path / "empty.jsonl")]), smol_format)


# ----------------------------------------------------------------------------- config


def test_config_keys_of_the_other_source_are_refused():
    c = load_config(None, ["sft.source=rollouts", "sft.rollouts=runs/a/trajectories/rl/step_*.jsonl"])
    assert c.sft.rollouts == ["runs/a/trajectories/rl/step_*.jsonl"]  # one path means a list of one
    c = load_config(None, ["sft.source=rollouts", "sft.rollouts=[a.jsonl, b.jsonl]", "sft.filter.max_per_problem=4"])
    assert c.sft.rollouts == ["a.jsonl", "b.jsonl"] and c.sft.filter.max_per_problem == 4
    for overrides, msg in ((["sft.source=rollouts"], "needs rollouts"),
                           (["sft.rollouts=[a.jsonl]"], "no effect unless source=rollouts"),
                           (["sft.filter.correct_only=false"], "no effect unless source=rollouts"),
                           (["sft.source=rollouts", "sft.rollouts=a", "sft.examples=5"], "examples has no effect"),
                           (["sft.source=rollouts", "sft.rollouts=a", "sft.filter.error_strings=[x]"],
                            "error_strings has no effect unless mask_error_turns"),
                           (["sft.max_key_weight=3"], "max_key_weight has no effect"),
                           (["sft.source=rollout"], "sft.source")):
        with pytest.raises(ConfigError, match=msg):
            load_config(None, overrides)
    assert load_config(None, [f"sft.{k}" for k in ("key_token_weighting=true", "max_key_weight=3")]).sft.max_key_weight == 3


# ----------------------------------------------------------------------------- PKT


def test_pkt_reference_values():
    """Reference 5.4: 2 key and 10 other tokens, all CE 1 -> weights 5, loss (2*5+10)/(2*5+10) = 1;
    with key CE 2 -> (2*5*2 + 10)/20 = 1.5."""
    key, mask = [1, 1] + [0] * 10, [1] * 12
    weights = key_token_weights(key, mask, 9.0)
    assert weights == (5.0, 5.0) + (1.0,) * 10
    w = torch.tensor([weights])
    assert weighted_token_mean(torch.ones(1, 12), w, float(w.sum())).item() == pytest.approx(1.0)
    ce = torch.tensor([[2.0, 2.0] + [1.0] * 10])
    assert weighted_token_mean(ce, w, float(w.sum())).item() == pytest.approx(1.5)


def test_pkt_weight_is_clamped_and_counts_trained_tokens_only():
    assert key_token_weights([1] + [0] * 20, [1] * 21, 9.0)[0] == 9.0  # 20/1 capped at 9
    assert key_token_weights([1] * 5 + [0] * 2, [1] * 7, 9.0) == (1.0,) * 7  # 2/5 < 1: never down-weighted
    assert key_token_weights([1, 0, 0, 0, 0], [1, 1, 1, 0, 0], 9.0) == (2.0, 1.0, 1.0, 0.0, 0.0)
    assert key_token_weights([0, 0], [1, 1], 9.0) == (1.0, 1.0)  # no key tokens: plain mean


def test_key_tokens_on_a_rendered_tool_call(smol_format):
    """The task-style trace: the call turn's key tokens are the first token of `<tool_call>` and the
    tokens of `calculator`; the answer turn has none, and no masked token is ever a key token."""
    call = ToolCall("c0", "calculator", {"expression": "4821 * 37"})
    seq = smol_format.sft_sequence([Message("system", "Solve it."), Message("user", "What is 4821 * 37?"),
                                    Message("assistant", "", tool_calls=(call,)),
                                    Message("tool", "178377", tool_call_id="c0", name="calculator"),
                                    Message("assistant", "<answer>178377</answer>")], TOOLS.schemas())
    key = key_token_mask(smol_format, seq.response_ids, seq.loss_mask)
    at = [i for i, k in enumerate(key) if k]
    assert at[0] == 0 and smol_format.decode(seq.response_ids[:1]) == "<"  # the call opens the turn
    assert smol_format.decode([seq.response_ids[i] for i in at[1:]]) == "calculator"
    assert at[1:] == list(range(at[1], at[-1] + 1))
    assert all(seq.loss_mask[i] for i in at)
    n_other = sum(seq.loss_mask) - len(at)
    weights = with_key_weights([example_of(seq, "t")], smol_format, 9.0)[0].weights
    assert [weights[i] for i in at] == [min(n_other / len(at), 9.0)] * len(at)


def test_key_tokens_in_sampled_turns_with_text_and_two_calls(smol_format):
    text = 'Voilà 計算: <tool_call>{"name": "soft_fail", "arguments": {"x": 1}}</tool_call> and ' \
           '<tool_call>\n{"arguments": {}, "name": "explode"}\n</tool_call>'
    ids = smol_format.encode(text)
    pos = key_positions(smol_format, ids)
    pieces = [smol_format.decode([ids[i]]) for i in pos]
    # the default tokenizer: ' <' opens each call (multi-byte text before it does not shift offsets)
    assert pieces == [" <", "soft", "_", "fail", " <", "expl", "ode"]
    assert smol_format.decode(ids[pos[0]:pos[0] + 5]) == " <tool_call>"
    assert key_positions(smol_format, smol_format.encode("no call here")) == []
    unnamed = smol_format.encode('<tool_call>{"arguments": {}}</tool_call>')
    assert key_positions(smol_format, unnamed) == [0]


def test_key_tokens_across_turns_of_a_rollout_and_pkt_needs_a_call(smol_format, trajs):
    c = trajs["c"]
    key = key_token_mask(smol_format, c.response_ids, c.loss_mask)
    per_turn = [sum(key[t.gen_start:t.gen_end]) for t in c.turns]
    assert per_turn[0] > 1 and per_turn[1] > 1 and per_turn[2] == 0
    assert sum(key) == sum(per_turn)  # only sampled tokens
    plain = example_of(smol_format.sft_sequence([Message("user", "q"), Message("assistant", "no tools")], None), "t")
    with pytest.raises(DataError, match="key_token_weighting is on, but none"):
        with_key_weights([plain], smol_format, 9.0)


def test_trajectories_without_sampled_tokens_are_dropped_and_counted(tmp_path, smol_format, trajs):
    a = trajs["a"]
    silent = dataclasses.replace(a, loss_mask=(0,) * len(a.loss_mask), response_ids=a.response_ids[:-1] + (0,))
    path = write(tmp_path / "t.jsonl", [silent, a])
    examples, report = rollout_examples(cfg([path]), smol_format)
    assert report.removed["no_trained_tokens"] == 1 and [e.origin for e in examples] == [f"{path}:2"]


def test_preflight_names_missing_rollout_files(tmp_path):
    """`tirl train` with sft.source=rollouts checks the files before any work starts."""
    from tirl.config import load_config
    from tirl.errors import ConfigError
    from tirl.trainer.build import preflight

    cfg = load_config(None, ["sft.source=rollouts", f"sft.rollouts=[{tmp_path}/none/*.jsonl]"])
    with pytest.raises(ConfigError, match="matches no files"):
        preflight(cfg)
